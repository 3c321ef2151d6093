/**
 * Test harness: a real Debian `docker-registry` (distribution v2) on 127.0.0.1, plus the small HTTP fakes the
 * registry-client tests put in front of it. Everything started here is stopped by `stop()`, and a process
 * 'exit' hook kills whatever a crashed test left running.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer as createHttpServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { request } from 'undici';

export const REGISTRY_BIN = '/usr/bin/docker-registry';
const READY_TIMEOUT_MS = 15_000;
const READY_POLL_MS = 50;
const KILL_GRACE_MS = 2_000;

const execFileAsync = promisify(execFile);

/** Children alive right now; killed on process exit so a crashed test leaves nothing behind. */
const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createNetServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

export function sha256(data: Buffer): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/**
 * A bcrypt hash for the registry's htpasswd file (distribution accepts bcrypt only). Uses apache2-utils'
 * `htpasswd -nbB`, else python3's crypt module (glibc/libxcrypt bcrypt). Returns undefined when neither works.
 */
export async function bcryptLine(user: string, password: string): Promise<string | undefined> {
  try {
    const { stdout } = await execFileAsync('htpasswd', ['-nbB', user, password]);
    const line = stdout.trim();
    if (line.startsWith(`${user}:$2`)) return line;
  } catch {
    // fall through
  }
  try {
    const { stdout } = await execFileAsync('python3', [
      '-W',
      'ignore',
      '-c',
      'import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))',
      password,
    ]);
    const hash = stdout.trim();
    if (hash.startsWith('$2')) return `${user}:${hash}`;
  } catch {
    // fall through
  }
  return undefined;
}

export interface RunningRegistry {
  readonly port: number;
  /** `127.0.0.1:<port>` */
  readonly host: string;
  /** Registry stderr so far, for failure messages. */
  output(): string;
  stop(): Promise<void>;
}

export interface StartRegistryOptions {
  htpasswdLine?: string;
  /** Listen here (e.g. to restart a stopped registry at the same address); default a free port. */
  port?: number;
  /** Storage root owned by the caller: kept on stop(), so a restarted registry has the same blobs. */
  dataDir?: string;
  /** Run as a pull-through cache of this registry URL (distribution's `proxy.remoteurl`). */
  proxyRemoteUrl?: string;
}

