/**
 * Prefetch profiles end to end (issue 15, the local part), with real registry, containerd, runc, FUSE:
 * - a first container start records a profile per layer it read, in the FUSE server, under the daemon root;
 * - `stargaze profile export` on that root and `stargaze profile import` into a fresh one (a new node); a pull
 *   and `ctr containers create` there have fetched exactly the profiled members (counted at the registry) before
 *   the container's first read, and its run fetches none of them again;
 * - a corrupt, oversized or foreign profile changes nothing but a log line: the layer mounts without prefetch
 *   (the image has no landmark) and the container runs.
 *
 * One daemon and one containerd at a time: the recording pair is stopped before the fresh one starts.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import { readToc } from '../../src/estargz/toc';
import { buildLayerTree } from '../../src/metadata/layer-tree';
import { keyOf, parseProfile, serializeProfile, type PrefetchProfile } from '../../src/profile/profile-format';
import { BufferBlobSource } from '../../src/remote/blob-source';
import {
  DEFAULT_CLI_PATH,
  REPO_ROOT,
  buildBusyboxImage,
  fetchManifest,
  makeTmpRoot,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  waitFor,
  withHost,
  rangeOf,
  unionOf,
  type BlobRequest,
  type ByteRange,
  type Containerd,
  type LogEntry,
  type Registry,
  type StargazeDaemon,
} from './harness';

const notRoot = process.getuid?.() !== 0;
const KiB = 1024;
const MiB = 1024 * KiB;
/**
 * The workload: reads two of the base layer's extra files (not the big one) and the upper layer's file. A script
 * in the image, not `sh -c`: `ctr containers create` takes `-c` for its own `--config`.
 */
const SCRIPT = 'cat /app/a.bin /app/b.bin | wc -c; cat /app/top.txt\n';
const WORKLOAD = ['/bin/sh', '/app/run.sh'];
const WORKLOAD_OUT = `${300 * KiB + 3 * MiB}\ntop\n`;
/** Short windows: the test waits for them to close. */
const CONFIG = 'no_background_fetch = true\n[prefetch_profile]\nquiet_msec = 500\n';

async function stargaze(args: string[]): Promise<string> {
  return (await run(process.execPath, [DEFAULT_CLI_PATH, ...args], { cwd: REPO_ROOT, timeoutMs: 60_000 })).stdout;
}

