/**
 * Registry access over HTTP (undici): resolve a layer blob to a BlobSource that serves byte ranges, and fetch
 * manifests and whole blobs for rpull/convert. This is the facade; the work is done in layers:
 *
 *   transport.ts             sending: pools and TLS, client certificates, auth, redirects, the one retry policy
 *   blob-locator.ts          where a blob is: hosts.toml endpoints and mirrors in order, probe, size, redirect
 *   registry-blob-source.ts  range and multi-range reads of a located blob, refresh and failover
 *   http-response.ts         reading answers;  deadline.ts  time bounds;  registry-errors.ts  what is retryable
 *
 * Retries ([blob] max_retries, min_wait_msec, max_wait_msec): every request is retried on transport errors,
 * 429 and 5xx except 501 and a body cut short, with exponential backoff and jitter, honouring Retry-After; at
 * most 1 + max_retries attempts per request (retry.ts says exactly what a request and an attempt are).
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
import { type Readable, pipeline } from 'node:stream';
import type { ConfigMirror } from '../config/config';
import { RegistryError } from '../errors';
import { log as rootLog, type Logger } from '../log';
import type { RegistryAuthorizer } from './auth';
import { BlobLocator, type BlobTailBytes } from './blob-locator';
import type { BlobSource } from './blob-source';
import { DockerConfigKeychain, chainCredentials, type CredentialProvider, type RegistryCredentials } from './credentials';
import { Deadline, timeoutOption } from './deadline';
import type { HostCapability } from './hosts';
import { DigestVerifier, discard, firstHeader, parseNonNegativeInt, readLimited, statusError } from './http-response';
import { parallelOptions, parallelRangeStream, type ParallelFetchOptions } from './parallel-fetch';
import { parseReference, validateDigest } from './reference';
import { RegistryBlobSource, SingleRangeHosts, type BlobSourceContext } from './registry-blob-source';
import { retryPolicy, type RetryPolicy } from './retry';
import { Transport } from './transport';

export type { BlobTailBytes } from './blob-locator';
export { RegistryBlobSource } from './registry-blob-source';

/** [resolver] request_timeout_sec default. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;
/** [blob] fetching_timeout_sec default. */
export const DEFAULT_FETCH_TIMEOUT_MS = 300_000;
/** Connections kept per origin; FUSE reads of several files of one layer run in parallel. */
export const DEFAULT_CONNECTIONS_PER_ORIGIN = 16;
/** containerd's limit for a manifest or index body. */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

/** Answers of a registry without the referrers API (the spec says 404; some route the path elsewhere). */
const REFERRERS_API_ABSENT = new Set([400, 404, 405, 501]);

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

export interface ResolvedBlobTail {
  source: BlobSource;
  tail: BlobTailBytes | undefined;
}

export class RegistryClient {
  /** Retry policy of every request. */
  readonly retry: RetryPolicy;
  /** Registry auth: registry-push.ts asks it for push scopes. */
  readonly authorizer: RegistryAuthorizer;
  private readonly log: Logger;
  private readonly transport: Transport;
  private readonly locator: BlobLocator;
  /** What every blob source of this client shares. */
  private readonly blobs: BlobSourceContext;
  private readonly parallelDefaults: { concurrency?: number; chunkBytes?: number } | undefined;

  constructor(opts: RegistryClientOptions) {
    this.log = opts.log ?? rootLog.child({ module: 'remote' });
    this.retry = retryPolicy(opts.retry);
    this.parallelDefaults = opts.parallelFetch;
    const explicit = opts.credentials;
    const fromOptions: CredentialProvider | undefined =
      explicit === undefined ? undefined : async (host, signal, repository) => explicit(host, signal, repository);
    const keychain = new DockerConfigKeychain({ configDir: opts.dockerConfigDir, log: this.log });
    this.transport = new Transport({
      log: this.log,
      requestTimeoutMs: timeoutOption(opts.requestTimeoutMs, DEFAULT_REQUEST_TIMEOUT_MS),
      connectionsPerOrigin: opts.connectionsPerOrigin ?? DEFAULT_CONNECTIONS_PER_ORIGIN,
      retry: this.retry,
      credentials: chainCredentials(fromOptions, keychain.provider, opts.credentialsAfterDockerConfig),
    });
    this.authorizer = this.transport.authorizer;
    this.locator = new BlobLocator({ transport: this.transport, hostsDir: opts.hostsDir, configMirrors: opts.configMirrors, log: this.log });
    this.blobs = {
      transport: this.transport,
      locator: this.locator,
      singleRangeHosts: new SingleRangeHosts(opts.forceSingleRangeMode === true, this.log),
      fetchTimeoutMs: timeoutOption(opts.fetchTimeoutMs, DEFAULT_FETCH_TIMEOUT_MS),
      log: this.log,
    };
  }

