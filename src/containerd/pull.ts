/**
 * Pulling an image into containerd so that a remote snapshotter can mount its layers lazily: what
 * `ctr-remote images rpull` does through containerd's Go client (client.Pull with the unpacker and
 * stargz-snapshotter's AppendDefaultLabelsHandlerWrapper), done here step by step over containerd's services.
 *
 *  1. A lease (expiring after 24 h, like client.WithLease) covers everything created, so the garbage collector
 *     leaves half-pulled content and snapshots alone until the image record references them.
 *  2. The reference is resolved at the registry; an index picks the manifest for the platform. Index, manifest
 *     and config go into the content store with containerd's GC labels (gc.ref.content.*) and the
 *     distribution source label.
 *  3. Layers, base first (containerd's unpacker): a layer whose chainID snapshot exists is skipped. Otherwise
 *     Prepare `extract-<unique> <chainID>` on the parent's chainID with the remote-snapshot labels. A remote
 *     snapshotter that can mount the layer lazily commits it itself and answers AlreadyExists; Stat(chainID)
 *     confirms it. Any other snapshotter (or a layer it cannot mount lazily) returns mounts: then we download
 *     the blob ourselves into the content store, have containerd's Diff service apply it onto the mounts, check
 *     the diffID and Commit under the chainID; on failure the active snapshot is removed.
 *  4. The config gets `containerd.io/gc.ref.snapshot.<snapshotter>` = top chainID and the image record is
 *     created (or updated) with the resolved target, then the lease is deleted.
 *
 * Downloads of layers that have to be applied run up to MAX_CONCURRENT_DOWNLOADS at a time, ahead of the
 * layer being applied, as containerd's unpacker does once it meets the first layer it must fetch.
 */
import { randomBytes } from 'node:crypto';
import { setMaxListeners } from 'node:events';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { RegistryError, StargazeError, errorMessage } from '../errors';
import type { Logger } from '../log';
import { parseReference, type ImageReference } from '../remote/reference';
import type { RegistryClient } from '../remote/registry-client';
import {
  REMOTE_URLS,
  STARGZ_DIGEST,
  STARGZ_LAYERS,
  STARGAZE_MANIFEST_DIGEST,
  STARGZ_PREFETCH,
  STARGZ_REFERENCE,
  TARGET_SNAPSHOT_REF,
  TOC_DIGEST,
} from '../source/labels';
import type { ContainerdClient, SnapshotsService } from './client';
import type { ContentSource } from './content-writer';
import {
  ContainerdError,
  SnapshotterNotConfiguredError,
  SnapshotterUnavailableError,
  isAlreadyExists,
} from './errors';
import {
  GC_EXPIRE,
  GC_REF_SNAPSHOT_PREFIX,
  INHERITED_SNAPSHOT_LABEL_PREFIX,
  UNCOMPRESSED,
  chainIds,
  appendDistributionSource,
  childrenGcLabels,
  distributionSourceKey,
  isConfigType,
  isLayerType,
  labelFits,
  layersLabel,
  parseConfig,
  type ImageManifest,
} from './image';
import { acquireHostLock } from './host-lock';
import { UnsupportedImageError, resolveManifest, type Fetched, type ResolvedManifest } from './resolve';
import type { Platform } from './platforms';
import type { Descriptor, Mount } from './types';
import { abortable } from '../abortable';
import { Limiter } from '../task/limiter';

export { ImageAuthError, ImageNotFoundError, UnsupportedImageError, resolveManifest, type ResolvedManifest } from './resolve';

/** client.WithLease's default expiration. */
export const LEASE_EXPIRE_MS = 24 * 60 * 60 * 1000;
/** ctr's --max-concurrent-downloads default. */
export const MAX_CONCURRENT_DOWNLOADS = 3;
/**
 * Range requests in flight for each layer rpull downloads itself, unless PullOptions.downloadConcurrency
 * says otherwise. Twice the daemon's [blob] parallel_fetch_concurrency default (8): rpull's download is the
 * foreground work the user waits for (ctr pulls such a layer over one connection, capped per connection by
 * most CDNs), while the daemon's whole-blob fetches run in the background beside on-demand reads. The
 * client's connection pool (16 per origin) bounds the total across layers downloaded at once.
 */
