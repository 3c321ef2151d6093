/**
 * Registry access over HTTP (undici): resolve a layer blob to a BlobSource that serves byte ranges, and fetch
 * manifests and whole blobs for rpull/convert.
 *
 * Resolving a blob (reference: fs/remote/resolver.go) tries each endpoint from hosts.toml in order, mirrors
 * first, and the first that works wins; errors from all of them are reported together:
 *   1. GET <endpoint>/<repo>/blobs/<digest> with `Range: bytes=0-1` (GET, not HEAD: some registries answer
 *      HEAD 200 without the redirect). A 3xx is followed one hop and its Location becomes the URL all later
 *      range reads go to (registry auth and custom headers are not sent to another origin).
 *   2. The size comes from that probe (Content-Range total on 206, Content-Length on 200) when it can, saving
 *      a round trip; otherwise HEAD on the final URL, then GET bytes=0-1 as the reference does.
 *   resolveBlobTail() probes with a suffix range (`Range: bytes=-N`, after a redirect sent again to its target)
 *   instead: the 206 tells the size and carries the blob's last N bytes (footer and TOC), so a mount needs one
 *   round trip where it needed two (three after a redirect). Any other answer falls back to the steps above.
 * Range reads expect 206 with a matching Content-Range; a 200 (server ignored Range) is read only up to the
 * wanted slice and the rest of the connection is dropped, so a whole blob is never buffered. 403 on a
 * redirected URL (expired pre-signed URL), or 401 from storage on another origin, re-resolves once; 401 from
 * the registry re-authenticates once.
 *
 * Multi-range reads (readRanges) send one GET `Range: bytes=a-b,c-d` and parse multipart/byteranges as a
 * stream; a 400 switches that host to single ranges (as does force_single_range_mode).
 *
 * Retries (retry.ts; [blob] max_retries, min_wait_msec, max_wait_msec): every request is retried on transport
 * errors, 429 and 5xx except 501, with exponential backoff and jitter, honouring Retry-After; a range read
 * whose body breaks off is read again, up to max_retries times too. All of it stays inside the bounds below.
 *
 * Timeouts: `requestTimeoutMs` ([resolver] request_timeout_sec) bounds every small request end to end and is
 * the idle limit (headers, gap between body chunks) of every request; a config mirror's own request_timeout_sec
 * replaces it for the requests to that mirror, in both roles. A range read is bounded end to end by
 * `fetchTimeoutMs` ([blob] fetching_timeout_sec); a whole-blob stream has only the idle limit, because its
 * length is the caller's business. The caller's AbortSignal is honoured everywhere.
 *
 * Error messages name the registry host, the repository and the digest, never credentials, tokens or the full
 * final URL (pre-signed storage URLs carry secrets in their query string).
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { type Readable, Transform, type TransformCallback, pipeline } from 'node:stream';
import type { Dispatcher } from 'undici';
import { Pool } from './undici-dispatchers';
import { secureContextFor } from './trust';
import { RegistryAuthError, RegistryError, StargazeError, errorCode, errorMessage } from '../errors';
import { log as rootLog, type Logger } from '../log';
import { MAX_TOKEN_RESPONSE_BYTES, RegistryAuthorizer, pullScope, type TokenHttp } from './auth';
import type { BlobSource, ByteRange } from './blob-source';
import { ClientCertChoice, certVerdictOfError, certVerdictOfStatus } from './client-certs';
import { DockerConfigKeychain, chainCredentials, type CredentialProvider, type RegistryCredentials } from './credentials';
import type { ConfigMirror } from '../config/config';
import { resolveHosts, type HostCapability, type RegistryEndpoint } from './hosts';
import { boundaryOf, ByteRangesParser } from './multipart-byteranges';
import { parallelOptions, parallelRangeStream, type ParallelFetchOptions } from './parallel-fetch';
import { planRanges, RangeFiller, resultsOf, type MergedRange } from './range-plan';
import { isDockerHub, parseReference, validateDigest, type ImageReference } from './reference';
import { backoffMs, isRetryableStatus, isTransientNetworkError, markTransient, parseRetryAfter, retryPolicy, sleep, type RetryPolicy } from './retry';

/** [resolver] request_timeout_sec default. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
/** [blob] fetching_timeout_sec default. */
export const DEFAULT_FETCH_TIMEOUT_MS = 300_000;
/** Connections kept per origin; FUSE reads of several files of one layer run in parallel. */
export const DEFAULT_CONNECTIONS_PER_ORIGIN = 16;
/** Idle keep-alive sockets are closed after this (undici's default is only 4 s). */
export const KEEP_ALIVE_TIMEOUT_MS = 30_000;
/** containerd's limit for a manifest or index body. */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
/** Redirect hops followed for manifests and whole blobs (range probes follow exactly one, as the reference). */
export const MAX_REDIRECTS = 5;
/** Bytes of an unwanted body (401 page, error JSON) read to keep the connection reusable before dropping it. */
const DRAIN_LIMIT_BYTES = 64 * 1024;
/** setTimeout's limit; longer timeouts are clamped. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** Ranges per multi-range request; more are split over several requests (keeps the Range header small). */
export const MAX_RANGES_PER_REQUEST = 64;

export const MANIFEST_MEDIA_TYPES = [
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
] as const;

export interface RegistryClientOptions {
  /** containerd hosts dir (certs.d layout). Missing or absent: every registry is its own only endpoint. */
  hostsDir?: string;
  /** Directory of docker's config.json; default `$DOCKER_CONFIG` or ~/.docker. */
  dockerConfigDir?: string;
  /** Credentials tried before docker's config.json, e.g. from CRI or tests (may answer asynchronously). */
  credentials?: (
    host: string,
    signal?: AbortSignal,
    repository?: string,
  ) => RegistryCredentials | undefined | Promise<RegistryCredentials | undefined>;
  /** Credentials tried after docker's config.json (the daemon's CRI and kubeconfig keychains). */
  credentialsAfterDockerConfig?: CredentialProvider;
  log?: Logger;
  /** Per-request bound; null or <= 0 disables it (reference: negative request_timeout_sec). Default 30 s. */
  requestTimeoutMs?: number | null;
  /** End-to-end bound of one range read; null or <= 0 disables it. Default 300 s. */
  fetchTimeoutMs?: number | null;
  connectionsPerOrigin?: number;
  /** Retries of transport errors, 429 and 5xx ([blob] max_retries, min_wait_msec, max_wait_msec). */
  retry?: Partial<RetryPolicy>;
  /** Never send multi-range requests ([blob] force_single_range_mode). */
  forceSingleRangeMode?: boolean;
  /** `[[resolver.host."<registry>".mirrors]]` by registry domain; a hosts.toml for the registry wins. */
  configMirrors?: Readonly<Record<string, readonly ConfigMirror[]>>;
  /** Defaults of fetchBlobParallel ([blob] parallel_fetch_concurrency, parallel_fetch_chunk_size). */
  parallelFetch?: { concurrency?: number; chunkBytes?: number };
}

export interface FetchedManifest {
  /** Content-Type the registry served. */
  readonly mediaType: string;
  /** sha256 of the bytes received (equal to the reference's digest when it pins one). */
  readonly digest: string;
  readonly body: Buffer;
}

