/**
 * A busy node (`npm run bench -- busy-node restart-at-size`; root needed; opt-in, a few minutes): what each
 * lazy-pulling snapshotter costs and how it restarts with hundreds of layers mounted, stargaze side by side with the
 * reference (the peer, `containerd-stargz-grpc` from STARGAZE_PEER_BIN; without it stargaze runs alone).
 *
 * The node: BENCH_BUSY_IMAGES (25) images of BENCH_BUSY_LAYERS (20) distinct eStargz layers each, written by the
 * project's writer, BENCH_BUSY_FILES (4) small files a layer, over one shared eStargz busybox base so a container
 * runs in each (test/e2e/harness/busy-node.ts), pushed to a local registry: 500 distinct layers plus the base, 501
 * lazy mounts in all. Each arm is a fresh daemon (`noprefetch`, `no_background_fetch`, as layer-memory.ts) with a
 * fresh containerd (daemon-arm.ts `startDaemonWithContainerd`); the arms run side by side, image by image, their
 * order alternating. Per image and arm: `ctr-remote images rpull` (the same client for both), a check that every
 * layer so far is a FUSE mount under the daemon's root (`expectLazyMounts`), then `ctr run --rm` of the image with
 * `sha256sum` of one file per distinct layer, every sum checked against the build's. Every BENCH_BUSY_FOOTPRINT_EVERY
 * (5) images, and at the end, each daemon's RSS, PSS, threads and descriptors (footprint.ts, summed over stargaze's
 * daemon and FUSE server), 2 s after the step.
 *
 * Restart at that size (the same run, after the last image): per arm, SIGTERM to the daemon (the peer: SIGKILL, see
 * PEER_STOP_SIGNAL), then the same command with the same root again, timed from its spawn: until its socket
 * accepts, until a `Snapshots.List` sent straight to the socket (snapshots-client.ts) has streamed every snapshot,
 * and until one read per layer succeeded: for each image a View of its top snapshot sent straight to the socket,
 * mounted (overlay), `sha256sum` of its probes by a child process (checked), unmounted and the view removed. stargaze's FUSE server outlives its daemon and keeps
 * serving the mounts; the reference mounts every layer again before it listens.
 *
 * Both benchmark names share one run (the node is built once): `busy-node` reports the fill, `restart-at-size`
 * the restart; asking for either runs both parts.
 */
import { mkdir } from 'node:fs/promises';
import { loadavg } from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { CleanupStack, PEER_MISSING_NOTE, makeTmpRoot, peerBinary, run, startRegistry, type PeerDaemon, type StargazeDaemon } from '../../test/e2e/harness';
import { checkProbeSums, probeCommand, pushBusyImages, type BusyImage } from '../../test/e2e/harness/busy-node';
import { socketAccepts } from '../../test/e2e/harness/exec';
import { expectLazyMounts, startDaemonWithContainerd, type DaemonKind, type DaemonWithContainerd } from './daemon-arm';
import { footprintOfGroups, stargazeGroups, type Footprint } from './footprint';
import { snapshotsClient } from './snapshots-client';
import { median } from './startup';

const IMAGES = Number(process.env.BENCH_BUSY_IMAGES ?? 25);
const LAYERS_PER_IMAGE = Number(process.env.BENCH_BUSY_LAYERS ?? 20);
const FILES_PER_LAYER = Number(process.env.BENCH_BUSY_FILES ?? 4);
const FOOTPRINT_EVERY = Math.max(1, Number(process.env.BENCH_BUSY_FOOTPRINT_EVERY ?? 5));
const PROBE_BYTES = 4096;
/** Both daemons understand these keys: no prefetch at mount, no background fetch of the rest of each layer. */
const DAEMON_CONFIG = 'noprefetch = true\nno_background_fetch = true\n';
/** Wait before each footprint, so pull and run work has finished and transient garbage is collected. */
const SETTLE_MS = 2_000;
const STEP_TIMEOUT_MS = 600_000;
/** The reference mounts every layer again before it listens: give a restart of hundreds of layers time. */
const RESTART_TIMEOUT_MS = 600_000;
const POLL_MS = 5;
/**
 * How the peer is stopped for its restart: the reference 0.12 removes its remote snapshots' directories on SIGTERM
 * and then fails to start on that root (fatal "failed to restore remote snapshot ... bad mount point": seen by this
 * benchmark), so by default it is killed, as after a crash, and mounts everything again on start.
 * BENCH_PEER_STOP_SIGNAL=SIGTERM shows the failure.
 */
