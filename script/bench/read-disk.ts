/**
 * Sequential read of one large file whose chunks are only in the DISK chunk cache (issue 5): the memory
 * cache is tiny, the kernel page cache dropped, and the filesystem is a new instance (as after a daemon
 * restart) over a DiskChunkCache reopened from its directory — so each chunk is read back from disk and
 * verified against its digest. Against overlayfs reading the same file (page cache dropped), and both warm
 * (page cache).
 *
 * Steps: build one eStargz layer (read-throughput's generator); mount it with a DiskChunkCache and read the
 * file once (inflate + verify from the in-memory blob, chunks written to disk); wait until the disk cache
 * holds them; then each sample: close the filesystem, reopen the cache, mount again, drop caches, `dd`.
 * The blob source counts its reads, so the "disk only" number provably fetched nothing from the blob.
 * Reads are done by `dd` in a child process (this process serves the mount).
 *
 * Third arm, "local copy": the fully fetched layer copied out of its mount (layer/local-copy.ts) and used as an
 * overlay lower dir, which is what the snapshotter gives containers created after a layer is fully fetched.
 *
 * Knobs: BENCH_FILE_MIB (default 256), BENCH_SAMPLES (default 3), BENCH_MEMORY_CACHE_MIB (default 8: two
 * 4 MiB chunks, so one FUSE 128 KiB read after another does not go to disk for the same chunk again).
 */
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

import { DiskChunkCache } from '../../src/cache/disk-chunk-cache';
import { copyLayerToLocal, localCopyPath } from '../../src/layer/local-copy';
import { defaultConfig } from '../../src/config/config';
import { fileSystemOptionsFromConfig, StargazeFileSystem } from '../../src/fs/stargz-fs';
import { Scheduler, schedulerLimits } from '../../src/task/scheduler';
import { log } from '../../src/log';
import { BufferBlobSource, type BlobSource } from '../../src/remote/blob-source';
import { STARGZ_DIGEST, STARGZ_REFERENCE, TARGET_SNAPSHOT_REF, TOC_DIGEST } from '../../src/source/labels';
import { FILE_NAME, SMALL_DIR, SMALL_FILES, SMALL_FILE_BYTES, buildLayer, dropPageCache, measure, run, timedRead, type ReadResult } from './read-throughput';

const MIB = 1024 * 1024;
const FILE_MIB = Number(process.env.BENCH_FILE_MIB ?? 256);
const MEMORY_CACHE_MIB = Number(process.env.BENCH_MEMORY_CACHE_MIB ?? 8);
/** Warm samples are short (~50 ms for 256 MiB): take more of them. */
const WARM_SAMPLES = Number(process.env.BENCH_WARM_SAMPLES ?? 9);
/** Passes over the file per child process in the spawn-free warm measurement. */
const WARM_PASSES = Number(process.env.BENCH_WARM_PASSES ?? 10);

/** The digests of the chunk files in a DiskChunkCache directory (`<2 hex>/<64 hex>`). */
async function listChunkDigests(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const shard of await readdir(dir)) {
    if (!/^[0-9a-f]{2}$/.test(shard)) continue;
    for (const name of await readdir(path.join(dir, shard))) if (/^[0-9a-f]{64}$/.test(name)) out.push(`sha256:${name}`);
  }
  return out;
}

/** FUSE reads the layer mount served, and their bytes (the mount's own counters). */
function fuseCounters(fsys: StargazeFileSystem | undefined, mountpoint: string): { reads: number; bytesServed: number } {
  const c = fsys?.layerStats().find((l) => l.mountpoint === mountpoint);
  return { reads: c?.reads ?? 0, bytesServed: c?.bytesServed ?? 0 };
}

/** Counts the bytes read from the blob (what a registry would have served). */
class CountingBlobSource implements BlobSource {
  bytesRead = 0;
  constructor(private readonly inner: BufferBlobSource) {}
  get digest(): string {
    return this.inner.digest;
  }
  get size(): number {
    return this.inner.size;
  }
  async readRange(offset: number, length: number): Promise<Buffer> {
    this.bytesRead += length;
    return this.inner.readRange(offset, length);
  }
}

