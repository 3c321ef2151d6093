/**
 * A fully fetched and verified layer, copied out of its FUSE mount into a plain directory beside it, so
 * containers created from then on read it from the local filesystem, not through FUSE.
 *
 * Why: once every chunk is local, FUSE is only overhead. Warm reads through any FUSE mount stay below
 * overlayfs on ext4 (the FUSE page cache holds small folios; measured in docs/benchmarks.md), and a layer on local
 * disk needs neither the FUSE server nor the registry. Running containers keep their FUSE lower dirs (an
 * overlay mount cannot swap them); the snapshotter gives new mounts the copy (snapshot/snapshotter.ts).
 *
 * The copy is GNU tar reading the mount and tar writing the directory, two child processes piped into
 * each other: the bytes never pass through this process, and this process, which serves the mount, never
 * reads its own FUSE mount (its libuv threads would wait on FUSE handlers that wait on them). What the
 * mount shows is exactly what overlayfs wants in a lower dir: whiteouts as 0/0 character devices, opaque
 * directories as `trusted.overlay.opaque` xattrs, hardlinks sharing an inode (the mount has use_ino).
 *
 * GNU tar only warns, and still exits 0, when it cannot read or set an xattr (a filesystem without trusted.*,
 * a user namespace, a full xattr block): a copy without its opaque markers would bring deleted directories
 * back. So anything tar writes to stderr fails the copy.
 *
 * The children run under `setpriv --pdeathsig KILL`: libfuse opens /dev/fuse without O_CLOEXEC, so they hold
 * every mount's FUSE connection while they run, and a FUSE server that dies must take them along, or its
 * connections never abort and containers hang on them instead of seeing the error.
 *
 * Crash safety: the copy is built under `local.tmp`, flushed to disk, then renamed to `local`; a directory
 * named `local` is complete. A leftover `local.tmp` is the copy's own and is removed before a retry.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { errorCode, errorMessage, LocalCopyError } from '../errors';

/** The copy's name beside the snapshot's mountpoint (`snapshots/<id>/fs` → `snapshots/<id>/local`). */
export const LOCAL_COPY_DIR = 'local';
const TEMP_SUFFIX = '.tmp';
/** Background work: the copy gives way to containers' own processes. */
const COPY_NICENESS = 10;
/** Bytes of a child's stderr kept for the error message. */
const STDERR_KEEP_BYTES = 4096;

/** The local copy's directory of the layer mounted at `mountpoint`. */
export function localCopyPath(mountpoint: string): string {
  return path.join(path.dirname(mountpoint), LOCAL_COPY_DIR);
}

/** True when the layer mounted at `mountpoint` has a complete local copy. */
export async function hasLocalCopy(mountpoint: string): Promise<boolean> {
  try {
    return (await stat(localCopyPath(mountpoint))).isDirectory();
  } catch (err) {
    if (errorCode(err) === 'ENOENT' || errorCode(err) === 'ENOTDIR') return false;
    throw err;
  }
}

/** util-linux's setpriv: runs a command that gets SIGKILL when this process dies (see the file comment). */
const SETPRIV = 'setpriv';
const DIE_WITH_PARENT = ['--pdeathsig', 'KILL', '--'];

/** tar's flags that keep what overlayfs reads: owners by number, modes, xattrs of every namespace. */
const TAR_COMMON = ['--numeric-owner', '--xattrs', '--xattrs-include=*'];

export interface CopyOptions {
  signal?: AbortSignal;
  /**
   * The names the layer's root holds. Checked against the copy before it gets its name: a mount that went
   * away under tar (an admin's lazy umount, say) would otherwise leave an empty directory that looks complete.
   */
  expectRootNames?: readonly string[];
}

/**
 * Copies the tree mounted at `mountpoint` into `localCopyPath(mountpoint)`. Rejects with LocalCopyError
 * (and leaves no partial copy) when tar fails, the disk fills, the copy's root differs from
 * `expectRootNames`, or `signal` aborts.
 */