export async function startRegistry(opts: StartRegistryOptions = {}): Promise<RunningRegistry> {
  const dir = await mkdtemp(join(tmpdir(), 'stargaze-registry-'));
  let child: ChildProcess | undefined;
  const stop = async (): Promise<void> => {
    if (child !== undefined && child.exitCode === null && child.signalCode === null) {
      const c = child;
      const exited = new Promise<void>((resolve) => c.once('exit', () => resolve()));
      c.kill('SIGTERM');
      const timer = setTimeout(() => c.kill('SIGKILL'), KILL_GRACE_MS);
      await exited;
      clearTimeout(timer);
    }
    if (child !== undefined) live.delete(child);
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const port = opts.port ?? (await freePort());
    const auth =
      opts.htpasswdLine === undefined
        ? ''
        : `auth:\n  htpasswd:\n    realm: stargaze-test\n    path: ${join(dir, 'htpasswd')}\n`;
    if (opts.htpasswdLine !== undefined) await writeFile(join(dir, 'htpasswd'), opts.htpasswdLine + '\n');
    const config =
      `version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n` +
      `storage:\n  filesystem:\n    rootdirectory: ${opts.dataDir ?? join(dir, 'data')}\n  delete:\n    enabled: true\n` +
      `http:\n  addr: 127.0.0.1:${port}\n  secret: stargaze-test-secret\n` +
      (opts.proxyRemoteUrl === undefined ? '' : `proxy:\n  remoteurl: ${opts.proxyRemoteUrl}\n`) +
      auth;
    await writeFile(join(dir, 'config.yml'), config);
    let output = '';
    const c = spawn(REGISTRY_BIN, ['serve', join(dir, 'config.yml')], { stdio: ['ignore', 'pipe', 'pipe'] });
    child = c;
    live.add(c);
    c.stdout?.on('data', (d: Buffer) => (output += d.toString()));
    c.stderr?.on('data', (d: Buffer) => (output += d.toString()));
    const spawnError = new Promise<never>((_, reject) => c.once('error', reject));
    const host = `127.0.0.1:${port}`;
    const deadline = Date.now() + READY_TIMEOUT_MS;
    for (;;) {
      if (c.exitCode !== null) throw new Error(`docker-registry exited early (${c.exitCode}): ${output}`);
      try {
        const res = await Promise.race([request(`http://${host}/v2/`), spawnError]);
        await res.body.dump();
        break;
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`docker-registry did not come up: ${String(err)}: ${output}`, { cause: err });
        await new Promise((r) => setTimeout(r, READY_POLL_MS));
      }
    }
    return { port, host, output: () => output, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

function basicHeader(auth: { username: string; password: string } | undefined): Record<string, string> {
  return auth === undefined ? {} : { authorization: `Basic ${Buffer.from(`${auth.username}:${auth.password}`).toString('base64')}` };
}

/** Monolithic blob upload: POST /blobs/uploads/ then PUT <location>&digest=. */
export async function pushBlob(host: string, repo: string, data: Buffer, auth?: { username: string; password: string }): Promise<string> {
  const digest = sha256(data);
  const start = await request(`http://${host}/v2/${repo}/blobs/uploads/`, { method: 'POST', headers: basicHeader(auth) });
  await start.body.dump();
  if (start.statusCode !== 202) throw new Error(`upload start: HTTP ${start.statusCode}`);
  const location = start.headers.location;
  if (typeof location !== 'string') throw new Error('upload start: no Location');
  const url = new URL(location, `http://${host}`);
  url.searchParams.set('digest', digest);
  const put = await request(url, {
    method: 'PUT',
    headers: { ...basicHeader(auth), 'content-type': 'application/octet-stream', 'content-length': String(data.length) },
    body: data,
  });
  await put.body.dump();
  if (put.statusCode !== 201) throw new Error(`upload finish: HTTP ${put.statusCode}`);
  return digest;
}

export async function pushManifest(
  host: string,
  repo: string,
  tag: string,
  manifest: Buffer,
  mediaType: string,
  auth?: { username: string; password: string },
): Promise<string> {
  const res = await request(`http://${host}/v2/${repo}/manifests/${tag}`, {
    method: 'PUT',
    headers: { ...basicHeader(auth), 'content-type': mediaType },
    body: manifest,
  });
  const text = await res.body.text();
  if (res.statusCode !== 201) throw new Error(`manifest put: HTTP ${res.statusCode}: ${text}`);
  return sha256(manifest);
}

export interface FakeServer {
  readonly port: number;
  readonly host: string;
  /** Requests seen: method, url, selected headers. */
  readonly requests: { method: string; url: string; range: string | undefined; authorization: string | undefined }[];
  close(): Promise<void>;
}

/** An HTTP server on 127.0.0.1 with a handler; records every request. */
export async function startFakeServer(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<FakeServer> {
  const requests: FakeServer['requests'] = [];
  const server: Server = createHttpServer((req, res) => {
    requests.push({ method: req.method ?? '', url: req.url ?? '', range: req.headers.range, authorization: req.headers.authorization });
    handler(req, res);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address();
  const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
  return {
    port,
    host: `127.0.0.1:${port}`,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** Forwards a request to `target` (host:port), optionally rewriting its headers. */
export function forward(
  req: IncomingMessage,
  res: ServerResponse,
  target: string,
  rewrite: (headers: Record<string, string | string[] | undefined>) => void = () => undefined,
): void {
  const headers: Record<string, string | string[] | undefined> = { ...req.headers, host: target };
  rewrite(headers);
  const [hostname, port] = target.split(':');
  const upstream = httpRequest({ hostname, port: Number(port), method: req.method, path: req.url, headers }, (up) => {
    res.writeHead(up.statusCode ?? 502, up.headers);
    up.pipe(res);
  });
  upstream.on('error', () => {
    if (!res.headersSent) res.writeHead(502);
    res.end();
  });
  req.pipe(upstream);
}