export interface BlobStream {
  readonly digest: string;
  /** Content-Length, when the server sent one. */
  readonly size: number | undefined;
  /** The blob's bytes; errors at the end if they don't hash to `digest` (sha256 digests). */
  readonly body: Readable;
}

/** Where a resolved blob's bytes are served from. */
interface BlobLocation {
  readonly endpoint: RegistryEndpoint;
  /** `<endpoint>/<repo>/blobs/<digest>` */
  readonly blobUrl: URL;
  /** blobUrl, or where it redirected to. */
  readonly url: URL;
  /** True when `url` is on another origin: no registry auth, no custom headers, default TLS. */
  readonly foreign: boolean;
}

interface SendOptions {
  method: 'GET' | 'HEAD' | 'POST';
  headers: Record<string, string | string[]>;
  body?: string;
  signal: AbortSignal | undefined;
}

/** What a request needs to know of its endpoint besides the URL (an endpoint is one). */
interface TlsSettings {
  skipVerify: boolean;
  caFiles: readonly string[];
  clientCerts: RegistryEndpoint['clientCerts'];
  /** A config mirror's own request bound: > 0 seconds, < 0 none; 0 or absent: the client's. */
  requestTimeoutSec?: number;
}

const DEFAULT_TLS: TlsSettings = { skipVerify: false, caFiles: [], clientCerts: [] };

function firstHeader(res: Dispatcher.ResponseData, name: string): string | undefined {
  const v = res.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function parseNonNegativeInt(s: string | undefined): number | undefined {
  if (s === undefined || !/^\d+$/.test(s.trim())) return undefined;
  const n = Number(s.trim());
  return Number.isSafeInteger(n) ? n : undefined;
}

/** `bytes a-b/total` (total may be `*`). */
function parseContentRange(s: string | undefined): { start: number; end: number; total: number | undefined } | undefined {
  if (s === undefined) return undefined;
  const m = /^bytes\s+(\d+)-(\d+)\/(\d+|\*)$/i.exec(s.trim());
  if (m === null) return undefined;
  const start = Number(m[1]);
  const end = Number(m[2]);
  const total = m[3] === '*' ? undefined : Number(m[3]);
  // A hostile or broken server's numbers never become sizes or offsets: past 2^53 they are not exact.
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start > end) return undefined;
  if (total !== undefined && (!Number.isSafeInteger(total) || end >= total)) return undefined;
  return { start, end, total };
}

/** Bytes [offset, offset + data.length) of a blob, its end. */
export interface BlobTailBytes {
  offset: number;
  data: Buffer;
}

export interface ResolvedBlobTail {
  source: BlobSource;
  tail: BlobTailBytes | undefined;
}

/**
 * A 206 answer to `Range: bytes=-N`: the size from its Content-Range total, and its bytes when they are the
 * blob's end and no more than N. A Content-Range that says otherwise, or a body that breaks off, costs only
 * the tail (the range reads fetch it again); no total at all leaves the size to sizeAt.
 */
async function readSuffixProbe(res: Dispatcher.ResponseData, tailBytes: number): Promise<{ size: number | undefined; tail?: BlobTailBytes }> {
  const range = parseContentRange(firstHeader(res, 'content-range'));
  const size = range?.total;
  if (range === undefined || size === undefined || range.end !== size - 1 || range.start > range.end || range.end - range.start + 1 > tailBytes) {
    await discard(res);
    return { size };
  }
  const length = range.end - range.start + 1;
  try {
    const data = await readLimited(res, length, 'tail', '');
    return data.length === length ? { size, tail: { offset: range.start, data } } : { size };
  } catch {
    res.body.destroy();
    return { size };
  }
}

/** Best effort: read a little of an unwanted body so the socket can be reused, else drop it. */
async function discard(res: Dispatcher.ResponseData): Promise<void> {
  try {
    await res.body.dump({ limit: DRAIN_LIMIT_BYTES });
  } catch {
    // The connection is gone either way; nothing to report.
  }
}

/** undefined -> default; null, 0 or negative -> no timeout. */
function timeoutOption(v: number | null | undefined, dflt: number): number | null {
  if (v === undefined) return dflt;
  return v === null || !(v > 0) ? null : v;
}

/** A function, not an inline check, so TypeScript does not narrow `aborted` across awaits. */
function isAborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

function isRedirect(status: number): boolean {
  return status === 301 || status === 302 || status === 303 || status === 307 || status === 308;
}

/**
 * An AbortSignal that fires when the caller aborts or `ms` passes, whichever is first. Built by hand rather
 * than with AbortSignal.any so nothing stays attached to a long-lived caller signal after dispose().
 */
class Deadline {
  readonly signal: AbortSignal;
  private readonly controller = new AbortController();
  private readonly timer: NodeJS.Timeout | undefined;
  private readonly onParentAbort: () => void;
  timedOut = false;

  constructor(
    private readonly parent: AbortSignal | undefined,
    readonly ms: number | null,
  ) {
    this.signal = this.controller.signal;
    this.onParentAbort = () => this.controller.abort(parent?.reason);
    if (parent?.aborted === true) {
      this.controller.abort(parent.reason);
    } else {
      parent?.addEventListener('abort', this.onParentAbort, { once: true });
    }
    if (ms !== null && !this.signal.aborted) {
      this.timer = setTimeout(() => {
        this.timedOut = true;
        this.controller.abort(new RegistryError(`timed out after ${ms} ms`));
      }, Math.min(ms, MAX_TIMER_MS));
    }
  }

  /** What to throw for `err`: the caller's abort reason, our own timeout as a RegistryError about `what`, or `err`. */
  error(err: unknown, what: string): unknown {
    if (this.parent?.aborted === true) return this.parent.reason ?? err;
    if (this.timedOut) return new RegistryError(`${what}: timed out after ${this.ms} ms`);
    return err;
  }

  dispose(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.parent?.removeEventListener('abort', this.onParentAbort);
  }
}

export class RegistryClient {
  private readonly hostsDir: string | undefined;
  private readonly log: Logger;
  private readonly requestTimeoutMs: number | null;
  private readonly fetchTimeoutMs: number | null;
  private readonly connectionsPerOrigin: number;
  /** Retry policy of every request. */
  readonly retry: RetryPolicy;
  /** [blob] force_single_range_mode: every host is treated as single-range. */
  private readonly forceSingleRange: boolean;
  /** Hosts that answered 400 to a multi-range request: they get single ranges from now on. */
  private readonly singleRangeHosts = new Set<string>();
  private readonly configMirrors: RegistryClientOptions['configMirrors'];
  private readonly parallelDefaults: { concurrency?: number; chunkBytes?: number } | undefined;
  readonly authorizer: RegistryAuthorizer;
  /** One keep-alive pool per (origin, TLS settings). */
  private readonly pools = new Map<string, Promise<Pool>>();
  /** Of several hosts.toml client certificates, the one each origin accepted. */
  private readonly certChoice = new ClientCertChoice();
  /** hosts.toml warnings already logged, so each is logged once. */
  private readonly warned = new Set<string>();
  private closed = false;

