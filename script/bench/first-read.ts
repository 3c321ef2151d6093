/**
 * First-read latency of small files with and without prefetch (issue 5).
 *
 * Two layers (src/estargz/writer.ts) of the same tar: `etc/app/f00..f19` (small config-like files, 1-4 KiB)
 * first, then `data/big.bin` (BENCH_BIG_MIB, incompressible). In blob order:
 *  - prefetch layer (`prioritizedFiles` = the small files): small files, `.prefetch.landmark`, big.bin, TOC;
 *  - no-prefetch layer (no prioritized files): `.no.prefetch.landmark`, small files, big.bin, TOC.
 * In both the small files sit at the blob's start, big.bin between them and the TOC, so the TOC fetch from the
 * blob's end does not bring them along. The "noPrefetch" / "no prefetch landmark" cases, in-process and daemon
 * alike, use the no-prefetch layer; the prefetch cases the prefetch layer.
 * Three workloads: one small file (`cat etc/app/f00`), all 20 small files (`cat f00 ... f19`, one process),
 * and the big file read from start to end (`sha256sum data/big.bin`, no-prefetch layer only: every chunk a cold
 * fetch, so each costs a round trip unless it was fetched ahead of the reader). Output is checked.
 * Background fetch is off everywhere, so it neither helps nor competes.
 *
 * In-process cases: the blob is held in memory behind a BlobSource wrapper that adds a fixed latency to every
 * request (readRange, or one readRanges call = one multi-range request), BENCH_RTT_MS, default 20 ms; bandwidth
 * is not capped. This stands in for a registry's per-request round trip; no proxy process is involved.
 * Each sample is a new StargazeFileSystem (empty memory cache, no disk cache) mounted on a new directory:
 *  - with prefetch: mount, then `check()` waits for prefetch as containerd's first Check (container create)
 *    would, then `cat` in a child process;
 *  - noPrefetch: mount, check (returns at once), `cat`.
 * Reported: mount -> cat done (the whole critical path of a container's first read), and the `cat` alone.
 *
 * Daemon cases, the same for the stargaze daemon and for the peer (the reference `containerd-stargz-grpc`, from
 * STARGAZE_PEER_BIN; without it only stargaze runs and a note says how to get the peer): each layer pushed as a
 * one-layer OCI image to the harness's registry (the no-prefetch one has nothing to prefetch). Pulls go through
 * link-proxy.js (BENCH_RTT_MS round trip per request, plus one per new connection; no bandwidth cap) in front of
 * the registry's counting proxy. Each sample is a fresh containerd + fresh daemon (daemon-arm.ts; config
 * `no_background_fetch = true`, prefetch at its default): `ctr-remote images rpull` (checked to leave the layer
 * FUSE-mounted), the image's rootfs mounted through containerd (the snapshot View checks the layer, which waits
 * for prefetch in both daemons), then the workload in a child process. Reported: pull -> read done (the rpull,
 * the mount and the read: this includes the harness's `mountImage` look-ups of the image's chain ID, three `ctr`
 * runs, a fixed cost the same for both daemons), the read alone, the rpull and the mount, and the layer-blob GETs
 * the counting proxy saw, in all and during the read alone. A no-prefetch-landmark case fails unless its read made
 * GETs of its own (else it measured nothing cold). Samples alternate which daemon goes first; stargaze's rows carry
 * stargaze/peer, stargaze's median time over the peer's (below 1: stargaze faster), for pull -> read done and for
 * the read alone.
 *
 * Knobs: BENCH_SAMPLES (default 5), BENCH_RTT_MS (default 20), BENCH_BIG_MIB (default 32), STARGAZE_PEER_BIN.
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
import { fileSystemOptionsFromConfig, StargazeFileSystem } from '../../src/fs/stargz-fs';
import { Scheduler, schedulerLimits } from '../../src/task/scheduler';
import { log } from '../../src/log';
import { BufferBlobSource, type BlobSource, type ByteRange } from '../../src/remote/blob-source';
import { STARGZ_DIGEST, STARGZ_REFERENCE, TARGET_SNAPSHOT_REF, TOC_DIGEST } from '../../src/source/labels';
import { CleanupStack, PEER_MISSING_NOTE, peerBinary, startRegistry } from '../../test/e2e/harness';
import { pushEstargzImage, startDaemonArm, type DaemonKind, type EstargzLayer } from './daemon-arm';
import { median, startLinkProxy } from './startup';

const MIB = 1024 * 1024;
const SAMPLES = Number(process.env.BENCH_SAMPLES ?? 5);
const RTT_MS = Number(process.env.BENCH_RTT_MS ?? 20);
const BIG_MIB = Number(process.env.BENCH_BIG_MIB ?? 32);
const SMALL_FILES = 20;
/** link-proxy.js needs a rate: 10 Gbit/s is far above what it moves here, i.e. uncapped like the in-process cases. */
const LINK_BPS = 10e9;
const smallName = (i: number): string => `etc/app/f${String(i).padStart(2, '0')}`;

