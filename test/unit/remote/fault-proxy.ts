/**
 * A fault-injecting HTTP proxy for tests: node:http on 127.0.0.1 in front of a real registry. Faults apply to
 * blob requests (paths with `/blobs/sha256:`) and can be limited to the next N of them; everything else is
 * forwarded untouched. Faults:
 *   reset            the connection is destroyed before any answer
 *   reset-mid-body   the answer starts, then the connection is destroyed after `afterBytes` body bytes
 *   stall            the request is accepted and never answered
 *   status           answer `status` (with Retry-After when `retryAfterSec` is set)
 *   ignore-range     Range is dropped: the registry answers 200 with the whole blob
 *   reject-multi-range  400 for a Range with more than one range
 *   ignore-multi-range  a Range with more than one range is dropped: 200 with the whole blob (single ranges pass)
 *   strip-content-type  206 answers lose their Content-Type
 *   redirect         307 to a storage URL on this proxy that expires after `ttlMs` (then 403, as S3 does)
 *   corrupt          one body byte is flipped (for digest checks)
 */
import { request as httpRequest, createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

export type Fault =
  | { kind: 'none' }
  | { kind: 'reset'; times?: number }
  | { kind: 'reset-mid-body'; afterBytes?: number; times?: number }
  | { kind: 'stall'; times?: number }
  | { kind: 'status'; status: number; retryAfterSec?: number; times?: number }
  | { kind: 'ignore-range' }
  | { kind: 'reject-multi-range' }
  | { kind: 'ignore-multi-range' }
  | { kind: 'strip-content-type' }
  | { kind: 'redirect'; ttlMs: number }
  | { kind: 'corrupt'; times?: number };

export interface ProxyRequest {
  method: string;
  url: string;
  range: string | undefined;
  /** The fault applied to it, 'none' when forwarded as is. */
  fault: Fault['kind'];
  at: number;
}

export interface FaultProxy {
  readonly host: string;
  readonly port: number;
  readonly requests: ProxyRequest[];
  /** Highest number of blob requests in progress at once. */
  readonly maxConcurrentBlobRequests: number;
  /** Applies `f` to blob requests from now on; with `digest`, only to that blob's. */
  setFault(f: Fault, opts?: { digest?: string }): void;
  /** Blob requests seen so far. */
  blobRequests(): ProxyRequest[];
  close(): Promise<void>;
}

const STORAGE_PREFIX = '/_storage';

export async function startFaultProxy(target: () => string, opts: { port?: number } = {}): Promise<FaultProxy> {
  let fault: Fault = { kind: 'none' };
  let onlyDigest: string | undefined;
  let left = Infinity;
  const requests: ProxyRequest[] = [];
  const sockets = new Set<Socket>();
  let active = 0;
  let maxActive = 0;
  let signatures = 0;

  const take = (): Fault => {
    if (fault.kind === 'none') return fault;
    if (left <= 0) return { kind: 'none' };
    left--;
    return fault;
  };

  const server: Server = createServer((req, res) => {
    const url = req.url ?? '/';
    const isStorage = url.startsWith(STORAGE_PREFIX);
    const isBlob = /\/blobs\/sha256:[0-9a-f]{64}/.test(url) && (req.method === 'GET' || req.method === 'HEAD');
    const targeted = onlyDigest === undefined || url.includes(onlyDigest);
    const f = isBlob && !isStorage && targeted ? take() : ({ kind: 'none' } as Fault);
    requests.push({ method: req.method ?? '', url, range: req.headers.range, fault: f.kind, at: Date.now() });
    if (isBlob) {
      active++;
      maxActive = Math.max(maxActive, active);
      res.once('close', () => active--);
    }
    if (isStorage) {
      const u = new URL(url, 'http://x');
      const expires = Number(u.searchParams.get('expires'));
      if (!(Date.now() < expires)) {
        res.writeHead(403, { 'content-type': 'application/xml' });
        res.end('<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>');
        return;
      }
      pass(req, res, url.slice(STORAGE_PREFIX.length).replace(/\?.*$/, ''), {});
      return;
    }
    switch (f.kind) {
      case 'none':
        pass(req, res, url, {});
        return;
      case 'reset':
        req.socket.destroy();
        return;
      case 'stall':
        return; // never answered; close() destroys the socket
      case 'status':
        res.writeHead(f.status, {
          'content-type': 'application/json',
          ...(f.retryAfterSec !== undefined ? { 'retry-after': String(f.retryAfterSec) } : {}),
        });
        res.end(`{"errors":[{"code":"UNAVAILABLE","message":"injected ${f.status}"}]}`);
        return;
      case 'ignore-range':
        pass(req, res, url, { dropRange: true });
        return;
      case 'reject-multi-range':
        if ((req.headers.range ?? '').includes(',')) {
          res.writeHead(400, { 'content-type': 'text/plain' });
          res.end('multiple ranges not supported');
          return;
        }
        pass(req, res, url, {});
        return;
      case 'ignore-multi-range':
        pass(req, res, url, { dropRange: (req.headers.range ?? '').includes(',') });
        return;
      case 'strip-content-type':
        pass(req, res, url, { stripContentType: true });
        return;
      case 'redirect': {
        const expires = Date.now() + f.ttlMs;
        const location = `http://${hostOf()}${STORAGE_PREFIX}${url.replace(/\?.*$/, '')}?expires=${expires}&sig=secret-sig-${++signatures}`;
        res.writeHead(307, { location });
        res.end();
        return;
      }
      case 'reset-mid-body':
        pass(req, res, url, { cutAfter: f.afterBytes ?? 1000 });
        return;
      case 'corrupt':
        pass(req, res, url, { corrupt: true });
        return;
    }
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });

  function pass(
    req: IncomingMessage,
    res: ServerResponse,
    path: string,
    how: { dropRange?: boolean; stripContentType?: boolean; cutAfter?: number; corrupt?: boolean },
  ): void {
    const [hostname, port] = target().split(':');
    const headers = { ...req.headers, host: target() };
    if (how.dropRange === true) delete headers.range;
    const upstream = httpRequest({ hostname, port: Number(port), method: req.method, path, headers }, (up) => {
      const h = { ...up.headers };
      if (how.stripContentType === true && up.statusCode === 206) delete h['content-type'];
      res.writeHead(up.statusCode ?? 502, h);
      let sent = 0;
      let corrupted = false;
      up.on('data', (chunk: Buffer) => {
        if (how.corrupt === true && !corrupted && chunk.length > 0) {
          chunk = Buffer.from(chunk);
          chunk[0] = (chunk[0] as number) ^ 0xff;
          corrupted = true;
        }
        if (how.cutAfter !== undefined && sent + chunk.length >= how.cutAfter) {
          res.write(chunk.subarray(0, Math.max(0, how.cutAfter - sent)));
          up.destroy();
          // Give the bytes a moment to leave, then drop the connection mid-body.
          setTimeout(() => res.socket?.destroy(), 20);
          return;
        }
        sent += chunk.length;
        if (!res.write(chunk)) {
          up.pause();
          res.once('drain', () => up.resume());
        }
      });
      up.on('end', () => res.end());
      up.on('error', () => res.destroy());
    });
    upstream.on('error', () => {
      if (!res.headersSent) res.writeHead(502);
      res.end();
    });
    req.pipe(upstream);
  }

  await new Promise<void>((resolve) => server.listen(opts.port ?? 0, '127.0.0.1', resolve));
  const addr = server.address();
  const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
  // Storage URLs live on a second port: another origin, as S3 is for a real registry.
  const storage: Server = createServer((req, res) => server.emit('request', req, res));
  storage.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => storage.listen(0, '127.0.0.1', resolve));
  const saddr = storage.address();
  const storagePort = typeof saddr === 'object' && saddr !== null ? saddr.port : 0;
  const hostOf = (): string => `127.0.0.1:${storagePort}`;
  return {
    host: `127.0.0.1:${port}`,
    port,
    requests,
    get maxConcurrentBlobRequests() {
      return maxActive;
    },
    setFault(f: Fault, o?: { digest?: string }) {
      fault = f;
      onlyDigest = o?.digest;
      left = 'times' in f && f.times !== undefined ? f.times : Infinity;
      maxActive = active;
    },
    blobRequests: () => requests.filter((r) => /\/blobs\//.test(r.url)),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        storage.close();
        server.close(() => resolve());
      }),
  };
}