  constructor(opts: RegistryClientOptions) {
    this.hostsDir = opts.hostsDir;
    this.log = opts.log ?? rootLog.child({ module: 'remote' });
    this.requestTimeoutMs = timeoutOption(opts.requestTimeoutMs, DEFAULT_REQUEST_TIMEOUT_MS);
    this.fetchTimeoutMs = timeoutOption(opts.fetchTimeoutMs, DEFAULT_FETCH_TIMEOUT_MS);
    this.connectionsPerOrigin = opts.connectionsPerOrigin ?? DEFAULT_CONNECTIONS_PER_ORIGIN;
    this.retry = retryPolicy(opts.retry);
    this.forceSingleRange = opts.forceSingleRangeMode === true;
    this.parallelDefaults = opts.parallelFetch;
    this.configMirrors = opts.configMirrors;
    const explicit = opts.credentials;
    const fromOptions: CredentialProvider | undefined =
      explicit === undefined ? undefined : async (host, signal, repository) => explicit(host, signal, repository);
    const keychain = new DockerConfigKeychain({ configDir: opts.dockerConfigDir, log: this.log });
    this.authorizer = new RegistryAuthorizer({
      credentials: chainCredentials(fromOptions, keychain.provider, opts.credentialsAfterDockerConfig),
      http: this.tokenHttp,
      log: this.log,
    });
  }

  /** Closes every connection pool; in-flight requests fail. */
  async close(): Promise<void> {
    this.closed = true;
    const pools = [...this.pools.values()];
    this.pools.clear();
    await Promise.all(pools.map(async (p) => (await p).destroy().catch(() => undefined)));
  }

  // ---------------------------------------------------------------------------------------------------------
  // Public verbs

  /** Resolves a layer blob of `ref` to a BlobSource serving ranges of it. */
  async resolveBlob(ref: string, digest: string, signal?: AbortSignal): Promise<BlobSource> {
    return (await this.resolveBlobTail(ref, digest, 0, signal)).source;
  }

  /**
   * resolveBlob, and the blob's last `tailBytes` bytes (fewer when the blob is smaller) read by the same
   * request when the host serves suffix ranges; `tail` is undefined when it did not (or tailBytes is 0).
   */
  async resolveBlobTail(ref: string, digest: string, tailBytes: number, signal?: AbortSignal): Promise<ResolvedBlobTail> {
    const reference = parseReference(ref);
    validateDigest(digest, 'blob digest');
    const what = `blob ${digest} of ${reference.name}`;
    return this.tryEndpoints(reference, ['pull'], what, signal, async (endpoint) => {
      const blobUrl = this.objectUrl(endpoint, reference, 'blobs', digest);
      const { location, size, rangesIgnored, tail } = await this.locateBlob(endpoint, reference, blobUrl, what, signal, tailBytes);
      this.log.debug(
        { host: endpoint.host, repository: reference.repository, digest, size, redirected: location.foreign, tailBytes: tail?.data.length },
        'blob resolved',
      );
      const source = new RegistryBlobSource(this, reference, digest, size, location);
      source.rangesIgnored = rangesIgnored;
      return { source, tail };
    });
  }

  /** Fetches a manifest or index; `accept` lists the media types wanted (default: OCI and Docker v2 ones). */
  async fetchManifest(ref: string, accept: string | readonly string[] = MANIFEST_MEDIA_TYPES, signal?: AbortSignal): Promise<FetchedManifest> {
    const reference = parseReference(ref);
    const what = `manifest ${reference.object} of ${reference.name}`;
    // Resolving a tag needs a host trusted to resolve; a pinned digest can come from any pull mirror.
    const caps: HostCapability[] = reference.digest !== undefined ? ['pull', 'resolve'] : ['resolve'];
    const acceptHeader = typeof accept === 'string' ? accept : accept.join(', ');
    return this.tryEndpoints(reference, caps, what, signal, async (endpoint) => {
      const url = this.objectUrl(endpoint, reference, 'manifests', reference.object);
      const deadline = new Deadline(signal, this.requestTimeoutFor(endpoint));
      try {
        const res = await this.follow(endpoint, reference, url, { accept: acceptHeader }, what, deadline.signal);
        if (res.statusCode !== 200) {
          await discard(res);
          throw this.statusError(what, endpoint.host, res.statusCode);
        }
        const body = await readLimited(res, MAX_MANIFEST_BYTES, what, endpoint.host);
        const computed = `sha256:${createHash('sha256').update(body).digest('hex')}`;
        if (reference.digest !== undefined && reference.digest.startsWith('sha256:') && reference.digest !== computed) {
          throw new RegistryError(`${what}: ${endpoint.host} served content with digest ${computed}`);
        }
        const mediaType = (firstHeader(res, 'content-type') ?? '').split(';')[0]?.trim() ?? '';
        return { mediaType, digest: reference.digest ?? computed, body };
      } catch (err) {
        throw deadline.error(err, `${what} at ${endpoint.host}`);
      } finally {
        deadline.dispose();
      }
    });
  }

  /**
   * Streams a whole blob. Bounded by the idle timeout only; the stream errors if the bytes do not hash to
   * `digest` (sha256) or are fewer than Content-Length said.
   */
  async fetchBlob(ref: string, digest: string, signal?: AbortSignal): Promise<BlobStream> {
    const reference = parseReference(ref);
    validateDigest(digest, 'blob digest');
    const what = `blob ${digest} of ${reference.name}`;
    return this.tryEndpoints(reference, ['pull'], what, signal, async (endpoint) => {
      const url = this.objectUrl(endpoint, reference, 'blobs', digest);
      // No end-to-end deadline: the body is streamed at the caller's pace. undici's header and body idle
      // timeouts (requestTimeoutMs) still catch a registry that stops answering.
      const res = await this.follow(endpoint, reference, url, { 'accept-encoding': 'identity' }, what, signal);
      if (res.statusCode !== 200) {
        await discard(res);
        throw this.statusError(what, endpoint.host, res.statusCode);
      }
      const size = parseNonNegativeInt(firstHeader(res, 'content-length'));
      const verifier = new DigestVerifier(digest, size, `${what} from ${endpoint.host}`);
      pipeline(res.body, verifier, () => undefined); // errors reach the consumer through `verifier`
      return { digest, size, body: verifier };
    });
  }

  /**
   * Like fetchBlob, but fetched as `concurrency` parallel range requests of `chunkBytes` each, emitted in
   * order with bounded memory (about concurrency x chunkBytes) and checked against `digest` at the end (unless
   * opts.verifyDigest is false: see ParallelFetchOptions). Each range has the retries and the bound of a range
   * read. Falls back to one plain GET (always verified) when the blob fits in one chunk or the registry
   * ignores Range.
   */
  async fetchBlobParallel(ref: string, digest: string, opts: ParallelFetchOptions = {}): Promise<BlobStream> {
    const { concurrency, chunkBytes } = parallelOptions(opts, this.parallelDefaults);
    const source = (await this.resolveBlob(ref, digest, opts.signal)) as RegistryBlobSource;
    if (source.size <= chunkBytes || source.rangesIgnored) return this.fetchBlob(ref, digest, opts.signal);
    const body = parallelRangeStream(source, { concurrency, chunkBytes, verifyDigest: opts.verifyDigest, signal: opts.signal }, `blob ${digest} of ${parseReference(ref).name} from ${source.host}`);
    return { digest, size: source.size, body };
  }

  // ---------------------------------------------------------------------------------------------------------
  // Resolution

