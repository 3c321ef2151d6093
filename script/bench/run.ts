/**
 * `npm run bench`: runs the benchmarks and prints their numbers; results also go to bench-results/
 * (git-ignored) as JSON, so runs can be compared. Pick benchmarks by name: `npm run bench -- registry-fetch`
 * or BENCH=read-throughput,registry-fetch (default: all but the slow ones in OPT_IN, which run only when named).
 */
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { benchReadThroughput } from './read-throughput';
import { benchRegistryFetch } from './registry-fetch';
import { METRICS, METRIC_LABELS, benchLayerMemory } from './layer-memory';
import { benchStartup } from './startup';
import { benchRpullDownload } from './rpull-download';
import { benchReadDisk } from './read-disk';
import { benchFirstRead } from './first-read';
import { benchRpullConcurrent } from './rpull-concurrent';
import { benchSnapshotScale, snapshotScaleTable } from './snapshot-scale';
import { reportBusyNode, reportRestartAtSize } from './busy-node';
import { reportSoak } from './soak';

const BENCHES: Record<string, () => Promise<Record<string, unknown>>> = {
  'read-throughput': runReadThroughput,
  'registry-fetch': runRegistryFetch,
  'layer-memory': runLayerMemory,
  startup: runStartup,
  'rpull-download': runRpullDownload,
  'read-disk': runReadDisk,
  'first-read': runFirstRead,
  'rpull-concurrent': runRpullConcurrent,
  'snapshot-scale': runSnapshotScale,
  'busy-node': reportBusyNode,
  'restart-at-size': reportRestartAtSize,
  soak: reportSoak,
};

/** Slow benchmarks (minutes each): run only when named, `npm run bench -- busy-node restart-at-size soak`. */
const OPT_IN = new Set(['busy-node', 'restart-at-size', 'soak']);

async function runSnapshotScale(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the snapshot-scale benchmark runs the daemons (FUSE server): run it as root');
  process.stdout.write('snapshot scale: committed snapshots created, listed, statted straight on each daemon\'s socket (no containerd)\n');
  const r = await benchSnapshotScale(); // prints its samples as they come
  process.stdout.write(`\n  ${r.snapshots} snapshots in chains of ${r.chain}; medians of ${r.repeats} passes per sample\n${snapshotScaleTable(r)}\n`);
  for (const note of r.notes) process.stdout.write(`  note: ${note}\n`);
  return { ...r };
}

async function runRpullDownload(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the rpull-download benchmark runs containerd and the daemon: run it as root');
  process.stdout.write('rpull download: plain-gzip image, stargaze rpull (parallel ranges) vs ctr images pull, per-connection cap\n');
  const { results, notes, commands } = await benchRpullDownload();
  for (const r of results) process.stdout.write(`  ${r.case.padEnd(58)} ${r.seconds.toFixed(2).padStart(7)} s\n`);
  for (const note of notes) process.stdout.write(`  note: ${note}\n`);
  for (const c of commands) process.stdout.write(`  command: ${c}\n`);
  return { results, notes, commands };
}

async function runRpullConcurrent(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the rpull-concurrent benchmark runs containerd and the daemon: run it as root');
  const pulls = Number(process.env.BENCH_CONCURRENT_PULLS ?? 20);
  process.stdout.write(`rpull concurrent: 1 vs ${pulls} concurrent rpulls of one eStargz image, fresh containerd + daemon each (median of ${process.env.BENCH_SAMPLES ?? 3})\n`);
  const r = await benchRpullConcurrent();
  const fuse = [...new Set(r.concurrent.map((s) => s.fuseMounts))].join('/');
  process.stdout.write(`  link ${r.link}, ${r.layers} layers\n`);
  process.stdout.write(`  1 rpull              ${(r.singleMedianMs / 1000).toFixed(2).padStart(7)} s\n`);
  process.stdout.write(`  ${String(r.pulls).padEnd(2)} concurrent rpulls ${(r.concurrentMedianMs / 1000).toFixed(2).padStart(7)} s  ratio ${r.ratio.toFixed(2)}x (target <= 1.5x)\n`);
  process.stdout.write(`  FUSE mounts after the concurrent pulls: ${fuse} (layers: ${r.layers})\n`);
  for (const note of r.notes) process.stdout.write(`  note: ${note}\n`);
  return { ...r };
}

