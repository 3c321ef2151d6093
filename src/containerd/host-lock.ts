/**
 * Mutexes between processes of one user on this host (concurrent `stargaze rpull`s of one image), made of unix
 * sockets in a directory only that user can enter (rpull-dir.ts): lock `name` is held by whoever has a listening
 * socket at `<dir>/<hash of name>.lock`. They used to be abstract socket names, which anyone on the host can
 * bind: a squatter could hold any lock forever and stall every pull behind it.
 *
 *  - Taking: the socket is bound and listening under a unique temporary name first, then hard-linked to the
 *    lock's name. link() is atomic and fails when the name exists, and the name never shows a socket that is
 *    not listening yet (between bind and listen a connect is refused, which would look stale, see below).
 *  - Waiting: a waiter connects and keeps the connection; the holder hangs up on release, and the kernel does
 *    when the holder exits, crash or not, so waiters wake at once.
 *  - Releasing: the holder unlinks the name (if it is still its socket), then closes the socket.
 *  - Stale: a holder killed before it released leaves its socket file behind, which refuses connections
 *    (ECONNREFUSED); a live one never does. Stale files are removed under a second lock, `<name>.cleaning`
 *    (same socket, another link), and only while the name is still the inode that refused: without it, two
 *    processes finding the same stale file could each remove it, the second one removing the first one's
 *    fresh lock. A `.cleaning` file left by a process killed while cleaning (microseconds) is itself removed
 *    without that care; at worst two processes then hold one lock, which costs repeated work, never a wrong
 *    result: containerd keeps what the locked work does correct either way.
 *
 * Why not containerd's own locks: a content ingest ref is locked while a writer holds it, but containerd 1.6
 * waits for that lock (up to about a second, retrying) inside a metadata write transaction, stalling every
 * other metadata write of the daemon meanwhile; twenty pulls polling one ref brought everything to a crawl.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { Stats } from 'node:fs';
import { link, lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { errorCode } from '../errors';
import { privateRpullDir } from './rpull-dir';

/** How often a waiter retries the lock and polls `satisfied` at least (a release wakes it at once). */
export const HOST_LOCK_POLL_MS = 50;
/** Hex digits of the name's hash in the socket's file name. */
const NAME_HASH_CHARS = 48;
const LOCK_SUFFIX = '.lock';
const CLEANING_SUFFIX = '.cleaning';
/** Tries of one tryHostLock when the name keeps changing under it (stale files, releases); then "busy". */
const TAKE_ATTEMPTS = 3;

export type ReleaseHostLock = () => Promise<void>;

export interface HostLockOptions {
  signal?: AbortSignal;
  /** Polled while the lock is busy; true means the holder did the work and the lock is not needed any more. */
  satisfied?: () => Promise<boolean>;
  /** Called once when the lock turns out to be busy. */
  onWait?: () => void;
  /** Directory of the lock sockets; default rpull's private directory. Must be private (it is checked). */
  dir?: string;
}

/** Path of the socket behind lock `name` in `dir` (exported for tests that play other holders). */
export function lockPath(dir: string, name: string): string {
  const file = `${createHash('sha256').update(name).digest('hex').slice(0, NAME_HASH_CHARS)}${LOCK_SUFFIX}`;
  return path.join(dir, file);
}

/** The longest socket name made here (`<hash>.lock.cleaning`); rpull-dir.ts keeps room for MAX_SOCKET_NAME_BYTES. */
export const LONGEST_SOCKET_NAME_BYTES = NAME_HASH_CHARS + LOCK_SUFFIX.length + CLEANING_SUFFIX.length;

type Probe = { state: 'held' } | { state: 'gone' } | { state: 'stale'; ino: number };

/** What is at `file`: a live socket, nothing, or a dead socket (or junk) that is still there as `ino`. */
async function probe(file: string): Promise<Probe> {
  const before = await lstatOrUndefined(file);
  if (before === undefined) return { state: 'gone' };
  if (!before.isSocket()) return { state: 'stale', ino: before.ino }; // nothing of ours; only we write here
  const answer = await new Promise<'live' | 'refused' | 'gone'>((resolve) => {
    const conn = net.connect({ path: file });
    conn.once('connect', () => {
      conn.destroy();
      resolve('live');
    });
    conn.once('error', (err) => {
      const code = errorCode(err);
      // Anything but a refusal (a full backlog: EAGAIN) comes from a socket that is alive.
      resolve(code === 'ECONNREFUSED' ? 'refused' : code === 'ENOENT' ? 'gone' : 'live');
    });
  });
  if (answer === 'live') return { state: 'held' };
  if (answer === 'gone') return { state: 'gone' };
  // The refusal is about `before` only if the name did not change meanwhile; otherwise look again.
  const after = await lstatOrUndefined(file);
  return after?.ino === before.ino ? { state: 'stale', ino: before.ino } : { state: 'gone' };
}

async function lstatOrUndefined(file: string): Promise<Stats | undefined> {
  try {
    return await lstat(file);
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return undefined;
    throw err;
  }
}

/** Links `from` to `to`; false when `to` exists. */
async function linkIfFree(from: string, to: string): Promise<boolean> {
  try {
    await link(from, to);
    return true;
  } catch (err) {
    if (errorCode(err) === 'EEXIST') return false;
    throw err;
  }
}

/** Unlinks `file` if it is still the inode `ino`; true when it did. */
async function unlinkIfSame(file: string, ino: number): Promise<boolean> {
  const st = await lstatOrUndefined(file);
  if (st?.ino !== ino) return false;
  try {
    await unlink(file);
    return true;
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return false;
    throw err;
  }
}

