/**
 * A private OCI registry (Debian's `docker-registry serve`, distribution 2.8) on 127.0.0.1 with
 * storage in a tmp dir, plus a byte-counting HTTP proxy in front of it. Pull through
 * `countingHost` to measure how many bytes of each blob a client really fetched.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { mkdir, writeFile } from 'node:fs/promises';
import { bestEffort, type CleanupScope } from './cleanup';
import { freePort, readTail, spawnGroup, waitFor, type ProcessGroup } from './exec';
import { createTmpRoot } from './tmp';

const REGISTRY_BIN = 'docker-registry';
const READY_TIMEOUT_MS = 30_000;
/** Attempts at picking a free port (another process may grab it between probe and bind). */
const PORT_ATTEMPTS = 3;
const BLOB_PATH_RE = /^\/v2\/(.+)\/blobs\/(sha256:[0-9a-f]{64})$/;

/** One request for a blob that went through the counting proxy. */
export interface BlobRequest {
  method: string;
  repo: string;
  digest: string;
  /** The Range request header, if any. */
  range?: string;
  status: number;
  /** Response body bytes sent to the client so far (the count grows while the response streams). */
  bytes: number;
}

/** A byte range `[from, to)` of a blob. */
export type ByteRange = [number, number];

/** `[from, to)` of a request's `bytes=a-b` range, or of a suffix `bytes=-n` of a blob of `size` bytes. */
export function rangeOf(q: BlobRequest, size: number): ByteRange | undefined {
  const suffix = /^bytes=-(\d+)$/.exec(q.range ?? '');
  if (suffix) return [Math.max(0, size - Number(suffix[1])), size];
  const m = /^bytes=(\d+)-(\d+)$/.exec(q.range ?? '');
  return m ? [Number(m[1]), Number(m[2]) + 1] : undefined;
}