async function runReadDisk(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the read-disk benchmark mounts FUSE and overlayfs: run it as root');
  const fileMib = Number(process.env.BENCH_FILE_MIB ?? 256);
  process.stdout.write(`read from disk cache: sequential dd of a ${fileMib} MiB file (median of ${process.env.BENCH_SAMPLES ?? 3})\n`);
  const { results, notes } = await benchReadDisk();
  for (const r of results) process.stdout.write(`  ${r.case.padEnd(78)} ${r.mibPerSec.toFixed(0).padStart(6)} MiB/s  (${r.seconds.toFixed(3)} s)\n`);
  for (const note of notes) process.stdout.write(`  note: ${note}\n`);
  return { fileMib, results, notes };
}

async function runFirstRead(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the first-read benchmark mounts FUSE: run it as root');
  process.stdout.write(`first read: mount -> cat of prioritized small files, with and without prefetch (median of ${process.env.BENCH_SAMPLES ?? 5})\n`);
  const { results, notes } = await benchFirstRead();
  const ms = (x: number, width: number): string => `${x.toFixed(1).padStart(width)} ms`;
  let daemonHeader = false;
  for (const r of results) {
    if (r.arm === 'in-process') {
      process.stdout.write(
        `  ${r.case.padEnd(44)} mount->cat ${ms(r.mountToReadMs, 7)}  cat ${ms(r.catMs, 7)}  check ${ms(r.checkMs, 6)}  requests ${r.requests}\n`,
      );
      continue;
    }
    if (!daemonHeader) {
      daemonHeader = true;
      process.stdout.write('  daemons (fresh containerd + daemon per sample; pull->read = rpull + mount + read):\n');
    }
    const ratio = r.stargazeOverPeer
      ? `  stargaze/peer ${r.stargazeOverPeer.pullToRead.toFixed(2)}x (read ${r.stargazeOverPeer.read.toFixed(2)}x)`
      : '';
    process.stdout.write(
      `  ${r.case.padEnd(68)} pull->read ${ms(r.pullToReadMs, 7)}  read ${ms(r.catMs, 7)}  rpull ${ms(r.pullMs, 6)}  mount ${ms(r.mountMs, 6)}  ` +
        `requests ${String(r.requests).padStart(3)} (read ${String(r.readRequests).padStart(3)})${ratio}\n`,
    );
  }
  if (results.some((r) => r.arm === 'stargaze' && r.stargazeOverPeer)) {
    process.stdout.write('  note: stargaze/peer = stargaze ms / peer ms (medians): below 1 = stargaze faster\n');
  }
  for (const note of notes) process.stdout.write(`  note: ${note}\n`);
  return { results, notes };
}

async function runStartup(): Promise<Record<string, unknown>> {
  process.stdout.write('startup (HelloBench method): pull / create / run of Debian-built images, legacy vs lazy vs lazy-opt (vs peer, peer-opt)\n');
  const { rows, notes, table } = await benchStartup(); // prints its samples as they come
  process.stdout.write('\n' + table + '\n');
  for (const note of notes) process.stdout.write(`  note: ${note}\n`);
  process.stdout.write('  (also bench-results/startup.md and startup.svg)\n');
  return { rows, notes };
}