export const DEFAULT_DOWNLOAD_CONCURRENCY = 16;
/** Prepare attempts when AlreadyExists is answered but the chainID is not there yet (the unpacker's 3). */
const PREPARE_ATTEMPTS = 3;
/** Key Stat-ed before the pull to check that the snapshotter exists and answers (it never exists). */
const PREFLIGHT_SNAPSHOT_KEY = 'stargaze-rpull-preflight';
/** Largest config blob read into memory. */
const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

export type LayerOutcome = 'lazy' | 'fetched' | 'present';

export type PullEvent =
  | { type: 'resolved'; name: string; target: Descriptor; manifest: Descriptor; platform: string | undefined; layers: number }
  | { type: 'layer-start'; index: number; digest: string; size: number }
  | { type: 'layer-progress'; index: number; digest: string; bytes: number; size: number }
  | { type: 'layer-done'; index: number; digest: string; outcome: LayerOutcome; bytes: number; ms: number };

export interface PullOptions {
  /** A client without a lease; the pull makes its own. */
  client: ContainerdClient;
  registry: RegistryClient;
  /** Image reference; stored normalised (`host/repo:tag`). */
  ref: string;
  snapshotter: string;
  platform: Platform;
  /** Value of the stargz.prefetch label. */
  prefetchBytes: number;
  /** Range requests in flight per downloaded layer (default DEFAULT_DOWNLOAD_CONCURRENCY). */
  downloadConcurrency?: number;
  log: Logger;
  signal?: AbortSignal;
  onEvent?: (e: PullEvent) => void;
  /**
   * resolveManifest(registry, ref, platform) started by the caller, so that its round trips overlap with
   * what comes before the pull (rpull loads the gRPC client and connects meanwhile).
   */
  resolved?: Promise<ResolvedManifest>;
}

export interface LayerResult {
  digest: string;
  chainId: string;
  outcome: LayerOutcome;
  /** Bytes downloaded for this layer (0 when lazy, present, or already in the content store). */
  bytes: number;
  ms: number;
}

export interface PullResult {
  /** Image record name. */
  name: string;
  /** Image record target: the index, or the manifest when the reference named one. */
  target: Descriptor;
  manifest: Descriptor;
  /** The platform picked from the index (`os/arch[/variant]`); undefined when the reference named a manifest. */
  platform: string | undefined;
  /** chainID of the whole rootfs. */
  chainId: string;
  layers: LayerResult[];
  ms: number;
}

/** rootfs.uniquePart: nanoseconds of now plus 3 random bytes, base64url. */
export function uniquePart(): string {
  const ns = Number(process.hrtime.bigint() % 1_000_000_000n);
  return `${ns}-${randomBytes(3).toString('base64url')}`;
}

/** snapshots.UnpackKeyFormat: `extract-<unique> <chainID>`. */
export function unpackKey(chainId: string): string {
  return `extract-${uniquePart()} ${chainId}`;
}

/**
 * Prepare labels for layer `i` (stargz AppendDefaultLabelsHandlerWrapper + snapshots.FilterInheritedLabels):
 * the layer's `containerd.io/snapshot/*` annotations (the TOC digest among them), the stargz.* source labels,
 * and the target chainID.
 */
export function layerLabels(
  ref: string,
  layers: readonly Descriptor[],
  i: number,
  chainId: string,
  prefetchBytes: number,
  manifestDigest?: string,
): Record<string, string> {
  const desc = layers[i] as Descriptor;
  const labels: Record<string, string> = {};
  for (const [k, v] of Object.entries(desc.annotations ?? {})) {
    if (k.startsWith(INHERITED_SNAPSHOT_LABEL_PREFIX)) labels[k] = v;
  }
  labels[STARGZ_REFERENCE] = ref;
  labels[STARGZ_DIGEST] = desc.digest;
  // This and the following layers, as many as fit the label size limit (skipping only costs prefetch).
  labels[STARGZ_LAYERS] = layersLabel(STARGZ_LAYERS, layers.map((l) => l.digest), i);
  labels[STARGZ_PREFETCH] = String(prefetchBytes);
  if (desc.urls !== undefined && desc.urls.length > 0) labels[REMOTE_URLS] = desc.urls.join(',');
  // Where the mount looks for a prefetch profile pushed for this image (stargaze profile push).
  if (manifestDigest !== undefined) labels[STARGAZE_MANIFEST_DIGEST] = manifestDigest;
  labels[TARGET_SNAPSHOT_REF] = chainId;
  return labels;
}

