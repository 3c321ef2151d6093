/**
 * Node's half of the launcher's rpull join (script/stargaze, rpull_join): concurrent `stargaze rpull`s whose
 * arguments and working directory are the same text wait for the first in the launcher, without starting
 * Node, and print what it leaves them. The first gets two variables: where to leave that (argv-<key>.out in
 * rpull's private directory) and the descriptor of the flock it holds. Once its pull succeeded it writes the
 * lines a joined pull prints and closes the descriptor, which wakes the others. On failure it leaves nothing,
 * and they run Node as usual when it exits.
 */
import { close, fstat } from 'node:fs';
import { lstat } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { defaultRpullDir, notPrivateBecause, writeResultFile } from './rpull-dir';

export const JOIN_OUTPUT_ENV = 'STARGAZE_RPULL_JOIN_OUTPUT';
export const JOIN_LOCK_FD_ENV = 'STARGAZE_RPULL_JOIN_LOCK_FD';
/** The launcher's names: `argv-` and the sha256 of the working directory and argv. */
const OUTPUT_NAME = /^argv-[0-9a-f]{64}\.out$/;
const LOCK_SUFFIX = '.lock';

const fstatAsync = promisify(fstat);
const closeAsync = promisify(close);

/** What the launcher handed over, if anything. */
export interface LauncherJoin {
  output: string;
  lockFd: number;
}

/**
 * Takes the launcher's variables out of the environment (children must not see them) and returns them when
 * they are well formed. Called once, at the start of rpull.
 */
export function takeLauncherJoin(env: NodeJS.ProcessEnv = process.env): LauncherJoin | undefined {
  const output = env[JOIN_OUTPUT_ENV];
  const fdText = env[JOIN_LOCK_FD_ENV];
  delete env[JOIN_OUTPUT_ENV];
  delete env[JOIN_LOCK_FD_ENV];
  if (output === undefined || fdText === undefined || !/^\d{1,4}$/.test(fdText)) return undefined;
  const lockFd = Number(fdText);
  // 0-2 are stdio: closing one of them would be a worse bug than not waking the joiners early.
  if (lockFd < 3 || !OUTPUT_NAME.test(path.basename(output))) return undefined;
  return { output, lockFd };
}

/**
 * Leaves `text` for the launcher's joiners and wakes them. Writes only into rpull's private directory (the one
 * the launcher uses too) and closes the descriptor only when it is the lock file next to the output: variables
 * that say otherwise did not come from our launcher. The lock is closed even when the output cannot be
 * written, so the joiners run Node now rather than at our exit. Best effort: false when nothing was left.
 */
export async function handOverToJoiners(join: LauncherJoin, text: string, dir = defaultRpullDir()): Promise<boolean> {
  const output = path.resolve(join.output);
  if (dir === undefined || path.dirname(output) !== path.resolve(dir)) return false;
  const lockFile = output.slice(0, -'.out'.length) + LOCK_SUFFIX;
  let held: { dev: number; ino: number };
  let named: { dev: number; ino: number };
  try {
    [held, named] = await Promise.all([fstatAsync(join.lockFd), lstat(lockFile)]);
  } catch {
    return false;
  }
  if (held.dev !== named.dev || held.ino !== named.ino) return false;
  try {
    // Private as privateRpullDir requires, without its room for socket names, which these files do not need.
    const uid = process.getuid?.();
    const st = await lstat(path.dirname(output)).catch(() => undefined);
    if (uid === undefined || st === undefined || notPrivateBecause(st, uid) !== undefined) return false;
    return await writeResultFile(output, text);
  } finally {
    await closeAsync(join.lockFd).catch(() => undefined);
  }
}