/**
 * `passes` sequential reads of `file` (open, read to the end with a 1 MiB buffer, close) in ONE child process,
 * timed inside it: process spawn (20-40 ms on this loaded box, as much as a warm 256 MiB read) is excluded.
 * Returns seconds per pass.
 */
async function warmPassesSeconds(file: string, passes: number): Promise<number> {
  const script = `const fs=require('fs');const b=Buffer.allocUnsafe(1<<20);const t=process.hrtime.bigint();
for(let i=0;i<${passes};i++){const fd=fs.openSync(process.argv[1],'r');while(fs.readSync(fd,b,0,b.length,null)>0);fs.closeSync(fd);}
process.stdout.write(String(Number(process.hrtime.bigint()-t)/1e9));`;
  const out = await run(process.execPath, ['-e', script, file]);
  return Number(out.trim()) / passes;
}

/** Like warmPassesSeconds, over every file of `dir` (open, read, close each): open-bound, as a container start is. */
async function warmSmallPassesSeconds(dir: string, passes: number): Promise<number> {
  const script = `const fs=require('fs');const d=process.argv[1];const names=fs.readdirSync(d);const b=Buffer.allocUnsafe(1<<20);
const t=process.hrtime.bigint();
for(let i=0;i<${passes};i++)for(const n of names){const fd=fs.openSync(d+'/'+n,'r');while(fs.readSync(fd,b,0,b.length,null)>0);fs.closeSync(fd);}
process.stdout.write(String(Number(process.hrtime.bigint()-t)/1e9));`;
  const out = await run(process.execPath, ['-e', script, dir]);
  return Number(out.trim()) / passes;
}

