/**
 * The FileSystem behind remote snapshots: resolve a layer blob in its registry, read and verify its TOC,
 * and serve it read-only through its own FUSE mount. Any failure rejects mount(), and the snapshotter
 * falls back to a normal snapshot so containerd pulls the layer itself.
 */
import { statfs } from 'node:fs/promises';
import path from 'node:path';
import type { Config } from '../config/config';
import { EstargzFormatError, errorMessage, InvalidArgumentError, UnavailableError, VerificationError } from '../errors';
import { parseToc, readToc, type LayerCompression, type Toc } from '../estargz/toc';
import type { TocCache } from '../cache/toc-cache';
import { LRUCache } from 'lru-cache';
import { DeferredBlobSource } from '../remote/deferred-blob-source';
import type { Logger } from '../log';
import { LayerMount, lazyUnmount } from '../fuse/layer-fuse';
import { mountsUnder } from './mount-table';
import { LayerBlob, RESOLVE_TAIL_BYTES, withTail, type BlobTail } from './layer-blob';
import { buildLayerTree, type LayerNode } from '../metadata/layer-tree';
import { LayerReader } from '../reader/chunk-reader';
import type { BlobSource } from '../remote/blob-source';
import type { RemoteFileSystem } from './remote-file-system';
import { layerSourceFromLabels, type LayerSourceInfo } from '../source/labels';
import { FsMetrics, type LayerMetricsSnapshot } from '../metrics/fs-metrics';
import type { DiskChunkCache } from '../cache/disk-chunk-cache';
import { backgroundFetch, checkChainId } from '../layer/background-fetch';
import { hashGzipHead, type DiffResume } from '../layer/diff-hash';
import { copyLayerToLocal, hasLocalCopy } from '../layer/local-copy';
import type { LayerTree } from '../metadata/layer-tree';
import type { Scheduler } from '../task/scheduler';

/** The chainID at the end of a snapshot name. */
const CHAIN_ID_SUFFIX = /sha256:[0-9a-f]{64}$/;

/** The reference waits this long for a layer to resolve before giving up (and falling back). */
const MOUNT_TIMEOUT_MS = 30_000;

/**
 * How long a layer opened ahead of its mount (see preOpen) is kept for it. rpull Prepares the layers of an
 * image one after the other within seconds; an image whose later layers are never prepared must not pin their
 * TOCs for long.
 */
const PRE_OPEN_TTL_MS = 60_000;

/** A layer's blob and TOC as read from the registry, before the TOC is checked against the mount's labels. */
interface OpenedLayer {
  blob: BlobSource;
  toc: Toc;
  tocJson: Buffer;
  tocDigest: string;
  tocOffset: number;
  compression: LayerCompression;
  /** The blob's tail as read with the TOC. */
  tail: BlobTail | undefined;
  /** Set when the layer was opened ahead of its mount: its reader, prefetch started. */
  ready?: ReadyLayer;
}

/** A layer's tree and reader with its prefetch started (see makeReady). */
interface ReadyLayer {
  tree: LayerTree;
  blob: LayerBlob;
  reader: LayerReader;
  prefetchBytes: number;
  /** Settles when prefetch ends: true when it completed. */
  prefetched: Promise<boolean>;
  verify: boolean;
  /** The diff hash of the prefetched head, once (a running hash continues one pass); undefined: a full pass. */
  takeHeadHash(): Promise<DiffResume | undefined>;
  /**
   * Stops everything the layer started: its prefetch from the moment it is ready, its background fetch and
   * local copy once mounted. Aborted when the layer is unmounted, when its mount fails or wants other settings,
   * and when a layer opened ahead of its mount is not claimed in time.
   */
  stop: AbortController;
}

/** Resolves a layer blob of an image in its registry. RegistryClient implements it. */
export interface BlobResolver {
  resolveBlob(ref: string, digest: string, signal?: AbortSignal): Promise<BlobSource>;
  /** resolveBlob that also reads the blob's last tailBytes in the same request when the host allows. */
  resolveBlobTail?(ref: string, digest: string, tailBytes: number, signal?: AbortSignal): Promise<{ source: BlobSource; tail: BlobTail | undefined }>;
}