const PEER_STOP_SIGNAL = process.env.BENCH_PEER_STOP_SIGNAL ?? 'SIGKILL';
/** The RSS target at the node's full size: stargaze / reference. */
export const RSS_TARGET_RATIO = 1.3;

export interface FootprintRow {
  /** Images pulled and run so far. */
  images: number;
  /** Lazy (FUSE) mounts each daemon holds. */
  mounts: number;
  arms: Partial<Record<DaemonKind, Footprint>>;
}

export interface ImageRow {
  image: number;
  /** `ctr-remote images rpull`, ms. */
  pullMs: Partial<Record<DaemonKind, number>>;
  /** `ctr run --rm` of the probe reads, ms. */
  runMs: Partial<Record<DaemonKind, number>>;
}

export interface ArmSummary {
  arm: DaemonKind;
  idle: Footprint;
  final: Footprint;
  mounts: number;
  /** (final - idle) threads / mounts. */
  threadsPerMount: number;
  fdsPerMount: number;
  /** (final - idle) RSS KiB / mounts. */
  rssKibPerMount: number;
  pullMsMedian: number;
  pullMsMax: number;
  runMsMedian: number;
}

export interface RestartResult {
  arm: DaemonKind;
  /** How it was stopped: SIGTERM (stargaze), PEER_STOP_SIGNAL (the peer). */
  signal: string;
  /** SIGTERM until the daemon exited. */
  stopMs: number;
  /** From the new daemon's spawn: its socket accepts connections. */
  socketMs: number;
  /** From the spawn: a direct Snapshots.List streamed every snapshot. */
  listMs: number;
  /** From the spawn: one read per layer succeeded (every image's view mounted and its probes checked). */
  readsMs: number;
  snapshotsListed: number;
  layersRead: number;
  /** FUSE mounts under the root before the stop, and after the reads. */
  mountsBefore: number;
  mountsAfter: number;
  /** 2 s after the reads. */
  footprint: Footprint;
}

export interface BusyNodeResults {
  images: number;
  layersPerImage: number;
  filesPerLayer: number;
  /** Lazy mounts at the end: distinct layers plus the shared base. */
  mounts: number;
  /** Compressed bytes of the distinct layers. */
  distinctMib: number;
  imageRows: ImageRow[];
  footprints: FootprintRow[];
  summary: ArmSummary[];
  /** stargaze / peer RSS at full size; absent without the peer. */
  rssRatio?: number;
  restart: RestartResult[];
  notes: string[];
}

const msSince = (t0: bigint): number => Number(process.hrtime.bigint() - t0) / 1e6;
const load = (): string => loadavg().map((l) => l.toFixed(2)).join(' ');
const MIB = 1024 * 1024;

/** The process groups to measure: stargaze's daemon and its FUSE server, the peer's one process. */
async function groupsOf(d: DaemonWithContainerd): Promise<number[]> {
  if (d.kind === 'peer') return [d.daemon.pid()];
  const groups = await stargazeGroups(d.daemon.pid(), d.daemon.root);
  if (groups.length !== 2) throw new Error(`stargaze: no FUSE server pid under ${d.daemon.root}`);
  return groups;
}

async function footprintOf(d: DaemonWithContainerd): Promise<Footprint> {
  const groups = await groupsOf(d);
  const f = await footprintOfGroups(groups);
  if (f.pids.length < groups.length) throw new Error(`a ${d.kind} daemon process is gone (groups ${groups.join(', ')}; see ${d.daemon.logFile})`);
  return f;
}

