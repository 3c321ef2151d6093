/**
 * Where a blob is served from. The endpoints of a registry come from hosts.toml or the daemon config's mirrors
 * (hosts.ts), mirrors first; each is tried in order and the first that works wins, and the failures of all of
 * them are reported together (reference: fs/remote/resolver.go). Locating a blob on one endpoint:
 *   1. GET <endpoint>/<repo>/blobs/<digest> with `Range: bytes=0-1` (GET, not HEAD: some registries answer
 *      HEAD 200 without the redirect). A 3xx is followed one hop and its Location becomes the URL all later
 *      range reads go to (registry auth and custom headers are not sent to another origin).
 *   2. The size comes from that probe (Content-Range total on 206, Content-Length on 200) when it can, saving
 *      a round trip; otherwise HEAD on the final URL, then GET bytes=0-1 as the reference does.
 * With tailBytes > 0 the probe is a suffix range (`Range: bytes=-N`, after a redirect sent again to its
 * target) instead: the 206 tells the size and carries the blob's last N bytes (footer and TOC), so a mount
 * needs one round trip where it needed two (three after a redirect). Any other answer falls back to the above.
 *
 * Every request here is one Transport.exchange (its own retries), under the endpoint's request bound.
 */
import type { Dispatcher } from 'undici';
import type { ConfigMirror } from '../config/config';
import { RegistryAuthError, RegistryError, errorMessage } from '../errors';
import type { Logger } from '../log';
import { Deadline, isAborted } from './deadline';
import { resolveHosts, type HostCapability, type RegistryEndpoint } from './hosts';
import { discard, firstHeader, isRedirect, parseContentRange, parseNonNegativeInt, readLimited, statusError } from './http-response';
import { isDockerHub, type ImageReference } from './reference';
import type { Transport } from './transport';
import type { HttpRequest } from './transport-interface';

/** Where a resolved blob's bytes are served from. */
export interface BlobLocation {
  readonly endpoint: RegistryEndpoint;
  /** `<endpoint>/<repo>/blobs/<digest>` */
  readonly blobUrl: URL;
  /** blobUrl, or where it redirected to. */
  readonly url: URL;
  /** True when `url` is on another origin: no registry auth, no custom headers, default TLS. */
  readonly foreign: boolean;
}

/** Bytes [offset, offset + data.length) of a blob, its end. */
export interface BlobTailBytes {
  offset: number;
  data: Buffer;
}

export interface LocatedBlob {
  location: BlobLocation;
  size: number;
  /** The probe's range request was answered with the whole blob (200). */
  rangesIgnored: boolean;
  tail?: BlobTailBytes;
}

/** What a probe learnt: where it redirected to, or the size and maybe the tail. */
interface ProbeAnswer {
  status: number;
  target?: string;
  size?: number;
  tail?: BlobTailBytes;
}

/** A request to a blob location: with the endpoint (auth, headers, TLS) when it is on the endpoint's origin. */
export function requestTo(
  location: BlobLocation,
  reference: ImageReference,
  init: { method: 'GET' | 'HEAD'; headers: Record<string, string>; signal: AbortSignal | undefined; what: string },
): HttpRequest {
  return { ...init, url: location.url, endpoint: location.foreign ? undefined : location.endpoint, repository: reference.repository };
}

export interface BlobLocatorOptions {
  transport: Transport;
  /** containerd hosts dir (certs.d layout); absent: every registry is its own only endpoint. */
  hostsDir: string | undefined;
  /** `[[resolver.host."<registry>".mirrors]]` by registry domain; a hosts.toml for the registry wins. */
  configMirrors: Readonly<Record<string, readonly ConfigMirror[]>> | undefined;
  log: Logger;
}

export class BlobLocator {
  private readonly transport: Transport;
  private readonly log: Logger;
  /** hosts.toml warnings already logged, so each is logged once. */
  private readonly warned = new Set<string>();

  constructor(private readonly opts: BlobLocatorOptions) {
    this.transport = opts.transport;
    this.log = opts.log;
  }

