import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { collapseKey, joinOrLead, type CollapsedPull } from '../../../src/containerd/pull-collapse';
import { privateRpullDir } from '../../../src/containerd/rpull-dir';

const RESULT: CollapsedPull = { name: 'example.com/a:b', manifestDigest: `sha256:${'1'.repeat(64)}`, platform: undefined, layers: [`sha256:${'2'.repeat(64)}`] };

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const base = await mkdtemp(path.join(os.tmpdir(), 'stargaze-collapse-'));
  try {
    await fn(path.join(base, 'results'));
  } finally {
    await rm(base, { recursive: true, force: true });
  }
}

test('the first pull leads; one started while it runs joins with its result', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'join', n: Math.random() });
    const leader = await joinOrLead(key, { resultDir: dir });
    assert.equal(leader.kind, 'lead');
    const waiter = joinOrLead(key, { resultDir: dir });
    await new Promise((r) => setTimeout(r, 50));
    if (leader.kind !== 'lead') return;
    await leader.publish(RESULT);
    await leader.release();
    const joined = await waiter;
    assert.equal(joined.kind, 'joined');
    if (joined.kind === 'joined') assert.deepEqual(joined.result, RESULT);
  }));

test('a leader that fails publishes nothing: the waiter leads in turn', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'fail', n: Math.random() });
    const leader = await joinOrLead(key, { resultDir: dir });
    assert.equal(leader.kind, 'lead');
    const waiter = joinOrLead(key, { resultDir: dir });
    await new Promise((r) => setTimeout(r, 50));
    if (leader.kind === 'lead') await leader.release();
    const next = await waiter;
    assert.equal(next.kind, 'lead');
    if (next.kind === 'lead') await next.release();
  }));

test('a result older than the pull does not count', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'stale', n: Math.random() });
    const first = await joinOrLead(key, { resultDir: dir });
    if (first.kind === 'lead') {
      await first.publish(RESULT);
      await first.release();
    }
    await new Promise((r) => setTimeout(r, 5));
    const second = await joinOrLead(key, { resultDir: dir });
    assert.equal(second.kind, 'lead');
    if (second.kind === 'lead') await second.release();
  }));

test('a result directory others can write to is not used', () =>
  withDir(async (dir) => {
    assert.equal(await privateRpullDir(dir), dir);
    await chmod(dir, 0o777);
    assert.equal(await privateRpullDir(dir), undefined);
    // and then nothing is collapsed: every pull leads
    const key = collapseKey({ test: 'open', n: Math.random() });
    await writeFile(path.join(dir, `${key}.json`), JSON.stringify({ ...RESULT, finishedAt: Date.now() + 60_000 }));
    const a = await joinOrLead(key, { resultDir: dir });
    assert.equal(a.kind, 'lead');
  }));