async function fuseMounts(d: DaemonWithContainerd): Promise<number> {
  return (await d.daemon.mounts()).filter((m) => m.fstype.startsWith('fuse')).length;
}

/** SIGTERM, a start on the same root, then List and one read per layer, all straight on the daemon's socket. */
async function restartArm(d: DaemonWithContainerd, images: readonly BusyImage[], scope: CleanupStack): Promise<RestartResult> {
  const address = d.daemon.address;
  const before = snapshotsClient(address);
  const listed = await before.list().finally(() => before.close());
  const parents = images.map((img) => {
    const top = listed.find((s) => s.name === img.topChainId || s.name.endsWith(`/${img.topChainId}`));
    if (top === undefined) {
      const names = listed.map((s) => s.name).join('\n  ');
      throw new Error(`${d.kind}: no snapshot of ${img.ref}'s top layer ${img.topChainId} in List:\n  ${names}`);
    }
    return top.name;
  });
  const mountsBefore = await fuseMounts(d);

  const hard = d.kind === 'peer' && PEER_STOP_SIGNAL === 'SIGKILL';
  const stopStart = process.hrtime.bigint();
  if (d.kind === 'stargaze') await (d.daemon as StargazeDaemon).stop();
  else await (d.daemon as PeerDaemon).stop({ hard });
  const stopMs = msSince(stopStart);

  const spawned = process.hrtime.bigint();
  const restarted =
    d.kind === 'stargaze'
      ? (d.daemon as StargazeDaemon).restart({ until: 'socket' })
      : (d.daemon as PeerDaemon).restart({ hard, readyTimeoutMs: RESTART_TIMEOUT_MS });
  let failure: Error | undefined;
  restarted.catch((err: unknown) => (failure = err instanceof Error ? err : new Error(String(err)))); // awaited below
  while (!(await socketAccepts(address))) {
    if (failure !== undefined) throw failure;
    if (msSince(spawned) > RESTART_TIMEOUT_MS) throw new Error(`${d.kind}: socket ${address} not accepting after the restart`);
    await delay(POLL_MS);
  }
  const socketMs = msSince(spawned);

  const client = snapshotsClient(address);
  try {
    let snapshots = 0;
    for (;;) {
      try {
        snapshots = (await client.list(RESTART_TIMEOUT_MS)).length;
        break;
      } catch (err) {
        // a daemon that listens only once it serves may refuse the first connection attempt: ask again
        if (msSince(spawned) > RESTART_TIMEOUT_MS) throw err;
        await delay(POLL_MS);
      }
    }
    const listMs = msSince(spawned);

    const work = await makeTmpRoot(`restart-${d.kind}`, scope);
    let layersRead = 0;
    for (const [i, img] of images.entries()) {
      const key = `bench-restart-view-${i}`;
      const target = path.join(work, `view-${i}`);
      await mkdir(target);
      const mounts = await client.view(key, parents[i]!);
      for (const m of mounts) await run('mount', ['-t', m.type, m.source, target, '-o', m.options.join(',')]);
      try {
        // a child reads, never this process, and the host's sha256sum prints what busybox's does
        const sums = await run('sha256sum', img.probes.map((p) => target + p.path));
        checkProbeSums(sums.stdout, img.probes, target);
        layersRead += img.probes.length;
      } finally {
        await run('umount', [target]);
        await client.remove(key);
      }
    }
    const readsMs = msSince(spawned);
    await restarted;
    const mountsAfter = await fuseMounts(d);
    await delay(SETTLE_MS);
    return { arm: d.kind, signal: d.kind === 'peer' ? PEER_STOP_SIGNAL : 'SIGTERM', stopMs, socketMs, listMs, readsMs, snapshotsListed: snapshots, layersRead, mountsBefore, mountsAfter, footprint: await footprintOf(d) };
  } finally {
    client.close();
  }
}

