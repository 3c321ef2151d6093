/**
 * A layer's life, under one AbortController: resolve → read TOC (layer-toc.ts) → prefetch → verify against
 * the mount's labels → serve → background fetch → chainID check → local copy → close. Closing a layer (its
 * unmount, a failed check, a layer opened ahead whose mount never came) stops everything it started.
 *
 * The TOC check is a state the types enforce: a Layer, made from a blob and TOC as read, prefetches but hands
 * out nothing FUSE could serve; only verify() gives a VerifiedLayer, which exposes the tree and reader.
 */
import { setMaxListeners } from 'node:events';

import type { LRUCache } from 'lru-cache';
import type { DiskChunkCache } from '../cache/disk-chunk-cache';
import type { TocCache } from '../cache/toc-cache';
import { errorMessage, EstargzFormatError, FailedPreconditionError, StargazeError, VerificationError } from '../errors';
import type { Logger } from '../log';
import type { ProfileStore } from '../cache/profile-store';
import { buildLayerTreeFromJson, type ChunkInfo, type LayerNode, type LayerTree } from '../metadata/layer-tree';
import type { FsMetrics } from '../metrics/fs-metrics';
import { LayerReader } from '../reader/chunk-reader';
import type { BlobSource } from '../remote/blob-source';
import type { PrefetchProfile } from '../profile/profile-format';
import type { LayerSourceInfo } from '../source/labels';
import type { Scheduler } from '../task/scheduler';
import { backgroundFetch, checkChainId } from './background-fetch';
import { hashGzipHead, type DiffResume } from './diff-hash';
import { LayerBlob } from './layer-blob';
import { copyFetchedLayer } from './layer-copy';
import type { LayerOptions } from './layer-options';
import { checkTocDigest, type LayerToc } from './layer-toc';
import { hasLocalCopy } from './local-copy';
import { profileKeyOf, resolveProfile, saveRecording } from './layer-profile';
import { HELD_PROFILE_BYTES, HeldRanges, type HeldBudget } from './held-ranges';
import { ProfileRecorder } from './profile-recorder';
import type { QuietLink } from './quiet-link';

/** The chainID at the end of a snapshot name. */
const CHAIN_ID_SUFFIX = /sha256:[0-9a-f]{64}$/;

/** What every layer of the process shares (layers.ts makes it). */
export interface LayerContext {
  readonly options: LayerOptions;
  readonly scheduler: Scheduler;
  readonly metrics: FsMetrics;
  /** The read-first gate of background fetch. */
  readonly quiet: QuietLink;
  /** The layers being served, which the gate watches. */
  readonly served: Set<VerifiedLayer>;
  /** Decompressed chunks of every layer: `[cache] memory_max_bytes` bounds them all together. */
  readonly memoryCache: LRUCache<string, Buffer> | undefined;
  /** Verified chunks on disk, shared by every layer (identical chunks are stored once). */
  readonly diskCache?: DiskChunkCache;
  /** TOCs of served layers, kept from eviction while they are served. */
  readonly tocCache?: TocCache;
  /** Prefetch profiles: replayed at mount, recorded while served, kept from eviction while served. */
  readonly profiles?: ProfileStore;
  /** Bounds the profile bytes all layers hold for their background passes together (held-ranges.ts). */
  readonly heldBudget: HeldBudget;
  /** The xattr opaque directories carry (layer-tree.ts). */
  readonly opaqueXattr?: string;
}

/** How a mount wants its layer set up; a layer opened ahead of its mount was set up by a guess of it. */
export interface LayerSetup {
  /** The mount's prefetch size label, if any. */
  labelPrefetchBytes: number | undefined;
  /** Check chunks against their TOC digests (verifiesChunks). */
  verifyChunks: boolean;
  /** The mount's stored prefetch profile, if any: it takes the place of the landmark and the sizes. */
  profile?: PrefetchProfile;
}

/** What a mount does with a VerifiedLayer it serves. */
export interface ServeTarget {
  mountpoint: string;
  /** The parent snapshot's name: the chainID check needs the parent's chainID. */
  parent: string | undefined;
  /** Stops serving file contents (the layer failed its chainID check). */
  fail(reason: string): void;
}

/** A layer's parts, made when it opens; the VerifiedLayer gets them once its TOC passed. */
interface LayerParts {
  readonly digest: string;
  readonly ctx: LayerContext;
  readonly log: Logger;
  readonly stop: AbortController;
  readonly tree: LayerTree;
  readonly blob: LayerBlob;
  readonly reader: LayerReader;
  readonly prefetchBytes: number;
  /** The TOC's digest: what a recorded profile belongs to. */
  readonly tocDigest: string;
  /** Starts the prefetch, once: later calls return the same run. */
  prefetch(): PrefetchRun;
}