  /** Closes every connection pool; in-flight requests fail. */
  close(): Promise<void> {
    return this.transport.close();
  }

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
    const { location, size, rangesIgnored, tail } = await this.locator.locateAny(reference, digest, what, signal, tailBytes);
    this.log.debug(
      { host: location.endpoint.host, repository: reference.repository, digest, size, redirected: location.foreign, tailBytes: tail?.data.length },
      'blob resolved',
    );
    const source = new RegistryBlobSource(this.blobs, reference, digest, size, location);
    source.rangesIgnored = rangesIgnored;
    return { source, tail };
  }

  /** Fetches a manifest or index; `accept` lists the media types wanted (default: OCI and Docker v2 ones). */
  async fetchManifest(ref: string, accept: string | readonly string[] = MANIFEST_MEDIA_TYPES, signal?: AbortSignal): Promise<FetchedManifest> {
    const reference = parseReference(ref);
    const what = `manifest ${reference.object} of ${reference.name}`;
    // Resolving a tag needs a host trusted to resolve; a pinned digest can come from any pull mirror.
    const caps: HostCapability[] = reference.digest !== undefined ? ['pull', 'resolve'] : ['resolve'];
    const acceptHeader = typeof accept === 'string' ? accept : accept.join(', ');
    return this.locator.tryEndpoints(reference, caps, what, signal, async (endpoint) => {
      const url = this.locator.objectUrl(endpoint, reference, 'manifests', reference.object);
      const deadline = new Deadline(signal, this.transport.requestTimeoutFor(endpoint));
      const req = { url, method: 'GET', headers: { accept: acceptHeader }, signal: deadline.signal, endpoint, repository: reference.repository, what } as const;
      try {
        const { res, body } = await this.transport.exchange(
          req,
          async (res) => {
            if (res.statusCode !== 200) {
              await discard(res);
              throw statusError(what, endpoint.host, res.statusCode);
            }
            return { res, body: await readLimited(res, MAX_MANIFEST_BYTES, what, endpoint.host) };
          },
          true,
        );
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
   * The referrers API's answer for `digest` (distribution spec: `GET /v2/<name>/referrers/<digest>`), filtered
   * to `artifactType` where the registry filters: an image index, at most MAX_MANIFEST_BYTES. Undefined when
   * the registry has no such API (404, and 400/405/501 from registries that route it elsewhere): the caller
   * then reads the referrers tag schema. Only hosts that may resolve are asked, as for a tag.
   */
  async fetchReferrers(ref: string, digest: string, artifactType: string, signal?: AbortSignal): Promise<Buffer | undefined> {
    const reference = parseReference(ref);
    validateDigest(digest, 'manifest digest');
    const what = `referrers of ${digest} in ${reference.name}`;
    return this.locator.tryEndpoints(reference, ['resolve'], what, signal, async (endpoint) => {
      const url = this.locator.objectUrl(endpoint, reference, 'referrers', digest);
      url.searchParams.set('artifactType', artifactType);
      const deadline = new Deadline(signal, this.transport.requestTimeoutFor(endpoint));
      const req = { url, method: 'GET', headers: { accept: MANIFEST_MEDIA_TYPES[0] }, signal: deadline.signal, endpoint, repository: reference.repository, what } as const;
      try {
        return await this.transport.exchange(
          req,
          async (res) => {
            if (res.statusCode === 200) return readLimited(res, MAX_MANIFEST_BYTES, what, endpoint.host);
            await discard(res);
            if (REFERRERS_API_ABSENT.has(res.statusCode)) return undefined;
            throw statusError(what, endpoint.host, res.statusCode);
          },
          true,
        );
      } catch (err) {
        throw deadline.error(err, `${what} at ${endpoint.host}`);
      } finally {
        deadline.dispose();
      }
    });
  }

  /** A whole small blob (a config, a profile) in memory, at most `limit` bytes, checked against `digest`. */
  async fetchSmallBlob(ref: string, digest: string, limit: number, signal?: AbortSignal): Promise<Buffer> {
    const reference = parseReference(ref);
    validateDigest(digest, 'blob digest');
    const what = `blob ${digest} of ${reference.name}`;
    return this.locator.tryEndpoints(reference, ['pull'], what, signal, async (endpoint) => {
      const url = this.locator.objectUrl(endpoint, reference, 'blobs', digest);
      const deadline = new Deadline(signal, this.transport.requestTimeoutFor(endpoint));
      const req = { url, method: 'GET', headers: { 'accept-encoding': 'identity' }, signal: deadline.signal, endpoint, repository: reference.repository, what } as const;
      try {
        const body = await this.transport.exchange(
          req,
          async (res) => {
            if (res.statusCode !== 200) {
              await discard(res);
              throw statusError(what, endpoint.host, res.statusCode);
            }
            return readLimited(res, limit, what, endpoint.host);
          },
          true,
        );
        const computed = `sha256:${createHash('sha256').update(body).digest('hex')}`;
        if (digest.startsWith('sha256:') && computed !== digest) throw new RegistryError(`${what}: ${endpoint.host} served content with digest ${computed}`);
        return body;
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
    return this.locator.tryEndpoints(reference, ['pull'], what, signal, async (endpoint) => {
      const url = this.locator.objectUrl(endpoint, reference, 'blobs', digest);
      // No end-to-end deadline: the body is streamed at the caller's pace. undici's header and body idle
      // timeouts (requestTimeoutMs) still catch a registry that stops answering.
      const req = { url, method: 'GET', headers: { 'accept-encoding': 'identity' }, signal, endpoint, repository: reference.repository, what } as const;
      return this.transport.exchange(
        req,
        async (res) => {
          if (res.statusCode !== 200) {
            await discard(res);
            throw statusError(what, endpoint.host, res.statusCode);
          }
          const size = parseNonNegativeInt(firstHeader(res, 'content-length'));
          const verifier = new DigestVerifier(digest, size, `${what} from ${endpoint.host}`);
          pipeline(res.body, verifier, () => undefined); // errors reach the consumer through `verifier`
          return { digest, size, body: verifier };
        },
        true,
      );
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
}