  /** Loads the endpoints for a registry domain and keeps those with one of `caps`. */
  private async endpointsFor(reference: ImageReference, caps: readonly HostCapability[]): Promise<readonly RegistryEndpoint[]> {
    const resolution = await resolveHosts(reference.domain, this.hostsDir, this.configMirrors?.[reference.domain]);
    for (const w of resolution.warnings) {
      if (!this.warned.has(w)) {
        this.warned.add(w);
        this.log.warn(w);
      }
    }
    return resolution.endpoints.filter((e) => e.capabilities.some((c) => caps.includes(c)));
  }

  /** Runs `attempt` on each endpoint in order until one succeeds; otherwise throws the failures together. */
  private async tryEndpoints<T>(
    reference: ImageReference,
    caps: readonly HostCapability[],
    what: string,
    signal: AbortSignal | undefined,
    attempt: (endpoint: RegistryEndpoint) => Promise<T>,
    skipHost?: string,
  ): Promise<T> {
    if (this.closed) throw new RegistryError(`${what}: registry client is closed`);
    const endpoints = (await this.endpointsFor(reference, caps)).filter((e) => e.host !== skipHost);
    if (endpoints.length === 0) throw new RegistryError(`${what}: no registry host for ${reference.domain} has capability ${caps.join(' or ')}`);
    const failures: unknown[] = [];
    for (const endpoint of endpoints) {
      if (signal?.aborted === true) throw signal.reason;
      try {
        return await attempt(endpoint);
      } catch (err) {
        if (isAborted(signal)) throw err;
        failures.push(err);
        if (endpoints.length > 1) this.log.debug({ host: endpoint.host, err: errorMessage(err) }, `${what}: host failed, trying the next`);
      }
    }
    if (failures.length === 1) throw failures[0];
    const messages = failures.map((f) => errorMessage(f)).join('; ');
    const summary = `${what}: all ${failures.length} registry hosts failed: ${messages}`;
    if (failures.every((f) => f instanceof RegistryAuthError)) throw new RegistryAuthError(summary);
    const last = failures[failures.length - 1];
    throw new RegistryError(summary, last instanceof RegistryError ? last.status : undefined);
  }

  private objectUrl(endpoint: RegistryEndpoint, reference: ImageReference, kind: 'blobs' | 'manifests', object: string): URL {
    const prefix = endpoint.path.replace(/\/+$/, '');
    const url = new URL(`${endpoint.scheme}://${endpoint.host}${prefix}/${reference.repository}/${kind}/${object}`);
    // Mirrors learn which registry is meant from `ns`, as containerd sends it; Docker Hub's own host is not a mirror.
    const isOrigin = endpoint.host === reference.domain || (isDockerHub(endpoint.host) && isDockerHub(reference.domain));
    if (!isOrigin) url.searchParams.set('ns', reference.domain);
    return url;
  }

  /**
   * Used by RegistryBlobSource when the host serving a blob keeps failing: locates the blob again on the
   * other hosts of hosts.toml (mirrors first, then the origin). Undefined when there is no other host.
   */
  async relocateBlob(
    reference: ImageReference,
    digest: string,
    failingHost: string,
    signal: AbortSignal,
  ): Promise<{ location: BlobLocation; size: number } | undefined> {
    const others = (await this.endpointsFor(reference, ['pull'])).filter((e) => e.host !== failingHost);
    if (others.length === 0) return undefined;
    const what = `blob ${digest} of ${reference.name}`;
    return this.tryEndpoints(
      reference,
      ['pull'],
      what,
      signal,
      (endpoint) => this.locateBlob(endpoint, reference, this.objectUrl(endpoint, reference, 'blobs', digest), what, signal),
      failingHost,
    );
  }

  /** Probe + size, see the file comment. With tailBytes > 0 the probe is a suffix range whose bytes are kept. */
  async locateBlob(
    endpoint: RegistryEndpoint,
    reference: ImageReference,
    blobUrl: URL,
    what: string,
    signal: AbortSignal | undefined,
    tailBytes = 0,
  ): Promise<{ location: BlobLocation; size: number; rangesIgnored: boolean; tail?: BlobTailBytes }> {
    const deadline = new Deadline(signal, this.requestTimeoutFor(endpoint));
    const where = `${what} at ${endpoint.host}`;
    const range = tailBytes > 0 ? `bytes=-${tailBytes}` : 'bytes=0-1';
    try {
      const probe = await this.sendAuthorized(
        endpoint,
        reference,
        blobUrl,
        { method: 'GET', headers: { range, 'accept-encoding': 'identity' }, signal: deadline.signal },
        what,
      );
      let location: BlobLocation = { endpoint, blobUrl, url: blobUrl, foreign: false };
      let size: number | undefined;
      let tail: BlobTailBytes | undefined;
      const status = probe.statusCode;
      if (isRedirect(status)) {
        const target = firstHeader(probe, 'location');
        await discard(probe);
        if (target === undefined) throw new RegistryError(`${where}: redirect (${status}) without a Location`, status);
        const url = new URL(target, blobUrl);
        location = { endpoint, blobUrl, url, foreign: url.origin !== blobUrl.origin };
        if (tailBytes > 0) {
          // The suffix read at the target tells the size too: it replaces the HEAD below. Anything but a 206
          // (a storage URL that refuses it) just leaves the size to sizeAt.
          const atTarget = await this.sendTo(location, reference, { method: 'GET', headers: { range, 'accept-encoding': 'identity' }, signal: deadline.signal }, what);
          if (atTarget.statusCode === 206) ({ size, tail } = await readSuffixProbe(atTarget, tailBytes));
          else if (atTarget.statusCode === 200) atTarget.body.destroy(); // the whole blob: don't read it
          else await discard(atTarget);
        }
      } else if (status === 206) {
        if (tailBytes > 0) ({ size, tail } = await readSuffixProbe(probe, tailBytes));
        else {
          size = parseContentRange(firstHeader(probe, 'content-range'))?.total;
          await discard(probe);
        }
      } else if (status === 200) {
        size = parseNonNegativeInt(firstHeader(probe, 'content-length'));
        // The server ignored Range and is sending the whole blob: don't read it.
        probe.body.destroy();
      } else if (status === 416) {
        // Range not satisfiable: an empty blob. The HEAD below tells its size.
        await discard(probe);
      } else {
        await discard(probe);
        throw this.statusError(what, endpoint.host, status);
      }
      if (size === undefined) size = await this.sizeAt(location, reference, what, deadline.signal);
      return { location, size, rangesIgnored: status === 200, tail };
    } catch (err) {
      throw deadline.error(err, where);
    } finally {
      deadline.dispose();
    }
  }