interface PrefetchRun {
  /** Settles when prefetch ends: true when it completed. */
  readonly prefetched: Promise<boolean>;
  /** The diff hash of the prefetched head, once (a running hash continues one pass); undefined: a full pass. */
  takeHeadHash(): Promise<DiffResume | undefined>;
  /** The profile's prefetched bytes, once, for the background pass; undefined: none held. */
  takeHeld(): HeldRanges | undefined;
}

/** Only verify() makes a VerifiedLayer: nothing outside this module holds this. */
const VERIFIED = Symbol('verified');

/** How much to prefetch: up to the landmark, else the label's or config's size; none when told so. */
function prefetchSize(options: LayerOptions, labelBytes: number | undefined, tree: LayerTree, blobSize: number): number {
  if (options.noPrefetch || tree.noPrefetch) return 0;
  return Math.max(0, tree.prefetchLandmarkOffset ?? Math.min(labelBytes ?? options.prefetchSizeBytes, blobSize));
}

/** Compressed bytes of the members holding `chunks` (each member once). */
function memberBytes(chunks: readonly ChunkInfo[]): number {
  const starts = new Map<number, number>();
  for (const c of chunks) starts.set(c.compressedOffset, Math.max(starts.get(c.compressedOffset) ?? 0, c.compressedEnd - c.compressedOffset));
  let total = 0;
  for (const n of starts.values()) total += n;
  return total;
}

/** The inode tree of `toc`: CPU on the main thread, tens of milliseconds for a TOC of thousands of entries. */
export function treeOf(toc: LayerToc, ctx: LayerContext): LayerTree {
  return buildLayerTreeFromJson(toc.tocJson, { blobSize: toc.blob.size, tocOffset: toc.tocOffset, opaqueXattr: ctx.opaqueXattr });
}

/** A layer whose blob and TOC are read, its prefetch maybe started, not yet checked against a mount's labels. */
export class Layer {
  private readonly parts: LayerParts;
  private readonly verifyChunks: boolean;
  /** The profile it was set up with (suits() compares them). */
  private readonly profile: PrefetchProfile | undefined;

  /** Builds the tree and reader; nothing is fetched until prefetch() or verify(). */
  constructor(
    readonly digest: string,
    readonly toc: LayerToc,
    setup: LayerSetup,
    ctx: LayerContext,
    log: Logger,
    /** The tree of this very TOC (treeOf), built before: by a layer set up before (reopened), or by the mount while it waited for its profile. */
    built?: LayerTree,
  ) {
    const { options, scheduler } = ctx;
    const tree = built ?? treeOf(toc, ctx);
    // A profile's chunks take the place of the landmark and the sizes; `noprefetch` still means no prefetch.
    const resolved = options.noPrefetch || setup.profile === undefined ? undefined : resolveProfile(setup.profile, tree, { digest, tocDigest: toc.tocDigest }, log);
    const profileChunks = resolved !== undefined && resolved.length > 0 ? resolved : undefined;
    const prefetchBytes = profileChunks !== undefined ? memberBytes(profileChunks) : prefetchSize(options, setup.labelPrefetchBytes, tree, toc.blob.size);
    const blob = new LayerBlob(toc.blob, { ...options.parallelFetch, tail: toc.tail, scheduler });
    const reader = new LayerReader(blob, tree, {
      scheduler,
      memoryCacheBytes: ctx.memoryCache ? undefined : 0,
      sharedMemoryCache: ctx.memoryCache,
      verify: setup.verifyChunks,
      diskCache: ctx.diskCache,
      compression: toc.compression,
      prefetchParallel: options.parallelFetch,
      blockBytes: options.blockBytes,
    });
    const stop = new AbortController();
    // Everything the layer starts listens on it: each chunk of a prefetch waiting for an inflate slot, each
    // request in flight. Far more than ten listeners is normal here, not a leak.
    setMaxListeners(0, stop.signal);
    let run: PrefetchRun | undefined;
    const prefetch = (): PrefetchRun => (run ??= startPrefetch(digest, { bytes: prefetchBytes, profileChunks }, reader, ctx, log, stop.signal));
    this.verifyChunks = setup.verifyChunks;
    this.profile = setup.profile;
    this.parts = { digest, ctx, log, stop, tree, blob, reader, prefetchBytes, tocDigest: toc.tocDigest, prefetch };
  }

