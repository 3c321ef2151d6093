import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { forEachBounded } from '../../../src/task/bounded';
import { Limiter } from '../../../src/task/limiter';

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('forEachBounded', () => {
  it('visits every item once, at most `concurrency` at a time, starting in order', async () => {
    const started: number[] = [];
    let running = 0;
    let peak = 0;
    await forEachBounded(
      [10, 11, 12, 13, 14, 15, 16],
      async (item, index) => {
        assert.equal(item, index + 10);
        started.push(index);
        peak = Math.max(peak, ++running);
        await tick();
        running--;
      },
      { concurrency: 3 },
    );
    assert.deepEqual(started, [0, 1, 2, 3, 4, 5, 6]);
    assert.equal(peak, 3);
  });

  it('stops on the first failure: aborts the running items, starts no more, rejects after they settle', async () => {
    const started: number[] = [];
    let sawAbort = false;
    let settled = 0;
    const run = forEachBounded(
      [0, 1, 2, 3, 4, 5],
      async (i, _index, signal) => {
        started.push(i);
        try {
          if (i === 1) throw new Error('part 1 failed');
          await new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
          sawAbort = signal.aborted;
        } finally {
          settled++;
        }
      },
      { concurrency: 2 },
    );
    await assert.rejects(run, /part 1 failed/);
    assert.deepEqual(started, [0, 1]);
    assert.ok(sawAbort);
    assert.equal(settled, 2, 'nothing runs on after the call returns');
  });

  it('hands out nothing once the caller aborts', async () => {
    const abort = new AbortController();
    abort.abort(new Error('unmounted'));
    let calls = 0;
    const count = (): Promise<void> => {
      calls++;
      return Promise.resolve();
    };
    await assert.rejects(forEachBounded([1, 2], count, { concurrency: 2, signal: abort.signal }), /unmounted/);
    assert.equal(calls, 0);
  });

  it('takes a slot of a shared limiter for each item, at its priority', async () => {
    const shared = new Limiter(1);
    let peak = 0;
    await Promise.all([
      forEachBounded([1, 2, 3], async () => {
        peak = Math.max(peak, shared.running);
        await tick();
      }, { concurrency: 3, shared: { limiter: shared, priority: 'prefetch' } }),
      forEachBounded([1, 2, 3], async () => {
        peak = Math.max(peak, shared.running);
        await tick();
      }, { concurrency: 3, shared: { limiter: shared, priority: 'background' } }),
    ]);
    assert.equal(peak, 1);
  });

  it('does nothing for no items', async () => {
    await forEachBounded([], () => Promise.reject(new Error('never')), { concurrency: 4 });
  });
});