interface FirstReadCommon {
  case: string;
  /** Median ms of the read (`cat` or `sha256sum`) alone. */
  catMs: number;
  /** Median number of requests made for the layer blob during the sample. */
  requests: number;
  samples: number;
}

export interface InProcessFirstRead extends FirstReadCommon {
  arm: 'in-process';
  /** Median ms from the start of mount() to the read completing. */
  mountToReadMs: number;
  /** Median ms check() waited (prefetch). */
  checkMs: number;
}

export interface DaemonFirstRead extends FirstReadCommon {
  arm: DaemonKind;
  /**
   * Median ms of rpull + image mount + read, each sample the sum of the three timed steps (the harness's lazy-mount
   * check between rpull and mount is left out). Includes the mount's fixed `ctr` look-ups, the same for both daemons.
   */
  pullToReadMs: number;
  /** Median ms of `ctr-remote images rpull`. */
  pullMs: number;
  /** Median ms of the image mount (`ctr` look-ups of the chain ID, the snapshot View, which waits for prefetch, mount). */
  mountMs: number;
  /** Median layer-blob GETs made during the read alone (`requests` counts from the rpull on). */
  readRequests: number;
  /** Stargaze rows with a peer: stargaze's median ms over the peer's (below 1: stargaze faster). */
  stargazeOverPeer?: { pullToRead: number; read: number };
}

export type FirstReadResult = InProcessFirstRead | DaemonFirstRead;

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

async function buildTar(dir: string): Promise<string> {
  const tarPath = path.join(dir, 'layer.tar');
  const pack = tarStream.pack();
  const written = pipeline(pack, createWriteStream(tarPath));
  pack.entry({ name: 'etc/', type: 'directory', mode: 0o755 });
  pack.entry({ name: 'etc/app/', type: 'directory', mode: 0o755 });
  pack.entry({ name: 'data/', type: 'directory', mode: 0o755 });
  // The small files first, the big one after them: big.bin then lies between the small files and the TOC in
  // both layers (prioritizedFiles keeps the small ones first), so fetching the TOC from the blob's end can't
  // bring the small files along.
  for (let i = 0; i < SMALL_FILES; i++) pack.entry({ name: smallName(i), mode: 0o644 }, smallContent(i));
  pack.entry({ name: 'data/big.bin', mode: 0o644 }, bigContent());
  pack.finalize();
  await written;
  return tarPath;
}

/** The tar as eStargz: the small files prioritized (then `.prefetch.landmark`), or none (`.no.prefetch.landmark`). */
async function buildLayer(dir: string, tarPath: string, prioritized: boolean): Promise<EstargzLayer> {
  const blobPath = path.join(dir, prioritized ? 'layer.esgz' : 'layer-no-prefetch.esgz');
  const result = await writeEstargz(createReadStream(tarPath), createWriteStream(blobPath), {
    compressionLevel: 1,
    tmpDir: dir,
    prioritizedFiles: prioritized ? Array.from({ length: SMALL_FILES }, (_, i) => smallName(i)) : [],
  });
  return { blob: await readFile(blobPath), tocDigest: result.tocDigest, diffId: result.diffId, uncompressedSize: result.uncompressedSize };
}

