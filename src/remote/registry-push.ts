/**
 * Pushing an image to a registry (distribution spec "push"): blobs first, each skipped when a HEAD says the
 * registry already has it, else one monolithic upload (POST /v2/<name>/blobs/uploads/, then PUT <location>
 * ?digest=<digest> with the whole blob streamed as the body); manifests last, so a failure part way never
 * leaves a half image under the destination tag.
 *
 * Endpoints come from hosts.toml like everything else (the first host with the `push` capability), and auth
 * goes through the RegistryClient's authorizer with a `repository:<name>:pull,push` scope, so credentials,
 * token caching and Docker Hub's host mapping are shared with pulls. Bodies are re-opened through a factory
 * when a 401 forces a retry, so nothing is buffered.
 *
 * Error messages name the registry host, the repository and the digest or tag; never credentials.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { Transform, pipeline, type Readable, type TransformCallback } from 'node:stream';
import type { Dispatcher } from 'undici';
import { Agent } from './undici-dispatchers';
import { secureContextFor } from './trust';
import { ConfigError, RegistryAuthError, RegistryError, errorCode, errorMessage } from '../errors';
import { log as rootLog, type Logger } from '../log';
import { resolveHosts, type RegistryEndpoint } from './hosts';
import { isDockerHub, parseReference, validateDigest, type ImageReference } from './reference';
import type { RegistryClient } from './registry-client';

/** Bound on every small request (HEAD, POST, manifest PUT), end to end. */
export const PUSH_REQUEST_TIMEOUT_MS = 30_000;
/** Idle bound while a blob body is uploading, and the wait for the registry's answer after it. */
export const PUSH_BLOB_IDLE_TIMEOUT_MS = 300_000;
/** Connections per origin: layers upload in parallel. */
const PUSH_CONNECTIONS = 8;
/** Bytes of an error body kept for the message. */
const ERROR_BODY_BYTES = 4096;

export interface RegistryPusherOptions {
  /** Lends its authorizer (credentials, token cache). */
  client: RegistryClient;
  hostsDir?: string;
  log?: Logger;
}

export type PushOutcome = 'pushed' | 'exists';

/** `repository:<name>:pull,push`. */
export function pushScope(repository: string): string {
  return `repository:${repository}:pull,push`;
}

interface Request {
  method: 'HEAD' | 'POST' | 'PUT' | 'GET';
  url: URL;
  headers?: Record<string, string>;
  /** A fresh body per attempt (a 401 retry needs a second one). */
  body?: () => Readable | Buffer | Promise<Readable | Buffer>;
  timeoutMs: number;
  idleMs: number;
}

export class RegistryPusher {
  readonly reference: ImageReference;
  private readonly client: RegistryClient;
  private readonly hostsDir: string | undefined;
  private readonly log: Logger;
  private readonly scope: string;
  private endpoint: Promise<{ endpoint: RegistryEndpoint; agent: Agent }> | undefined;

  constructor(ref: string | ImageReference, opts: RegistryPusherOptions) {
    this.reference = typeof ref === 'string' ? parseReference(ref) : ref;
    this.client = opts.client;
    this.hostsDir = opts.hostsDir;
    this.log = opts.log ?? rootLog.child({ module: 'remote' });
    this.scope = pushScope(this.reference.repository);
  }

  async close(): Promise<void> {
    const e = this.endpoint;
    this.endpoint = undefined;
    if (e !== undefined) await (await e.catch(() => undefined))?.agent.close().catch(() => undefined);
  }

  /** Whether the repository already holds `digest` (HEAD answers 200). */
  async blobExists(digest: string, signal?: AbortSignal): Promise<boolean> {
    validateDigest(digest, 'blob digest');
    const { endpoint } = await this.target();
    const what = `blob ${digest} of ${this.reference.name}`;
    const res = await this.send({ method: 'HEAD', url: this.url(endpoint, 'blobs', digest), timeoutMs: PUSH_REQUEST_TIMEOUT_MS, idleMs: PUSH_REQUEST_TIMEOUT_MS }, what, signal);
    await discard(res);
    if (res.statusCode === 200) return true;
    if (res.statusCode === 404) return false;
    throw statusError(`checking ${what}`, endpoint.host, res.statusCode, '');
  }