describe('prefetch profiles end to end', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  let esgzRef: string;
  /** The base layer: busybox and the files the workload reads, and a big one it does not. */
  let base: { digest: string; size: number; blob: Buffer };
  let work: string;
  /** Profiles exported from the recording root, by layer digest. */
  const exported = new Map<string, string>();

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    work = await makeTmpRoot('prefetch-profile', cleanup);
    await buildBusyboxImage({
      host: registry.host,
      repo: 'profile/app',
      tag: 'v1',
      extraFiles: [
        // In blob order: the unread file lies between the two read ones, so the profile is not a head of the blob.
        { path: '/app/a.bin', content: randomBytes(300 * KiB) },
        { path: '/app/data/unread.bin', content: randomBytes(8 * MiB) },
        { path: '/app/b.bin', content: randomBytes(3 * MiB) },
      ],
      layers: [
        [
          { path: '/app/top.txt', content: 'top\n' },
          { path: '/app/run.sh', content: SCRIPT },
        ],
      ],
    });
    // No prioritized files: the layers carry `.no.prefetch.landmark`, so nothing is prefetched without a profile.
    await run(process.execPath, [DEFAULT_CLI_PATH, 'convert', '--quiet', '--plain-http', '--chunk-size', String(1 * MiB), `${registry.host}/profile/app:v1`, `${registry.host}/profile/app:esgz`], {
      cwd: REPO_ROOT,
      timeoutMs: 120_000,
    });
    esgzRef = withHost(`${registry.host}/profile/app:esgz`, registry.countingHost);
    const { manifest } = await fetchManifest(registry.host, 'profile/app', 'esgz');
    assert.equal(manifest.layers.length, 2);
    const layer = manifest.layers[0]!;
    // The blob itself, through the registry (not the counting proxy): the test reads its TOC.
    const res = await fetch(`http://${registry.host}/v2/profile/app/blobs/${layer.digest}`);
    base = { digest: layer.digest, size: layer.size, blob: Buffer.from(await res.arrayBuffer()) };
  });

  test('a first container start records a profile for each layer it read', async (t) => {
    const daemon = await startDaemon({ scope: t, config: CONFIG });
    const containerd = await startContainerd({ scope: t, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    const ns = containerd.newNamespace('record');
    await containerd.rpull(esgzRef, { namespace: ns });
    const r = await containerd.runContainer(esgzRef, WORKLOAD, { namespace: ns, snapshotter: 'stargz', id: containerd.uniqueId('record') });
    assert.equal(r.stdout, WORKLOAD_OUT);
    await daemon.waitForLog((e) => e.msg === 'prefetch profile recorded' && e.layer === base.digest, { what: 'the base layer profile', timeoutMs: 30_000 });

    const ls = (await stargaze(['profile', 'ls', '--root', daemon.root])).trim().split('\n').slice(1);
    assert.ok(ls.length >= 2, `a profile per layer read:\n${ls.join('\n')}`);
    for (const row of ls) {
      const key = row.split(/\s+/)[0]!;
      const file = path.join(work, `${key}.json`);
      await stargaze(['profile', 'export', key, file, '--root', daemon.root]);
      const profile = parseProfile(await readFile(file));
      assert.equal(keyOf(profile), key);
      exported.set(profile.layer, file);
    }
    const profile = parseProfile(await readFile(exported.get(base.digest)!));
    const names = new Set(profile.entries.map((e) => e.name));
    for (const name of ['bin/busybox', 'app/a.bin', 'app/b.bin']) assert.ok(names.has(name), `${name} was read at start: ${[...names].join(' ')}`);
    assert.ok(!names.has('app/data/unread.bin'), 'the file nobody read is not in the profile');
    assert.deepEqual(
      profile.entries.filter((e) => e.name === 'app/b.bin').map((e) => e.offset),
      [0, 1 * MiB, 2 * MiB],
      'each chunk of the 3 MiB file, in the order it was read',
    );
    assert.ok(!daemon.logs().some((e) => e.msg === 'prefetch done'), 'nothing was prefetched: the image has no landmark');
  });

  describe('on a fresh root with the profiles imported', () => {
    let daemon: StargazeDaemon;
    let containerd: Containerd;
    let profile: PrefetchProfile;
    const scope = suiteScope();

    before(async () => {
      assert.ok(exported.size >= 2, 'the recording test exported the profiles');
      daemon = await startDaemon({ scope, config: CONFIG });
      containerd = await startContainerd({ scope, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
      for (const file of exported.values()) await stargaze(['profile', 'import', file, '--root', daemon.root]);
      profile = parseProfile(await readFile(exported.get(base.digest)!));
    });

    /** Starts the workload in a new namespace as create, then start; what the registry served in between. */
    async function createAndStart(label: string): Promise<{ beforeFirstRead: BlobRequest[]; duringRun: BlobRequest[]; logs: LogEntry[]; output: string; ns: string }> {
      const logsBefore = daemon.logs().length;
      const ns = containerd.newNamespace(label);
      const id = containerd.uniqueId(label);
      registry.resetCounters();
      await containerd.rpull(esgzRef, { namespace: ns });
      await containerd.ctr(['containers', 'create', '--snapshotter', 'stargz', esgzRef, id, ...WORKLOAD], { namespace: ns });
      const beforeFirstRead = registry.blobRequests();
      const started = await containerd.ctr(['tasks', 'start', id], { namespace: ns });
      const duringRun = registry.blobRequests().slice(beforeFirstRead.length);
      await containerd.ctr(['containers', 'rm', id], { namespace: ns });
      // Removing the image lets containerd collect its snapshots, so the next case mounts the layers afresh.
      await containerd.removeImages([esgzRef], { namespace: ns });
      await waitFor('the base layer unmounted', () => daemon.logs().slice(logsBefore).some((e) => e.msg === 'layer unmounted' && e.layer === base.digest), { timeoutMs: 30_000 });
      return { beforeFirstRead, duringRun, logs: daemon.logs().slice(logsBefore), output: started.stdout, ns };
    }

    test('a pull and create prefetch exactly the profiled members before the first read; the run fetches none again', async () => {
      const { beforeFirstRead, duringRun, logs, output } = await createAndStart('replay');
      assert.equal(output, WORKLOAD_OUT);
      const { toc, tocOffset } = await readToc(new BufferBlobSource(base.digest, base.blob));
      const tree = buildLayerTree(toc, { blobSize: base.size, tocOffset });
      const members: ByteRange[] = profile.entries.map((e) => {
        const c = tree.resolvePath(e.name)!.chunks.find((x) => x.fileOffset === e.offset)!;
        return [c.compressedOffset, c.compressedEnd];
      });
      const gets = beforeFirstRead.filter((q) => q.digest === base.digest && q.method === 'GET');
      assert.ok(gets.every((q) => rangeOf(q, base.size) !== undefined), `every blob GET asks for one range: ${JSON.stringify(gets)}`);
      const ranges = gets.map((q) => rangeOf(q, base.size)!);
      // The mount's first request is the blob's tail (footer and TOC): profiled members inside it need no request.
      const tail = ranges.find((r) => r[1] === base.size);
      assert.ok(tail, `the tail was read: ${JSON.stringify(ranges)}`);
      const expected = unionOf(members.map(([a, b]): ByteRange => [a, Math.min(b, tail[0])]).filter(([a, b]) => a < b));
      const prefetched = ranges.filter((r) => r !== tail);
      assert.deepEqual(unionOf(prefetched), expected, 'the registry served exactly the profiled members before create returned');
      assert.ok(expected.length >= 2 && prefetched.length >= 2, `the unread file in between is skipped: ${JSON.stringify(prefetched)}`);
      const done = logs.find((e) => e.msg === 'prefetch done' && e.layer === base.digest);
      assert.equal(done?.profileChunks, profile.entries.length, 'the profile was replayed, all of it');
      const again = duringRun.filter((q) => q.digest === base.digest).map((q) => rangeOf(q, base.size)!).filter((r) => members.some(([a, b]) => r[0] < b && a < r[1]));
      assert.deepEqual(again, [], 'the run fetched no profiled member again');
    });

    const key = (): string => keyOf(profile);
    const bad: Array<{ what: string; bytes: () => Buffer | string; level: string; msg: string }> = [
      { what: 'corrupt', bytes: () => '{"version": 1, "entries": [', level: 'warn', msg: 'prefetch profile unusable; mounting without it' },
      { what: 'oversized', bytes: () => Buffer.alloc(9 * MiB, 0x20), level: 'debug', msg: 'prefetch profile ignored' },
      {
        what: 'foreign',
        bytes: () => serializeProfile({ ...profile, layer: `sha256:${'0'.repeat(64)}` }),
        level: 'debug',
        msg: 'prefetch profile of another layer ignored',
      },
    ];
    for (const c of bad) {
      test(`a ${c.what} profile changes nothing but a log line`, async () => {
        await writeFile(path.join(daemon.root, 'cache', 'profiles', `${key()}.json`), c.bytes());
        const { logs, output } = await createAndStart(`bad-${c.what}`);
        assert.equal(output, WORKLOAD_OUT, 'the container runs');
        const mounted = logs.find((e) => e.msg === 'layer mounted' && e.layer === base.digest);
        assert.ok(mounted, 'the base layer was mounted afresh');
        const ofMount = logs.filter((e) => e.mountpoint === mounted.mountpoint);
        const about = ofMount.filter((e) => typeof e.msg === 'string' && /profile/.test(e.msg) && e.msg !== 'prefetch profile recorded');
        assert.deepEqual(about.map((e) => [e.level, e.msg]), [[c.level, c.msg]], 'one log line about the profile');
        assert.ok(!ofMount.some((e) => e.msg === 'prefetch done'), 'nothing prefetched, as without a profile');
      });
    }
  });
});
