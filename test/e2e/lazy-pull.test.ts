/**
 * The product, end to end: containerd (its proxy plugin pointing at `stargaze daemon`) lazily pulls
 * eStargz images made by the reference tools, with the reference client `ctr-remote images rpull`, and
 * runs containers from them. Everything is real: registry, containerd, runc, FUSE, overlayfs.
 */
import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import {
  bigFileFixture,
  buildBusyboxImage,
  compareTrees,
  convertToEstargz,
  formatDifferences,
  snapshotTree,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  mountSideBySide,
  publishTrickyImages,
  waitFor,
  withHost,
  type BigFileFixture,
  type Containerd,
  type EstargzImage,
  type LogEntry,
  type Registry,
  type StargazeDaemon,
} from './harness';

const notRoot = process.getuid?.() !== 0;
const PREPARED = 'remote-snapshot-prepared';

function preparedLogs(daemon: StargazeDaemon, value: 'true' | 'false'): LogEntry[] {
  return daemon.logs().filter((e) => e[PREPARED] === value);
}

/**
 * After the daemon restarts, containerd's gRPC client to the proxy plugin sits in its reconnect backoff
 * (up to a few seconds) and fails calls fast until it reconnects: wait for that, as kubelet's retries do.
 */
async function waitForContainerdToReconnect(containerd: Containerd, ns: string): Promise<void> {
  await waitFor(
    'containerd to reconnect to the stargz snapshotter',
    async () => (await containerd.ctr(['snapshots', '--snapshotter', 'stargz', 'ls'], { namespace: ns, allowFailure: true })).code === 0,
    { timeoutMs: 60_000 },
  );
}

function mountedLayerLogs(daemon: StargazeDaemon, digest: string): LogEntry[] {
  return daemon.logs().filter((e) => e.msg === 'layer mounted' && e.layer === digest);
}