  /** HEAD -> Content-Length, else GET bytes=0-1 -> Content-Range total (pre-signed GET URLs may refuse HEAD). */
  private async sizeAt(location: BlobLocation, reference: ImageReference, what: string, signal: AbortSignal): Promise<number> {
    const host = location.url.host;
    const head = await this.sendTo(location, reference, { method: 'HEAD', headers: {}, signal }, what);
    await discard(head);
    if (head.statusCode === 200) {
      const len = parseNonNegativeInt(firstHeader(head, 'content-length'));
      if (len !== undefined) return len;
    }
    const get = await this.sendTo(location, reference, { method: 'GET', headers: { range: 'bytes=0-1', 'accept-encoding': 'identity' }, signal }, what);
    if (get.statusCode === 206) {
      const total = parseContentRange(firstHeader(get, 'content-range'))?.total;
      await discard(get);
      if (total !== undefined) return total;
      throw new RegistryError(`${what}: ${host} did not tell the blob size`, 206);
    }
    if (get.statusCode === 200) {
      const len = parseNonNegativeInt(firstHeader(get, 'content-length'));
      get.body.destroy();
      if (len !== undefined) return len;
      throw new RegistryError(`${what}: ${host} did not tell the blob size`, 200);
    }
    await discard(get);
    throw this.statusError(what, host, get.statusCode);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Transport

  /** Sends to a resolved blob location: with auth and headers when it is the endpoint itself, bare otherwise. */
  async sendTo(location: BlobLocation, reference: ImageReference, opts: SendOptions, what: string): Promise<Dispatcher.ResponseData> {
    if (location.foreign) return this.send(location.url, DEFAULT_TLS, opts, what);
    return this.sendAuthorized(location.endpoint, reference, location.url, opts, what);
  }

  /** GET following up to MAX_REDIRECTS hops; auth and custom headers go only to the endpoint's own origin. */
  private async follow(
    endpoint: RegistryEndpoint,
    reference: ImageReference,
    start: URL,
    headers: Record<string, string>,
    what: string,
    signal: AbortSignal | undefined,
  ): Promise<Dispatcher.ResponseData> {
    let url = start;
    for (let hop = 0; ; hop++) {
      const opts: SendOptions = { method: 'GET', headers: { ...headers }, signal };
      const res =
        url.origin === start.origin ? await this.sendAuthorized(endpoint, reference, url, opts, what) : await this.send(url, DEFAULT_TLS, opts, what);
      if (!isRedirect(res.statusCode)) return res;
      const target = firstHeader(res, 'location');
      await discard(res);
      if (target === undefined) throw new RegistryError(`${what}: redirect (${res.statusCode}) from ${url.host} without a Location`, res.statusCode);
      if (hop >= MAX_REDIRECTS) throw new RegistryError(`${what}: more than ${MAX_REDIRECTS} redirects from ${endpoint.host}`, res.statusCode);
      url = new URL(target, url);
    }
  }

  /** Sends with the endpoint's headers and registry auth; on 401 authenticates and retries once. */
  private async sendAuthorized(
    endpoint: RegistryEndpoint,
    reference: ImageReference,
    url: URL,
    opts: SendOptions,
    what: string,
  ): Promise<Dispatcher.ResponseData> {
    const scope = pullScope(reference.repository);
    const host = endpoint.host;
    const base: Record<string, string | string[]> = {};
    for (const [k, v] of Object.entries(endpoint.headers)) base[k] = [...v];
    Object.assign(base, opts.headers);
    let authorization = this.authorizer.cached(host, scope);
    const withAuth = (a: string | undefined): SendOptions => ({ ...opts, headers: a === undefined ? base : { ...base, authorization: a } });

    const first = await this.send(url, endpoint, withAuth(authorization), what);
    if (first.statusCode !== 401) return first;
    const challenge = first.headers['www-authenticate'];
    await discard(first);
    try {
      authorization = await this.authorizer.authorize(host, scope, challenge, authorization, opts.signal);
    } catch (err) {
      if (err instanceof RegistryAuthError) throw new RegistryAuthError(`${what}: ${err.message}`);
      throw err;
    }
    const second = await this.send(url, endpoint, withAuth(authorization), what);
    if (second.statusCode === 401) {
      await discard(second);
      throw new RegistryAuthError(`${what}: registry ${host} still answered 401 after authenticating for ${scope}`);
    }
    return second;
  }

  /**
   * One HTTP exchange with retries: transport errors, 429 and 5xx (not 501) are retried up to
   * `retry.maxRetries` times with exponential backoff and jitter, honouring Retry-After; the caller's signal
   * (its deadline) bounds the whole. The last answer is returned whatever its status; transport failures
   * become RegistryError naming the host.
   */
  private async send(url: URL, tls: TlsSettings, opts: SendOptions, what: string): Promise<Dispatcher.ResponseData> {
    for (let attempt = 0; ; attempt++) {
      let res: Dispatcher.ResponseData;
      try {
        res = await this.sendOnce(url, tls, opts, what);
      } catch (err) {
        if (attempt >= this.retry.maxRetries || isAborted(opts.signal) || !isTransientNetworkError(err)) {
          if (attempt > 0 && err instanceof RegistryError) throw new RegistryError(`${err.message} (after ${attempt} retries)`, err.status);
          throw err;
        }
        const waitMs = backoffMs(this.retry, attempt);
        this.log.debug({ host: url.host, attempt: attempt + 1, waitMs, err: errorMessage(err) }, 'registry request failed; retrying');
        await sleep(waitMs, opts.signal);
        continue;
      }
      if (!isRetryableStatus(res.statusCode) || attempt >= this.retry.maxRetries) return res;
      const waitMs = backoffMs(this.retry, attempt, parseRetryAfter(res.headers['retry-after']));
      await discard(res);
      this.log.debug({ host: url.host, attempt: attempt + 1, waitMs, status: res.statusCode }, 'registry answered a retryable status; retrying');
      await sleep(waitMs, opts.signal);
    }
  }

  /**
   * One HTTP exchange; transport failures become RegistryError naming the host, marked transient when they
   * are. With several hosts.toml client certificates, the exchange is tried with each in turn until the
   * server accepts one (see client-certs.ts).
   */
  private async sendOnce(url: URL, tls: TlsSettings, opts: SendOptions, what: string): Promise<Dispatcher.ResponseData> {
    const certs = url.protocol === 'https:' ? tls.clientCerts.length : 0;
    if (certs <= 1) return this.wrapTransportError(() => this.request(url, tls, 0, opts), url, opts, what);
    const key = tlsKey(url, tls);
    const order = this.certChoice.order(key, certs);
    return this.wrapTransportError(
      async () => {
        for (let n = 0; ; n++) {
          const index = order[n] as number;
          const last = n === order.length - 1;
          let res: Dispatcher.ResponseData;
          try {
            res = await this.request(url, tls, index, opts);
          } catch (err) {
            if (last || opts.signal?.aborted === true || !this.certChoice.shouldTryNext(key, certVerdictOfError(err))) throw err;
            this.log.debug({ host: url.host, cert: tls.clientCerts[index]?.certFile, err: describeNetworkError(err) }, 'client certificate not accepted; trying the next one');
            continue;
          }
          const verdict = certVerdictOfStatus(res.statusCode);
          if (!last && this.certChoice.shouldTryNext(key, verdict)) {
            await discard(res);
            this.log.debug({ host: url.host, cert: tls.clientCerts[index]?.certFile, status: res.statusCode }, 'client certificate maybe not accepted; trying the next one');
            continue;
          }
          if (verdict === 'accepted' && !this.certChoice.hasAccepted(key)) {
            this.log.debug({ host: url.host, cert: tls.clientCerts[index]?.certFile }, 'client certificate accepted');
          }
          if (verdict === 'accepted') this.certChoice.accept(key, index);
          return res;
        }
      },
      url,
      opts,
      what,
      ` (tried ${certs} client certificates)`,
    );
  }

  private async request(url: URL, tls: TlsSettings, certIndex: number, opts: SendOptions): Promise<Dispatcher.ResponseData> {
    const pool = await this.poolFor(url, tls, certIndex);
    const idle = this.requestTimeoutFor(tls) ?? 0; // undici: 0 disables
    return pool.request({
      path: url.pathname + url.search,
      method: opts.method,
      headers: opts.headers,
      body: opts.body,
      signal: opts.signal,
      headersTimeout: idle,
      bodyTimeout: idle,
    });
  }

  private async wrapTransportError(
    fn: () => Promise<Dispatcher.ResponseData>,
    url: URL,
    opts: SendOptions,
    what: string,
    note = '',
  ): Promise<Dispatcher.ResponseData> {
    try {
      return await fn();
    } catch (err) {
      if (opts.signal?.aborted === true || err instanceof StargazeError) throw err;
      const wrapped = new RegistryError(`${what}: request to ${url.host} failed: ${describeNetworkError(err)}${note}`);
      if (isTransientNetworkError(err) && !this.closed) markTransient(wrapped);
      throw wrapped;
    }
  }

  /**
   * The request bound for `target` (an endpoint, or DEFAULT_TLS for other origins): a config mirror's own
   * request_timeout_sec when it sets one (negative: none), else [resolver] request_timeout_sec. It is both
   * the end-to-end deadline of a small request to an endpoint and the idle limit of every request.
   */
  private requestTimeoutFor(target: TlsSettings): number | null {
    const own = target.requestTimeoutSec ?? 0;
    if (own > 0) return own * 1000;
    return own < 0 ? null : this.requestTimeoutMs;
  }

  /** Token server requests, through the same pools and timeouts. */
  private readonly tokenHttp: TokenHttp = async (url, init) => {
    const deadline = new Deadline(init.signal, this.requestTimeoutMs);
    const what = `token request to ${url.host}`;
    try {
      const res = await this.send(url, DEFAULT_TLS, { method: init.method, headers: init.headers, body: init.body, signal: deadline.signal }, what);
      const body = await readLimited(res, MAX_TOKEN_RESPONSE_BYTES, what, url.host);
      return { status: res.statusCode, body };
    } catch (err) {
      throw deadline.error(err, what);
    } finally {
      deadline.dispose();
    }
  };

  /** The pool for an origin, its TLS settings and (of several) the client certificate `certIndex`. */
  private poolFor(url: URL, tls: TlsSettings, certIndex: number): Promise<Pool> {
    if (this.closed) return Promise.reject(new RegistryError(`registry client is closed`));
    const secure = url.protocol === 'https:';
    const key = secure ? `${tlsKey(url, tls)}#${certIndex}` : url.origin;
    let pool = this.pools.get(key);
    if (pool === undefined) {
      pool = this.createPool(url.origin, secure ? tls : DEFAULT_TLS, certIndex);
      this.pools.set(key, pool);
      // A pool that could not be built (unreadable CA file) is not cached, so a fixed file is picked up.
      pool.catch(() => this.pools.delete(key));
    }
    return pool;
  }

  private async createPool(origin: string, tls: TlsSettings, certIndex: number): Promise<Pool> {
    // Plain HTTP: no TLS context to build (one with the roots costs tens of ms of CPU).
    if (!origin.startsWith('https:')) return new Pool(origin, { connections: this.connectionsPerOrigin, keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS });
    const connect: Record<string, unknown> = { rejectUnauthorized: !tls.skipVerify };
    // hosts.toml `ca` adds to the default trust (trust.ts); one context for the pool's connections.
    const hostCas = await Promise.all(tls.caFiles.map((f) => readTlsFile(f, 'ca')));
    const c = tls.clientCerts[certIndex];
    const cert = c === undefined ? undefined : await readTlsFile(c.certFile, 'client certificate');
    const key = c === undefined ? undefined : c.keyFile === undefined ? cert : await readTlsFile(c.keyFile, 'client key');
    const secureContext = await secureContextFor({ hostCas, cert, key });
    if (secureContext !== undefined) connect.secureContext = secureContext;
    return new Pool(origin, { connections: this.connectionsPerOrigin, keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS, connect });
  }

  private statusError(what: string, host: string, status: number): RegistryError {
    const why =
      status === 404 ? 'not found' : status === 403 ? 'access denied' : status === 429 ? 'too many requests' : status >= 500 ? 'server error' : 'unexpected answer';
    return new RegistryError(`${what}: ${host} answered HTTP ${status} (${why})`, status);
  }

  /** Used by RegistryBlobSource. */
  get rangeTimeoutMs(): number | null {
    return this.fetchTimeoutMs;
  }

  /** Used by RegistryBlobSource: whether `host` gets single ranges only. */
  isSingleRangeHost(host: string): boolean {
    return this.forceSingleRange || this.singleRangeHosts.has(host);
  }

  /** Used by RegistryBlobSource: `host` refused a multi-range request (400). */
  markSingleRangeHost(host: string): void {
    if (this.singleRangeHosts.has(host)) return;
    this.singleRangeHosts.add(host);
    this.log.info({ host }, 'registry host refused a multi-range request; using single ranges for it');
  }

  /** Used by RegistryBlobSource. */
  get logger(): Logger {
    return this.log;
  }
}

/** An origin with its TLS settings: what the client certificate choice is remembered for. */
function tlsKey(url: URL, tls: TlsSettings): string {
  return `${url.origin}|${tls.skipVerify}|${tls.caFiles.join(',')}|${tls.clientCerts.map((c) => `${c.certFile}:${c.keyFile}`).join(',')}`;
}

async function readTlsFile(file: string, what: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    throw new RegistryError(`cannot read TLS ${what} file ${file}: ${errorCode(err) ?? 'read error'}`);
  }
}

