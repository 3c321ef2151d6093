/**
 * The conversion pipeline behind `stargaze convert`: image in, eStargz image out.
 *
 * Per layer: source blob stream -> digest check -> gunzip (per media type) -> TarGuard (hostile entries,
 * source diff_id) -> writeEstargz -> temp file -> store at the destination (skipped when it has the blob).
 * With `zstdChunked`, the eStargz file is written with gzip level 0 and transcoded to zstd:chunked
 * (zstd-chunked.ts) before it is stored.
 * A layer is never held in memory: the writer spools payloads to disk and its output goes to a file, whose
 * digest the writer computed on the way. Layers run in parallel up to `concurrency`; the same source layer
 * in several manifests is converted once.
 *
 * Then the config (new diff_ids, OCI media type), child manifests by digest, and the top-level manifest or
 * index under the destination tag last: if anything fails before, DST's tag is untouched.
 */
import { setMaxListeners } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import { createWriteStream } from 'node:fs';
import { createHash } from 'node:crypto';
import { availableParallelism, tmpdir } from 'node:os';
import path from 'node:path';
import { addAbortSignal, pipeline, Transform, type Readable, type TransformCallback } from 'node:stream';
import { pipeline as pipelinePromise } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { writeEstargz, type EstargzWriteResult } from '../estargz/writer';
import { InvalidArgumentError, NotFoundError, StargazeError, errorCode, errorMessage, type ErrorCode } from '../errors';
import {
  ANNOTATION_DOCKER_REFERENCE_TYPE,
  ANNOTATION_TOC_DIGEST,
  ANNOTATION_UNCOMPRESSED_SIZE,
  ANNOTATION_ZSTD_CHUNKED_MANIFEST_CHECKSUM,
  ANNOTATION_ZSTD_CHUNKED_MANIFEST_POSITION,
  MEDIA_TYPE_OCI_CONFIG,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_LAYER_GZIP,
  MEDIA_TYPE_OCI_LAYER_ZSTD,
  MEDIA_TYPE_OCI_MANIFEST,
  carriedLayerAnnotations,
  isManifestMediaType,
  isNonDistributable,
  layerCompression,
  parseConfig,
  parseManifest,
  toOciMediaType,
  type Descriptor,
  type ImageIndex,
  type ImageManifest,
} from './media-types';
import { formatPlatform, hostPlatform, platformMatches, type PlatformSpec } from './platform';
import { QuietProgress, type ConvertProgress } from './progress';
import { MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, type ImageSink, type ImageSource } from './store';
import { TarEntryError, TarGuard } from './tar-guard';
import { DEFAULT_ZSTD_COMPRESSION_LEVEL, transcodeToZstdChunked, type ZstdChunkedResult } from './zstd-chunked';
import { Limiter } from '../task/limiter';

const TMP_PREFIX = 'stargaze-convert-';

export interface ConvertOptions {
  /** Platforms to take from an index; empty: the host's. Ignored for a single-manifest source. */
  platforms?: PlatformSpec[];
  /** Keep every platform of an index (the output is an index). */
  allPlatforms?: boolean;
  chunkSizeBytes?: number;
  /** gzip level 0-9 (default 9), or with zstdChunked the zstd level 1-22 (default 3). */
  compressionLevel?: number;
  /** Write zstd:chunked layers instead of eStargz (gzip). */
  zstdChunked?: boolean;
  /** Files to put first in every layer (reference `--estargz-record-in` semantics, one list for all layers). */
  prioritizedFiles?: readonly string[];
  /** Layers converted at once; default the CPU count. */
  concurrency?: number;
  /** Parent of the scratch dir; default the OS temp dir. */
  tmpDir?: string;
  progress?: ConvertProgress;
  signal?: AbortSignal;
}

export interface ConvertResult {
  /** The top-level manifest or index stored under DST's tag. */
  descriptor: Descriptor;
  layers: ConvertedLayer[];
  /** How many layer/config blobs were uploaded (the rest were present). */
  blobsPushed: number;
  blobsSkipped: number;
}

export interface ConvertedLayer {
  source: Descriptor;
  target: Descriptor;
  diffId: string;
  tocDigest: string | undefined;
}

