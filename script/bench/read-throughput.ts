/**
 * Sequential read of one large file through a lazily mounted layer, against the same file in an overlayfs
 * mount of the unpacked layer (what containerd's overlayfs snapshotter would give).
 *
 * Cases:
 *  - stargaze, cold: chunks inflated and verified from the blob (held in memory: no network in this number);
 *  - stargaze, chunk cache warm: every chunk in our memory cache, kernel page cache dropped;
 *  - stargaze, page cache warm: the kernel serves it, FUSE is not asked;
 *  - overlayfs, page cache dropped, and page cache warm.
 * Reads are done by `dd` in a child process: this process serves the FUSE mount, so its own fs calls must
 * never enter it.
 *
 * Knobs: BENCH_FILE_MIB (default 256), BENCH_SAMPLES (default 3).
 */
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createHash } from 'node:crypto';
import tarStream from 'tar-stream';

import { defaultConfig } from '../../src/config/config';
import { writeEstargz } from '../../src/estargz/writer';
import { StargazeFileSystem } from '../../src/fs/stargz-fs';
import { log } from '../../src/log';
import { BufferBlobSource } from '../../src/remote/blob-source';
import { STARGZ_DIGEST, STARGZ_REFERENCE, TARGET_SNAPSHOT_REF, TOC_DIGEST } from '../../src/source/labels';

const MIB = 1024 * 1024;
const FILE_MIB = Number(process.env.BENCH_FILE_MIB ?? 256);
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 3);
/** Fast gzip keeps the setup short; compression level does not change what the read path does. */
const BENCH_COMPRESSION_LEVEL = 1;
export const FILE_NAME = 'data/big.bin';
/** Many small files beside the big one, as a container's root holds: warm reads of them are open-bound. */
export const SMALL_DIR = 'data/small';
export const SMALL_FILES = Number(process.env.BENCH_SMALL_FILES ?? 2000);
export const SMALL_FILE_BYTES = 8192;

export interface ReadResult {
  case: string;
  mibPerSec: number;
  seconds: number;
}

