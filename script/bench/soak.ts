/**
 * Soak (`npm run bench -- soak`; root needed; opt-in, BENCH_SOAK_MINUTES long, default 30): does a daemon stay
 * flat under a node's steady churn? stargaze and the reference (the peer, from STARGAZE_PEER_BIN; without it
 * stargaze alone) each get a fresh daemon and containerd (daemon-arm.ts `startDaemonWithContainerd`) and run the
 * same loop, iteration by iteration in turn:
 *
 *   `ctr-remote images rpull` of the next image of the working set (checked to be mounted lazily), `ctr run --rm`
 *   of it with `sha256sum` of one file per layer (every sum checked against the build's), `ctr images rm --sync`
 *   (containerd's GC removes the image's snapshots before it returns), then the snapshotter's own list checked to be
 *   empty (`ctr snapshots rm` of what is left, counted).
 *
 * The working set: BENCH_SOAK_IMAGES (4) images of BENCH_SOAK_LAYERS (5) distinct eStargz layers (20 layers) over a
 * shared busybox base, each layer holding a 4 MiB incompressible probe, so a pass over the set reads 80 MiB, more
 * than stargaze's disk cap: its config is `[cache] disk_max_bytes = 67108864` (the reference's cache has no cap;
 * defaults otherwise, background fetch on in both). Every BENCH_SOAK_SAMPLE_SEC (15) s, at the end of an
 * iteration (nothing mounted), each daemon's RSS, PSS, threads and descriptors (footprint.ts). Reported: the level
 * at BENCH_SOAK_WARMUP_MINUTES (5) and the maximum after it (target: at most 10 % above); after the last removal,
 * the mounts (/proc/self/mountinfo) and snapshot directories left under each root (target: none).
 */
