/**
 * RegistryClient through faults, against a real Debian docker-registry: a fault-injecting proxy in front of
 * it (resets, stalls, 5xx/429 with Retry-After, servers that ignore or refuse ranges, expiring redirects),
 * multi-range reads, whole-blob parallel fetch, the LayerReader recovering after the registry comes back, and
 * a second docker-registry as a pull-through cache used as a hosts.toml mirror.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { RegistryError } from '../../../src/errors';
import { readToc } from '../../../src/estargz/toc';
import { buildLayerTree } from '../../../src/metadata/layer-tree';
import { LayerReader } from '../../../src/reader/chunk-reader';
import { RegistryClient, type RegistryBlobSource } from '../../../src/remote/registry-client';
import { makeTar, toEstargz } from '../estargz/fixture';
import { startFaultProxy, type FaultProxy } from './fault-proxy';
import { freePort, pushBlob, startRegistry, type RunningRegistry } from './registry-harness';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';
import { defaultConfig } from '../../../src/config/config';

/** The process's one scheduler, as the composition root makes it. */
const scheduler = new Scheduler(schedulerLimits(defaultConfig()));

const REPO = 'stargaze/faults';
const BLOB_BYTES = 3 * 1024 * 1024 + 12_345;
/** Fast retries so the tests are quick; the policy's shape is the reference's. */
const FAST = { maxRetries: 4, minWaitMs: 10, maxWaitMs: 200 };

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(Buffer.isBuffer(c) ? c : Buffer.from(c));
  return Buffer.concat(chunks);
}

function scattered(size: number, n: number, len: number): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  for (let i = 0; i < n; i++) out.push({ offset: Math.floor((i * size) / n) + 7, length: len });
  return out;
}

