/**
 * Daemon memory per mounted layer (`npm run bench -- layer-memory`; root needed): what each lazy-pulling
 * snapshotter costs the node as a whole, stargaze (`stargaze daemon` plus the FUSE server it starts) side by side
 * with the reference snapshotter, the peer (`containerd-stargz-grpc` from STARGAZE_PEER_BIN: one process, its FUSE
 * servers are goroutines). Without STARGAZE_PEER_BIN the stargaze arm runs alone.
 *
 * The image: BENCH_LAYERS eStargz layers written by the project's writer, each of BENCH_FILES_PER_LAYER small files
 * `usr/lib/layer<i>/dir<j>/file-<k>.so`, so what grows with the layers is the TOC metadata, not file data. It is
 * built once per run and pushed (OCI media types, toc.digest and uncompressed-size annotations) to a local
 * registry; both arms pull it through the registry's counting proxy.
 *
 * Each sample of an arm gets a fresh daemon (`noprefetch`, `no_background_fetch`: nothing is fetched that the steps
 * below don't ask for) and a fresh containerd (daemon-arm.ts `startDaemonWithContainerd`), and measures the
 * daemon's processes at three points:
 *   idle         started, nothing mounted;
 *   mounted      after `ctr-remote images rpull` of the image (the same client for both arms), checked to have
 *                left one FUSE mount per layer (daemon-arm.ts `expectLazyMounts`);
 *   after reads  after a child process (`sh -c cat ...`) read one file of each layer through the image's rootfs
 *                (an overlay view of the top snapshot), and the view was unmounted and removed again.
 * Each point is taken 2 s after the step (SETTLE_MS) from /proc: VmRSS, Pss (smaps_rollup), threads and open fds
 * summed over the daemon's process groups (footprint.ts). RSS counts pages two processes share (the Node binary,
 * shared libraries: stargaze runs two Node processes) once for each; PSS divides them among their users.
 * containerd's and the bench's own processes are not counted.
 *
 * The floor (stargaze only): right after the idle footprint, two empty Node processes (`node -e 'setInterval(...)'`)
 * started with the same binary, flags and NODE_OPTIONS as the daemon and as the FUSE server (footprint.ts
 * `startEmptyNode`), measured SETTLE_MS later while the daemon still runs. Idle RSS over the floor is what
 * stargaze's own code and data cost beyond two Node processes; the target is at most FIXED_COST_BUDGET_MIB. Per layer (RSS): (mounted - idle) / layers and
 * (after reads - mounted) / layers, taken in each sample. The arms alternate order from sample to sample, each
 * number is the median over samples (so a per-layer number is the median of the per-sample differences, not the
 * difference of the medians shown), and ratios are stargaze / peer of the medians.
 *
 * Knobs: BENCH_LAYERS (default 50), BENCH_FILES_PER_LAYER (2000), BENCH_SAMPLES (3), STARGAZE_PEER_BIN.
 */
import { loadavg } from 'node:os';
import path from 'node:path';
import { Readable, Writable } from 'node:stream';
import { setTimeout as delay } from 'node:timers/promises';
import { writeEstargz } from '../../src/estargz/writer';
import {
  ANNOTATION_TOC_DIGEST,
  ANNOTATION_UNCOMPRESSED_SIZE,
  CleanupStack,
  PEER_MISSING_NOTE,
  makeTmpRoot,
  peerBinary,
  run,
  startRegistry,
  type Registry,
} from '../../test/e2e/harness';
import { makeTar, pushRawImage, type RawLayer } from '../../test/e2e/harness/raw-image';
import { expectLazyMounts, startDaemonWithContainerd, type DaemonKind, type DaemonWithContainerd } from './daemon-arm';
import { footprintOfGroups, nodeInvocationOf, stargazeGroups, startEmptyNode, type Footprint } from './footprint';
import { median } from './startup';