/** Errors of snapshot calls that mean "no such snapshotter" or "snapshotter not answering", said plainly. */
function snapshotterError(err: unknown, sn: SnapshotsService, address: string): unknown {
  if (!(err instanceof ContainerdError)) return err;
  if (err.grpcCode === GrpcStatus.INVALID_ARGUMENT && err.details.includes('snapshotter not loaded')) {
    return new SnapshotterNotConfiguredError(sn.snapshotter, address, err.details);
  }
  if (err.grpcCode === GrpcStatus.UNAVAILABLE && /dial|connection error|transport/i.test(err.details)) {
    return new SnapshotterUnavailableError(sn.snapshotter, err.details);
  }
  return err;
}

function leaseExpiry(now: number): string {
  // RFC 3339 without fractional seconds, as Go's time.RFC3339 formats it.
  return new Date(now + LEASE_EXPIRE_MS).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

async function readAll(body: AsyncIterable<Buffer>, limit: number, what: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of body) {
    total += chunk.length;
    if (total > limit) throw new RegistryError(`${what}: more than ${limit} bytes`);
    chunks.push(chunk);
  }
  return chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, total);
}

export async function pullImage(opts: PullOptions): Promise<PullResult> {
  const started = Date.now();
  const reference = parseReference(opts.ref);
  const name = reference.toString();
  const { client } = opts;
  const log = opts.log.child({ image: name });

  // Cancels background layer downloads when the pull fails, and fetch-aheads nobody needed when it is done.
  const abort = new AbortController();
  setMaxListeners(0, abort.signal); // a listener per download waiting for a slot: an image may have more than ten
  const onCallerAbort = (): void => abort.abort(opts.signal?.reason);
  opts.signal?.addEventListener('abort', onCallerAbort, { once: true });
  const leaseId = `stargaze-rpull-${uniquePart()}`;
  const pull = new Pull(opts, client.withLease(leaseId), reference, name, abort.signal, log);
  // The registry round trips (manifest, config) and containerd's checks need nothing of each other: they run
  // together. Only reads happen before the lease exists; containerd's errors are reported first.
  const resolving = pull.resolveImage();
  resolving.catch(() => undefined); // awaited below, and in `finally` when containerd failed first
  let leased = false;
  try {
    // containerd creates a namespace on first use; creating it explicitly also proves containerd answers.
    if ((await client.namespaces.get(client.namespace)) === undefined) {
      await client.namespaces.create(client.namespace).catch((err: unknown) => {
        if (!isAlreadyExists(err)) throw err;
      });
    }
    // Fail early, before any download, when the snapshotter is missing or not answering.
    const sn = client.snapshots(opts.snapshotter);
    await sn.stat(PREFLIGHT_SNAPSHOT_KEY).catch((err: unknown) => Promise.reject(snapshotterError(err, sn, client.address)));
    await client.leases.create(leaseId, { [GC_EXPIRE]: leaseExpiry(Date.now()) });
    leased = true;
    log.debug({ lease: leaseId, ms: Date.now() - started }, 'lease created');
    const result = await pull.run(await resolving);
    return { ...result, ms: Date.now() - started };
  } catch (err) {
    abort.abort(err);
    throw err;
  } finally {
    opts.signal?.removeEventListener('abort', onCallerAbort);
    abort.abort(new StargazeError('ERR_INTERNAL', 'pull finished'));
    // After an early failure the resolve may still be running: the abort stops it, and nothing of this pull
    // (a config download, a content store read) may run on after it returns.
    await resolving.catch(() => undefined);
    await pull.settle();
    if (leased) {
      await client.leases.delete(leaseId).catch((err: unknown) => log.warn({ lease: leaseId, err: errorMessage(err) }, 'could not delete lease'));
    }
  }
}