let shared: Promise<BusyNodeResults> | undefined;

/** The busy node and its restart, run once per process whichever of the two benchmark names asked first. */
export function benchBusyNode(): Promise<BusyNodeResults> {
  return (shared ??= runBusyNode());
}

async function runBusyNode(): Promise<BusyNodeResults> {
  const kinds: DaemonKind[] = peerBinary() === undefined ? ['stargaze'] : ['stargaze', 'peer'];
  const notes = [
    `daemon config (both): ${DAEMON_CONFIG.trim().replace('\n', ', ')}; sums over stargaze's daemon + FUSE server, the peer's one process`,
    `load average at start: ${load()}`,
  ];
  if (!kinds.includes('peer')) notes.push(PEER_MISSING_NOTE);
  const scope = new CleanupStack();
  try {
    const registry = await startRegistry({ scope });
    const workDir = await makeTmpRoot('busy-node', scope);
    process.stdout.write(`  building and pushing ${IMAGES} images of ${LAYERS_PER_IMAGE} layers (+ busybox base)...\n`);
    const images = await pushBusyImages({
      host: registry.host,
      repo: 'bench/busy-node',
      images: IMAGES,
      layersPerImage: LAYERS_PER_IMAGE,
      filesPerLayer: FILES_PER_LAYER,
      probeBytes: PROBE_BYTES,
      workDir,
    });
    const arms: DaemonWithContainerd[] = [];
    for (const kind of kinds) arms.push(await startDaemonWithContainerd({ kind, scope, pullHost: registry.host, config: DAEMON_CONFIG }));
    await delay(SETTLE_MS);
    const idle = new Map<DaemonKind, Footprint>();
    for (const d of arms) idle.set(d.kind, await footprintOf(d));

    const imageRows: ImageRow[] = [];
    const footprints: FootprintRow[] = [];
    for (const [i, img] of images.entries()) {
      const row: ImageRow = { image: i, pullMs: {}, runMs: {} };
      for (const d of i % 2 === 0 ? arms : [...arms].reverse()) {
        const { containerd, snapshotter, namespace } = d;
        const t0 = process.hrtime.bigint();
        await containerd.rpull(img.ref, { snapshotter, namespace, timeoutMs: STEP_TIMEOUT_MS });
        row.pullMs[d.kind] = msSince(t0);
        await expectLazyMounts(d.kind, d.daemon, 1 + (i + 1) * LAYERS_PER_IMAGE);
        const t1 = process.hrtime.bigint();
        const r = await containerd.runContainer(img.ref, probeCommand(img.probes), { snapshotter, namespace, timeoutMs: STEP_TIMEOUT_MS });
        row.runMs[d.kind] = msSince(t1);
        checkProbeSums(r.stdout, img.probes);
      }
      imageRows.push(row);
      const cells = arms.map((d) => `${d.kind} rpull ${row.pullMs[d.kind]!.toFixed(0)} ms run ${row.runMs[d.kind]!.toFixed(0)} ms`).join(', ');
      let line = `  image ${String(i + 1).padStart(2)}: ${cells}`;
      if ((i + 1) % FOOTPRINT_EVERY === 0 || i === images.length - 1) {
        await delay(SETTLE_MS);
        const f: FootprintRow = { images: i + 1, mounts: await fuseMounts(arms[0]!), arms: {} };
        for (const d of arms) f.arms[d.kind] = await footprintOf(d);
        footprints.push(f);
        line += ` | ${arms.map((d) => `${d.kind} RSS ${(f.arms[d.kind]!.rssKib / 1024).toFixed(1)} MiB, ${f.arms[d.kind]!.threads} threads`).join(', ')}`;
      }
      process.stdout.write(`${line}\n`);
    }

    const last = footprints.at(-1)!;
    const summary: ArmSummary[] = arms.map((d) => {
      const i0 = idle.get(d.kind)!;
      const fin = last.arms[d.kind]!;
      const pulls = imageRows.map((r) => r.pullMs[d.kind]!);
      return {
        arm: d.kind,
        idle: i0,
        final: fin,
        mounts: last.mounts,
        threadsPerMount: (fin.threads - i0.threads) / last.mounts,
        fdsPerMount: (fin.fds - i0.fds) / last.mounts,
        rssKibPerMount: (fin.rssKib - i0.rssKib) / last.mounts,
        pullMsMedian: median(pulls),
        pullMsMax: Math.max(...pulls),
        runMsMedian: median(imageRows.map((r) => r.runMs[d.kind]!)),
      };
    });
    const [ours, peer] = summary;
    const rssRatio = ours && peer ? ours.final.rssKib / peer.final.rssKib : undefined;

    process.stdout.write('  restarting each daemon with its layers mounted...\n');
    const restart: RestartResult[] = [];
    for (const d of arms) restart.push(await restartArm(d, images, scope));
    notes.push(`load average at end: ${load()}`);
    return {
      images: IMAGES,
      layersPerImage: LAYERS_PER_IMAGE,
      filesPerLayer: FILES_PER_LAYER,
      mounts: last.mounts,
      distinctMib: images.reduce((n, img) => n + img.distinctBytes, 0) / MIB,
      imageRows,
      footprints,
      summary,
      ...(rssRatio === undefined ? {} : { rssRatio }),
      restart,
      notes,
    };
  } finally {
    await scope.run();
  }
}