/** A failure while converting one layer; the message names the layer (and the tar entry when known). */
export class LayerConversionError extends StargazeError {
  constructor(
    readonly layer: string,
    message: string,
    code: ErrorCode,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

const KNOWN_CODES = new Set<string>([
  'ERR_SNAP_NOT_FOUND',
  'ERR_SNAP_INVALID_ARGUMENT',
  'ERR_ESTARGZ_FORMAT',
  'ERR_ESTARGZ_VERIFY',
  'ERR_REGISTRY',
  'ERR_REGISTRY_AUTH',
]);

export async function convertImage(src: ImageSource, dst: ImageSink, opts: ConvertOptions = {}): Promise<ConvertResult> {
  const run = new Conversion(src, dst, opts);
  await run.init();
  try {
    return await run.convert();
  } finally {
    await run.dispose();
  }
}

class Conversion {
  private readonly progress: ConvertProgress;
  /** Aborted on the first layer failure, so the others stop reading. */
  private readonly abort = new AbortController();
  private readonly signal: AbortSignal;
  private tmp = '';
  /** Source layer digest -> its conversion, shared by every manifest that has it. */
  private readonly layers = new Map<string, Promise<ConvertedLayer>>();
  /** Layers converting, `concurrency` at once, first come first served. */
  private readonly slots: Limiter;
  private pushed = 0;
  private skipped = 0;

  constructor(
    private readonly src: ImageSource,
    private readonly dst: ImageSink,
    private readonly opts: ConvertOptions,
  ) {
    this.progress = opts.progress ?? new QuietProgress();
    // Rounded up: a fractional `concurrency` always let that many layers start (`running < concurrency`).
    this.slots = new Limiter(Math.max(1, Math.ceil(opts.concurrency ?? availableParallelism())));
    this.signal = opts.signal === undefined ? this.abort.signal : AbortSignal.any([opts.signal, this.abort.signal]);
    setMaxListeners(0, this.signal); // a listener per layer waiting for a slot: an image may have more than ten
  }

  async init(): Promise<void> {
    this.tmp = await mkdtemp(path.join(this.opts.tmpDir ?? tmpdir(), TMP_PREFIX));
  }

  async dispose(): Promise<void> {
    if (this.tmp !== '') await rm(this.tmp, { recursive: true, force: true });
  }

  async convert(): Promise<ConvertResult> {
    const root = await this.src.root(this.signal);
    const parsed = parseManifest(root.body, root.mediaType, `${this.src.name}: manifest ${root.digest}`);
    let top: { desc: Descriptor; body: Buffer };
    if (parsed.kind === 'manifest') {
      top = await this.convertManifest(parsed.manifest, { mediaType: root.mediaType, digest: root.digest, size: root.body.length });
    } else {
      const selected = this.select(parsed.index);
      const children = await this.all(selected.map((d) => this.convertChild(d)));
      if (selected.length === 1 && this.opts.allPlatforms !== true) {
        top = children[0] as { desc: Descriptor; body: Buffer };
      } else {
        for (const c of children) await this.dst.putManifest(c.desc, c.body, this.signal);
        const index: ImageIndex = {
          schemaVersion: 2,
          mediaType: MEDIA_TYPE_OCI_INDEX,
          manifests: children.map((c) => c.desc),
          ...(parsed.index.annotations !== undefined ? { annotations: parsed.index.annotations } : {}),
        };
        const body = Buffer.from(JSON.stringify(index));
        top = { desc: { mediaType: MEDIA_TYPE_OCI_INDEX, digest: sha256(body), size: body.length }, body };
      }
    }
    const { platform: _platform, ...bare } = top.desc;
    await this.dst.tag(bare, top.body, this.signal);
    this.progress.note(`${this.dst.name}: ${bare.mediaType === MEDIA_TYPE_OCI_INDEX ? 'index' : 'manifest'} ${bare.digest}`);
    return { descriptor: bare, layers: await Promise.all(this.layers.values()), blobsPushed: this.pushed, blobsSkipped: this.skipped };
  }

  /** The index entries to convert: every image manifest with --all-platforms, else those of the wanted platforms. */
  private select(index: ImageIndex): Descriptor[] {
    const images = index.manifests.filter(
      (m) =>
        isManifestMediaType(m.mediaType) &&
        m.annotations?.[ANNOTATION_DOCKER_REFERENCE_TYPE] === undefined &&
        !(m.platform?.os === 'unknown' && m.platform.architecture === 'unknown'),
    );
    if (this.opts.allPlatforms === true) {
      if (images.length === 0) throw new NotFoundError(`${this.src.name}: the index lists no image manifests`);
      return images;
    }
    const wanted = this.opts.platforms !== undefined && this.opts.platforms.length > 0 ? this.opts.platforms : [hostPlatform()];
    const out: Descriptor[] = [];
    for (const want of wanted) {
      const match = images.find((m) => platformMatches(want, m.platform));
      if (match === undefined) {
        const have = images.map((m) => (m.platform !== undefined ? formatPlatform(m.platform) : 'unknown')).join(', ');
        throw new NotFoundError(`${this.src.name} has no manifest for platform ${formatPlatform(want)} (it has: ${have || 'none'}); use --platform or --all-platforms`);
      }
      if (!out.includes(match)) out.push(match);
    }
    return out;
  }

  private async convertChild(desc: Descriptor): Promise<{ desc: Descriptor; body: Buffer }> {
    const body = await this.src.readSmall(desc, MAX_MANIFEST_BYTES, this.signal);
    const parsed = parseManifest(body, desc.mediaType, `${this.src.name}: manifest ${desc.digest}`);
    if (parsed.kind !== 'manifest') throw new InvalidArgumentError(`${this.src.name}: manifest ${desc.digest} is a nested index, which convert does not support`);
    const out = await this.convertManifest(parsed.manifest, desc);
    return { desc: { ...out.desc, ...(desc.platform !== undefined ? { platform: desc.platform } : {}), ...(desc.annotations !== undefined ? { annotations: desc.annotations } : {}) }, body: out.body };
  }

  private async convertManifest(manifest: ImageManifest, self: Descriptor): Promise<{ desc: Descriptor; body: Buffer }> {
    const where = `${this.src.name}: manifest ${self.digest}`;
    const configBody = await this.src.readSmall(manifest.config, MAX_CONFIG_BYTES, this.signal);
    const config = parseConfig(configBody, `${where}: config ${manifest.config.digest}`);
    if (config.rootfs.diff_ids.length !== manifest.layers.length) {
      throw new InvalidArgumentError(`${where}: ${manifest.layers.length} layers but ${config.rootfs.diff_ids.length} diff_ids in the config`);
    }
    const total = manifest.layers.length;
    const converted = await this.all(
      manifest.layers.map((layer, i) => this.layer(layer, config.rootfs.diff_ids[i] as string, `layer ${i + 1}/${total} (${layer.digest})`)),
    );

    const newConfig = { ...config, rootfs: { ...config.rootfs, diff_ids: converted.map((c) => c.diffId) } };
    const newConfigBody = Buffer.from(JSON.stringify(newConfig));
    const configDesc: Descriptor = { mediaType: MEDIA_TYPE_OCI_CONFIG, digest: sha256(newConfigBody), size: newConfigBody.length };
    this.count(await this.dst.putBlob(configDesc, newConfigBody, this.signal));

    const out: ImageManifest = {
      schemaVersion: 2,
      mediaType: MEDIA_TYPE_OCI_MANIFEST,
      config: configDesc,
      layers: converted.map((c) => c.target),
      ...(manifest.annotations !== undefined ? { annotations: manifest.annotations } : {}),
    };
    const body = Buffer.from(JSON.stringify(out));
    return { desc: { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: sha256(body), size: body.length }, body };
  }

  private layer(desc: Descriptor, diffId: string, label: string): Promise<ConvertedLayer> {
    let p = this.layers.get(desc.digest);
    if (p === undefined) {
      // An aborted conversion starts no more layers: a waiting one gives up, one handed a slot checks first.
      p = this.slots.run(
        () => {
          this.signal.throwIfAborted();
          return this.convertLayer(desc, diffId, label);
        },
        { signal: this.signal },
      );
      p.catch(() => this.abort.abort(new Error('another layer failed')));
      this.layers.set(desc.digest, p);
    }
    return p;
  }

  private async convertLayer(desc: Descriptor, diffId: string, label: string): Promise<ConvertedLayer> {
    if (isNonDistributable(desc.mediaType)) {
      // Foreign layers stay where they are (their bytes must not be copied): same blob, OCI media type.
      return { source: desc, target: { ...desc, mediaType: toOciMediaType(desc.mediaType) }, diffId, tocDigest: undefined };
    }
    const compression = layerCompression(desc.mediaType);
    if (compression === undefined) throw new LayerConversionError(desc.digest, `${label}: media type ${desc.mediaType} is not a tar layer`, 'ERR_SNAP_INVALID_ARGUMENT');
    if (compression === 'zstd') {
      throw new LayerConversionError(desc.digest, `${label}: zstd-compressed source layers are not supported yet`, 'ERR_SNAP_INVALID_ARGUMENT');
    }
    const guard = new TarGuard();
    this.progress.layerStart(desc.digest, desc.size);
    const zstd = this.opts.zstdChunked === true;
    let result: EstargzWriteResult;
    let zstdResult: ZstdChunkedResult | undefined;
    const base = path.join(this.tmp, desc.digest.replace(':', '-'));
    // zstd:chunked is transcoded from an eStargz blob written with gzip level 0 (stored blocks: cheap).
    const esgzFile = `${base}.esgz`;
    const file = zstd ? `${base}.zst` : esgzFile;
    try {
      const source = addAbortSignal(this.signal, await this.src.openBlob(desc, this.signal));
      const stages: Array<NodeJS.ReadableStream | NodeJS.ReadWriteStream> = [source, new Counter((n) => this.progress.layerRead(desc.digest, n))];
      if (compression === 'gzip') stages.push(createGunzip());
      stages.push(guard);
      // The callback form returns the last stage; a failure anywhere destroys it with the error, which the
      // writer then reports.
      const input = pipeline(stages as unknown as [Readable, ...NodeJS.ReadWriteStream[]], () => undefined) as unknown as Readable;
      const out = new Counter((n) => this.progress.layerWrite(desc.digest, n));
      const done = pipelinePromise(out, createWriteStream(esgzFile));
      done.catch(() => undefined);
      result = await writeEstargz(input, out, {
        chunkSizeBytes: this.opts.chunkSizeBytes,
        compressionLevel: zstd ? 0 : this.opts.compressionLevel,
        prioritizedFiles: this.opts.prioritizedFiles,
        tmpDir: this.tmp,
      });
      await done;
      if (guard.digest() !== diffId) {
        throw new LayerConversionError(
          desc.digest,
          `${label}: its uncompressed content has digest ${guard.digest()}, but the config's diff_id is ${diffId} (corrupt source)`,
          'ERR_ESTARGZ_VERIFY',
        );
      }
      if (zstd) {
        zstdResult = await transcodeToZstdChunked(esgzFile, file, this.opts.compressionLevel ?? DEFAULT_ZSTD_COMPRESSION_LEVEL);
        await rm(esgzFile, { force: true });
      }
    } catch (err) {
      await rm(file, { force: true });
      await rm(esgzFile, { force: true });
      throw this.layerError(err, desc, label, guard);
    }

    const made = zstdResult ?? result;
    const annotations: Record<string, string> = {
      ...carriedLayerAnnotations(desc.annotations),
      [ANNOTATION_TOC_DIGEST]: made.tocDigest,
      [ANNOTATION_UNCOMPRESSED_SIZE]: String(made.uncompressedSize),
    };
    if (zstdResult !== undefined) {
      annotations[ANNOTATION_ZSTD_CHUNKED_MANIFEST_CHECKSUM] = zstdResult.manifestChecksum;
      annotations[ANNOTATION_ZSTD_CHUNKED_MANIFEST_POSITION] = zstdResult.manifestPosition;
    }
    const target: Descriptor = {
      mediaType: zstd ? MEDIA_TYPE_OCI_LAYER_ZSTD : MEDIA_TYPE_OCI_LAYER_GZIP,
      digest: made.blobDigest,
      size: made.blobSize,
      annotations,
    };
    try {
      const outcome = await this.dst.putBlobFile(target, file, (n) => this.progress.layerUpload(desc.digest, n), this.signal);
      this.count(outcome);
      this.progress.layerDone(desc.digest, { digest: target.digest, size: target.size, outcome });
    } catch (err) {
      throw this.layerError(err, desc, label, undefined);
    } finally {
      await rm(file, { force: true });
    }
    return { source: desc, target, diffId: made.diffId, tocDigest: made.tocDigest };
  }

  private layerError(err: unknown, desc: Descriptor, label: string, guard: TarGuard | undefined): unknown {
    if (err instanceof LayerConversionError) return err;
    if (this.signal.aborted && !(err instanceof StargazeError)) return this.signal.reason ?? err;
    const tarError = findCause(err, (e): e is TarEntryError => e instanceof TarEntryError);
    let message: string;
    if (tarError !== undefined) {
      message = `${label}: ${tarError.message}`;
    } else {
      const near =
        guard === undefined ? '' : guard.currentEntry !== undefined ? ` (last tar entry read: ${JSON.stringify(guard.currentEntry)})` : ' (before the first tar entry)';
      message = `${label}: ${describeFailure(err)}${near}`;
    }
    const code = errorCode(tarError ?? err);
    return new LayerConversionError(desc.digest, message, code !== undefined && KNOWN_CODES.has(code) ? (code as ErrorCode) : 'ERR_ESTARGZ_FORMAT');
  }

  private count(outcome: 'pushed' | 'exists'): void {
    if (outcome === 'pushed') this.pushed++;
    else this.skipped++;
  }

  /** Promise.all that waits for every promise to settle, then throws the first real failure. */
  private async all<T>(ps: Promise<T>[]): Promise<T[]> {
    const settled = await Promise.allSettled(ps);
    const failures = settled.filter((s): s is PromiseRejectedResult => s.status === 'rejected').map((s) => s.reason as unknown);
    if (failures.length > 0) {
      // A layer's own error beats the "another layer failed" aborts it caused elsewhere.
      throw failures.find((f) => f instanceof StargazeError) ?? failures[0];
    }
    return settled.map((s) => (s as PromiseFulfilledResult<T>).value);
  }
}

/** zlib failures said plainly; anything else as its message chain without repeats. */
function describeFailure(err: unknown): string {
  const zlib = findCause(err, (e): e is Error & { code: string } => e instanceof Error && typeof errorCode(e) === 'string' && (errorCode(e) as string).startsWith('Z_'));
  if (zlib !== undefined) {
    return zlib.code === 'Z_BUF_ERROR' ? `the gzip stream is truncated (${zlib.message})` : `the gzip data is corrupt (${zlib.message})`;
  }
  const parts: string[] = [];
  for (const part of errorMessage(err).split(': ')) if (parts[parts.length - 1] !== part) parts.push(part);
  return parts.join(': ');
}

function findCause<T>(err: unknown, is: (e: unknown) => e is T): T | undefined {
  for (let e = err, depth = 0; e !== undefined && e !== null && depth < 8; depth++) {
    if (is(e)) return e;
    e = e instanceof Error ? e.cause : undefined;
  }
  return undefined;
}

function sha256(data: Buffer): string {
  return 'sha256:' + createHash('sha256').update(data).digest('hex');
}

class Counter extends Transform {
  constructor(private readonly onBytes: (n: number) => void) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.onBytes(chunk.length);
    cb(null, chunk);
  }
}

/**
 * Reads a `--prioritized-files` list: one path per line (blank lines and `#` comments ignored), or the JSON
 * lines `{"path": ...}` that `ctr-remote images optimize --record-out` writes.
 */
export function parsePrioritizedFiles(text: string): string[] {
  const out: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    if (line.startsWith('{')) {
      let rec: unknown;
      try {
        rec = JSON.parse(line);
      } catch {
        throw new InvalidArgumentError(`prioritized files: line ${JSON.stringify(line.slice(0, 80))} is not valid JSON`);
      }
      const p = (rec as { path?: unknown } | null)?.path;
      if (typeof p !== 'string' || p === '') throw new InvalidArgumentError(`prioritized files: record ${JSON.stringify(line.slice(0, 80))} has no path`);
      if (!out.includes(p)) out.push(p);
    } else if (!out.includes(line)) {
      out.push(line);
    }
  }
  return out;
}