import { readdir, readFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import path from 'node:path';
import { CleanupStack, PEER_MISSING_NOTE, makeTmpRoot, peerBinary, startRegistry } from '../../test/e2e/harness';
import { checkProbeSums, probeCommand, pushBusyImages, type BusyImage } from '../../test/e2e/harness/busy-node';
import { expectLazyMounts, startDaemonWithContainerd, type DaemonKind, type DaemonWithContainerd } from './daemon-arm';
import { footprintOfGroups, stargazeGroups, type Footprint } from './footprint';

const MINUTES = Number(process.env.BENCH_SOAK_MINUTES ?? 30);
const WARMUP_MINUTES = Math.min(Number(process.env.BENCH_SOAK_WARMUP_MINUTES ?? 5), MINUTES / 2);
const SAMPLE_SEC = Number(process.env.BENCH_SOAK_SAMPLE_SEC ?? 15);
const IMAGES = Number(process.env.BENCH_SOAK_IMAGES ?? 4);
const LAYERS = Number(process.env.BENCH_SOAK_LAYERS ?? 5);
const PROBE_BYTES = 4 * 1024 * 1024;
const FILES_PER_LAYER = 3;
const DISK_MAX_BYTES = 67_108_864;
/** BENCH_SOAK_MEMORY_MAX_BYTES: stargaze's `[cache] memory_max_bytes` (default: its default, 256 MiB). */
const MEMORY_MAX_BYTES = process.env.BENCH_SOAK_MEMORY_MAX_BYTES;
/** BENCH_SOAK_STARGAZE_CONFIG: top-level keys put before stargaze's `[cache]` table (`copy_fetched_layers = false`, say). */
const CONFIG: Record<DaemonKind, string> = {
  stargaze:
    `${process.env.BENCH_SOAK_STARGAZE_CONFIG ?? ''}\n[cache]\ndisk_max_bytes = ${DISK_MAX_BYTES}\n` +
    (MEMORY_MAX_BYTES === undefined ? '' : `memory_max_bytes = ${Number(MEMORY_MAX_BYTES)}\n`),
  peer: '',
};
/** Limit of each step: a hung daemon fails an iteration instead of holding the loop. */
const STEP_TIMEOUT_MS = 120_000;
/** Where each daemon keeps a directory per snapshot, under its root. */
const SNAPSHOT_DIRS: Record<DaemonKind, string> = { stargaze: path.join('snapshotter', 'snapshots'), peer: path.join('snapshotter', 'snapshots') };
/** Failures (reads, removals) after which an arm stops (the other goes on): the defect is shown by then. */
const MAX_FAILURES = 5;
/** The flatness target: the maximum after the warm-up at most this much above the level at its end. */
export const FLAT_TARGET_RATIO = 1.1;

export interface SoakSample {
  /** Seconds since the loop started. */
  tSec: number;
  rssKib: number;
  pssKib: number;
  threads: number;
  fds: number;
}

type Measure = 'rssKib' | 'pssKib' | 'threads' | 'fds';
const MEASURES: Measure[] = ['rssKib', 'pssKib', 'threads', 'fds'];

export interface SoakArm {
  arm: DaemonKind;
  iterations: number;
  /** Probe reads checked against their sums. */
  readsChecked: number;
  /** Reads that failed or returned other bytes, with what happened. */
  failures: string[];
  /** Why the arm stopped before the end, if it did. */
  stopped?: string;
  /** Snapshots the loop had to remove by hand after containerd's GC (`ctr snapshots rm`). */
  snapshotsLeftByGc: number;
  /** Most FUSE mounts left under the root right after a removal. */
  maxMountsAfterRemoval: number;
  samples: SoakSample[];
  /** The first sample at or after the warm-up. */
  level?: SoakSample;
  /** Maximum of each measure over the samples after `level`. */
  maxAfter?: Record<Measure, number>;
  /** maxAfter / level of each measure. */
  ratio?: Record<Measure, number>;
  /** After the last removal. */
  mountsLeft: string[];
  snapshotDirsLeft: string[];
}

export interface SoakResults {
  minutes: number;
  warmupMinutes: number;
  workingSetLayers: number;
  arms: SoakArm[];
  notes: string[];
}

const load = (): string => loadavg().map((l) => l.toFixed(2)).join(' ');

async function footprintOf(d: DaemonWithContainerd): Promise<Footprint> {
  const groups = d.kind === 'peer' ? [d.daemon.pid()] : await stargazeGroups(d.daemon.pid(), d.daemon.root);
  if (d.kind === 'stargaze' && groups.length !== 2) throw new Error(`stargaze: no FUSE server pid under ${d.daemon.root}`);
  const f = await footprintOfGroups(groups);
  if (f.pids.length < groups.length) throw new Error(`a ${d.kind} daemon process is gone (see ${d.daemon.logFile})`);
  return f;
}

async function fuseMounts(d: DaemonWithContainerd): Promise<number> {
  return (await d.daemon.mounts()).filter((m) => m.fstype.startsWith('fuse')).length;
}

/** Snapshot names the daemon's containerd still lists for its snapshotter. */
async function snapshotsLeft(d: DaemonWithContainerd): Promise<string[]> {
  const r = await d.containerd.ctr(['snapshots', '--snapshotter', d.snapshotter, 'ls'], { namespace: d.namespace });
  return r.stdout
    .split('\n')
    .slice(1)
    .map((l) => l.trim().split(/\s+/)[0] ?? '')
    .filter((k) => k !== '');
}

/** Where each thread of the daemon's processes waits (/proc/PID/task/TID/wchan), for a failure's message. */
async function stateOf(d: DaemonWithContainerd): Promise<string> {
  const groups = d.kind === 'peer' ? [d.daemon.pid()] : await stargazeGroups(d.daemon.pid(), d.daemon.root);
  const out: string[] = [];
  for (const pid of groups) {
    const tids = await readdir(`/proc/${pid}/task`).catch(() => [] as string[]);
    const waits = new Map<string, number>();
    for (const tid of tids) {
      const w = (await readFile(`/proc/${pid}/task/${tid}/wchan`, 'utf8').catch(() => '?')) || 'running';
      waits.set(w, (waits.get(w) ?? 0) + 1);
    }
    const main = (await readFile(`/proc/${pid}/wchan`, 'utf8').catch(() => '?')) || 'running';
    out.push(`pid ${pid}: main thread in ${main}; threads ${[...waits].map(([w, n]) => `${n} ${w}`).join(', ')}`);
  }
  return `\n      ${d.kind} processes: ${out.join(' | ')}`;
}

/** One iteration of one arm: pull, run and check, remove, GC. */
async function iterate(d: DaemonWithContainerd, img: BusyImage, arm: SoakArm): Promise<void> {
  const { containerd, snapshotter, namespace } = d;
  try {
    await containerd.rpull(img.ref, { snapshotter, namespace, timeoutMs: STEP_TIMEOUT_MS });
    await expectLazyMounts(d.kind, d.daemon, img.layers);
    const r = await containerd.runContainer(img.ref, probeCommand(img.probes), { snapshotter, namespace, timeoutMs: STEP_TIMEOUT_MS, allowFailure: true });
    if (r.code !== 0) throw new Error(`container exit ${r.code}: ${r.stderr.trim()}`);
    checkProbeSums(r.stdout, img.probes);
    arm.readsChecked += img.probes.length;
  } catch (err) {
    arm.failures.push(`iteration ${arm.iterations + 1} (${img.ref}): ${err instanceof Error ? err.message : String(err)}${await stateOf(d)}`);
  }
  try {
    await containerd.removeImages([img.ref], { namespace, timeoutMs: STEP_TIMEOUT_MS });
  } catch (err) {
    arm.failures.push(`iteration ${arm.iterations + 1} (${img.ref}) removal: ${err instanceof Error ? err.message : String(err)}${await stateOf(d)}`);
  }
  // children before parents: the list is a chain, so remove from its tip while anything is left
  for (let left = await snapshotsLeft(d), round = 0; left.length > 0 && round < LAYERS + 2; left = await snapshotsLeft(d), round++) {
    if (round === 0) arm.snapshotsLeftByGc += left.length;
    for (const key of left) await containerd.ctr(['snapshots', '--snapshotter', snapshotter, 'rm', key], { namespace, allowFailure: true });
  }
  arm.maxMountsAfterRemoval = Math.max(arm.maxMountsAfterRemoval, await fuseMounts(d));
  arm.iterations++;
}

function summarize(arm: SoakArm, warmupSec: number): void {
  const levelIndex = arm.samples.findIndex((s) => s.tSec >= warmupSec);
  if (levelIndex < 0) return;
  const level = arm.samples[levelIndex]!;
  const after = arm.samples.slice(levelIndex + 1);
  if (after.length === 0) return;
  arm.level = level;
  arm.maxAfter = Object.fromEntries(MEASURES.map((m) => [m, Math.max(...after.map((s) => s[m]))])) as Record<Measure, number>;
  arm.ratio = Object.fromEntries(MEASURES.map((m) => [m, arm.maxAfter![m] / level[m]])) as Record<Measure, number>;
}

export async function benchSoak(): Promise<SoakResults> {
  const kinds: DaemonKind[] = peerBinary() === undefined ? ['stargaze'] : ['stargaze', 'peer'];
  const notes = [
    `configs: stargaze ${CONFIG.stargaze.trim().replaceAll('\n', ' ')}; peer defaults; sums over stargaze's daemon + FUSE server, the peer's one process`,
    `load average at start: ${load()}`,
  ];
  if (!kinds.includes('peer')) notes.push(PEER_MISSING_NOTE);
  const scope = new CleanupStack();
  try {
    const registry = await startRegistry({ scope });
    const images = await pushBusyImages({
      host: registry.host,
      repo: 'bench/soak',
      images: IMAGES,
      layersPerImage: LAYERS,
      filesPerLayer: FILES_PER_LAYER,
      probeBytes: PROBE_BYTES,
      workDir: await makeTmpRoot('soak', scope),
    });
    const daemons: DaemonWithContainerd[] = [];
    for (const kind of kinds) daemons.push(await startDaemonWithContainerd({ kind, scope, pullHost: registry.host, config: CONFIG[kind] }));
    const arms: SoakArm[] = daemons.map((d) => ({
      arm: d.kind,
      iterations: 0,
      readsChecked: 0,
      failures: [],
      snapshotsLeftByGc: 0,
      maxMountsAfterRemoval: 0,
      samples: [],
      mountsLeft: [],
      snapshotDirsLeft: [],
    }));

    const start = Date.now();
    const endAt = start + MINUTES * 60_000;
    let lastSample = -Infinity;
    for (let i = 0; Date.now() < endAt; i++) {
      const img = images[i % images.length]!;
      for (const [k, d] of daemons.entries()) {
        const arm = arms[k]!;
        if (arm.stopped !== undefined) continue;
        await iterate(d, img, arm);
        if (arm.failures.length >= MAX_FAILURES) arm.stopped = `stopped after ${MAX_FAILURES} failures, ${((Date.now() - start) / 60_000).toFixed(1)} min in`;
      }
      if (arms.every((a) => a.stopped !== undefined)) break;
      if (Date.now() - lastSample < SAMPLE_SEC * 1000) continue;
      lastSample = Date.now();
      const tSec = (lastSample - start) / 1000;
      const line: string[] = [];
      for (const [k, d] of daemons.entries()) {
        if (arms[k]!.stopped !== undefined) continue;
        const f = await footprintOf(d);
        arms[k]!.samples.push({ tSec, rssKib: f.rssKib, pssKib: f.pssKib, threads: f.threads, fds: f.fds });
        line.push(`${d.kind} RSS ${(f.rssKib / 1024).toFixed(1)} MiB, ${f.threads} threads, ${f.fds} fds, ${arms[k]!.iterations} iterations`);
      }
      process.stdout.write(`  ${(tSec / 60).toFixed(1).padStart(5)} min: ${line.join(' | ')}\n`);
    }

    for (const [k, d] of daemons.entries()) {
      const arm = arms[k]!;
      arm.mountsLeft = (await d.daemon.mounts()).map((m) => `${m.fstype} ${m.mountpoint}`);
      const dir = path.join(d.daemon.root, SNAPSHOT_DIRS[d.kind]);
      arm.snapshotDirsLeft = (await readdir(dir).catch(() => [] as string[])).map((n) => path.join(dir, n));
      summarize(arm, WARMUP_MINUTES * 60);
    }
    notes.push(`load average at end: ${load()}`);
    return { minutes: MINUTES, warmupMinutes: WARMUP_MINUTES, workingSetLayers: IMAGES * LAYERS, arms, notes };
  } finally {
    await scope.run();
  }
}

/** `npm run bench -- soak`: prints the levels and what was left, returns what goes to bench-results/soak.json. */
export async function reportSoak(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the soak benchmark runs containerd and the daemons (FUSE): run it as root');
  process.stdout.write(
    `soak: ${MINUTES} min of rpull, run (sha256 checked), image rm + GC over ${IMAGES * LAYERS} layers; ` +
      `level at ${WARMUP_MINUTES} min vs max after (target <= +${Math.round((FLAT_TARGET_RATIO - 1) * 100)} %)\n`,
  );
  const r = await benchSoak();
  const show = (m: Measure, v: number): string => (m === 'rssKib' || m === 'pssKib' ? `${(v / 1024).toFixed(1)} MiB` : String(v));
  for (const a of r.arms) {
    process.stdout.write(
      `\n  ${a.arm}: ${a.iterations} iterations, ${a.readsChecked} reads checked, ${a.failures.length} failed, ` +
        `${a.snapshotsLeftByGc} snapshots left by GC, at most ${a.maxMountsAfterRemoval} FUSE mounts right after a removal\n`,
    );
    if (a.level && a.maxAfter && a.ratio) {
      for (const m of MEASURES) {
        const verdict = a.ratio[m] <= FLAT_TARGET_RATIO ? 'flat' : 'GROWS';
        process.stdout.write(`    ${m.replace('Kib', '').padEnd(8)} level ${show(m, a.level[m]).padStart(10)}  max after ${show(m, a.maxAfter[m]).padStart(10)}  ${a.ratio[m].toFixed(3)}x  ${verdict}\n`);
      }
    } else {
      process.stdout.write('    too short for a level and a maximum after it\n');
    }
    process.stdout.write(`    after the last removal: ${a.mountsLeft.length} mounts, ${a.snapshotDirsLeft.length} snapshot dirs left under the root\n`);
    if (a.stopped !== undefined) process.stdout.write(`    ${a.stopped}\n`);
    for (const f of a.failures) process.stdout.write(`    failure: ${f}\n`);
    for (const m of a.mountsLeft) process.stdout.write(`    mount left: ${m}\n`);
    for (const d of a.snapshotDirsLeft) process.stdout.write(`    snapshot dir left: ${d}\n`);
  }
  for (const note of r.notes) process.stdout.write(`  note: ${note}\n`);
  return { ...r };
}