export interface StargazeFsOptions {
  registry: BlobResolver;
  config: Config;
  /** The process's one scheduler: prefetch, background fetch and their inflates take its slots. */
  scheduler: Scheduler;
  /** Verified chunks on disk, shared by every layer (identical chunks are stored once). */
  diskCache?: DiskChunkCache;
  /** TOCs of mounted layers, so they mount again without the registry. */
  tocCache?: TocCache;
  log: Logger;
  /** The xattr opaque directories carry (layer-tree.ts): trusted.overlay.opaque unless overlayfs uses `userxattr`. */
  opaqueXattr?: string;
  /** How long a layer opened ahead of its mount waits for it (default PRE_OPEN_TTL_MS). */
  preOpenTtlMs?: number;
}

interface MountedLayer {
  source: LayerSourceInfo;
  mount: LayerMount<LayerNode>;
  reader: LayerReader;
  log: Logger;
  /** Settles when prefetch ends (also on failure); the first check() waits for it, bounded. */
  prefetched: Promise<unknown>;
  /** True once a check() has waited for prefetch: later checks do not wait again. */
  prefetchAwaited: boolean;
  blobSize: number;
  /** Bytes prefetched at mount (0: none). */
  prefetchBytes: number;
  /** Stops the layer's prefetch, background fetch and local copy when it is unmounted (ReadyLayer.stop). */
  stop: AbortController;
}

/** What a local copy needs of a mounted layer. */
interface CopyJob {
  source: LayerSourceInfo;
  tree: LayerTree;
  reader: LayerReader;
  mount: LayerMount<LayerNode>;
  signal: AbortSignal;
}

/**
 * Free space a local copy must leave: kubelet's default eviction threshold for the image filesystem
 * (imagefs.available < 15%), so a copy never makes the node evict pods.
 */
const COPY_MIN_FREE_FRACTION = 0.15;
/** Per entry on disk beyond its data (inode, directory entry), a rough bound. */
const COPY_BYTES_PER_ENTRY = 4096;

/** Bytes a copy of the tree takes on disk, roughly: file data plus a block per inode (hardlinks are one). */
function treeBytes(tree: LayerTree): number {
  let bytes = 0;
  for (let ino = 1; ino <= tree.nodeCount; ino++) {
    const node = tree.getNode(ino);
    bytes += COPY_BYTES_PER_ENTRY + (node?.type === 'reg' ? node.size : 0);
  }
  return bytes;
}

async function roomFor(dir: string, bytes: number): Promise<{ ok: boolean; neededBytes: number; availableBytes: number }> {
  const st = await statfs(dir);
  const availableBytes = st.bavail * st.bsize;
  const neededBytes = bytes + Math.ceil(st.blocks * st.bsize * COPY_MIN_FREE_FRACTION);
  return { ok: availableBytes >= neededBytes, neededBytes, availableBytes };
}

export class StargazeFileSystem implements RemoteFileSystem {
  /** mountpoint → the layer served there. */
  private readonly layers = new Map<string, MountedLayer>();
  /** Prometheus metrics of the mounted layers; served by whoever owns this filesystem. */
  readonly metrics: FsMetrics;

  /** When a mount last started or ended (performance.now()): background fetch waits for quiet after it. */
  private lastMountActivityAt = -Infinity;
  /** Local copies being made, by mountpoint: an unmount waits for its copy to stop. */
  private readonly copies = new Map<string, Promise<void>>();
  /** TOC cache writes not finished yet. */
  private readonly tocSaves = new Set<Promise<void>>();
  /** Layers opened ahead of their mount, by `ref \0 digest`: undefined when that failed (the mount tries again). */
  private readonly preOpened = new Map<string, Promise<OpenedLayer | undefined>>();
  /** Decompressed chunks of every layer: `[cache] memory_max_bytes` bounds them all together. */
  private readonly memoryCache: LRUCache<string, Buffer> | undefined;

  constructor(private readonly options: StargazeFsOptions) {
    const memoryBytes = options.config.cache.memoryMaxBytes;
    this.memoryCache =
      memoryBytes > 0 ? new LRUCache<string, Buffer>({ maxSize: memoryBytes, sizeCalculation: (b) => Math.max(1, b.length) }) : undefined;
    const disk = options.diskCache;
    this.metrics = new FsMetrics(
      () => this.metricsSnapshot(),
      () => (disk ? { ...disk.stats, usedBytes: disk.usedBytes } : undefined),
    );
  }

