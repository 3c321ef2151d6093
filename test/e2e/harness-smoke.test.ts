/**
 * Smoke test of the e2e harness alone (no stargaze): registry + counting proxy, offline busybox
 * images, a private containerd with its native overlayfs snapshotter, eStargz conversion with the
 * reference ctr-remote, tree comparison, and the daemon wrapper driven by a stand-in daemon.
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import {
  ANNOTATION_TOC_DIGEST,
  ESTARGZ_METADATA_FILES,
  SERVING_LOG_MSG,
  bigFileFixture,
  buildBusyboxImage,
  compareTrees,
  convertToEstargz,
  formatDifferences,
  makeTmpRoot,
  materializeEntries,
  snapshotTree,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  trickyFixture,
  withHost,
  type BuiltImage,
  type Containerd,
  type Registry,
} from './harness';

const notRoot = process.getuid?.() !== 0;

describe('e2e harness smoke', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  let containerd: Containerd;
  let busybox: BuiltImage;

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    containerd = await startContainerd({ scope: cleanup });
  });

  test('containerd registers several proxy snapshotters under their own names', async () => {
    // what the benchmarks do to put the peer beside stargaze: containerd dials a proxy plugin only when used
    const two = await startContainerd({
      scope: cleanup,
      stargazeAddress: path.join(containerd.dir, 'absent-stargaze.sock'),
      proxyPlugins: [{ name: 'stargz-peer', address: path.join(containerd.dir, 'absent-peer.sock') }],
    });
    const plugins = (await two.ctr(['plugins', 'ls'])).stdout;
    for (const name of ['stargz', 'stargz-peer']) assert.match(plugins, new RegExp(`io\\.containerd\\.snapshotter\\.v1\\s+${name}\\s+`), plugins);
    await two.stop();
  });

  test('registry answers /v2/ directly and through the counting proxy', async () => {
    for (const host of [registry.host, registry.countingHost]) {
      const res = await fetch(`http://${host}/v2/`);
      assert.equal(res.status, 200, host);
      await res.arrayBuffer();
    }
  });

  test('busybox image builds offline and pushes with skopeo', async () => {
    busybox = await buildBusyboxImage({
      host: registry.host,
      repo: 'smoke/busybox',
      tag: 'v1',
      extraFiles: [{ path: '/greeting.txt', content: 'hi from the harness\n' }],
    });
    assert.equal(busybox.layers.length, 1);
    assert.match(busybox.manifestDigest, /^sha256:[0-9a-f]{64}$/);
    const tags = (await (await fetch(`http://${registry.host}/v2/smoke/busybox/tags/list`)).json()) as { tags: string[] };
    assert.deepEqual(tags.tags, ['v1']);
  });

  test('overlayfs pull through the counting proxy, then ctr run prints hello', async () => {
    const ref = withHost(busybox.ref, registry.countingHost);
    registry.resetCounters();
    await containerd.pull(ref);
    const layer = busybox.layers[0]!;
    assert.equal(registry.bytesServed(layer.digest), layer.size, 'a normal pull fetches the whole layer');
    const r = await containerd.runContainer(ref, ['/bin/sh', '-c', 'echo hello; cat /greeting.txt']);
    assert.equal(r.stdout, 'hello\nhi from the harness\n');
  });

  test('ctr-remote converts to eStargz and ctr pushes it', async () => {
    const esgz = await convertToEstargz(containerd, busybox.ref, `${registry.host}/smoke/busybox:v1-esgz`);
    assert.equal(esgz.layers.length, 1);
    assert.match(esgz.layers[0]!.annotations[ANNOTATION_TOC_DIGEST] ?? '', /^sha256:[0-9a-f]{64}$/);
    assert.notEqual(esgz.layers[0]!.digest, busybox.layers[0]!.digest);
    // an eStargz layer is still a valid tar.gz: the plain overlayfs path must run it
    const ns = containerd.newNamespace('esgz');
    await containerd.pull(esgz.ref, { namespace: ns });
    const r = await containerd.runContainer(esgz.ref, ['/bin/cat', '/greeting.txt'], { namespace: ns });
    assert.equal(r.stdout, 'hi from the harness\n');
  });

  test('big-file image: built, converted, and a full pull fetches all of it', async () => {
    const fixture = bigFileFixture();
    const original = await buildBusyboxImage({ host: registry.host, repo: 'smoke/big', tag: 'v1', extraFiles: fixture.extraFiles });
    const esgz = await convertToEstargz(containerd, original.ref, `${registry.host}/smoke/big:v1-esgz`);
    assert.ok(esgz.totalLayerBytes > fixture.bigFileBytes, 'random data does not compress');
    const ns = containerd.newNamespace('big');
    const ref = withHost(esgz.ref, registry.countingHost);
    registry.resetCounters();
    await containerd.pull(ref, { namespace: ns });
    assert.equal(registry.bytesServed(esgz.layers[0]!.digest), esgz.layers[0]!.size);
    const r = await containerd.runContainer(ref, fixture.workload, { namespace: ns });
    assert.equal(r.stdout, fixture.probeContent);
  });

  test('tricky image: merged tree has every feature and survives eStargz conversion', async (t) => {
    const fixture = trickyFixture();
    const original = await buildBusyboxImage({
      host: registry.host,
      repo: 'smoke/tricky',
      tag: 'v1',
      extraFiles: fixture.extraFiles,
      layers: fixture.layers,
    });
    assert.equal(original.layers.length, 3);
    const esgz = await convertToEstargz(containerd, original.ref, `${registry.host}/smoke/tricky:v1-esgz`);
    assert.equal(esgz.tocDigests.length, 3);

    const ns = containerd.newNamespace('tricky');
    await containerd.pull(original.ref, { namespace: ns });
    await containerd.pull(esgz.ref, { namespace: ns });
    const mnt = await makeTmpRoot('tricky-mnt', t);
    const a = path.join(mnt, 'original');
    const b = path.join(mnt, 'esgz');
    await containerd.mountImage(original.ref, a, { namespace: ns });
    t.after(() => containerd.unmountImage(a, { namespace: ns }));
    await containerd.mountImage(esgz.ref, b, { namespace: ns });
    t.after(() => containerd.unmountImage(b, { namespace: ns }));

    const tree = await snapshotTree(a);
    for (const p of fixture.present) assert.ok(tree.has(p.slice(1)), `present: ${p}`);
    for (const p of fixture.absent) assert.ok(!tree.has(p.slice(1)), `absent: ${p}`);
    const at = (p: string) => tree.get(p.slice(1))!;
    assert.deepEqual(at('/tricky/hard/original').hardlinks, ['tricky/hard-elsewhere', 'tricky/hard/link1']);
    assert.deepEqual(at('/tricky/upper-hard/a').hardlinks, ['tricky/upper-hard/b']);
    assert.equal(at('/tricky/special/null').type, 'char');
    assert.equal(at('/tricky/special/null').rdev, '1:3');
    assert.equal(at('/tricky/special/fifo').type, 'fifo');
    assert.equal(at('/tricky/modes/setuid').mode, 0o4755);
    assert.equal(at('/tricky/modes/sticky-dir').mode, 0o1777);
    assert.equal(at('/tricky/owners/file').uid, 1234);
    assert.equal(at('/tricky/owners/file').gid, 5678);
    assert.equal(at('/tricky/times/old').mtimeSec, 642_902_400);
    assert.equal(at('/tricky/xattrs/file').xattrs['user.stargaze'], Buffer.from('hello').toString('hex'));
    // containerd's tar applier refuses trusted.* xattrs ("admin attributes from archive not
    // supported"), so the overlayfs reference tree never has them even though the layer does
    assert.equal(at('/tricky/xattrs/file').xattrs['trusted.stargaze'], undefined);
    assert.equal(at('/tricky/xattrs/file').xattrs['user.binary'], '00ff100a');
    assert.equal(at('/tricky/xattrs/empty-value').xattrs['user.empty'], '');
    assert.equal(at('/tricky/xattrs/dir').xattrs['user.on-dir'], Buffer.from('dir value').toString('hex'));
    assert.equal(at('/tricky/becomes-symlink').type, 'symlink');
    assert.equal(at('/tricky/dir-becomes-file').type, 'file');
    assert.equal(at('/tricky/delete-me.txt').type, 'dir');
    assert.equal(at('/tricky/meta-change.txt').mode, 0o600);
    assert.equal(at('/tricky/chunks/multi-chunk.bin').size, 10 * 1024 * 1024 + 12_345);

    // unpacked as a plain tar.gz, the eStargz layers also leave their TOC and landmark files
    const diffs = await compareTrees(a, b, { exclude: (p) => ESTARGZ_METADATA_FILES.includes(p) });
    assert.equal(diffs.length, 0, `original vs eStargz:\n${formatDifferences(diffs)}`);
  });

  test('fs-compare reports differences', async (t) => {
    const dir = await makeTmpRoot('compare', t);
    await materializeEntries(path.join(dir, 'a'), [
      { path: '/same', content: 'x' },
      { path: '/content', content: 'a' },
      { path: '/mode', content: 'm', mode: 0o600 },
      { type: 'symlink', path: '/link', target: 'same' },
      { path: '/only-a', content: '' },
      { path: '/h1', content: 'h' },
      { type: 'hardlink', path: '/h2', target: '/h1' },
      { path: '/x', content: '', xattrs: { 'user.k': 'v' } },
    ]);
    await materializeEntries(path.join(dir, 'b'), [
      { path: '/same', content: 'x' },
      { path: '/content', content: 'b' },
      { path: '/mode', content: 'm', mode: 0o644 },
      { type: 'symlink', path: '/link', target: 'content' },
      { path: '/h1', content: 'h' },
      { path: '/h2', content: 'h' },
      { path: '/x', content: '', xattrs: { 'user.k': 'w' } },
    ]);
    const diffs = await compareTrees(path.join(dir, 'a'), path.join(dir, 'b'));
    const got = diffs.map((d) => `${d.path}:${d.field}`).sort();
    assert.deepEqual(got, ['content:content', 'h1:hardlinks', 'h2:hardlinks', 'link:size', 'link:target', 'mode:mode', 'only-a:missing', 'x:xattrs']);
  });

  test('daemon wrapper: logs, socket, restart, hard kill, leftover mounts', async (t) => {
    // a stand-in for `stargaze daemon`: JSON logs, a unix socket, a mount under --root
    const dir = await makeTmpRoot('fake-daemon', t);
    const fake = path.join(dir, 'fake-daemon.js');
    await writeFile(
      fake,
      `const net = require('node:net'); const fs = require('node:fs'); const cp = require('node:child_process');
const arg = (n) => process.argv[process.argv.indexOf(n) + 1];
const log = (o) => process.stdout.write(JSON.stringify({ level: 'info', ...o }) + '\\n');
const addr = arg('--address'); const mnt = arg('--root') + '/mnt';
try { fs.unlinkSync(addr); } catch {}
fs.mkdirSync(mnt, { recursive: true });
if (!fs.readFileSync('/proc/self/mounts', 'utf8').includes(' ' + mnt + ' ')) cp.execFileSync('mount', ['-t', 'tmpfs', 'fake', mnt]);
log({ msg: 'starting', args: process.argv.slice(2), pid: process.pid });
process.stdout.write('not json\\n');
// As the real one: it listens, then says it serves (what a (re)start waits for).
const server = net.createServer((c) => c.end()).listen(addr, () => { log({ msg: 'listening', address: addr }); log({ msg: ${JSON.stringify(SERVING_LOG_MSG)} }); });
process.on('SIGTERM', () => { log({ msg: 'stopping' }); server.close(() => process.exit(0)); });
`,
    );
    const daemon = await startDaemon({ scope: t, cliPath: fake, plainHttpHosts: ['127.0.0.1:5000'] });
    await daemon.waitForLog((e) => e.msg === 'listening');
    const first = daemon.logs()[0]!;
    assert.equal(first.msg, 'starting');
    assert.deepEqual((first.args as string[]).slice(0, 3), ['daemon', '--address', daemon.address]);
    assert.ok((first.args as string[]).includes('--log-level'));
    assert.ok(daemon.logs().some((e) => e.level === 'unparsed' && e.msg === 'not json'));
    assert.equal((await daemon.mounts()).length, 1);

    const pid1 = daemon.pid();
    await daemon.restart({ hard: true });
    assert.notEqual(daemon.pid(), pid1);
    assert.equal(daemon.logs({ currentRunOnly: true })[0]!.msg, 'starting');
    assert.ok(daemon.logs().length > daemon.logs({ currentRunOnly: true }).length);

    const status = await daemon.stop();
    assert.equal(status.code, 0);
    assert.ok(daemon.logs().some((e) => e.msg === 'stopping'));
    assert.equal((await daemon.mounts()).length, 1, 'the stand-in leaves its mount behind');
    assert.deepEqual(await daemon.unmountAll(), []);
  });
});