export function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(' ')}: exit ${code}: ${out}`))));
  });
}

/** Mildly compressible content: a pseudo-random 1 MiB block with per-block variation, as binaries look. */
function fileContent(sizeBytes: number): Readable {
  let produced = 0;
  const block = createHash('sha512');
  return new Readable({
    read(): void {
      if (produced >= sizeBytes) return void this.push(null);
      const buf = Buffer.alloc(Math.min(MIB, sizeBytes - produced));
      let seed = block.copy().update(String(produced)).digest();
      for (let i = 0; i < buf.length; i += 64) {
        if (i % 4096 === 0) seed = createHash('sha512').update(seed).digest();
        seed.copy(buf, i, 0, Math.min(32, buf.length - i));
      }
      produced += buf.length;
      this.push(buf);
    },
  });
}

export async function buildLayer(dir: string): Promise<{ blob: Buffer; tocDigest: string; tarPath: string }> {
  const tarPath = path.join(dir, 'layer.tar');
  const pack = tarStream.pack();
  const written = pipeline(pack, createWriteStream(tarPath));
  pack.entry({ name: 'data/', type: 'directory', mode: 0o755 });
  const size = FILE_MIB * MIB;
  const entry = pack.entry({ name: FILE_NAME, size, mode: 0o644 });
  await pipeline(fileContent(size), entry);
  pack.entry({ name: `${SMALL_DIR}/`, type: 'directory', mode: 0o755 });
  for (let i = 0; i < SMALL_FILES; i++) {
    const small = pack.entry({ name: `${SMALL_DIR}/${i}`, size: SMALL_FILE_BYTES, mode: 0o644 });
    await pipeline(fileContent(SMALL_FILE_BYTES), small);
  }
  pack.finalize();
  await written;
  const blobPath = path.join(dir, 'layer.esgz');
  const result = await writeEstargz(
    (await import('node:fs')).createReadStream(tarPath),
    createWriteStream(blobPath),
    { compressionLevel: BENCH_COMPRESSION_LEVEL, tmpDir: dir },
  );
  return { blob: await readFile(blobPath), tocDigest: result.tocDigest, tarPath };
}

export async function dropPageCache(): Promise<boolean> {
  try {
    await run('sync', []);
    await writeFile('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

export async function timedRead(file: string): Promise<number> {
  const started = process.hrtime.bigint();
  await run('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M']);
  return Number(process.hrtime.bigint() - started) / 1e9;
}

export async function measure(name: string, file: string, before: () => Promise<unknown>, samples = SAMPLES): Promise<ReadResult> {
  const times: number[] = [];
  for (let i = 0; i < samples; i++) {
    await before();
    times.push(await timedRead(file));
  }
  times.sort((a, b) => a - b);
  const seconds = times[Math.floor(times.length / 2)] ?? 0;
  return { case: name, seconds, mibPerSec: FILE_MIB / seconds };
}

export async function benchReadThroughput(): Promise<{ results: ReadResult[]; notes: string[] }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-bench-'));
  const notes: string[] = [];
  const results: ReadResult[] = [];
  const quiet = log.child({ module: 'bench' });
  quiet.level = 'warn';
  const defaults = defaultConfig();
  // The read path alone: no prefetch, no background fetch competing with the reads measured.
  const config = {
    ...defaults,
    noPrefetch: true,
    noBackgroundFetch: true,
    cache: { ...defaults.cache, memoryMaxBytes: (FILE_MIB + 64) * MIB },
  };
  const blobs = new Map<string, BufferBlobSource>();
  const newFileSystem = (): StargazeFileSystem =>
    new StargazeFileSystem({
      registry: { resolveBlob: async (_ref, digest) => blobs.get(digest) ?? Promise.reject(new Error('no blob')) },
      config,
      log: quiet,
    });
  let fsys = newFileSystem();
  const overlay = path.join(dir, 'overlay');
  try {
    const { blob, tocDigest, tarPath } = await buildLayer(dir);
    const digest = 'sha256:' + createHash('sha256').update(blob).digest('hex');
    blobs.set(digest, new BufferBlobSource(digest, blob));
    const lazy = path.join(dir, 'lazy');
    await mkdir(lazy);
    await fsys.mount(lazy, {
      [TARGET_SNAPSHOT_REF]: 'sha256:bench',
      [STARGZ_REFERENCE]: 'bench.local/bench:1',
      [STARGZ_DIGEST]: digest,
      [TOC_DIGEST]: tocDigest,
    });

    const lower = path.join(dir, 'unpacked');
    await mkdir(lower);
    await run('tar', ['-xf', tarPath, '-C', lower]);
    for (const d of ['upper', 'work', 'overlay']) await mkdir(path.join(dir, d));
    await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${dir}/upper,workdir=${dir}/work`, overlay]);

    const canDrop = await dropPageCache();
    if (!canDrop) notes.push('cannot write /proc/sys/vm/drop_caches here: "page cache dropped" cases ran with whatever the kernel kept');

    const lazyFile = path.join(lazy, FILE_NAME);
    const first = await measure('stargaze cold (inflate + verify every chunk)', lazyFile, async () => {
      // A new filesystem: its memory cache (shared by its layers) starts empty.
      await fsys.close();
      fsys = newFileSystem();
      await fsys.mount(lazy, {
        [TARGET_SNAPSHOT_REF]: 'sha256:bench',
        [STARGZ_REFERENCE]: 'bench.local/bench:1',
        [STARGZ_DIGEST]: digest,
        [TOC_DIGEST]: tocDigest,
      });
    });
    results.push(first);
    await timedRead(lazyFile);
    results.push(await measure('stargaze, chunk cache warm, page cache dropped', lazyFile, dropPageCache));
    results.push(await measure('stargaze, page cache warm', lazyFile, async () => undefined));
    const overlayFile = path.join(overlay, FILE_NAME);
    results.push(await measure('overlayfs, page cache dropped', overlayFile, dropPageCache));
    results.push(await measure('overlayfs, page cache warm', overlayFile, async () => undefined));
  } finally {
    await fsys.close();
    await run('umount', [overlay]).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
  return { results, notes };
}
