/**
 * At most `limit` tasks at once; waiting tasks start in priority order, first come first served within a
 * priority. A `read` (a container waiting on a FUSE reply) never waits: it takes a slot even past the limit,
 * so reads are never queued behind prefetch or background work, while the work behind them waits until the
 * reads are done. The one implementation of "N at a time" in the tree: every bounded pool uses it.
 */

/** What a task is for, most urgent first. */
export type Priority = 'read' | 'prefetch' | 'background';

const ORDER: readonly Priority[] = ['read', 'prefetch', 'background'];

export interface RunOptions {
  /** Default `prefetch`: waits for a slot, ahead of background work. */
  priority?: Priority;
  /**
   * Gives up waiting (rejects with the signal's reason); a task already started is the task's to stop. Each
   * waiting task listens on it: a caller queuing more than ten tasks on one signal raises its listener limit
   * (events.setMaxListeners), as forEachBounded does.
   */
  signal?: AbortSignal;
}

interface Waiter {
  start(): void;
}

export class Limiter {
  private active = 0;
  private readonly waiting: Record<Priority, Waiter[]> = { read: [], prefetch: [], background: [] };

  constructor(readonly limit: number) {
    if (!Number.isInteger(limit) || limit < 1) throw new RangeError(`limit must be a positive integer, not ${limit}`);
  }

  /** Tasks running now. */
  get running(): number {
    return this.active;
  }

  /** Tasks waiting for a slot. */
  get queued(): number {
    return ORDER.reduce((n, p) => n + this.waiting[p].length, 0);
  }

  async run<T>(fn: () => Promise<T> | T, opts: RunOptions = {}): Promise<T> {
    const priority = opts.priority ?? 'prefetch';
    opts.signal?.throwIfAborted();
    if (priority === 'read' || (this.active < this.limit && this.queued === 0)) this.active++;
    else await this.slot(priority, opts.signal); // resolves with the slot already counted, see next()
    try {
      return await fn();
    } finally {
      this.active--;
      this.next();
    }
  }

  private slot(priority: Priority, signal: AbortSignal | undefined): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const queue = this.waiting[priority];
      const onAbort = (): void => {
        const i = queue.indexOf(waiter);
        if (i >= 0) queue.splice(i, 1);
        reject(signal!.reason);
      };
      const waiter: Waiter = {
        start: () => {
          signal?.removeEventListener('abort', onAbort);
          resolve();
        },
      };
      queue.push(waiter);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  private next(): void {
    while (this.active < this.limit) {
      const priority = ORDER.find((p) => this.waiting[p].length > 0);
      if (priority === undefined) return;
      // Counted here, not when the resumed task runs a microtask later, so no newcomer takes the slot between.
      this.active++;
      this.waiting[priority].shift()!.start();
    }
  }
}