/** The image as the registry describes it: what Pull.run needs. */
interface ResolvedImage extends ResolvedManifest {
  config: Fetched<undefined>;
}

/** One pull's state; see the file comment for the steps. */
class Pull {
  private readonly emit: (e: PullEvent) => void;
  /** Layer downloads, MAX_CONCURRENT_DOWNLOADS at once, first come first served. */
  private readonly downloads = new Limiter(MAX_CONCURRENT_DOWNLOADS);
  /** Layer index -> download into the content store (bytes downloaded), started at most once. */
  private readonly fetches = new Map<number, Promise<number>>();
  private layers: readonly Descriptor[] = [];
  /** The platform manifest's digest, passed to the snapshotter so its mounts can find a pushed prefetch profile. */
  private manifestDigest: string | undefined;

  constructor(
    private readonly opts: PullOptions,
    /** The client under the pull's lease. */
    private readonly c: ContainerdClient,
    private readonly reference: ImageReference,
    private readonly name: string,
    private readonly signal: AbortSignal,
    private readonly log: Logger,
  ) {
    this.emit = opts.onEvent ?? (() => undefined);
  }

  /** Waits for background downloads to finish (or fail) so nothing runs after the lease is gone. */
  async settle(): Promise<void> {
    await Promise.allSettled(this.fetches.values());
  }

  /** Manifest (via the index) and config: registry reads, plus a content store read when the config is there. */
  async resolveImage(): Promise<ResolvedImage> {
    const started = Date.now();
    // The caller's resolve (opts.resolved) is not ours to stop: an aborted pull just stops waiting for it.
    const resolved = await abortable(this.opts.resolved ?? resolveManifest(this.opts.registry, this.name, this.opts.platform, this.signal), this.signal);
    const config = await this.fetchConfig(resolved.manifest.doc);
    this.log.debug({ ms: Date.now() - started }, 'manifest and config fetched');
    return { ...resolved, config };
  }

  async run(image: ResolvedImage): Promise<Omit<PullResult, 'ms'>> {
    const { target, index, manifest, platform, config } = image;
    const diffIds = parseConfig(config.body, `config ${config.desc.digest} of ${this.name}`).rootfs.diff_ids;
    const layers = manifest.doc.layers;
    if (layers.length !== diffIds.length) {
      throw new UnsupportedImageError(`${this.name}: manifest has ${layers.length} layers but the config lists ${diffIds.length} diff_ids`);
    }
    for (const l of layers) {
      if (!isLayerType(l.mediaType)) throw new UnsupportedImageError(`${this.name}: layer ${l.digest} has media type "${l.mediaType}", not a layer type`);
    }
    this.layers = layers;
    this.manifestDigest = manifest.desc.digest;
    this.emit({ type: 'resolved', name: this.name, target: target.desc, manifest: manifest.desc, platform, layers: layers.length });

    const chain = chainIds(diffIds);
    await this.downloadEarly(chain);

    // Top-down, as containerd's handlers: index, manifest, config. The layers do not need them (the lease keeps
    // everything from the garbage collector meanwhile), so they are unpacked at the same time.
    const storing = (async () => {
      if (index !== undefined) await this.storeBlob('index', index.desc, index.body, childrenGcLabels(index.doc.manifests));
      await this.storeBlob('manifest', manifest.desc, manifest.body, childrenGcLabels([manifest.doc.config, ...layers]));
      await this.storeBlob('config', config.desc, config.body, {});
    })();
    storing.catch(() => undefined); // awaited below
    const results: LayerResult[] = [];
    try {
      for (let i = 0; i < layers.length; i++) results.push(await this.unpackLayer(i, chain, diffIds));
    } finally {
      await storing.catch(() => undefined); // nothing of this pull runs on after it returns
    }
    await storing;
    const top = chain[chain.length - 1] ?? '';
    if (top !== '') await this.c.content.updateLabels(config.desc.digest, { [`${GC_REF_SNAPSHOT_PREFIX}${this.opts.snapshotter}`]: top });
    await this.createImage(target.desc);
    return { name: this.name, target: target.desc, manifest: manifest.desc, platform, chainId: top, layers: results };
  }

