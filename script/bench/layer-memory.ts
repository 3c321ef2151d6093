/**
 * Memory of mounted layers: the serving process's RSS with N layers mounted (default 50), each with many
 * files (the TOC metadata is what grows with layers), before and after a file of each is read.
 *
 * Knobs: BENCH_LAYERS (default 50), BENCH_FILES_PER_LAYER (default 2000).
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable, Writable } from 'node:stream';
import { promisify } from 'node:util';
import tarStream from 'tar-stream';
import { defaultConfig } from '../../src/config/config';
import { writeEstargz } from '../../src/estargz/writer';
import { StargazeFileSystem } from '../../src/fs/stargz-fs';
import { log } from '../../src/log';
import { BufferBlobSource } from '../../src/remote/blob-source';
import { STARGZ_DIGEST, STARGZ_REFERENCE, TARGET_SNAPSHOT_REF, TOC_DIGEST } from '../../src/source/labels';

const run = promisify(execFile);
const LAYERS = Number(process.env.BENCH_LAYERS ?? 50);
const FILES = Number(process.env.BENCH_FILES_PER_LAYER ?? 2000);
const MIB = 1024 * 1024;

async function layerBlob(index: number): Promise<{ blob: Buffer; tocDigest: string }> {
  const pack = tarStream.pack();
  for (let i = 0; i < FILES; i++) {
    pack.entry({ name: `usr/lib/layer${index}/dir${i % 50}/file-${i}.so`, mode: 0o644 }, `layer ${index} file ${i}\n`.repeat(8));
  }
  pack.finalize();
  const parts: Buffer[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb): void {
      parts.push(chunk);
      cb();
    },
  });
  const result = await writeEstargz(Readable.from(pack as AsyncIterable<Buffer>), sink, { compressionLevel: 1 });
  return { blob: Buffer.concat(parts), tocDigest: result.tocDigest };
}

function rssMib(): number {
  return process.memoryUsage().rss / MIB;
}

export async function benchLayerMemory(): Promise<{ results: Record<string, number>; notes: string[] }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-bench-mem-'));
  const quiet = log.child({ module: 'bench' });
  quiet.level = 'warn';
  const blobs = new Map<string, BufferBlobSource>();
  const config = { ...defaultConfig(), noBackgroundFetch: true, noPrefetch: true };
  const fsys = new StargazeFileSystem({
    registry: { resolveBlob: async (_ref, digest) => blobs.get(digest) ?? Promise.reject(new Error('no blob')) },
    config,
    log: quiet,
  });
  const mounts: string[] = [];
  try {
    const layers = [];
    for (let i = 0; i < LAYERS; i++) layers.push(await layerBlob(i));
    let blobBytes = 0;
    for (const { blob } of layers) blobBytes += blob.length;
    global.gc?.();
    const before = rssMib();
    for (const [i, { blob, tocDigest }] of layers.entries()) {
      const digest = 'sha256:' + createHash('sha256').update(blob).digest('hex');
      blobs.set(digest, new BufferBlobSource(digest, blob));
      const mnt = path.join(dir, `l${i}`);
      await mkdir(mnt);
      await fsys.mount(mnt, {
        [TARGET_SNAPSHOT_REF]: `sha256:${i}`,
        [STARGZ_REFERENCE]: 'bench.local/mem:1',
        [STARGZ_DIGEST]: digest,
        [TOC_DIGEST]: tocDigest,
      });
      mounts.push(mnt);
    }
    global.gc?.();
    const mounted = rssMib();
    // Read one file of every layer from a child process (this one serves the mounts).
    await run('sh', ['-c', mounts.map((m, i) => `cat ${m}/usr/lib/layer${i}/dir1/file-1.so >/dev/null`).join(' && ')]);
    global.gc?.();
    const afterReads = rssMib();
    const results = {
      layers: LAYERS,
      filesPerLayer: FILES,
      rssBeforeMountsMib: before,
      rssWithLayersMountedMib: mounted,
      rssAfterReadsMib: afterReads,
      perLayerKib: ((mounted - before) * 1024) / LAYERS,
      blobsHeldByTheBenchMib: blobBytes / MIB,
    };
    return {
      results,
      notes: ['the blobs themselves are held in memory by the benchmark (no registry): they are part of the "before" RSS'],
    };
  } finally {
    await fsys.close();
    await rm(dir, { recursive: true, force: true });
  }
}