/** Sorted, merged ranges: what a set of requests covered. */
export function unionOf(ranges: readonly ByteRange[]): ByteRange[] {
  const out: ByteRange[] = [];
  for (const [a, b] of [...ranges].sort((x, y) => x[0] - y[0])) {
    const last = out[out.length - 1];
    if (last !== undefined && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

export interface Registry {
  /** `127.0.0.1:<port>` of the registry itself (push here; not counted). */
  readonly host: string;
  /** `127.0.0.1:<port>` of the counting proxy (pull here to measure blob bytes). */
  readonly countingHost: string;
  /** Tmp dir holding the registry config, storage and log. */
  readonly dir: string;
  readonly logFile: string;
  /** Body bytes of blob GETs served through the proxy: for one digest, or all blobs. */
  bytesServed(digest?: string): number;
  /** Every blob request seen by the proxy, oldest first. */
  blobRequests(): BlobRequest[];
  /** Forgets the counted requests (e.g. after a warm-up pull). */
  resetCounters(): void;
  stop(): Promise<void>;
}

export interface RegistryOptions {
  /** Where to register `stop()`; without it the caller must call `stop()`. */
  scope?: CleanupScope;
}

function registryConfig(storageDir: string, port: number): string {
  return [
    'version: 0.1',
    'log:',
    '  level: warn',
    '  accesslog:',
    '    disabled: true',
    'storage:',
    '  filesystem:',
    `    rootdirectory: ${JSON.stringify(storageDir)}`,
    '  delete:',
    '    enabled: true',
    'http:',
    `  addr: 127.0.0.1:${port}`,
    '  secret: stargaze-e2e-not-a-secret',
    'health:',
    '  storagedriver:',
    '    enabled: false',
    '',
  ].join('\n');
}

async function v2Answers(host: string): Promise<boolean> {
  const res = await fetch(`http://${host}/v2/`, { signal: AbortSignal.timeout(2_000) });
  await res.arrayBuffer();
  return res.status === 200;
}

async function startRegistryProcess(dir: string): Promise<{ proc: ProcessGroup; host: string; logFile: string }> {
  const storageDir = path.join(dir, 'storage');
  await mkdir(storageDir, { recursive: true });
  const logFile = path.join(dir, 'registry.log');
  let lastError: unknown;
  for (let attempt = 0; attempt < PORT_ATTEMPTS; attempt++) {
    const port = await freePort();
    const configFile = path.join(dir, 'config.yml');
    await writeFile(configFile, registryConfig(storageDir, port));
    const proc = spawnGroup(REGISTRY_BIN, ['serve', configFile], { stdoutFile: logFile });
    const host = `127.0.0.1:${port}`;
    try {
      await waitFor(`registry on ${host}`, () => v2Answers(host), {
        timeoutMs: READY_TIMEOUT_MS,
        abortIf: () => (proc.isRunning() ? undefined : 'docker-registry exited'),
      });
      return { proc, host, logFile };
    } catch (err) {
      lastError = err;
      await proc.kill();
    }
  }
  const log = await readTail(logFile);
  throw new Error(`could not start docker-registry: ${String(lastError)}\n--- registry log ---\n${log}`);
}

/** Forwards every request to `upstream` unchanged and counts body bytes of blob GETs. */
async function startCountingProxy(
  upstreamPort: number,
  record: (r: BlobRequest) => void,
): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    const url = req.url ?? '/';
    const blob = BLOB_PATH_RE.exec(url.split('?')[0]!);
    const upstream = http.request(
      { host: '127.0.0.1', port: upstreamPort, method: req.method, path: url, headers: req.headers },
      (up) => {
        res.writeHead(up.statusCode ?? 502, up.statusMessage, up.headers);
        // Recorded as soon as the response starts and its bytes counted as they go, so a reader of the counters
        // sees requests still streaming (a background fetch at the end of a benchmark run) too.
        const counted: BlobRequest | undefined =
          blob && req.method === 'GET'
            ? {
                method: req.method,
                repo: blob[1]!,
                digest: blob[2]!,
                range: typeof req.headers.range === 'string' ? req.headers.range : undefined,
                status: up.statusCode ?? 0,
                bytes: 0,
              }
            : undefined;
        if (counted) record(counted);
        up.on('data', (chunk: Buffer) => {
          if (counted) counted.bytes += chunk.length;
        });
        up.pipe(res);
      },
    );
    upstream.on('error', (err) => {
      if (!res.headersSent) res.writeHead(502, { 'content-type': 'text/plain' });
      res.end(`counting proxy: ${err.message}`);
    });
    req.pipe(upstream);
    res.on('close', () => {
      if (!res.writableFinished) upstream.destroy();
    });
  });
  server.keepAliveTimeout = 1_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  return server;
}

/** Starts the registry and its counting proxy; both are ready when this resolves. */
export async function startRegistry(opts: RegistryOptions = {}): Promise<Registry> {
  const tmp = await createTmpRoot('registry');
  const dir = tmp.dir;
  let proc: ProcessGroup | undefined;
  let proxy: http.Server | undefined;
  let stopped: Promise<void> | undefined;
  const requests: BlobRequest[] = [];
  const stop = (): Promise<void> =>
    (stopped ??= (async () => {
      if (proxy) {
        const p = proxy;
        await bestEffort('stop counting proxy', () => {
          p.closeAllConnections();
          return new Promise<void>((r) => p.close(() => r()));
        });
      }
      if (proc) await bestEffort('stop registry', () => proc!.stop());
      await tmp.remove();
    })());
  opts.scope?.after(stop);
  try {
    const started = await startRegistryProcess(dir);
    proc = started.proc;
    const upstreamPort = Number(started.host.split(':')[1]);
    proxy = await startCountingProxy(upstreamPort, (r) => requests.push(r));
    const countingHost = `127.0.0.1:${(proxy.address() as AddressInfo).port}`;
    return {
      host: started.host,
      countingHost,
      dir,
      logFile: started.logFile,
      bytesServed: (digest) =>
        requests.filter((r) => digest === undefined || r.digest === digest).reduce((n, r) => n + r.bytes, 0),
      blobRequests: () => requests.map((r) => ({ ...r })),
      resetCounters: () => {
        requests.length = 0;
      },
      stop,
    };
  } catch (err) {
    if (!opts.scope) await stop();
    throw err;
  }
}
