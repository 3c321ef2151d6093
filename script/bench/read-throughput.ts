/**
 * Sequential read of one large file through a lazily mounted layer, against the same file in an overlayfs
 * mount of the unpacked layer (what containerd's overlayfs snapshotter would give).
 *
 * In-process cases (the layer mounted by a StargazeFileSystem in this process, the blob held in memory):
 *  - stargaze, cold: chunks inflated and verified from the blob (held in memory: no network in this number);
 *  - stargaze, chunk cache warm: every chunk in our memory cache, kernel page cache dropped;
 *  - stargaze, page cache warm: the kernel serves it, FUSE is not asked;
 *  - overlayfs, page cache dropped, and page cache warm.
 * Reads are done by `dd` in a child process: this process serves the FUSE mount, so its own fs calls must
 * never enter it.
 *
 * Daemon cases, the same for the stargaze daemon and for the peer (the reference `containerd-stargz-grpc`, from
 * STARGAZE_PEER_BIN; without it only stargaze runs and a note says how to get the peer): the same layer pushed as
 * a one-layer OCI image to the harness's registry and pulled through its byte-counting proxy on loopback (no link
 * emulation). Each sample is a fresh containerd + fresh daemon (daemon-arm.ts; config `no_background_fetch =
 * true`, prefetch at its default: the layer has `.no.prefetch.landmark`, so nothing is prefetched), `ctr-remote
 * images rpull` (checked to leave the layer FUSE-mounted), the image's rootfs mounted through containerd, then
 * three `dd`s of the file:
 *  - cold from registry: every chunk fetched from the registry (whose blob file is re-read beforehand, so the
 *    registry serves it from the page cache in every sample);
 *  - own cache, page cache dropped: what the daemon kept (its chunk caches, memory or disk, by its defaults);
 *  - page cache warm.
 * Samples alternate which daemon goes first; each row is the median, and stargaze's rows carry stargaze/peer,
 * stargaze's MiB/s over the peer's (above 1: stargaze faster). A note gives the bytes and requests the registry
 * served for the cold read.
 *
 * Knobs: BENCH_FILE_MIB (default 256), BENCH_SAMPLES (default 3), STARGAZE_PEER_BIN.
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
import { fileSystemOptionsFromConfig, StargazeFileSystem } from '../../src/fs/stargz-fs';
import { Scheduler, schedulerLimits } from '../../src/task/scheduler';
import { log } from '../../src/log';
import { BufferBlobSource } from '../../src/remote/blob-source';
import { STARGZ_DIGEST, STARGZ_REFERENCE, TARGET_SNAPSHOT_REF, TOC_DIGEST } from '../../src/source/labels';
import { CleanupStack, PEER_MISSING_NOTE, peerBinary, startRegistry } from '../../test/e2e/harness';
import { pushEstargzImage, startDaemonArm, type DaemonKind, type EstargzLayer } from './daemon-arm';
import { median } from './startup';

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
  /** Stargaze daemon rows: this MiB/s over the peer daemon's in the same case (above 1: stargaze faster). */
  stargazeOverPeer?: number;
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

export async function buildLayer(dir: string): Promise<EstargzLayer & { tarPath: string }> {
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
  return { blob: await readFile(blobPath), tocDigest: result.tocDigest, diffId: result.diffId, uncompressedSize: result.uncompressedSize, tarPath };
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

export async function measure(name: string, file: string, before: () => unknown, samples = SAMPLES): Promise<ReadResult> {
  const times: number[] = [];
  for (let i = 0; i < samples; i++) {
    await before();
    times.push(await timedRead(file));
  }
  const seconds = median(times);
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
      ...fileSystemOptionsFromConfig(config),
      scheduler: new Scheduler(schedulerLimits(config)),
      log: quiet,
    });
  let fsys = newFileSystem();
  const overlay = path.join(dir, 'overlay');
  let layer: (EstargzLayer & { tarPath: string }) | undefined;
  try {
    layer = await buildLayer(dir);
    const { blob, tocDigest, tarPath } = layer;
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
    results.push(await measure('stargaze, page cache warm', lazyFile, () => undefined));
    const overlayFile = path.join(overlay, FILE_NAME);
    results.push(await measure('overlayfs, page cache dropped', overlayFile, dropPageCache));
    results.push(await measure('overlayfs, page cache warm', overlayFile, () => undefined));
  } finally {
    await fsys.close();
    await run('umount', [overlay]).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  }
  results.push(...(await daemonCases(layer, notes)));
  return { results, notes };
}