  private metricsSnapshot(): LayerMetricsSnapshot[] {
    return [...this.layers].map(([mountpoint, l]) => ({
      digest: l.source.digest,
      mountpoint,
      sizeBytes: l.blobSize,
      fetchedBytes: l.reader.stats.fetchedBytes,
      prefetchBytes: l.prefetchBytes,
      reads: l.mount.counters.reads,
      bytesServed: l.mount.counters.bytesServed,
      readErrors: l.mount.counters.readErrors,
      memoryCacheHits: l.reader.stats.cacheHits,
      memoryCacheMisses: l.reader.stats.cacheMisses,
    }));
  }

  async mount(mountpoint: string, labels: Record<string, string>, parent?: string): Promise<void> {
    const source = layerSourceFromLabels(labels);
    if (!source) throw new InvalidArgumentError('labels do not name an image reference and a layer digest');
    const existing = this.layers.get(mountpoint);
    if (existing) {
      // A restarted daemon asks again for what this process already serves (it outlives the daemon).
      if (existing.source.digest === source.digest) return;
      throw new InvalidArgumentError(`${mountpoint} already serves layer ${existing.source.digest}, not ${source.digest}`);
    }
    const layerLog = this.options.log.child({ layer: source.digest, mountpoint });
    const started = Date.now();
    this.lastMountActivityAt = performance.now();
    const signal = AbortSignal.timeout(MOUNT_TIMEOUT_MS);
    this.preOpen(source, layerLog);

    const opened = await this.openLayer(source, signal, layerLog);
    const verify = !this.options.config.disableVerification && !(source.skipVerify && source.tocDigest === undefined);
    // A layer opened ahead has its prefetch running already; it is used when it was set up as this mount wants.
    const early = opened.ready;
    const useEarly =
      early !== undefined && early.verify === verify && early.prefetchBytes === this.prefetchSize(source.prefetchBytes, early.tree, early.blob.size);
    if (early !== undefined && !useEarly) early.stop.abort();
    const ready = useEarly ? early : this.makeReady(opened, source.prefetchBytes, verify, source.digest, layerLog);
    try {
      await this.serve(mountpoint, source, ready, parent, layerLog, started);
    } catch (err) {
      ready.stop.abort();
      throw err;
    }
  }

  /** Mounts a ready layer on `mountpoint` and starts its background fetch after prefetch. */
  private async serve(mountpoint: string, source: LayerSourceInfo, ready: ReadyLayer, parent: string | undefined, layerLog: Logger, started: number): Promise<void> {
    const { tree, blob, reader, prefetchBytes, prefetched, stop } = ready;
    const mount = new LayerMount<LayerNode>(mountpoint, { root: tree.root, read: (node, pos, len, sig) => reader.read(node, pos, len, sig) }, {
      attrTimeoutSec: this.options.config.fuse.attrTimeoutSec,
      entryTimeoutSec: this.options.config.fuse.entryTimeoutSec,
      readTimeoutMs: this.options.config.blob.fetchingTimeoutSec * 1000,
      status: {
        name: `${source.digest}.json`,
        render: (lastError) => layerStatusJson(source.digest, blob.size, reader.stats.fetchedBytes, lastError),
      },
      log: layerLog,
    });
    await mount.mount();
    this.lastMountActivityAt = performance.now();
    const elapsedMs = Date.now() - started;
    layerLog.info({ ref: source.ref, elapsedMs, blobSize: blob.size }, 'layer mounted');
    this.metrics.observe('mount', source.digest, elapsedMs);
    if (!this.options.config.noBackgroundFetch) {
      // After prefetch, so what the image marked as needed first is never queued behind the rest.
      void prefetched.then(async () => {
        // A layer copied to local disk was fetched and checked before; its copy serves new containers.
        if (await hasLocalCopy(mountpoint).catch(() => false)) return layerLog.info('layer has a local copy: no background fetch');
        // At most `max_concurrency` layers at once; a layer closed while it waits leaves the queue.
        const resume = ready.takeHeadHash();
        const job = (): Promise<void> => this.fetchInBackground({ source, parent, blob, tree, reader, mount, log: layerLog, signal: stop.signal, resume });
        void this.options.scheduler.backgroundLayers.run(job, { priority: 'background', signal: stop.signal }).catch(() => undefined);
      });
    }
    // Its TOC stays on disk while it is mounted: a restarted FUSE server mounts it again from there.
    this.options.tocCache?.pin(source.digest);
    this.layers.set(mountpoint, {
      stop,
      source,
      mount,
      reader,
      log: layerLog,
      prefetched,
      prefetchAwaited: false,
      blobSize: blob.size,
      prefetchBytes,
    });
  }