const LAYERS = Number(process.env.BENCH_LAYERS ?? 50);
const FILES = Number(process.env.BENCH_FILES_PER_LAYER ?? 2000);
const SAMPLES = Math.max(1, Number(process.env.BENCH_SAMPLES ?? 3));
const DIRS_PER_LAYER = 50;
/** Wait before each footprint, so startup, pull and read work has finished and transient garbage is collected. */
const SETTLE_MS = 2_000;
const PULL_TIMEOUT_MS = 600_000;
/** Both daemons understand these keys: no prefetch at mount, no background fetch of the rest of each layer. */
const DAEMON_CONFIG = 'noprefetch = true\nno_background_fetch = true\n';
const MIB = 1024 * 1024;
/** The fixed-cost target: stargaze's idle RSS (daemon + FUSE server) at most this far above its floor. */
export const FIXED_COST_BUDGET_MIB = 25;

/** What the table shows, per arm, in this order, with its row label; RSS and PSS in MiB, per-layer deltas in KiB. */
export const METRIC_LABELS = {
  idleRssMib: 'idle RSS MiB',
  idlePssMib: 'idle PSS MiB',
  idleThreads: 'idle threads',
  idleFds: 'idle fds',
  mountedRssMib: 'mounted RSS MiB',
  mountedPssMib: 'mounted PSS MiB',
  perMountedLayerKib: 'per mounted layer KiB',
  mountedThreads: 'mounted threads',
  mountedFds: 'mounted fds',
  afterReadsRssMib: 'after reads RSS MiB',
  afterReadsPssMib: 'after reads PSS MiB',
  perReadLayerKib: 'per read layer KiB',
  afterReadsThreads: 'after reads threads',
  afterReadsFds: 'after reads fds',
} as const;
export type Metric = keyof typeof METRIC_LABELS;
export const METRICS = Object.keys(METRIC_LABELS) as Metric[];

/** stargaze's idle footprint per process, and the floor of each: an empty Node process started like it. */
export interface FloorSample {
  daemon: Footprint;
  fuseServer: Footprint;
  daemonFloor: Footprint;
  fuseServerFloor: Footprint;
}

export interface ArmSample {
  idle: Footprint;
  /** stargaze only. */
  floor?: FloorSample;
  mounted: Footprint;
  afterReads: Footprint;
  /** Blob bytes the daemon fetched through the counting proxy, pull and reads together. */
  fetchedBytes: number;
}

export interface ArmResult {
  arm: DaemonKind;
  /** Medians over the samples. */
  median: Record<Metric, number>;
  samples: ArmSample[];
}

export interface LayerMemoryResults {
  layers: number;
  filesPerLayer: number;
  samples: number;
  /** Compressed size of all the layers. */
  imageMib: number;
  arms: ArmResult[];
  /** stargaze's idle RSS against two empty Node processes started with the same flags (medians over samples). */
  fixedCost?: FixedCost;
  /** stargaze / peer of each median; absent without the peer, null where a value is not positive (a delta GC made negative). */
  ratio?: Record<Metric, number | null>;
}

export interface FixedCost {
  /** RSS and PSS of the two empty Node processes together. */
  floorRssMib: number;
  floorPssMib: number;
  /** stargaze's idle RSS (daemon + FUSE server), the same as its idleRssMib. */
  idleRssMib: number;
  /** idle RSS - floor RSS, the median over samples of each sample's difference. */
  overFloorMib: number;
  budgetMib: number;
  withinBudget: boolean;
  /** Each process at idle and its own floor. */
  daemonRssMib: number;
  daemonFloorRssMib: number;
  fuseServerRssMib: number;
  fuseServerFloorRssMib: number;
}

/** The file of layer `i` the reads cat (present for any file count >= 1). */
const fileOf = (i: number): string => `usr/lib/layer${i}/dir0/file-0.so`;

