/**
 * `npm run bench`: runs the benchmarks and prints their numbers; results also go to bench-results/
 * (git-ignored) as JSON, so runs can be compared.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { benchReadThroughput } from './read-throughput';

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('the benchmarks mount FUSE and overlayfs: run them as root');
  const fileMib = Number(process.env.BENCH_FILE_MIB ?? 256);
  process.stdout.write(`read throughput: sequential dd of a ${fileMib} MiB file (median of ${process.env.BENCH_SAMPLES ?? 3})\n`);
  const { results, notes } = await benchReadThroughput();
  for (const r of results) process.stdout.write(`  ${r.case.padEnd(50)} ${r.mibPerSec.toFixed(0).padStart(6)} MiB/s  (${r.seconds.toFixed(3)} s)\n`);
  for (const note of notes) process.stdout.write(`  note: ${note}\n`);
  const outDir = path.resolve(__dirname, '..', '..', '..', 'bench-results');
  await mkdir(outDir, { recursive: true });
  await writeFile(path.join(outDir, 'read-throughput.json'), JSON.stringify({ date: new Date().toISOString(), fileMib, results, notes }, null, 2));
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exitCode = 1;
});
