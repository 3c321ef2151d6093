/**
 * containerd snapshotter semantics (the overlayfs snapshotter, snapshots/overlay/overlay.go) plus remote
 * snapshots: a Prepare labelled with the target chainID tries to mount the layer lazily through the
 * RemoteFileSystem, and on success commits it at once and answers AlreadyExists, so containerd skips the
 * download (reference: stargz-snapshotter snapshot/snapshot.go).
 *
 * Layout under root: metadata.db, snapshots/<id>/fs (upper dir, or the remote mountpoint) and
 * snapshots/<id>/work (overlay workdir, active snapshots only). Removal is asynchronous: Remove deletes
 * metadata only and Cleanup deletes directories no metadata refers to.
 */
import crypto from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import {
  AlreadyExistsError,
  errorCode,
  errorMessage,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  UnavailableError,
} from '../errors';
import { log as rootLog, type Logger } from '../log';
import { layerSourceFromLabels, REMOTE_SNAPSHOT, REMOTE_SNAPSHOT_VALUE, TARGET_SNAPSHOT_REF } from '../source/labels';
import { diskUsage } from './disk-usage';
import type { RemoteFileSystem } from '../fs/remote-file-system';
import { ALWAYS, parseFilters } from './filters';
import { filterToSql, MetadataStore, WALK_PAGE_ROWS, type ChainEntry, type MetadataStoreOptions } from './metadata-store';
import { mountsUnder } from '../fs/mount-table';
import { hasLocalCopy, localCopyPath } from '../layer/local-copy';
import { inUserNamespace } from '../user-namespace';
import { forEachBounded } from '../task/bounded';
import { snapshotFieldAdaptor, type Mount, type SnapshotInfo, type SnapshotKind, type SnapshotUsage } from './snapshot-info';

/** Log field counted by the e2e scripts, as the reference's `remote-snapshot-prepared`. */
export const REMOTE_SNAPSHOT_LOG_KEY = 'remote-snapshot-prepared';
/** Prefix of directories being created; renamed to the snapshot id once its metadata exists. */
/** Snapshot directory names longer than this (10^15 snapshots) are not ours: see Snapshotter.open. */
const MAX_LEFTOVER_ID_DIGITS = 15;
const TEMP_DIR_PREFIX = 'new-';
const SNAPSHOTS_DIR = 'snapshots';
const ROOT_DIR_MODE = 0o700;
/** Upper dir: what containerd's overlay snapshotter uses, and what containers see as their root's mode. */
const UPPER_DIR_MODE = 0o755;
const WORK_DIR_MODE = 0o711;
/** Remote layers re-mounted at once on restart; each may wait on a registry. */
export const RESTORE_CONCURRENCY = 4;

export interface SnapshotterOptions {
  /** State directory (absolute or relative to cwd). */
  root: string;
  /** Lazily mounts remote layers; without one every Prepare is a normal one. */
  fs?: RemoteFileSystem;
  log?: Logger;
  /** Durability of metadata commits; see MetadataStore. */
  durability?: MetadataStoreOptions['durability'];
  /**
   * Lower dirs of remote layers that have a local copy (layer/local-copy.ts) are that copy, not the FUSE
   * mount (config `copy_fetched_layers`; default true).
   */
  useLocalCopies?: boolean;
}

export interface RestoreResult {
  /** Remote snapshots mounted again. */
  restored: string[];
  /** Remote snapshots whose layer could not be mounted; their metadata and directories are kept. */
  failed: { name: string; reason: string }[];
}

function isRemote(labels: Record<string, string>): boolean {
  return labels[REMOTE_SNAPSHOT] === REMOTE_SNAPSHOT_VALUE;
}

function requireName(what: string, value: string): void {
  if (value === '') throw new InvalidArgumentError(`${what} must not be empty`);
}

/**
 * Runs `fn` now and hands back its result as a promise, its throw as a rejection: the verbs that do their work
 * synchronously still fail the way the others do (callers `.catch` them; none expects a synchronous throw).
 */
function settled<T>(fn: () => T): Promise<T> {
  try {
    return Promise.resolve(fn());
  } catch (err) {
    return Promise.reject(err);
  }
}

async function pathExists(p: string): Promise<boolean> {
  try {
    await fsp.lstat(p);
    return true;
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return false;
    throw err;
  }
}

