/**
 * `stargaze rpull` end to end: a private registry, containerd with our daemon as the `stargz` proxy
 * snapshotter, and the CLI run as a child process like a user would.
 *
 * - an eStargz image (converted by the reference `ctr-remote images convert --estargz --oci`) is pulled with
 *   every layer mounted lazily by the daemon, and runs with `ctr run --snapshotter stargz`;
 * - a second rpull of it downloads nothing and changes nothing;
 * - a plain (gzip) image falls back to layers fetched by rpull and applied by containerd's diff service, and
 *   runs too; the same on containerd's own overlayfs snapshotter, whose result must survive a garbage
 *   collection (GC labels as containerd sets them);
 * - concurrent rpulls of one image collapse onto one mount (or one download) per layer;
 * - unknown image, auth failure, containerd not running, snapshotter not configured: one clear error each.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import {
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  buildBusyboxImage,
  convertToEstargz,
  makeTmpRoot,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  withHost,
  type BuiltImage,
  type Containerd,
  type EstargzImage,
  type LogEntry,
  type Registry,
  type RunResult,
  type StargazeDaemon,
} from './harness';

const notRoot = process.getuid?.() !== 0;
const RPULL_TIMEOUT_MS = 120_000;
/** Concurrent pulls in the collapse test (the number). */
const CONCURRENT_PULLS = 20;
const SHORT_DIGEST_CHARS = 19;

interface LayerLine {
  digest: string;
  outcome: 'lazy' | 'fetched' | 'present';
  bytes: number;
}

/** The per-layer progress lines of rpull's stdout. */
function layerLines(stdout: string): LayerLine[] {
  const out: LayerLine[] = [];
  for (const line of stdout.split('\n')) {
    const m = /^(sha256:[0-9a-f]{12}) (lazy \(remote snapshot\)|fetched (\d+) bytes|already present) \d+ms/.exec(line);
    if (!m) continue;
    const outcome = m[2]!.startsWith('lazy') ? 'lazy' : m[2]!.startsWith('fetched') ? 'fetched' : 'present';
    out.push({ digest: m[1]!, outcome, bytes: m[3] !== undefined ? Number(m[3]) : 0 });
  }
  return out;
}

function short(digest: string): string {
  return digest.slice(0, SHORT_DIGEST_CHARS);
}

function remotePrepared(daemon: StargazeDaemon): LogEntry[] {
  return daemon.logs().filter((e) => e['remote-snapshot-prepared'] === 'true' || e['remote-snapshot-prepared'] === true);
}

