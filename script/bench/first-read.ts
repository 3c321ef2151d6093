/**
 * First-read latency of small files with and without prefetch (issue 5).
 *
 * The layer (built with src/estargz/writer.ts `prioritizedFiles`): `etc/app/f00..f19` (small config-like
 * files, 1-4 KiB) prioritized, i.e. before `.prefetch.landmark`, then a large file after it. The blob is
 * held in memory behind a BlobSource wrapper that adds a fixed latency to every request (readRange, or one
 * readRanges call = one multi-range request), BENCH_RTT_MS, default 20 ms; bandwidth is not capped. This
 * stands in for a registry's per-request round trip; no proxy process is involved.
 *
 * Each sample is a new StargazeFileSystem (empty memory cache, no disk cache) mounted on a new directory:
 *  - with prefetch: mount, then `check()` waits for prefetch as containerd's first Check (container create)
 *    would, then `cat` in a child process;
 *  - noPrefetch: mount, check (returns at once), `cat`.
 * Reported: mount -> cat done (the whole critical path of a container's first read), and the `cat` alone.
 * Three workloads: one small file (`cat etc/app/f00`), all 20 small files (`cat f00 ... f19`, one process),
 * and the big file after the landmark read from start to end (`sha256sum data/big.bin`: every chunk a cold
 * fetch, so each costs a round trip unless it was fetched ahead of the reader).
 * Background fetch is off, so it neither helps nor competes.
 *
 * Knobs: BENCH_SAMPLES (default 5), BENCH_RTT_MS (default 20), BENCH_BIG_MIB (default 32).
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, rmdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import tarStream from 'tar-stream';

import { defaultConfig } from '../../src/config/config';
import { writeEstargz } from '../../src/estargz/writer';
import { StargazeFileSystem } from '../../src/fs/stargz-fs';
import { log } from '../../src/log';
import { BufferBlobSource, type BlobSource, type ByteRange } from '../../src/remote/blob-source';
import { STARGZ_DIGEST, STARGZ_REFERENCE, TARGET_SNAPSHOT_REF, TOC_DIGEST } from '../../src/source/labels';

const MIB = 1024 * 1024;
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 5);
const RTT_MS = Number(process.env.BENCH_RTT_MS ?? 20);
const BIG_MIB = Number(process.env.BENCH_BIG_MIB ?? 32);
const SMALL_FILES = 20;
const smallName = (i: number): string => `etc/app/f${String(i).padStart(2, '0')}`;

export interface FirstReadResult {
  case: string;
  /** Median ms from the start of mount() to the `cat` completing. */
  mountToReadMs: number;
  /** Median ms of the `cat` alone. */
  catMs: number;
  /** Median ms check() waited (prefetch). */
  checkMs: number;
  /** Median number of requests made to the blob during the sample. */
  requests: number;
  samples: number;
}

/** The blob in memory, each request delayed by RTT_MS; counts requests. */
class LatencyBlobSource implements BlobSource {
  requests = 0;
  constructor(private readonly inner: BufferBlobSource) {}
  get digest(): string {
    return this.inner.digest;
  }
  get size(): number {
    return this.inner.size;
  }
  async readRange(offset: number, length: number): Promise<Buffer> {
    this.requests++;
    await new Promise((r) => setTimeout(r, RTT_MS));
    return this.inner.readRange(offset, length);
  }
  async readRanges(ranges: readonly ByteRange[]): Promise<Buffer[]> {
    this.requests++;
    await new Promise((r) => setTimeout(r, RTT_MS));
    return Promise.all(ranges.map((r) => this.inner.readRange(r.offset, r.length)));
  }
}

