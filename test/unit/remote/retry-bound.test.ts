/**
 * The bound on attempts (retry.ts): one request makes at most 1 + max_retries attempts at a host, whatever mix
 * of failures it meets (503s, resets before the answer, bodies cut short), and the steps that are not retries
 * (authenticating on a 401, moving to another host) add what retry.ts says and no more. Against a fake registry
 * on 127.0.0.1 that serves one blob and fails on command.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { RegistryError } from '../../../src/errors';
import { RegistryClient } from '../../../src/remote/registry-client';
import { DEFAULT_MAX_RETRIES, maxAttempts, retryPolicy } from '../../../src/remote/retry';
import { startFakeServer, type FakeServer } from './registry-harness';

const REPO = 'stargaze/bound';
/** The default max_retries with short waits, so the bound tested is the default one. */
const QUICK = { minWaitMs: 1, maxWaitMs: 5 };
const BOUND = maxAttempts(retryPolicy(QUICK));

type Fault = 'none' | '503' | 'reset' | 'cut' | 'mixed';

/** A registry serving one blob; `fault` applies to range reads other than the resolve probe (bytes=0-1). */
class FakeRegistry {
  readonly blob = randomBytes(256 * 1024);
  readonly digest = `sha256:${createHash('sha256').update(this.blob).digest('hex')}`;
  fault: Fault = 'none';
  /** Answer 401 to the next range read carrying this token (an expired token). */
  rejectToken: string | undefined;
  /** Require `Authorization: Bearer <token>` for blob requests; tokens are issued by GET /token. */
  auth = false;
  private issued = 0;
  private mixed = 0;
  server!: FakeServer;

  async start(): Promise<this> {
    this.server = await startFakeServer((req, res) => this.handle(req, res));
    return this;
  }

  /** Range reads (not the probe) seen so far. */
  reads(): number {
    return this.server.requests.filter((r) => r.url.includes('/blobs/') && r.range !== undefined && r.range !== 'bytes=0-1').length;
  }

  tokens(): number {
    return this.server.requests.filter((r) => r.url.startsWith('/token')).length;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = req.url ?? '/';
    if (url.startsWith('/token')) {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ token: `tok-${++this.issued}`, expires_in: 300 }));
      return;
    }
    if (!url.includes(`/blobs/${this.digest}`)) {
      res.writeHead(404);
      res.end();
      return;
    }
    const token = (req.headers.authorization ?? '').replace(/^Bearer /, '');
    const range = req.headers.range ?? '';
    if (this.auth && (token === '' || token === this.rejectToken)) {
      if (token !== '') this.rejectToken = undefined;
      res.writeHead(401, { 'www-authenticate': `Bearer realm="http://${this.server.host}/token",service="fake"` });
      res.end();
      return;
    }
    const m = /^bytes=(\d+)-(\d+)$/.exec(range);
    const start = m === null ? 0 : Number(m[1]);
    const end = m === null ? this.blob.length - 1 : Math.min(Number(m[2]), this.blob.length - 1);
    const probe = range === 'bytes=0-1';
    const fault = probe ? 'none' : this.fault === 'mixed' ? (['reset', 'cut', '503'] as const)[this.mixed++ % 3] : this.fault;
    if (fault === 'reset') {
      req.socket.destroy();
      return;
    }
    if (fault === '503') {
      res.writeHead(503, { 'content-type': 'application/json' });
      res.end('{"errors":[{"code":"UNAVAILABLE"}]}');
      return;
    }
    const length = end - start + 1;
    res.writeHead(206, { 'content-range': `bytes ${start}-${end}/${this.blob.length}`, 'content-length': String(length) });
    if (fault === 'cut') {
      res.write(this.blob.subarray(start, start + Math.floor(length / 2)));
      setTimeout(() => req.socket.destroy(), 5);
      return;
    }
    res.end(this.blob.subarray(start, end + 1));
  }
}

