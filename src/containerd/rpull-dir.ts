/**
 * rpull's private state directory: the results of collapsed pulls (pull-collapse.ts), the host lock sockets
 * (host-lock.ts) and the launcher's joins (launcher-join.ts). `/run/stargaze/rpull` for root, else
 * `$TMPDIR/stargaze-rpull-<uid>`; STARGAZE_RPULL_DIR names another (script/stargaze reads it too).
 *
 * Private is checked, not assumed: whoever can write in the directory could forge a pull result or hold a lock
 * forever, so a directory that is not ours alone (a symlink, another owner, any group or other permission) is
 * not used, and then nothing is collapsed or locked (pulls still come out right, they only repeat work).
 */
import type { Stats } from 'node:fs';
import { lstat, mkdir, rename, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

export const ROOT_RPULL_DIR = '/run/stargaze/rpull';
/** Environment variable naming the directory instead. */
export const RPULL_DIR_ENV = 'STARGAZE_RPULL_DIR';
const DIR_MODE = 0o700;
/**
 * A unix socket path must fit sun_path (107 bytes), and Node cuts a longer one short without a word, which
 * would merge locks: a directory whose entries of this many bytes would not fit is not used.
 */
export const MAX_SOCKET_NAME_BYTES = 64;
const MAX_SOCKET_PATH_BYTES = 107;

/** Where our user's rpull state goes; undefined where there are no uids. */
export function defaultRpullDir(): string | undefined {
  const uid = process.getuid?.();
  if (uid === undefined) return undefined;
  const named = process.env[RPULL_DIR_ENV];
  if (named !== undefined && named !== '') return named;
  return uid === 0 ? ROOT_RPULL_DIR : path.join(os.tmpdir(), `stargaze-rpull-${uid}`);
}

/** Warning code of an rpull directory that cannot be used. */
export const UNUSABLE_DIR_WARNING = 'STARGAZE_RPULL_DIR';
const warned = new Set<string>();

/** Says once per directory why it is not used: without it, concurrent pulls quietly stop collapsing. */
function unusable(dir: string, why: string): undefined {
  if (!warned.has(dir)) {
    warned.add(dir);
    process.emitWarning(`${dir} ${why}: concurrent pulls of one image are not collapsed, nor their downloads locked`, { code: UNUSABLE_DIR_WARNING });
  }
  return undefined;
}

/** Why `st` (lstat of a directory) is not private to `uid`, or undefined when it is: ours alone, no link. */
export function notPrivateBecause(st: Stats, uid: number): string | undefined {
  if (!st.isDirectory()) return 'is not a directory';
  if (st.uid !== uid || (st.mode & 0o077) !== 0) return `is not private to uid ${uid} (owner ${st.uid}, mode ${(st.mode & 0o777).toString(8)})`;
  return undefined;
}

/**
 * Writes `text` to `file` in the rpull directory all at once for its readers (a temporary file renamed over
 * it), mode 0600. Best effort: false when it could not, and no temporary file is left behind.
 */
export async function writeResultFile(file: string, text: string): Promise<boolean> {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    await writeFile(tmp, text, { mode: 0o600 });
    await rename(tmp, file);
    return true;
  } catch {
    await rm(tmp, { force: true }).catch(() => undefined);
    return false;
  }
}

/** `dir` (default defaultRpullDir()), made if missing, when it is private to us; otherwise undefined. */
export async function privateRpullDir(dir = defaultRpullDir()): Promise<string | undefined> {
  const uid = process.getuid?.();
  if (dir === undefined || uid === undefined) return undefined;
  const resolved = path.resolve(dir);
  if (Buffer.byteLength(resolved) + 1 + MAX_SOCKET_NAME_BYTES > MAX_SOCKET_PATH_BYTES) return unusable(resolved, 'is too long a path for lock sockets');
  try {
    await mkdir(resolved, { recursive: true, mode: DIR_MODE });
    const why = notPrivateBecause(await lstat(resolved), uid);
    return why === undefined ? resolved : unusable(resolved, why);
  } catch (err) {
    return unusable(resolved, `cannot be made (${(err as Error).message})`);
  }
}
