/**
 * RegistryClient against a real Debian docker-registry (distribution 2.8) on 127.0.0.1: plain, behind htpasswd
 * basic auth, and behind a Bearer token proxy written here; plus fakes for redirects, servers that ignore
 * Range, dead mirrors and silent servers.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { inspect } from 'node:util';
import { after, before, describe, it } from 'node:test';
import pino from 'pino';
import { RegistryAuthError, RegistryError, errorMessage } from '../../../src/errors';
import type { ConfigMirror } from '../../../src/config/config';
import { RegistryClient } from '../../../src/remote/registry-client';
import {
  bcryptLine,
  forward,
  freePort,
  pushBlob,
  pushManifest,
  startFakeServer,
  startRegistry,
  type FakeServer,
  type RunningRegistry,
} from './registry-harness';

const REPO = 'stargaze/test';
const BLOB_BYTES = 300_000;
const MISSING = 'sha256:' + '0'.repeat(64);

/** A pino logger at trace level writing into memory, to check what the client logs. */
function memoryLogger(): { log: pino.Logger; lines: string[] } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      lines.push(chunk.toString());
      cb();
    },
  });
  return { log: pino({ level: 'trace' }, sink), lines };
}

/** Asserts `err` and everything derived from it does not contain any of `secrets`. */
function assertNoSecrets(err: unknown, secrets: string[]): void {
  const texts = [errorMessage(err), String(err), inspect(err, { depth: 5 }), JSON.stringify(err)];
  for (const secret of secrets) for (const t of texts) assert.ok(!t.includes(secret), `error text leaks a secret: ${t}`);
}

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(Buffer.isBuffer(c) ? c : Buffer.from(c));
  return Buffer.concat(chunks);
}

async function checkRanges(client: RegistryClient, ref: string, digest: string, data: Buffer): Promise<void> {
  const src = await client.resolveBlob(ref, digest);
  assert.equal(src.size, data.length);
  assert.equal(src.digest, digest);
  const ranges: [number, number][] = [
    [0, 1],
    [0, data.length],
    [12_345, 1_000],
    [data.length - 1, 1],
    [100_000, 65_536 * 2 + 7],
  ];
  for (let i = 0; i < 10; i++) {
    const off = Math.floor(Math.random() * data.length);
    ranges.push([off, Math.floor(Math.random() * (data.length - off)) + 1]);
  }
  const results = await Promise.all(ranges.map(([o, l]) => src.readRange(o, l)));
  ranges.forEach(([o, l], i) => assert.ok(results[i]?.equals(data.subarray(o, o + l)), `range ${o}+${l}`));
  assert.equal((await src.readRange(5, 0)).length, 0);
  await assert.rejects(src.readRange(data.length - 1, 2), RangeError);
  await assert.rejects(src.readRange(-1, 2), RangeError);
}