/** Promise.all, but it waits for every promise to settle before it rejects with the first failure. */
async function allOrFirstError<T extends readonly unknown[]>(promises: T): Promise<{ -readonly [K in keyof T]: Awaited<T[K]> }> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed !== undefined) throw failed.reason;
  return results.map((r) => (r as PromiseFulfilledResult<unknown>).value) as { -readonly [K in keyof T]: Awaited<T[K]> };
}

/** How directories made in the snapshots dir come out, measured once at open (see creationOf). */
interface DirCreation {
  /** Mode bits a new directory loses (the umask, or a default ACL). */
  mask: number;
  /**
   * Whether a new directory is exactly ours and exactly its mode minus `mask`: not so under a setgid parent (the
   * group and the setgid bit are inherited), so then every new directory gets its chmod and lchown.
   */
  plain: boolean;
}

/**
 * How a directory made in `dir` comes out: mkdir of a probe with 0777, read back, removed. The umask is
 * process-wide and nothing in the daemon changes it, nor the parent's setgid bit, so once is enough.
 */
async function creationOf(dir: string, owner: { uid: number; gid: number }): Promise<DirCreation> {
  const probe = path.join(dir, `${TEMP_DIR_PREFIX}mode-probe-${crypto.randomBytes(4).toString('hex')}`);
  await fsp.mkdir(probe, { mode: 0o777 });
  try {
    const st = await fsp.lstat(probe);
    return { mask: ~st.mode & 0o777, plain: (st.mode & 0o7000) === 0 && st.uid === owner.uid && st.gid === owner.gid };
  } finally {
    await fsp.rmdir(probe);
  }
}

/** Owner of the directories this process creates. */
const PROCESS_OWNER = { uid: process.geteuid?.() ?? 0, gid: process.getegid?.() ?? 0 };

export class Snapshotter {
  readonly root: string;
  private readonly snapshotsDir: string;
  private readonly store: MetadataStore;
  private readonly fs: RemoteFileSystem | undefined;
  private readonly log: Logger;
  /** Extra overlay options decided once at open: index=off, userxattr. */
  private readonly overlayOptions: string[];
  /**
   * In-flight remote prepares by target chainID. containerd's unpacker (and several pulls of one image)
   * may Prepare the same layer concurrently; only the first mounts it, the others wait for its outcome.
   */
  private readonly remotePrepares = new Map<string, Promise<void>>();
  /** Temp directory names being created; Cleanup must not take them for orphans. */
  private readonly pendingDirs = new Set<string>();
  /** Ids of remote snapshots seen with a complete local copy: a copy lasts as long as its snapshot. */
  private readonly localCopies = new Set<string>();
  private readonly useLocalCopies: boolean;
  /** How a new directory under snapshots/ comes out: measured once at open. */
  private readonly creation: DirCreation;
  /** Owner of the directories this process creates. */
  private readonly owner = PROCESS_OWNER;
  private closed = false;

  private constructor(
    root: string,
    store: MetadataStore,
    overlayOptions: string[],
    creation: DirCreation,
    options: SnapshotterOptions,
  ) {
    this.root = root;
    this.snapshotsDir = path.join(root, SNAPSHOTS_DIR);
    this.store = store;
    this.fs = options.fs;
    this.log = options.log ?? rootLog.child({ module: 'snapshot' });
    this.overlayOptions = overlayOptions;
    this.useLocalCopies = options.useLocalCopies ?? true;
    this.creation = creation;
  }

  /** Creates the root if needed and opens its metadata. */
  static async open(options: SnapshotterOptions): Promise<Snapshotter> {
    const root = path.resolve(options.root);
    await fsp.mkdir(root, { recursive: true, mode: ROOT_DIR_MODE });
    await fsp.mkdir(path.join(root, SNAPSHOTS_DIR), { recursive: true, mode: ROOT_DIR_MODE });
    const overlayOptions: string[] = [];
    // As containerd: index=off where the kernel has the knob, so shared lower dirs never trip the
    // overlay index's exclusivity checks.
    if (await pathExists('/sys/module/overlay/parameters/index')) overlayOptions.push('index=off');
    // Inside a user namespace overlayfs needs `userxattr` (containerd overlayutils.NeedsUserXAttr).
    if (await inUserNamespace()) overlayOptions.push('userxattr');
    // Measured before the store opens: a failure leaves nothing open.
    const creation = await creationOf(path.join(root, SNAPSHOTS_DIR), PROCESS_OWNER);
    const store = MetadataStore.open(root, { durability: options.durability });
    // Directories of an earlier metadata.db (a wiped root around live mounts): new ids pass them by. They
    // stay for Cleanup, which never walks into a mount. Ids count snapshots one by one: a name of more than
    // MAX_LEFTOVER_ID_DIGITS digits is no snapshot of ours, and passing it by would overflow SQLite's ids.
    const ids = (await fsp.readdir(path.join(root, SNAPSHOTS_DIR)))
      .filter((name) => name.length <= MAX_LEFTOVER_ID_DIGITS && /^[0-9]+$/.test(name))
      .map(Number);
    if (ids.length > 0) store.reserveIdsThrough(ids.reduce((a, b) => Math.max(a, b)));
    return new Snapshotter(root, store, overlayOptions, creation, options);
  }

