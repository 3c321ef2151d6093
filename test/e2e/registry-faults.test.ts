/**
 * Lazy pull and container reads through a faulty registry: a fault-injecting proxy (test/unit/remote/
 * fault-proxy.ts) sits between the daemon (and containerd) and a real docker-registry. For each fault the
 * image is pulled with `ctr-remote images rpull` and a container reads a region of a big file of the upper
 * layer that no earlier test read (1 MiB eStargz chunks; layers may be shared between namespaces, so regions,
 * not namespaces, keep reads cold) while the fault is active on that layer's blob: the read succeeds
 * (retries, single-range fallback, 200 handling...), or, for a registry that stalls, fails within
 * fetching_timeout_sec with an I/O error while the daemon keeps serving the other layer, and the same read
 * succeeds once the registry answers again. The expiring redirect gets an image of its own, so its layer is
 * resolved (and redirected) while the fault is on.
 */
import assert from 'node:assert/strict';
import { createCipheriv, createHash } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import {
  buildBusyboxImage,
  convertToEstargz,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  withHost,
  type Containerd,
  type EstargzImage,
  type Registry,
  type StargazeDaemon,
} from './harness';
import { startFaultProxy, type Fault, type FaultProxy } from '../unit/remote/fault-proxy';

const notRoot = process.getuid?.() !== 0;
const MiB = 1024 * 1024;
const BIG_PATH = '/data/big.bin';
const BIG_BYTES = 48 * MiB;
const BIG_SEED = 'registry-faults';
/** Region k of the big file: 2 MiB starting 400 KiB into the k-th 4 MiB (spans three 1 MiB chunks). */
const REGION_BYTES = 2 * MiB;
const regionOffset = (k: number): number => k * 4 * MiB + 400 * 1024;
const PROBE_PATH = '/hello.txt';
const PROBE = 'served by the other layer\n';
/** Bounds given to the daemon: small, so a stalled registry fails a read quickly. */
const FETCHING_TIMEOUT_SEC = 8;
/** Background fetch off: it would fetch the whole layer behind the tests' back, before the faults are on. */
const DAEMON_CONFIG = `no_background_fetch = true
[resolver]
request_timeout_sec = 2
[blob]
fetching_timeout_sec = ${FETCHING_TIMEOUT_SEC}
max_retries = 4
min_wait_msec = 20
max_wait_msec = 1500
`;
/** Reads region k with dd (4 KiB blocks) and prints its md5. */
function readRegion(k: number): string[] {
  return ['/bin/sh', '-c', `dd if=${BIG_PATH} bs=4096 skip=${regionOffset(k) / 4096} count=${REGION_BYTES / 4096} 2>/dev/null | md5sum`];
}

