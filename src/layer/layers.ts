/**
 * The process's layers: Layers.open() takes a mount's labels to a VerifiedLayer, from a layer opened ahead
 * (pre-open.ts), the TOC cache, or the registry, and opens the image's following layers meanwhile. What every
 * layer shares (memory cache, scheduler, the quiet-link gate, the bound on held profile bytes) is made here once.
 */
import { LRUCache } from 'lru-cache';
import type { DiskChunkCache } from '../cache/disk-chunk-cache';
import type { ProfileStore } from '../cache/profile-store';
import type { TocCache } from '../cache/toc-cache';
import type { Logger } from '../log';
import type { LayerTree } from '../metadata/layer-tree';
import type { PrefetchProfile } from '../profile/profile-format';
import type { FsMetrics } from '../metrics/fs-metrics';
import { DeferredBlobSource } from '../remote/deferred-blob-source';
import type { LayerSourceInfo } from '../source/labels';
import type { Scheduler } from '../task/scheduler';
import { Layer, treeOf, type LayerContext, type LayerSetup, type VerifiedLayer } from './layer';
import type { LayerOptions } from './layer-options';
import { HeldBudget } from './held-ranges';
import { loadProfile, profileKeyOf } from './layer-profile';
import { ProfileFetcher, type ProfileRegistry } from './profile-fetch';
import { readLayerToc, verifiesChunks, type BlobResolver, type LayerToc } from './layer-toc';
import { PreOpener } from './pre-open';
import { QuietLink } from './quiet-link';

/** The reference waits this long for a layer to resolve before giving up (and falling back). */
const OPEN_TIMEOUT_MS = 30_000;

export interface LayersOptions {
  registry: BlobResolver;
  scheduler: Scheduler;
  options: LayerOptions;
  metrics: FsMetrics;
  diskCache?: DiskChunkCache;
  /** TOCs of mounted layers, so they mount again without the registry. */
  tocCache?: TocCache;
  /** Prefetch profiles: replayed at mount, recorded while served. */
  profiles?: ProfileStore;
  /** Where a mount with no local profile looks for one pushed to the registry (absent: local ones only). */
  profileRegistry?: ProfileRegistry;
  /** The xattr opaque directories carry (layer-tree.ts): trusted.overlay.opaque unless overlayfs uses `userxattr`. */
  opaqueXattr?: string;
  log: Logger;
}

export class Layers {
  /** The layers being served. */
  readonly served = new Set<VerifiedLayer>();
  private readonly ctx: LayerContext;
  private readonly preOpener: PreOpener;
  /** TOC cache writes not finished yet. */
  private readonly tocSaves = new Set<Promise<void>>();
  /** Profiles pushed to the registry, for mounts that have none locally. */
  private readonly fetcher: ProfileFetcher | undefined;

  constructor(private readonly deps: LayersOptions) {
    const { options } = deps;
    const memoryBytes = options.memoryCacheBytes;
    this.ctx = {
      options,
      scheduler: deps.scheduler,
      metrics: deps.metrics,
      quiet: new QuietLink(options.backgroundFetchQuietMs, this.served),
      served: this.served,
      memoryCache: memoryBytes > 0 ? new LRUCache<string, Buffer>({ maxSize: memoryBytes, sizeCalculation: (b) => Math.max(1, b.length) }) : undefined,
      diskCache: deps.diskCache,
      tocCache: deps.tocCache,
      profiles: deps.profiles,
      heldBudget: new HeldBudget(),
      opaqueXattr: deps.opaqueXattr,
    };
    this.fetcher =
      deps.profiles !== undefined && deps.profileRegistry !== undefined ? new ProfileFetcher(deps.profileRegistry, deps.profiles, options.profile.fetchTimeoutMs) : undefined;
    this.preOpener = new PreOpener(options.preOpenTtlMs, (ref, digest) => this.openAhead(ref, digest));
  }