  /**
   * Uploads a blob unless the registry has it. `open` gives the bytes (called again if auth must be redone);
   * `onBytes` sees upload progress.
   */
  async pushBlob(
    digest: string,
    size: number,
    open: () => Readable | Buffer | Promise<Readable | Buffer>,
    opts: { signal?: AbortSignal; onBytes?: (n: number) => void } = {},
  ): Promise<PushOutcome> {
    if (await this.blobExists(digest, opts.signal)) return 'exists';
    const { endpoint } = await this.target();
    const what = `blob ${digest} of ${this.reference.name}`;
    const start = await this.send(
      { method: 'POST', url: this.url(endpoint, 'blobs', 'uploads/'), headers: { 'content-length': '0' }, timeoutMs: PUSH_REQUEST_TIMEOUT_MS, idleMs: PUSH_REQUEST_TIMEOUT_MS },
      `starting the upload of ${what}`,
      opts.signal,
    );
    if (start.statusCode !== 202) throw statusError(`starting the upload of ${what}`, endpoint.host, start.statusCode, await errorBody(start));
    const location = firstHeader(start, 'location');
    await discard(start);
    if (location === undefined) throw new RegistryError(`starting the upload of ${what}: ${endpoint.host} sent no Location`, 202);
    const put = new URL(location, this.url(endpoint, 'blobs', 'uploads/'));
    put.searchParams.set('digest', digest);
    const res = await this.send(
      {
        method: 'PUT',
        url: put,
        headers: { 'content-type': 'application/octet-stream', 'content-length': String(size) },
        body: async () => {
          const body = await open();
          if (Buffer.isBuffer(body)) {
            opts.onBytes?.(body.length);
            return body;
          }
          if (opts.onBytes === undefined) return body;
          const counter = new ByteCounter(opts.onBytes);
          pipeline(body, counter, () => undefined);
          return counter;
        },
        timeoutMs: 0,
        idleMs: PUSH_BLOB_IDLE_TIMEOUT_MS,
      },
      `uploading ${what}`,
      opts.signal,
    );
    if (res.statusCode !== 201) throw statusError(`uploading ${what}`, endpoint.host, res.statusCode, await errorBody(res));
    await discard(res);
    this.log.debug({ host: endpoint.host, repository: this.reference.repository, digest, size }, 'blob pushed');
    return 'pushed';
  }

  /** PUTs a manifest or index under `tagOrDigest`; returns its digest. */
  async pushManifest(tagOrDigest: string, mediaType: string, body: Buffer, signal?: AbortSignal): Promise<string> {
    return (await this.putManifest(tagOrDigest, mediaType, body, signal)).digest;
  }

  /**
   * PUTs a manifest that has a `subject` by its digest. `indexed`: the registry said (`OCI-Subject`) that its
   * referrers API lists it now, so the referrers tag schema need not be updated (distribution spec, "Pushing
   * Manifests with Subject").
   */
  async pushReferrer(mediaType: string, body: Buffer, signal?: AbortSignal): Promise<{ digest: string; indexed: boolean }> {
    const digest = 'sha256:' + createHash('sha256').update(body).digest('hex');
    const { subject } = await this.putManifest(digest, mediaType, body, signal);
    return { digest, indexed: subject !== undefined };
  }