  /**
   * Starts the prefetch before the TOC is checked: a layer opened ahead of its mount does, since its mount
   * comes later and chunks are verified against this TOC's digests either way.
   */
  prefetch(): void {
    this.parts.prefetch();
  }

  /**
   * This layer set up again as `setup` wants (a layer opened ahead, whose mount wants another prefetch): it
   * stops, and the new one shares its tree, which depends on the TOC alone.
   */
  reopened(setup: LayerSetup, log: Logger): Layer {
    this.close();
    return new Layer(this.digest, this.toc, setup, this.parts.ctx, log, this.parts.tree);
  }

  /** Whether it was set up as `setup` wants (a layer opened ahead was set up before its mount's labels were known). */
  suits(setup: LayerSetup): boolean {
    const { ctx, tree, blob } = this.parts;
    if (this.profile !== setup.profile) return false;
    return this.verifyChunks === setup.verifyChunks && this.parts.prefetchBytes === prefetchSize(ctx.options, setup.labelPrefetchBytes, tree, blob.size);
  }

  /**
   * Checks the TOC against the mount's labels (checkTocDigest) and starts the prefetch if it has not started.
   * A layer that fails is closed: a prefetch it started read a layer the mount refuses.
   */
  verify(source: LayerSourceInfo, log: Logger): VerifiedLayer {
    try {
      checkTocDigest(source, this.toc.tocDigest, this.parts.ctx.options, log);
    } catch (err) {
      this.close();
      throw err;
    }
    return new VerifiedLayer(VERIFIED, this.parts, source, log);
  }

  /** Stops its prefetch. */
  close(): void {
    this.parts.stop.abort();
  }
}

/** A layer that passed its TOC check: what a mount serves. */
export class VerifiedLayer {
  private readonly parts: LayerParts;
  /** The local copy being made: close() waits for it to stop. */
  private copying: Promise<void> | undefined;
  private readonly run: PrefetchRun;
  private serving = false;
  private closed = false;
  /** Records the start window for the layer's prefetch profile, while served (absent: recording is off). */
  private recorder: ProfileRecorder | undefined;
  /** The recorded window being stored: close() waits for it. */
  private savingProfile: Promise<void> | undefined;
  /** The mount's logger (a layer opened ahead logged its prefetch without the mountpoint). */
  readonly log: Logger;

  constructor(
    token: typeof VERIFIED,
    parts: LayerParts,
    readonly source: LayerSourceInfo,
    log: Logger,
  ) {
    if (token !== VERIFIED) throw new StargazeError('ERR_INTERNAL', 'a VerifiedLayer comes from Layer.verify()');
    this.parts = parts;
    this.log = log;
    this.run = parts.prefetch();
  }

  get digest(): string {
    return this.parts.digest;
  }
  get tree(): LayerTree {
    return this.parts.tree;
  }
  get reader(): LayerReader {
    return this.parts.reader;
  }
  get blobSize(): number {
    return this.parts.blob.size;
  }
  /** Bytes prefetched at mount (0: none). */
  get prefetchBytes(): number {
    return this.parts.prefetchBytes;
  }
  /** Settles when prefetch ends: true when it completed. */
  get prefetched(): Promise<boolean> {
    return this.run.prefetched;
  }

  /** The layer is mounted at `target`: background fetch starts after prefetch, then its checks and copy. */
  serve(target: ServeTarget): void {
    if (this.serving || this.closed) throw new FailedPreconditionError(`layer ${this.digest} is already served or closed`);
    this.serving = true;
    const { ctx } = this.parts;
    ctx.served.add(this);
    ctx.quiet.stamp();
    // Its TOC stays on disk while it is served: a restarted FUSE server mounts it again from there.
    ctx.tocCache?.pin(this.digest);
    // And its profile, recorded into or replayed from: a restart mounts it again with it.
    ctx.profiles?.pin(profileKeyOf(this.source));
    this.startRecording();
    // After prefetch, so what the image marked as needed first is never queued behind the rest. The blob's tail
    // kept in memory serves those passes; once they are over it is one more copy of what the disk cache holds.
    const { blob } = this.parts;
    if (ctx.options.noBackgroundFetch) void this.run.prefetched.then(() => blob.releaseTail());
    else void this.run.prefetched.then(() => this.queueBackgroundFetch(target)).finally(() => blob.releaseTail());
  }