describe('stargaze rpull', { skip: notRoot && 'e2e tests need root' }, () => {
  const scope = suiteScope();
  let registry: Registry;
  let containerd: Containerd;
  let daemon: StargazeDaemon | undefined;
  let daemonError: unknown;
  let plain: BuiltImage;
  let esgz: EstargzImage;

  /** `stargaze rpull --address <containerd> [--plain-http] ...args`, through the command users run (script/stargaze). */
  const rpull = (args: string[], opts: { plainHttp?: boolean; address?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> =>
    run(
      STARGAZE_COMMAND,
      ['rpull', '--address', opts.address ?? containerd.address, ...(opts.plainHttp === false ? [] : ['--plain-http']), ...args],
      { allowFailure: true, timeoutMs: RPULL_TIMEOUT_MS, env: { ...STARGAZE_COMMAND_ENV, ...opts.env } },
    );

  const needDaemon = (): StargazeDaemon => {
    if (daemon === undefined) throw new Error(`the stargaze daemon did not start: ${String(daemonError)}`);
    return daemon;
  };

  const snapshots = async (ns: string, snapshotter: string): Promise<string[]> =>
    (await containerd.ctr(['snapshots', '--snapshotter', snapshotter, 'ls'], { namespace: ns })).stdout
      .split('\n')
      .slice(1)
      .map((l) => l.trim())
      .filter(Boolean)
      .sort();

  before(async () => {
    registry = await startRegistry({ scope });
    try {
      // Byte counts here are what the pull and the run cost: background fetch would add the rest.
      daemon = await startDaemon({ scope, plainHttpHosts: [registry.host, registry.countingHost], config: 'no_background_fetch = true\n' });
    } catch (err) {
      // The overlayfs tests do not need the daemon; the others report this.
      daemonError = err;
    }
    containerd = await startContainerd({ scope, stargazeAddress: daemon?.address ?? path.join('/run', 'stargaze-absent.sock'), stargazeRoot: daemon?.root });
    plain = await buildBusyboxImage({
      host: registry.host,
      repo: 'rpull/busybox',
      tag: 'v1',
      extraFiles: [{ path: '/hello.txt', content: 'hello from the base layer\n' }],
      layers: [[{ path: '/upper.txt', content: 'hello from the upper layer\n' }]],
    });
    esgz = await convertToEstargz(containerd, plain.ref, `${registry.host}/rpull/busybox:v1-esgz`);
  });

  test('eStargz image: every layer lazy, then ctr run --snapshotter stargz works', async () => {
    const d = needDaemon();
    const ns = containerd.newNamespace('lazy');
    const ref = withHost(esgz.ref, registry.countingHost);
    registry.resetCounters();
    const preparedBefore = remotePrepared(d).length;

    const r = await rpull(['--namespace', ns, ref]);
    assert.equal(r.code, 0, `rpull failed:\n${r.stderr}\n${r.stdout}`);
    assert.deepEqual(
      layerLines(r.stdout),
      esgz.layers.map((l) => ({ digest: short(l.digest), outcome: 'lazy', bytes: 0 })),
      r.stdout,
    );
    assert.match(r.stdout, /^done: .* 2 layers \(2 lazy, 0 fetched, 0 already present\)/m);
    // rpull itself read no layer blob (the daemon reads ranges of them, never the whole blob in one GET)
    const whole = registry.blobRequests().filter((q) => esgz.layers.some((l) => l.digest === q.digest) && q.range === undefined);
    assert.deepEqual(whole, [], 'no whole-layer download');
    assert.equal(remotePrepared(d).length - preparedBefore, esgz.layers.length, 'the daemon mounted each layer remotely');

    // the image record, GC labels and remote snapshot labels are what containerd and the daemon expect
    const images = (await containerd.ctr(['images', 'ls', '-q'], { namespace: ns })).stdout.trim().split('\n');
    assert.deepEqual(images, [ref]);
    const content = (await containerd.ctr(['content', 'ls'], { namespace: ns })).stdout;
    assert.match(content, new RegExp(`${esgz.manifestDigest}.*containerd.io/gc.ref.content.config=${esgz.configDigest}`));
    assert.match(content, new RegExp(`${esgz.configDigest}.*containerd.io/gc.ref.snapshot.stargz=sha256:`));
    for (const l of esgz.layers) assert.ok(!content.includes(l.digest + '\t'), `layer ${l.digest} is not in the content store`);
    assert.equal((await containerd.ctr(['leases', 'ls', '-q'], { namespace: ns })).stdout.trim(), '', 'the pull lease is gone');

    const out = await containerd.runContainer(ref, ['/bin/cat', '/hello.txt', '/upper.txt'], { namespace: ns, snapshotter: 'stargz' });
    assert.equal(out.stdout, 'hello from the base layer\nhello from the upper layer\n');

    await t2SecondPullDoesNothing(ns, ref, d);
  });

  /** Part of the test above: the same image again in the same namespace. */
  async function t2SecondPullDoesNothing(ns: string, ref: string, d: StargazeDaemon): Promise<void> {
    const snapsBefore = await snapshots(ns, 'stargz');
    const preparedBefore = remotePrepared(d).length;
    registry.resetCounters();
    const r = await rpull(['--namespace', ns, ref]);
    assert.equal(r.code, 0, `second rpull failed:\n${r.stderr}`);
    assert.deepEqual(
      layerLines(r.stdout).map((l) => l.outcome),
      esgz.layers.map(() => 'present'),
      r.stdout,
    );
    assert.deepEqual(registry.blobRequests(), [], 'the second rpull downloads no blob');
    assert.equal(remotePrepared(d).length, preparedBefore, 'no new remote snapshot');
    assert.deepEqual(await snapshots(ns, 'stargz'), snapsBefore, 'no new snapshot');
  }

  test('the daemon pulls for rpull on its pull socket: the same lines, every layer lazy; no daemon there: rpull pulls itself', async () => {
    const d = needDaemon();
    const pullSocket = d.pullAddress;
    const ns = containerd.newNamespace('bydaemon');
    const ref = withHost(esgz.ref, registry.countingHost);
    const pulledBefore = d.logs().filter((e) => e.msg === 'pulled for rpull').length;

    const r = await rpull(['--pull-address', pullSocket, '--namespace', ns, ref]);
    assert.equal(r.code, 0, `rpull failed:\n${r.stderr}\n${r.stdout}`);
    assert.deepEqual(
      layerLines(r.stdout),
      esgz.layers.map((l) => ({ digest: short(l.digest), outcome: 'lazy', bytes: 0 })),
      r.stdout,
    );
    assert.match(r.stdout, /^done: .* 2 layers \(2 lazy, 0 fetched, 0 already present\)/m);
    const pulled = d.logs().filter((e) => e.msg === 'pulled for rpull');
    assert.equal(pulled.length, pulledBefore + 1, 'the daemon carried the pull out');
    assert.equal(pulled.at(-1)?.image, ref);
    const out = await containerd.runContainer(ref, ['/bin/cat', '/upper.txt'], { namespace: ns, snapshotter: 'stargz' });
    assert.equal(out.stdout, 'hello from the upper layer\n');

    // A pull socket nobody listens on: rpull pulls in its own process, with the same result.
    const ns2 = containerd.newNamespace('nodaemon');
    const alone = await rpull(['--pull-address', path.join(path.dirname(d.address), 'nobody-here.sock'), '--namespace', ns2, ref]);
    assert.equal(alone.code, 0, `rpull failed:\n${alone.stderr}\n${alone.stdout}`);
    assert.deepEqual(layerLines(alone.stdout), layerLines(r.stdout).map((l) => ({ ...l })), alone.stdout);
    assert.equal(d.logs().filter((e) => e.msg === 'pulled for rpull').length, pulledBefore + 1, 'the daemon was not asked');

    // A failed pull reports the daemon's error as a pull in this process would, and the daemon serves on.
    const missing = await rpull(['--pull-address', pullSocket, '--namespace', ns2, `${registry.host}/rpull/absent:v1`]);
    assert.notEqual(missing.code, 0);
    assert.match(missing.stderr, /^stargaze: .*absent/m);
    const again = await rpull(['--pull-address', pullSocket, '--namespace', ns2, ref]);
    assert.equal(again.code, 0, again.stderr);
    assert.deepEqual(layerLines(again.stdout).map((l) => l.outcome), esgz.layers.map(() => 'present'), again.stdout);
  });

  test('plain image on the stargz snapshotter: layers fetched by rpull, then it runs', async () => {
    needDaemon();
    const img = await buildBusyboxImage({
      host: registry.host,
      repo: 'rpull/plain',
      tag: 'v1',
      extraFiles: [{ path: '/plain.txt', content: 'not eStargz\n' }],
    });
    const ns = containerd.newNamespace('fallback');
    const ref = withHost(img.ref, registry.countingHost);
    registry.resetCounters();
    const r = await rpull(['--namespace', ns, ref]);
    assert.equal(r.code, 0, `rpull failed:\n${r.stderr}\n${r.stdout}`);
    assert.deepEqual(
      layerLines(r.stdout),
      img.layers.map((l) => ({ digest: short(l.digest), outcome: 'fetched', bytes: l.size })),
      r.stdout,
    );
    for (const l of img.layers) {
      // one whole-blob GET by rpull (the daemon's failed attempt to mount it lazily only read its footer)
      const whole = registry.blobRequests().filter((q) => q.digest === l.digest && q.range === undefined);
      assert.deepEqual(
        whole.map((q) => q.bytes),
        [l.size],
        `layer ${l.digest} downloaded once`,
      );
    }
    const out = await containerd.runContainer(ref, ['/bin/cat', '/plain.txt'], { namespace: ns, snapshotter: 'stargz' });
    assert.equal(out.stdout, 'not eStargz\n');
  });

  test('overlayfs: a plain image is fetched, applied, recorded, kept by GC, and runs (no daemon involved)', async () => {
    const ns = containerd.newNamespace('overlay');
    const r = await rpull(['--namespace', ns, '--snapshotter', 'overlayfs', plain.ref]);
    assert.equal(r.code, 0, `rpull failed:\n${r.stderr}\n${r.stdout}`);
    const lines = layerLines(r.stdout);
    assert.deepEqual(
      lines.map((l) => [l.digest, l.outcome]),
      plain.layers.map((l) => [short(l.digest), 'fetched']),
    );

    // Same GC labels as `ctr images pull` (the stargz.* snapshot labels aside): pull the image with ctr in
    // another namespace and compare the content labels.
    const ctrNs = containerd.newNamespace('ctrpull');
    await containerd.pull(plain.ref, { namespace: ctrNs, snapshotter: 'overlayfs' });
    const labelsOf = async (n: string): Promise<string[]> =>
      (await containerd.ctr(['content', 'ls'], { namespace: n })).stdout
        .split('\n')
        .slice(1)
        .filter(Boolean)
        .map((l) => {
          const [digest, , , labels] = l.split('\t');
          return `${digest} ${(labels ?? '').split(',').sort().join(',')}`;
        })
        .sort();
    assert.deepEqual(await labelsOf(ns), await labelsOf(ctrNs));

    // A synchronous garbage collection (removing an unrelated image) must keep everything the image needs.
    await containerd.removeImages([plain.ref], { namespace: ctrNs });
    const snaps = await snapshots(ns, 'overlayfs');
    assert.equal(snaps.length, plain.layers.length, snaps.join('\n'));
    const out = await containerd.runContainer(plain.ref, ['/bin/cat', '/hello.txt', '/upper.txt'], { namespace: ns, snapshotter: 'overlayfs' });
    assert.equal(out.stdout, 'hello from the base layer\nhello from the upper layer\n');

    const again = await rpull(['--namespace', ns, '--snapshotter', 'overlayfs', plain.ref]);
    assert.equal(again.code, 0, again.stderr);
    assert.deepEqual(
      layerLines(again.stdout).map((l) => l.outcome),
      plain.layers.map(() => 'present'),
    );
  });

  test('an index: the manifest for --platform is picked, the index is the image target', async () => {
    // an OCI index over the plain image's manifest, listed for two platforms (the second one with a made-up
    // variant, so that the exact match must win)
    const manifestSize = Number((await fetch(`http://${registry.host}/v2/rpull/busybox/manifests/v1`, { method: 'HEAD', headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } })).headers.get('content-length'));
    const entry = (platform: Record<string, string>): Record<string, unknown> => ({
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      digest: plain.manifestDigest,
      size: manifestSize,
      platform,
    });
    const arch = process.arch === 'arm64' ? 'arm64' : 'amd64';
    const index = JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests: [entry({ os: 'linux', architecture: 'ppc64le' }), entry({ os: 'linux', architecture: arch })],
    });
    const put = await fetch(`http://${registry.host}/v2/rpull/busybox/manifests/v1-index`, {
      method: 'PUT',
      headers: { 'content-type': 'application/vnd.oci.image.index.v1+json' },
      body: index,
    });
    assert.equal(put.status, 201, await put.text());
    const ref = `${registry.host}/rpull/busybox:v1-index`;

    const ns = containerd.newNamespace('index');
    const r = await rpull(['--namespace', ns, '--snapshotter', 'overlayfs', ref]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^${ref.replace(/[.]/g, '\\.')}: ${short(plain.manifestDigest)} \\(linux/${arch}\\), 2 layers`, 'm'));
    const images = (await containerd.ctr(['images', 'ls'], { namespace: ns })).stdout;
    assert.match(images, /application\/vnd\.oci\.image\.index\.v1\+json/);
    const content = (await containerd.ctr(['content', 'ls'], { namespace: ns })).stdout;
    assert.match(content, /containerd\.io\/gc\.ref\.content\.m\.0=sha256:.*containerd\.io\/gc\.ref\.content\.m\.1=|containerd\.io\/gc\.ref\.content\.m\.1=sha256:.*containerd\.io\/gc\.ref\.content\.m\.0=/);
    const out = await containerd.runContainer(ref, ['/bin/cat', '/upper.txt'], { namespace: ns, snapshotter: 'overlayfs' });
    assert.equal(out.stdout, 'hello from the upper layer\n');

    const other = await rpull(['--namespace', ns, '--snapshotter', 'overlayfs', '--platform', 'linux/s390x', ref]);
    assert.equal(other.code, 1);
    assert.match(other.stderr, /^stargaze: .* has no image for platform linux\/s390x \(it has: linux\/ppc64le, linux\/(amd64|arm64)\)/);
  });

  test(`${CONCURRENT_PULLS} concurrent rpulls of one image collapse onto one mount per layer`, async (t) => {
    const d = needDaemon();
    const base = await buildBusyboxImage({
      host: registry.host,
      repo: 'rpull/concurrent',
      tag: 'v1',
      extraFiles: [{ path: '/c.txt', content: 'concurrent\n' }],
      layers: [[{ path: '/c2.txt', content: 'two\n' }], [{ path: '/c3.txt', content: 'three\n' }]],
    });
    const img = await convertToEstargz(containerd, base.ref, `${registry.host}/rpull/concurrent:v1-esgz`);
    // FUSE layer mounts under the daemon's root (/proc/self/mounts): the earlier tests' layers are there too.
    const fuseMounts = async (): Promise<number> => (await d.mounts()).filter((m) => m.fstype.startsWith('fuse')).length;
    const mountsBefore = await fuseMounts();

    // Node as the launcher runs it, with a line per start: pulls with the same arguments join the first in the
    // launcher (script/stargaze) without starting Node.
    const dir = await makeTmpRoot('rpull-node-starts', scope);
    const starts = path.join(dir, 'starts');
    const countingNode = path.join(dir, 'node');
    await writeFile(countingNode, `#!/bin/sh\necho "$$" >>${JSON.stringify(starts)}\nexec ${JSON.stringify(STARGAZE_COMMAND_ENV.STARGAZE_NODE)} "$@"\n`, { mode: 0o755 });

    const ns = containerd.newNamespace('concurrent');
    // Two spellings of the same pull: the launcher joins the pulls of each spelling to its first, and Node's
    // collapse joins the two firsts (pull-collapse.ts), so both are exercised.
    const spellings = [['--namespace', ns, img.ref], ['-n', ns, img.ref]];
    const started = Date.now();
    const results = await Promise.all(
      Array.from({ length: CONCURRENT_PULLS }, (_, i) => rpull(spellings[i % 2]!, { env: { STARGAZE_NODE: countingNode } })),
    );
    const concurrentMs = Date.now() - started;
    for (const r of results) assert.equal(r.code, 0, `an rpull failed:\n${r.stderr}`);
    const joined = results.filter((r) => r.stdout.includes('\njoined a concurrent rpull of the same image\n')).length;
    assert.equal(joined, CONCURRENT_PULLS - 1, 'all but the one that pulled say they joined it');
    const nodeStarts = (await readFile(starts, 'utf8')).trim().split('\n').length;
    // One per spelling, unless the machine is so loaded that a pull was started only after its first had finished.
    assert.ok(nodeStarts >= 2 && nodeStarts <= 4, `${nodeStarts} of ${CONCURRENT_PULLS} concurrent rpulls started Node`);
    const outcomes = results.map((r) => layerLines(r.stdout));
    for (const [i, l] of img.layers.entries()) {
      const lazy = outcomes.filter((o) => o[i]?.outcome === 'lazy').length;
      const present = outcomes.filter((o) => o[i]?.outcome === 'present').length;
      assert.equal(lazy, 1, `layer ${l.digest}: exactly one pull prepares it`);
      assert.equal(present, CONCURRENT_PULLS - 1, `layer ${l.digest}: the others find it present`);
    }
    assert.equal((await fuseMounts()) - mountsBefore, img.layers.length, 'exactly one FUSE mount per layer');
    t.diagnostic(`${CONCURRENT_PULLS} concurrent rpulls of a ${img.layers.length}-layer image took ${concurrentMs} ms, ${nodeStarts} started Node`);

    const out = await containerd.runContainer(img.ref, ['/bin/cat', '/c.txt', '/c2.txt', '/c3.txt'], { namespace: ns, snapshotter: 'stargz' });
    assert.equal(out.stdout, 'concurrent\ntwo\nthree\n');
  });

  test('unknown image: non-zero exit, one clear message, nothing left behind', async () => {
    const ns = containerd.newNamespace('unknown');
    const r = await rpull(['--namespace', ns, '--snapshotter', 'overlayfs', `${registry.host}/rpull/busybox:no-such-tag`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /^stargaze: image 127\.0\.0\.1:\d+\/rpull\/busybox:no-such-tag not found: .*HTTP 404/);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    const repo = await rpull(['--namespace', ns, '--snapshotter', 'overlayfs', `${registry.host}/rpull/no-such-repo:v1`]);
    assert.equal(repo.code, 1);
    assert.match(repo.stderr, /^stargaze: image .*no-such-repo:v1 not found/);
    assert.equal((await containerd.ctr(['images', 'ls', '-q'], { namespace: ns })).stdout.trim(), '');
    assert.equal((await containerd.ctr(['leases', 'ls', '-q'], { namespace: ns })).stdout.trim(), '');
  });

  test('registry refuses credentials: non-zero exit, says so', async (t) => {
    // a registry that wants basic auth and accepts nothing
    const server = http.createServer((_req, res) => {
      res.writeHead(401, { 'www-authenticate': 'Basic realm="stargaze-test"', 'content-type': 'application/json' });
      res.end('{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}');
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
    const host = `127.0.0.1:${(server.address() as AddressInfo).port}`;
    for (const extra of [[], ['--user', 'someone:wrong']]) {
      const r = await rpull(['--namespace', containerd.newNamespace('auth'), '--snapshotter', 'overlayfs', ...extra, `${host}/private/image:v1`]);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /^stargaze: not authorized to pull 127\.0\.0\.1:\d+\/private\/image:v1: .*\(pass --user USER:PASS/);
    }
  });

  test('containerd not running, snapshotter not configured: non-zero exit, one clear message each', async () => {
    const noSocket = await rpull([plain.ref], { address: path.join(containerd.dir, 'no-such.sock') });
    assert.equal(noSocket.code, 1);
    assert.match(noSocket.stderr, /^stargaze: cannot connect to containerd at .*no-such\.sock: no such socket/);

    const noSnapshotter = await rpull(['--namespace', containerd.newNamespace('nosn'), '--snapshotter', 'no-such-snapshotter', plain.ref]);
    assert.equal(noSnapshotter.code, 1);
    assert.match(noSnapshotter.stderr, /^stargaze: snapshotter "no-such-snapshotter" is not configured in containerd/);
    assert.equal(noSnapshotter.stdout, '', 'nothing was pulled');

    const usage = await rpull([]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /rpull takes exactly one image reference/);
  });
});
