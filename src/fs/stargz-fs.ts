/**
 * The FileSystem behind remote snapshots: a mountpoint serves a verified layer (src/layer/) read-only through
 * its own FUSE mount. Any failure rejects mount(), and the snapshotter falls back to a normal snapshot so
 * containerd pulls the layer itself.
 */
import type { Config } from '../config/config';
import { errorMessage, InvalidArgumentError, UnavailableError } from '../errors';
import { LayerMount, lazyUnmount } from '../fuse/layer-fuse';
import type { DiskChunkCache } from '../cache/disk-chunk-cache';
import type { ProfileStore } from '../cache/profile-store';
import type { TocCache } from '../cache/toc-cache';
import type { VerifiedLayer } from '../layer/layer';
import { layerOptionsFromConfig, type LayerOptions } from '../layer/layer-options';
import type { BlobResolver } from '../layer/layer-toc';
import { Layers } from '../layer/layers';
import type { ProfileRegistry } from '../layer/profile-fetch';
import { layerStatusJson, statusFileName } from '../layer/status-file';
import type { Logger } from '../log';
import type { LayerNode } from '../metadata/layer-tree';
import { FsMetrics, type LayerMetricsSnapshot } from '../metrics/fs-metrics';
import { layerSourceFromLabels } from '../source/labels';
import type { Scheduler } from '../task/scheduler';
import { listMounts, mountsUnder, type MountInfo } from './mount-table';
import type { RemoteFileSystem } from './remote-file-system';

export type { BlobResolver } from '../layer/layer-toc';

/** What the mounts read of the config (mountOptionsFromConfig). */
export interface MountOptions {
  /** `[fuse] attr_timeout`, `entry_timeout`: how long the kernel keeps attributes and lookups. */
  readonly attrTimeoutSec: number;
  readonly entryTimeoutSec: number;
  /** `[blob] fetching_timeout_sec`: a read that takes longer fails with EIO. */
  readonly readTimeoutMs: number;
  /** `prefetch_timeout_sec`: how long the first check() waits for prefetch. */
  readonly prefetchTimeoutSec: number;
}

export function mountOptionsFromConfig(config: Config): MountOptions {
  return {
    attrTimeoutSec: config.fuse.attrTimeoutSec,
    entryTimeoutSec: config.fuse.entryTimeoutSec,
    readTimeoutMs: config.blob.fetchingTimeoutSec * 1000,
    prefetchTimeoutSec: config.prefetchTimeoutSec,
  };
}

/** The file system's two slices of the config. */
export function fileSystemOptionsFromConfig(config: Config): { layer: LayerOptions; mount: MountOptions } {
  return { layer: layerOptionsFromConfig(config), mount: mountOptionsFromConfig(config) };
}

export interface StargazeFsOptions {
  registry: BlobResolver;
  /** The process's one scheduler: prefetch, background fetch and their inflates take its slots. */
  scheduler: Scheduler;
  layer: LayerOptions;
  mount: MountOptions;
  /** Verified chunks on disk, shared by every layer (identical chunks are stored once). */
  diskCache?: DiskChunkCache;
  /** TOCs of mounted layers, so they mount again without the registry. */
  tocCache?: TocCache;
  /** Prefetch profiles: replayed at mount, recorded from the mounts' reads. */
  profiles?: ProfileStore;
  /** Where a mount with no local profile looks for one pushed to the registry (layer/profile-fetch.ts). */
  profileRegistry?: ProfileRegistry;
  log: Logger;
  /** The xattr opaque directories carry (layer-tree.ts): trusted.overlay.opaque unless overlayfs uses `userxattr`. */
  opaqueXattr?: string;
  /** Reads the mount table (mount-table.ts listMounts); a test slows it down to race a mount against it. */
  listMounts?: () => Promise<MountInfo[]>;
}

/** Our mounts' source in the mount table, before the pid and count that make each one's unique. */
const MOUNT_SOURCE_PREFIX = 'stargaze:';

interface MountedLayer {
  layer: VerifiedLayer;
  mount: LayerMount<LayerNode>;
  /** True once a check() has waited for prefetch: later checks do not wait again. */
  prefetchAwaited: boolean;
  /**
   * The mount's source in the mount table, unique to it (MOUNT_SOURCE_PREFIX, our pid, a count). A path names
   * a mount only until someone unmounts it: after a wiped root, a new FUSE server may mount another layer at
   * the same path, which this one must not take for its own (nor unmount).
   */
  source: string;
  /** The layer's close, once begun (prepareUnmount, unmount, dropVanished): it runs once. */
  closing?: Promise<void>;
}

