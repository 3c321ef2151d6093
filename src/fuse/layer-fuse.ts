/**
 * One read-only FUSE mount serving one eStargz layer through fuse-native (libfuse2, high-level path API).
 *
 * fuse-native calls these ops on Node's main thread, so nothing here may block: lookups are in-memory,
 * reads are promises resolved by the layer reader. Every failure becomes an errno; a read that cannot be
 * served in time is EIO, never a hang.
 */
import Fuse from 'fuse-native';
import type { FuseOps, FuseStat } from 'fuse-native';
import { errorCode, errorMessage } from '../errors';
import type { Logger } from '../log';
import { fuseErrno, ERRNO } from './errno';
import { lazyUnmountCallback } from '../lazy-unmount';

export { lazyUnmount } from '../lazy-unmount';

/** The kernel asks for at most this many bytes per read (libfuse2's default max_read is 128 KiB). */
const FUSE_BLOCK_SIZE = 4096;
/** Our own bound on one read; fuse-native's timeout is set above it so the reader's EIO wins over ETIMEDOUT. */
const DEFAULT_READ_TIMEOUT_MS = 60_000;
/** Margin between our bound and fuse-native's own op timeout. */
const FUSE_NATIVE_TIMEOUT_MARGIN_MS = 5_000;
/** Fake totals for statfs: a read-only layer has no free space; `df` just needs sane numbers. */
const STATFS_NAME_MAX = 255;

/** What one served file-system node looks like; metadata/ builds these from the TOC. */
export interface ServedNode {
  ino: number;
  /** Full st_mode: file type bits plus permissions. */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtimeMs: number;
  nlink: number;
  rdev: number;
  linkName?: string;
  xattrs?: ReadonlyMap<string, Buffer>;
  /** Present for directories only, sorted by name. */
  children?: ReadonlyMap<string, ServedNode>;
}


/** The content a mount serves: a tree and a way to read regular files. */
export interface ServedLayer<N extends ServedNode> {
  readonly root: N;
  /** Reads up to `length` bytes of `node` at `position`; shorter only at end of file. */
  read(node: N, position: number, length: number, signal: AbortSignal): Promise<Buffer>;
  /** Told of each read the kernel sends, before it is served (the prefetch profile's recorder); must not block. */
  onRead?(path: string, node: N, position: number, length: number): void;
}

/**
 * The reference's per-layer state file, `/.stargz-snapshotter/<name>`: reachable by lookup only (not
 * listed), regenerated on each stat, so `cat` shows how much of the layer is local and its last error.
 */
export interface LayerStatusFile {
  /** File name inside the hidden dir, e.g. `sha256:<hex>.json`. */
  name: string;
  render(lastError: string | undefined): string;
}

export const STATUS_DIR = '.stargz-snapshotter';
/** Inode numbers far above any a TOC gives (fuse-native passes 32-bit inodes). */
const STATUS_DIR_INO = 0xffffff00;
const STATUS_FILE_INO = 0xffffff01;

export interface LayerMountOptions {
  /**
   * The mount's source in the mount table (libfuse's fsname; default `stargaze`). A unique one lets the
   * process tell its mount from a later one at the same path: mount IDs and FUSE device numbers are reused.
   */
  source?: string;
  /** Seconds the kernel may cache attributes and entries; the layer is immutable, so long is safe. */
  attrTimeoutSec: number;
  entryTimeoutSec: number;
  readTimeoutMs?: number;
  debug?: boolean;
  status?: LayerStatusFile;
  log: Logger;
}

/**
 * Mountpoints whose mount the kernel no longer has (unmounted by the daemon or from outside): fuse-native's unmount of them
 * only releases the session (it unrefs the handle that keeps Node's loop alive), and leaves the path alone,
 * as another mount may be there by now.
 */
const releasedMountpoints = new Set<string>();
function fuseNativeUnmount(mnt: string, cb: (err: Error | null) => void): void {
  if (releasedMountpoints.delete(mnt)) return cb(null);
  lazyUnmountCallback(mnt, cb);
}
(Fuse as unknown as { unmount: typeof fuseNativeUnmount }).unmount = fuseNativeUnmount;

/**
 * Options fuse-native has no name for. libfuse2 only honours our inode numbers (hardlinks sharing one
 * inode) with `use_ino`; `ro` makes the kernel refuse writes before they reach us; `suid,dev` because a
 * root filesystem holds setuid binaries and device nodes, and libfuse adds nosuid,nodev by default.
 */
// `ac_attr_timeout=1`: with auto_cache, libfuse re-checks a file's mtime and size on open once its attributes
// are over a second old, rather than trusting them for attr_timeout (an hour): the status file is at most a
// second stale while layer content stays cached. At 0 every open(2) cost a getattr round trip to this thread
// (read-disk bench, warm 2000 small files: 0.19x overlayfs at 0, 0.47x at 1).
const EXTRA_FUSE_OPTIONS = 'use_ino,ro,suid,dev,ac_attr_timeout=1';