async function buildLayer(index: number): Promise<RawLayer> {
  const tar = await makeTar(
    Array.from({ length: FILES }, (_, k) => ({
      name: `usr/lib/layer${index}/dir${k % DIRS_PER_LAYER}/file-${k}.so`,
      content: `layer ${index} file ${k}\n`.repeat(8),
    })),
  );
  const parts: Buffer[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb): void {
      parts.push(chunk);
      cb();
    },
  });
  const r = await writeEstargz(Readable.from([tar]), sink, { compressionLevel: 1 });
  return {
    blob: Buffer.concat(parts),
    diffId: r.diffId,
    annotations: { [ANNOTATION_TOC_DIGEST]: r.tocDigest, [ANNOTATION_UNCOMPRESSED_SIZE]: String(r.uncompressedSize) },
  };
}

/** The process groups to measure: stargaze's daemon and its FUSE server, the peer's one process. */
async function groupsOf(d: DaemonWithContainerd): Promise<number[]> {
  if (d.kind === 'peer') return [d.daemon.pid()];
  const groups = await stargazeGroups(d.daemon.pid(), d.daemon.root);
  // without the FUSE server's group the footprint would silently drop half of stargaze
  if (groups.length !== 2) throw new Error(`stargaze: no FUSE server pid under ${d.daemon.root}`);
  return groups;
}

async function settledFootprint(d: DaemonWithContainerd): Promise<Footprint> {
  await delay(SETTLE_MS);
  return footprintNow(d);
}

async function footprintNow(d: DaemonWithContainerd): Promise<Footprint> {
  const groups = await groupsOf(d);
  const f = await footprintOfGroups(groups);
  if (f.pids.length < groups.length) throw new Error(`a daemon process is gone (groups ${groups.join(', ')}; see ${d.daemon.logFile})`);
  return f;
}

/**
 * stargaze's idle footprint per process, then the floor of each: an empty Node process started with its
 * binary, flags and NODE_OPTIONS, measured after the same settle time, stopped again.
 */
async function floorSample(d: DaemonWithContainerd, scope: CleanupStack): Promise<FloorSample> {
  const [daemonGroup, fuseGroup] = await groupsOf(d);
  const [daemon, fuseServer] = [await footprintOfGroups([daemonGroup!]), await footprintOfGroups([fuseGroup!])];
  const floors = [];
  for (const pid of [daemonGroup!, fuseGroup!]) {
    const floor = startEmptyNode(await nodeInvocationOf(pid));
    scope.after(() => Promise.resolve(floor.stop()));
    floors.push(floor);
  }
  await delay(SETTLE_MS);
  const [daemonFloor, fuseServerFloor] = [await footprintOfGroups([floors[0]!.pid]), await footprintOfGroups([floors[1]!.pid])];
  if (daemonFloor.pids.length !== 1 || fuseServerFloor.pids.length !== 1) throw new Error('an empty Node process of the floor exited');
  for (const floor of floors) floor.stop();
  return { daemon, fuseServer, daemonFloor, fuseServerFloor };
}

/** One sample of one arm: fresh daemon and containerd, the three footprints, everything torn down. */
async function sample(arm: DaemonKind, registry: Registry, ref: string): Promise<ArmSample> {
  const scope = new CleanupStack();
  try {
    const d = await startDaemonWithContainerd({ kind: arm, scope, pullHost: registry.countingHost, config: DAEMON_CONFIG });
    const { containerd, snapshotter, namespace } = d;
    await delay(SETTLE_MS);
    // both processes at the same instant, as the sum, and as the floor compares them
    const floor = arm === 'stargaze' ? await floorSample(d, scope) : undefined;
    const idle = floor ? sumFootprints(floor.daemon, floor.fuseServer) : await footprintNow(d);

    registry.resetCounters();
    await containerd.rpull(ref, { snapshotter, namespace, timeoutMs: PULL_TIMEOUT_MS });
    await expectLazyMounts(arm, d.daemon, LAYERS);
    const mounted = await settledFootprint(d);

    const rootfs = path.join(await makeTmpRoot('bench-rootfs', scope), 'rootfs');
    await containerd.mountImage(ref, rootfs, { snapshotter, namespace });
    try {
      // a child reads, never this process (stargaze's rule; the daemons are separate processes anyway)
      await run('sh', ['-c', 'cat "$@" >/dev/null', 'sh', ...Array.from({ length: LAYERS }, (_, i) => path.join(rootfs, fileOf(i)))]);
    } finally {
      await containerd.unmountImage(rootfs, { namespace });
    }
    const afterReads = await settledFootprint(d);
    return { idle, ...(floor ? { floor } : {}), mounted, afterReads, fetchedBytes: registry.bytesServed() };
  } finally {
    await scope.run();
  }
}

