/**
 * `stargaze convert` end to end: a busybox image (built by the harness, pushed to a real registry) is
 * converted by our CLI, then consumed by the reference tools: `ctr-remote images rpull` through containerd
 * and our daemon mounts every layer lazily; `ctr images pull` unpacks it on overlayfs (containerd checks the
 * diff_ids); `ctr-remote images get-toc-digest` reads our TOC. Plus: a second convert uploads nothing, Docker
 * media types in, OCI layouts in and out (checked with skopeo), and zstd:chunked output.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import path from 'node:path';
import { gunzipSync } from 'node:zlib';
import { before, describe, test } from 'node:test';
import {
  ANNOTATION_TOC_DIGEST,
  ANNOTATION_UNCOMPRESSED_SIZE,
  DEFAULT_CLI_PATH,
  buildBusyboxImage,
  fetchManifest,
  makeTmpRoot,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  type BuiltImage,
  type Containerd,
  type LogEntry,
  type Registry,
  type RunResult,
  type StargazeDaemon,
} from './harness';

const notRoot = process.getuid?.() !== 0;
const PREPARED = 'remote-snapshot-prepared';
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
const HELLO = 'converted by stargaze convert\n';
const UPPER = 'from the upper layer\n';
const CONVERT_TIMEOUT_MS = 300_000;

function prepared(daemon: StargazeDaemon, value: 'true' | 'false'): LogEntry[] {
  return daemon.logs().filter((e) => e[PREPARED] === value);
}

/**
 * `ctr run --rm` output, retried once when it comes back empty: ctr 1.6 now and then loses a short-lived
 * task's stdout (its fifo copy races the exit), whatever the snapshotter; a real failure fails twice.
 */
async function runOutput(containerd: Containerd, ref: string, command: string[], opts: { namespace: string; snapshotter?: string }): Promise<string> {
  const first = await containerd.runContainer(ref, command, opts);
  if (first.stdout !== '') return first.stdout;
  return (await containerd.runContainer(ref, command, opts)).stdout;
}

async function getBlob(digest: string): Promise<Buffer> {
  const res = await fetch(`http://${registryHost}/v2/e2e/convert/blobs/${digest}`, { signal: AbortSignal.timeout(30_000) });
  assert.equal(res.status, 200, `GET blob ${digest}`);
  return Buffer.from(await res.arrayBuffer());
}

let registryHost = '';

async function convert(args: string[]): Promise<RunResult> {
  return run(process.execPath, [DEFAULT_CLI_PATH, 'convert', ...args], { timeoutMs: CONVERT_TIMEOUT_MS });
}