  private async putManifest(tagOrDigest: string, mediaType: string, body: Buffer, signal?: AbortSignal): Promise<{ digest: string; subject: string | undefined }> {
    const digest = 'sha256:' + createHash('sha256').update(body).digest('hex');
    const { endpoint } = await this.target();
    const what = `manifest ${tagOrDigest} of ${this.reference.name}`;
    const res = await this.send(
      {
        method: 'PUT',
        url: this.url(endpoint, 'manifests', tagOrDigest),
        headers: { 'content-type': mediaType, 'content-length': String(body.length) },
        body: () => body,
        timeoutMs: PUSH_REQUEST_TIMEOUT_MS,
        idleMs: PUSH_REQUEST_TIMEOUT_MS,
      },
      `pushing ${what}`,
      signal,
    );
    if (res.statusCode !== 201 && res.statusCode !== 200) throw statusError(`pushing ${what}`, endpoint.host, res.statusCode, await errorBody(res));
    const echoed = firstHeader(res, 'docker-content-digest');
    const subject = firstHeader(res, 'oci-subject');
    await discard(res);
    if (echoed !== undefined && echoed !== digest) throw new RegistryError(`pushing ${what}: ${endpoint.host} stored it as ${echoed}, expected ${digest}`);
    return { digest, subject };
  }

  // ---------------------------------------------------------------------------------------------------------

  private target(): Promise<{ endpoint: RegistryEndpoint; agent: Agent }> {
    this.endpoint ??= (async () => {
      const resolution = await resolveHosts(this.reference.domain, this.hostsDir);
      for (const w of resolution.warnings) this.log.warn(w);
      const endpoint = resolution.endpoints.find((e) => e.capabilities.includes('push'));
      if (endpoint === undefined) throw new ConfigError(`no registry host for ${this.reference.domain} has the push capability${resolution.source !== undefined ? ` in ${resolution.source}` : ''}`);
      return { endpoint, agent: await createAgent(endpoint) };
    })();
    return this.endpoint;
  }

  private url(endpoint: RegistryEndpoint, kind: 'blobs' | 'manifests', object: string): URL {
    const prefix = endpoint.path.replace(/\/+$/, '');
    const url = new URL(`${endpoint.scheme}://${endpoint.host}${prefix}/${this.reference.repository}/${kind}/${object}`);
    const isOrigin = endpoint.host === this.reference.domain || (isDockerHub(endpoint.host) && isDockerHub(this.reference.domain));
    if (!isOrigin) url.searchParams.set('ns', this.reference.domain);
    return url;
  }

  /** One request with auth: on 401, authenticates for the push scope and retries once with a fresh body. */
  private async send(req: Request, what: string, signal: AbortSignal | undefined): Promise<Dispatcher.ResponseData> {
    const { endpoint, agent } = await this.target();
    const sameOrigin = req.url.host === endpoint.host;
    let authorization = sameOrigin ? this.client.authorizer.cached(endpoint.host, this.scope) : undefined;
    const first = await this.exchange(agent, endpoint, req, authorization, sameOrigin, what, signal);
    if (first.statusCode !== 401 || !sameOrigin) return first;
    const challenge = first.headers['www-authenticate'];
    await discard(first);
    try {
      authorization = await this.client.authorizer.authorize(endpoint.host, this.scope, challenge, authorization, signal);
    } catch (err) {
      if (err instanceof RegistryAuthError) throw new RegistryAuthError(`${what}: ${err.message}`);
      throw err;
    }
    const second = await this.exchange(agent, endpoint, req, authorization, sameOrigin, what, signal);
    if (second.statusCode === 401) {
      await discard(second);
      throw new RegistryAuthError(`${what}: registry ${endpoint.host} still answered 401 after authenticating for ${this.scope}`);
    }
    return second;
  }