describe('registry client: plain registry', () => {
  let reg: RunningRegistry;
  let client: RegistryClient;
  let data: Buffer;
  let digest: string;
  let manifest: Buffer;
  let manifestDigest: string;
  const fakes: FakeServer[] = [];
  const dirs: string[] = [];

  before(async () => {
    reg = await startRegistry();
    data = randomBytes(BLOB_BYTES);
    digest = await pushBlob(reg.host, REPO, data);
    const config = Buffer.from('{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}');
    const configDigest = await pushBlob(reg.host, REPO, config);
    manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
        layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest, size: data.length }],
      }),
    );
    manifestDigest = await pushManifest(reg.host, REPO, 'v1', manifest, 'application/vnd.oci.image.manifest.v1+json');
    client = new RegistryClient({ requestTimeoutMs: 10_000 });
  });

  after(async () => {
    await client?.close();
    await Promise.all(fakes.map((f) => f.close()));
    await reg?.stop();
    await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
  });

  it('range reads return exact bytes', async () => {
    await checkRanges(client, `${reg.host}/${REPO}:v1`, digest, data);
  });

  it('a missing blob is a RegistryError 404 naming the digest and host', async () => {
    await assert.rejects(client.resolveBlob(`${reg.host}/${REPO}`, MISSING), (err: unknown) => {
      assert.ok(err instanceof RegistryError, String(err));
      assert.equal(err.status, 404);
      assert.ok(err.message.includes(MISSING), err.message);
      assert.ok(err.message.includes(reg.host), err.message);
      return true;
    });
  });

  it('bad input is rejected before any request', async () => {
    await assert.rejects(client.resolveBlob(`${reg.host}/${REPO}`, 'sha256:nothex'), /invalid blob digest/);
    await assert.rejects(client.resolveBlob('HTTP://x', digest), /invalid image reference/);
  });

  it('fetchBlob streams the whole blob', async () => {
    const blob = await client.fetchBlob(`${reg.host}/${REPO}`, digest);
    assert.equal(blob.size, data.length);
    assert.ok((await readAll(blob.body)).equals(data));
  });

  it('fetchManifest by tag and by digest', async () => {
    const byTag = await client.fetchManifest(`${reg.host}/${REPO}:v1`);
    assert.equal(byTag.mediaType, 'application/vnd.oci.image.manifest.v1+json');
    assert.equal(byTag.digest, manifestDigest);
    assert.ok(byTag.body.equals(manifest));
    const byDigest = await client.fetchManifest(`${reg.host}/${REPO}@${manifestDigest}`, 'application/vnd.oci.image.manifest.v1+json');
    assert.ok(byDigest.body.equals(manifest));
    await assert.rejects(client.fetchManifest(`${reg.host}/${REPO}:nope`), (err: unknown) => err instanceof RegistryError && err.status === 404);
  });

  it('a server that ignores Range (200 for a range request) is handled without reading the whole blob', async () => {
    const proxy = await startFakeServer((req, res) => forward(req, res, reg.host, (h) => delete h.range));
    fakes.push(proxy);
    const c = new RegistryClient({});
    try {
      const src = await c.resolveBlob(`${proxy.host}/${REPO}`, digest);
      assert.equal(src.size, data.length);
      assert.ok((await src.readRange(250_000, 100)).equals(data.subarray(250_000, 250_100)));
      assert.ok((await src.readRange(0, 10)).equals(data.subarray(0, 10)));
      assert.ok((await src.readRange(BLOB_BYTES - 3, 3)).equals(data.subarray(BLOB_BYTES - 3)));
      assert.ok(proxy.requests.some((r) => r.range !== undefined), 'client did ask for ranges');
    } finally {
      await c.close();
    }
  });

  it('resolveBlobTail: one suffix-range request tells the size and brings the tail', async () => {
    const proxy = await startFakeServer((req, res) => forward(req, res, reg.host));
    fakes.push(proxy);
    const c = new RegistryClient({});
    try {
      const { source, tail } = await c.resolveBlobTail(`${proxy.host}/${REPO}`, digest, 10_000);
      assert.equal(source.size, data.length);
      assert.deepEqual(
        proxy.requests.filter((r) => r.url.includes('/blobs/')).map((r) => [r.method, r.range]),
        [['GET', 'bytes=-10000']],
        'no HEAD, no size probe',
      );
      assert.equal(tail?.offset, data.length - 10_000);
      assert.ok(tail?.data.equals(data.subarray(data.length - 10_000)));
      assert.ok((await source.readRange(100, 50)).equals(data.subarray(100, 150)));
      // A suffix longer than the blob is the whole blob.
      const whole = await c.resolveBlobTail(`${proxy.host}/${REPO}`, digest, data.length * 2);
      assert.equal(whole.tail?.offset, 0);
      assert.ok(whole.tail?.data.equals(data));
    } finally {
      await c.close();
    }
  });

  it('resolveBlobTail: after a redirect the suffix read goes to the target; a server ignoring Range gives no tail', async () => {
    const storage = await startFakeServer((req, res) => forward(req, res, reg.host));
    fakes.push(storage);
    const front = await startFakeServer((req, res) => {
      res.writeHead(307, { location: `http://${storage.host}${(req.url ?? '').replace(/\?.*$/, '')}` });
      res.end();
    });
    fakes.push(front);
    const ignoring = await startFakeServer((req, res) => forward(req, res, reg.host, (h) => delete h.range));
    fakes.push(ignoring);
    const c = new RegistryClient({});
    try {
      const redirected = await c.resolveBlobTail(`${front.host}/${REPO}`, digest, 4096);
      assert.equal(redirected.source.size, data.length);
      assert.ok(redirected.tail?.data.equals(data.subarray(data.length - 4096)));
      assert.equal(front.requests.length, 1);
      assert.deepEqual(storage.requests.map((r) => [r.method, r.range]), [['GET', 'bytes=-4096']], 'the suffix read replaces the HEAD');
      assert.ok((await redirected.source.readRange(7, 7)).equals(data.subarray(7, 14)));

      const plain = await c.resolveBlobTail(`${ignoring.host}/${REPO}`, digest, 4096);
      assert.equal(plain.source.size, data.length);
      assert.equal(plain.tail, undefined);
      assert.ok((await plain.source.readRange(data.length - 5, 5)).equals(data.subarray(data.length - 5)));
    } finally {
      await c.close();
    }
  });

  it('follows a redirect to storage once and reads ranges from the final URL', async () => {
    const front = await startFakeServer((req, res) => {
      if (req.url?.includes('/blobs/')) {
        res.writeHead(307, { location: `http://${reg.host}${req.url.replace(/\?.*$/, '')}` });
        res.end();
        return;
      }
      forward(req, res, reg.host);
    });
    fakes.push(front);
    const c = new RegistryClient({});
    try {
      const src = await c.resolveBlob(`${front.host}/${REPO}`, digest);
      const seen = front.requests.length;
      assert.equal(seen, 1, 'one probe to the registry');
      for (let i = 0; i < 5; i++) assert.ok((await src.readRange(i * 1000, 777)).equals(data.subarray(i * 1000, i * 1000 + 777)));
      assert.equal(front.requests.length, seen, 'range reads went to the storage URL');
      const blob = await c.fetchBlob(`${front.host}/${REPO}`, digest);
      assert.ok((await readAll(blob.body)).equals(data));
    } finally {
      await c.close();
    }
  });

  for (const status of [403, 401]) it(`refreshes an expired pre-signed storage URL once on ${status}, and never reports its query`, async () => {
    let generation = 1;
    const storage = await startFakeServer((req, res) => {
      const url = new URL(req.url ?? '/', 'http://x');
      if (url.searchParams.get('sig') !== `secret-sig-${generation}`) {
        res.writeHead(status);
        res.end('expired');
        return;
      }
      forward(req, res, reg.host);
    });
    fakes.push(storage);
    const front = await startFakeServer((req, res) => {
      res.writeHead(307, { location: `http://${storage.host}${(req.url ?? '').replace(/\?.*$/, '')}?sig=secret-sig-${generation}` });
      res.end();
    });
    fakes.push(front);
    const c = new RegistryClient({});
    try {
      const src = await c.resolveBlob(`${front.host}/${REPO}`, digest);
      assert.ok((await src.readRange(10, 10)).equals(data.subarray(10, 20)));
      generation = 2; // the URL handed out before has expired
      assert.ok((await src.readRange(20, 10)).equals(data.subarray(20, 30)));
      assert.equal(front.requests.length, 2, 'one probe at resolve, one at refresh');
      // The registry keeps handing out dead URLs: the error names host and digest, not the signature.
      generation = 3;
      storage.requests.length = 0;
      const stale = await startFakeServer((req, res) => {
        res.writeHead(307, { location: `http://${storage.host}${(req.url ?? '').replace(/\?.*$/, '')}?sig=secret-sig-old` });
        res.end();
      });
      fakes.push(stale);
      const src2 = await c.resolveBlob(`${stale.host}/${REPO}`, digest).catch((err: unknown) => err);
      assert.ok(src2 instanceof RegistryError, String(src2));
      assert.equal(src2.status, status);
      assert.ok(src2.message.includes(digest) && src2.message.includes(storage.host), src2.message);
      assertNoSecrets(src2, ['secret-sig']);
    } finally {
      await c.close();
    }
  });

  it('tries hosts.toml mirrors in order, sends ns=, and falls back to the server', async () => {
    const hostsDir = await mkdtemp(join(tmpdir(), 'stargaze-hostsdir-'));
    dirs.push(hostsDir);
    const deadPort = await freePort();
    const mirror = await startFakeServer((req, res) => forward(req, res, reg.host));
    fakes.push(mirror);
    await mkdir(join(hostsDir, reg.host));
    const write = (toml: string): Promise<void> => writeFile(join(hostsDir, reg.host, 'hosts.toml'), toml);
    const c = new RegistryClient({ hostsDir });
    try {
      // Dead mirror first: connection refused, then the registry itself.
      await write(`server = "http://${reg.host}"\n[host."http://127.0.0.1:${deadPort}"]\ncapabilities = ["pull"]\n`);
      assert.ok((await (await c.resolveBlob(`${reg.host}/${REPO}`, digest)).readRange(7, 70)).equals(data.subarray(7, 77)));

      // A working mirror serves everything and learns the origin registry from ns=.
      await write(`server = "http://${reg.host}"\n[host."http://${mirror.host}"]\ncapabilities = ["pull", "resolve"]\n`);
      const src = await c.resolveBlob(`${reg.host}/${REPO}`, digest);
      assert.ok((await src.readRange(1, 2)).equals(data.subarray(1, 3)));
      assert.ok(mirror.requests.length >= 2);
      for (const r of mirror.requests) assert.ok(r.url.includes(`ns=${encodeURIComponent(reg.host)}`) || r.url.includes(`ns=${reg.host}`), r.url);

      // All hosts failing: one error naming each host and the digest.
      await write(`server = "http://127.0.0.1:${deadPort}"\n[host."http://${mirror.host}"]\ncapabilities = ["pull"]\n`);
      await assert.rejects(c.resolveBlob(`${reg.host}/${REPO}`, MISSING), (err: unknown) => {
        assert.ok(err instanceof RegistryError);
        assert.match(err.message, /all 2 registry hosts failed/);
        assert.ok(err.message.includes(MISSING) && err.message.includes(mirror.host) && err.message.includes(String(deadPort)), err.message);
        return true;
      });
    } finally {
      await c.close();
    }
  });

  it("the daemon config's [[resolver.host.R.mirrors]]: mirrors in order with their headers and ns=, then the registry; a hosts.toml wins", async () => {
    const deadPort = await freePort();
    const mirrorHeaders: (string | string[] | undefined)[] = [];
    const mirror = await startFakeServer((req, res) => {
      mirrorHeaders.push(req.headers['x-mirror']);
      forward(req, res, reg.host);
    });
    fakes.push(mirror);
    const configMirrors: Record<string, ConfigMirror[]> = {
      [reg.host]: [
        { host: `127.0.0.1:${deadPort}`, insecure: true, requestTimeoutSec: 0, headers: {} },
        { host: mirror.host, insecure: true, requestTimeoutSec: 5, headers: { 'x-mirror': ['yes'] } },
      ],
    };
    const c = new RegistryClient({ configMirrors });
    try {
      const src = await c.resolveBlob(`${reg.host}/${REPO}`, digest);
      assert.ok((await src.readRange(3, 30)).equals(data.subarray(3, 33)));
      assert.ok(mirror.requests.length >= 2);
      for (const r of mirror.requests) assert.ok(r.url.includes(`ns=${encodeURIComponent(reg.host)}`) || r.url.includes(`ns=${reg.host}`), r.url);
      assert.ok(mirrorHeaders.every((h) => h === 'yes'));
      // A missing blob on the mirror: the registry itself is asked last (and the error names every host).
      await assert.rejects(c.resolveBlob(`${reg.host}/${REPO}`, MISSING), /all 3 registry hosts failed/);
    } finally {
      await c.close();
    }

    // A hosts.toml for the registry replaces the config mirrors.
    const hostsDir = await mkdtemp(join(tmpdir(), 'stargaze-hostsdir-'));
    dirs.push(hostsDir);
    await mkdir(join(hostsDir, reg.host));
    await writeFile(join(hostsDir, reg.host, 'hosts.toml'), `server = "http://${reg.host}"\n`);
    const seen = mirror.requests.length;
    const c2 = new RegistryClient({ hostsDir, configMirrors });
    try {
      assert.ok((await (await c2.resolveBlob(`${reg.host}/${REPO}`, digest)).readRange(0, 5)).equals(data.subarray(0, 5)));
      assert.equal(mirror.requests.length, seen);
    } finally {
      await c2.close();
    }
  });

  it('bounds requests with a timeout and honours the caller signal', async () => {
    const silent = await startFakeServer(() => undefined); // accepts, never answers
    fakes.push(silent);
    const c = new RegistryClient({ requestTimeoutMs: 300 });
    try {
      const t0 = Date.now();
      await assert.rejects(c.resolveBlob(`${silent.host}/${REPO}`, digest), (err: unknown) => {
        assert.ok(err instanceof RegistryError, String(err));
        assert.match(err.message, /timed out after 300 ms/);
        assert.ok(err.message.includes(digest));
        return true;
      });
      assert.ok(Date.now() - t0 < 5_000);
      const ac = new AbortController();
      const p = c.resolveBlob(`${silent.host}/${REPO}`, digest, ac.signal);
      ac.abort(new Error('caller gave up'));
      await assert.rejects(p, /caller gave up/);
    } finally {
      await c.close();
    }
    // A range read that stalls mid-way is bounded by fetchTimeoutMs.
    const stall = await startFakeServer((req, res) => {
      if (req.headers.range === 'bytes=0-1') {
        res.writeHead(206, { 'content-range': `bytes 0-1/${BLOB_BYTES}`, 'content-type': 'application/octet-stream' });
        res.end(data.subarray(0, 2));
        return;
      }
      res.writeHead(206, { 'content-range': `bytes 0-99/${BLOB_BYTES}`, 'content-type': 'application/octet-stream' });
      res.write(data.subarray(0, 10)); // ... and nothing more
    });
    fakes.push(stall);
    const c2 = new RegistryClient({ requestTimeoutMs: 10_000, fetchTimeoutMs: 300 });
    try {
      const src = await c2.resolveBlob(`${stall.host}/${REPO}`, digest);
      await assert.rejects(src.readRange(0, 100), (err: unknown) => err instanceof RegistryError && /timed out after 300 ms/.test(err.message) && err.message.includes(digest));
    } finally {
      await c2.close();
    }
  });

  it('rejects a 206 whose Content-Range does not match', async () => {
    const liar = await startFakeServer((req, res) => {
      res.writeHead(206, { 'content-range': `bytes 0-1/${BLOB_BYTES}`, 'content-type': 'application/octet-stream' });
      res.end(data.subarray(0, 2));
    });
    fakes.push(liar);
    const c = new RegistryClient({});
    try {
      const src = await c.resolveBlob(`${liar.host}/${REPO}`, digest);
      await assert.rejects(src.readRange(10, 5), (err: unknown) => err instanceof RegistryError && err.status === 206 && err.message.includes(digest));
    } finally {
      await c.close();
    }
  });
});