function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(' ')}: exit ${code}: ${out}`))));
  });
}

function smallContent(i: number): Buffer {
  const size = 1024 + ((i * 1531) % 3072);
  return Buffer.from(createHash('sha512').update(`small-${i}`).digest('hex').repeat(Math.ceil(size / 128)).slice(0, size));
}

let big: Buffer | undefined;
function bigContent(): Buffer {
  if (big !== undefined) return big;
  big = Buffer.alloc(BIG_MIB * MIB);
  for (let off = 0; off < big.length; off += 64) createHash('sha512').update(String(off)).digest().copy(big, off);
  return big;
}

async function buildLayer(dir: string): Promise<{ blob: Buffer; tocDigest: string }> {
  const tarPath = path.join(dir, 'layer.tar');
  const pack = tarStream.pack();
  const written = pipeline(pack, createWriteStream(tarPath));
  pack.entry({ name: 'etc/', type: 'directory', mode: 0o755 });
  pack.entry({ name: 'etc/app/', type: 'directory', mode: 0o755 });
  pack.entry({ name: 'data/', type: 'directory', mode: 0o755 });
  // The big file first in the tar: prioritizedFiles moves the small ones ahead of it in the blob.
  pack.entry({ name: 'data/big.bin', mode: 0o644 }, bigContent());
  for (let i = 0; i < SMALL_FILES; i++) pack.entry({ name: smallName(i), mode: 0o644 }, smallContent(i));
  pack.finalize();
  await written;
  const blobPath = path.join(dir, 'layer.esgz');
  const result = await writeEstargz(createReadStream(tarPath), createWriteStream(blobPath), {
    compressionLevel: 1,
    tmpDir: dir,
    prioritizedFiles: Array.from({ length: SMALL_FILES }, (_, i) => smallName(i)),
  });
  return { blob: await readFile(blobPath), tocDigest: result.tocDigest };
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;
const msSince = (t0: bigint): number => Number(process.hrtime.bigint() - t0) / 1e6;

export async function benchFirstRead(): Promise<{ results: FirstReadResult[]; notes: string[] }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-bench-first-'));
  const notes: string[] = [];
  const results: FirstReadResult[] = [];
  const quiet = log.child({ module: 'bench' });
  quiet.level = 'warn';
  const defaults = defaultConfig();
  let fsys: StargazeFileSystem | undefined;
  let mountN = 0;
  try {
    const { blob, tocDigest } = await buildLayer(dir);
    const digest = 'sha256:' + createHash('sha256').update(blob).digest('hex');
    const inner = new BufferBlobSource(digest, blob);
    const labels = {
      [TARGET_SNAPSHOT_REF]: 'sha256:bench',
      [STARGZ_REFERENCE]: 'bench.local/bench:1',
      [STARGZ_DIGEST]: digest,
      [TOC_DIGEST]: tocDigest,
    };
    notes.push(`blob ${(blob.length / MIB).toFixed(1)} MiB; every blob request delayed ${RTT_MS} ms (in-process BlobSource wrapper, no bandwidth cap)`);

    const sample = async (prefetch: boolean, cmd: string, files: string[]): Promise<{ total: number; cat: number; check: number; requests: number; out: string }> => {
      const source = new LatencyBlobSource(inner);
      fsys = new StargazeFileSystem({
        registry: { resolveBlob: async () => source },
        config: { ...defaults, noPrefetch: !prefetch, noBackgroundFetch: true },
        log: quiet,
      });
      const mnt = path.join(dir, `mnt${mountN++}`);
      await mkdir(mnt);
      const t0 = process.hrtime.bigint();
      await fsys.mount(mnt, labels);
      const tc = process.hrtime.bigint();
      await fsys.check(mnt);
      const check = msSince(tc);
      const t1 = process.hrtime.bigint();
      const out = await run(cmd, files.map((f) => path.join(mnt, f)));
      const cat = msSince(t1);
      const total = msSince(t0);
      const requests = source.requests;
      await fsys.close();
      fsys = undefined;
      await rmdir(mnt);
      return { total, cat, check, requests, out };
    };

    const small = (files: string[]): [string, string[], string] => [
      'cat',
      files,
      Buffer.concat(files.map((f) => smallContent(Number(f.slice(-2))))).toString(),
    ];
    const bigPath = 'data/big.bin';
    const bigSum = `${createHash('sha256').update(bigContent()).digest('hex')}`;
    const workloads: Array<[string, [string, string[], string], boolean[]]> = [
      ['1 small file', small([smallName(0)]), [true, false]],
      [`${SMALL_FILES} small files`, small(Array.from({ length: SMALL_FILES }, (_, i) => smallName(i))), [true, false]],
      // After the landmark: prefetch does not reach it.
      [`the ${BIG_MIB} MiB file, sequentially`, ['sha256sum', [bigPath], bigSum], [false]],
    ];
    for (const [label, [cmd, files, want], modes] of workloads) {
      for (const prefetch of modes) {
        const s: Array<Awaited<ReturnType<typeof sample>>> = [];
        // Alternate nothing across cases here: each sample is independent (new fs, new mountpoint).
        for (let i = 0; i < SAMPLES; i++) {
          const r = await sample(prefetch, cmd, files);
          if (cmd === 'sha256sum') r.out = r.out.split(' ')[0] ?? '';
          if (r.out !== want) throw new Error(`${label}: cat returned the wrong bytes`);
          s.push(r);
        }
        results.push({
          case: `${label}, ${prefetch ? 'with prefetch (check waits)' : 'noPrefetch'}`,
          mountToReadMs: median(s.map((x) => x.total)),
          catMs: median(s.map((x) => x.cat)),
          checkMs: median(s.map((x) => x.check)),
          requests: median(s.map((x) => x.requests)),
          samples: SAMPLES,
        });
      }
    }
  } finally {
    await fsys?.close();
    await rm(dir, { recursive: true, force: true });
  }
  return { results, notes };
}