interface Workload {
  label: string;
  cmd: 'cat' | 'sha256sum';
  files: string[];
  /** What `cat` prints, or the sha256 hex `sha256sum` prints first. */
  want: string;
  /** Prefetch on/off (in-process: noPrefetch; daemon: the image with or without the landmark). */
  modes: boolean[];
}

function workloads(): Workload[] {
  const small = (files: string[]): Pick<Workload, 'cmd' | 'files' | 'want'> => ({
    cmd: 'cat',
    files,
    want: Buffer.concat(files.map((f) => smallContent(Number(f.slice(-2))))).toString(),
  });
  return [
    { label: '1 small file', ...small([smallName(0)]), modes: [true, false] },
    { label: `${SMALL_FILES} small files`, ...small(Array.from({ length: SMALL_FILES }, (_, i) => smallName(i))), modes: [true, false] },
    // After the landmark: prefetch does not reach it.
    {
      label: `the ${BIG_MIB} MiB file, sequentially`,
      cmd: 'sha256sum',
      files: ['data/big.bin'],
      want: createHash('sha256').update(bigContent()).digest('hex'),
      modes: [false],
    },
  ];
}

/** Throws unless the workload's output is what the layer holds. */
function checkOutput(w: Workload, out: string, who: string): void {
  const got = w.cmd === 'sha256sum' ? (out.split(' ')[0] ?? '') : out;
  if (got !== w.want) throw new Error(`${who}, ${w.label}: ${w.cmd} returned the wrong bytes`);
}

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
    const tarPath = await buildTar(dir);
    const layers = { prefetch: await buildLayer(dir, tarPath, true), noPrefetch: await buildLayer(dir, tarPath, false) };
    /** Per layer: the blob in memory and the labels a mount of it takes. */
    const inMemory = (layer: EstargzLayer): { inner: BufferBlobSource; labels: Record<string, string> } => {
      const digest = 'sha256:' + createHash('sha256').update(layer.blob).digest('hex');
      return {
        inner: new BufferBlobSource(digest, layer.blob),
        labels: {
          [TARGET_SNAPSHOT_REF]: 'sha256:bench',
          [STARGZ_REFERENCE]: 'bench.local/bench:1',
          [STARGZ_DIGEST]: digest,
          [TOC_DIGEST]: layer.tocDigest,
        },
      };
    };
    const blobs = { prefetch: inMemory(layers.prefetch), noPrefetch: inMemory(layers.noPrefetch) };
    notes.push(
      `blob ${(layers.prefetch.blob.length / MIB).toFixed(1)} MiB; every blob request delayed ${RTT_MS} ms (in-process BlobSource wrapper, no bandwidth cap)`,
    );

    const sample = async (prefetch: boolean, cmd: string, files: string[]): Promise<{ total: number; cat: number; check: number; requests: number; out: string }> => {
      const { inner, labels } = prefetch ? blobs.prefetch : blobs.noPrefetch;
      const source = new LatencyBlobSource(inner);
      fsys = new StargazeFileSystem({
        registry: { resolveBlob: () => Promise.resolve(source) },
        ...fileSystemOptionsFromConfig({ ...defaults, noPrefetch: !prefetch, noBackgroundFetch: true }),
        scheduler: new Scheduler(schedulerLimits(defaults)),
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

    for (const w of workloads()) {
      for (const prefetch of w.modes) {
        const s: Array<Awaited<ReturnType<typeof sample>>> = [];
        // Alternate nothing across cases here: each sample is independent (new fs, new mountpoint).
        for (let i = 0; i < SAMPLES; i++) {
          const r = await sample(prefetch, w.cmd, w.files);
          checkOutput(w, r.out, 'in-process');
          s.push(r);
        }
        results.push({
          arm: 'in-process',
          case: `${w.label}, ${prefetch ? 'with prefetch (check waits)' : 'noPrefetch'}`,
          mountToReadMs: median(s.map((x) => x.total)),
          catMs: median(s.map((x) => x.cat)),
          checkMs: median(s.map((x) => x.check)),
          requests: median(s.map((x) => x.requests)),
          samples: SAMPLES,
        });
      }
    }
    results.push(...(await daemonCases(layers, notes)));
  } finally {
    await fsys?.close();
    await rm(dir, { recursive: true, force: true });
  }
  return { results, notes };
}

interface DaemonSample {
  pullToRead: number;
  read: number;
  pull: number;
  mount: number;
  requests: number;
  readRequests: number;
}

/** The daemon cases (see the header): stargaze and, with STARGAZE_PEER_BIN, the peer, samples interleaved. */
async function daemonCases(layers: { prefetch: EstargzLayer; noPrefetch: EstargzLayer }, notes: string[]): Promise<DaemonFirstRead[]> {
  const kinds: DaemonKind[] = peerBinary() === undefined ? ['stargaze'] : ['stargaze', 'peer'];
  if (!kinds.includes('peer')) notes.push(PEER_MISSING_NOTE);
  const rows: DaemonFirstRead[] = [];
  const scope = new CleanupStack();
  try {
    const registry = await startRegistry({ scope });
    const repo = 'bench/first-read';
    const images = {
      prefetch: await pushEstargzImage(registry.host, repo, 'prefetch', layers.prefetch),
      noPrefetch: await pushEstargzImage(registry.host, repo, 'no-prefetch', layers.noPrefetch),
    };
    const pullHost = await startLinkProxy(registry.countingHost, { name: `${RTT_MS}ms`, rttMs: RTT_MS, bps: LINK_BPS }, scope);
    notes.push(
      `daemon cases: registry behind link-proxy.js, ${RTT_MS} ms per request (+${RTT_MS} ms per new connection), ` +
        'no bandwidth cap; requests = layer-blob GETs from rpull to read done, (read n) = those made by the read alone',
    );
    for (const w of workloads()) {
      for (const prefetch of w.modes) {
        const image = prefetch ? images.prefetch : images.noPrefetch;
        const samples = new Map<DaemonKind, DaemonSample[]>(kinds.map((k) => [k, []]));
        for (let i = 0; i < SAMPLES; i++) {
          // alternate which daemon goes first, so drift in the machine's load hits both alike
          for (const kind of i % 2 === 0 ? kinds : [...kinds].reverse()) {
            const arm = await startDaemonArm({ kind, registry, pullHost, repoTag: image.repoTag, layers: 1, layerDigests: [image.layerDigest] });
            try {
              const beforeRead = arm.blobRequests();
              const t1 = process.hrtime.bigint();
              const out = await run(w.cmd, w.files.map((f) => path.join(arm.mountpoint, f)));
              const read = msSince(t1);
              checkOutput(w, out, `${kind} daemon`);
              const requests = arm.blobRequests();
              if (!prefetch && requests === beforeRead) {
                throw new Error(
                  `${kind} daemon, ${w.label}, no prefetch landmark: the read made no blob GET (${beforeRead} during rpull + mount), ` +
                    'so it read nothing cold: the rpull or the mount already fetched what it reads',
                );
              }
              samples.get(kind)!.push({
                pullToRead: arm.pullMs + arm.mountMs + read,
                read,
                pull: arm.pullMs,
                mount: arm.mountMs,
                requests,
                readRequests: requests - beforeRead,
              });
            } finally {
              await arm.cleanup();
            }
          }
        }
        const peer = samples.get('peer');
        for (const kind of kinds) {
          const s = samples.get(kind)!;
          const pullToRead = median(s.map((x) => x.pullToRead));
          const read = median(s.map((x) => x.read));
          rows.push({
            arm: kind,
            case: `${kind} daemon: ${w.label}, ${prefetch ? 'prefetch landmark' : 'no prefetch landmark'}`,
            pullToReadMs: pullToRead,
            catMs: read,
            pullMs: median(s.map((x) => x.pull)),
            mountMs: median(s.map((x) => x.mount)),
            requests: median(s.map((x) => x.requests)),
            readRequests: median(s.map((x) => x.readRequests)),
            samples: SAMPLES,
            ...(kind === 'stargaze' && peer !== undefined
              ? { stargazeOverPeer: { pullToRead: pullToRead / median(peer.map((x) => x.pullToRead)), read: read / median(peer.map((x) => x.read)) } }
              : {}),
          });
        }
      }
    }
  } finally {
    await scope.run();
  }
  return rows;
}
