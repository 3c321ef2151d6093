import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { collapseKey, joinOrLead, type CollapsedPull, type CollapseOutcome } from '../../../src/containerd/pull-collapse';
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

/** A pull whose waits a test can follow (joinOrLead's onWait), instead of guessing how long they take. */
class Pull {
  readonly outcome: Promise<CollapseOutcome>;
  /** How many times it found the lead taken and waited. */
  waits = 0;
  settled = false;
  private readonly wakeups = new Set<() => void>();

  constructor(key: string, dir: string, opts: { signal?: AbortSignal; onWait?: () => void } = {}) {
    this.outcome = joinOrLead(key, {
      resultDir: dir,
      signal: opts.signal,
      onWait: () => {
        this.waits++;
        opts.onWait?.();
        for (const wake of this.wakeups) wake();
      },
    });
    const settle = (): void => {
      this.settled = true;
      for (const wake of this.wakeups) wake();
    };
    this.outcome.then(settle, settle);
  }

  /** Resolves once it has waited `count` times in all; fails if it finishes before. */
  async waited(count = 1): Promise<void> {
    while (this.waits < count) {
      if (this.settled) {
        const o = await this.outcome;
        assert.fail(`it finished (${o.kind}) after ${this.waits} waits, before waiting ${count} times`);
      }
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          this.wakeups.delete(wake);
          resolve();
        };
        this.wakeups.add(wake);
      });
    }
  }
}

/** `p`, or a failure saying `what` when it has not settled within `ms` (a bound on a failure, not a wait). */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(what)), ms)));
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

test('the first pull leads; one started while it runs joins with its result', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'join', n: Math.random() });
    const leader = await joinOrLead(key, { resultDir: dir });
    assert.ok(leader.kind === 'lead');
    const waiter = new Pull(key, dir);
    await waiter.waited();
    await leader.publish(RESULT);
    await leader.release();
    const joined = await waiter.outcome;
    assert.ok(joined.kind === 'joined');
    assert.deepEqual(joined.result, RESULT);
  }));

test('a leader whose pull fails: every waiter pulls on its own at once, none waits for another', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'fail', n: Math.random() });
    const leader = await joinOrLead(key, { resultDir: dir });
    assert.ok(leader.kind === 'lead');
    const waiters = [new Pull(key, dir), new Pull(key, dir), new Pull(key, dir)];
    await Promise.all(waiters.map((w) => w.waited()));
    await leader.fail();
    await leader.release();
    // Taking the lead in turn would leave all but one waiting here until the one before them finished (the
    // test never finishes them: they would wait for MAX_JOIN_WAIT_MS). The bound only turns that into a message.
    const outcomes = await within(Promise.all(waiters.map((w) => w.outcome)), 10_000, 'a waiter was still waiting for another after the leader failed');
    for (const o of outcomes) assert.equal(o.kind, 'lead');
    // ... on their own: none of them holds the lock, so a newcomer finds it free at its first look.
    const found = new AbortController();
    const newcomer = new Pull(key, dir, { signal: found.signal, onWait: () => found.abort(new Error('the newcomer found the lead taken: a waiter holds the lock')) });
    const n = await newcomer.outcome;
    assert.equal(newcomer.waits, 0);
    if (n.kind === 'lead') await n.release();
  }));

test('a leader that goes away without a word (interrupted, killed): one waiter takes the lead, the other waits for it', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'gone', n: Math.random() });
    const leader = await joinOrLead(key, { resultDir: dir });
    assert.ok(leader.kind === 'lead');
    const waiters = [new Pull(key, dir), new Pull(key, dir)];
    await Promise.all(waiters.map((w) => w.waited()));
    await leader.release();
    const first = await Promise.race(waiters.map((w) => w.outcome.then((o) => ({ w, o }))));
    assert.ok(first.o.kind === 'lead');
    const other = waiters.find((w) => w !== first.w)!;
    // Its next look (woken by the release, or at most WAIT_SLICE_MS later) finds the new leader and waits
    // again: waited() fails if it finishes instead (took the lead too, or gave up).
    await other.waited(other.waits + 1);
    assert.equal(other.settled, false);
    await first.o.publish(RESULT);
    await first.o.release();
    const joined = await other.outcome;
    assert.ok(joined.kind === 'joined');
    assert.deepEqual(joined.result, RESULT);
  }));

test('a result older than the pull does not count', () =>
  withDir(async (dir) => {
    const key = collapseKey({ test: 'stale', n: Math.random() });
    const first = await joinOrLead(key, { resultDir: dir });
    assert.ok(first.kind === 'lead');
    await first.publish(RESULT);
    await first.release();
    // Results are stamped in milliseconds, and one finished in the very millisecond a pull starts counts as
    // newer: wait for the clock to move past the publish, so the next pull starts strictly after it.
    const publishedBy = Date.now();
    while (Date.now() <= publishedBy) await new Promise((r) => setImmediate(r));
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