  /**
   * The layer a mount of `source` serves, its TOC checked against the labels. A TOC cached by an earlier mount
   * that matches the toc.digest label needs no registry: the blob is then found only when a read misses every
   * cache.
   */
  async open(source: LayerSourceInfo, log: Logger): Promise<VerifiedLayer> {
    this.ctx.quiet.stamp();
    const servedDigests = new Set([...this.served].map((l) => l.digest));
    this.preOpener.openNeighbours(source, (digest) => servedDigests.has(digest), log);
    const { options, profiles } = this.ctx;
    // Looked up while the TOC is read (a registry lookup is round trips of its own), and needed only once the
    // layer is set up: a profile takes the place of the landmark in its prefetch.
    const looking = profiles !== undefined && options.profile.replay && !options.noPrefetch ? this.profileFor(profiles, source, log) : undefined;
    // A layer opened ahead had no cached TOC then: no need to look (file reads wait for the libuv threads,
    // which a running prefetch keeps busy inflating).
    const early = this.preOpener.claim(source.ref, source.digest);
    // The tree is built as soon as the TOC is in, while the profile lookup may still wait for the registry.
    const reading = early !== undefined ? early : this.readToc(source, log).then((toc) => ({ toc, tree: treeOf(toc, this.ctx) }));
    // Whichever fails first is the mount's error; the other's outcome is not waited for.
    looking?.catch(() => undefined);
    reading.catch(() => undefined);
    let profile: PrefetchProfile | undefined;
    let found: Layer | { toc: LayerToc; tree: LayerTree } | undefined;
    try {
      [profile, found] = await Promise.all([looking, reading]);
    } catch (err) {
      // The layer opened ahead is this mount's now: nobody else would stop its prefetch.
      void early?.then((l) => l?.close(), () => undefined);
      throw err;
    }
    const setup: LayerSetup = { labelPrefetchBytes: source.prefetchBytes, verifyChunks: verifiesChunks(source, options), profile };
    let layer: Layer;
    if (found instanceof Layer) {
      log.debug('blob and TOC were read ahead of the mount');
      // Its prefetch runs already; it is used when it was set up as this mount wants.
      layer = found.suits(setup) ? found : found.reopened(setup, log);
    } else if (found !== undefined) {
      layer = new Layer(source.digest, found.toc, setup, this.ctx, log, found.tree);
    } else {
      // Opened ahead, but that failed: the mount reads the TOC itself.
      layer = new Layer(source.digest, await this.readToc(source, log), setup, this.ctx, log);
    }
    const verified = layer.verify(source, log);
    const { toc } = layer;
    if (toc.compression === 'zstd') log.debug('zstd:chunked layer');
    this.saveToc(source, toc);
    return verified;
  }

  /** The mount's TOC: from the TOC cache when it holds the one the labels name, else from the registry. */
  private async readToc(source: LayerSourceInfo, log: Logger): Promise<LayerToc> {
    return (await this.cachedToc(source, log)) ?? (await readLayerToc(this.deps.registry, source.ref, source.digest, AbortSignal.timeout(OPEN_TIMEOUT_MS), this.deps.log));
  }

  /** The local profile of the mount, else (when the store has no file for it) one pushed to the registry. */
  private async profileFor(profiles: ProfileStore, source: LayerSourceInfo, log: Logger): Promise<PrefetchProfile | undefined> {
    const local = await loadProfile(profiles, source, log);
    if (local !== undefined || this.fetcher === undefined || source.manifestDigest === undefined) return local;
    // An unusable local file was logged already; the registry is asked only when there is none at all.
    if (await profiles.has(profileKeyOf(source))) return undefined;
    return this.fetcher.fetch(source, log);
  }

  /** Stops the layers opened ahead and waits for TOC cache writes; served layers are their mounts' to close. */
  async close(): Promise<void> {
    this.preOpener.close();
    await Promise.allSettled(this.tocSaves);
  }

  /** A neighbour layer, its prefetch started as a mount with no prefetch label would. */
  private async openAhead(ref: string, digest: string): Promise<Layer | undefined> {
    if (await this.deps.tocCache?.has(digest)) return undefined;
    const toc = await readLayerToc(this.deps.registry, ref, digest, AbortSignal.timeout(OPEN_TIMEOUT_MS), this.deps.log);
    const setup: LayerSetup = { labelPrefetchBytes: undefined, verifyChunks: !this.ctx.options.disableVerification };
    const layer = new Layer(digest, toc, setup, this.ctx, this.deps.log.child({ layer: digest }));
    layer.prefetch();
    return layer;
  }

  private async cachedToc(source: LayerSourceInfo, log: Logger): Promise<LayerToc | undefined> {
    const { tocCache, registry } = this.deps;
    if (source.tocDigest === undefined || tocCache === undefined) return undefined;
    const cached = await tocCache.load(source.digest, source.tocDigest);
    if (cached === undefined) return undefined;
    log.debug('TOC from the local cache');
    const resolve = (signal?: AbortSignal): ReturnType<BlobResolver['resolveBlob']> => registry.resolveBlob(source.ref, source.digest, signal);
    // Only eStargz TOCs are cached (saveToc), so a cached one means gzip members. load() checked its digest.
    return {
      blob: new DeferredBlobSource(source.digest, cached.blobSize, resolve),
      tocJson: cached.tocJson,
      tocDigest: source.tocDigest,
      fromCache: true,
      tocOffset: cached.tocOffset,
      compression: 'gzip',
      tail: undefined,
    };
  }

  /**
   * The cache records no compression: zstd:chunked TOCs are not cached (their layers always read the TOC).
   * The mount does not wait for the write (it only spares a later mount the registry); close() does.
   */
  private saveToc(source: LayerSourceInfo, toc: LayerToc): void {
    const { tocCache } = this.deps;
    if (tocCache === undefined || toc.fromCache || source.tocDigest !== toc.tocDigest || toc.compression !== 'gzip') return;
    // save() logs its own failures; a rejection here must not become an unhandled one.
    const saving = tocCache.save(source.digest, { blobSize: toc.blob.size, tocOffset: toc.tocOffset, tocJson: toc.tocJson }).catch(() => undefined);
    this.tocSaves.add(saving);
    void saving.finally(() => this.tocSaves.delete(saving));
  }
}