class LayerFuse extends Fuse {
  override _fuseOptions(): string {
    const base = super._fuseOptions();
    return base ? `${base},${EXTRA_FUSE_OPTIONS}` : `-o${EXTRA_FUSE_OPTIONS}`;
  }
}

export class LayerMount<N extends ServedNode> {
  private fuse: LayerFuse | undefined;
  /** path → node, filled as the kernel looks paths up (the high-level API hands us whole paths). */
  private readonly pathCache = new Map<string, N>();
  private readonly readTimeoutMs: number;
  private readonly log: Logger;
  /** Reads served and their bytes, for the metrics endpoint (plain counters: nothing on the hot path). */
  readonly counters = { reads: 0, bytesServed: 0, readErrors: 0 };
  /** Set when the layer must not be served any more (it failed its integrity check): every read is EIO. */
  private failedReason: string | undefined;
  /** The last read error, shown in the status file. */
  private lastError: string | undefined;
  /** The status file's content as of its last stat: reads serve these bytes, so size and content agree. */
  private statusSnapshot: Buffer = Buffer.alloc(0);

  constructor(
    readonly mountpoint: string,
    private readonly layer: ServedLayer<N>,
    private readonly options: LayerMountOptions,
  ) {
    this.readTimeoutMs = options.readTimeoutMs ?? DEFAULT_READ_TIMEOUT_MS;
    this.log = options.log;
    this.pathCache.set('/', layer.root);
  }

  async mount(): Promise<void> {
    const fuseTimeoutMs = this.readTimeoutMs + FUSE_NATIVE_TIMEOUT_MARGIN_MS;
    const fuse = new LayerFuse(this.mountpoint, this.ops(), {
      force: true,
      allowOther: true,
      defaultPermissions: true,
      fsname: this.options.source ?? 'stargaze',
      subtype: 'stargaze',
      // auto_cache keeps the page cache across opens while a file's mtime and size stay the same: always,
      // for layer content, which never changes; never, for the status file, which is new on each stat.
      autoCache: true,
      attrTimeout: this.options.attrTimeoutSec,
      entryTimeout: this.options.entryTimeoutSec,
      debug: this.options.debug ?? false,
      timeout: fuseTimeoutMs,
    });
    await new Promise<void>((resolve, reject) => fuse.mount((err) => (err ? reject(err) : resolve())));
    this.fuse = fuse;
  }

  /** Stops serving file contents: every read from now on fails with EIO, and the status file says why. */
  fail(reason: string): void {
    this.failedReason = reason;
    this.lastError = reason;
  }

  async unmount(): Promise<void> {
    const fuse = this.fuse;
    if (!fuse) return;
    this.fuse = undefined;
    await new Promise<void>((resolve, reject) => fuse.unmount((err) => (err ? reject(err) : resolve())));
  }

  /**
   * Lets go of a mount the kernel no longer has (unmounted by the daemon or from outside) without unmounting its
   * path, which may hold another mount by now. Spawns nothing.
   */
  async release(): Promise<void> {
    const fuse = this.fuse;
    if (!fuse) return;
    this.fuse = undefined;
    releasedMountpoints.add(this.mountpoint);
    try {
      await new Promise<void>((resolve, reject) => fuse.unmount((err) => (err ? reject(err) : resolve())));
    } finally {
      releasedMountpoints.delete(this.mountpoint);
    }
  }

  /** Whether `path` names the hidden status dir or file (without rendering the file, as statusNode does). */
  private isStatusPath(path: string): boolean {
    const status = this.options.status;
    return status !== undefined && (path === `/${STATUS_DIR}` || path === `/${STATUS_DIR}/${status.name}`);
  }

  /** The hidden status dir or file, when `path` names one. */
  private statusNode(path: string): ServedNode | undefined {
    const status = this.options.status;
    if (!status || !path.startsWith(`/${STATUS_DIR}`)) return undefined;
    const base = { uid: 0, gid: 0, mtimeMs: Date.now(), rdev: 0 };
    if (path === `/${STATUS_DIR}`) {
      return { ...base, ino: STATUS_DIR_INO, mode: 0o040500, size: 0, nlink: 2, children: new Map() };
    }
    if (path !== `/${STATUS_DIR}/${status.name}`) return undefined;
    this.statusSnapshot = Buffer.from(status.render(this.lastError));
    return { ...base, ino: STATUS_FILE_INO, mode: 0o100400, size: this.statusSnapshot.length, nlink: 1 };
  }

  private lookup(path: string): N | undefined {
    const cached = this.pathCache.get(path);
    if (cached) return cached;
    const slash = path.lastIndexOf('/');
    const parent = this.lookup(slash === 0 ? '/' : path.slice(0, slash));
    // A node's children are nodes of the same implementation as the node itself.
    const node = parent?.children?.get(path.slice(slash + 1)) as N | undefined;
    if (node) this.pathCache.set(path, node);
    return node;
  }

