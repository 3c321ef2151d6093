/**
 * Identical pulls the daemon is asked for while one runs share it: the same image into the same containerd,
 * namespace and snapshotter, with the same registry options and credentials, is pulled once, and every
 * caller sees its events (those before it joined first) and its result or error. This is what lets
 * `stargaze rpull` hand its pull to the daemon at once, without first settling among concurrent rpulls on
 * the host which one pulls (file locks, hashing: tens of ms of a fresh Node process's CPU per pull).
 *
 * The shared pull stops only when every caller has gone away: one interrupted `stargaze rpull` must not fail
 * the others.
 */
import type { PullEvent } from '../containerd/pull';
import type { PullRequest, PullSummary } from '../containerd/pull-request';

/** Carries out one pull; `signal` aborts when the last caller has gone. */
export type RunSharedPull = (request: PullRequest, signal: AbortSignal, onEvent: (e: PullEvent) => void) => Promise<PullSummary>;

interface SharedPull {
  readonly abort: AbortController;
  /** The events so far (each layer's latest progress only), replayed to a caller that joins late. */
  readonly events: PullEvent[];
  readonly listeners: Set<(e: PullEvent) => void>;
  readonly result: Promise<PullSummary>;
}

/** The key of a pull: every field that decides what it does (parsePullCall gave them a fixed shape). */
export function sharedPullKey(request: PullRequest): string {
  const { ref, address, namespace, snapshotter, platform, prefetchBytes, hostsDir, plainHttp, user, dockerConfigDir } = request;
  return JSON.stringify([ref, address, namespace, snapshotter, platform.os, platform.architecture, platform.variant ?? '', prefetchBytes, hostsDir, plainHttp, user?.username ?? null, user?.password ?? null, dockerConfigDir]);
}

export class SharedPulls {
  private readonly running = new Map<string, SharedPull>();

  constructor(private readonly runPull: RunSharedPull) {}

  /** Pulls in progress (distinct ones). */
  get size(): number {
    return this.running.size;
  }

  /**
   * The result of `request`, from a pull started now or from the identical one in progress. `signal` is this
   * caller's: when it aborts, this call rejects with its reason, and the pull stops if nobody else waits for it.
   * `joined` tells the caller whether it joined a pull already running.
   */
  pull(request: PullRequest, signal: AbortSignal, onEvent: (e: PullEvent) => void, joined?: () => void): Promise<PullSummary> {
    if (signal.aborted) return Promise.reject(signal.reason as Error);
    const key = sharedPullKey(request);
    let shared = this.running.get(key);
    if (shared !== undefined) {
      joined?.();
      for (const e of shared.events) onEvent(e);
      shared.listeners.add(onEvent);
    } else {
      shared = this.start(key, request, onEvent);
    }
    const s = shared;
    return new Promise<PullSummary>((resolve, reject) => {
      const onAbort = (): void => {
        leave();
        reject(signal.reason);
      };
      const leave = (): void => {
        signal.removeEventListener('abort', onAbort);
        s.listeners.delete(onEvent);
        if (s.listeners.size === 0 && this.running.get(key) === s) {
          this.running.delete(key);
          s.abort.abort(signal.reason);
        }
      };
      signal.addEventListener('abort', onAbort, { once: true });
      s.result.then(
        (summary) => {
          signal.removeEventListener('abort', onAbort);
          s.listeners.delete(onEvent);
          resolve(summary);
        },
        (err: unknown) => {
          signal.removeEventListener('abort', onAbort);
          s.listeners.delete(onEvent);
          reject(err);
        },
      );
    });
  }

  /** Stops every pull in progress (the daemon stops). */
  abortAll(reason: unknown): void {
    for (const s of this.running.values()) s.abort.abort(reason);
    this.running.clear();
  }

  /** Starts the pull with its first caller listening: it may report events before it first waits. */
  private start(key: string, request: PullRequest, first: (e: PullEvent) => void): SharedPull {
    const abort = new AbortController();
    const events: PullEvent[] = [];
    const listeners = new Set<(e: PullEvent) => void>([first]);
    /** Where each layer's progress event is in `events`: it is replaced, not added to. */
    const progressAt = new Map<number, number>();
    let ended = false;
    const run = async (): Promise<PullSummary> => {
      try {
        return await this.runPull(request, abort.signal, (e) => {
          // A download reports progress per MiB: a late caller needs only where each layer stands.
          const at = e.type === 'layer-progress' ? progressAt.get(e.index) : undefined;
          if (at !== undefined) events[at] = e;
          else {
            if (e.type === 'layer-progress') progressAt.set(e.index, events.length);
            events.push(e);
          }
          for (const l of listeners) l(e);
        });
      } finally {
        // Whoever asks from now on starts a pull of their own: this one's result may be stale by then.
        ended = true;
        if (this.running.get(key)?.abort === abort) this.running.delete(key);
      }
    };
    const shared: SharedPull = { abort, events, listeners, result: run() };
    shared.result.catch(() => undefined); // each caller gets it through pull()
    if (!ended) this.running.set(key, shared); // a pull that failed at once is nobody's to join
    return shared;
  }
}
