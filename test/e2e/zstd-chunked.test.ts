/**
 * zstd:chunked layers mount lazily in our daemon: a busybox image converted by the reference tool
 * (`ctr-remote images convert --zstdchunked --oci`) and one converted by `stargaze convert --zstd-chunked`,
 * each pulled with `ctr-remote images rpull` through our daemon: every layer is a remote snapshot, a
 * container reads its files, and background fetch decodes the whole blob and finds the config's diff_id.
 */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import {
  ANNOTATION_TOC_DIGEST,
  DEFAULT_CLI_PATH,
  buildBusyboxImage,
  fetchManifest,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  waitFor,
  type Containerd,
  type LogEntry,
  type Registry,
  type StargazeDaemon,
} from './harness';

const notRoot = process.getuid?.() !== 0;
const PREPARED = 'remote-snapshot-prepared';
const ZSTD_LAYER = 'application/vnd.oci.image.layer.v1.tar+zstd';
const UPPER = 'from the upper layer\n';

function prepared(daemon: StargazeDaemon, value: 'true' | 'false'): LogEntry[] {
  return daemon.logs().filter((e) => e[PREPARED] === value);
}

/** `ctr run --rm` output, retried once when empty (ctr 1.6 now and then loses a short task's stdout). */
async function runOutput(containerd: Containerd, ref: string, command: string[], namespace: string): Promise<string> {
  const first = await containerd.runContainer(ref, command, { namespace, snapshotter: 'stargz' });
  if (first.stdout !== '') return first.stdout;
  return (await containerd.runContainer(ref, command, { namespace, snapshotter: 'stargz' })).stdout;
}

describe('zstd:chunked lazy pull end to end', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  let daemon: StargazeDaemon;
  let containerd: Containerd;

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    // Background fetch stays on: it is what checks each layer against its diff_id.
    daemon = await startDaemon({ scope: cleanup });
    containerd = await startContainerd({ scope: cleanup, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
  });

  /**
   * Pushes a two-layer busybox image whose base layer holds /hello.txt = `hello`, converts it with
   * `convertTo`, rpulls it lazily, runs cat, and waits for background fetch to confirm every diff_id.
   */
  async function lazyPullAndRun(tag: string, hello: string, convertTo: (src: string, dst: string) => Promise<void>): Promise<void> {
    const original = await buildBusyboxImage({
      host: registry.host,
      repo: 'e2e/zstd',
      tag,
      extraFiles: [{ path: '/hello.txt', content: hello }],
      layers: [[{ path: '/etc/upper.txt', content: UPPER }]],
    });
    const dstTag = `${tag}-zstdchunked`;
    const dst = `${registry.host}/e2e/zstd:${dstTag}`;
    await convertTo(original.ref, dst);
    const { manifest } = await fetchManifest(registry.host, 'e2e/zstd', dstTag);
    assert.equal(manifest.layers.length, 2);
    for (const layer of manifest.layers) {
      assert.equal(layer.mediaType, ZSTD_LAYER);
      assert.match(layer.annotations[ANNOTATION_TOC_DIGEST] ?? '', /^sha256:[0-9a-f]{64}$/);
    }
    const configRes = await fetch(`http://${registry.host}/v2/e2e/zstd/blobs/${manifest.config.digest}`, { signal: AbortSignal.timeout(30_000) });
    const config = (await configRes.json()) as { rootfs: { diff_ids: string[] } };

    const ns = containerd.newNamespace('zstd');
    const okBefore = prepared(daemon, 'true').length;
    const fallbacksBefore = prepared(daemon, 'false').length;
    await containerd.rpull(dst, { namespace: ns });
    assert.equal(prepared(daemon, 'true').length - okBefore, manifest.layers.length, 'every layer remote-snapshot-prepared=true');
    assert.equal(prepared(daemon, 'false').length - fallbacksBefore, 0, 'no layer fell back');
    assert.equal(await runOutput(containerd, dst, ['/bin/cat', '/hello.txt', '/etc/upper.txt'], ns), hello + UPPER);

    // Background fetch decodes each blob frame by frame: its diff_id is the config's, and the chainID holds.
    for (const [i, layer] of manifest.layers.entries()) {
      const fetched = await waitFor(
        `background fetch of ${layer.digest}`,
        () => daemon.logs().find((e) => e.msg === 'layer fully fetched' && e.layer === layer.digest),
        { timeoutMs: 30_000 },
      );
      assert.equal(fetched.diffId, config.rootfs.diff_ids[i], `diff_id of layer ${i}`);
    }
    const mismatches = daemon.logs().filter((e) => /does not match its chainID|background fetch failed/.test(String(e.msg)));
    assert.deepEqual(mismatches, []);
  }

  test('ctr-remote images convert --zstdchunked --oci: rpull mounts every layer lazily, ctr run reads it', async () => {
    await lazyPullAndRun('ref', 'converted by ctr-remote --zstdchunked\n', async (src, dst) => {
      const namespace = containerd.newNamespace('zconv');
      await containerd.fetch(src, { namespace });
      try {
        await containerd.ctrRemote(['images', 'convert', '--zstdchunked', '--oci', src, dst], { namespace });
        await containerd.ctr(['images', 'push', '--plain-http', dst], { namespace });
      } finally {
        await containerd.ctr(['images', 'rm', '--sync', src, dst], { namespace, allowFailure: true });
      }
    });
  });

  test('stargaze convert --zstd-chunked: rpull mounts every layer lazily, ctr run reads it', async () => {
    await lazyPullAndRun('ours', 'converted by stargaze convert --zstd-chunked\n', async (src, dst) => {
      const r = await run(process.execPath, [DEFAULT_CLI_PATH, 'convert', '--plain-http', '--zstd-chunked', src, dst], { timeoutMs: 120_000 });
      assert.match(r.stdout, /^sha256:[0-9a-f]{64}\n$/, r.stdout + r.stderr);
    });
  });
});