export class StargazeFileSystem implements RemoteFileSystem {
  /** mountpoint → the layer served there. */
  private readonly mounted = new Map<string, MountedLayer>();
  /** Mounts made so far: numbers each mount's source. */
  private mountCount = 0;
  private readonly layers: Layers;
  /** Prometheus metrics of the mounted layers; served by whoever owns this filesystem. */
  readonly metrics: FsMetrics;

  constructor(private readonly options: StargazeFsOptions) {
    const disk = options.diskCache;
    this.metrics = new FsMetrics(
      () => this.layerStats(),
      () => (disk ? { ...disk.stats, usedBytes: disk.usedBytes } : undefined),
    );
    this.layers = new Layers({
      registry: options.registry,
      scheduler: options.scheduler,
      options: options.layer,
      metrics: this.metrics,
      diskCache: options.diskCache,
      tocCache: options.tocCache,
      profiles: options.profiles,
      profileRegistry: options.profileRegistry,
      opaqueXattr: options.opaqueXattr,
      log: options.log,
    });
  }

  /** Per mounted layer, what the metrics endpoint reports: its fetched bytes, FUSE reads and cache hits. */
  layerStats(): LayerMetricsSnapshot[] {
    return [...this.mounted].map(([mountpoint, { layer, mount }]) => ({
      digest: layer.digest,
      mountpoint,
      sizeBytes: layer.blobSize,
      fetchedBytes: layer.reader.stats.fetchedBytes,
      prefetchBytes: layer.prefetchBytes,
      reads: mount.counters.reads,
      bytesServed: mount.counters.bytesServed,
      readErrors: mount.counters.readErrors,
      memoryCacheHits: layer.reader.stats.cacheHits,
      memoryCacheMisses: layer.reader.stats.cacheMisses,
    }));
  }

  async mount(mountpoint: string, labels: Record<string, string>, parent?: string): Promise<void> {
    const source = layerSourceFromLabels(labels);
    if (!source) throw new InvalidArgumentError('labels do not name an image reference and a layer digest');
    const existing = this.mounted.get(mountpoint);
    if (existing) {
      // A restarted daemon asks again for what this process already serves (it outlives the daemon).
      if (existing.layer.digest === source.digest) return;
      throw new InvalidArgumentError(`${mountpoint} already serves layer ${existing.layer.digest}, not ${source.digest}`);
    }
    const log = this.options.log.child({ layer: source.digest, mountpoint });
    const started = Date.now();
    const layer = await this.layers.open(source, log);
    const { tree, reader } = layer;
    const mountSource = `${MOUNT_SOURCE_PREFIX}${process.pid}.${++this.mountCount}`;
    const ops = {
      root: tree.root,
      read: (node: LayerNode, pos: number, len: number, sig?: AbortSignal) => reader.read(node, pos, len, sig),
      // Container reads only: prefetch and background fetch do not come through the mount.
      onRead: (path: string, node: LayerNode, pos: number, len: number) => layer.recordRead(path, node, pos, len),
    };
    const mount = new LayerMount<LayerNode>(mountpoint, ops, {
      source: mountSource,
      attrTimeoutSec: this.options.mount.attrTimeoutSec,
      entryTimeoutSec: this.options.mount.entryTimeoutSec,
      readTimeoutMs: this.options.mount.readTimeoutMs,
      status: {
        name: statusFileName(source.digest),
        render: (lastError) => layerStatusJson(source.digest, layer.blobSize, reader.stats.fetchedBytes, lastError),
      },
      log,
    });
    try {
      await mount.mount();
    } catch (err) {
      await layer.close();
      throw err;
    }
    const elapsedMs = Date.now() - started;
    log.info({ ref: source.ref, elapsedMs, blobSize: layer.blobSize }, 'layer mounted');
    this.metrics.observe('mount', source.digest, elapsedMs);
    layer.serve({ mountpoint, parent, fail: (reason) => mount.fail(reason) });
    this.mounted.set(mountpoint, { layer, mount, prefetchAwaited: false, source: mountSource });
  }