describe('registry client through faults', () => {
  let reg: RunningRegistry;
  let proxy: FaultProxy;
  let data: Buffer;
  let digest: string;
  const clients: RegistryClient[] = [];
  const client = (opts: ConstructorParameters<typeof RegistryClient>[0] = {}): RegistryClient => {
    const c = new RegistryClient({ requestTimeoutMs: 5_000, fetchTimeoutMs: 10_000, retry: FAST, ...opts });
    clients.push(c);
    return c;
  };
  const ref = (): string => `${proxy.host}/${REPO}`;

  before(async () => {
    reg = await startRegistry();
    data = randomBytes(BLOB_BYTES);
    digest = await pushBlob(reg.host, REPO, data);
    proxy = await startFaultProxy(() => reg.host);
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await proxy?.close();
    await reg?.stop();
  });

  it('connection resets before the answer are retried', async () => {
    const src = await client().resolveBlob(ref(), digest);
    proxy.setFault({ kind: 'reset', times: 2 });
    const before = proxy.blobRequests().length;
    assert.ok((await src.readRange(1000, 5000)).equals(data.subarray(1000, 6000)));
    assert.equal(proxy.blobRequests().length - before, 3, 'two resets, then the answer');
  });

  it('a body cut off mid-way is read again', async () => {
    const src = await client().resolveBlob(ref(), digest);
    proxy.setFault({ kind: 'reset-mid-body', afterBytes: 100_000, times: 1 });
    assert.ok((await src.readRange(0, 1_000_000)).equals(data.subarray(0, 1_000_000)));
  });

  it('a streamed read (readRangeInto) tells its progress as it goes; cut off mid-way, it is read again and the count never goes back', async () => {
    const src = (await client().resolveBlob(ref(), digest)) as RegistryBlobSource;
    for (const f of [{ kind: 'none' }, { kind: 'reset-mid-body', afterBytes: 300_000, times: 1 }, { kind: 'ignore-range' }] as const) {
      proxy.setFault(f);
      const before = proxy.blobRequests().length;
      const into = Buffer.alloc(2_000_000);
      const told: number[] = [];
      await src.readRangeInto(100_000, into, (n) => told.push(n));
      assert.ok(into.equals(data.subarray(100_000, 2_100_000)), `${f.kind}: the bytes`);
      assert.ok(told.length > 1, `${f.kind}: told ${told.length} times`);
      assert.ok(told.every((n, i) => i === 0 || n > told[i - 1]!), `${f.kind}: the count only grows`);
      assert.equal(told.at(-1), into.length);
      assert.equal(proxy.blobRequests().length - before, f.kind === 'reset-mid-body' ? 2 : 1, `${f.kind}: requests`);
    }
    proxy.setFault({ kind: 'none' });
  });

  it('a streamed read that breaks off after its retries goes on from where it stopped, with a request for the rest', async () => {
    const src = (await client({ retry: { ...FAST, maxRetries: 0 } }).resolveBlob(ref(), digest)) as RegistryBlobSource;
    proxy.setFault({ kind: 'reset-mid-body', afterBytes: 300_000, times: 1 });
    const before = proxy.blobRequests().length;
    const into = Buffer.alloc(2_000_000);
    await src.readRangeInto(100_000, into, () => undefined);
    assert.ok(into.equals(data.subarray(100_000, 2_100_000)));
    const ranges = proxy.blobRequests().slice(before).map((r) => r.range);
    assert.equal(ranges.length, 2, `requests: ${ranges.join(' ')}`);
    assert.equal(ranges[0], 'bytes=100000-2099999');
    const resumedAt = Number(/^bytes=(\d+)-2099999$/.exec(ranges[1] ?? '')?.[1]);
    assert.ok(resumedAt > 100_000 && resumedAt <= 100_000 + 300_000, `resumed at ${ranges[1]}`);
    proxy.setFault({ kind: 'none' });
  });

  it('503 with Retry-After is waited out; 429 is retried; 501 is not', async () => {
    const c = client();
    const src = await c.resolveBlob(ref(), digest);
    proxy.setFault({ kind: 'status', status: 503, retryAfterSec: 1, times: 1 });
    const t0 = Date.now();
    assert.ok((await src.readRange(10, 10)).equals(data.subarray(10, 20)));
    const waited = Date.now() - t0;
    assert.ok(waited >= 200, `waited ${waited} ms (Retry-After 1 s capped at max_wait 200 ms)`);

    proxy.setFault({ kind: 'status', status: 429, times: 2 });
    assert.ok((await src.readRange(20, 10)).equals(data.subarray(20, 30)));

    proxy.setFault({ kind: 'status', status: 501, times: 5 });
    const before = proxy.blobRequests().length;
    await assert.rejects(src.readRange(30, 10), (err: unknown) => err instanceof RegistryError && err.status === 501);
    assert.equal(proxy.blobRequests().length - before, 1, '501 is not retried');
    proxy.setFault({ kind: 'none' });
  });

  it('Retry-After is honoured up to max_wait_msec', async () => {
    const c = client({ retry: { maxRetries: 2, minWaitMs: 10, maxWaitMs: 5_000 } });
    const src = await c.resolveBlob(ref(), digest);
    proxy.setFault({ kind: 'status', status: 503, retryAfterSec: 1, times: 1 });
    const t0 = Date.now();
    assert.ok((await src.readRange(10, 10)).equals(data.subarray(10, 20)));
    assert.ok(Date.now() - t0 >= 1000, 'waited at least the Retry-After');
  });

  it('retries are bounded: a registry that keeps failing gives a clear error after max_retries', async () => {
    const src = await client().resolveBlob(ref(), digest);
    proxy.setFault({ kind: 'status', status: 503 });
    const before = proxy.blobRequests().length;
    await assert.rejects(src.readRange(0, 10), (err: unknown) => {
      assert.ok(err instanceof RegistryError, String(err));
      assert.equal(err.status, 503);
      assert.ok(err.message.includes(digest) && err.message.includes(proxy.host), err.message);
      return true;
    });
    assert.equal(proxy.blobRequests().length - before, 1 + FAST.maxRetries);
    proxy.setFault({ kind: 'none' });
  });

  it('a stalled registry fails the read within fetching_timeout, and the same read works once it is back', async () => {
    const c = client({ requestTimeoutMs: 300, fetchTimeoutMs: 1_500 });
    const src = await c.resolveBlob(ref(), digest);
    proxy.setFault({ kind: 'stall' });
    const t0 = Date.now();
    await assert.rejects(src.readRange(0, 100), (err: unknown) => err instanceof RegistryError && /timed out/.test(err.message) && err.message.includes(digest));
    const took = Date.now() - t0;
    assert.ok(took < 3_000, `failed after ${took} ms`);
    proxy.setFault({ kind: 'none' });
    assert.ok((await src.readRange(0, 100)).equals(data.subarray(0, 100)));
  });

  it('multi-range: one request, multipart/byteranges parsed; odd Content-Type tolerated', async () => {
    const c = client();
    const src = (await c.resolveBlob(ref(), digest)) as RegistryBlobSource;
    const ranges = scattered(BLOB_BYTES, 20, 3000);
    ranges.push({ offset: 50, length: 10 }, { offset: 55, length: 100 }, { offset: BLOB_BYTES - 1, length: 1 }); // overlapping, last byte
    for (const f of [{ kind: 'none' }, { kind: 'strip-content-type' }] as const) {
      proxy.setFault(f);
      const before = proxy.blobRequests().length;
      const out = await src.readRanges(ranges);
      ranges.forEach((r, i) => assert.ok(out[i]?.equals(data.subarray(r.offset, r.offset + r.length)), `${f.kind} range ${i}`));
      const sent = proxy.blobRequests().slice(before);
      assert.equal(sent.length, 1, `${f.kind}: one request`);
      assert.ok(sent[0]?.range?.includes(','), `${f.kind}: a multi-range header`);
    }
    proxy.setFault({ kind: 'none' });
  });

  it('multi-range: a server answering 200 is read once, up to the last wanted byte', async () => {
    const src = (await client().resolveBlob(ref(), digest)) as RegistryBlobSource;
    proxy.setFault({ kind: 'ignore-range' });
    const ranges = scattered(BLOB_BYTES / 2, 10, 1000);
    const out = await src.readRanges(ranges);
    ranges.forEach((r, i) => assert.ok(out[i]?.equals(data.subarray(r.offset, r.offset + r.length)), `range ${i}`));
    proxy.setFault({ kind: 'none' });
  });

  it('multi-range: a 400 switches that host to single ranges; force_single_range_mode never sends one', async () => {
    const c = client();
    const src = (await c.resolveBlob(ref(), digest)) as RegistryBlobSource;
    proxy.setFault({ kind: 'reject-multi-range' });
    const ranges = scattered(BLOB_BYTES, 5, 100);
    let before = proxy.blobRequests().length;
    let out = await src.readRanges(ranges);
    ranges.forEach((r, i) => assert.ok(out[i]?.equals(data.subarray(r.offset, r.offset + r.length))));
    assert.equal(proxy.blobRequests().slice(before).filter((r) => r.range?.includes(',')).length, 1, 'one multi-range try');
    before = proxy.blobRequests().length;
    out = await src.readRanges(ranges);
    ranges.forEach((r, i) => assert.ok(out[i]?.equals(data.subarray(r.offset, r.offset + r.length))));
    const later = proxy.blobRequests().slice(before);
    assert.equal(later.length, ranges.length);
    assert.ok(later.every((r) => !r.range?.includes(',')), 'host is in single-range mode');
    proxy.setFault({ kind: 'none' });

    const forced = (await client({ forceSingleRangeMode: true }).resolveBlob(ref(), digest)) as RegistryBlobSource;
    before = proxy.blobRequests().length;
    out = await forced.readRanges(ranges);
    ranges.forEach((r, i) => assert.ok(out[i]?.equals(data.subarray(r.offset, r.offset + r.length))));
    assert.ok(proxy.blobRequests().slice(before).every((r) => !r.range?.includes(',')));
  });

  it('multi-range: a host that answers one with 200 gets single ranges after, so windows do not read from 0 each time', async () => {
    // A real docker-registry answers multi-range requests with 206 multipart; some registries and CDNs answer
    // 200 with the whole blob. The proxy plays one: multi-range requests lose their Range, single ones keep it.
    const src = (await client().resolveBlob(ref(), digest)) as RegistryBlobSource;
    proxy.setFault({ kind: 'ignore-multi-range' });
    const windows = [scattered(BLOB_BYTES / 4, 4, 1000), scattered(BLOB_BYTES / 4, 4, 1000).map((r) => ({ offset: r.offset + Math.floor(BLOB_BYTES / 2), length: r.length }))];
    let before = proxy.blobRequests().length;
    let out = await src.readRanges(windows[0]!);
    windows[0]!.forEach((r, i) => assert.ok(out[i]?.equals(data.subarray(r.offset, r.offset + r.length)), `range ${i}`));
    assert.equal(proxy.blobRequests().slice(before).length, 1, 'one multi-range request, answered 200');
    before = proxy.blobRequests().length;
    out = await src.readRanges(windows[1]!);
    windows[1]!.forEach((r, i) => assert.ok(out[i]?.equals(data.subarray(r.offset, r.offset + r.length)), `range ${i}`));
    const later = proxy.blobRequests().slice(before);
    assert.equal(later.length, windows[1]!.length);
    assert.ok(later.every((r) => r.range !== undefined && !r.range.includes(',')), 'host is in single-range mode: no read from 0');
    proxy.setFault({ kind: 'none' });
  });

  it('multi-range reads survive a reset mid-body', async () => {
    const src = (await client().resolveBlob(ref(), digest)) as RegistryBlobSource;
    proxy.setFault({ kind: 'reset-mid-body', afterBytes: 5_000, times: 1 });
    const ranges = scattered(BLOB_BYTES, 8, 4000);
    const out = await src.readRanges(ranges);
    ranges.forEach((r, i) => assert.ok(out[i]?.equals(data.subarray(r.offset, r.offset + r.length))));
    proxy.setFault({ kind: 'none' });
  });

  it('a redirect to an expiring storage URL is refreshed when it expires', async () => {
    proxy.setFault({ kind: 'redirect', ttlMs: 300 });
    const src = (await client().resolveBlob(ref(), digest)) as RegistryBlobSource;
    assert.ok((await src.readRange(0, 100)).equals(data.subarray(0, 100)));
    await new Promise((r) => setTimeout(r, 400));
    assert.ok((await src.readRange(100, 100)).equals(data.subarray(100, 200)));
    const out = await src.readRanges(scattered(BLOB_BYTES, 4, 50));
    assert.equal(out.length, 4);
    const storageHits = proxy.requests.filter((r) => r.url.startsWith('/_storage'));
    assert.ok(storageHits.some((r) => r.range?.includes(',')), 'multi-range went to the storage URL');
    proxy.setFault({ kind: 'none' });
  });

  it('fetchBlobParallel: whole blob in order, digest verified, bounded concurrency', async () => {
    const c = client();
    proxy.setFault({ kind: 'none' });
    const blob = await c.fetchBlobParallel(ref(), digest, { concurrency: 3, chunkBytes: 256 * 1024 });
    assert.equal(blob.size, BLOB_BYTES);
    assert.ok((await readAll(blob.body)).equals(data));
    assert.ok(proxy.maxConcurrentBlobRequests <= 3, `at most 3 at once, saw ${proxy.maxConcurrentBlobRequests}`);
    assert.ok(proxy.maxConcurrentBlobRequests >= 2, 'in parallel');
  });

  it('fetchBlobParallel: a slow consumer holds back requests (bounded memory)', async () => {
    const c = client();
    proxy.setFault({ kind: 'none' });
    const before = proxy.blobRequests().length;
    const blob = await c.fetchBlobParallel(ref(), digest, { concurrency: 2, chunkBytes: 128 * 1024 });
    const it = blob.body[Symbol.asyncIterator]();
    await it.next();
    await new Promise((r) => setTimeout(r, 300));
    const issued = proxy.blobRequests().length - before - 1; // minus the resolve probe
    assert.ok(issued <= 2 + 2, `issued ${issued} range requests while the consumer waited`);
    blob.body.destroy();
  });

  it('fetchBlobParallel: faults are retried; a corrupted byte fails the digest; 200-for-range falls back to one GET', async () => {
    const c = client();
    proxy.setFault({ kind: 'reset-mid-body', afterBytes: 10_000, times: 2 });
    let blob = await c.fetchBlobParallel(ref(), digest, { concurrency: 4, chunkBytes: 512 * 1024 });
    assert.ok((await readAll(blob.body)).equals(data));

    proxy.setFault({ kind: 'none' });
    blob = await c.fetchBlobParallel(ref(), digest, { concurrency: 4, chunkBytes: 512 * 1024 });
    proxy.setFault({ kind: 'corrupt', times: 1 });
    await assert.rejects(readAll(blob.body), (err: unknown) => err instanceof RegistryError && /content has digest/.test(err.message));

    proxy.setFault({ kind: 'ignore-range' });
    const before = proxy.blobRequests().length;
    blob = await c.fetchBlobParallel(ref(), digest, { concurrency: 4, chunkBytes: 512 * 1024 });
    assert.ok((await readAll(blob.body)).equals(data));
    assert.equal(proxy.blobRequests().length - before, 2, 'the probe, then one plain GET');
    proxy.setFault({ kind: 'none' });
  });

  it('LayerReader: a read that fails while the registry is down succeeds once it is back (nothing poisoned)', async () => {
    const files = [
      { name: 'a', content: randomBytes(300_000) },
      { name: 'b', content: randomBytes(50_000) },
    ];
    const { blob } = await toEstargz(await makeTar(files), { chunkSizeBytes: 64 * 1024 });
    const layerDigest = await pushBlob(reg.host, REPO, blob);
    const c = client({ requestTimeoutMs: 300, fetchTimeoutMs: 1_000, retry: { maxRetries: 2, minWaitMs: 10, maxWaitMs: 50 } });
    const src = await c.resolveBlob(ref(), layerDigest);
    const { toc, tocOffset } = await readToc(src);
    const tree = buildLayerTree(toc, { blobSize: src.size, tocOffset });
    const reader = new LayerReader(src, tree, { scheduler });
    const a = tree.resolvePath('a');
    assert.ok(a);
    for (const f of [{ kind: 'stall' }, { kind: 'reset' }, { kind: 'status', status: 503 }] as const) {
      proxy.setFault(f);
      await assert.rejects(reader.read(a, 1000, 200_000), RegistryError, f.kind);
      proxy.setFault({ kind: 'none' });
      const got = await reader.read(a, 1000, 200_000);
      assert.ok(got.equals(files[0]!.content.subarray(1000, 201_000)), `after ${f.kind}`);
      reader['cache']?.clear(); // next round fetches again
    }
    // With the middle chunk cached, a read over three chunks fetches the two outer ones in one multi-range GET.
    reader['cache']?.clear();
    const chunks = a.chunks;
    assert.ok(chunks.length >= 4);
    const mid = chunks[1]!;
    await reader.read(a, mid.fileOffset, 10); // caches chunk 1
    const before = proxy.blobRequests().length;
    const from = chunks[0]!.fileOffset + 5;
    const to = chunks[2]!.fileOffset + 5;
    const got = await reader.read(a, from, to - from);
    assert.ok(got.equals(files[0]!.content.subarray(from, to)));
    const sent = proxy.blobRequests().slice(before);
    assert.equal(sent.length, 1, 'one request for the two missing chunks');
    assert.ok(sent[0]?.range?.includes(','), `a multi-range request: ${sent[0]?.range}`);
  });
});

