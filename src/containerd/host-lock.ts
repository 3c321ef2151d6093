/**
 * Mutexes between processes on this host (concurrent `stargaze rpull`s of one image), made from Linux abstract
 * unix socket names: binding a name succeeds for one socket at a time, and the kernel frees the name when its
 * holder exits, crash or not, so a lock can never be left behind. The scope is the network namespace, which is
 * the host for the usual case of pulls started next to containerd; pulls in other network namespaces just do
 * not wait for each other (containerd still keeps the result correct, only duplicated work is not avoided).
 *
 * Why not containerd's own locks: a content ingest ref is locked while a writer holds it, but containerd 1.6
 * waits for that lock (up to about a second, retrying) inside a metadata write transaction, stalling every
 * other metadata write of the daemon meanwhile; twenty pulls polling one ref brought everything to a crawl.
 */
import { createHash } from 'node:crypto';
import net from 'node:net';
import { errorCode } from '../errors';

/** How often a waiter retries the lock and polls `satisfied` at least (a release wakes it at once). */
export const HOST_LOCK_POLL_MS = 50;
/** Abstract socket names are limited to 107 bytes; ours are a fixed prefix plus a hash of the lock's name. */
const NAME_PREFIX = '\0stargaze-lock-';
const NAME_HASH_CHARS = 48;

export type ReleaseHostLock = () => Promise<void>;

export interface HostLockOptions {
  signal?: AbortSignal;
  /** Polled while the lock is busy; true means the holder did the work and the lock is not needed any more. */
  satisfied?: () => Promise<boolean>;
  /** Called once when the lock turns out to be busy. */
  onWait?: () => void;
}

/** The abstract socket address behind lock `name` (exported for tests that play a hostile holder). */
export function socketName(name: string): string {
  return NAME_PREFIX + createHash('sha256').update(name).digest('hex').slice(0, NAME_HASH_CHARS);
}

/**
 * Takes the lock if it is free: the release function, or undefined when another process holds it. The holder
 * keeps connections from waitForHostLockRelease() open and closes them on release (or the kernel does, when it
 * exits), so waiters learn at once that the lock is free.
 */
export function tryHostLock(name: string): Promise<ReleaseHostLock | undefined> {
  return new Promise((resolve, reject) => {
    const waiters = new Set<net.Socket>();
    const server = net.createServer((conn) => {
      conn.unref();
      conn.on('error', () => undefined);
      waiters.add(conn);
      conn.once('close', () => waiters.delete(conn));
    });
    server.once('error', (err) => {
      if (errorCode(err) === 'EADDRINUSE') resolve(undefined);
      else reject(err);
    });
    server.listen({ path: socketName(name) }, () => {
      server.unref(); // a held lock does not keep the process alive
      let released: Promise<void> | undefined;
      resolve(
        () =>
          (released ??= new Promise<void>((done) => {
            server.close(() => done());
            for (const conn of waiters) conn.destroy();
          })),
      );
    });
  });
}

/**
 * Resolves when the lock `name` is (probably) free: its holder released it or exited, nobody held it, or
 * `maxWaitMs` passed. Callers try the lock again afterwards; this only saves them from polling blindly.
 */
export function waitForHostLockRelease(name: string, maxWaitMs: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const started = Date.now();
    const conn = net.connect({ path: socketName(name) });
    let settled = false;
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      conn.destroy();
      resolve();
    };
    let timer = setTimeout(done, maxWaitMs);
    // A holder that closes at once (an older stargaze, or whoever bound the name) must not turn the
    // callers' retry loops into a busy spin: the connection ending wakes them no sooner than a poll would.
    const ended = (): void => {
      if (settled) return;
      settled = true;
      conn.destroy();
      clearTimeout(timer);
      timer = setTimeout(done, Math.max(0, started + Math.min(maxWaitMs, HOST_LOCK_POLL_MS) - Date.now()));
    };
    signal?.addEventListener('abort', done, { once: true });
    conn.on('error', ended);
    conn.on('close', ended);
    conn.on('data', () => undefined);
  });
}

/**
 * Waits for the lock `name`. Resolves with its release function, or with undefined as soon as
 * `opts.satisfied` says the lock is no longer needed.
 */
export async function acquireHostLock(name: string, opts: HostLockOptions = {}): Promise<ReleaseHostLock | undefined> {
  let waited = false;
  for (;;) {
    if (opts.signal?.aborted === true) throw opts.signal.reason;
    const release = await tryHostLock(name);
    if (release !== undefined) return release;
    if (!waited) opts.onWait?.();
    waited = true;
    await waitForHostLockRelease(name, HOST_LOCK_POLL_MS, opts.signal);
    opts.signal?.throwIfAborted();
    if (opts.satisfied !== undefined && (await opts.satisfied())) return undefined;
  }
}