function describeNetworkError(err: unknown): string {
  const code = errorCode(err);
  const msg = err instanceof Error ? err.message : String(err);
  return code !== undefined && !msg.includes(code) ? `${code}: ${msg}` : msg;
}

/** Reads a whole (small) body into one Buffer, refusing more than `limit` bytes. */
async function readLimited(res: Dispatcher.ResponseData, limit: number, what: string, host: string): Promise<Buffer> {
  const declared = parseNonNegativeInt(firstHeader(res, 'content-length'));
  if (declared !== undefined && declared > limit) {
    res.body.destroy();
    throw new RegistryError(`${what}: ${host} sent ${declared} bytes, more than the ${limit} allowed`, res.statusCode);
  }
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of res.body as AsyncIterable<Buffer>) {
    total += chunk.length;
    if (total > limit) throw new RegistryError(`${what}: ${host} sent more than the ${limit} bytes allowed`, res.statusCode);
    chunks.push(chunk);
  }
  return chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, total);
}

/** Passes a blob through, hashing it; fails the stream at the end on a digest or length mismatch. */
class DigestVerifier extends Transform {
  private readonly hash: ReturnType<typeof createHash> | undefined;
  private seen = 0;

  constructor(
    private readonly digest: string,
    private readonly expectedSize: number | undefined,
    private readonly what: string,
  ) {
    super();
    // Only sha256 is checked; other algorithms pass through unverified.
    this.hash = digest.startsWith('sha256:') ? createHash('sha256') : undefined;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.seen += chunk.length;
    this.hash?.update(chunk);
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    if (this.expectedSize !== undefined && this.seen !== this.expectedSize) {
      cb(new RegistryError(`${this.what}: got ${this.seen} bytes, Content-Length said ${this.expectedSize}`));
      return;
    }
    if (this.hash !== undefined) {
      const got = `sha256:${this.hash.digest('hex')}`;
      if (got !== this.digest) {
        cb(new RegistryError(`${this.what}: content has digest ${got}`));
        return;
      }
    }
    cb();
  }
}

