import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { Limiter, type Priority } from '../../../src/task/limiter';

/** A task that runs until released, recording when it started. */
function gate(): { promise: Promise<void>; release(): void } {
  let release!: () => void;
  const promise = new Promise<void>((resolve) => (release = resolve));
  return { promise, release };
}

describe('Limiter', () => {
  it('runs at most `limit` tasks at once', async () => {
    const limiter = new Limiter(2);
    let running = 0;
    let peak = 0;
    const task = async (): Promise<void> => {
      running++;
      peak = Math.max(peak, running);
      await new Promise((r) => setImmediate(r));
      running--;
    };
    await Promise.all(Array.from({ length: 10 }, () => limiter.run(task)));
    assert.equal(peak, 2);
    assert.equal(limiter.running, 0);
  });

  it('starts waiting tasks by priority, first come first served within one', async () => {
    const limiter = new Limiter(1);
    const hold = gate();
    const order: string[] = [];
    const first = limiter.run(() => hold.promise);
    const queued = (['background', 'prefetch', 'background', 'prefetch'] as Priority[]).map((priority, i) =>
      limiter.run(() => void order.push(`${priority}${i}`), { priority }),
    );
    assert.equal(limiter.queued, 4);
    hold.release();
    await Promise.all([first, ...queued]);
    assert.deepEqual(order, ['prefetch1', 'prefetch3', 'background0', 'background2']);
  });

  it('never makes a read wait, and makes the rest wait while reads hold the slots', async () => {
    const limiter = new Limiter(1);
    const hold = gate();
    const prefetch = limiter.run(() => hold.promise);
    const readHold = gate();
    let readStarted = false;
    const read = limiter.run(
      () => {
        readStarted = true;
        return readHold.promise;
      },
      { priority: 'read' },
    );
    await new Promise((r) => setImmediate(r));
    assert.ok(readStarted, 'the read started although the one slot was taken');
    assert.equal(limiter.running, 2);
    let backgroundStarted = false;
    const background = limiter.run(() => void (backgroundStarted = true), { priority: 'background' });
    hold.release();
    await prefetch;
    await new Promise((r) => setImmediate(r));
    assert.equal(backgroundStarted, false, 'the read still holds more than the limit');
    readHold.release();
    await Promise.all([read, background]);
    assert.ok(backgroundStarted);
  });

  it('lets a newcomer not overtake a task already handed a free slot', async () => {
    const limiter = new Limiter(1);
    const hold = gate();
    let peak = 0;
    const task = async (): Promise<void> => {
      peak = Math.max(peak, limiter.running);
      await new Promise((r) => setImmediate(r));
    };
    const first = limiter.run(() => hold.promise);
    const waiting = limiter.run(task);
    hold.release();
    await first;
    const newcomer = limiter.run(task); // same tick as the hand-over
    await Promise.all([waiting, newcomer]);
    assert.equal(peak, 1);
  });

  it('gives up waiting when its signal aborts, and the slot goes to the next', async () => {
    const limiter = new Limiter(1);
    const hold = gate();
    const first = limiter.run(() => hold.promise);
    const abort = new AbortController();
    let ran = false;
    const abandoned = limiter.run(() => void (ran = true), { signal: abort.signal });
    const next = limiter.run(() => 'next');
    abort.abort(new Error('layer closed'));
    await assert.rejects(abandoned, /layer closed/);
    assert.equal(limiter.queued, 1);
    hold.release();
    assert.equal(await next, 'next');
    await first;
    assert.equal(ran, false);
    await assert.rejects(limiter.run(() => 1, { signal: abort.signal }), /layer closed/, 'an aborted signal never queues');
  });

  it('frees the slot when a task fails', async () => {
    const limiter = new Limiter(1);
    await assert.rejects(limiter.run(() => Promise.reject(new Error('boom'))), /boom/);
    assert.equal(limiter.running, 0);
    assert.equal(await limiter.run(() => 7), 7);
  });

  it('refuses a limit that is not a positive integer', () => {
    assert.throws(() => new Limiter(0), RangeError);
    assert.throws(() => new Limiter(1.5), RangeError);
  });
});