/** The big file's bytes, as the harness writes `{ random, seed }` content (AES-256-CTR keystream). */
function bigFileBytes(size: number, seed: string): Buffer {
  const key = createHash('sha256').update(seed).digest();
  return createCipheriv('aes-256-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(size));
}

const md5 = (b: Buffer): string => `${createHash('md5').update(b).digest('hex')}  -\n`;

describe('registry faults end to end', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  let proxy: FaultProxy;
  let daemon: StargazeDaemon;
  let containerd: Containerd;
  let image: EstargzImage;
  let redirectImage: EstargzImage;
  let ref: string;
  let bigLayer: string;
  let big: Buffer;
  let nextRegion = 0;
  const expectedOf = (k: number): string => md5(big.subarray(regionOffset(k), regionOffset(k) + REGION_BYTES));

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    proxy = await startFaultProxy(() => registry.host);
    daemon = await startDaemon({ scope: cleanup, config: DAEMON_CONFIG, plainHttpHosts: [proxy.host] });
    containerd = await startContainerd({ scope: cleanup, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    const build = async (tag: string, seed: string, bytes: number): Promise<EstargzImage> => {
      const original = await buildBusyboxImage({
        host: registry.host,
        repo: 'e2e/faults',
        tag,
        extraFiles: [{ path: PROBE_PATH, content: PROBE }],
        layers: [[{ path: BIG_PATH, content: { random: bytes, seed } }]],
      });
      return convertToEstargz(containerd, original.ref, `${registry.host}/e2e/faults:${tag}-esgz`, { chunkSizeBytes: MiB });
    };
    image = await build('v1', BIG_SEED, BIG_BYTES);
    redirectImage = await build('redirect', `${BIG_SEED}-redirect`, 8 * MiB);
    big = bigFileBytes(BIG_BYTES, BIG_SEED);
    bigLayer = image.layers[image.layers.length - 1]!.digest;
    ref = withHost(image.ref, proxy.host);
    // Baseline, no fault: region 0 reads right.
    const ns = containerd.newNamespace('faults-baseline');
    await containerd.rpull(ref, { namespace: ns });
    const k = nextRegion++;
    assert.equal((await containerd.runContainer(ref, readRegion(k), { namespace: ns, snapshotter: 'stargz' })).stdout, expectedOf(k));
  });
  after(async () => {
    await proxy?.close();
  });

  /** Pulls into a fresh namespace with no fault, then reads a fresh region of the big file with `fault` on its layer. */
  async function readThrough(fault: Fault, label: string): Promise<void> {
    const ns = containerd.newNamespace(label);
    proxy.setFault({ kind: 'none' });
    await containerd.rpull(ref, { namespace: ns });
    proxy.setFault(fault, { digest: bigLayer });
    const k = nextRegion++;
    try {
      const r = await containerd.runContainer(ref, readRegion(k), { namespace: ns, snapshotter: 'stargz', timeoutMs: 120_000 });
      assert.equal(r.stdout, expectedOf(k), `${label}: the container read the right bytes`);
    } finally {
      proxy.setFault({ kind: 'none' });
    }
  }

  const faults: Array<[string, Fault]> = [
    ['connection resets', { kind: 'reset', times: 3 }],
    ['a body cut off mid-way', { kind: 'reset-mid-body', afterBytes: 200_000, times: 2 }],
    ['503 with Retry-After', { kind: 'status', status: 503, retryAfterSec: 1, times: 2 }],
    ['429 too many requests', { kind: 'status', status: 429, times: 3 }],
    ['a server that answers 200 to ranges', { kind: 'ignore-range' }],
    ['a server that refuses multi-range (400)', { kind: 'reject-multi-range' }],
    ['206 answers without Content-Type', { kind: 'strip-content-type' }],
  ];
  for (const [name, fault] of faults) {
    test(`reads succeed through ${name}`, async () => {
      const before = proxy.blobRequests().length;
      await readThrough(fault, fault.kind);
      const hit = proxy.blobRequests().slice(before).filter((r) => r.fault !== 'none');
      assert.ok(hit.length > 0, `the fault was hit (${name})`);
    });
  }

  test('a redirect to an expiring storage URL: pull and reads succeed across expiry', async () => {
    const ns = containerd.newNamespace('redirect');
    const layer = redirectImage.layers[redirectImage.layers.length - 1]!.digest;
    const rref = withHost(redirectImage.ref, proxy.host);
    const bytes = bigFileBytes(8 * MiB, `${BIG_SEED}-redirect`);
    proxy.setFault({ kind: 'redirect', ttlMs: 1500 }, { digest: layer });
    try {
      await containerd.rpull(rref, { namespace: ns });
      await new Promise((r) => setTimeout(r, 2000)); // the URL the daemon resolved has expired
      const r = await containerd.runContainer(rref, readRegion(0), { namespace: ns, snapshotter: 'stargz' });
      assert.equal(r.stdout, md5(bytes.subarray(regionOffset(0), regionOffset(0) + REGION_BYTES)));
      assert.ok(proxy.requests.some((q) => q.url.startsWith('/_storage') && q.range !== undefined), 'range reads went to storage');
    } finally {
      proxy.setFault({ kind: 'none' });
    }
  });

  test('a stalled registry: the read fails with EIO within fetching_timeout, other layers keep serving, and the same read works after', async () => {
    const ns = containerd.newNamespace('stall');
    await containerd.rpull(ref, { namespace: ns });
    proxy.setFault({ kind: 'stall' }, { digest: bigLayer });
    let healed = false;
    try {
      const t0 = Date.now();
      const failing = containerd.runContainer(ref, ['/bin/sh', '-c', `cat ${BIG_PATH} > /dev/null`], {
        namespace: ns,
        snapshotter: 'stargz',
        allowFailure: true,
        timeoutMs: 120_000,
      });
      // Meanwhile the other layer is served.
      const other = await containerd.runContainer(ref, ['/bin/cat', PROBE_PATH], { namespace: ns, snapshotter: 'stargz', timeoutMs: 60_000 });
      assert.equal(other.stdout, PROBE);
      const r = await failing;
      const took = (Date.now() - t0) / 1000;
      assert.notEqual(r.code, 0, 'the read of the stalled layer failed');
      assert.match(r.stderr + r.stdout, /I\/O error|Input\/output error/i, 'with EIO');
      assert.ok(took < FETCHING_TIMEOUT_SEC * 3 + 15, `failed after ${took.toFixed(1)} s, bound ${FETCHING_TIMEOUT_SEC} s`);
      // The layer's state file tells why (reference: /.stargz-snapshotter/<digest>.json at the layer root). It is
      // served locally, so it reads fine while the registry stalls; allowFailure only lets the message show cat's error.
      const state = await containerd.runContainer(ref, ['/bin/cat', `/.stargz-snapshotter/${bigLayer}.json`], {
        namespace: ns,
        snapshotter: 'stargz',
        allowFailure: true,
      });
      assert.equal(state.code, 0, `reading the state file: ${state.stderr}`);
      assert.match(state.stdout, /"error":"[^"]*(timed out|abort)/i, `state file: ${state.stdout}`);

      proxy.setFault({ kind: 'none' });
      healed = true;
      const again = await containerd.runContainer(ref, ['/bin/sh', '-c', `md5sum < ${BIG_PATH}`], { namespace: ns, snapshotter: 'stargz', timeoutMs: 120_000 });
      assert.equal(again.stdout, md5(big), 'the whole file reads fine once the registry is back');
    } finally {
      if (!healed) proxy.setFault({ kind: 'none' });
    }
  });
});