describe('lazy pull end to end', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  let daemon: StargazeDaemon;
  let containerd: Containerd;
  let big: BigFileFixture;
  let bigEsgz: EstargzImage;

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    // The byte counts below are what a container start costs; background fetch (tested on its own)
    // would download the rest of each layer.
    daemon = await startDaemon({ scope: cleanup, config: 'no_background_fetch = true\n' });
    containerd = await startContainerd({ scope: cleanup, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    big = bigFileFixture();
    const original = await buildBusyboxImage({ host: registry.host, repo: 'e2e/big', tag: 'v1', extraFiles: big.extraFiles });
    bigEsgz = await convertToEstargz(containerd, original.ref, `${registry.host}/e2e/big:v1-esgz`);
  });

  test('ctr-remote rpull mounts every layer lazily and ctr run reads the image, fetching under half of it', async () => {
    const ref = withHost(bigEsgz.ref, registry.countingHost);
    const ns = containerd.newNamespace('lazy');
    registry.resetCounters();
    await containerd.rpull(ref, { namespace: ns });

    for (const layer of bigEsgz.layers) {
      assert.equal(mountedLayerLogs(daemon, layer.digest).length, 1, `layer ${layer.digest} mounted once`);
    }
    assert.equal(preparedLogs(daemon, 'true').length, bigEsgz.layers.length);
    const fuseMounts = (await daemon.mounts()).filter((m) => m.fstype === 'fuse.stargaze');
    assert.equal(fuseMounts.length, bigEsgz.layers.length, 'each layer is its own FUSE mount');

    const r = await containerd.runContainer(ref, big.workload, { namespace: ns, snapshotter: 'stargz' });
    assert.equal(r.stdout, big.probeContent);

    const layer = bigEsgz.layers[0]!;
    const fetched = registry.bytesServed(layer.digest);
    assert.ok(fetched > 0, 'the layer was read through the registry');
    assert.ok(fetched < layer.size / 2, `fetched ${fetched} of ${layer.size} bytes: the unread big file stays in the registry`);
  });

  test('the lazily mounted rootfs equals what the overlayfs snapshotter unpacks, entry by entry', async (t) => {
    const { fixture, original, esgz } = await publishTrickyImages(containerd, registry.host, 'e2e/tricky');
    const ns = containerd.newNamespace('tricky');
    await containerd.pull(original.ref, { namespace: ns });
    const preparedBefore = preparedLogs(daemon, 'true').length;
    await containerd.rpull(esgz.ref, { namespace: ns });
    assert.equal(preparedLogs(daemon, 'true').length - preparedBefore, esgz.layers.length, 'every layer lazy');

    const { unpacked, lazy } = await mountSideBySide(containerd, t, { original: original.ref, esgz: esgz.ref, namespace: ns, label: 'tricky-compare' });

    // containerd's tar applier refuses trusted.* xattrs from archives, so the unpacked tree never has
    // them; the lazily mounted layer serves what the layer holds.
    const diffs = await compareTrees(unpacked, lazy, { xattrFilter: (name) => !name.startsWith('trusted.') });
    assert.equal(diffs.length, 0, `overlayfs vs stargz:\n${formatDifferences(diffs)}`);
    const lazyTree = await snapshotTree(lazy);
    for (const p of fixture.present) assert.ok(lazyTree.has(p.slice(1)), `present through stargz: ${p}`);
    assert.ok(lazyTree.size > 50, `compared ${lazyTree.size} entries`);
    for (const p of fixture.absent) {
      const r = await containerd.runContainer(esgz.ref, ['/bin/sh', '-c', `test ! -e '${p}' && echo absent`], {
        namespace: ns,
        snapshotter: 'stargz',
      });
      assert.equal(r.stdout, 'absent\n', p);
    }
  });

  test('a plain gzip image pulled with the stargz snapshotter falls back and runs', async () => {
    const plain = await buildBusyboxImage({
      host: registry.host,
      repo: 'e2e/plain',
      tag: 'v1',
      extraFiles: [{ path: '/plain.txt', content: 'plain gzip layer\n' }],
    });
    const ns = containerd.newNamespace('plain');
    const fallbacksBefore = preparedLogs(daemon, 'false').length;
    await containerd.rpull(plain.ref, { namespace: ns });
    const fallbacks = preparedLogs(daemon, 'false').slice(fallbacksBefore);
    assert.equal(fallbacks.length, plain.layers.length, 'each layer fell back');
    for (const entry of fallbacks) assert.ok(typeof entry.reason === 'string' && entry.reason.length > 0, 'says why');
    const r = await containerd.runContainer(plain.ref, ['/bin/cat', '/plain.txt'], { namespace: ns, snapshotter: 'stargz' });
    assert.equal(r.stdout, 'plain gzip layer\n');
  });

  test('concurrent pulls of one image mount each layer once', async () => {
    const image = await buildBusyboxImage({
      host: registry.host,
      repo: 'e2e/concurrent',
      tag: 'v1',
      extraFiles: [{ path: '/concurrent.txt', content: 'many pulls, one mount\n' }],
    });
    const esgz = await convertToEstargz(containerd, image.ref, `${registry.host}/e2e/concurrent:v1-esgz`);
    const namespaces = [1, 2, 3, 4].map((i) => containerd.newNamespace(`concurrent${i}`));
    await Promise.all(namespaces.map((ns) => containerd.rpull(esgz.ref, { namespace: ns })));
    for (const layer of esgz.layers) assert.equal(mountedLayerLogs(daemon, layer.digest).length, 1, `${layer.digest} mounted once`);
    for (const ns of namespaces) {
      const r = await containerd.runContainer(esgz.ref, ['/bin/cat', '/concurrent.txt'], { namespace: ns, snapshotter: 'stargz' });
      assert.equal(r.stdout, 'many pulls, one mount\n');
    }
  });

  test('a running container keeps reading its files, also ones never read before, across a daemon SIGKILL and restart', async () => {
    const ns = containerd.newNamespace('running');
    await containerd.rpull(bigEsgz.ref, { namespace: ns });
    const id = containerd.uniqueId('running');
    await containerd.ctr(['run', '-d', '--snapshotter', 'stargz', bigEsgz.ref, id, '/bin/sleep', '600'], { namespace: ns });
    try {
      await daemon.restart({ hard: true });
      const exec = await containerd.ctr(
        ['tasks', 'exec', '--exec-id', `${id}-read`, id, '/bin/sh', '-c', `cat ${big.probePath}; head -c 3000000 ${big.bigFilePath} | wc -c`],
        { namespace: ns },
      );
      const [probe, count] = exec.stdout.split('\n');
      assert.equal(`${probe}\n`, big.probeContent);
      assert.equal(count?.trim(), '3000000');
      // A graceful stop (SIGTERM, as systemctl restart sends) leaves the mounts served too.
      await daemon.stop({ signal: 'SIGTERM' });
      const whileDown = await containerd.ctr(
        ['tasks', 'exec', '--exec-id', `${id}-down`, id, '/bin/sh', '-c', `tail -c 1000 ${big.bigFilePath} | wc -c`],
        { namespace: ns },
      );
      assert.equal(whileDown.stdout.trim(), '1000');
      await daemon.restart();
      await waitForContainerdToReconnect(containerd, ns);
    } finally {
      await containerd.ctr(['tasks', 'kill', '-s', 'SIGKILL', id], { namespace: ns, allowFailure: true });
      await waitFor('the task to exit', async () => {
        const r = await containerd.ctr(['tasks', 'delete', id], { namespace: ns, allowFailure: true });
        return r.code === 0 || /not found/.test(r.stderr);
      });
      await containerd.ctr(['containers', 'delete', id], { namespace: ns, allowFailure: true });
    }
  });

  test('after a SIGKILL and restart, a new container still runs and reads files never read before', async () => {
    const ns = containerd.newNamespace('restart');
    await containerd.rpull(bigEsgz.ref, { namespace: ns });
    await daemon.restart({ hard: true });
    const restored = await daemon.waitForLog((e) => e.msg === 'restored remote snapshots', { what: 'restore' });
    assert.equal(restored.failed, 0);
    await waitForContainerdToReconnect(containerd, ns);
    const r = await containerd.runContainer(
      bigEsgz.ref,
      ['/bin/sh', '-c', `cat ${big.probePath}; head -c 1048576 ${big.bigFilePath} | wc -c`],
      { namespace: ns, snapshotter: 'stargz' },
    );
    const [probe, count] = r.stdout.split('\n');
    assert.equal(`${probe}\n`, big.probeContent);
    assert.equal(count?.trim(), '1048576');
    // Graceful stop and start keeps every snapshot too.
    await daemon.restart();
    await waitForContainerdToReconnect(containerd, ns);
    const again = await containerd.runContainer(bigEsgz.ref, big.workload, { namespace: ns, snapshotter: 'stargz' });
    assert.equal(again.stdout, big.probeContent);
  });
});