  private async exchange(
    agent: Agent,
    endpoint: RegistryEndpoint,
    req: Request,
    authorization: string | undefined,
    sameOrigin: boolean,
    what: string,
    signal: AbortSignal | undefined,
  ): Promise<Dispatcher.ResponseData> {
    const headers: Record<string, string | string[]> = {};
    if (sameOrigin) for (const [k, v] of Object.entries(endpoint.headers)) headers[k] = [...v];
    Object.assign(headers, req.headers);
    if (authorization !== undefined) headers.authorization = authorization;
    const timeout = req.timeoutMs > 0 ? AbortSignal.timeout(req.timeoutMs) : undefined;
    const combined = signal !== undefined && timeout !== undefined ? AbortSignal.any([signal, timeout]) : (signal ?? timeout);
    const body = req.body === undefined ? undefined : await req.body();
    try {
      return await agent.request({
        origin: req.url.origin,
        path: req.url.pathname + req.url.search,
        method: req.method,
        headers,
        body,
        signal: combined,
        headersTimeout: req.idleMs,
        bodyTimeout: req.idleMs,
      });
    } catch (err) {
      if (signal?.aborted === true) throw err;
      if (timeout?.aborted === true) throw new RegistryError(`${what}: ${req.url.host} did not answer within ${req.timeoutMs} ms`);
      const code = errorCode(err);
      throw new RegistryError(`${what}: request to ${req.url.host} failed: ${code !== undefined ? `${code}: ` : ''}${errorMessage(err)}`);
    } finally {
      if (body !== undefined && !Buffer.isBuffer(body) && !body.destroyed) body.destroy();
    }
  }
}

async function createAgent(endpoint: RegistryEndpoint): Promise<Agent> {
  const connect: Record<string, unknown> = { rejectUnauthorized: !endpoint.skipVerify };
  const hostCas = await Promise.all(endpoint.caFiles.map((f) => readTls(f, 'ca')));
  const client = endpoint.clientCerts[0];
  const cert = client === undefined ? undefined : await readTls(client.certFile, 'client certificate');
  const key = client === undefined ? undefined : client.keyFile === undefined ? cert : await readTls(client.keyFile, 'client key');
  const secureContext = await secureContextFor({ hostCas, cert, key });
  if (secureContext !== undefined) connect.secureContext = secureContext;
  return new Agent({ connections: PUSH_CONNECTIONS, connect });
}

async function readTls(file: string, what: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    throw new RegistryError(`cannot read TLS ${what} file ${file}: ${errorCode(err) ?? 'read error'}`);
  }
}

function firstHeader(res: Dispatcher.ResponseData, name: string): string | undefined {
  const v = res.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

async function discard(res: Dispatcher.ResponseData): Promise<void> {
  try {
    await res.body.dump({ limit: 64 * 1024 });
  } catch {
    // the connection is dropped either way
  }
}

/** The registry's error JSON, shortened: `CODE: message` of the first error, else a text snippet. */
async function errorBody(res: Dispatcher.ResponseData): Promise<string> {
  let text = '';
  try {
    for await (const chunk of res.body as AsyncIterable<Buffer>) {
      text += chunk.toString('utf8');
      if (text.length >= ERROR_BODY_BYTES) break;
    }
  } catch {
    return '';
  } finally {
    res.body.destroy();
  }
  try {
    const doc = JSON.parse(text) as { errors?: Array<{ code?: unknown; message?: unknown }> };
    const e = doc.errors?.[0];
    if (e !== undefined) return `${errorField(e.code)}: ${errorField(e.message)}`;
  } catch {
    // not JSON
  }
  return text.slice(0, 200).replace(/\s+/g, ' ').trim();
}

/** One field of a registry error as text: the spec says string, but a registry may send an object or nothing. */
function errorField(v: unknown): string {
  if (v === undefined || v === null) return '';
  return typeof v === 'string' ? v : JSON.stringify(v);
}

function statusError(what: string, host: string, status: number, detail: string): RegistryError {
  const why = status === 404 ? 'not found' : status === 403 ? 'access denied' : status === 401 ? 'unauthorized' : status >= 500 ? 'server error' : 'unexpected answer';
  return new RegistryError(`${what}: ${host} answered HTTP ${status} (${why})${detail !== '' ? `: ${detail}` : ''}`, status);
}

/** Counts bytes as they pass. */
class ByteCounter extends Transform {
  constructor(private readonly onBytes: (n: number) => void) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.onBytes(chunk.length);
    cb(null, chunk);
  }
}