/**
 * Removes the stale lock file `file` (inode `staleIno`) under `<file>.cleaning`, taken by linking our own
 * socket `own` (inode `ownIno`) there. True when this call removed it; false when someone else is cleaning
 * or already did.
 */
async function removeStale(file: string, staleIno: number, own: string, ownIno: number): Promise<boolean> {
  const cleaning = `${file}${CLEANING_SUFFIX}`;
  if (!(await linkIfFree(own, cleaning))) {
    const other = await probe(cleaning);
    // Its cleaner was killed mid-way: remove it so the lock is not stuck (see the file comment).
    if (other.state === 'stale') await unlinkIfSame(cleaning, other.ino);
    return false;
  }
  try {
    // While we hold `.cleaning` nobody else removes `file`, and a live lock cannot replace it before it is
    // removed (link fails on an existing name): if it is still the stale inode, it is still stale.
    return await unlinkIfSame(file, staleIno);
  } finally {
    await unlinkIfSame(cleaning, ownIno);
  }
}

/** A listening socket under a unique name in `dir`: what a holder keeps while it holds. */
async function listenOwn(dir: string): Promise<{ server: net.Server; file: string; ino: number; waiters: Set<net.Socket> }> {
  const file = path.join(dir, `.take-${process.pid}-${randomBytes(6).toString('hex')}`);
  const waiters = new Set<net.Socket>();
  const server = net.createServer((conn) => {
    conn.unref();
    conn.on('error', () => undefined);
    waiters.add(conn);
    conn.once('close', () => waiters.delete(conn));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ path: file }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', () => undefined);
  server.unref(); // a held lock does not keep the process alive
  try {
    return { server, file, ino: (await lstat(file)).ino, waiters };
  } catch (err) {
    server.close();
    throw err;
  }
}

function closeServer(server: net.Server, waiters: Set<net.Socket>): Promise<void> {
  return new Promise<void>((done) => {
    server.close(() => done());
    for (const conn of waiters) conn.destroy();
  });
}

/**
 * Takes the lock if it is free: the release function, or undefined when another process holds it. `dir` must
 * be private (privateRpullDir). The holder keeps connections from waitForHostLockRelease() open and closes them
 * on release (or the kernel does, when it exits), so waiters learn at once that the lock is free.
 */
export async function tryHostLock(name: string, dir: string): Promise<ReleaseHostLock | undefined> {
  const file = lockPath(dir, name);
  // A busy lock costs a connect, not a socket of our own.
  if ((await probe(file)).state === 'held') return undefined;
  const own = await listenOwn(dir);
  let held = false;
  try {
    for (let attempt = 0; attempt < TAKE_ATTEMPTS && !held; attempt++) {
      if (await linkIfFree(own.file, file)) {
        held = true;
        break;
      }
      const found = await probe(file);
      if (found.state === 'held') break;
      // Whoever removed a stale file links right away: so one of the takers racing for it always gets it.
      if (found.state === 'stale' && (await removeStale(file, found.ino, own.file, own.ino))) held = await linkIfFree(own.file, file);
    }
  } finally {
    // The socket stays reachable through the lock's name; the temporary name is not needed (and a crash now
    // leaves only the lock's name behind, which the next taker finds stale).
    await unlink(own.file).catch(() => undefined);
    if (!held) await closeServer(own.server, own.waiters);
  }
  if (!held) return undefined;
  let released: Promise<void> | undefined;
  return () =>
    (released ??= (async () => {
      // Name first: a waiter woken by the hang-up must find the lock free, not a socket that refuses.
      await unlinkIfSame(file, own.ino).catch(() => undefined);
      await closeServer(own.server, own.waiters);
    })());
}

/**
 * Resolves when the lock `name` is (probably) free: its holder released it or exited, nobody held it, or
 * `maxWaitMs` passed. Callers try the lock again afterwards; this only saves them from polling blindly.
 */
export function waitForHostLockRelease(name: string, dir: string, maxWaitMs: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const started = Date.now();
    const conn = net.connect({ path: lockPath(dir, name) });
    let settled = false;
    const done = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      conn.destroy();
      resolve();
    };
    let timer = setTimeout(done, maxWaitMs);
    // A holder that hangs up at once (a misbehaving one, or a stale file that refuses) must not turn the
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

/** Rpull's private directory, looked up once per process. */
let defaultDir: Promise<string | undefined> | undefined;

/**
 * Waits for the lock `name`. Resolves with its release function, or with undefined as soon as
 * `opts.satisfied` says the lock is no longer needed. Without a private directory nothing can be locked:
 * it resolves at once with a release that does nothing (the work may then be done twice, never wrongly).
 */
export async function acquireHostLock(name: string, opts: HostLockOptions = {}): Promise<ReleaseHostLock | undefined> {
  const dir = opts.dir !== undefined ? await privateRpullDir(opts.dir) : await (defaultDir ??= privateRpullDir());
  if (dir === undefined) return () => Promise.resolve();
  let waited = false;
  for (;;) {
    if (opts.signal?.aborted === true) throw opts.signal.reason;
    const release = await tryHostLock(name, dir);
    if (release !== undefined) return release;
    if (!waited) opts.onWait?.();
    waited = true;
    await waitForHostLockRelease(name, dir, HOST_LOCK_POLL_MS, opts.signal);
    opts.signal?.throwIfAborted();
    if (opts.satisfied !== undefined && (await opts.satisfied())) return undefined;
  }
}
