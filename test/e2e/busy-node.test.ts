/**
 * A busy node in small (the busy-node, restart-at-size and soak benchmarks assert these at size, script/bench/):
 * 3 images of 4 distinct eStargz layers over a shared busybox base, each pulled lazily and run with a read of one
 * file per layer (sums checked); a restart with the same root after which every layer still reads right; and
 * removal of every image with containerd's GC, after which no mount and no snapshot directory is left under the
 * root and the daemon's threads and descriptors are back at their idle level. Invariants, not timings.
 */
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import {
  fuseServerPid,
  makeTmpRoot,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  waitFor,
  type Containerd,
  type StargazeDaemon,
} from './harness';
import { checkProbeSums, probeCommand, pushBusyImages, type BusyImage } from './harness/busy-node';

const notRoot = process.getuid?.() !== 0;
const IMAGES = 3;
const LAYERS_PER_IMAGE = 4;
/** One base layer shared by all images, plus the distinct ones. */
const ALL_LAYERS = 1 + IMAGES * LAYERS_PER_IMAGE;
/**
 * Threads and descriptors the daemon and FUSE server may hold above their idle level once everything is removed
 * (connections to containerd and between the two processes, libuv's pool start on first use; seen: 0 threads and
 * 5 descriptors more); a leak of one per layer would be 13 or more.
 */
const THREAD_SLACK = 4;
const FD_SLACK = 8;

interface Counts {
  threads: number;
  fds: number;
}

/** Threads and open descriptors of one process, from /proc. */
async function countsOf(pid: number): Promise<Counts> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8');
  const threads = Number(/^Threads:\s*(\d+)/m.exec(status)?.[1]);
  const fds = (await readdir(`/proc/${pid}/fd`)).length;
  return { threads, fds };
}

/** The daemon's and its FUSE server's counts, summed. */
async function daemonCounts(daemon: StargazeDaemon): Promise<Counts> {
  const fuse = await fuseServerPid(daemon.root);
  assert.ok(fuse !== undefined, 'a FUSE server runs');
  const a = await countsOf(daemon.pid());
  const b = await countsOf(fuse);
  return { threads: a.threads + b.threads, fds: a.fds + b.fds };
}

async function fuseMounts(daemon: StargazeDaemon): Promise<number> {
  return (await daemon.mounts()).filter((m) => m.fstype.startsWith('fuse')).length;
}

describe('a busy node in small: many lazy layers, a restart, removal', { skip: notRoot && 'e2e tests need root' }, () => {
  const scope = suiteScope();
  let daemon: StargazeDaemon;
  let containerd: Containerd;
  let images: BusyImage[];
  let idle: Counts;

  before(async () => {
    const registry = await startRegistry({ scope });
    images = await pushBusyImages({
      host: registry.host,
      repo: 'e2e/busy-node',
      images: IMAGES,
      layersPerImage: LAYERS_PER_IMAGE,
      filesPerLayer: 3,
      probeBytes: 64 * 1024,
      workDir: await makeTmpRoot('busy-node', scope),
    });
    daemon = await startDaemon({ scope, plainHttpHosts: [registry.host], config: 'no_background_fetch = true\n' });
    containerd = await startContainerd({ scope, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    idle = await daemonCounts(daemon);
  });

  const runAndCheck = async (img: BusyImage): Promise<void> => {
    const r = await containerd.runContainer(img.ref, probeCommand(img.probes), { snapshotter: 'stargz' });
    checkProbeSums(r.stdout, img.probes);
  };

  test('each image is pulled lazily and a container reads one file per layer right', async () => {
    for (const [i, img] of images.entries()) {
      await containerd.rpull(img.ref);
      assert.equal(await fuseMounts(daemon), 1 + (i + 1) * LAYERS_PER_IMAGE, `every layer so far is a lazy mount after image ${i + 1}`);
      await runAndCheck(img);
    }
  });

  test('restarted with the same root, the daemon keeps every mount and every layer still reads right', async () => {
    const fuseBefore = await fuseServerPid(daemon.root);
    await daemon.restart();
    assert.equal(await fuseServerPid(daemon.root), fuseBefore, 'the FUSE server outlived the daemon');
    assert.equal(await fuseMounts(daemon), ALL_LAYERS);
    for (const img of images) await runAndCheck(img);
  });

  test('removing the images (GC) leaves no mount and no snapshot directory; threads and descriptors come back', async (t) => {
    await containerd.removeImages(images.map((img) => img.ref));
    const left = await containerd.ctr(['snapshots', '--snapshotter', 'stargz', 'ls']);
    assert.deepEqual(left.stdout.split('\n').slice(1).filter((l) => l.trim() !== ''), [], 'containerd lists no stargz snapshot');
    assert.deepEqual(await daemon.mounts(), [], 'no mount under the root');
    assert.deepEqual(await readdir(path.join(daemon.root, 'snapshotter', 'snapshots')), [], 'no snapshot directory');
    // unmounted layers' loop threads end shortly after their unmount
    const settled = await waitFor(
      'threads and descriptors back at their idle level',
      async () => {
        const now = await daemonCounts(daemon);
        return now.threads <= idle.threads + THREAD_SLACK && now.fds <= idle.fds + FD_SLACK ? now : undefined;
      },
      { timeoutMs: 10_000, intervalMs: 250 },
    ).catch(async () => daemonCounts(daemon));
    t.diagnostic(`threads ${settled.threads} (idle ${idle.threads}), descriptors ${settled.fds} (idle ${idle.fds})`);
    assert.ok(settled.threads <= idle.threads + THREAD_SLACK, `threads ${settled.threads}, idle ${idle.threads}`);
    assert.ok(settled.fds <= idle.fds + FD_SLACK, `descriptors ${settled.fds}, idle ${idle.fds}`);
  });
});
