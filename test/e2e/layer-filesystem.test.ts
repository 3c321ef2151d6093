/**
 * The layer filesystem beyond first reads: background fetch makes a layer fully local (containers keep
 * reading every file with the registry gone), a fully fetched layer is copied to local disk and new
 * containers read the copy instead of the FUSE mount, and a layer whose content does not match the
 * chainID it was committed under stops being served once that is known.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { compareTrees, formatDifferences } from './harness/fs-compare';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import {
  bigFileFixture,
  buildBusyboxImage,
  busyboxEntries,
  convertToEstargz,
  makeTmpRoot,
  materializeEntries,
  packLayer,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  mountSideBySide,
  publishTrickyImages,
  waitFor,
  type Containerd,
  type Registry,
  type StargazeDaemon,
} from './harness';
import { estargzAnnotations, estargzFromFile, estargzLayer, pushRawImage, sha256 } from './harness/raw-image';

const notRoot = process.getuid?.() !== 0;

describe('layer filesystem: background fetch and integrity', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  let daemon: StargazeDaemon;
  let containerd: Containerd;

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    daemon = await startDaemon({ scope: cleanup });
    containerd = await startContainerd({ scope: cleanup, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
  });

  test('background fetch makes a layer fully local: every file reads with the registry stopped', async () => {
    const big = bigFileFixture({ sizeBytes: 16 * 1024 * 1024 });
    const original = await buildBusyboxImage({ host: registry.host, repo: 'lfs/big', tag: 'v1', extraFiles: big.extraFiles });
    const esgz = await convertToEstargz(containerd, original.ref, `${registry.host}/lfs/big:v1-esgz`);
    const ns = containerd.newNamespace('background');
    const readAll = ['/bin/sh', '-c', `sha256sum ${big.bigFilePath} ${big.probePath} | cut -c1-64`];

    // What the files hold, read through a normal (overlayfs) pull.
    const plainNs = containerd.newNamespace('plain');
    await containerd.pull(original.ref, { namespace: plainNs });
    const expected = (await containerd.runContainer(original.ref, readAll, { namespace: plainNs })).stdout;

    await containerd.rpull(esgz.ref, { namespace: ns });
    const layer = esgz.layers[0]!;
    const done = await daemon.waitForLog((e) => e.msg === 'layer fully fetched' && e.layer === layer.digest, {
      timeoutMs: 120_000,
      what: 'background fetch of the layer',
    });
    assert.equal(typeof done.diffId, 'string');
    assert.ok(
      !daemon.logs().some((e) => e.msg === 'layer does not match its chainID: no longer served'),
      'a good layer passes its chainID check',
    );

    await registry.stop();
    const r = await containerd.runContainer(esgz.ref, readAll, { namespace: ns, snapshotter: 'stargz' });
    assert.equal(r.stdout, expected, 'every file reads, from the disk cache, with the registry gone');

    // The whole snapshotter dies (daemon and FUSE server, as on a reboot) while the registry is still
    // gone: startup must not wait for the registry, and the fully fetched layer serves again.
    const fuseServerPid = Number(await readFile(path.join(daemon.root, 'fuse', 'fuse-server.pid'), 'utf8'));
    await daemon.killHard();
    process.kill(fuseServerPid, 'SIGKILL');
    const restartStarted = Date.now();
    await daemon.restart({ hard: true });
    const restored = await daemon.waitForLog((e) => e.msg === 'restored remote snapshots', { what: 'restore' });
    assert.equal(restored.failed, 0, 'the layer mounted again from its cached TOC');
    assert.ok(Date.now() - restartStarted < 20_000, 'startup did not wait on the unreachable registry');
    await waitFor(
      'containerd to reconnect to the stargz snapshotter',
      async () => (await containerd.ctr(['snapshots', '--snapshotter', 'stargz', 'ls'], { namespace: ns, allowFailure: true })).code === 0,
      { timeoutMs: 60_000 },
    );
    const again = await containerd.runContainer(esgz.ref, readAll, { namespace: ns, snapshotter: 'stargz' });
    assert.equal(again.stdout, expected, 'served from disk after a full restart with no registry');
  });

  test('a fully fetched layer is copied to local disk, and new containers read the copy', async (t) => {
    // Its own registry: the test before stops the suite's.
    const copyRegistry = await startRegistry({ scope: t });
    const { fixture, original, esgz } = await publishTrickyImages(containerd, copyRegistry.host, 'lfs/tricky');
    const ns = containerd.newNamespace('local-copy');
    await containerd.pull(original.ref, { namespace: ns });
    await containerd.rpull(esgz.ref, { namespace: ns });
    const copied = await Promise.all(
      esgz.layers.map((layer) =>
        daemon.waitForLog((e) => e.msg === 'layer copied to local disk; new containers read it from there' && e.layer === layer.digest, {
          timeoutMs: 120_000,
          what: `the local copy of ${layer.digest}`,
        }),
      ),
    );
    // Each copy is what its FUSE mount serves, entry by entry, trusted.* xattrs (opaque dirs) included.
    for (const entry of copied) {
      const mountpoint = String(entry.mountpoint);
      const diffs = await compareTrees(mountpoint, path.join(path.dirname(mountpoint), 'local'), { compareRoot: true });
      assert.equal(diffs.length, 0, `FUSE mount vs its local copy:\n${formatDifferences(diffs)}`);
    }

    // A rootfs made now has the copies for lower dirs, and is what the overlayfs snapshotter unpacks.
    const { unpacked, lazy } = await mountSideBySide(containerd, t, { original: original.ref, esgz: esgz.ref, namespace: ns, label: 'lfs-local-copy' });
    const mountinfo = await readFile('/proc/self/mountinfo', 'utf8');
    const lazyMount = mountinfo.split('\n').find((l) => l.split(' ')[4] === lazy);
    const lowerdir = lazyMount?.match(/lowerdir=([^,\s]+)/)?.[1];
    assert.ok(lowerdir !== undefined, `the stargz rootfs is an overlay mount: ${lazyMount}`);
    const lowers = lowerdir.split(':');
    assert.equal(lowers.length, esgz.layers.length);
    for (const lower of lowers) assert.equal(path.basename(lower), 'local', `lower dir ${lower} is a local copy`);
    const diffs = await compareTrees(unpacked, lazy, { xattrFilter: (name) => !name.startsWith('trusted.') });
    assert.equal(diffs.length, 0, `overlayfs vs stargz from local copies:\n${formatDifferences(diffs)}`);

    // The copies need neither the registry nor the FUSE server.
    const fuseServerPid = Number(await readFile(path.join(daemon.root, 'fuse', 'fuse-server.pid'), 'utf8'));
    const probe = fixture.present.find((p) => p.startsWith('/tricky/chunks/')) ?? fixture.present[0]!;
    const expected = (await containerd.runContainer(original.ref, ['/bin/sh', '-c', `ls -la /tricky | wc -l; sha256sum ${probe}`], { namespace: ns })).stdout;
    process.kill(fuseServerPid, 'SIGSTOP');
    try {
      const r = await containerd.runContainer(esgz.ref, ['/bin/sh', '-c', `ls -la /tricky | wc -l; sha256sum ${probe}`], {
        namespace: ns,
        snapshotter: 'stargz',
      });
      assert.equal(r.stdout, expected, 'a new container reads the copies while the FUSE server is stopped');
    } finally {
      process.kill(fuseServerPid, 'SIGCONT');
    }
  });

  test('a layer whose content does not match its chainID stops being served', async (t) => {
    const forgedRegistry = await startRegistry({ scope: t });
    const work = await makeTmpRoot('lfs-forged', t);
    const rootfs = path.join(work, 'rootfs');
    await materializeEntries(rootfs, await busyboxEntries());
    const base = await estargzFromFile((await packLayer(rootfs, path.join(work, 'base'))).file);
    const top = await estargzLayer([{ name: 'forged/', type: 'directory' }, { name: 'forged/file.txt', content: 'not what the config says\n' }]);
    // The config claims another diff_id for the top layer: containerd computes its chainID from that
    // claim, and only the content, once fully fetched, can show the claim is false.
    const image = await pushRawImage({
      host: forgedRegistry.host,
      repo: 'lfs/forged',
      tag: 'v1',
      layers: [
        { blob: base.blob, diffId: base.diffId, annotations: estargzAnnotations(base) },
        { blob: top.blob, diffId: sha256('a claim that is not true'), annotations: estargzAnnotations(top) },
      ],
    });
    const ns = containerd.newNamespace('forged');
    await containerd.rpull(image.ref, { namespace: ns });
    const topDigest = image.layers[1]!.digest;
    const failure = await daemon.waitForLog(
      (e) => e.msg === 'layer does not match its chainID: no longer served' && e.layer === topDigest,
      { timeoutMs: 120_000, what: 'the chainID check of the forged layer' },
    );
    assert.equal(failure.chainId, image.layers[1]!.chainId);
    const r = await containerd.runContainer(image.ref, ['/bin/sh', '-c', 'cat /forged/file.txt; echo "exit=$?"'], {
      namespace: ns,
      snapshotter: 'stargz',
    });
    assert.match(r.stdout, /exit=1/, 'reading the forged layer fails');
    assert.doesNotMatch(r.stdout, /not what the config says/);
  });
});