  // --- resolve -------------------------------------------------------------------------------------------

  private async fetchConfig(manifest: ImageManifest): Promise<Fetched<undefined>> {
    const desc = manifest.config;
    const what = `config ${desc.digest} of ${this.name}`;
    if (!isConfigType(desc.mediaType)) throw new UnsupportedImageError(`${what}: media type "${desc.mediaType}" is not an image config`);
    if (desc.size > MAX_CONFIG_BYTES) throw new UnsupportedImageError(`${what}: ${desc.size} bytes is more than the ${MAX_CONFIG_BYTES} allowed`);
    // A pull of an image we have is served from the content store: no download at all.
    // The client without the lease: this runs before the lease is created (and reads need none).
    const content = this.opts.client.content;
    const body =
      (await content.info(desc.digest)) !== undefined
        ? await content.read(desc.digest, desc.size)
        : await readAll((await this.opts.registry.fetchBlob(this.name, desc.digest, this.signal)).body, desc.size, what);
    if (body.length !== desc.size) throw new RegistryError(`${what}: got ${body.length} bytes, the manifest says ${desc.size}`);
    return { desc: { mediaType: desc.mediaType, digest: desc.digest, size: desc.size }, body, doc: undefined };
  }

  // --- content -------------------------------------------------------------------------------------------

  /** Labels for a blob: `labels` plus this repository merged into its distribution source label. */
  private withSource(labels: Record<string, string>, existing: Record<string, string> | undefined): Record<string, string> {
    const out = { ...labels };
    const key = distributionSourceKey(this.reference.domain);
    const value = appendDistributionSource(existing?.[key], this.reference.repository);
    // containerd skips the label rather than fail when the list outgrows the label size limit.
    if (labelFits(key, value)) out[key] = value;
    return out;
  }

  /**
   * Makes sure the content store has the blob: writes it from `open` unless it is there already, one
   * stargaze process at a time per blob (the others wait on a host lock and find it present). Resolves with
   * the bytes written by this call.
   */
  private async ensureBlob(kind: string, desc: Descriptor, open: ContentSource, onProgress?: (bytes: number) => void): Promise<number> {
    const content = this.c.content;
    const present = async (): Promise<boolean> => (await content.info(desc.digest)) !== undefined;
    if (await present()) return 0;
    const release = await acquireHostLock(`content ${this.c.address} ${this.c.namespace} ${desc.digest}`, { signal: this.signal, satisfied: present });
    if (release === undefined) return 0;
    try {
      if (await present()) return 0;
      const res = await content.write(`${kind}-${desc.digest}`, { mediaType: desc.mediaType, digest: desc.digest, size: desc.size }, open, {
        signal: this.signal,
        onProgress,
      });
      return res.written;
    } finally {
      await release();
    }
  }

  /** Sets `labels` plus the distribution source on a blob in the content store. */
  private async labelBlob(digest: string, labels: Record<string, string>): Promise<void> {
    const info = await this.c.content.info(digest);
    await this.c.content.updateLabels(digest, this.withSource(labels, info?.labels));
  }

  /** Puts a small blob (index, manifest, config) into the content store and sets its labels. */
  private async storeBlob(kind: string, desc: Descriptor, body: Buffer, labels: Record<string, string>): Promise<void> {
    await this.ensureBlob(kind, desc, () => [body]);
    await this.labelBlob(desc.digest, labels);
  }

  /** Starts (once) downloading layer `i` into the content store; resolves with the bytes downloaded. */
  private fetchLayer(i: number): Promise<number> {
    let p = this.fetches.get(i);
    if (p === undefined) {
      // A download still waiting for a slot gives up when the pull fails (or is done).
      p = this.downloads.run(() => this.downloadLayer(i), { signal: this.signal });
      p.catch(() => undefined); // awaited (and reported) by whoever needs the layer
      this.fetches.set(i, p);
    }
    return p;
  }