export async function copyLayerToLocal(mountpoint: string, options: CopyOptions = {}): Promise<void> {
  const { signal } = options;
  const dest = localCopyPath(mountpoint);
  const temp = dest + TEMP_SUFFIX;
  try {
    await rm(temp, { recursive: true, force: true });
    await mkdir(temp, { mode: 0o700 });
    await pipeTar(mountpoint, temp, signal);
    if (options.expectRootNames !== undefined) await checkRootNames(temp, options.expectRootNames);
    // The data must be on disk before the name says the copy is complete.
    await run('sync', ['-f', temp], signal);
    await rename(temp, dest);
  } catch (err) {
    await rm(temp, { recursive: true, force: true }).catch(() => undefined);
    if (err instanceof LocalCopyError) throw err;
    throw new LocalCopyError(`copying ${mountpoint} to ${dest}: ${errorMessage(err)}`);
  }
}

async function checkRootNames(dir: string, expected: readonly string[]): Promise<void> {
  const got = new Set(await readdir(dir));
  const missing = expected.filter((n) => !got.has(n));
  if (missing.length > 0 || got.size !== expected.length) {
    throw new LocalCopyError(`the copy's root holds ${got.size} names, the layer's ${expected.length}${missing.length > 0 ? ` (missing: ${missing.slice(0, 5).join(', ')})` : ''}`);
  }
}

/** `tar -c -C from . | tar -x -C to`: the pipe joins the two children, and nothing of it is read here. */
async function pipeTar(from: string, to: string, signal: AbortSignal | undefined): Promise<void> {
  const reader = spawn(SETPRIV, [...DIE_WITH_PARENT, 'tar', '-C', from, ...TAR_COMMON, '-cf', '-', '.'], { stdio: ['ignore', 'pipe', 'pipe'] });
  // Images hold files dated in the future; that warning says nothing about the copy.
  const writer = spawn(SETPRIV, [...DIE_WITH_PARENT, 'tar', '-C', to, ...TAR_COMMON, '--same-owner', '--same-permissions', '--warning=no-timestamp', '-xf', '-'], {
    stdio: [reader.stdout ?? 'ignore', 'ignore', 'pipe'],
  });
  // The writer holds its own copy of the pipe's read end. Ours is closed, so a writer that dies makes the
  // reader's next write fail (EPIPE) instead of blocking on a pipe nobody drains.
  reader.stdout?.destroy();
  lowerPriority(reader);
  lowerPriority(writer);
  const done = Promise.allSettled([waitFor(reader, 'tar -c', signal), waitFor(writer, 'tar -x', signal)]);
  const [read, write] = await done;
  // The writer's error says why (disk full, ...); the reader's EPIPE that follows from it says nothing.
  if (write.status === 'rejected') throw write.reason;
  if (read.status === 'rejected') throw read.reason;
}

function run(command: string, args: string[], signal: AbortSignal | undefined): Promise<void> {
  const child = spawn(SETPRIV, [...DIE_WITH_PARENT, command, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  lowerPriority(child);
  return waitFor(child, command, signal);
}

function lowerPriority(child: ChildProcess): void {
  if (child.pid === undefined) return;
  try {
    os.setPriority(child.pid, COPY_NICENESS);
  } catch {
    // Exited already, or not allowed: the copy runs at normal priority.
  }
}

/** Resolves when `child` exits 0; kills it when `signal` aborts. */
function waitFor(child: ChildProcess, what: string, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    let stderr = '';
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (s: string) => {
      if (stderr.length < STDERR_KEEP_BYTES) stderr += s.slice(0, STDERR_KEEP_BYTES - stderr.length);
    });
    const onAbort = (): void => {
      child.kill('SIGKILL');
    };
    if (signal?.aborted) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });
    child.once('error', (err) => {
      signal?.removeEventListener('abort', onAbort);
      reject(new LocalCopyError(`${what}: ${err.message}`, { cause: err }));
    });
    child.once('close', (code, sig) => {
      signal?.removeEventListener('abort', onAbort);
      if (signal?.aborted) reject(new LocalCopyError(`${what}: aborted`));
      else if (code !== 0) reject(new LocalCopyError(`${what} exited with ${code ?? sig}: ${stderr.trim() || 'no message'}`));
      // tar's warnings (an xattr it could not read or set) come with exit status 0.
      else if (stderr.trim() !== '') reject(new LocalCopyError(`${what} warned: ${stderr.trim()}`));
      else resolve();
    });
  });
}