  private upperPath(id: string): string {
    return path.join(this.snapshotsDir, id, 'fs');
  }

  private workPath(id: string): string {
    return path.join(this.snapshotsDir, id, 'work');
  }

  private assertOpen(): void {
    if (this.closed) throw new UnavailableError('snapshotter is closed');
  }

  // ---------------------------------------------------------------------------------------------
  // containerd Snapshotter verbs

  /** Info of a snapshot by key or name. */
  stat(key: string): Promise<SnapshotInfo> {
    return settled(() => {
      this.assertOpen();
      return this.store.getInfo(key).info;
    });
  }

  /** Updates labels (the only mutable field); see MetadataStore.updateInfo for field paths. */
  update(info: { name: string; labels?: Record<string, string> }, fieldPaths: readonly string[] = []): Promise<SnapshotInfo> {
    return settled(() => {
      this.assertOpen();
      return this.store.updateInfo(info, fieldPaths);
    });
  }

  /** Active: disk usage of the upper dir, measured now. Committed: the value stored at commit. */
  async usage(key: string): Promise<SnapshotUsage> {
    this.assertOpen();
    const { id, info, usage } = this.store.getInfo(key);
    if (info.kind === 'active') return diskUsage(this.upperPath(id));
    return usage;
  }

  /**
   * Creates an active snapshot on `parent`. With the target label and a layer the RemoteFileSystem can
   * mount, the layer is mounted lazily and committed under the target name, and AlreadyExistsError is
   * thrown; otherwise the mounts of a normal active snapshot are returned.
   */
  async prepare(key: string, parent: string, labels: Record<string, string> = {}): Promise<Mount[]> {
    this.assertOpen();
    requireName('key', key);
    const target = labels[TARGET_SNAPSHOT_REF];
    if (target === undefined || target === '') return this.createSnapshot('active', key, parent, labels);
    return this.prepareRemote(key, parent, labels, target);
  }

  /** Creates a read-only view of `parent`. */
  async view(key: string, parent: string, labels: Record<string, string> = {}): Promise<Mount[]> {
    this.assertOpen();
    requireName('key', key);
    return this.createSnapshot('view', key, parent, labels);
  }

  /** Mounts of an active or view snapshot, after checking its remote ancestors are reachable. */
  async mounts(key: string): Promise<Mount[]> {
    this.assertOpen();
    const record = this.store.getSnapshot(key);
    const { info } = this.store.getInfo(key);
    const chain = this.store.chain(info.parent);
    const local = await this.localFlags(chain);
    await this.checkAncestors(chain, local);
    return this.buildMounts(record.id, record.kind, this.lowerPaths(chain, local));
  }

  /** Commits active snapshot `key` as `name`, recording its disk usage. */
  async commit(name: string, key: string, labels: Record<string, string> = {}): Promise<void> {
    this.assertOpen();
    requireName('name', name);
    requireName('key', key);
    const snapshot = this.store.lookup(key);
    if (snapshot === undefined) throw new NotFoundError(`snapshot ${key}: snapshot does not exist`);
    const { id, kind } = snapshot;
    if (kind !== 'active') throw new FailedPreconditionError(`snapshot "${key}" is not active`);
    const usage = await diskUsage(this.upperPath(id));
    this.store.commitActive(key, name, usage, labels, id);
  }

  /** Deletes the metadata of `key`; its directory goes at the next Cleanup. */
  remove(key: string): Promise<void> {
    return settled(() => {
      this.assertOpen();
      this.store.remove(key);
    });
  }