describe('retry bound: at most 1 + max_retries attempts per request', () => {
  let reg: FakeRegistry;
  const clients: RegistryClient[] = [];
  const client = (opts: ConstructorParameters<typeof RegistryClient>[0] = {}): RegistryClient => {
    const c = new RegistryClient({ requestTimeoutMs: 5_000, fetchTimeoutMs: 20_000, retry: QUICK, ...opts });
    clients.push(c);
    return c;
  };

  before(async () => {
    reg = await new FakeRegistry().start();
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await reg.server.close();
  });

  it('the default bound is 6 attempts', () => {
    assert.equal(DEFAULT_MAX_RETRIES, 5);
    assert.equal(maxAttempts(retryPolicy(undefined)), 6);
    assert.equal(BOUND, 6);
  });

  for (const fault of ['503', 'reset', 'cut', 'mixed'] as const) {
    it(`a registry that always fails (${fault}) is sent exactly ${BOUND} requests for a range read`, async () => {
      const src = await client().resolveBlob(`${reg.server.host}/${REPO}`, reg.digest);
      reg.fault = fault;
      const before = reg.reads();
      try {
        await assert.rejects(src.readRange(1000, 20_000), (err: unknown) => {
          assert.ok(err instanceof RegistryError, String(err));
          assert.ok(err.message.includes(reg.digest) && err.message.includes(reg.server.host), err.message);
          return true;
        });
        assert.equal(reg.reads() - before, BOUND);
        // Multi-range reads are bounded the same way.
        const multiBefore = reg.reads();
        await assert.rejects(src.readRanges!([{ offset: 10, length: 10 }, { offset: 100_000, length: 10 }]), RegistryError);
        assert.equal(reg.reads() - multiBefore, BOUND);
      } finally {
        reg.fault = 'none';
      }
      assert.ok((await src.readRange(1000, 20_000)).equals(reg.blob.subarray(1000, 21_000)), 'reads work again');
    });
  }

  it('max_retries = 0: one request', async () => {
    const src = await client({ retry: { ...QUICK, maxRetries: 0 } }).resolveBlob(`${reg.server.host}/${REPO}`, reg.digest);
    reg.fault = 'mixed';
    const before = reg.reads();
    try {
      await assert.rejects(src.readRange(0, 10), RegistryError);
      assert.equal(reg.reads() - before, 1);
    } finally {
      reg.fault = 'none';
    }
  });

  it('authenticating on a 401 is one more request, not another round of retries', async () => {
    reg.auth = true;
    try {
      const src = await client().resolveBlob(`${reg.server.host}/${REPO}`, reg.digest);
      const token = `tok-${reg.tokens()}`; // the token the client holds now
      reg.rejectToken = token;
      reg.fault = '503';
      const before = reg.reads();
      const tokensBefore = reg.tokens();
      await assert.rejects(src.readRange(0, 10), (err: unknown) => err instanceof RegistryError && err.status === 503);
      assert.equal(reg.tokens() - tokensBefore, 1, 'one new token');
      assert.equal(reg.reads() - before, 1 + BOUND, 'the 401, then the bound');
    } finally {
      reg.auth = false;
      reg.fault = 'none';
    }
  });
});

describe('retry bound: failover to the next hosts.toml host', () => {
  let mirror: FakeRegistry;
  let origin: FakeRegistry;
  let hostsDir: string;

  before(async () => {
    mirror = await new FakeRegistry().start();
    origin = await new FakeRegistry().start();
    (origin as { blob: Buffer }).blob = mirror.blob;
    (origin as { digest: string }).digest = mirror.digest;
    hostsDir = await mkdtemp(join(tmpdir(), 'stargaze-bound-hosts-'));
    await mkdir(join(hostsDir, origin.server.host));
    await writeFile(
      join(hostsDir, origin.server.host, 'hosts.toml'),
      `server = "http://${origin.server.host}"\n[host."http://${mirror.server.host}"]\ncapabilities = ["pull", "resolve"]\n`,
    );
  });
  after(async () => {
    await mirror.server.close();
    await origin.server.close();
    await rm(hostsDir, { recursive: true, force: true });
  });

  it('a read whose host keeps failing makes the bound there, then moves once to the next host (its probe, then the bound)', async () => {
    const c = new RegistryClient({ hostsDir, requestTimeoutMs: 5_000, fetchTimeoutMs: 20_000, retry: QUICK });
    try {
      const src = await c.resolveBlob(`${origin.server.host}/${REPO}`, mirror.digest);
      mirror.fault = '503';
      origin.fault = 'reset';
      const [m0, o0] = [mirror.reads(), origin.reads()];
      const probes0 = origin.server.requests.length - o0;
      await assert.rejects(src.readRange(0, 10), RegistryError);
      assert.equal(mirror.reads() - m0, BOUND, 'the mirror');
      assert.equal(origin.reads() - o0, BOUND, 'the origin, once');
      assert.equal(origin.server.requests.length - origin.reads() - probes0, 1, 'one probe at the origin');
    } finally {
      mirror.fault = origin.fault = 'none';
      await c.close();
    }
  });
});
