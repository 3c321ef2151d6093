/**
 * A plain-gzip image whose big layer `stargaze rpull` must download itself (not eStargz: no lazy mount;
 * rpull fetches it with parallel range requests and has containerd apply it), against `ctr images pull`
 * of the same image, both through a per-connection bandwidth cap (issue 4's target: rpull <= 0.25x ctr).
 *
 * Real parts (test/e2e/harness): Debian's docker-registry on loopback; script/bench/throttle-proxy.ts as its
 * own process in front of it (default 80 Mbit/s per connection); for each run a NEW containerd (fresh root,
 * content store and snapshots: the state is cleared between runs), and for rpull a new stargaze daemon as
 * its `stargz` proxy snapshotter (no background fetch). `ctr images pull` unpacks on overlayfs, rpull on
 * the stargz snapshotter. Timed: the wall time of the `stargaze rpull` / `ctr images pull` process.
 *
 * The image: busybox (base layer) + one upper layer holding one file of incompressible bytes (gzip keeps
 * the layer at ~its size).
 *
 * Knobs: BENCH_LAYER_MIB (default 150), BENCH_CAP_MBIT (default 80), BENCH_SAMPLES (default 1; cases take
 * turns: ctr, rpull, ctr, rpull, ...).
 * BENCH_DEBUG=1 prints rpull's per-layer download and apply times; BENCH_RPULL_ONLY=1 skips ctr.
 */
import { performance } from 'node:perf_hooks';
import {
  CleanupStack,
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  buildBusyboxImage,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  withHost,
  type RunResult,
} from '../../test/e2e/harness';
import { startThrottle } from './registry-fetch';

const MIB = 1024 * 1024;
const LAYER_MIB = Number(process.env.BENCH_LAYER_MIB ?? 150);
const CAP_MBIT = Number(process.env.BENCH_CAP_MBIT ?? 80);
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 1);
const PULL_TIMEOUT_MS = 15 * 60_000;
/** BENCH_DEBUG=1: rpull logs at debug level, and its per-layer download/apply timings are printed. */
const DEBUG = process.env.BENCH_DEBUG === '1';
/** BENCH_RPULL_ONLY=1: skip ctr (for profiling rpull alone; no ratio). */
const RPULL_ONLY = process.env.BENCH_RPULL_ONLY === '1';
const RPULL_ENV = DEBUG ? { STARGAZE_LOG_LEVEL: 'debug' } : {};

export interface RpullDownloadResult {
  case: string;
  /** Median wall seconds of the pull command. */
  seconds: number;
  samples: number;
  allSeconds: number[];
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;

function check(r: RunResult, what: string): void {
  if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}):\n${r.stderr}\n${r.stdout}`);
}

export async function benchRpullDownload(): Promise<{ results: RpullDownloadResult[]; notes: string[]; commands: string[] }> {
  const notes: string[] = [];
  const commands: string[] = [];
  const cleanup = new CleanupStack();
  try {
    const registry = await startRegistry({ scope: cleanup });
    process.stdout.write(`  building and pushing busybox + a ${LAYER_MIB} MiB incompressible file (plain gzip)...\n`);
    const img = await buildBusyboxImage({
      host: registry.host,
      repo: 'bench/rpull-download',
      tag: 'v1',
      layers: [[{ path: '/data/big.bin', content: { random: LAYER_MIB * MIB, seed: 'rpull-download' } }]],
    });
    const layerBytes = img.layers.map((l) => l.size);
    notes.push(`image ${img.ref}: layers (compressed) ${layerBytes.map((b) => `${(b / MIB).toFixed(1)} MiB`).join(' + ')}`);
    const capBytes = (CAP_MBIT * 1_000_000) / 8;
    const throttle = await startThrottle(registry.host, capBytes);
    cleanup.after(() => throttle.stop());
    const ref = withHost(img.ref, throttle.host);
    commands.push(`node dist/script/bench/throttle-proxy.js <port> ${registry.host} ${capBytes}`);

    const ctrPull = async (): Promise<number> => {
      const local = new CleanupStack();
      try {
        const containerd = await startContainerd({ scope: local });
        const ns = containerd.newNamespace('bench-ctr');
        const t0 = performance.now();
        const r = await containerd.ctr(['images', 'pull', '--plain-http', ref], { namespace: ns, allowFailure: true, timeoutMs: PULL_TIMEOUT_MS });
        const s = (performance.now() - t0) / 1000;
        check(r, 'ctr images pull');
        if (commands.length < 3) commands.push(`ctr --address <fresh containerd> --namespace ${ns} images pull --plain-http ${ref}`);
        return s;
      } finally {
        await local.run();
      }
    };
    let rpullOut = '';
    const rpull = async (): Promise<number> => {
      const local = new CleanupStack();
      try {
        const daemon = await startDaemon({ scope: local, logLevel: 'warn', plainHttpHosts: [registry.host, throttle.host], config: 'no_background_fetch = true\n' });
        const containerd = await startContainerd({ scope: local, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
        const ns = containerd.newNamespace('bench-rpull');
        const args = ['rpull', '--pull-address', daemon.pullAddress, '--address', containerd.address, '--namespace', ns, '--plain-http', ref];
        const t0 = performance.now();
        const r = await run(STARGAZE_COMMAND, args, { allowFailure: true, timeoutMs: PULL_TIMEOUT_MS, env: { ...STARGAZE_COMMAND_ENV, ...RPULL_ENV } });
        const s = (performance.now() - t0) / 1000;
        check(r, 'stargaze rpull');
        if (DEBUG) process.stdout.write(r.stderr.split('\n').filter((l) => /layer (applied|downloaded)/.test(l)).map((l) => `    ${l}\n`).join(''));
        rpullOut = r.stdout;
        if (!/fetched \d+ bytes/.test(r.stdout)) throw new Error(`rpull did not download the layers itself:\n${r.stdout}`);
        if (commands.length < 4) commands.push(`script/stargaze rpull --address <fresh containerd> --namespace ${ns} --plain-http ${ref}`);
        return s;
      } finally {
        await local.run();
      }
    };

    const tCtr: number[] = [];
    const tRpull: number[] = [];
    for (let i = 0; i < SAMPLES; i++) {
      if (!RPULL_ONLY) {
        tCtr.push(await ctrPull());
        process.stdout.write(`  ctr images pull: ${tCtr[tCtr.length - 1]!.toFixed(2)} s\n`);
      }
      tRpull.push(await rpull());
      process.stdout.write(`  stargaze rpull:  ${tRpull[tRpull.length - 1]!.toFixed(2)} s\n`);
    }
    notes.push(`rpull output (last run): ${rpullOut.trim().replace(/\n/g, ' | ')}`);
    const results: RpullDownloadResult[] = [
      ...(tCtr.length > 0 ? [{ case: `ctr images pull (overlayfs), ${CAP_MBIT} Mbit/s per connection`, seconds: median(tCtr), samples: SAMPLES, allSeconds: tCtr }] : []),
      { case: `stargaze rpull (stargz), ${CAP_MBIT} Mbit/s per connection`, seconds: median(tRpull), samples: SAMPLES, allSeconds: tRpull },
    ];
    if (tCtr.length > 0) notes.push(`rpull / ctr = ${(median(tRpull) / median(tCtr)).toFixed(3)} (target <= 0.25)`);
    return { results, notes, commands };
  } finally {
    await cleanup.run();
  }
}