  /**
   * Infos matching any of `filters` (containerd filter syntax; none = all). Filters are parsed before
   * the first item, so syntax errors surface as InvalidArgumentError from the first next().
   */
  async *walk(filters: readonly string[] = []): AsyncGenerator<SnapshotInfo> {
    for await (const page of this.walkPages(filters)) yield* page;
  }

  /**
   * walk() a page at a time: the infos of up to WALK_PAGE_ROWS snapshots (fewer when filtered), each page read
   * in one short synchronous query, with a turn of the event loop between pages. The filter is pushed into the
   * query as far as SQL can take it (filterToSql) and applied in full to what it returns. Empty pages are not
   * yielded.
   */
  async *walkPages(filters: readonly string[] = []): AsyncGenerator<SnapshotInfo[]> {
    this.assertOpen();
    const filter = parseFilters(filters);
    const where = filterToSql(filter);
    let after: string | undefined;
    for (;;) {
      const page = this.store.listPage(after, WALK_PAGE_ROWS, where);
      if (page.length === 0) return;
      const infos: SnapshotInfo[] = [];
      for (const { info } of page) if (filter === ALWAYS || filter.match(snapshotFieldAdaptor(info))) infos.push(info);
      if (infos.length > 0) yield infos;
      after = page[page.length - 1]!.id;
      await yieldToEventLoop();
      if (this.closed) return;
    }
  }

  /** Convenience: walk() collected into an array. */
  async list(filters: readonly string[] = []): Promise<SnapshotInfo[]> {
    const out: SnapshotInfo[] = [];
    for await (const page of this.walkPages(filters)) out.push(...page);
    return out;
  }

  /**
   * Removes directories no snapshot refers to. Remote layers are unmounted first; a directory that still
   * has anything mounted below it is left alone (rm -r would walk into the mount).
   */
  async cleanup(): Promise<string[]> {
    this.assertOpen();
    const names = await fsp.readdir(this.snapshotsDir);
    // Read ids after listing: a directory renamed to its id before the listing had its row inserted
    // before that, so it is in this map.
    const ids = this.store.idMap();
    const removed: string[] = [];
    for (const name of names) {
      if (ids.has(name) || this.pendingDirs.has(name)) continue;
      const dir = path.join(this.snapshotsDir, name);
      this.localCopies.delete(name);
      if (await this.removeOrphanDir(dir)) removed.push(dir);
    }
    return removed;
  }

  private async removeOrphanDir(dir: string): Promise<boolean> {
    const mountpoint = path.join(dir, 'fs');
    if (this.fs !== undefined) {
      try {
        await this.fs.unmount(mountpoint);
      } catch (err) {
        this.log.warn({ path: dir, err: errorMessage(err) }, 'cleanup: failed to unmount; directory kept');
        return false;
      }
    }
    const mounted = await mountsUnder(dir);
    if (mounted.length > 0) {
      this.log.warn({ path: dir, mounts: mounted }, 'cleanup: directory still has mounts; kept');
      return false;
    }
    try {
      await fsp.rm(dir, { recursive: true, force: true });
      return true;
    } catch (err) {
      this.log.warn({ path: dir, err: errorMessage(err) }, 'cleanup: failed to remove directory');
      return false;
    }
  }

  /**
   * Startup: re-mounts every committed remote snapshot with the labels it was prepared with, and
   * re-creates the directories of active/view snapshots whose creation a crash interrupted. A failure is
   * logged and reported, never fatal, and never deletes anything: the user can retry or `ctr snapshot rm`.
   */
  async restore(): Promise<RestoreResult> {
    this.assertOpen();
    const result: RestoreResult = { restored: [], failed: [] };
    const remote: { id: string; info: SnapshotInfo }[] = [];
    let after: string | undefined;
    for (;;) {
      const page = this.store.listPage(after, WALK_PAGE_ROWS);
      if (page.length === 0) break;
      for (const entry of page) {
        if (entry.info.kind === 'committed') {
          if (isRemote(entry.info.labels)) remote.push(entry);
        } else {
          await this.repairDirs(entry.id, entry.info);
        }
      }
      after = page[page.length - 1]!.id;
    }
    // Each remount catches its own failure: one snapshot failing stops none of the others.
    await forEachBounded(
      remote,
      async ({ id, info }) => {
        try {
          await this.remountRemote(id, info);
          result.restored.push(info.name);
        } catch (err) {
          result.failed.push({ name: info.name, reason: errorMessage(err) });
          this.log.error({ name: info.name, id, err: errorMessage(err) }, 'failed to restore remote snapshot; left unmounted');
        }
      },
      { concurrency: RESTORE_CONCURRENCY },
    );
    if (remote.length > 0) {
      this.log.info({ restored: result.restored.length, failed: result.failed.length }, 'restored remote snapshots');
    }
    return result;
  }

