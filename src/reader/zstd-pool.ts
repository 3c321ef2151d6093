/**
 * zstd chunk decoding off the main thread. @bokuweb/zstd-wasm decodes synchronously (about 18 ms for a
 * 4 MiB chunk here), and fuse-native runs every FUSE callback on the main thread, so one chunk decoded
 * there stalls every mount of the process for that long. A few worker threads, each with its own wasm
 * instance, take the big members; small ones are cheaper to decode inline than to post.
 *
 * Why not a native binding: Node 20's zlib has no zstd, and the npm bindings build with node-gyp or fetch a
 * prebuilt at install time, which this offline build cannot rely on; the wasm module we already ship works in a
 * worker as it is.
 */
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';

import { EstargzFormatError, StargazeError, VerificationError } from '../errors';
import { DEFAULT_MAX_FRAME_OUTPUT_BYTES, zstdDecompressAll, zstdRange } from '../estargz/zstd-range';

/** Members decoding to at most this many bytes are decoded inline: under a millisecond, less than a post. */
export const INLINE_MAX_BYTES = 128 * 1024;
/** Workers at most: decoding is CPU-bound, and the FUSE callbacks need a core too. */
const MAX_WORKERS = 2;

/** One job posted to a worker: bytes [skip, skip + length) of a member (range), or all a frame holds, up to `length` (all). */
export interface ZstdJob {
  id: number;
  kind: 'range' | 'all';
  /** The member's bytes, in an ArrayBuffer of their own (transferred). */
  member: ArrayBuffer;
  skip: number;
  length: number;
  maxFrameOutput: number;
}

/** A worker's answer: the decoded bytes, or the error's message and code. */
export interface ZstdReply {
  id: number;
  data?: ArrayBuffer;
  error?: { message: string; code: string | undefined };
}

interface Pending {
  resolve: (b: Buffer) => void;
  reject: (err: unknown) => void;
}

class PoolWorker {
  readonly pending = new Map<number, Pending>();
  private readonly worker: Worker;

  constructor(onExit: (w: PoolWorker) => void) {
    this.worker = new Worker(path.join(__dirname, 'zstd-worker.js'));
    this.worker.unref(); // idle workers never keep the process alive; ref() while a job runs
    this.worker.on('message', (reply: ZstdReply) => {
      const p = this.pending.get(reply.id);
      if (p === undefined) return;
      this.pending.delete(reply.id);
      if (this.pending.size === 0) this.worker.unref();
      if (reply.data !== undefined) p.resolve(Buffer.from(reply.data));
      else p.reject(rebuildError(reply.error));
    });
    const fail = (err: unknown): void => {
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
      onExit(this);
    };
    this.worker.on('error', (err) => fail(new StargazeError('ERR_INTERNAL', `zstd worker failed: ${err.message}`)));
    this.worker.on('exit', (code) => fail(new StargazeError('ERR_INTERNAL', `zstd worker exited with code ${code}`)));
  }

  run(job: ZstdJob): Promise<Buffer> {
    return new Promise<Buffer>((resolve, reject) => {
      this.pending.set(job.id, { resolve, reject });
      this.worker.ref();
      this.worker.postMessage(job, [job.member]);
    });
  }

  terminate(): Promise<number> {
    return this.worker.terminate();
  }
}

/** The errors a worker can report, as the classes the reader handles (format vs. verification vs. other). */
function rebuildError(e: ZstdReply['error']): Error {
  const message = e?.message ?? 'zstd worker failed';
  if (e?.code === 'ERR_ESTARGZ_FORMAT') return new EstargzFormatError(message);
  if (e?.code === 'ERR_ESTARGZ_VERIFY') return new VerificationError(message);
  return new StargazeError('ERR_INTERNAL', message);
}

/**
 * The bytes in an ArrayBuffer of their own, to transfer: the caller's buffer is usually a view into a bigger
 * fetched range (and may be shared), so it is copied, unzeroed and unpooled: the main thread's whole share
 * of a decode (0.4-2 ms for a 2 MiB member on the loaded dev box, against 4-18 ms to decode it inline).
 */
function ownCopy(bytes: Buffer): ArrayBuffer {
  const own = Buffer.allocUnsafeSlow(bytes.length);
  bytes.copy(own);
  return own.buffer;
}

export class ZstdPool {
  private readonly workers: PoolWorker[] = [];
  private nextId = 1;

  constructor(private readonly size = Math.max(1, Math.min(MAX_WORKERS, availableParallelism()))) {}

  /** zstdRange's result, decoded in a worker thread when the output is big enough to be worth it. */
  range(member: Buffer, skip: number, length: number, maxFrameOutput = DEFAULT_MAX_FRAME_OUTPUT_BYTES): Promise<Buffer> {
    // The frames are decoded up to skip + length: a small file deep inside a frame is not a small decode.
    if (skip + length <= INLINE_MAX_BYTES) return zstdRange(member, skip, length, maxFrameOutput);
    return this.worker().run({ id: this.nextId++, kind: 'range', member: ownCopy(member), skip, length, maxFrameOutput });
  }

  /** zstdDecompressAll(frames, limit), in a worker when `limit` is big enough to be worth it (diff_id hashing). */
  all(frames: Buffer, limit: number): Promise<Buffer> {
    if (limit <= INLINE_MAX_BYTES) return zstdDecompressAll(frames, limit);
    return this.worker().run({ id: this.nextId++, kind: 'all', member: ownCopy(frames), skip: 0, length: limit, maxFrameOutput: limit });
  }

  /** Stops the workers (tests, shutdown); a later range() starts new ones. */
  async close(): Promise<void> {
    const all = this.workers.splice(0);
    await Promise.all(all.map((w) => w.terminate()));
  }

  /** An idle worker, else a new one while under `size`, else the least busy (a dead one is replaced). */
  private worker(): PoolWorker {
    let best: PoolWorker | undefined;
    for (const w of this.workers) if (best === undefined || w.pending.size < best.pending.size) best = w;
    if (best !== undefined && (best.pending.size === 0 || this.workers.length >= this.size)) return best;
    const w = new PoolWorker((dead) => {
      const i = this.workers.indexOf(dead);
      if (i >= 0) this.workers.splice(i, 1);
    });
    this.workers.push(w);
    return w;
  }
}

/** The process's pool: every layer reader shares it. */
export const zstdPool = new ZstdPool();