describe('stargaze convert end to end', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  let daemon: StargazeDaemon;
  let containerd: Containerd;
  let original: BuiltImage;
  let dst: string;
  let converted: Awaited<ReturnType<typeof fetchManifest>>;

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    registryHost = registry.host;
    daemon = await startDaemon({ scope: cleanup });
    containerd = await startContainerd({ scope: cleanup, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    original = await buildBusyboxImage({
      host: registry.host,
      repo: 'e2e/convert',
      tag: 'v1',
      extraFiles: [{ path: '/hello.txt', content: HELLO }],
      layers: [[{ path: '/etc/upper.txt', content: UPPER }]],
    });
    dst = `${registry.host}/e2e/convert:v1-stargaze`;
    const r = await convert(['--plain-http', original.ref, dst]);
    assert.match(r.stdout, /^sha256:[0-9a-f]{64}\n$/, 'stdout is the new manifest digest');
    converted = await fetchManifest(registry.host, 'e2e/convert', 'v1-stargaze');
    assert.equal(r.stdout.trim(), converted.digest);
  });

  test('DST is one OCI manifest with eStargz layers, their annotations and the new diff_ids', async () => {
    assert.equal(converted.mediaType, OCI_MANIFEST);
    assert.equal(converted.manifest.layers.length, original.layers.length);
    const config = JSON.parse((await getBlob(converted.manifest.config.digest)).toString('utf8')) as { rootfs: { diff_ids: string[] } };
    for (const [i, layer] of converted.manifest.layers.entries()) {
      assert.equal(layer.mediaType, OCI_LAYER_GZIP);
      assert.match(layer.annotations[ANNOTATION_TOC_DIGEST] ?? '', /^sha256:[0-9a-f]{64}$/);
      assert.notEqual(layer.digest, original.layers[i]?.digest);
      const plain = gunzipSync(await getBlob(layer.digest));
      assert.equal(layer.annotations[ANNOTATION_UNCOMPRESSED_SIZE], String(plain.length));
      assert.equal(config.rootfs.diff_ids[i], 'sha256:' + createHash('sha256').update(plain).digest('hex'));
    }
  });

  test('ctr-remote rpull through our daemon mounts every layer lazily, and ctr run reads the image', async () => {
    const ns = containerd.newNamespace('conv-lazy');
    const before = prepared(daemon, 'true').length;
    const fallbacksBefore = prepared(daemon, 'false').length;
    await containerd.rpull(dst, { namespace: ns });
    assert.equal(prepared(daemon, 'true').length - before, converted.manifest.layers.length, 'every layer remote-snapshot-prepared=true');
    assert.equal(prepared(daemon, 'false').length - fallbacksBefore, 0, 'no layer fell back');
    assert.equal(await runOutput(containerd, dst, ['/bin/cat', '/hello.txt', '/etc/upper.txt'], { namespace: ns, snapshotter: 'stargz' }), HELLO + UPPER);
  });

  test('ctr images pull (overlayfs) unpacks it with matching diff_ids and runs it; ctr-remote reads our TOC digests', async () => {
    const ns = containerd.newNamespace('conv-overlay');
    await containerd.pull(dst, { namespace: ns });
    assert.equal(await runOutput(containerd, dst, ['/bin/cat', '/hello.txt', '/etc/upper.txt'], { namespace: ns }), HELLO + UPPER);
    for (const layer of converted.manifest.layers) {
      const toc = await containerd.ctrRemote(['images', 'get-toc-digest', layer.digest], { namespace: ns });
      assert.equal(toc.stdout.trim(), layer.annotations[ANNOTATION_TOC_DIGEST], `reference TOC digest of ${layer.digest}`);
    }
  });

  test('a second convert to the same DST uploads no blob and gives the same digest', async () => {
    const r = await convert(['--plain-http', original.ref, dst]);
    assert.equal(r.stdout.trim(), converted.digest);
    assert.match(r.stderr, /: 0 blob\(s\) stored, 3 already there/);
  });

  test('Docker media types in, OCI out; --quiet prints nothing', async () => {
    const docker = `${registry.host}/e2e/convert:v1-docker`;
    await run('skopeo', ['--insecure-policy', 'copy', '--quiet', '--format', 'v2s2', '--src-tls-verify=false', '--dest-tls-verify=false', `docker://${original.ref}`, `docker://${docker}`]);
    assert.equal((await fetchManifest(registry.host, 'e2e/convert', 'v1-docker')).mediaType, 'application/vnd.docker.distribution.manifest.v2+json');
    const r = await convert(['--plain-http', '--quiet', docker, `${registry.host}/e2e/convert:v1-docker-esgz`]);
    assert.equal(r.stdout + r.stderr, '');
    const out = await fetchManifest(registry.host, 'e2e/convert', 'v1-docker-esgz');
    assert.equal(out.mediaType, OCI_MANIFEST);
    assert.deepEqual(
      out.manifest.layers.map((l) => l.digest),
      converted.manifest.layers.map((l) => l.digest),
      'same layers as from the OCI source',
    );
    const ns = containerd.newNamespace('conv-docker');
    await containerd.pull(`${registry.host}/e2e/convert:v1-docker-esgz`, { namespace: ns });
  });

  test('OCI layouts: registry -> oci:DIR (skopeo reads it), and a skopeo-made oci:DIR -> registry, rpulled lazily', async (t) => {
    const dir = await makeTmpRoot('convert-oci', t);
    const out = path.join(dir, 'out');
    await convert(['--plain-http', '--quiet', original.ref, `oci:${out}:esgz`]);
    const inspected = JSON.parse((await run('skopeo', ['inspect', '--raw', `oci:${out}:esgz`])).stdout) as { layers: Array<{ digest: string }> };
    assert.deepEqual(
      inspected.layers.map((l) => l.digest),
      converted.manifest.layers.map((l) => l.digest),
    );

    const input = path.join(dir, 'in');
    await run('skopeo', ['--insecure-policy', 'copy', '--quiet', '--src-tls-verify=false', `docker://${original.ref}`, `oci:${input}:src`]);
    const fromOci = `${registry.host}/e2e/convert:v1-from-oci`;
    // Another chunk size gives another base layer blob (the upper one has no file that big and is the same),
    // so new chain ids: the daemon has not seen these layers yet.
    const r = await convert(['--plain-http', '--chunk-size', '65536', `oci:${input}:src`, fromOci]);
    assert.match(r.stderr, /: 2 blob\(s\) stored, 1 already there/, r.stderr);
    const ns = containerd.newNamespace('conv-oci');
    const before = prepared(daemon, 'true').length;
    await containerd.rpull(fromOci, { namespace: ns });
    assert.equal(prepared(daemon, 'true').length - before, converted.manifest.layers.length);
    assert.equal(await runOutput(containerd, fromOci, ['/bin/cat', '/hello.txt'], { namespace: ns, snapshotter: 'stargz' }), HELLO);
  });

  test('--zstd-chunked: containerd unpacks it on overlayfs (diff_ids match) and ctr-remote reads its TOC', async () => {
    const zst = `${registry.host}/e2e/convert:v1-zstdchunked`;
    await convert(['--plain-http', '--quiet', '--zstd-chunked', original.ref, zst]);
    const m = await fetchManifest(registry.host, 'e2e/convert', 'v1-zstdchunked');
    assert.equal(m.mediaType, OCI_MANIFEST);
    const ns = containerd.newNamespace('conv-zstd');
    await containerd.pull(zst, { namespace: ns });
    assert.equal(await runOutput(containerd, zst, ['/bin/cat', '/hello.txt', '/etc/upper.txt'], { namespace: ns }), HELLO + UPPER);
    for (const layer of m.manifest.layers) {
      assert.equal(layer.mediaType, 'application/vnd.oci.image.layer.v1.tar+zstd');
      assert.match(layer.annotations['io.containers.zstd-chunked.manifest-position'] ?? '', /^\d+:\d+:\d+:1$/);
      const toc = await containerd.ctrRemote(['images', 'get-toc-digest', '--zstdchunked', layer.digest], { namespace: ns });
      assert.equal(toc.stdout.trim(), layer.annotations[ANNOTATION_TOC_DIGEST], `reference TOC digest of ${layer.digest}`);
    }
  });

  test('bad usage and a missing source: one clear message and a non-zero exit', async () => {
    const usage = await run(process.execPath, [DEFAULT_CLI_PATH, 'convert', '--compression-level', '12', 'a', 'b'], { allowFailure: true });
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--compression-level must be between 0 and 9, not 12/);
    const missing = await run(process.execPath, [DEFAULT_CLI_PATH, 'convert', '--plain-http', `${registry.host}/e2e/nope:v1`, `${registry.host}/e2e/nope:v2`], { allowFailure: true });
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /manifest v1 of .*e2e\/nope.*404/);
  });
});