  private async remountRemote(id: string, info: SnapshotInfo): Promise<void> {
    const mountpoint = this.upperPath(id);
    // A layer with a local copy needs neither its mount nor the registry: new containers get the copy. A FUSE
    // server that outlived the daemon still serves the containers that use the mount.
    if (await this.servedLocally({ id, name: info.name, labels: info.labels })) return;
    if (this.fs === undefined) throw new UnavailableError('no remote filesystem configured');
    // Still served: the FUSE server outlived the daemon, and running containers are using it.
    if (await this.fs.check(mountpoint, info.labels).then(() => true, () => false)) return;
    // A mount left by a process that is gone is dead (every access is ENOTCONN): drop it before
    // touching the directory.
    await this.fs.unmount(mountpoint);
    await fsp.mkdir(mountpoint, { recursive: true, mode: UPPER_DIR_MODE });
    await this.fs.mount(mountpoint, info.labels, info.parent || undefined);
  }

  private async repairDirs(id: string, info: SnapshotInfo): Promise<void> {
    const upper = this.upperPath(id);
    if (await pathExists(upper)) return;
    this.log.warn({ name: info.name, id }, 'snapshot directory missing (interrupted create); re-creating it empty');
    await fsp.mkdir(upper, { recursive: true, mode: UPPER_DIR_MODE });
    await fsp.chmod(upper, UPPER_DIR_MODE);
    if (info.kind === 'active') {
      await fsp.mkdir(this.workPath(id), { recursive: true, mode: WORK_DIR_MODE });
      await fsp.chmod(this.workPath(id), WORK_DIR_MODE);
    }
  }