  /** Layer `i` into the content store; resolves with the bytes received from the registry. */
  private async downloadLayer(i: number): Promise<number> {
    const desc = this.layers[i] as Descriptor;
    if (this.signal.aborted) throw this.signal.reason;
    let received = 0;
    const open = async (): Promise<AsyncIterable<Buffer>> => {
      // Concurrent range requests, in order, digest-checked: far faster than one connection where each
      // connection is throttled (the norm for registries behind CDNs).
      const concurrency = this.opts.downloadConcurrency ?? DEFAULT_DOWNLOAD_CONCURRENCY;
      // No digest check here: the content store checks it at commit (`expected`), and a blob that fails it is
      // never committed, so hashing here too would only cost a second pass over the layer.
      const body = (await this.opts.registry.fetchBlobParallel(this.name, desc.digest, { concurrency, verifyDigest: false, signal: this.signal }))
        .body as AsyncIterable<Buffer>;
      return (async function* counted() {
        for await (const chunk of body) {
          received += chunk.length;
          yield chunk;
        }
      })();
    };
    const started = Date.now();
    await this.ensureBlob('layer', desc, open, (bytes) => this.emit({ type: 'layer-progress', index: i, digest: desc.digest, bytes, size: desc.size }));
    this.log.debug({ layer: desc.digest, bytes: received, ms: Date.now() - started }, 'layer downloaded into the content store');
    return received;
  }

  /**
   * Once layer `i` had to be fetched, fetch ahead the following layers that will have to be too: those
   * without a TOC digest (not lazily mountable), or all of them when even an eStargz layer was not mounted
   * lazily (the snapshotter is not a lazy one).
   */
  private fetchAhead(i: number): void {
    const eStargz = (d: Descriptor): boolean => d.annotations?.[TOC_DIGEST] !== undefined;
    const snapshotterIsLazy = !eStargz(this.layers[i] as Descriptor);
    for (let j = i + 1; j < this.layers.length; j++) {
      if (!snapshotterIsLazy || !eStargz(this.layers[j] as Descriptor)) void this.fetchLayer(j);
    }
  }

  /**
   * Starts downloading, right away, the layers that will need it for sure: those without a TOC digest (never
   * mounted lazily) above the highest chainID the snapshotter already has. Their downloads then run while the
   * index, manifest and config are stored and the lower layers are prepared, instead of after.
   */
  private async downloadEarly(chain: readonly string[]): Promise<void> {
    const sn = this.c.snapshots(this.opts.snapshotter);
    const present = await Promise.all(chain.map(async (id) => (await sn.stat(id).catch(() => undefined)) !== undefined));
    const firstMissing = present.lastIndexOf(true) + 1;
    for (let i = firstMissing; i < this.layers.length; i++) {
      if ((this.layers[i] as Descriptor).annotations?.[TOC_DIGEST] === undefined) void this.fetchLayer(i);
    }
  }

  // --- snapshots -----------------------------------------------------------------------------------------

  private async unpackLayer(i: number, chain: readonly string[], diffIds: readonly string[]): Promise<LayerResult> {
    const started = Date.now();
    const desc = this.layers[i] as Descriptor;
    const chainId = chain[i] as string;
    const parent = i > 0 ? (chain[i - 1] as string) : '';
    const sn = this.c.snapshots(this.opts.snapshotter);
    const done = (outcome: LayerOutcome, bytes: number): LayerResult => {
      const ms = Date.now() - started;
      this.emit({ type: 'layer-done', index: i, digest: desc.digest, outcome, bytes, ms });
      this.log.debug({ layer: desc.digest, chainId, outcome, bytes, ms }, 'layer unpacked');
      return { digest: desc.digest, chainId, outcome, bytes, ms };
    };
    this.emit({ type: 'layer-start', index: i, digest: desc.digest, size: desc.size });

    if ((await sn.stat(chainId)) !== undefined) return done('present', 0);
    // One pull at a time unpacks a chainID (per containerd, namespace and snapshotter); the others wait, then
    // find it present. Without this, concurrent pulls of one image would each have the snapshotter mount (or
    // would each download and apply) every layer.
    const release = await acquireHostLock(`unpack ${this.c.address} ${this.c.namespace} ${this.opts.snapshotter} ${chainId}`, {
      signal: this.signal,
      onWait: () => this.log.debug({ layer: desc.digest, chainId }, 'another pull is unpacking this layer; waiting'),
      satisfied: async () => (await sn.stat(chainId)) !== undefined,
    });
    if (release === undefined) return done('present', 0);
    try {
      if ((await sn.stat(chainId)) !== undefined) return done('present', 0);
      const outcome = await this.prepareAndApply(i, sn, chainId, parent, diffIds[i] as string);
      return done(outcome.lazy ? 'lazy' : 'fetched', outcome.bytes);
    } finally {
      await release();
    }
  }

