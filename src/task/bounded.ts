import { setMaxListeners } from 'node:events';

import { Limiter, type Priority } from './limiter';

export interface EachOptions {
  /** Tasks at once. */
  concurrency: number;
  /** Stops handing out items once aborted; the running ones get the combined signal. */
  signal?: AbortSignal;
  /** When the work shares a process-wide limiter (the scheduler's), each item also takes a slot there. */
  shared?: { limiter: Limiter; priority: Priority };
}

/**
 * Runs `fn` over `items` in order, `concurrency` at a time. The first failure aborts the signal handed to the
 * running items and stops the rest from starting; it is what the call rejects with, once every started item
 * has settled (nothing of the work runs on after it returns).
 */
export async function forEachBounded<T>(items: readonly T[], fn: (item: T, index: number, signal: AbortSignal) => Promise<void>, opts: EachOptions): Promise<void> {
  const failed = new AbortController();
  const signal = opts.signal !== undefined ? AbortSignal.any([opts.signal, failed.signal]) : failed.signal;
  setMaxListeners(0, signal); // a listener per request in flight: `concurrency` may be more than ten
  let next = 0;
  let failure: { err: unknown } | undefined;
  const worker = async (): Promise<void> => {
    while (next < items.length && failure === undefined) {
      signal.throwIfAborted();
      const i = next++;
      const item = items[i] as T;
      await (opts.shared !== undefined ? opts.shared.limiter.run(() => fn(item, i, signal), { priority: opts.shared.priority, signal }) : fn(item, i, signal));
    }
  };
  const workers = Array.from({ length: Math.min(Math.max(1, opts.concurrency), items.length) }, () =>
    worker().catch((err: unknown) => {
      if (failure === undefined) {
        failure = { err };
        failed.abort(err);
      }
    }),
  );
  await Promise.all(workers);
  if (failure !== undefined) throw failure.err;
}