  /** Closes the metadata store. Mounted remote layers are the RemoteFileSystem owner's to unmount. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled(this.remotePrepares.values());
    this.store.close();
  }

  // ---------------------------------------------------------------------------------------------
  // internals

  private async prepareRemote(key: string, parent: string, labels: Record<string, string>, target: string): Promise<Mount[]> {
    const alreadyExists = (): AlreadyExistsError => new AlreadyExistsError(`target snapshot "${target}": already exists`);
    const committed = (): boolean => this.store.lookup(target)?.kind === 'committed';
    if (committed()) throw alreadyExists();
    // Wait for any in-flight attempt on the same target; if it committed, we are done too.
    for (let inflight = this.remotePrepares.get(target); inflight !== undefined; inflight = this.remotePrepares.get(target)) {
      this.log.debug({ key, target }, 'waiting for a prepare of the same target in flight');
      await inflight;
      if (committed()) throw alreadyExists();
    }
    let settle!: () => void;
    const attempt = new Promise<void>((resolve) => (settle = resolve));
    this.remotePrepares.set(target, attempt);
    try {
      return await this.tryRemotePrepare(key, parent, labels, target, alreadyExists);
    } finally {
      this.remotePrepares.delete(target);
      settle();
    }
  }

  private async tryRemotePrepare(
    key: string,
    parent: string,
    labels: Record<string, string>,
    target: string,
    alreadyExists: () => AlreadyExistsError,
  ): Promise<Mount[]> {
    // No availability check of the remote ancestors yet (as the reference): a layer's check waits for its
    // prefetch, and a pull Prepares each layer on the one before, so every layer would wait for the prefetch
    // of its parent. Only the fallback to a normal snapshot, whose mounts are used at once, checks them.
    const source = layerSourceFromLabels(labels);
    const normal = this.fs === undefined || source === undefined;
    // A normal snapshot checks its ancestors before anything is created, as any Prepare does.
    const { mounts, id } = await this.createSnapshotWithId('active', key, parent, labels, { checkAncestors: normal });
    const fields = { key, parent };
    if (this.fs === undefined || source === undefined) {
      const reason = this.fs === undefined ? 'no remote filesystem configured' : 'labels do not describe a remote layer';
      this.log.info({ ...fields, [REMOTE_SNAPSHOT_LOG_KEY]: 'false', reason }, 'prepared a normal snapshot');
      return mounts;
    }
    try {
      await this.fs.mount(this.upperPath(id), labels, parent || undefined);
    } catch (err) {
      this.log.info(
        { ...fields, [REMOTE_SNAPSHOT_LOG_KEY]: 'false', reason: errorMessage(err) },
        'failed to prepare remote snapshot; falling back to a normal pull',
      );
      try {
        await this.checkAncestors(this.store.chain(parent));
      } catch (checkErr) {
        // Its mounts would not work: the snapshot just made is not left behind.
        await this.remove(key).catch(() => undefined);
        throw checkErr;
      }
      return mounts;
    }
    try {
      // Remote layers are not walked for usage: the mount is lazy and reading it would fetch it all.
      this.store.commitActive(key, target, { size: 0, inodes: 0 }, { ...labels, [REMOTE_SNAPSHOT]: REMOTE_SNAPSHOT_VALUE }, id);
    } catch (err) {
      if (!(err instanceof AlreadyExistsError)) {
        // No fallback: the filesystem already owns this directory.
        this.log.info({ ...fields, [REMOTE_SNAPSHOT_LOG_KEY]: 'false', reason: errorMessage(err) }, 'failed to commit remote snapshot');
        throw err;
      }
      // Someone committed the target meanwhile: that is success too. Our duplicate goes away.
      await this.discardDuplicate(key, id);
    }
    this.log.info({ ...fields, [REMOTE_SNAPSHOT_LOG_KEY]: 'true', target }, 'prepared remote snapshot');
    throw alreadyExists();
  }

  private async discardDuplicate(key: string, id: string): Promise<void> {
    try {
      this.store.remove(key);
      await this.fs?.unmount(this.upperPath(id));
    } catch (err) {
      this.log.warn({ key, err: errorMessage(err) }, 'failed to discard duplicate remote snapshot; Cleanup will retry');
    }
  }

  private async createSnapshot(kind: SnapshotKind, key: string, parent: string, labels: Record<string, string>): Promise<Mount[]> {
    return (await this.createSnapshotWithId(kind, key, parent, labels)).mounts;
  }

  /**
   * overlay.go createSnapshot: the directory is built under a temp name, the metadata row is inserted,
   * then the directory is renamed to the row's id — so a directory named by an id is always complete.
   */
  private async createSnapshotWithId(
    kind: SnapshotKind,
    key: string,
    parent: string,
    labels: Record<string, string>,
    opts: { checkAncestors?: boolean } = {},
  ): Promise<{ mounts: Mount[]; id: string }> {
    // Early checks: fail before touching the disk (the store re-checks atomically on insert).
    const chain = this.store.chain(parent);
    if (chain.length > 0 && this.store.lookup(parent)?.kind !== 'committed') {
      throw new InvalidArgumentError(`parent "${parent}" is not committed snapshot`);
    }
    if (this.exists(key)) throw new AlreadyExistsError(`snapshot ${key}: already exists`);
    const local = await this.localFlags(chain);
    if (opts.checkAncestors !== false) await this.checkAncestors(chain, local);

    const tempName = `${TEMP_DIR_PREFIX}${crypto.randomUUID()}`; // randomUUID draws from a cached pool
    const tempDir = path.join(this.snapshotsDir, tempName);
    this.pendingDirs.add(tempName);
    try {
      await fsp.mkdir(tempDir, { mode: ROOT_DIR_MODE });
      const upper = path.join(tempDir, 'fs');
      const lowerPaths = this.lowerPaths(chain, local);
      // Each step is a round trip through libuv's thread pool: the independent ones go at once (all settled
      // before a failure removes the temp dir, so none creates anything in it afterwards).
      const [, , parentRoot] = await allOrFirstError([
        this.makeDir(upper, UPPER_DIR_MODE),
        kind === 'active' ? this.makeDir(path.join(tempDir, 'work'), WORK_DIR_MODE) : undefined,
        chain.length > 0 ? fsp.stat(lowerPaths[0]!) : undefined,
      ] as const);
      // The new upper dir belongs to whoever owns the parent's root, as in overlay.go (the local copy's
      // root when there is one: it has the same owner, and the FUSE server need not answer). mkdir made it ours
      // unless the snapshots dir is setgid (creation not plain).
      if (parentRoot !== undefined && (!this.creation.plain || parentRoot.uid !== this.owner.uid || parentRoot.gid !== this.owner.gid)) {
        await fsp.lchown(upper, parentRoot.uid, parentRoot.gid);
      }
      const record = this.store.createSnapshot(kind, key, parent, labels);
      try {
        await fsp.rename(tempDir, path.join(this.snapshotsDir, record.id));
      } catch (err) {
        try {
          this.store.remove(key);
        } catch (rmErr) {
          this.log.error({ key, err: errorMessage(rmErr) }, 'failed to roll back snapshot metadata');
        }
        throw err;
      }
      return { mounts: this.buildMounts(record.id, kind, lowerPaths), id: record.id };
    } catch (err) {
      await fsp.rm(tempDir, { recursive: true, force: true }).catch((rmErr: unknown) => {
        this.log.warn({ path: tempDir, err: errorMessage(rmErr) }, 'failed to remove temp snapshot directory');
      });
      throw err;
    } finally {
      this.pendingDirs.delete(tempName);
    }
  }