  /** Prepare; then either the snapshotter mounted the layer remotely, or we fetch, apply and commit it. */
  private async prepareAndApply(i: number, sn: SnapshotsService, chainId: string, parent: string, diffId: string): Promise<{ lazy: boolean; bytes: number }> {
    const desc = this.layers[i] as Descriptor;
    const snErr = (err: unknown): unknown => snapshotterError(err, sn, this.c.address);
    const labels = layerLabels(this.name, this.layers, i, chainId, this.opts.prefetchBytes, this.manifestDigest);
    let key = '';
    let mounts: Mount[] | undefined;
    for (let attempt = 1; attempt <= PREPARE_ATTEMPTS && mounts === undefined; attempt++) {
      key = unpackKey(chainId);
      try {
        mounts = await sn.prepare(key, parent, labels);
      } catch (err) {
        if (!isAlreadyExists(err)) throw snErr(err);
        // The snapshotter committed the layer itself: a remote snapshot.
        if ((await sn.stat(chainId)) !== undefined) {
          this.log.debug({ layer: desc.digest, chainId, key }, 'remote snapshot prepared');
          return { lazy: true, bytes: 0 };
        }
        this.log.debug({ layer: desc.digest, chainId, key }, 'extraction snapshot exists but the chainID does not; trying again');
      }
    }
    if (mounts === undefined) throw new StargazeError('ERR_INTERNAL', `could not prepare a snapshot for layer ${desc.digest} (chainID ${chainId}) after ${PREPARE_ATTEMPTS} attempts`);

    // A normal snapshot: download, apply, commit.
    let bytes: number;
    try {
      const download = this.fetchLayer(i);
      this.fetchAhead(i);
      const waitStart = Date.now();
      bytes = await download;
      const applyStart = Date.now();
      const applied = await this.c.diff.apply({ mediaType: desc.mediaType, digest: desc.digest, size: desc.size, annotations: desc.annotations }, mounts, this.signal);
      // Where a fetched layer's time goes: waiting for its download, then containerd's apply (decompress + untar).
      this.log.debug({ layer: desc.digest, bytes, waitMs: applyStart - waitStart, applyMs: Date.now() - applyStart }, 'layer applied');
      if (applied.digest !== diffId) {
        throw new UnsupportedImageError(`layer ${desc.digest} of ${this.name}: applying it gave diffID ${applied.digest}, the config says ${diffId}`);
      }
      try {
        await sn.commit(chainId, key, labels);
      } catch (err) {
        if (!isAlreadyExists(err)) throw err;
        // Someone committed the same chainID first (another client not using our lock): ours is redundant.
        await sn.remove(key).catch(() => undefined);
      }
    } catch (err) {
      await sn.remove(key).catch((rmErr: unknown) => this.log.warn({ key, err: errorMessage(rmErr) }, 'could not remove the extraction snapshot'));
      throw snErr(err);
    }
    // The diffID is verified now: record it, as the unpacker does.
    await this.labelBlob(desc.digest, { [UNCOMPRESSED]: diffId });
    return { lazy: false, bytes };
  }

  // --- image ---------------------------------------------------------------------------------------------

  /** client.createNewImage: Create, or Update when the name exists (Create again if it vanished meanwhile). */
  private async createImage(target: Descriptor): Promise<void> {
    const image = { name: this.name, labels: {}, target: { mediaType: target.mediaType, digest: target.digest, size: target.size } };
    for (;;) {
      try {
        await this.c.images.create(image);
        return;
      } catch (err) {
        if (!isAlreadyExists(err)) throw err;
      }
      try {
        await this.c.images.update(image);
        return;
      } catch (err) {
        if (!(err instanceof ContainerdError && err.grpcCode === GrpcStatus.NOT_FOUND)) throw err;
      }
    }
  }
}