  private ops(): FuseOps {
    return {
      getattr: (path, cb) => {
        const node = this.lookup(path) ?? this.statusNode(path);
        if (!node) return cb(ERRNO.ENOENT);
        cb(0, toStat(node));
      },
      // No open/release/opendir/releasedir: each would be a round trip to this thread per open(2) (the
      // warm many-small-files pass ran 1.5-2x slower with them). libfuse answers them itself; the kernel has
      // already resolved the path, refuses write opens on the `ro` mount (EROFS) and O_DIRECTORY on a file.
      // libfuse's auto_cache still revalidates attributes on open (ac_attr_timeout=1), which keeps the status file fresh.
      readdir: (path, cb) => {
        const node = this.lookup(path);
        if (!node) return cb(ERRNO.ENOENT);
        if (!node.children) return cb(ERRNO.ENOTDIR);
        const names = ['.', '..'];
        const stats = [toStat(node), toStat(node)];
        for (const [name, child] of node.children) {
          names.push(name);
          stats.push(toStat(child));
        }
        cb(0, names, stats);
      },
      readlink: (path, cb) => {
        const node = this.lookup(path);
        if (!node) return cb(ERRNO.ENOENT);
        if (node.linkName === undefined || (node.mode & 0o170000) !== 0o120000) return cb(ERRNO.EINVAL);
        cb(0, node.linkName);
      },
      // The status dir and file have no xattrs, and must say so (ENODATA), not ENOENT: overlayfs asks a lower
      // entry for its trusted.overlay.* xattrs on lookup and fails the lookup on any other error, which made the
      // state file unreachable from a container.
      getxattr: (path, name, _position, cb) => {
        const node = this.lookup(path);
        if (!node) return cb(this.isStatusPath(path) ? ERRNO.ENODATA : ERRNO.ENOENT);
        const value = node.xattrs?.get(name);
        if (value === undefined) return cb(ERRNO.ENODATA);
        cb(0, value);
      },
      listxattr: (path, cb) => {
        const node = this.lookup(path);
        if (!node) return this.isStatusPath(path) ? cb(0, []) : cb(ERRNO.ENOENT);
        cb(0, node.xattrs ? [...node.xattrs.keys()] : []);
      },
      statfs: (_path, cb) =>
        cb(0, {
          bsize: FUSE_BLOCK_SIZE,
          frsize: FUSE_BLOCK_SIZE,
          blocks: 0,
          bfree: 0,
          bavail: 0,
          files: 0,
          ffree: 0,
          favail: 0,
          fsid: 0,
          flag: 1, // ST_RDONLY
          namemax: STATFS_NAME_MAX,
        }),
      read: (path, _fd, buf, len, pos, cb) => {
        const node = this.lookup(path);
        if (!node) {
          if (this.options.status && path === `/${STATUS_DIR}/${this.options.status.name}`) {
            return cb(this.statusSnapshot.copy(buf, 0, Math.min(pos, this.statusSnapshot.length), Math.min(pos + len, this.statusSnapshot.length)));
          }
          return cb(ERRNO.ENOENT);
        }
        if ((node.mode & 0o170000) !== 0o100000) return cb(ERRNO.EISDIR);
        if (this.failedReason !== undefined) return cb(ERRNO.EIO);
        if (pos >= node.size || len === 0) return cb(0);
        const want = Math.min(len, node.size - pos);
        this.layer.onRead?.(path, node, pos, want);
        const signal = AbortSignal.timeout(this.readTimeoutMs);
        this.layer.read(node, pos, want, signal).then(
          (data) => {
            // The kernel's buffer is only valid until cb: copy once, now.
            const n = data.copy(buf, 0, 0, Math.min(want, data.length));
            this.counters.reads++;
            this.counters.bytesServed += n;
            cb(n);
          },
          (err: unknown) => {
            this.counters.readErrors++;
            this.lastError = `${path}: ${errorMessage(err)}`;
            this.log.error({ path, offset: pos, length: want, code: errorCode(err), err: errorMessage(err) }, 'read failed');
            cb(fuseErrno(err));
          },
        );
      },
    };
  }
}

function toStat(node: ServedNode): FuseStat {
  const mtime = new Date(node.mtimeMs);
  return {
    mode: node.mode,
    uid: node.uid,
    gid: node.gid,
    size: node.size,
    nlink: node.nlink > 0 ? node.nlink : 1,
    ino: node.ino,
    rdev: node.rdev,
    blksize: FUSE_BLOCK_SIZE,
    blocks: Math.ceil(node.size / 512),
    atime: mtime,
    mtime,
    ctime: mtime,
  };
}