  /**
   * mkdir with exactly `mode`, whatever the daemon's umask (chmod only when the umask takes bits of it away, or
   * a setgid parent gives bits of its own).
   */
  private async makeDir(dir: string, mode: number): Promise<void> {
    await fsp.mkdir(dir, { mode });
    if (!this.creation.plain || (mode & this.creation.mask) !== 0) await fsp.chmod(dir, mode);
  }

  private exists(key: string): boolean {
    return this.store.lookup(key) !== undefined;
  }

  /**
   * The lower dir of each layer of `chain`, nearest first: its directory, or for a remote layer with a local
   * copy, the copy, so a new container reads a fully fetched layer from local disk rather than through FUSE.
   */
  private lowerPaths(chain: readonly ChainEntry[], local: readonly boolean[]): string[] {
    return chain.map((e, i) => (local[i] ? localCopyPath(this.upperPath(e.id)) : this.upperPath(e.id)));
  }

  /** For each layer of `chain`, whether it is served from its local copy. */
  private localFlags(chain: readonly ChainEntry[]): Promise<boolean[]> {
    return Promise.all(chain.map((e) => this.servedLocally(e)));
  }

  private async servedLocally(entry: ChainEntry): Promise<boolean> {
    if (!this.useLocalCopies || !isRemote(entry.labels)) return false;
    if (this.localCopies.has(entry.id)) return true;
    if (!(await hasLocalCopy(this.upperPath(entry.id)))) return false;
    this.localCopies.add(entry.id);
    return true;
  }

  /**
   * Checks every remote ancestor in parallel; any failure makes the snapshot Unavailable. A layer with a
   * local copy needs neither its mount nor the registry, so it is not checked.
   */
  private async checkAncestors(chain: readonly ChainEntry[], local?: readonly boolean[]): Promise<void> {
    local ??= await this.localFlags(chain);
    const remote = chain.filter((e, i) => isRemote(e.labels) && !local[i]);
    if (remote.length === 0) return;
    const fs = this.fs;
    if (fs === undefined) throw new UnavailableError('layer unavailable: no remote filesystem configured');
    const results = await Promise.allSettled(remote.map((e) => fs.check(this.upperPath(e.id), e.labels)));
    const failures = results.flatMap((r, i) => (r.status === 'rejected' ? [{ name: remote[i]!.name, reason: r.reason as unknown }] : []));
    if (failures.length > 0) {
      const first = failures[0]!;
      this.log.warn({ layers: failures.map((f) => f.name), err: errorMessage(first.reason) }, 'remote layer check failed');
      throw new UnavailableError(`layer unavailable: ${first.name}`, { cause: first.reason });
    }
  }

  /** overlay.go mounts(). `lowerPaths`: the parents' directories, nearest first. */
  private buildMounts(id: string, kind: SnapshotKind, lowerPaths: readonly string[]): Mount[] {
    if (lowerPaths.length === 0) {
      // Overlay needs at least one lower dir: a lone layer is a bind mount of its own directory.
      return [{ type: 'bind', source: this.upperPath(id), options: [kind === 'view' ? 'ro' : 'rw', 'rbind'] }];
    }
    if (kind !== 'active' && lowerPaths.length === 1) {
      return [{ type: 'bind', source: lowerPaths[0]!, options: ['ro', 'rbind'] }];
    }
    const options = [...this.overlayOptions];
    if (kind === 'active') options.push(`workdir=${this.workPath(id)}`, `upperdir=${this.upperPath(id)}`);
    options.push(`lowerdir=${lowerPaths.join(':')}`);
    return [{ type: 'overlay', source: 'overlay', options }];
  }
}