  /** Stops everything the layer started, and waits for its local copy to stop. */
  async close(): Promise<void> {
    const { ctx, stop } = this.parts;
    const wasServed = this.serving && !this.closed;
    if (wasServed) {
      ctx.served.delete(this);
      ctx.tocCache?.unpin(this.digest);
    }
    this.closed = true;
    stop.abort();
    this.recorder?.close(); // what the window read so far is still worth keeping
    await this.copying;
    await this.savingProfile;
    if (wasServed) ctx.profiles?.unpin(profileKeyOf(this.source));
  }

  /**
   * A container read bytes [position, position + length) of `node` at `path` (the FUSE path) through the mount:
   * recorded for the layer's prefetch profile while its start window is open. On the read path: cheap, no I/O.
   */
  recordRead(path: string, node: LayerNode, position: number, length: number): void {
    this.recorder?.record(path, node.chunks, position, length);
  }

  /** Starts recording the start window, when `[prefetch_profile] record` is on and there is a store. */
  private startRecording(): void {
    const { ctx } = this.parts;
    const { profile } = ctx.options;
    const store = ctx.profiles;
    if (!profile.record || store === undefined) return;
    const { source, log } = this;
    this.recorder = new ProfileRecorder({ quietMs: profile.quietMs, maxWindowMs: profile.maxWindowMs, maxChunks: profile.maxChunks }, (entries) => {
      this.savingProfile = saveRecording({ store, source, tocDigest: this.parts.tocDigest, maxChunks: profile.maxChunks, log }, entries);
    });
  }

  private async queueBackgroundFetch(target: ServeTarget): Promise<void> {
    const { ctx, stop } = this.parts;
    const { log } = this;
    const held = this.run.takeHeld();
    // A layer copied to local disk was fetched and checked before; its copy serves new containers.
    if (await hasLocalCopy(target.mountpoint).catch(() => false)) {
      held?.clear();
      return log.info('layer has a local copy: no background fetch');
    }
    // At most `max_concurrency` layers at once; a layer closed while it waits leaves the queue.
    const resume = this.run.takeHeadHash();
    await ctx.scheduler.backgroundLayers
      .run(() => this.fetchInBackground(target, resume, held), { priority: 'background', signal: stop.signal })
      .catch(() => undefined)
      .finally(() => held?.clear());
  }

  /**
   * Fetches the rest of the layer into the disk cache and checks the whole layer against the chainID it
   * was committed under. A mismatch stops the layer from being served: it is not what containerd thinks.
   */
  private async fetchInBackground(target: ServeTarget, resume: Promise<DiffResume | undefined>, held: HeldRanges | undefined): Promise<void> {
    const { ctx, stop, blob, reader, tree } = this.parts;
    const { log } = this;
    const { signal } = stop;
    const { source } = this;
    if (signal.aborted) return;
    const started = Date.now();
    const fetches = ctx.scheduler.fetches;
    try {
      const result = await backgroundFetch({
        resume: await resume,
        // Each window takes a slot in the request lane behind reads and prefetch.
        blob: {
          digest: blob.digest,
          size: blob.size,
          readRange: (o, n, sig) =>
            fetches.run(() => (held !== undefined ? held.read(o, n, (gaps) => blob.readRanges(gaps, sig)) : blob.readRange(o, n, sig)), { priority: 'background', signal: sig }),
        } satisfies BlobSource,
        chunks: tree.chunksInBlobOrder(),
        compression: reader.compression,
        onMember: (c, member) => reader.warm(c, member),
        isCached: (c) => reader.isLocal(c),
        isBusy: () => ctx.quiet.mustWait(),
        signal,
      });
      const elapsedMs = Date.now() - started;
      ctx.metrics.observe('background_fetch_total', source.digest, elapsedMs);
      log.info({ metrics: 'latency', operation: 'background_fetch_total', elapsedMs, diffId: result.diffId, fetchedBytes: result.fetchedBytes, startOffset: result.startOffset }, 'layer fully fetched');
      // Only a layer checked against its chainID is copied: the copy is trusted from then on, unchecked.
      if (ctx.options.disableVerification) {
        if (ctx.options.copyFetchedLayers) log.info('not copied to local disk: not checked against its chainID (verification is disabled)');
        return;
      }
      // containerd names a snapshot it committed itself `<namespace>/<n>/<chainID>`; ours carry the bare chainID.
      const parentChainId = target.parent === undefined ? undefined : CHAIN_ID_SUFFIX.exec(target.parent)?.[0];
      if (target.parent !== undefined && parentChainId === undefined) {
        log.warn({ parent: target.parent }, 'parent snapshot name holds no chainID; layer content not checked against its chainID');
        return;
      }
      try {
        checkChainId(source.chainId, parentChainId, result.diffId);
      } catch (err) {
        ctx.metrics.integrityFailure(source.digest);
        target.fail(errorMessage(err));
        log.error({ chainId: source.chainId, parent: target.parent, diffId: result.diffId, err: errorMessage(err) }, 'layer does not match its chainID: no longer served');
        stop.abort(); // a failed check closes the layer: nothing of it goes on
        return;
      }
      if (!ctx.options.copyFetchedLayers || signal.aborted) return;
      // The copy reads the mount through FUSE: its reads are not a container's start.
      this.recorder?.close();
      // Set before anything is awaited, so a close that comes meanwhile waits for it.
      this.copying = copyFetchedLayer({ digest: this.digest, mountpoint: target.mountpoint, tree, reader, metrics: ctx.metrics, signal, log });
      await this.copying;
    } catch (err) {
      if (signal.aborted) return;
      log.warn({ err: errorMessage(err) }, 'background fetch failed; the layer stays lazy');
    }
  }
}