  /**
   * containerd asks for mounts when it creates a container: the first time, wait for the layer's prefetch
   * (bounded by prefetch_timeout_sec) so the container starts with what the image marked as needed first.
   */
  async check(mountpoint: string): Promise<void> {
    const mounted = this.mounted.get(mountpoint);
    if (!mounted) throw new UnavailableError(`layer at ${mountpoint} is not mounted`);
    if (mounted.prefetchAwaited) return;
    mounted.prefetchAwaited = true;
    const { prefetchTimeoutSec } = this.options.mount;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      mounted.layer.prefetched.then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), prefetchTimeoutSec * 1000))),
    ]);
    clearTimeout(timer);
    if (timedOut) mounted.layer.log.warn({ prefetchTimeoutSec }, 'prefetch not done in time; going on');
  }

  /**
   * Stops what of the layer at `mountpoint` reads its own mount (the local copy's tar), so its mount can be
   * detached by someone else before unmount(): see FuseServerClient.unmount.
   */
  async prepareUnmount(mountpoint: string): Promise<void> {
    const mounted = this.mounted.get(mountpoint);
    if (mounted) await closeLayer(mounted);
  }

  /**
   * Unmounts `mountpoint`. A mount the kernel no longer has (the daemon detached it, see
   * FuseServerClient.unmount) is only released, and nothing is spawned. Otherwise (the server shutting down
   * with no daemon, or a daemon's lazy umount that failed) it spawns umount(8): a child of this process
   * exiting as one of its FUSE sessions ends can leave libuv's signal lock taken by a cancelled libfuse
   * worker, and every later SIGCHLD waiting for it; rare, as this is not the unmount path under load.
   */
  async unmount(mountpoint: string): Promise<void> {
    const mounted = this.mounted.get(mountpoint);
    if (!mounted) {
      // Not ours, but maybe left by a daemon that died: its FUSE server is gone and the mount is dead.
      if ((await mountsUnder(mountpoint)).includes(mountpoint)) {
        await lazyUnmount(mountpoint);
        this.options.log.info({ mountpoint }, 'removed stale mount');
      }
      return;
    }
    this.mounted.delete(mountpoint);
    await closeLayer(mounted); // its local copy reads the mount: it stops first
    if (await this.isMounted(mountpoint, mounted)) await mounted.mount.unmount();
    else await mounted.mount.release();
    mounted.layer.log.info('layer unmounted');
  }

  /** Whether the kernel still has `mounted`'s own mount at `mountpoint` (not another one at the same path). */
  private async isMounted(mountpoint: string, mounted: MountedLayer): Promise<boolean> {
    const table = await (this.options.listMounts ?? listMounts)();
    return table.some((m) => m.mountpoint === mountpoint && m.source === mounted.source);
  }

  /** Mountpoints currently served, with the layer digest each serves. */
  list(): { mountpoint: string; digest: string }[] {
    return [...this.mounted].map(([mountpoint, { layer }]) => ({ mountpoint, digest: layer.digest }));
  }

  /**
   * Forgets the layers whose mount is gone (umount -l from outside, a wiped root): their FUSE session is over.
   * Their paths are not unmounted, as another server may have mounted there since. Returns their mountpoints.
   */
  async dropVanished(): Promise<string[]> {
    // Only what was served before the mount table was read can be missing from it: a mount that completes
    // while the table is read is in the map but not (yet) in the table, and is not gone.
    const before = [...this.mounted];
    const present = new Set((await (this.options.listMounts ?? listMounts)()).map((m) => `${m.source} ${m.mountpoint}`));
    const gone: string[] = [];
    for (const [mountpoint, mounted] of before) {
      if (present.has(`${mounted.source} ${mountpoint}`) || this.mounted.get(mountpoint) !== mounted) continue;
      this.mounted.delete(mountpoint);
      gone.push(mountpoint);
      await closeLayer(mounted);
      await mounted.mount.release();
    }
    return gone;
  }

  /** Unmounts every layer still mounted (the ones gone are only forgotten); called on shutdown. */
  async close(): Promise<void> {
    await this.dropVanished();
    await this.layers.close();
    const mountpoints = [...this.mounted.keys()];
    const results = await Promise.allSettled(mountpoints.map((m) => this.unmount(m)));
    results.forEach((r, i) => {
      if (r.status === 'rejected') this.options.log.warn({ mountpoint: mountpoints[i], err: errorMessage(r.reason) }, 'unmount failed');
    });
  }
}

/** Closes the layer once, however many of prepareUnmount, unmount and dropVanished ask. */
function closeLayer(mounted: MountedLayer): Promise<void> {
  return (mounted.closing ??= mounted.layer.close());
}