  /**
   * containerd asks for mounts when it creates a container: the first time, wait for the layer's prefetch
   * (bounded by prefetch_timeout_sec) so the container starts with what the image marked as needed first.
   */
  async check(mountpoint: string): Promise<void> {
    const layer = this.layers.get(mountpoint);
    if (!layer) throw new UnavailableError(`layer at ${mountpoint} is not mounted`);
    if (layer.prefetchAwaited) return;
    layer.prefetchAwaited = true;
    const timeoutMs = this.options.config.prefetchTimeoutSec * 1000;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      layer.prefetched.then(() => false),
      new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), timeoutMs))),
    ]);
    clearTimeout(timer);
    if (timedOut) layer.log.warn({ prefetchTimeoutSec: this.options.config.prefetchTimeoutSec }, 'prefetch not done in time; going on');
  }

  async unmount(mountpoint: string): Promise<void> {
    const layer = this.layers.get(mountpoint);
    if (!layer) {
      // Not ours, but maybe left by a daemon that died: its FUSE server is gone and the mount is dead.
      if ((await mountsUnder(mountpoint)).includes(mountpoint)) {
        await lazyUnmount(mountpoint);
        this.options.log.info({ mountpoint }, 'removed stale mount');
      }
      return;
    }
    this.layers.delete(mountpoint);
    this.options.tocCache?.unpin(layer.source.digest);
    layer.stop.abort();
    await this.copies.get(mountpoint);
    await layer.mount.unmount();
    layer.log.info('layer unmounted');
  }

  /** Mountpoints currently served, with the layer digest each serves. */
  list(): { mountpoint: string; digest: string }[] {
    return [...this.layers].map(([mountpoint, layer]) => ({ mountpoint, digest: layer.source.digest }));
  }

  /** Unmounts every layer; called on daemon shutdown. */
  async close(): Promise<void> {
    for (const opened of this.preOpened.values()) void opened.then((layer) => layer?.ready?.stop.abort());
    this.preOpened.clear();
    await Promise.allSettled(this.tocSaves);
    const mountpoints = [...this.layers.keys()];
    const results = await Promise.allSettled(mountpoints.map((m) => this.unmount(m)));
    results.forEach((r, i) => {
      if (r.status === 'rejected') this.options.log.warn({ mountpoint: mountpoints[i], err: errorMessage(r.reason) }, 'unmount failed');
    });
  }

  /**
   * The reference's rule: disable_verification skips; a toc.digest label must match; without one, only a
   * skipverify label plus allow_no_verification mounts unverified.
   */
  private verifyToc(source: LayerSourceInfo, tocDigest: string, layerLog: Logger): void {
    const config = this.options.config;
    if (config.disableVerification) return;
    if (source.tocDigest !== undefined) {
      if (source.tocDigest !== tocDigest) {
        throw new VerificationError(`TOC digest ${tocDigest} does not match the manifest's ${source.tocDigest}`);
      }
      return;
    }
    if (source.skipVerify && config.allowNoVerification) {
      layerLog.warn('mounting without TOC verification (skipverify label, allow_no_verification)');
      return;
    }
    throw new EstargzFormatError('digest of TOC JSON must be passed (no containerd.io/snapshot/stargz/toc.digest label)');
  }

  /**
   * The layer's blob and verified TOC. A TOC cached by an earlier mount that matches the toc.digest label
   * needs no registry: the blob is then found only when a read misses every cache.
   */
  private async openLayer(
    source: LayerSourceInfo,
    signal: AbortSignal,
    layerLog: Logger,
  ): Promise<{ blob: BlobSource; toc: Toc; tocOffset: number; compression: LayerCompression; tail: BlobTail | undefined; ready?: ReadyLayer }> {
    const resolve = (s?: AbortSignal): Promise<BlobSource> => this.options.registry.resolveBlob(source.ref, source.digest, s);
    // A layer opened ahead had no cached TOC then: no need to look (file reads wait for the libuv threads,
    // which a running prefetch keeps busy inflating).
    const key = preOpenKey(source.ref, source.digest);
    const pre = this.preOpened.get(key);
    this.preOpened.delete(key);
    const early = pre !== undefined ? await pre : undefined;
    if (early !== undefined) {
      layerLog.debug('blob and TOC were read ahead of the mount');
    } else {
      const cached = source.tocDigest !== undefined ? await this.options.tocCache?.load(source.digest, source.tocDigest) : undefined;
      if (cached) {
        const toc = parseToc(cached.tocJson, { blobSize: cached.blobSize, tocOffset: cached.tocOffset });
        layerLog.debug('TOC from the local cache');
        // Only eStargz TOCs are cached (below), so a cached one means gzip members.
        return { blob: new DeferredBlobSource(source.digest, cached.blobSize, resolve), toc, tocOffset: cached.tocOffset, compression: 'gzip', tail: undefined };
      }
    }
    const { blob, toc, tocJson, tocDigest, tocOffset, compression, tail, ready } = early ?? (await this.readLayer(source.ref, source.digest, signal));
    try {
      this.verifyToc(source, tocDigest, layerLog);
    } catch (err) {
      ready?.stop.abort(); // its prefetch read a layer this mount refuses
      throw err;
    }
    if (compression === 'zstd') layerLog.debug('zstd:chunked layer');
    // The cache records no compression: zstd:chunked TOCs are not cached (their layers always read the TOC).
    // The mount does not wait for the write (it only spares a later mount the registry); close() does.
    if (source.tocDigest === tocDigest && compression === 'gzip' && this.options.tocCache !== undefined) {
      // save() logs its own failures; a rejection here must not become an unhandled one.
      const saving = this.options.tocCache.save(source.digest, { blobSize: blob.size, tocOffset, tocJson }).catch(() => undefined);
      this.tocSaves.add(saving);
      void saving.finally(() => this.tocSaves.delete(saving));
    }
    return { blob, toc, tocOffset, compression, tail, ready };
  }

  /** Resolves a layer's blob and reads its TOC (not yet verified: the caller checks it against its labels). */
  private async readLayer(ref: string, digest: string, signal: AbortSignal): Promise<OpenedLayer> {
    const started = Date.now();
    const registry = this.options.registry;
    // The footer and TOC come with the resolve when the registry serves suffix ranges: one round trip, not two.
    const { source: blob, tail: fetchedTail } =
      registry.resolveBlobTail !== undefined
        ? await registry.resolveBlobTail(ref, digest, RESOLVE_TAIL_BYTES, signal)
        : { source: await registry.resolveBlob(ref, digest, signal), tail: undefined };
    const resolvedMs = Date.now() - started;
    const tailed = withTail(blob, undefined, fetchedTail);
    const { toc, tocJson, tocDigest, tocOffset, compression } = await readToc(tailed, { signal });
    const tail = await tailed.tail();
    this.options.log.debug({ layer: digest, resolvedMs, tocMs: Date.now() - started - resolvedMs, tocBytes: blob.size - tocOffset }, 'blob resolved and TOC read');
    return { blob, toc, tocJson, tocDigest, tocOffset, compression, tail };
  }

  /**
   * Opens the image's other layers (the layers label: this one and those after it) while this one mounts,
   * as the reference pre-resolves neighbouring layers: a pull Prepares layers one at a time, each on its
   * parent, so without this every layer would pay its blob resolution and TOC round trips in turn. Each
   * opened layer waits for its own mount, which verifies its TOC against that mount's toc.digest label.
   * Layers whose TOC is in the local cache are left alone: their mount needs no registry.
   */
  private preOpen(source: LayerSourceInfo, layerLog: Logger): void {
    const ttlMs = this.options.preOpenTtlMs ?? PRE_OPEN_TTL_MS;
    const mounted = new Set([...this.layers.values()].map((l) => l.source.digest));
    for (const digest of source.layers) {
      const key = preOpenKey(source.ref, digest);
      if (digest === source.digest || mounted.has(digest) || this.preOpened.has(key)) continue;
      const opened = (async (): Promise<OpenedLayer | undefined> => {
        if (await this.options.tocCache?.has(digest)) return undefined;
        const layer = await this.readLayer(source.ref, digest, AbortSignal.timeout(MOUNT_TIMEOUT_MS));
        // Its prefetch starts now rather than at its mount: the mount checks the TOC against its labels
        // first, and chunks are verified against this TOC's digests either way.
        const verify = !this.options.config.disableVerification;
        layer.ready = this.makeReady(layer, source.prefetchBytes, verify, digest, this.options.log.child({ layer: digest }));
        return layer;
      })().catch((err: unknown) => {
        layerLog.debug({ neighbour: digest, err: errorMessage(err) }, 'could not open a following layer ahead of its mount');
        return undefined;
      });
      this.preOpened.set(key, opened);
      setTimeout(() => {
        if (this.preOpened.get(key) !== opened) return; // claimed by its mount
        this.preOpened.delete(key);
        void opened.then((layer) => {
          if (layer?.ready === undefined) return;
          layer.ready.stop.abort();
          layerLog.debug({ neighbour: digest, preOpenTtlMs: ttlMs }, 'layer opened ahead was not mounted in time: its prefetch stopped');
        });
      }, ttlMs).unref();
    }
  }

  /**
   * Whether background fetch must wait: while reads are loading chunks, and until no read nor prefetch has
   * read the blob and no layer has mounted for background_fetch_quiet_msec, so a container that is starting
   * has the link and the cores to itself. Its reads come in bursts with gaps between (create, then start; one
   * program, then the next): without the quiet period a 4 MiB background window fills each gap and the next
   * read waits behind it. Reads from the disk cache do not restart the quiet period (a long-running service
   * reading a fetched layer, or a local copy being made, would hold every other layer's fetch back). A
   * neighbour layer opened ahead prefetches before it is in `layers`: its mount, soon after, stamps the time.
   * Monotonic time: a clock stepped back must not stall it.
   */
  private backgroundMustWait(): boolean {
    const quietMs = this.options.config.backgroundFetchQuietMs;
    const now = performance.now();
    if (now - this.lastMountActivityAt < quietMs) return true;
    for (const layer of this.layers.values()) if (layer.reader.busy || layer.reader.idleMs(now) < quietMs) return true;
    return false;
  }

  /**
   * Fetches the rest of the layer into the disk cache and checks the whole layer against the chainID it
   * was committed under. A mismatch stops the layer from being served: it is not what containerd thinks.
   */
  private async fetchInBackground(job: {
    source: LayerSourceInfo;
    parent: string | undefined;
    blob: BlobSource;
    tree: LayerTree;
    reader: LayerReader;
    mount: LayerMount<LayerNode>;
    log: Logger;
    signal: AbortSignal;
    /** The hash of the prefetched head, to continue from; undefined: a full pass. */
    resume: Promise<DiffResume | undefined>;
  }): Promise<void> {
    const { source, reader, log: layerLog } = job;
    if (job.signal.aborted) return;
    const started = Date.now();
    try {
      const { blob } = job;
      const fetches = this.options.scheduler.fetches;
      const result = await backgroundFetch({
        resume: await job.resume,
        // Each window takes a slot in the request lane behind reads and prefetch.
        blob: { digest: blob.digest, size: blob.size, readRange: (o, n, sig) => fetches.run(() => blob.readRange(o, n, sig), { priority: 'background', signal: sig }) },
        chunks: job.tree.chunksInBlobOrder(),
        compression: reader.compression,
        onMember: (c, member) => reader.warm(c, member),
        isCached: (c) => reader.isLocal(c),
        isBusy: () => this.backgroundMustWait(),
        signal: job.signal,
      });
      const elapsedMs = Date.now() - started;
      this.metrics.observe('background_fetch_total', source.digest, elapsedMs);
      layerLog.info({ metrics: 'latency', operation: 'background_fetch_total', elapsedMs, diffId: result.diffId, fetchedBytes: result.fetchedBytes, startOffset: result.startOffset }, 'layer fully fetched');
      // Only a layer checked against its chainID is copied: the copy is trusted from then on, unchecked.
      if (this.options.config.disableVerification) {
        if (this.options.config.copyFetchedLayers) layerLog.info('not copied to local disk: not checked against its chainID (verification is disabled)');
        return;
      }
      // containerd names a snapshot it committed itself `<namespace>/<n>/<chainID>`; ours carry the bare chainID.
      const parentChainId = job.parent === undefined ? undefined : CHAIN_ID_SUFFIX.exec(job.parent)?.[0];
      if (job.parent !== undefined && parentChainId === undefined) {
        layerLog.warn({ parent: job.parent }, 'parent snapshot name holds no chainID; layer content not checked against its chainID');
        return;
      }
      try {
        checkChainId(source.chainId, parentChainId, result.diffId);
      } catch (err) {
        this.metrics.integrityFailure(source.digest);
        job.mount.fail(errorMessage(err));
        layerLog.error({ chainId: source.chainId, parent: job.parent, diffId: result.diffId, err: errorMessage(err) }, 'layer does not match its chainID: no longer served');
        return;
      }
      await this.copyToLocal(job, layerLog);
    } catch (err) {
      if (job.signal.aborted) return;
      layerLog.warn({ err: errorMessage(err) }, 'background fetch failed; the layer stays lazy');
    }
  }

  /**
   * A fully fetched layer that passed its chainID check is copied out of its mount (layer/local-copy.ts), so
   * containers created from now on read it from local disk; a failure (disk full, ...) only leaves it served
   * through FUSE. An unmount waits for the copy to stop.
   */
  private async copyToLocal(layer: CopyJob, layerLog: Logger): Promise<void> {
    const { mountpoint } = layer.mount;
    if (!this.options.config.copyFetchedLayers || layer.signal.aborted || this.copies.has(mountpoint)) return;
    // Registered before anything is awaited, so an unmount that comes meanwhile waits for it.
    const copy = this.copyIfWorthIt(layer, layerLog);
    this.copies.set(mountpoint, copy);
    try {
      await copy;
    } finally {
      this.copies.delete(mountpoint);
    }
  }

  /** Never rejects: what went wrong is logged. */
  private async copyIfWorthIt(layer: CopyJob, layerLog: Logger): Promise<void> {
    const { mountpoint } = layer.mount;
    const { signal } = layer;
    try {
      if (await hasLocalCopy(mountpoint)) return;
      // The copy reads the mount: with chunks evicted already (a cap smaller than the layer) it would download
      // them again. Such a layer stays served through FUSE.
      if (!layer.tree.chunksInBlobOrder().every((c) => layer.reader.isLocal(c))) {
        layerLog.info('not copied to local disk: some of its chunks are no longer cached');
        return;
      }
      const room = await roomFor(path.dirname(mountpoint), treeBytes(layer.tree));
      if (!room.ok) {
        layerLog.warn({ neededBytes: room.neededBytes, availableBytes: room.availableBytes }, 'not copied to local disk: it would leave the filesystem too full');
        return;
      }
      const started = Date.now();
      await copyLayerToLocal(mountpoint, { signal, expectRootNames: [...(layer.tree.root.children?.keys() ?? [])] });
      const elapsedMs = Date.now() - started;
      this.metrics.observe('local_copy', layer.source.digest, elapsedMs);
      layerLog.info({ metrics: 'latency', operation: 'local_copy', elapsedMs }, 'layer copied to local disk; new containers read it from there');
    } catch (err) {
      if (!signal.aborted) layerLog.warn({ err: errorMessage(err) }, 'local copy of the fetched layer failed; it stays served through FUSE');
    }
  }

  /** How much to prefetch: up to the landmark, else the label's or config's size; none when told so. */
  private prefetchSize(labelBytes: number | undefined, tree: LayerTree, blobSize: number): number {
    const config = this.options.config;
    if (config.noPrefetch || tree.noPrefetch) return 0;
    return Math.max(0, tree.prefetchLandmarkOffset ?? Math.min(labelBytes ?? config.prefetchSizeBytes, blobSize));
  }

  /**
   * The layer's tree and reader, with its prefetch started (it needs no mount: reads of the mount join it).
   * The prefetched head (gzip members only: a zstd:chunked pass starts at 0) is hashed when prefetch ends,
   * and background fetch continues from that hash rather than downloading the head again.
   */
  private makeReady(opened: OpenedLayer | Omit<OpenedLayer, 'tocJson' | 'tocDigest'>, labelBytes: number | undefined, verify: boolean, digest: string, log: Logger): ReadyLayer {
    const tree = buildLayerTree(opened.toc, { blobSize: opened.blob.size, tocOffset: opened.tocOffset, opaqueXattr: this.options.opaqueXattr });
    const prefetchBytes = this.prefetchSize(labelBytes, tree, opened.blob.size);
    const blob = new LayerBlob(opened.blob, {
      chunkBytes: this.options.config.blob.parallelFetchChunkBytes,
      concurrency: this.options.config.blob.parallelFetchConcurrency,
      tail: opened.tail,
      scheduler: this.options.scheduler,
    });
    const reader = new LayerReader(blob, tree, {
      scheduler: this.options.scheduler,
      memoryCacheBytes: this.memoryCache ? undefined : 0,
      sharedMemoryCache: this.memoryCache,
      verify,
      diskCache: this.options.diskCache,
      compression: opened.compression,
      prefetchParallel: { concurrency: this.options.config.blob.parallelFetchConcurrency, chunkBytes: this.options.config.blob.parallelFetchChunkBytes },
    });
    let head: Buffer | undefined;
    const keepHead = !this.options.config.noBackgroundFetch && reader.compression === 'gzip';
    const stop = new AbortController();
    const prefetched = this.startPrefetch(digest, prefetchBytes, reader, log, stop.signal, keepHead ? (h) => (head = h) : undefined);
    // Hashed as soon as prefetch ends, so only the hash state waits for the mount and the background queue,
    // not the head itself (tens of MiB for a layer opened ahead of its mount).
    let headHash: Promise<DiffResume | undefined> | undefined = prefetched.then((ok) => {
      const h = head;
      head = undefined;
      return ok && h !== undefined ? this.hashHead(h, log) : undefined;
    });
    const takeHeadHash = (): Promise<DiffResume | undefined> => {
      const taken = headHash ?? Promise.resolve(undefined);
      headHash = undefined;
      return taken;
    };
    return { tree, blob, reader, prefetchBytes, prefetched, verify, takeHeadHash, stop };
  }


  /**
   * Prefetch what the image marks as needed first, in the background: mount does not wait for it; check()
   * does. Resolves true when it succeeded; `onHead` receives the blob head it downloaded.
   */
  private startPrefetch(
    digest: string,
    size: number,
    reader: LayerReader,
    layerLog: Logger,
    signal: AbortSignal,
    onHead?: (head: Buffer) => void,
  ): Promise<boolean> {
    if (size <= 0) return Promise.resolve(false);
    const started = Date.now();
    return reader.prefetch(size, signal, onHead).then(
      () => {
        const elapsedMs = Date.now() - started;
        this.metrics.observe('prefetch_total', digest, elapsedMs);
        layerLog.info({ metrics: 'latency', operation: 'prefetch_total', prefetchBytes: size, elapsedMs }, 'prefetch done');
        return true;
      },
      (err: unknown) => {
        // Stopped by its layer (unmounted, refused, replaced, not claimed): not a failure, whatever the transport
        // made of the abort. Bad content found before the stop still is.
        const badContent = err instanceof VerificationError || err instanceof EstargzFormatError;
        if (signal.aborted && !badContent) layerLog.debug({ elapsedMs: Date.now() - started }, 'prefetch stopped');
        else layerLog.warn({ err: errorMessage(err) }, 'prefetch failed');
        return false;
      },
    );
  }

  /** The diff hash of the prefetched head; undefined (a full background pass) when it cannot be had. */
  private hashHead(head: Buffer, layerLog: Logger): Promise<DiffResume | undefined> {
    return hashGzipHead(head).catch((err: unknown) => {
      layerLog.debug({ err: errorMessage(err), headBytes: head.length }, 'prefetched head not usable for the diff_id; background fetch starts at 0');
      return undefined;
    });
  }
}