function sumFootprints(a: Footprint, b: Footprint): Footprint {
  return { rssKib: a.rssKib + b.rssKib, pssKib: a.pssKib + b.pssKib, threads: a.threads + b.threads, fds: a.fds + b.fds, pids: [...a.pids, ...b.pids] };
}

function fixedCostOf(samples: ArmSample[]): FixedCost | undefined {
  const floors = samples.map((s) => s.floor).filter((f): f is FloorSample => f !== undefined);
  if (floors.length === 0) return undefined;
  const mib = (kib: number): number => kib / 1024;
  const med = (pick: (f: FloorSample) => number): number => median(floors.map(pick));
  const floorRss = (f: FloorSample): number => mib(f.daemonFloor.rssKib + f.fuseServerFloor.rssKib);
  const idleRss = (f: FloorSample): number => mib(f.daemon.rssKib + f.fuseServer.rssKib);
  const overFloorMib = med((f) => idleRss(f) - floorRss(f));
  return {
    floorRssMib: med(floorRss),
    floorPssMib: med((f) => mib(f.daemonFloor.pssKib + f.fuseServerFloor.pssKib)),
    idleRssMib: med(idleRss),
    overFloorMib,
    budgetMib: FIXED_COST_BUDGET_MIB,
    withinBudget: overFloorMib <= FIXED_COST_BUDGET_MIB,
    daemonRssMib: med((f) => mib(f.daemon.rssKib)),
    daemonFloorRssMib: med((f) => mib(f.daemonFloor.rssKib)),
    fuseServerRssMib: med((f) => mib(f.fuseServer.rssKib)),
    fuseServerFloorRssMib: med((f) => mib(f.fuseServerFloor.rssKib)),
  };
}

function metricsOf(s: ArmSample): Record<Metric, number> {
  return {
    idleRssMib: s.idle.rssKib / 1024,
    idlePssMib: s.idle.pssKib / 1024,
    idleThreads: s.idle.threads,
    idleFds: s.idle.fds,
    mountedRssMib: s.mounted.rssKib / 1024,
    mountedPssMib: s.mounted.pssKib / 1024,
    perMountedLayerKib: (s.mounted.rssKib - s.idle.rssKib) / LAYERS,
    mountedThreads: s.mounted.threads,
    mountedFds: s.mounted.fds,
    afterReadsRssMib: s.afterReads.rssKib / 1024,
    afterReadsPssMib: s.afterReads.pssKib / 1024,
    perReadLayerKib: (s.afterReads.rssKib - s.mounted.rssKib) / LAYERS,
    afterReadsThreads: s.afterReads.threads,
    afterReadsFds: s.afterReads.fds,
  };
}

const eachMetric = <T>(f: (m: Metric) => T): Record<Metric, T> => Object.fromEntries(METRICS.map((m) => [m, f(m)])) as Record<Metric, T>;

const load = (): string => loadavg().map((l) => l.toFixed(2)).join(' ');