/**
 * Prefetch what the image marks as needed first, in the background: mount does not wait for it; check()
 * does. The prefetched head (gzip members only: a zstd:chunked pass starts at 0) is hashed when prefetch
 * ends, and background fetch continues from that hash rather than downloading the head again.
 */
function startPrefetch(
  digest: string,
  plan: { bytes: number; profileChunks: readonly ChunkInfo[] | undefined },
  reader: LayerReader,
  ctx: LayerContext,
  log: Logger,
  signal: AbortSignal,
): PrefetchRun {
  const { bytes: size, profileChunks } = plan;
  if (size <= 0) return { prefetched: Promise.resolve(false), takeHeadHash: () => Promise.resolve(undefined), takeHeld: () => undefined };
  let head: Buffer | undefined;
  // A profile's chunks are scattered over the blob: no head to hash, background fetch starts at 0.
  const keepHead = profileChunks === undefined && !ctx.options.noBackgroundFetch && reader.compression === 'gzip';
  const started = Date.now();
  // The background pass reads every byte for the chainID check: it takes a profile's bytes from here.
  let held = profileChunks !== undefined && !ctx.options.noBackgroundFetch ? new HeldRanges(HELD_PROFILE_BYTES, ctx.heldBudget) : undefined;
  signal.addEventListener('abort', () => held?.clear(), { once: true });
  const fetching =
    profileChunks !== undefined
      ? reader.prefetchChunks(profileChunks, signal, held && ((offset, bytes) => void held?.add(offset, bytes)))
      : reader.prefetch(size, signal, keepHead ? (h) => (head = h) : undefined);
  const prefetched = fetching.then(
    () => {
      const elapsedMs = Date.now() - started;
      ctx.metrics.observe('prefetch_total', digest, elapsedMs);
      log.info({ metrics: 'latency', operation: 'prefetch_total', prefetchBytes: size, profileChunks: profileChunks?.length, elapsedMs }, 'prefetch done');
      return true;
    },
    (err: unknown) => {
      // Stopped by its layer (unmounted, refused, replaced, not claimed): not a failure, whatever the transport
      // made of the abort. Bad content found before the stop still is.
      const badContent = err instanceof VerificationError || err instanceof EstargzFormatError;
      if (signal.aborted && !badContent) log.debug({ elapsedMs: Date.now() - started }, 'prefetch stopped');
      else log.warn({ err: errorMessage(err) }, 'prefetch failed');
      return false;
    },
  );
  // Hashed as soon as prefetch ends, so only the hash state waits for the mount and the background queue,
  // not the head itself (tens of MiB for a layer opened ahead of its mount).
  let headHash: Promise<DiffResume | undefined> | undefined = prefetched.then((ok) => {
    const h = head;
    head = undefined;
    return ok && h !== undefined ? hashHead(h, log) : undefined;
  });
  return {
    prefetched,
    takeHeld: () => {
      const taken = held;
      held = undefined;
      return taken;
    },
    takeHeadHash: () => {
      const taken = headHash ?? Promise.resolve(undefined);
      headHash = undefined;
      return taken;
    },
  };
}

/** The diff hash of the prefetched head; undefined (a full background pass) when it cannot be had. */
function hashHead(head: Buffer, log: Logger): Promise<DiffResume | undefined> {
  return hashGzipHead(head).catch((err: unknown) => {
    log.debug({ err: errorMessage(err), headBytes: head.length }, 'prefetched head not usable for the diff_id; background fetch starts at 0');
    return undefined;
  });
}