const mib = (kib: number): string => (kib / 1024).toFixed(1);
const cell = (s: string): string => s.padStart(16);

/** `npm run bench -- busy-node`: prints the fill's table and returns what goes to bench-results/busy-node.json. */
export async function reportBusyNode(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the busy-node benchmark runs containerd and the daemons (FUSE): run it as root');
  process.stdout.write(`busy node: ${IMAGES} images x ${LAYERS_PER_IMAGE} eStargz layers (+ a shared busybox base), rpull + one run each, side by side\n`);
  const r = await benchBusyNode();
  const arms = r.summary;
  const row = (label: string, f: (a: ArmSummary) => string, ratio?: string): string =>
    `  ${label.padEnd(30)}${arms.map((a) => cell(f(a))).join('')}${ratio === undefined ? '' : cell(ratio)}\n`;
  const ratioOf = (f: (a: ArmSummary) => number): string | undefined => (arms.length === 2 ? `${(f(arms[0]!) / f(arms[1]!)).toFixed(2)}x` : undefined);
  process.stdout.write(`\n  ${r.mounts} lazy mounts, ${r.distinctMib.toFixed(1)} MiB of distinct layers\n`);
  process.stdout.write(`  ${''.padEnd(30)}${arms.map((a) => cell(a.arm)).join('')}${arms.length === 2 ? cell('stargaze/peer') : ''}\n`);
  process.stdout.write(row('idle RSS MiB (PSS)', (a) => `${mib(a.idle.rssKib)} (${mib(a.idle.pssKib)})`, ratioOf((a) => a.idle.rssKib)));
  process.stdout.write(row(`RSS MiB (PSS), ${r.mounts} mounts`, (a) => `${mib(a.final.rssKib)} (${mib(a.final.pssKib)})`, ratioOf((a) => a.final.rssKib)));
  process.stdout.write(row('RSS per mount KiB', (a) => a.rssKibPerMount.toFixed(0), ratioOf((a) => a.rssKibPerMount)));
  process.stdout.write(row('threads idle / end', (a) => `${a.idle.threads} / ${a.final.threads}`));
  process.stdout.write(row('threads per mount', (a) => a.threadsPerMount.toFixed(2)));
  process.stdout.write(row('fds idle / end', (a) => `${a.idle.fds} / ${a.final.fds}`));
  process.stdout.write(row('rpull ms median / max', (a) => `${a.pullMsMedian.toFixed(0)} / ${a.pullMsMax.toFixed(0)}`, ratioOf((a) => a.pullMsMedian)));
  process.stdout.write(row('run ms median', (a) => a.runMsMedian.toFixed(0), ratioOf((a) => a.runMsMedian)));
  process.stdout.write('\n  RSS (MiB) and threads as the node fills:\n');
  for (const f of r.footprints) {
    const cells = arms.map((a) => `${a.arm} ${mib(f.arms[a.arm]!.rssKib)} MiB ${f.arms[a.arm]!.threads} thr ${f.arms[a.arm]!.fds} fds`).join(' | ');
    process.stdout.write(`    ${String(f.images).padStart(2)} images, ${String(f.mounts).padStart(3)} mounts: ${cells}\n`);
  }
  if (r.rssRatio !== undefined) {
    process.stdout.write(`  RSS at ${r.mounts} mounts: stargaze/peer ${r.rssRatio.toFixed(2)}x (target <= ${RSS_TARGET_RATIO}x: ${r.rssRatio <= RSS_TARGET_RATIO ? 'met' : 'not met'})\n`);
  }
  for (const note of r.notes) process.stdout.write(`  note: ${note}\n`);
  const { restart: _restart, ...fill } = r;
  return fill;
}