async function runLayerMemory(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the layer-memory benchmark runs containerd and the daemons (FUSE): run it as root');
  process.stdout.write('layer memory: whole daemons (stargaze: daemon + FUSE server; peer: containerd-stargz-grpc), idle, layers mounted, after reads\n');
  const { results, notes } = await benchLayerMemory(); // prints its samples as they come
  const ratio = results.ratio;
  const cell = (s: string): string => s.padStart(14);
  process.stdout.write(
    `\n  ${results.layers} layers x ${results.filesPerLayer} files (${results.imageMib.toFixed(1)} MiB), median of ${results.samples}\n` +
      `  ${''.padEnd(24)}${results.arms.map((a) => cell(a.arm)).join('')}${ratio ? cell('stargaze/peer') : ''}\n`,
  );
  for (const key of METRICS) {
    process.stdout.write(
      `  ${METRIC_LABELS[key].padEnd(24)}` +
        results.arms.map((a) => cell(a.median[key].toFixed(1))).join('') +
        (ratio ? cell(ratio[key] === null ? 'n/a' : `${ratio[key].toFixed(2)}x`) : '') +
        '\n',
    );
  }
  const fixed = results.fixedCost;
  if (fixed) {
    const mib = (n: number): string => `${n.toFixed(1)} MiB`;
    process.stdout.write(
      `\n  fixed cost (stargaze): idle RSS ${mib(fixed.idleRssMib)} vs floor + ${fixed.budgetMib} MiB = ${mib(fixed.floorRssMib + fixed.budgetMib)}: ` +
        `${mib(fixed.overFloorMib)} over the floor (target <= ${fixed.budgetMib} MiB: ${fixed.withinBudget ? 'met' : 'not met'})\n` +
        `    floor: two empty Node processes, RSS ${mib(fixed.floorRssMib)} (PSS ${mib(fixed.floorPssMib)})\n` +
        `    daemon      ${mib(fixed.daemonRssMib)} vs its floor ${mib(fixed.daemonFloorRssMib)}\n` +
        `    FUSE server ${mib(fixed.fuseServerRssMib)} vs its floor ${mib(fixed.fuseServerFloorRssMib)}\n`,
    );
  }
  for (const note of notes) process.stdout.write(`  note: ${note}\n`);
  return { results, notes };
}

async function runReadThroughput(): Promise<Record<string, unknown>> {
  if (process.getuid?.() !== 0) throw new Error('the read-throughput benchmark mounts FUSE and overlayfs: run it as root');
  const fileMib = Number(process.env.BENCH_FILE_MIB ?? 256);
  process.stdout.write(`read throughput: sequential dd of a ${fileMib} MiB file (median of ${process.env.BENCH_SAMPLES ?? 3})\n`);
  const { results, notes } = await benchReadThroughput();
  for (const r of results) {
    const ratio = r.stargazeOverPeer === undefined ? '' : `  stargaze/peer ${r.stargazeOverPeer.toFixed(2)}x`;
    process.stdout.write(`  ${r.case.padEnd(50)} ${r.mibPerSec.toFixed(0).padStart(6)} MiB/s  (${r.seconds.toFixed(3)} s)${ratio}\n`);
  }
  if (results.some((r) => r.stargazeOverPeer !== undefined)) {
    process.stdout.write('  note: stargaze/peer = stargaze MiB/s / peer MiB/s (medians): above 1 = stargaze faster\n');
  }
  for (const note of notes) process.stdout.write(`  note: ${note}\n`);
  return { fileMib, results, notes };
}

async function runRegistryFetch(): Promise<Record<string, unknown>> {
  const { results, notes } = await benchRegistryFetch(); // prints its rows as they come
  for (const note of notes) process.stdout.write(`  note: ${note}\n`);
  return { results, notes };
}

async function main(): Promise<void> {
  const wanted = [...process.argv.slice(2), ...(process.env.BENCH ?? '').split(',')].map((s) => s.trim()).filter((s) => s !== '');
  const names = wanted.length > 0 ? wanted : Object.keys(BENCHES).filter((name) => !OPT_IN.has(name));
  for (const name of names) if (BENCHES[name] === undefined) throw new Error(`unknown benchmark ${name}; known: ${Object.keys(BENCHES).join(', ')}`);
  const outDir = path.resolve(__dirname, '..', '..', '..', 'bench-results');
  await mkdir(outDir, { recursive: true });
  for (const name of names) {
    const out = await (BENCHES[name] as () => Promise<Record<string, unknown>>)();
    await writeFile(path.join(outDir, `${name}.json`), JSON.stringify({ date: new Date().toISOString(), ...out }, null, 2));
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