  /** Runs `attempt` on each endpoint with one of `caps` in order until one succeeds; else throws the failures together. */
  async tryEndpoints<T>(
    reference: ImageReference,
    caps: readonly HostCapability[],
    what: string,
    signal: AbortSignal | undefined,
    attempt: (endpoint: RegistryEndpoint) => Promise<T>,
    skipHost?: string,
  ): Promise<T> {
    if (this.transport.closed) throw new RegistryError(`${what}: registry client is closed`);
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

  objectUrl(endpoint: RegistryEndpoint, reference: ImageReference, kind: 'blobs' | 'manifests' | 'referrers', object: string): URL {
    const prefix = endpoint.path.replace(/\/+$/, '');
    const url = new URL(`${endpoint.scheme}://${endpoint.host}${prefix}/${reference.repository}/${kind}/${object}`);
    // Mirrors learn which registry is meant from `ns`, as containerd sends it; Docker Hub's own host is not a mirror.
    const isOrigin = endpoint.host === reference.domain || (isDockerHub(endpoint.host) && isDockerHub(reference.domain));
    if (!isOrigin) url.searchParams.set('ns', reference.domain);
    return url;
  }

  /** Locates the blob on the endpoints in order; see the file comment. */
  locateAny(reference: ImageReference, digest: string, what: string, signal: AbortSignal | undefined, tailBytes: number): Promise<LocatedBlob> {
    return this.tryEndpoints(reference, ['pull'], what, signal, (endpoint) =>
      this.locate(endpoint, reference, this.objectUrl(endpoint, reference, 'blobs', digest), what, signal, tailBytes),
    );
  }

  /**
   * For a blob source whose host keeps failing: locates the blob again on the other hosts (mirrors first, then
   * the origin). Undefined when there is no other host.
   */
  async relocate(reference: ImageReference, digest: string, failingHost: string, signal: AbortSignal): Promise<LocatedBlob | undefined> {
    const others = (await this.endpointsFor(reference, ['pull'])).filter((e) => e.host !== failingHost);
    if (others.length === 0) return undefined;
    const what = `blob ${digest} of ${reference.name}`;
    return this.tryEndpoints(
      reference,
      ['pull'],
      what,
      signal,
      (endpoint) => this.locate(endpoint, reference, this.objectUrl(endpoint, reference, 'blobs', digest), what, signal),
      failingHost,
    );
  }

  /** Probe + size on one endpoint, see the file comment. With tailBytes > 0 the probe is a suffix range whose bytes are kept. */
  async locate(endpoint: RegistryEndpoint, reference: ImageReference, blobUrl: URL, what: string, signal: AbortSignal | undefined, tailBytes = 0): Promise<LocatedBlob> {
    const deadline = new Deadline(signal, this.transport.requestTimeoutFor(endpoint));
    const where = `${what} at ${endpoint.host}`;
    const headers = { range: tailBytes > 0 ? `bytes=-${tailBytes}` : 'bytes=0-1', 'accept-encoding': 'identity' };
    try {
      let location: BlobLocation = { endpoint, blobUrl, url: blobUrl, foreign: false };
      const probe = await this.transport.exchange(requestTo(location, reference, { method: 'GET', headers, signal: deadline.signal, what }), async (res): Promise<ProbeAnswer> => {
        const status = res.statusCode;
        if (isRedirect(status)) {
          const target = firstHeader(res, 'location');
          await discard(res);
          if (target === undefined) throw new RegistryError(`${where}: redirect (${status}) without a Location`, status);
          return { status, target };
        }
        if (status === 206 && tailBytes > 0) return { status, ...(await readSuffixProbe(res, tailBytes)) };
        if (status === 206) {
          const size = parseContentRange(firstHeader(res, 'content-range'))?.total;
          await discard(res);
          return { status, size };
        }
        if (status === 200) {
          const size = parseNonNegativeInt(firstHeader(res, 'content-length'));
          res.body.destroy(); // the server ignored Range and is sending the whole blob: don't read it
          return { status, size };
        }
        await discard(res);
        // 416, range not satisfiable: an empty blob; sizeAt tells its size.
        if (status === 416) return { status };
        throw statusError(what, endpoint.host, status);
      });
      let { size, tail } = probe;
      if (probe.target !== undefined) {
        const url = new URL(probe.target, blobUrl);
        location = { endpoint, blobUrl, url, foreign: url.origin !== blobUrl.origin };
        if (tailBytes > 0) {
          // The suffix read at the target tells the size too: it replaces the HEAD of sizeAt. Anything but a 206
          // (a storage URL that refuses it) just leaves the size to sizeAt.
          ({ size, tail } = await this.transport.exchange(requestTo(location, reference, { method: 'GET', headers, signal: deadline.signal, what }), async (res): Promise<ProbeAnswer> => {
            if (res.statusCode === 206) return { status: 206, ...(await readSuffixProbe(res, tailBytes)) };
            if (res.statusCode === 200) res.body.destroy(); // the whole blob: don't read it
            else await discard(res);
            return { status: res.statusCode };
          }));
        }
      }
      size ??= await this.sizeAt(location, reference, what, deadline.signal);
      return { location, size, rangesIgnored: probe.status === 200, tail };
    } catch (err) {
      throw deadline.error(err, where);
    } finally {
      deadline.dispose();
    }
  }

  /** Loads the endpoints for a registry domain and keeps those with one of `caps`. */
  private async endpointsFor(reference: ImageReference, caps: readonly HostCapability[]): Promise<readonly RegistryEndpoint[]> {
    const resolution = await resolveHosts(reference.domain, this.opts.hostsDir, this.opts.configMirrors?.[reference.domain]);
    for (const w of resolution.warnings) {
      if (!this.warned.has(w)) {
        this.warned.add(w);
        this.log.warn(w);
      }
    }
    return resolution.endpoints.filter((e) => e.capabilities.some((c) => caps.includes(c)));
  }

  /** HEAD -> Content-Length, else GET bytes=0-1 -> Content-Range total (pre-signed GET URLs may refuse HEAD). */
  private async sizeAt(location: BlobLocation, reference: ImageReference, what: string, signal: AbortSignal): Promise<number> {
    const host = location.url.host;
    const headSize = await this.transport.exchange(requestTo(location, reference, { method: 'HEAD', headers: {}, signal, what }), async (res) => {
      await discard(res);
      return res.statusCode === 200 ? parseNonNegativeInt(firstHeader(res, 'content-length')) : undefined;
    });
    if (headSize !== undefined) return headSize;
    const get = requestTo(location, reference, { method: 'GET', headers: { range: 'bytes=0-1', 'accept-encoding': 'identity' }, signal, what });
    return this.transport.exchange(get, async (res) => {
      if (res.statusCode === 206) {
        const total = parseContentRange(firstHeader(res, 'content-range'))?.total;
        await discard(res);
        if (total !== undefined) return total;
        throw new RegistryError(`${what}: ${host} did not tell the blob size`, 206);
      }
      if (res.statusCode === 200) {
        const len = parseNonNegativeInt(firstHeader(res, 'content-length'));
        res.body.destroy();
        if (len !== undefined) return len;
        throw new RegistryError(`${what}: ${host} did not tell the blob size`, 200);
      }
      await discard(res);
      throw statusError(what, host, res.statusCode);
    });
  }
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