/** A resolved layer blob: range reads against its (possibly redirected) URL. */
export class RegistryBlobSource implements BlobSource {
  /** Current location; replaced when a pre-signed URL expires and is refreshed. */
  private location: BlobLocation;
  private readonly what: string;
  /** The registry answered the resolve probe's range request with the whole blob (200). */
  rangesIgnored = false;

  constructor(
    private readonly client: RegistryClient,
    private readonly reference: ImageReference,
    readonly digest: string,
    readonly size: number,
    location: BlobLocation,
  ) {
    this.location = location;
    this.what = `blob ${digest} of ${reference.name}`;
  }

  /** Host currently serving the bytes (the storage host after a redirect). */
  get host(): string {
    return this.location.url.host;
  }

  async readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    this.checkRange(offset, length);
    if (length === 0) return Buffer.alloc(0);
    const rangeWhat = `${this.what} bytes ${offset}-${offset + length - 1}`;
    return this.exchange(rangeWhat, `bytes=${offset}-${offset + length - 1}`, signal, (res, host) => this.readResponse(res, offset, length, rangeWhat, host));
  }

  /**
   * Reads several ranges with one GET `Range: bytes=a-b,c-d,...` (overlapping and adjacent ranges merged;
   * more than MAX_RANGES_PER_REQUEST split over parallel requests). Answers understood: 206 multipart/byteranges
   * (parsed as a stream; the Content-Type may be missing), 206 with one Content-Range (a server that merged the
   * ranges), 200 (the whole blob, read only up to the last wanted byte). Whatever the answer left out is read
   * with single ranges. A 400 switches the host to single ranges for good, as does force_single_range_mode.
   */
  async readRanges(ranges: readonly ByteRange[], signal?: AbortSignal): Promise<Buffer[]> {
    for (const r of ranges) this.checkRange(r.offset, r.length);
    const plan = planRanges(ranges);
    const merged = plan.merged;
    if (merged.length === 1) {
      const m = merged[0] as MergedRange;
      const data = await this.readRange(m.offset, m.length, signal);
      return ranges.map((r) => (r.length === 0 ? Buffer.alloc(0) : data.subarray(r.offset - m.offset, r.offset - m.offset + r.length)));
    }
    const batches: MergedRange[][] = [];
    for (let i = 0; i < merged.length; i += MAX_RANGES_PER_REQUEST) batches.push(merged.slice(i, i + MAX_RANGES_PER_REQUEST));
    await Promise.all(batches.map((b) => this.readMerged(b, signal)));
    return resultsOf(plan, ranges);
  }

  /** Fills `merged` (sorted, disjoint ranges with their buffers) from one multi-range request, or singles. */
  private async readMerged(merged: MergedRange[], signal: AbortSignal | undefined): Promise<void> {
    const singles = async (): Promise<void> => {
      await Promise.all(merged.map(async (m) => (await this.readRange(m.offset, m.length, signal)).copy(m.buffer)));
    };
    if (merged.length === 1 || this.client.isSingleRangeHost(this.location.url.host)) return singles();
    const what = `${this.what} (${merged.length} ranges)`;
    const header = `bytes=${merged.map((m) => `${m.offset}-${m.offset + m.length - 1}`).join(',')}`;
    let filler: RangeFiller | undefined;
    const outcome = await this.exchange(what, header, signal, async (res, host) => {
      if (res.statusCode === 400) {
        await discard(res);
        this.client.markSingleRangeHost(host);
        return 'single' as const;
      }
      filler = new RangeFiller(merged);
      await this.readMultiResponse(res, filler, what, host);
      return 'ok' as const;
    });
    if (outcome === 'single' || filler === undefined) return singles();
    // A server may answer fewer ranges than asked (some answer just the first): read the rest one by one.
    const f = filler;
    const missing = f.missing();
    if (missing.length > 0) {
      this.client.logger.debug({ host: this.host, missing: missing.length }, 'multi-range answer left ranges out; reading them singly');
      await Promise.all(missing.map(async (m) => f.fill(m.index, m.offset, await this.readRange(m.offset, m.length, signal))));
    }
  }

  /**
   * Sends GET with `range` to the current location and hands the answer to `read`, bounded by the fetch
   * timeout: refreshes an expired pre-signed URL once on 403, and retries the exchange when the body breaks
   * off (connection reset, idle timeout, short body) up to `retry.maxRetries` times. When the host still
   * fails (after its retries) and hosts.toml lists others, the blob is located again on them, once: a
   * mirror that goes away mid-life of a mount falls back to the next host, as resolving does.
   */
  private async exchange<T>(
    what: string,
    range: string,
    signal: AbortSignal | undefined,
    read: (res: Dispatcher.ResponseData, host: string) => Promise<T>,
  ): Promise<T> {
    const deadline = new Deadline(signal, this.client.rangeTimeoutMs);
    try {
      let failedOver = false;
      for (;;) {
        try {
          return await this.exchangeAt(what, range, deadline.signal, read);
        } catch (err) {
          if (failedOver || isAborted(deadline.signal) || !worthFailover(err)) throw err;
          failedOver = true;
          if (!(await this.failover(deadline.signal, err))) throw err;
        }
      }
    } catch (err) {
      throw deadline.error(err, `${what} at ${this.location.url.host}`);
    } finally {
      deadline.dispose();
    }
  }

  /** One location's part of exchange(): the 403 refresh and the body retries. */
  private async exchangeAt<T>(
    what: string,
    range: string,
    signal: AbortSignal,
    read: (res: Dispatcher.ResponseData, host: string) => Promise<T>,
  ): Promise<T> {
    const policy = this.client.retry;
    let refreshed = false;
    for (let bodyRetries = 0; ; ) {
      const location = this.location;
      const host = location.url.host;
      const res = await this.client.sendTo(location, this.reference, { method: 'GET', headers: { range, 'accept-encoding': 'identity' }, signal }, what);
      // An expired pre-signed storage URL (any redirect target): ask the registry for a fresh one, once. Storage
      // on another origin gets no registry auth, so its 401 means the same as a 403 (some S3-compatible stores
      // answer 401 to an expired signature); on the registry's own origin a 401 was already re-authenticated.
      const expired = res.statusCode === 403 || (res.statusCode === 401 && location.foreign);
      if (expired && (location.foreign || location.url.href !== location.blobUrl.href) && !refreshed) {
        await discard(res);
        refreshed = true;
        await this.refresh(signal);
        continue;
      }
      try {
        return await read(res, host);
      } catch (err) {
        res.body.destroy();
        if (isAborted(signal) || bodyRetries >= policy.maxRetries || !isTransientNetworkError(err)) {
          if (err instanceof StargazeError || isAborted(signal)) throw err;
          throw new RegistryError(`${what}: reading the answer of ${host} failed: ${describeNetworkError(err)}`);
        }
        const waitMs = backoffMs(policy, bodyRetries);
        this.client.logger.debug({ host, attempt: bodyRetries + 1, waitMs, err: errorMessage(err) }, 'blob read broke off; retrying');
        bodyRetries++;
        await sleep(waitMs, signal);
      }
    }
  }

  /** Moves to another registry host after `cause`; false when there is none or it failed too. */
  private async failover(signal: AbortSignal, cause: unknown): Promise<boolean> {
    const old = this.location;
    let found: { location: BlobLocation; size: number } | undefined;
    try {
      found = await this.client.relocateBlob(this.reference, this.digest, old.endpoint.host, signal);
    } catch (err) {
      this.client.logger.debug({ digest: this.digest, err: errorMessage(err) }, 'no other registry host could serve the blob');
      return false;
    }
    if (found === undefined || found.size !== this.size) return false;
    this.location = found.location;
    this.client.logger.info(
      { digest: this.digest, from: old.endpoint.host, to: found.location.endpoint.host, err: errorMessage(cause) },
      'registry host failed; reading the blob from another host',
    );
    return true;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`range ${offset}+${length} outside ${this.what} of ${this.size} bytes`);
    }
  }

  private async refresh(signal: AbortSignal): Promise<void> {
    const { location, size } = await this.client.locateBlob(this.location.endpoint, this.reference, this.location.blobUrl, this.what, signal);
    if (size !== this.size) throw new RegistryError(`${this.what}: size changed from ${this.size} to ${size} on refresh`);
    this.location = location;
  }

  /** Reads a multi-range answer into `filler`; see readRanges. */
  private async readMultiResponse(res: Dispatcher.ResponseData, filler: RangeFiller, what: string, host: string): Promise<void> {
    const body = res.body as AsyncIterable<Buffer> & { destroy(): void };
    if (res.statusCode === 206) {
      const rawRange = firstHeader(res, 'content-range');
      if (rawRange !== undefined) {
        // One part: the server merged the ranges (or sent only some); Content-Type does not matter.
        const range = parseContentRange(rawRange);
        if (range === undefined || range.end < range.start || range.end >= this.size || (range.total !== undefined && range.total !== this.size)) {
          await discard(res);
          throw new RegistryError(`${what}: ${host} answered 206 with Content-Range ${JSON.stringify(rawRange)} for a blob of ${this.size} bytes`, 206);
        }
        let pos = range.start;
        for await (const chunk of body) {
          if (pos + chunk.length > range.end + 1) throw new RegistryError(`${what}: ${host} sent more bytes than its Content-Range holds`, 206);
          filler.add(pos, chunk);
          pos += chunk.length;
        }
        if (pos !== range.end + 1) throw markTransient(new RegistryError(`${what}: ${host} ended the body after ${pos - range.start} of ${range.end - range.start + 1} bytes`));
        return;
      }
      const parser = new ByteRangesParser(boundaryOf(firstHeader(res, 'content-type')), (offset, data) => filler.add(offset, data), this.size, `${what} from ${host}`);
      for await (const chunk of body) parser.write(chunk); // a malformed body throws: not transient
      try {
        parser.end();
      } catch (err) {
        throw markTransient(err as Error); // cut short inside a part: worth another try
      }
      return;
    }
    if (res.statusCode === 200) {
      // The server ignored Range: take what we want from the whole blob, stop after the last wanted byte.
      const len = parseNonNegativeInt(firstHeader(res, 'content-length'));
      if (len !== undefined && len !== this.size) {
        res.body.destroy();
        throw new RegistryError(`${what}: ${host} sent a ${len}-byte blob, expected ${this.size}`, 200);
      }
      let pos = 0;
      for await (const chunk of body) {
        filler.add(pos, chunk);
        pos += chunk.length;
        if (pos >= filler.end) break; // leaving the loop destroys the body
      }
      if (pos < filler.end) throw markTransient(new RegistryError(`${what}: ${host} ended the body after ${pos} bytes`));
      return;
    }
    await discard(res);
    const why = res.statusCode === 404 ? 'not found' : res.statusCode === 416 ? 'range not satisfiable' : 'unexpected answer';
    throw new RegistryError(`${what}: ${host} answered HTTP ${res.statusCode} (${why})`, res.statusCode);
  }

  private async readResponse(res: Dispatcher.ResponseData, offset: number, length: number, what: string, host: string): Promise<Buffer> {
    if (res.statusCode === 206) {
      const type = firstHeader(res, 'content-type') ?? '';
      const range = parseContentRange(firstHeader(res, 'content-range'));
      const end = offset + length - 1;
      if (type.toLowerCase().startsWith('multipart/') || range === undefined || range.start !== offset || range.end !== end || (range.total !== undefined && range.total !== this.size)) {
        await discard(res);
        throw new RegistryError(
          `${what}: ${host} answered 206 with Content-Range ${JSON.stringify(firstHeader(res, 'content-range') ?? '')}, want bytes ${offset}-${end}/${this.size}`,
          206,
        );
      }
      return readSlice(res.body, 0, length, what, host, true);
    }
    if (res.statusCode === 200) {
      // The server ignored Range and sends the whole blob: keep only our slice, drop the connection after it.
      const len = parseNonNegativeInt(firstHeader(res, 'content-length'));
      if (len !== undefined && len !== this.size) {
        res.body.destroy();
        throw new RegistryError(`${what}: ${host} sent a ${len}-byte blob, expected ${this.size}`, 200);
      }
      return readSlice(res.body, offset, length, what, host, false);
    }
    await discard(res);
    const why = res.statusCode === 404 ? 'not found' : res.statusCode === 416 ? 'range not satisfiable' : 'unexpected answer';
    throw new RegistryError(`${what}: ${host} answered HTTP ${res.statusCode} (${why})`, res.statusCode);
  }
}