describe('registry client: htpasswd basic auth', async () => {
  const USER = 'alice';
  const PASSWORD = 'pässw0rd-that-must-not-leak';
  const line = await bcryptLine(USER, PASSWORD);
  let reg: RunningRegistry;
  let data: Buffer;
  let digest: string;
  let dir: string;

  before(async () => {
    if (line === undefined) return;
    reg = await startRegistry({ htpasswdLine: line });
    dir = await mkdtemp(join(tmpdir(), 'stargaze-dockercfg-'));
    data = randomBytes(BLOB_BYTES);
    digest = await pushBlob(reg.host, REPO, data, { username: USER, password: PASSWORD });
  });
  after(async () => {
    await reg?.stop();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  const skip = line === undefined ? 'no bcrypt tool (apt-get install apache2-utils)' : false;

  it('reads with credentials from the callback', { skip }, async () => {
    const { log, lines } = memoryLogger();
    const c = new RegistryClient({ credentials: (h) => (h === reg.host ? { username: USER, password: PASSWORD } : undefined), log });
    try {
      await checkRanges(c, `${reg.host}/${REPO}`, digest, data);
    } finally {
      await c.close();
    }
    const b64 = Buffer.from(`${USER}:${PASSWORD}`).toString('base64');
    for (const l of lines) assert.ok(!l.includes(PASSWORD) && !l.includes(b64), `log leaks credentials: ${l}`);
  });

  it('reads with credentials from docker config.json', { skip }, async () => {
    await writeFile(
      join(dir, 'config.json'),
      JSON.stringify({ auths: { [`http://${reg.host}/v1/`]: { auth: Buffer.from(`${USER}:${PASSWORD}`).toString('base64') } } }),
    );
    const c = new RegistryClient({ dockerConfigDir: dir });
    try {
      const src = await c.resolveBlob(`${reg.host}/${REPO}`, digest);
      assert.ok((await src.readRange(99, 1000)).equals(data.subarray(99, 1099)));
    } finally {
      await c.close();
    }
  });

  it('a wrong password is a RegistryAuthError naming the digest, without the password', { skip }, async () => {
    const wrong = 'wrong-secret-value';
    const { log, lines } = memoryLogger();
    const c = new RegistryClient({ credentials: () => ({ username: USER, password: wrong }), dockerConfigDir: join(dir, 'none'), log });
    try {
      await assert.rejects(c.resolveBlob(`${reg.host}/${REPO}`, digest), (err: unknown) => {
        assert.ok(err instanceof RegistryAuthError, String(err));
        assert.ok(err.message.includes(digest), err.message);
        assert.ok(err.message.includes(reg.host), err.message);
        assertNoSecrets(err, [wrong, PASSWORD, Buffer.from(`${USER}:${wrong}`).toString('base64')]);
        return true;
      });
    } finally {
      await c.close();
    }
    for (const l of lines) assert.ok(!l.includes(wrong), `log leaks the password: ${l}`);
  });

  it('no credentials is a RegistryAuthError', { skip }, async () => {
    const c = new RegistryClient({ dockerConfigDir: join(dir, 'none') });
    try {
      await assert.rejects(c.resolveBlob(`${reg.host}/${REPO}`, digest), (err: unknown) => err instanceof RegistryAuthError && /requires credentials/.test(err.message) && err.message.includes(digest));
    } finally {
      await c.close();
    }
  });
});

describe('registry client: Bearer token auth', () => {
  const USER = 'bob';
  const PASSWORD = 'bearer-secret-password';
  const SERVICE = 'stargaze-test';
  let reg: RunningRegistry;
  let tokenServer: FakeServer;
  let front: FakeServer;
  let data: Buffer;
  let digest: string;
  /** Tokens the proxy accepts. */
  const valid = new Set<string>();
  let issued = 0;
  let tokenField: 'token' | 'access_token' = 'token';
  let expiresIn: number | undefined = 300;
  const tokenRequests: URL[] = [];

  before(async () => {
    reg = await startRegistry();
    data = randomBytes(BLOB_BYTES);
    digest = await pushBlob(reg.host, REPO, data);
    await pushBlob(reg.host, 'public/img', data);
    tokenServer = await startFakeServer((req, res) => {
      const url = new URL(req.url ?? '/', 'http://x');
      tokenRequests.push(url);
      const scopes = url.searchParams.getAll('scope');
      const basic = req.headers.authorization;
      const authed = basic === `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}`;
      const publicOnly = scopes.length > 0 && scopes.every((s) => s === 'repository:public/img:pull');
      if (url.searchParams.get('service') !== SERVICE || (!authed && !(basic === undefined && publicOnly))) {
        res.writeHead(401, { 'content-type': 'application/json' });
        res.end('{"details":"bad credentials"}');
        return;
      }
      const token = `tok-${++issued}`;
      valid.add(token);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ [tokenField]: token, ...(expiresIn !== undefined ? { expires_in: expiresIn } : {}) }));
    });
    front = await startFakeServer((req, res) => {
      const auth = req.headers.authorization ?? '';
      const token = auth.startsWith('Bearer ') ? auth.slice('Bearer '.length) : '';
      if (!valid.has(token)) {
        const repo = /^\/v2\/(.+?)\/(blobs|manifests)\//.exec(req.url ?? '')?.[1] ?? '';
        res.writeHead(401, {
          'www-authenticate': `Bearer realm="http://${tokenServer.host}/token",service="${SERVICE}",scope="repository:${repo}:pull"`,
          'content-type': 'application/json',
        });
        res.end('{"errors":[{"code":"UNAUTHORIZED"}]}');
        return;
      }
      forward(req, res, reg.host, (h) => delete h.authorization);
    });
  });
  after(async () => {
    await front?.close();
    await tokenServer?.close();
    await reg?.stop();
  });

  it('gets a token once and reuses it for many reads', async () => {
    const c = new RegistryClient({ credentials: () => ({ username: USER, password: PASSWORD }) });
    try {
      const before = issued;
      await checkRanges(c, `${front.host}/${REPO}`, digest, data);
      assert.equal(issued - before, 1, 'one token for all reads');
      const last = tokenRequests[tokenRequests.length - 1];
      assert.equal(last?.searchParams.get('service'), SERVICE);
      assert.deepEqual(last?.searchParams.getAll('scope'), [`repository:${REPO}:pull`]);

      // Tokens revoked server-side: the next read gets a 401, fetches a fresh token and retries once.
      valid.clear();
      const src = await c.resolveBlob(`${front.host}/${REPO}`, digest);
      valid.clear();
      assert.ok((await src.readRange(1000, 10)).equals(data.subarray(1000, 1010)));
      assert.equal(issued - before, 3);
    } finally {
      await c.close();
    }
  });

  it('accepts access_token and honours expires_in', async () => {
    tokenField = 'access_token';
    expiresIn = 1;
    const c = new RegistryClient({ credentials: () => ({ username: USER, password: PASSWORD }) });
    try {
      const before = issued;
      const src = await c.resolveBlob(`${front.host}/${REPO}`, digest);
      assert.ok((await src.readRange(0, 5)).equals(data.subarray(0, 5)));
      assert.equal(issued - before, 1);
      await new Promise((r) => setTimeout(r, 700)); // past the 1 s token's refresh point (half its life)
      assert.ok((await src.readRange(5, 5)).equals(data.subarray(5, 10)));
      assert.equal(issued - before, 2, 'expired token was replaced');
    } finally {
      tokenField = 'token';
      expiresIn = 300;
      await c.close();
    }
  });

  it('anonymous tokens for public repositories', async () => {
    const c = new RegistryClient({ dockerConfigDir: join(tmpdir(), 'stargaze-no-such-dir') });
    try {
      const src = await c.resolveBlob(`${front.host}/public/img`, digest);
      assert.ok((await src.readRange(3, 4)).equals(data.subarray(3, 7)));
      const blob = await c.fetchBlob(`${front.host}/public/img`, digest);
      assert.ok((await readAll(blob.body)).equals(data));
    } finally {
      await c.close();
    }
  });

  it('a refused token request is a RegistryAuthError naming the digest, without the password', async () => {
    const wrong = 'not-the-bearer-password';
    const { log, lines } = memoryLogger();
    const c = new RegistryClient({ credentials: () => ({ username: USER, password: wrong }), log });
    try {
      await assert.rejects(c.resolveBlob(`${front.host}/${REPO}`, digest), (err: unknown) => {
        assert.ok(err instanceof RegistryAuthError, String(err));
        assert.ok(err.message.includes(digest), err.message);
        assert.match(err.message, /refused the configured credentials/);
        assertNoSecrets(err, [wrong, PASSWORD, Buffer.from(`${USER}:${wrong}`).toString('base64')]);
        return true;
      });
    } finally {
      await c.close();
    }
    for (const l of lines) assert.ok(!l.includes(wrong), `log leaks the password: ${l}`);
  });
});