async function waitUntil(what: string, pred: () => boolean, timeoutMs: number, refresh: () => void | Promise<void>): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (await refresh(); !pred(); await refresh()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

export async function benchReadDisk(): Promise<{ results: ReadResult[]; notes: string[]; blobBytesReadFromDiskCases: number }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-bench-disk-'));
  const notes: string[] = [];
  const results: ReadResult[] = [];
  const quiet = log.child({ module: 'bench' });
  quiet.level = 'warn';
  const defaults = defaultConfig();
  const config = {
    ...defaults,
    noPrefetch: true,
    noBackgroundFetch: true,
    cache: { ...defaults.cache, memoryMaxBytes: MEMORY_CACHE_MIB * MIB },
  };
  const cacheDir = path.join(dir, 'chunks');
  let source: CountingBlobSource | undefined;
  let fsys: StargazeFileSystem | undefined;
  let diskCache: DiskChunkCache | undefined;
  const newFileSystem = async (): Promise<StargazeFileSystem> => {
    diskCache = await DiskChunkCache.open({ dir: cacheDir, maxBytes: (FILE_MIB + 256) * MIB, log: quiet });
    return new StargazeFileSystem({
      registry: { resolveBlob: async () => source ?? Promise.reject(new Error('no blob')) },
      ...fileSystemOptionsFromConfig(config),
      scheduler: new Scheduler(schedulerLimits(config)),
      diskCache,
      log: quiet,
    });
  };
  const lazy = path.join(dir, 'lazy');
  const overlay = path.join(dir, 'overlay');
  let overlayMounted = false;
  const copyOverlay = path.join(dir, 'copy-overlay');
  let copyOverlayMounted = false;
  let blobBytesReadFromDiskCases: number;
  try {
    const { blob, tocDigest, tarPath } = await buildLayer(dir);
    const digest = 'sha256:' + createHash('sha256').update(blob).digest('hex');
    source = new CountingBlobSource(new BufferBlobSource(digest, blob));
    const labels = {
      [TARGET_SNAPSHOT_REF]: 'sha256:bench',
      [STARGZ_REFERENCE]: 'bench.local/bench:1',
      [STARGZ_DIGEST]: digest,
      [TOC_DIGEST]: tocDigest,
    };
    await mkdir(lazy);
    const remount = async (): Promise<void> => {
      await fsys?.close();
      fsys = await newFileSystem();
      await fsys.mount(lazy, labels);
    };

    const lower = path.join(dir, 'unpacked');
    await mkdir(lower);
    await run('tar', ['-xf', tarPath, '-C', lower]);
    await rm(tarPath, { force: true });
    for (const d of ['upper', 'work', 'overlay']) await mkdir(path.join(dir, d));
    await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${dir}/upper,workdir=${dir}/work`, overlay]);
    overlayMounted = true;
    if (!(await dropPageCache())) notes.push('cannot write /proc/sys/vm/drop_caches here: "page cache dropped" cases ran with whatever the kernel kept');

    const lazyFile = path.join(lazy, FILE_NAME);
    const overlayFile = path.join(overlay, FILE_NAME);

    // Warm the disk cache: one cold read (inflate + verify from the blob), then wait for the chunk writes.
    await remount();
    const cold = await timedRead(lazyFile);
    results.push({ case: 'stargaze cold (blob in memory -> inflate, verify, write disk cache)', seconds: cold, mibPerSec: FILE_MIB / cold });
    // The chunk writes are asynchronous (void put): wait until the live cache has indexed (written and
    // renamed) all of them. Never DiskChunkCache.open() the directory meanwhile: open() removes the temp files
    // of writes in flight, as leftovers of a crash.
    let onDisk = 0;
    await waitUntil('the disk cache to hold the file', () => onDisk >= FILE_MIB * MIB, 120_000, () => {
      onDisk = diskCache?.usedBytes ?? 0;
    });
    if ((diskCache?.stats.writeErrors ?? 0) > 0) throw new Error(`${diskCache?.stats.writeErrors} disk cache writes failed`);
    notes.push(`disk cache: ${(onDisk / MIB).toFixed(1)} MiB of chunks in ${cacheDir}; memory cache ${MEMORY_CACHE_MIB} MiB`);

    const before = source.bytesRead;
    results.push(
      await measure(`stargaze, disk cache only (new fs + ${MEMORY_CACHE_MIB} MiB mem cache, page cache dropped)`, lazyFile, async () => {
        await remount();
        await dropPageCache();
      }),
    );
    blobBytesReadFromDiskCases = source.bytesRead - before;
    const lastReads = fuseCounters(fsys, lazy);
    notes.push(
      `last disk-only sample: ${lastReads.reads} FUSE reads (avg ${(lastReads.bytesServed / Math.max(1, lastReads.reads) / 1024).toFixed(0)} KiB), ` +
        `disk cache hits ${diskCache?.stats.hits ?? 0}, misses ${diskCache?.stats.misses ?? 0}`,
    );
    // Only the footer/TOC reads of each mount are expected here (the TOC cache is not wired in this bench).
    notes.push(`blob bytes read during the disk-only samples (mount = footer + TOC only; chunks must come from disk): ${blobBytesReadFromDiskCases}`);
    // Diagnostic: the disk cache alone (read each chunk file back + sha256 verify), page cache dropped, in this
    // process, one chunk after another as the FUSE read path does — no FUSE involved.
    {
      const chunkDigests = await listChunkDigests(cacheDir);
      await dropPageCache();
      const cache = await DiskChunkCache.open({ dir: cacheDir, maxBytes: (FILE_MIB + 256) * MIB, log: quiet });
      const t0 = process.hrtime.bigint();
      let bytes = 0;
      for (const d of chunkDigests) bytes += (await cache.get(d))?.length ?? 0;
      const secs = Number(process.hrtime.bigint() - t0) / 1e9;
      notes.push(
        `diagnostic: DiskChunkCache.get() of all ${chunkDigests.length} chunks in turn (read back + verify, page cache dropped, no FUSE): ` +
          `${secs.toFixed(3)} s = ${(bytes / MIB / secs).toFixed(0)} MiB/s`,
      );
    }
    results.push(await measure('overlayfs, page cache dropped', overlayFile, dropPageCache));
    // Warm: page cache filled by one read, then the samples.
    const warmUpBefore = fuseCounters(fsys, lazy).reads;
    await timedRead(lazyFile);
    const perSample: number[] = [];
    let last = fuseCounters(fsys, lazy).reads;
    const warmUpReads = last - warmUpBefore;
    results.push(
      await measure(
        'stargaze, page cache warm',
        lazyFile,
        () => {
          const now = fuseCounters(fsys, lazy).reads;
          perSample.push(now - last);
          last = now;
        },
        WARM_SAMPLES,
      ),
    );
    perSample.push(fuseCounters(fsys, lazy).reads - last);
    perSample.shift(); // the first delta is before the first sample
    notes.push(`FUSE reads that reached this process: warm-up read ${warmUpReads}; each warm sample [${perSample.join(', ')}]`);
    await timedRead(overlayFile);
    results.push(await measure('overlayfs, page cache warm', overlayFile, () => undefined, WARM_SAMPLES));

    // The fully fetched layer, copied to local disk and mounted as the snapshotter mounts it for new containers.
    const copyStarted = Date.now();
    await copyLayerToLocal(lazy);
    notes.push(`local copy of the ${FILE_MIB} MiB layer (tar from the FUSE mount, chunks on disk): ${((Date.now() - copyStarted) / 1000).toFixed(2)} s`);
    for (const d of ['copy-upper', 'copy-work', 'copy-overlay']) await mkdir(path.join(dir, d));
    await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${localCopyPath(lazy)},upperdir=${dir}/copy-upper,workdir=${dir}/copy-work`, copyOverlay]);
    copyOverlayMounted = true;
    const copyFile = path.join(copyOverlay, FILE_NAME);
    results.push(await measure('stargaze local copy, page cache dropped', copyFile, dropPageCache));
    await timedRead(copyFile);

    // Warm, with process spawn excluded: WARM_PASSES open+read+close passes in one child, timed inside it;
    // the arms take turns (5 samples each), so load from elsewhere on the box hits them alike.
    {
      const before = fuseCounters(fsys, lazy).reads;
      const secs: Record<'stargaze' | 'stargaze local copy' | 'overlayfs', number[]> = { stargaze: [], 'stargaze local copy': [], overlayfs: [] };
      for (let i = 0; i < 5; i++) {
        secs.stargaze.push(await warmPassesSeconds(lazyFile, WARM_PASSES));
        secs['stargaze local copy'].push(await warmPassesSeconds(copyFile, WARM_PASSES));
        secs.overlayfs.push(await warmPassesSeconds(overlayFile, WARM_PASSES));
      }
      for (const name of ['stargaze', 'stargaze local copy', 'overlayfs'] as const) {
        const sorted = [...secs[name]].sort((a, b) => a - b);
        const sec = sorted[2] as number;
        results.push({ case: `${name}, page cache warm, ${WARM_PASSES} passes in one process (no spawn)`, seconds: sec, mibPerSec: FILE_MIB / sec });
      }
      notes.push(
        `in-process warm passes, s/pass per sample: stargaze [${secs.stargaze.map((x) => x.toFixed(3)).join(', ')}], ` +
          `local copy [${secs['stargaze local copy'].map((x) => x.toFixed(3)).join(', ')}], ` +
          `overlayfs [${secs.overlayfs.map((x) => x.toFixed(3)).join(', ')}]; FUSE reads meanwhile: ${fuseCounters(fsys, lazy).reads - before}`,
      );
    }
    // Warm, many small files: the kernel has every page, so what is left is the cost of open(2)/close(2).
    {
      const smallMib = (SMALL_FILES * SMALL_FILE_BYTES) / MIB;
      const lazySmall = path.join(lazy, SMALL_DIR);
      const copySmall = path.join(copyOverlay, SMALL_DIR);
      const overlaySmall = path.join(overlay, SMALL_DIR);
      await warmSmallPassesSeconds(lazySmall, 1);
      await warmSmallPassesSeconds(copySmall, 1);
      await warmSmallPassesSeconds(overlaySmall, 1);
      const secs: Record<'stargaze' | 'stargaze local copy' | 'overlayfs', number[]> = { stargaze: [], 'stargaze local copy': [], overlayfs: [] };
      for (let i = 0; i < 5; i++) {
        secs.stargaze.push(await warmSmallPassesSeconds(lazySmall, WARM_PASSES));
        secs['stargaze local copy'].push(await warmSmallPassesSeconds(copySmall, WARM_PASSES));
        secs.overlayfs.push(await warmSmallPassesSeconds(overlaySmall, WARM_PASSES));
      }
      for (const name of ['stargaze', 'stargaze local copy', 'overlayfs'] as const) {
        const sec = [...secs[name]].sort((a, b) => a - b)[2] as number;
        results.push({ case: `${name}, page cache warm, ${SMALL_FILES} files of ${SMALL_FILE_BYTES / 1024} KiB, ${WARM_PASSES} passes`, seconds: sec, mibPerSec: smallMib / sec });
      }
      notes.push(
        `small files, s/pass per sample: stargaze [${secs.stargaze.map((x) => x.toFixed(3)).join(', ')}], ` +
          `local copy [${secs['stargaze local copy'].map((x) => x.toFixed(3)).join(', ')}], ` +
          `overlayfs [${secs.overlayfs.map((x) => x.toFixed(3)).join(', ')}]`,
      );
    }
    const get = (prefix: string): ReadResult | undefined => results.find((r) => r.case.startsWith(prefix));
    const disk = get('stargaze, disk cache only');
    const ovCold = get('overlayfs, page cache dropped');
    const warm = get('stargaze, page cache warm');
    const ovWarm = get('overlayfs, page cache warm');
    if (disk && ovCold) notes.push(`disk cache only: ${(disk.mibPerSec / ovCold.mibPerSec).toFixed(2)}x overlayfs with page cache dropped`);
    if (warm && ovWarm) notes.push(`warm (one dd per sample, spawn included): ${(warm.mibPerSec / ovWarm.mibPerSec).toFixed(2)}x overlayfs warm (target >= 0.9x)`);
    const warmP = get('stargaze, page cache warm, ');
    const ovWarmP = get('overlayfs, page cache warm, ');
    const smallP = get('stargaze, page cache warm, ' + String(SMALL_FILES));
    const ovSmallP = get('overlayfs, page cache warm, ' + String(SMALL_FILES));
    if (smallP && ovSmallP) notes.push(`warm small files: ${(smallP.mibPerSec / ovSmallP.mibPerSec).toFixed(2)}x overlayfs`);
    if (warmP && ovWarmP) notes.push(`warm (${WARM_PASSES} passes in one process, spawn excluded): ${(warmP.mibPerSec / ovWarmP.mibPerSec).toFixed(2)}x overlayfs warm (target >= 0.9x)`);
    const copyWarm = get('stargaze local copy, page cache warm, ');
    const copySmall = get('stargaze local copy, page cache warm, ' + String(SMALL_FILES));
    const copyCold = get('stargaze local copy, page cache dropped');
    if (copyWarm && ovWarmP) notes.push(`local copy, warm (${WARM_PASSES} passes in one process): ${(copyWarm.mibPerSec / ovWarmP.mibPerSec).toFixed(2)}x overlayfs warm (target >= 0.9x)`);
    if (copySmall && ovSmallP) notes.push(`local copy, warm small files: ${(copySmall.mibPerSec / ovSmallP.mibPerSec).toFixed(2)}x overlayfs`);
    if (copyCold && ovCold) notes.push(`local copy, page cache dropped: ${(copyCold.mibPerSec / ovCold.mibPerSec).toFixed(2)}x overlayfs`);
  } finally {
    if (copyOverlayMounted) await run('umount', [copyOverlay]).catch(() => undefined);
    await fsys?.close();
    if (overlayMounted) await run('umount', [overlay]).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
  return { results, notes, blobBytesReadFromDiskCases };
}