function preOpenKey(ref: string, digest: string): string {
  return `${ref}\0${digest}`;
}

/**
 * The status file's fixed size. The kernel caches its size for `attr_timeout` like any file's; padding
 * keeps it constant, so a fresh read is never cut at a stale size.
 */
const STATUS_FILE_BYTES = 1024;

/** The reference's state file format, one JSON object and a newline, padded with spaces to a fixed size. */
function layerStatusJson(digest: string, size: number, fetchedBytes: number, lastError: string | undefined): string {
  const fetchedSize = Math.min(fetchedBytes, size);
  const fetchedPercent = size > 0 ? (fetchedSize / size) * 100 : 100;
  const render = (error: string | undefined): string =>
    JSON.stringify({ ...(error !== undefined ? { error } : {}), digest, size, fetchedSize, fetchedPercent });
  let json = render(lastError);
  // An error too long to fit is shortened; JSON escapes can lengthen it, so shorten until it fits.
  for (let keep = 512; Buffer.byteLength(json) > STATUS_FILE_BYTES - 1 && lastError !== undefined && keep > 0; keep -= 128) {
    json = render(`${lastError.slice(0, keep)}…`);
  }
  return json + ' '.repeat(Math.max(0, STATUS_FILE_BYTES - 1 - Buffer.byteLength(json))) + '\n';
}