/** `npm run bench -- restart-at-size`: prints the restart's table (the node is built by the same run as busy-node). */
export async function reportRestartAtSize(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the restart-at-size benchmark runs containerd and the daemons (FUSE): run it as root');
  process.stdout.write(`restart at size: SIGTERM and a start on the same root with ${IMAGES * LAYERS_PER_IMAGE + 1} layers mounted\n`);
  const r = await benchBusyNode();
  const rows = r.restart;
  const ratioOf = (f: (x: RestartResult) => number): string => (rows.length === 2 ? cell(`${(f(rows[0]!) / f(rows[1]!)).toFixed(2)}x`) : '');
  const row = (label: string, f: (x: RestartResult) => number, unit = 'ms'): string =>
    `  ${label.padEnd(36)}${rows.map((x) => cell(`${f(x).toFixed(0)} ${unit}`)).join('')}${ratioOf(f)}\n`;
  process.stdout.write(`  ${''.padEnd(36)}${rows.map((x) => cell(x.arm)).join('')}${rows.length === 2 ? cell('stargaze/peer') : ''}\n`);
  process.stdout.write(`  ${'stopped by'.padEnd(36)}${rows.map((x) => cell(x.signal)).join('')}\n`);
  process.stdout.write(row('stop (signal to exit)', (x) => x.stopMs));
  process.stdout.write(row('spawn to socket accepting', (x) => x.socketMs));
  process.stdout.write(row('spawn to Snapshots.List answered', (x) => x.listMs));
  process.stdout.write(row('spawn to one read per layer', (x) => x.readsMs));
  process.stdout.write(`  ${'snapshots listed / layers read'.padEnd(36)}${rows.map((x) => cell(`${x.snapshotsListed} / ${x.layersRead}`)).join('')}\n`);
  process.stdout.write(`  ${'FUSE mounts before / after'.padEnd(36)}${rows.map((x) => cell(`${x.mountsBefore} / ${x.mountsAfter}`)).join('')}\n`);
  process.stdout.write(`  ${'RSS MiB after the restart'.padEnd(36)}${rows.map((x) => cell(mib(x.footprint.rssKib))).join('')}\n`);
  if (rows.length === 2) {
    const met = rows[0]!.listMs <= rows[1]!.listMs && rows[0]!.readsMs <= rows[1]!.readsMs;
    process.stdout.write(`  target (List and reads <= the reference's): ${met ? 'met' : 'not met'}\n`);
  }
  for (const note of r.notes) process.stdout.write(`  note: ${note}\n`);
  return { images: r.images, layersPerImage: r.layersPerImage, mounts: r.mounts, restart: r.restart, notes: r.notes };
}