describe("registry client: a config mirror's request_timeout_sec", () => {
  const fakes: FakeServer[] = [];
  after(async () => {
    await Promise.all(fakes.map((f) => f.close()));
  });

  /** A server that answers every request with `body`, one byte per `gapMs`: never idle long, slow overall. */
  async function trickling(body: Buffer, gapMs: number): Promise<FakeServer> {
    const server = await startFakeServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json', 'content-length': body.length });
      let sent = 0;
      const timer = setInterval(() => {
        res.write(body.subarray(sent, sent + 1));
        if (++sent === body.length) {
          clearInterval(timer);
          res.end();
        }
      }, gapMs);
      res.on('close', () => clearInterval(timer));
    });
    fakes.push(server);
    return server;
  }

  async function origin(body: Buffer): Promise<FakeServer> {
    const server = await startFakeServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/vnd.oci.image.manifest.v1+json', 'content-length': body.length });
      res.end(body);
    });
    fakes.push(server);
    return server;
  }

  it('is the deadline of a request to that mirror, shorter than the client one: a stalling mirror gives way to the next host', async () => {
    const fromOrigin = Buffer.from('{"from":"origin"}');
    const reg = await origin(fromOrigin);
    // 40 bytes at 200 ms each: 8 s in all, but never 1 s without a byte, so only a deadline stops it.
    const mirror = await trickling(Buffer.alloc(40, 0x20), 200);
    const c = new RegistryClient({
      requestTimeoutMs: 20_000,
      configMirrors: { [reg.host]: [{ host: mirror.host, insecure: true, requestTimeoutSec: 1, headers: {} }] },
    });
    try {
      const t0 = Date.now();
      const got = await c.fetchManifest(`${reg.host}/${REPO}:v1`);
      const ms = Date.now() - t0;
      assert.equal(mirror.requests.length, 1);
      assert.ok(got.body.equals(fromOrigin), got.body.toString());
      assert.ok(ms >= 900 && ms < 5_000, `the mirror was given up after ${ms} ms, want about 1000`);
    } finally {
      await c.close();
    }
  });

  it('negative means no deadline for that mirror, even under a short client one', async () => {
    const fromMirror = Buffer.from('{"from":"mirror"}');
    const reg = await origin(Buffer.from('{"from":"origin"}'));
    // 17 bytes at 60 ms each: about 1 s, past the client's 300 ms.
    const mirror = await trickling(fromMirror, 60);
    const c = new RegistryClient({
      requestTimeoutMs: 300,
      configMirrors: { [reg.host]: [{ host: mirror.host, insecure: true, requestTimeoutSec: -1, headers: {} }] },
    });
    try {
      const got = await c.fetchManifest(`${reg.host}/${REPO}:v1`);
      assert.ok(got.body.equals(fromMirror), got.body.toString());
      assert.equal(reg.requests.length, 0);
    } finally {
      await c.close();
    }
  });
});
