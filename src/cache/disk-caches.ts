/**
 * The disk caches under a daemon root, opened together behind one byte budget: the chunk cache, the TOC
 * cache, and (with `root`) the untracked files around them. Used by whichever process serves the layers:
 * the FUSE server, or the daemon itself when [fuse_manager] is off.
 *
 * Opening waits only for the chunk cache's index; the TOC files and the rest of the root are counted in
 * the background, and the budget evicts once it knows their size.
 */
import path from 'node:path';
import { errorMessage } from '../errors';
import type { Logger } from '../log';
import { DiskBudget } from './disk-budget';
import { DiskChunkCache } from './disk-chunk-cache';
import { ProfileStore } from './profile-store';
import { watchUntrackedBytes } from './root-usage';
import { TocCache } from './toc-cache';

/**
 * Under the root, the snapshotter's snapshot dirs: the containers' upper dirs and the layers' FUSE
 * mountpoints. Outside the budget, and never walked.
 */
export const ROOT_SNAPSHOT_DIRS = [path.join('snapshotter', 'snapshots')];

export interface DiskCachesOptions {
  /** The chunk cache's directory (`<root>/cache/chunks`); the TOC cache is its sibling `toc`, the profiles `profiles`. */
  cacheDir: string;
  /** The daemon root: its untracked files count too. Without it, only the two caches are budgeted. */
  root?: string;
  /** `[cache] disk_max_bytes`. */
  maxBytes: number;
  log: Logger;
}

export interface DiskCaches {
  diskCache: DiskChunkCache;
  tocCache: TocCache;
  /** Prefetch profiles, budgeted with the caches (evicted like TOCs). */
  profiles: ProfileStore;
  budget: DiskBudget;
  /** Settles when the background count of TOC files and untracked bytes has run once. */
  counted: Promise<void>;
  close(): void;
}

export async function openDiskCaches(options: DiskCachesOptions): Promise<DiskCaches> {
  const { log } = options;
  const budget = new DiskBudget(options.maxBytes, log);
  const diskCache = await DiskChunkCache.open({ dir: options.cacheDir, maxBytes: options.maxBytes, log, budget: budget.account('chunk') });
  const tocDir = path.join(path.dirname(options.cacheDir), 'toc');
  const tocCache = new TocCache(tocDir, budget.account('toc'));
  const profileDir = path.join(path.dirname(options.cacheDir), 'profiles');
  const profiles = new ProfileStore(profileDir, budget.account('profile'));
  let stopWatch: (() => void) | undefined;
  let closed = false;
  const counted = Promise.all([tocCache.scan(), profiles.scan()]).then(
    ([found, profilesFound]) => {
      log.info({ tocs: found.files, tocBytes: found.bytes, profiles: profilesFound.files, profileBytes: profilesFound.bytes, usedBytes: budget.usedBytes, maxBytes: budget.maxBytes }, 'disk budget counted');
      if (options.root !== undefined && !closed) {
        const root = options.root;
        stopWatch = watchUntrackedBytes(
          budget,
          { root, excludeDirs: ROOT_SNAPSHOT_DIRS.map((d) => path.join(root, d)), trackedDirs: [options.cacheDir, tocDir, profileDir] },
          log,
        );
      }
    },
    (err: unknown) => log.warn({ err: errorMessage(err) }, 'could not count the TOC cache and profiles'),
  );
  return {
    diskCache,
    tocCache,
    profiles,
    budget,
    counted,
    close: () => {
      closed = true;
      stopWatch?.();
    },
  };
}