describe('pull-through cache mirror (distribution proxy.remoteurl) in hosts.toml', () => {
  let origin: RunningRegistry;
  let mirror: RunningRegistry;
  let originData: string;
  let mirrorData: string;
  let originPort: number;
  let mirrorPort: number;
  let hostsDir: string;
  let data: Buffer;
  let digest: string;

  before(async () => {
    originData = await mkdtemp(join(tmpdir(), 'stargaze-origin-data-'));
    mirrorData = await mkdtemp(join(tmpdir(), 'stargaze-mirror-data-'));
    originPort = await freePort();
    mirrorPort = await freePort();
    origin = await startRegistry({ port: originPort, dataDir: originData });
    mirror = await startRegistry({ port: mirrorPort, dataDir: mirrorData, proxyRemoteUrl: `http://${origin.host}` });
    data = randomBytes(500_000);
    digest = await pushBlob(origin.host, 'library/app', data);
    hostsDir = await mkdtemp(join(tmpdir(), 'stargaze-hosts-'));
    await mkdir(join(hostsDir, origin.host));
    await writeFile(
      join(hostsDir, origin.host, 'hosts.toml'),
      `server = "http://${origin.host}"\n[host."http://${mirror.host}"]\ncapabilities = ["pull", "resolve"]\n`,
    );
  });
  after(async () => {
    await mirror?.stop();
    await origin?.stop();
    for (const d of [originData, mirrorData, hostsDir]) if (d !== undefined) await rm(d, { recursive: true, force: true });
  });

  it('the mirror serves (and caches); with the origin stopped the mirror still serves; with the mirror stopped the origin does', async () => {
    const c = new RegistryClient({ hostsDir, requestTimeoutMs: 3_000, retry: { maxRetries: 1, minWaitMs: 10, maxWaitMs: 50 } });
    try {
      const ref = `${origin.host}/library/app`;
      let src = (await c.resolveBlob(ref, digest)) as RegistryBlobSource;
      assert.equal(src.host, mirror.host, 'the mirror comes first');
      assert.ok((await src.readRange(0, 1000)).equals(data.subarray(0, 1000)));
      // Let the pull-through cache finish storing the blob it fetched from the origin.
      const whole = await c.fetchBlob(ref, digest);
      assert.ok((await readAll(whole.body)).equals(data));
      await new Promise((r) => setTimeout(r, 500));

      await origin.stop();
      src = (await c.resolveBlob(ref, digest)) as RegistryBlobSource;
      assert.equal(src.host, mirror.host);
      assert.ok((await src.readRange(123, 4567)).equals(data.subarray(123, 123 + 4567)), 'the mirror serves without the origin');
      const out = await src.readRanges(scattered(data.length, 6, 500));
      assert.equal(out.length, 6);

      origin = await startRegistry({ port: originPort, dataDir: originData });
      const live = (await c.resolveBlob(ref, digest)) as RegistryBlobSource;
      assert.equal(live.host, mirror.host);
      await mirror.stop();
      // A source resolved on the mirror keeps working: its reads move to the next host.
      assert.ok((await live.readRange(5000, 5000)).equals(data.subarray(5000, 10_000)), 'a live source fails over');
      assert.equal(live.host, origin.host);
      src = (await c.resolveBlob(ref, digest)) as RegistryBlobSource;
      assert.equal(src.host, origin.host, 'fell back to the origin');
      assert.ok((await src.readRange(99, 1000)).equals(data.subarray(99, 1099)));
      const blob = await c.fetchBlobParallel(ref, digest, { concurrency: 4, chunkBytes: 100_000 });
      assert.ok((await readAll(blob.body)).equals(data));
    } finally {
      await c.close();
    }
  });
});
