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

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** 'pending' when `p` has not settled within `ms`. */
async function settledWithin(p: Promise<unknown>, ms: number): Promise<'settled' | 'pending'> {
  return Promise.race([p.then(() => 'settled' as const), sleep(ms).then(() => 'pending' as const)]);
}

test('a leader whose pull fails: every waiter pulls on its own at once, none waits for another', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'fail', n: Math.random() });
    const leader = await joinOrLead(key, { resultDir: dir });
    assert.ok(leader.kind === 'lead');
    const waiters = [joinOrLead(key, { resultDir: dir }), joinOrLead(key, { resultDir: dir }), joinOrLead(key, { resultDir: dir })];
    await sleep(50);
    await leader.fail();
    await leader.release();
    // Taking the lead in turn would leave all but one waiting here until the one before them finished.
    const outcomes = await Promise.race([Promise.all(waiters), sleep(2_000).then(() => undefined)]);
    assert.ok(outcomes, 'a waiter was still waiting for another after the leader failed');
    for (const o of outcomes) assert.equal(o.kind, 'lead');
    // ... on their own: none of them holds the lock, so a newcomer is not kept waiting by them.
    const newcomer = joinOrLead(key, { resultDir: dir });
    assert.equal(await settledWithin(newcomer, 1_000), 'settled');
    const n = await newcomer;
    if (n.kind === 'lead') await n.release();
  }));

test('a leader that goes away without a word (interrupted, killed): one waiter takes the lead, the other waits for it', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'gone', n: Math.random() });
    const leader = await joinOrLead(key, { resultDir: dir });
    assert.ok(leader.kind === 'lead');
    const waiters = [0, 1].map((n) => joinOrLead(key, { resultDir: dir }).then((o) => ({ n, o })));
    await sleep(50);
    await leader.release();
    const first = await Promise.race(waiters);
    assert.ok(first.o.kind === 'lead');
    const other = waiters[1 - first.n] as (typeof waiters)[number];
    assert.equal(await settledWithin(other, 300), 'pending');
    await first.o.publish(RESULT);
    await first.o.release();
    const joined = (await other).o;
    assert.ok(joined.kind === 'joined');
    assert.deepEqual(joined.result, RESULT);
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