export async function benchLayerMemory(): Promise<{ results: LayerMemoryResults; notes: string[] }> {
  const arms: DaemonKind[] = peerBinary() === undefined ? ['stargaze'] : ['stargaze', 'peer'];
  const notes = [
    `daemon config (both): ${DAEMON_CONFIG.trim().replace('\n', ', ')}; sums over stargaze's daemon + FUSE server, the peer's one process`,
    `load average at start: ${load()}`,
  ];
  if (!arms.includes('peer')) notes.push(PEER_MISSING_NOTE);
  const samples = new Map<DaemonKind, ArmSample[]>(arms.map((a) => [a, []]));
  const cleanup = new CleanupStack();
  let imageBytes: number;
  try {
    const registry = await startRegistry({ scope: cleanup });
    const layers: RawLayer[] = [];
    for (let i = 0; i < LAYERS; i++) layers.push(await buildLayer(i));
    imageBytes = layers.reduce((n, l) => n + l.blob.length, 0);
    await pushRawImage({ host: registry.host, repo: 'bench/layer-memory', tag: 'v1', layers });
    const ref = `${registry.countingHost}/bench/layer-memory:v1`;
    for (let s = 0; s < SAMPLES; s++) {
      // alternate the order so drift in the machine's load hits both arms alike
      for (const arm of s % 2 === 0 ? arms : [...arms].reverse()) {
        const r = await sample(arm, registry, ref);
        samples.get(arm)!.push(r);
        const m = metricsOf(r);
        const f = r.floor;
        const floorText = f
          ? `, floor RSS ${((f.daemonFloor.rssKib + f.fuseServerFloor.rssKib) / 1024).toFixed(1)} MiB (daemon ${(f.daemon.rssKib / 1024).toFixed(1)} ` +
            `vs ${(f.daemonFloor.rssKib / 1024).toFixed(1)}, FUSE server ${(f.fuseServer.rssKib / 1024).toFixed(1)} vs ${(f.fuseServerFloor.rssKib / 1024).toFixed(1)})`
          : '';
        process.stdout.write(
          `  #${s + 1} ${arm.padEnd(8)} RSS idle ${m.idleRssMib.toFixed(1)} / mounted ${m.mountedRssMib.toFixed(1)} / ` +
            `after reads ${m.afterReadsRssMib.toFixed(1)} MiB, PSS ${m.idlePssMib.toFixed(1)} / ${m.mountedPssMib.toFixed(1)} / ` +
            `${m.afterReadsPssMib.toFixed(1)} MiB${floorText}, fetched ${(r.fetchedBytes / MIB).toFixed(1)} MiB, load ${load()}\n`,
        );
      }
    }
  } finally {
    await cleanup.run();
  }
  notes.push(`load average at end: ${load()}`);
  const results: ArmResult[] = arms.map((arm) => {
    const all = samples.get(arm)!.map(metricsOf);
    return { arm, median: eachMetric((k) => median(all.map((m) => m[k]))), samples: samples.get(arm)! };
  });
  notes.push(
    'per mounted / per read layer KiB: the median over samples of each sample\'s (mounted - idle) RSS / layers and ' +
      '(after reads - mounted) RSS / layers; not derivable from the medians of the RSS rows',
  );
  if (results.some((a) => a.median.perMountedLayerKib < 0 || a.median.perReadLayerKib < 0)) {
    notes.push('a negative per-layer delta: the daemon freed more (garbage collection) than the step added; take BENCH_SAMPLES >= 3');
  }
  const [ours, peer] = results;
  const fixedCost = ours ? fixedCostOf(ours.samples) : undefined;
  if (fixedCost) {
    notes.push(
      `floor: two empty Node processes (node -e 'setInterval(...)') with the daemon's and the FUSE server's binary, flags and NODE_OPTIONS, ` +
        `measured ${SETTLE_MS} ms after they started, while the daemon ran; over floor = the median of each sample's idle RSS - floor RSS`,
    );
  }
  return {
    results: {
      layers: LAYERS,
      filesPerLayer: FILES,
      samples: SAMPLES,
      imageMib: imageBytes / MIB,
      arms: results,
      ...(fixedCost ? { fixedCost } : {}),
      ...(ours && peer ? { ratio: eachMetric((k) => (ours.median[k] > 0 && peer.median[k] > 0 ? ours.median[k] / peer.median[k] : null)) } : {}),
    },
    notes,
  };
}
