/**
 * The one request function under every transport layer: keep-alive undici pools, one per (origin, TLS
 * settings, client certificate), each with its TLS context built once. Failures come out raw (undici's and
 * node's errors); the layer above (transport-certs.ts) classifies them.
 */
import { readFile } from 'node:fs/promises';
import type { Dispatcher } from 'undici';
import { RegistryError, errorCode } from '../errors';
import { secureContextFor } from './trust';
import { DEFAULT_TLS, tlsOf, type HttpRequest, type TlsSettings } from './transport-interface';
import { Pool } from './undici-dispatchers';

/** Idle keep-alive sockets are closed after this (undici's default is only 4 s). */
export const KEEP_ALIVE_TIMEOUT_MS = 30_000;

export interface TransportPoolsOptions {
  /** Connections kept per origin. */
  connectionsPerOrigin: number;
  /** Idle limit (headers, gap between body chunks) of requests with these TLS settings; null: none. */
  idleTimeoutFor: (tls: TlsSettings) => number | null;
}

/** An origin with its TLS settings: what pools and the client certificate choice are kept for. */
export function tlsKey(url: URL, tls: TlsSettings): string {
  return `${url.origin}|${tls.skipVerify}|${tls.caFiles.join(',')}|${tls.clientCerts.map((c) => `${c.certFile}:${c.keyFile}`).join(',')}`;
}

export class TransportPools {
  /** One keep-alive pool per (origin, TLS settings, client certificate). */
  private readonly pools = new Map<string, Promise<Pool>>();
  /** After close(): no new pools, and failures are final. */
  closed = false;

  constructor(private readonly opts: TransportPoolsOptions) {}

  /** Sends `req` once, presenting client certificate `certIndex` of its endpoint's (if it has any). */
  async request(req: HttpRequest, certIndex: number): Promise<Dispatcher.ResponseData> {
    const tls = tlsOf(req);
    const pool = await this.poolFor(req.url, tls, certIndex);
    const idle = this.opts.idleTimeoutFor(tls) ?? 0; // undici: 0 disables
    return pool.request({
      path: req.url.pathname + req.url.search,
      method: req.method,
      headers: req.headers,
      body: req.body,
      signal: req.signal,
      headersTimeout: idle,
      bodyTimeout: idle,
    });
  }

  /** Closes every pool; in-flight requests fail. */
  async close(): Promise<void> {
    this.closed = true;
    const pools = [...this.pools.values()];
    this.pools.clear();
    await Promise.all(pools.map(async (p) => (await p).destroy().catch(() => undefined)));
  }

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
    const { connectionsPerOrigin: connections } = this.opts;
    // Plain HTTP: no TLS context to build (one with the roots costs tens of ms of CPU).
    if (!origin.startsWith('https:')) return new Pool(origin, { connections, keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS });
    const connect: Record<string, unknown> = { rejectUnauthorized: !tls.skipVerify };
    // hosts.toml `ca` adds to the default trust (trust.ts); one context for the pool's connections.
    const hostCas = await Promise.all(tls.caFiles.map((f) => readTlsFile(f, 'ca')));
    const c = tls.clientCerts[certIndex];
    const cert = c === undefined ? undefined : await readTlsFile(c.certFile, 'client certificate');
    const key = c === undefined ? undefined : c.keyFile === undefined ? cert : await readTlsFile(c.keyFile, 'client key');
    const secureContext = await secureContextFor({ hostCas, cert, key });
    if (secureContext !== undefined) connect.secureContext = secureContext;
    return new Pool(origin, { connections, keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS, connect });
  }
}

async function readTlsFile(file: string, what: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    throw new RegistryError(`cannot read TLS ${what} file ${file}: ${errorCode(err) ?? 'read error'}`);
  }
}