/** A host that is gone, overloaded or lost the blob is worth leaving; bad credentials or ranges are not. */
function worthFailover(err: unknown): boolean {
  if (!(err instanceof RegistryError)) return false;
  return err.status === undefined || err.status >= 500 || err.status === 429 || err.status === 404;
}

/**
 * Copies bytes [skip, skip + length) of a body into one Buffer. With `exact`, the body must be exactly
 * `length` bytes; otherwise reading stops (and the stream is destroyed) as soon as the slice is complete.
 */
async function readSlice(body: Readable, skip: number, length: number, what: string, host: string, exact: boolean): Promise<Buffer> {
  let out: Buffer | undefined;
  let written = 0;
  let toSkip = skip;
  for await (const raw of body as AsyncIterable<Buffer>) {
    let chunk = raw;
    if (toSkip > 0) {
      if (chunk.length <= toSkip) {
        toSkip -= chunk.length;
        continue;
      }
      chunk = chunk.subarray(toSkip);
      toSkip = 0;
    }
    if (written + chunk.length > length && exact) {
      throw new RegistryError(`${what}: ${host} sent more bytes than the range holds`);
    }
    // One chunk that is exactly the range needs no copy.
    if (out === undefined && chunk.length === length && exact) {
      out = chunk;
      written = length;
      continue;
    }
    out ??= Buffer.allocUnsafe(length);
    const n = Math.min(chunk.length, length - written);
    chunk.copy(out, written, 0, n);
    written += n;
    if (!exact && written === length) break; // leaving the loop destroys the body: the rest is never read
  }
  if (written !== length || out === undefined) {
    throw markTransient(new RegistryError(`${what}: ${host} ended the body after ${written} of ${length} bytes`));
  }
  return out;
}
