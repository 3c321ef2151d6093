/**
 * Disk usage of a directory tree, as containerd's continuity fs.DiskUsage computes it: every inode is
 * counted once (hardlinks share one), size is allocated blocks * 512. Asynchronous, so a large upper
 * directory never stalls the gRPC event loop.
 */
import type { BigIntStats, Dirent } from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import type { SnapshotUsage } from './snapshot-info';

/** st_blocks is counted in 512-byte units whatever the filesystem block size (stat(2)). */
const STAT_BLOCK_BYTES = 512n;
/** Directories scanned at once; bounds open file descriptors while still overlapping I/O. */
const DU_DIR_CONCURRENCY = 8;

function isEnoent(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === 'ENOENT';
}

/** Walks `root` without following symlinks; a missing root is an error, entries vanishing mid-walk are not. */
export async function diskUsage(root: string): Promise<SnapshotUsage> {
  const seen = new Set<string>();
  let size = 0n;

  const account = (st: BigIntStats): void => {
    const key = `${st.dev}:${st.ino}`;
    if (seen.has(key)) return;
    seen.add(key);
    size += st.blocks * STAT_BLOCK_BYTES;
  };

  // The root's listing is read beside its stat, not after it: most upper dirs a Commit measures are empty or
  // small, and each step is a round trip through libuv's thread pool. A root that is no directory fails the
  // listing; the stat decides what that means.
  const [rootStat, rootEntries] = await Promise.all([
    fsp.lstat(root, { bigint: true }),
    fsp.readdir(root, { withFileTypes: true }).catch((err: unknown) => err),
  ]);
  account(rootStat);
  if (!rootStat.isDirectory()) return { size: Number(size), inodes: seen.size };
  if (!Array.isArray(rootEntries)) throw rootEntries;

  const queue: string[] = [];
  const scanDir = async (dir: string, listed?: Dirent[]): Promise<void> => {
    let entries: Dirent[];
    try {
      entries = listed ?? (await fsp.readdir(dir, { withFileTypes: true }));
    } catch (err) {
      if (isEnoent(err)) return; // removed while we walked
      throw err;
    }
    for (const entry of entries) {
      const p = path.join(dir, entry.name);
      let st: BigIntStats;
      try {
        st = await fsp.lstat(p, { bigint: true });
      } catch (err) {
        if (isEnoent(err)) continue;
        throw err;
      }
      account(st);
      if (st.isDirectory()) queue.push(p);
    }
  };

  await scanDir(root, rootEntries as Dirent[]);
  const running = new Set<Promise<void>>();
  while (queue.length > 0 || running.size > 0) {
    while (queue.length > 0 && running.size < DU_DIR_CONCURRENCY) {
      const task: Promise<void> = scanDir(queue.shift()!).finally(() => running.delete(task));
      running.add(task);
    }
    if (running.size > 0) await Promise.race(running);
  }
  return { size: Number(size), inodes: seen.size };
}
