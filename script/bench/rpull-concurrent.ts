/**
 * Concurrent rpull benchmark (`npm run bench -- rpull-concurrent`; root needed): the time of one `stargaze rpull`
 * of an eStargz image against 20 of the same image started at once, through link-proxy.ts (default 20 ms round
 * trip, 200 Mbit/s shared), each on a fresh containerd and daemon so every sample pulls cold. Issue #3 asks that
 * the 20 all succeed, finish within 1.5x the time of one, and leave exactly one FUSE mount per layer.
 *
 * The image is busybox plus small upper layers (harness buildBusyboxImage), converted by ctr-remote: the point is
 * the pull's own cost (gRPC, locks, Prepare, footer/TOC fetch and mount), not bulk data.
 *
 * Reported per sample: wall time of the one pull; wall time until the last of the 20 finished; their ratio; FUSE
 * mounts under the daemon root after the 20 (must equal the layer count). The numbers are medians.
 *
 * Knobs (environment):
 *   BENCH_SAMPLES=3                       samples of each case
 *   BENCH_CONCURRENT_PULLS=20
 *   BENCH_CONCURRENT_LINK=20ms-200mbit    `direct` or `<rtt>ms-<rate>mbit`
 *   BENCH_CONCURRENT_LAYERS=3             image layers (busybox base + small upper layers)
 */
import { loadavg } from 'node:os';
import {
  CleanupStack,
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  buildBusyboxImage,
  convertToEstargz,
  mountsUnder,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  type RunResult,
} from '../../test/e2e/harness';
import { median, parseLinks, startLinkProxy } from './startup';

const RPULL_TIMEOUT_MS = 300_000;

export interface ConcurrentSample {
  /** Wall time of the pull(s), from spawning the first to the exit of the last. */
  ms: number;
  /** Each pull's own wall time. */
  each: number[];
  /** FUSE mounts under the daemon root afterwards. */
  fuseMounts: number;
}

export interface RpullConcurrentResult {
  link: string;
  pulls: number;
  layers: number;
  single: ConcurrentSample[];
  concurrent: ConcurrentSample[];
  singleMedianMs: number;
  concurrentMedianMs: number;
  ratio: number;
  notes: string[];
}

const load = (): string => loadavg().map((l) => l.toFixed(2)).join(' ');

export async function benchRpullConcurrent(): Promise<RpullConcurrentResult> {
  const samples = Number(process.env.BENCH_SAMPLES ?? 3);
  const pulls = Number(process.env.BENCH_CONCURRENT_PULLS ?? 20);
  const layerCount = Math.max(1, Number(process.env.BENCH_CONCURRENT_LAYERS ?? 3));
  const [link] = parseLinks(process.env.BENCH_CONCURRENT_LINK ?? '20ms-200mbit');
  if (link === undefined) throw new Error('BENCH_CONCURRENT_LINK names no link');
  const notes = [`load average at start: ${load()}`];
  const cleanup = new CleanupStack();
  const single: ConcurrentSample[] = [];
  const concurrent: ConcurrentSample[] = [];
  try {
    const registry = await startRegistry({ scope: cleanup });
    const pullHost = link.bps === 0 ? registry.countingHost : await startLinkProxy(registry.countingHost, link, cleanup);
    // Build and convert once, on a containerd of its own.
    const setup = new CleanupStack();
    let repoTag: string;
    try {
      const containerd = await startContainerd({ scope: setup });
      const upper = Array.from({ length: layerCount - 1 }, (_, i) => [{ path: `/layer${i + 1}.txt`, content: `layer ${i + 1}\n` }]);
      const base = await buildBusyboxImage({ host: registry.host, repo: 'bench/concurrent', tag: 'plain', layers: upper });
      await convertToEstargz(containerd, base.ref, `${registry.host}/bench/concurrent:esgz`);
      repoTag = 'bench/concurrent:esgz';
    } finally {
      await setup.run();
    }
    const ref = `${pullHost}/${repoTag}`;

    /** `n` rpulls at once on a fresh containerd + daemon. */
    const sample = async (n: number): Promise<ConcurrentSample> => {
      const scope = new CleanupStack();
      try {
        const daemon = await startDaemon({ scope, logLevel: 'info', plainHttpHosts: [pullHost] });
        const containerd = await startContainerd({ scope, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
        const ns = containerd.newNamespace('bench');
        const started = Date.now();
        const results: RunResult[] = await Promise.all(
          Array.from({ length: n }, () =>
            run(STARGAZE_COMMAND, ['rpull', '--pull-address', daemon.pullAddress, '--address', containerd.address, '--namespace', ns, '--plain-http', ref], {
              env: STARGAZE_COMMAND_ENV,
              timeoutMs: RPULL_TIMEOUT_MS,
              allowFailure: true,
            }),
          ),
        );
        const ms = Date.now() - started;
        const failed = results.filter((r) => r.code !== 0);
        if (failed.length > 0) throw new Error(`${failed.length} of ${n} rpulls failed; first:\n${failed[0]!.stderr}`);
        const fuseMounts = (await mountsUnder(daemon.root)).filter((m) => m.fstype.startsWith('fuse')).length;
        return { ms, each: results.map((r) => r.durationMs), fuseMounts };
      } finally {
        await scope.run();
      }
    };

    for (let s = 0; s < samples; s++) {
      // alternate the order so drift in the machine's load hits both cases alike
      const order = s % 2 === 0 ? [1, pulls] : [pulls, 1];
      for (const n of order) {
        const r = await sample(n);
        (n === 1 ? single : concurrent).push(r);
        process.stdout.write(
          `  #${s + 1} ${String(n).padStart(2)} rpull${n === 1 ? ' ' : 's'}: ${(r.ms / 1000).toFixed(2)} s` +
            (n > 1 ? ` (each: median ${(median(r.each) / 1000).toFixed(2)} s, max ${(Math.max(...r.each) / 1000).toFixed(2)} s)` : '') +
            `, ${r.fuseMounts} FUSE mounts, load ${load()}\n`,
        );
      }
    }
  } finally {
    await cleanup.run();
  }
  notes.push(`load average at end: ${load()}`);
  const singleMedianMs = median(single.map((s) => s.ms));
  const concurrentMedianMs = median(concurrent.map((s) => s.ms));
  return {
    link: link.name,
    pulls,
    layers: layerCount,
    single,
    concurrent,
    singleMedianMs,
    concurrentMedianMs,
    ratio: concurrentMedianMs / singleMedianMs,
    notes,
  };
}