const DAEMON_STEPS = [
  ['cold', 'cold from registry (loopback)'],
  ['own-cache', 'own cache, page cache dropped'],
  ['warm', 'page cache warm'],
] as const;
type DaemonStep = (typeof DAEMON_STEPS)[number][0];

/** GETs the blob from the registry itself (not counted), so it is in the page cache when the sample reads it. */
async function warmRegistry(host: string, repo: string, digest: string): Promise<void> {
  const res = await fetch(`http://${host}/v2/${repo}/blobs/${digest}`, { signal: AbortSignal.timeout(120_000) });
  for await (const _ of res.body ?? []) {
    // discard
  }
  if (res.status !== 200) throw new Error(`warming ${repo}@${digest}: HTTP ${res.status}`);
}

/** The daemon cases (see the header): stargaze and, with STARGAZE_PEER_BIN, the peer, samples interleaved. */
async function daemonCases(layer: EstargzLayer, notes: string[]): Promise<ReadResult[]> {
  const kinds: DaemonKind[] = peerBinary() === undefined ? ['stargaze'] : ['stargaze', 'peer'];
  if (!kinds.includes('peer')) notes.push(PEER_MISSING_NOTE);
  const seconds = new Map<string, number[]>();
  const record = (kind: DaemonKind, step: DaemonStep, s: number): void => {
    const key = `${kind} ${step}`;
    seconds.set(key, [...(seconds.get(key) ?? []), s]);
  };
  const served = new Map<DaemonKind, Array<{ bytes: number; requests: number }>>();
  const scope = new CleanupStack();
  try {
    const registry = await startRegistry({ scope });
    const repo = 'bench/read-throughput';
    const image = await pushEstargzImage(registry.host, repo, 'v1', layer);
    for (let i = 0; i < SAMPLES; i++) {
      // alternate which daemon goes first, so drift in the machine's load hits both alike
      for (const kind of i % 2 === 0 ? kinds : [...kinds].reverse()) {
        await warmRegistry(registry.host, repo, image.layerDigest);
        const arm = await startDaemonArm({ kind, registry, pullHost: registry.countingHost, repoTag: image.repoTag, layers: 1, layerDigests: [image.layerDigest] });
        try {
          const file = path.join(arm.mountpoint, FILE_NAME);
          record(kind, 'cold', await timedRead(file));
          served.set(kind, [...(served.get(kind) ?? []), { bytes: arm.bytesServed(), requests: arm.blobRequests() }]);
          await dropPageCache();
          record(kind, 'own-cache', await timedRead(file));
          record(kind, 'warm', await timedRead(file));
        } finally {
          await arm.cleanup();
        }
      }
    }
  } finally {
    await scope.run();
  }
  const rows: ReadResult[] = [];
  for (const [step, label] of DAEMON_STEPS) {
    const peerSeconds = seconds.get(`peer ${step}`);
    for (const kind of kinds) {
      const s = median(seconds.get(`${kind} ${step}`) ?? []);
      // MiB/s over MiB/s: the peer's seconds over stargaze's
      const stargazeOverPeer = kind === 'stargaze' && peerSeconds !== undefined ? median(peerSeconds) / s : undefined;
      rows.push({ case: `${kind} daemon, ${label}`, seconds: s, mibPerSec: FILE_MIB / s, ...(stargazeOverPeer === undefined ? {} : { stargazeOverPeer }) });
    }
  }
  for (const [kind, xs] of served) {
    const mib = median(xs.map((x) => x.bytes)) / MIB;
    const requests = median(xs.map((x) => x.requests));
    notes.push(`${kind} daemon, cold read: the registry served ${mib.toFixed(1)} MiB of the ${(layer.blob.length / MIB).toFixed(1)} MiB blob in ${requests} blob GETs (median)`);
  }
  return rows;
}
