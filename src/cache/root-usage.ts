/**
 * Bytes under the daemon's root that no cache tracks: the metadata db and its WAL, the FUSE server's log,
 * keychain files, directories. They cannot be evicted, but they count toward `disk_max_bytes`, so the
 * budget needs their size; a periodic asynchronous walk supplies it.
 *
 * The walk never enters the snapshot dirs: they hold the containers' own upper dirs (not ours to count)
 * and the layers' FUSE mountpoints, which this process may serve itself (a stat there would be a FUSE
 * request answered by our own main thread). Any other directory on another filesystem is skipped too.
 */
import type { BigIntStats, Dirent } from 'node:fs';
import { lstat, readdir } from 'node:fs/promises';
import path from 'node:path';
import { errorMessage } from '../errors';
import type { Logger } from '../log';
import type { DiskBudget } from './disk-budget';

/** st_blocks is in 512-byte units whatever the filesystem's block size (stat(2)). */
const STAT_BLOCK_BYTES = 512n;
/** How often the untracked bytes are counted again (logs and the metadata db grow). */
export const ROOT_SCAN_INTERVAL_MS = 10_000;

export interface RootUsageOptions {
  root: string;
  /** Not walked at all (snapshot dirs, FUSE mountpoints). */
  excludeDirs: readonly string[];
  /** Caches whose files the budget tracks as entries: their directories count, their files do not. */
  trackedDirs: readonly string[];
}

/** Allocated bytes of the files and directories under `root` that no cache tracks. */
export async function untrackedBytes(options: RootUsageOptions): Promise<number> {
  const exclude = new Set(options.excludeDirs.map((d) => path.resolve(d)));
  const tracked = options.trackedDirs.map((d) => path.resolve(d));
  const isTracked = (dir: string): boolean => tracked.some((t) => dir === t || dir.startsWith(t + path.sep));
  const rootStat = await lstat(options.root, { bigint: true }).catch(() => undefined);
  if (rootStat === undefined) return 0;
  const seen = new Set<bigint>();
  let total = 0n;
  const count = (st: BigIntStats): void => {
    if (seen.has(st.ino)) return; // hardlinks once
    seen.add(st.ino);
    total += st.blocks * STAT_BLOCK_BYTES;
  };
  count(rootStat);
  const stack = [path.resolve(options.root)];
  while (stack.length > 0) {
    const dir = stack.pop()!;
    let entries: Dirent[];
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch {
      continue; // removed meanwhile
    }
    const filesTracked = isTracked(dir);
    for (const e of entries) {
      const p = path.join(dir, e.name);
      if (exclude.has(p)) continue;
      if (filesTracked && !e.isDirectory()) continue;
      const st = await lstat(p, { bigint: true }).catch(() => undefined);
      if (st === undefined || st.dev !== rootStat.dev) continue;
      count(st);
      // Below a cache's own dir everything is its entries (the shard dirs' blocks are counted just above):
      // listing its thousands of chunk files every scan would count nothing.
      if (st.isDirectory() && !filesTracked) stack.push(p);
    }
  }
  return Number(total);
}

/** Counts the untracked bytes now and every `intervalMs` into `budget`; returns a stop function. */
export function watchUntrackedBytes(budget: DiskBudget, options: RootUsageOptions, log: Logger, intervalMs = ROOT_SCAN_INTERVAL_MS): () => void {
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  const scan = async (): Promise<void> => {
    try {
      budget.setUntrackedBytes(await untrackedBytes(options));
    } catch (err) {
      log.warn({ err: errorMessage(err) }, 'could not count the disk use under the root');
    }
    if (!stopped) {
      timer = setTimeout(() => void scan(), intervalMs);
      timer.unref();
    }
  };
  void scan();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
