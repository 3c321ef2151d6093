import { webcrypto } from 'node:crypto';

import { LRUCache } from 'lru-cache';

import { EstargzFormatError, VerificationError } from '../errors';
import type { ChunkInfo, LayerNode, LayerTree } from '../metadata/layer-tree';
import type { BlobSource } from '../remote/blob-source';
import { readRangeIntoOf, readRangesOf } from '../remote/blob-source';
import { parallelOptions } from '../remote/parallel-fetch';
import { inflateRange } from './inflate-range';
import { zstdPool } from './zstd-pool';
import { abortable } from '../abortable';
import { forEachBounded } from '../task/bounded';
import type { Priority } from '../task/limiter';
import type { Scheduler } from '../task/scheduler';

/**
 * Reads regular-file bytes of one layer. Reads are widened to whole chunks; each chunk is fetched as
 * its compressed member range, inflated, checked against its TOC digest and kept in a byte-bounded
 * memory LRU. Concurrent reads of a chunk share one fetch.
 */

/** Default bound on decompressed chunk bytes kept in memory per layer. */
export const DEFAULT_MEMORY_CACHE_BYTES = 256 * 1024 * 1024;
/**
 * Largest chunk we will inflate into memory. The reference writes 4 MiB chunks; a TOC claiming more
 * than this is refused rather than trusted with an allocation of its choosing.
 */
export const MAX_CHUNK_BYTES = 256 * 1024 * 1024;
/**
 * On sequential reads, chunks after the one being read are loaded from the disk cache ahead of the reader, up
 * to this many bytes (and at most half the memory cache), so reading the next chunk file and verifying it
 * overlap with serving this one instead of stalling the reader once per chunk.
 */
export const DISK_READAHEAD_BYTES = 8 * 1024 * 1024;
/** The reference's `[blob] chunk_size`: a missed member is fetched as the whole blocks of this size it touches. */
export const DEFAULT_BLOCK_BYTES = 50_000;
/**
 * Compressed blocks kept per layer after a miss brought them, and for how long: a container opening one small
 * file often opens its neighbours next (a package's modules, a directory's libraries), whose members then come
 * from here. Short-lived and small, as every mounted layer has its own.
 */
const BLOCK_CACHE_BYTES = 1024 * 1024;
const BLOCK_CACHE_TTL_MS = 30_000;
/** A block fetched for a member that spans several starts that many blocks before the member it may serve. */
const BLOCK_LOOKBACK = 4;

/** A second cache level below memory, keyed by chunk digest (DiskChunkCache). */
export interface ChunkStore {
  has(digest: string): boolean;
  /** Verified bytes, or undefined (a miss, or a stored file that is not `expectedSize` bytes long). */
  get(digest: string, expectedSize: number): Promise<Buffer | undefined>;
  /** Stores bytes already verified against `digest`; never rejects. */
  put(digest: string, data: Buffer): Promise<void>;
}

export interface LayerReaderOptions {
  /**
   * The process's one scheduler: prefetch's requests take `fetches` slots and its inflates `inflates` slots,
   * behind the reads of every layer. A read's own fetch and inflate go through neither: a container never waits
   * for a slot.
   */
  scheduler: Scheduler;
  /** One memory cache for every layer, so `[cache] memory_max_bytes` bounds them all (memoryCacheBytes is then unused). */
  sharedMemoryCache?: LRUCache<string, Buffer>;
  /**
   * Disk level below the memory cache. Used only while verifying: a chunk's digest is its key there, so
   * an unverified chunk must never be stored under it.
   */
  diskCache?: ChunkStore;
  /** Bound on cached decompressed chunk bytes; 0 disables the cache. Default DEFAULT_MEMORY_CACHE_BYTES. */
  memoryCacheBytes?: number;
  /**
   * Check each chunk against its TOC `chunkDigest` (default true). When on, a chunk without a digest
   * is an error too: unverifiable data must not be served as verified.
   */
  verify?: boolean;
  /** How the blob's members are compressed: gzip (eStargz, the default) or zstd frames (zstd:chunked). */
  compression?: 'gzip' | 'zstd';
  /**
   * How a profile's prefetch (prefetchChunks) requests its members: requests of at most `chunkBytes`,
   * `concurrency` at a time. Default: DEFAULT_PARALLEL_FETCH_CONCURRENCY and DEFAULT_PARALLEL_FETCH_CHUNK_BYTES.
   */
  prefetchParallel?: { concurrency: number; chunkBytes: number };
  /**
   * A chunk a read misses is fetched as the whole `blockBytes`-aligned blocks of the blob its member touches
   * (`[blob] chunk_size`, as the reference reads), and the blocks are kept a while, so the members next to it
   * cost no request of their own when they are read next. 0: exactly the member. Default DEFAULT_BLOCK_BYTES.
   */
  blockBytes?: number;
}

export interface LayerReaderStats {
  /** Compressed bytes read from the blob (reads and prefetch). */
  fetchedBytes: number;
  /** Chunks served from the memory cache. */
  cacheHits: number;
  /** Chunks that had to be fetched. */
  cacheMisses: number;
  /** Chunk requests that joined a fetch already in flight. */
  sharedFetches: number;
  /** Chunks put in the cache by prefetch. */
  prefetchedChunks: number;
  /** Chunks read from the disk cache instead of the registry. */
  diskHits: number;
  /** Chunks loaded from the disk cache ahead of a sequential reader. */
  readAheadChunks: number;
  /** Chunks fetched from the registry one ahead of a reader streaming a file. */
  fetchedAheadChunks: number;
  /** Missed chunks whose member came with the blocks an earlier miss fetched. */
  blockHits: number;
}

/** What read() needs of a node. */
export type ReadableNode = Pick<LayerNode, 'size' | 'chunks'>;

export class LayerReader {
  readonly stats: LayerReaderStats = {
    fetchedBytes: 0,
    cacheHits: 0,
    cacheMisses: 0,
    sharedFetches: 0,
    prefetchedChunks: 0,
    diskHits: 0,
    readAheadChunks: 0,
    fetchedAheadChunks: 0,
    blockHits: 0,
  };
  /** Per file, the index of the last chunk a read touched: tells sequential reads (disk read-ahead) apart. */
  private readonly lastChunk = new WeakMap<ReadableNode, number>();
  /** Per file, where the last read ended: a read starting near there streams the file (registry read-ahead). */
  private readonly lastEnd = new WeakMap<ReadableNode, number>();
  /** Verified, decompressed chunks by this.key(). */
  private readonly cache: LRUCache<string, Buffer> | undefined;
  /** Chunk fetches in flight by this.key(): the single-flight group. */
  private readonly inflight = new Map<string, Promise<Buffer>>();
  /** Blob reads (the registry's, not the disk cache's) in flight, and when one last started or ended. */
  private blobReads = 0;
  private blobReadsChangedAt = -Infinity;
  /** Keys of `inflight` that belong to a prefetch (see chunk()). */
  private readonly prefetching = new Set<string>();
  /** Keys of `prefetching` a read has joined: their inflate goes at read priority. */
  private readonly joinedByRead = new Set<string>();
  private readonly verify: boolean;
  private readonly keyPrefix: string;
  private readonly disk: ChunkStore | undefined;
  /** gzip members or zstd frames (LayerReaderOptions.compression). */
  readonly compression: 'gzip' | 'zstd';
  private readonly zstd: boolean;
  private readonly prefetchParallel: { concurrency: number; chunkBytes: number };
  private readonly scheduler: Scheduler;
  private readonly blockBytes: number;
  /** Blob bytes that misses fetched, by start offset (a multiple of blockBytes): see blockBytes. */
  private readonly blocks: LRUCache<number, Buffer> | undefined;
  /** Block fetches in flight by start offset, with where they end: a miss inside one waits for it. */
  private readonly blockFetches = new Map<number, { end: number; bytes: Promise<Buffer> }>();

  constructor(
    private readonly blob: BlobSource,
    private readonly tree: LayerTree,
    opts: LayerReaderOptions,
  ) {
    this.scheduler = opts.scheduler;
    const cacheBytes = opts.memoryCacheBytes ?? DEFAULT_MEMORY_CACHE_BYTES;
    this.cache =
      opts.sharedMemoryCache ??
      (cacheBytes > 0 ? new LRUCache<string, Buffer>({ maxSize: cacheBytes, sizeCalculation: (b) => Math.max(1, b.length) }) : undefined);
    // In a cache shared by layers, keys name the blob too: without verification a chunk has no digest.
    this.keyPrefix = opts.sharedMemoryCache ? `${blob.digest}/` : '';
    this.verify = opts.verify ?? true;
    this.disk = this.verify ? opts.diskCache : undefined;
    this.compression = opts.compression ?? 'gzip';
    this.zstd = this.compression === 'zstd';
    this.prefetchParallel = parallelOptions(opts.prefetchParallel);
    this.blockBytes = Math.max(0, opts.blockBytes ?? DEFAULT_BLOCK_BYTES);
    this.blocks = this.blockBytes > 0 ? new LRUCache<number, Buffer>({ maxSize: BLOCK_CACHE_BYTES, sizeCalculation: (b) => Math.max(1, b.length), ttl: BLOCK_CACHE_TTL_MS, ttlAutopurge: true }) : undefined;
  }

  /**
   * Returns bytes [position, position + length) of a regular file, fewer only at end of file. The
   * result may be a view into the cache: callers must not modify it. `signal` abandons this caller's
   * wait; a fetch other readers share keeps going.
   */
  async read(node: ReadableNode, position: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    const end = Math.min(node.size, position + length);
    if (position < 0 || length < 0) throw new RangeError(`bad read ${position}+${length}`);
    if (position >= end) return Buffer.alloc(0);
    const chunks = node.chunks;
    if (chunks.length === 0) throw new EstargzFormatError(`file of ${node.size} bytes has no chunks`);
    const first = chunkIndexAt(chunks, position);
    let last = first;
    while (last + 1 < chunks.length && chunks[last + 1].fileOffset < end) last++;
    if (first === last) {
      const c = chunks[first];
      const loading = this.chunk(c);
      this.readAhead(node, first, last, position, end); // after this read's own load, which must not queue behind it
      const data = await abortable(loading, signal);
      return data.subarray(position - c.fileOffset, end - c.fileOffset);
    }
    // Chunks neither cached nor in flight are fetched together: one multi-range request where the
    // blob source can (adjacent members merge into one range).
    const started = this.fetchMissing(chunks.slice(first, last + 1));
    const pending: Array<Promise<Buffer>> = [];
    for (let i = first; i <= last; i++) pending.push(started.get(chunks[i]) ?? this.chunk(chunks[i]));
    this.readAhead(node, first, last, position, end);
    const parts = await abortable(Promise.all(pending), signal);
    const out = Buffer.allocUnsafe(end - position);
    let filled = 0;
    for (let i = first; i <= last; i++) {
      const c = chunks[i];
      const from = Math.max(position, c.fileOffset) - c.fileOffset;
      const to = Math.min(end, c.fileOffset + c.size) - c.fileOffset;
      filled += parts[i - first].copy(out, filled, from, to);
    }
    return out;
  }

  /**
   * When a read enters a new chunk right after the previous one (or starts the file), starts loading the
   * following chunks that are in the disk cache, so they are in memory when the reader gets there (a chunk
   * file found corrupt is fetched again, as for any read). And when a reader streams a file (this read
   * starts near where the last one ended) into a new chunk, the chunk after that is fetched from the registry
   * now: its round trip and inflate overlap the reader's way through this one instead of stalling it at
   * every chunk (a 64 MiB file behind a 20 ms round trip: 862 -> 552-634 ms, first-read benchmark).
   *  - Not on a file's first read, nor for reads that jump further than a chunk (a program reading a big
   *    file's header, or faulting in pages of a mapped library): they would pay a chunk they may never need.
   *  - One chunk ahead at most, so a reader that stops wastes one; and only where the memory cache holds
   *    two chunks, or it would push out the chunk being read and both would be fetched again.
   *  - A reader that joins it and sees it fail fetches on its own, as with prefetch: it was a guess.
   * Needs a memory tier to land in; without one a chunk read ahead would be thrown away.
   */
  private readAhead(node: ReadableNode, first: number, last: number, position: number, end: number): void {
    const disk = this.disk;
    const cache = this.cache;
    if (cache === undefined) return;
    // Near where the last read ended, not exactly: the kernel's read-ahead sends a streaming reader's reads
    // several at a time, and they do not always arrive in order (exact matching halved the gain).
    const lastEnd = this.lastEnd.get(node);
    const streaming = lastEnd !== undefined && Math.abs(position - lastEnd) <= (node.chunks[first]?.size ?? 0);
    this.lastEnd.set(node, end);
    const prev = this.lastChunk.get(node);
    if (prev === last) return; // still inside the chunk that started the read-ahead
    this.lastChunk.set(node, last);
    if (prev === undefined ? first !== 0 : first !== prev && first !== prev + 1) return;
    const chunks = node.chunks;
    const ahead = chunks[last + 1];
    const key = streaming && prev !== undefined && ahead !== undefined && ahead.size * 2 <= cache.maxSize ? this.key(ahead) : undefined;
    if (ahead !== undefined && key !== undefined && !this.has(key) && !this.isLocal(ahead)) {
      this.stats.fetchedAheadChunks++;
      this.prefetching.add(key);
      this.chunk(ahead)
        .catch(() => undefined) // a reader that joined it fetches on its own
        .finally(() => this.prefetching.delete(key));
    }
    if (disk === undefined) return;
    const budget = Math.min(DISK_READAHEAD_BYTES, Math.floor(cache.maxSize / 2));
    let bytes = 0;
    for (let i = last + 1; i < chunks.length; i++) {
      const c = chunks[i];
      bytes += c.size;
      if (bytes > budget) break;
      const key = this.key(c);
      if (this.has(key)) continue;
      if (c.digest === undefined || c.size > MAX_CHUNK_BYTES || !disk.has(c.digest)) break;
      this.stats.readAheadChunks++;
      this.chunk(c).catch(() => undefined); // a reader that joins it sees the error
    }
  }

  /**
   * Fetches blob bytes [0, n) (n: the last member end up to upToCompressedOffset) with one streamed request
   * (downloadHead) and caches every chunk whose member lies inside it. Rejects with the download's
   * failure, else the first chunk error after trying them all.
   *
   * `onHead` receives the fetched bytes, blob [0, n), once all have arrived: background fetch hashes them for
   * the diff_id instead of downloading them again.
   */
  async prefetch(upToCompressedOffset: number, signal?: AbortSignal, onHead?: (head: Buffer) => void): Promise<void> {
    const limit = Math.min(upToCompressedOffset, this.blob.size);
    const wanted = this.tree
      .chunksInBlobOrder()
      .filter((c) => c.compressedEnd <= limit && !this.has(this.key(c)) && !this.isLocal(c));
    if (wanted.length === 0) return;
    const fetchEnd = wanted.reduce((max, c) => Math.max(max, c.compressedEnd), 0);
    const head = this.downloadHead(fetchEnd, 'prefetch', signal);
    head.all.catch(() => undefined); // awaited below; each chunk sees its own part's failure

    // Every wanted chunk is in flight from now on: a container reading one of them while the prefetch
    // range downloads joins it instead of fetching the same bytes again. A chunk is inflated as soon as
    // its member's bytes have arrived, so inflating overlaps the download and such a reader waits for its own
    // bytes only, not for the whole range. Inflating takes the scheduler's inflate slots, behind reads.
    const inflate = async (c: ChunkInfo): Promise<Buffer> => {
      await head.through(c.compressedOffset, c.compressedEnd);
      signal?.throwIfAborted(); // a closed layer's downloaded parts are not worth the CPU; joined readers fetch
      const member = head.bytes.subarray(c.compressedOffset, c.compressedEnd);
      // A container already waits for this chunk: its inflate is a read's, not queued behind other layers' prefetch.
      const priority = this.joinedByRead.has(this.key(c)) ? 'read' : 'prefetch';
      return this.scheduler.inflates.run(() => this.decode(c, member), { priority, signal });
    };
    const jobs = wanted.map((c) => this.prefetchJob(this.key(c), inflate(c)));
    const failed = (await Promise.allSettled(jobs)).find((r) => r.status === 'rejected');
    await head.all; // the download's own failure first, when there was one
    onHead?.(head.bytes);
    if (failed !== undefined) throw failed.reason;
  }

  /**
   * Prefetches exactly `wanted` (a prefetch profile's chunks, in its order), skipping those cached or in
   * flight. Members that touch or overlap in the blob share one range request, up to the prefetch part size
   * (no gap is filled: what the registry serves is exactly the members); the requests go in the order of the
   * first chunk each holds, `concurrency` at a time in the scheduler's request lane, behind containers' reads.
   * As in prefetch(), every chunk is in flight from the start, so a read of one joins it, and each is inflated
   * and verified as soon as its request has arrived. Rejects with the first failure after trying them all.
   *
   * `onSpan` receives each request's bytes (blob offset, bytes) once every chunk in them decoded and verified,
   * and never when one failed: background fetch hashes them for the chainID check instead of downloading them
   * again (layer/held-ranges.ts), and a corrupt answer held for it would fail the whole layer's check, where
   * downloading it again costs one request.
   */
  async prefetchChunks(wanted: readonly ChunkInfo[], signal?: AbortSignal, onSpan?: (offset: number, bytes: Buffer) => void): Promise<void> {
    const todo = wanted.filter((c) => !this.has(this.key(c)) && !this.isLocal(c));
    if (todo.length === 0) return;
    const spans = memberSpans(todo, this.prefetchParallel.chunkBytes);
    const arrived = spans.map(() => {
      let settle!: { resolve: (b: Buffer) => void; reject: (err: unknown) => void };
      const promise = new Promise<Buffer>((resolve, reject) => (settle = { resolve, reject }));
      promise.catch(() => undefined); // whoever waits on it sees the failure
      return { promise, ...settle };
    });
    const all = forEachBounded(
      spans,
      async (span, i, sig) => {
        const bytes = await this.fromBlob(this.blob.readRange(span.offset, span.end - span.offset, sig));
        this.stats.fetchedBytes += bytes.length;
        arrived[i]!.resolve(bytes);
      },
      { concurrency: this.prefetchParallel.concurrency, signal, shared: { limiter: this.scheduler.fetches, priority: 'prefetch' } },
    ).catch((err: unknown) => {
      for (const a of arrived) a.reject(err); // settles only those still pending
      throw err;
    });
    all.catch(() => undefined); // awaited below; each chunk sees its own request's failure
    /** Each span handed to onSpan once all its chunks passed (settles either way). */
    const handedOn: Promise<void>[] = [];
    const jobs = spans.flatMap((span, i) => {
      const chunkJobs = span.chunks.map((c) => {
        const key = this.key(c);
        const decoded = arrived[i]!.promise.then((bytes) => {
          signal?.throwIfAborted(); // a closed layer's bytes are not worth the CPU; joined readers fetch
          const member = bytes.subarray(c.compressedOffset - span.offset, c.compressedEnd - span.offset);
          const priority = this.joinedByRead.has(key) ? 'read' : 'prefetch';
          return this.scheduler.inflates.run(() => this.decode(c, member), { priority, signal });
        });
        return this.prefetchJob(key, decoded);
      });
      if (onSpan !== undefined) {
        handedOn.push(
          Promise.all([arrived[i]!.promise, ...chunkJobs]).then(
            ([bytes]) => onSpan(span.offset, bytes),
            () => undefined, // a chunk failed (or the request did): the span's bytes are not trusted
          ),
        );
      }
      return chunkJobs;
    });
    const failed = (await Promise.allSettled(jobs)).find((r) => r.status === 'rejected');
    await Promise.all(handedOn);
    await all;
    if (failed !== undefined) throw failed.reason;
  }

  /**
   * A prefetched chunk's job, from its decode on: in flight from now on (a read of the chunk joins it), in the
   * memory cache once it verified. Its failure is the caller's to report; readers that joined fetch on their own.
   */
  private prefetchJob(key: string, decoded: Promise<Buffer>): Promise<Buffer> {
    const p = decoded
      .then((chunk) => {
        this.cache?.set(key, chunk);
        this.stats.prefetchedChunks++;
        return chunk;
      })
      .finally(() => {
        this.inflight.delete(key);
        this.prefetching.delete(key);
        this.joinedByRead.delete(key);
      });
    p.catch(() => undefined);
    this.inflight.set(key, p);
    this.prefetching.add(key);
    return p;
  }

  /**
   * Blob bytes [0, end) into one buffer, streamed by one request (BlobSource.readRangeInto) that takes a slot
   * of the scheduler's request lane at `priority`. `through(from, to)` settles once bytes [from, to) have
   * arrived, `all` once all have; a failure settles every waiter with it.
   */
  private downloadHead(end: number, priority: Priority, signal?: AbortSignal): { bytes: Buffer; all: Promise<void>; through(from: number, to: number): Promise<void> } {
    const bytes = Buffer.allocUnsafe(end);
    let arrived = 0;
    let failure: { err: unknown } | undefined;
    /** Waiters by the end they wait for, ascending; those before `settled` are settled (prefetch adds them in blob order). */
    const waiting: Array<{ to: number; resolve: () => void; reject: (err: unknown) => void }> = [];
    let settled = 0;
    const all = this.scheduler.fetches
      .run(
        () =>
          this.fromBlob(
            readRangeIntoOf(
              this.blob,
              0,
              bytes,
              (n) => {
                this.stats.fetchedBytes += n - arrived;
                arrived = n;
                while (settled < waiting.length && (waiting[settled] as { to: number }).to <= n) waiting[settled++]!.resolve();
              },
              signal,
            ),
          ),
        { priority, signal },
      )
      .catch((err: unknown) => {
        failure = { err };
        for (const w of waiting.slice(settled)) w.reject(err);
        settled = waiting.length;
        throw err;
      });
    return {
      bytes,
      all,
      through: (from, to) => {
        if (to <= arrived) return Promise.resolve();
        if (failure !== undefined) return Promise.reject(failure.err);
        return new Promise<void>((resolve, reject) => {
          let at = waiting.length;
          while (at > settled && (waiting[at - 1] as { to: number }).to > to) at--;
          waiting.splice(at, 0, { to, resolve, reject });
        });
      },
    };
  }

  /** Starts one batched fetch for those of `wanted` that are neither cached nor in flight (two or more). */
  private fetchMissing(wanted: readonly ChunkInfo[]): Map<ChunkInfo, Promise<Buffer>> {
    const started = new Map<ChunkInfo, Promise<Buffer>>();
    if (this.blob.readRanges === undefined) return started;
    const missing = wanted.filter((c) => !this.has(this.key(c)) && !this.isLocal(c));
    if (missing.length < 2) return started;
    for (const c of missing) this.checkChunk(c);
    const batch = this.fromBlob(
      readRangesOf(
        this.blob,
        missing.map((c) => ({ offset: c.compressedOffset, length: c.compressedEnd - c.compressedOffset })),
      ),
    );
    missing.forEach((c, i) => {
      const key = this.key(c);
      this.stats.cacheMisses++;
      const p = batch
        .then((parts) => {
          const member = parts[i] as Buffer;
          this.stats.fetchedBytes += member.length;
          return this.decode(c, member);
        })
        .then((data) => {
          this.cache?.set(key, data);
          return data;
        })
        .finally(() => this.inflight.delete(key));
      p.catch(() => undefined); // the reader awaiting it sees the error
      this.inflight.set(key, p);
      started.set(c, p);
    });
    return started;
  }

  private has(key: string): boolean {
    return this.inflight.has(key) || (this.cache?.has(key) ?? false);
  }

  /** The chunk's bytes: from cache, from a fetch in flight, or from a new fetch. */
  private chunk(c: ChunkInfo): Promise<Buffer> {
    const key = this.key(c);
    const cached = this.cache?.get(key);
    if (cached !== undefined) {
      this.stats.cacheHits++;
      return Promise.resolve(cached);
    }
    const running = this.inflight.get(key);
    if (running !== undefined) {
      this.stats.sharedFetches++;
      if (!this.prefetching.has(key)) return running;
      this.joinedByRead.add(key);
      // A failed prefetch must not fail the reads that joined it: they fetch the chunk themselves.
      return running.catch(() => this.chunk(c));
    }
    this.stats.cacheMisses++;
    const p = this.fetch(c)
      .then((data) => {
        this.cache?.set(key, data);
        return data;
      })
      .finally(() => this.inflight.delete(key));
    this.inflight.set(key, p);
    return p;
  }

  private async fetch(c: ChunkInfo): Promise<Buffer> {
    this.checkChunk(c);
    if (this.disk !== undefined && c.digest !== undefined && this.disk.has(c.digest)) {
      const local = await this.disk.get(c.digest, c.size);
      if (local !== undefined) {
        this.stats.diskHits++;
        return local;
      }
    }
    return this.decode(c, await this.member(c));
  }

  /** The compressed member of a missed chunk: from blocks an earlier miss fetched, else with its whole blocks. */
  private async member(c: ChunkInfo): Promise<Buffer> {
    const { compressedOffset: from, compressedEnd: to } = c;
    if (this.blocks === undefined) {
      const compressed = await this.fromBlob(this.blob.readRange(from, to - from));
      this.stats.fetchedBytes += compressed.length;
      return compressed;
    }
    const size = this.blockBytes;
    const first = Math.floor(from / size);
    for (let k = first; k >= Math.max(0, first - BLOCK_LOOKBACK); k--) {
      const start = k * size;
      const held = this.blocks.get(start);
      if (held !== undefined && start + held.length >= to) {
        this.stats.blockHits++;
        return held.subarray(from - start, to - start);
      }
      const pending = this.blockFetches.get(start);
      if (pending !== undefined && pending.end >= to) {
        this.stats.blockHits++;
        return (await pending.bytes).subarray(from - start, to - start);
      }
    }
    const start = first * size;
    const end = Math.max(to, Math.min(this.blob.size, Math.ceil(to / size) * size));
    const bytes = this.fromBlob(this.blob.readRange(start, end - start));
    const pending = { end, bytes };
    this.blockFetches.set(start, pending);
    try {
      const fetched = await bytes;
      this.stats.fetchedBytes += fetched.length;
      this.blocks.set(start, fetched);
      return fetched.subarray(from - start, to - start);
    } finally {
      if (this.blockFetches.get(start) === pending) this.blockFetches.delete(start);
    }
  }

  private key(c: ChunkInfo): string {
    return this.keyPrefix + chunkKey(c);
  }

  /** True when the chunk's bytes are here without the registry: in memory or on disk. */
  isLocal(c: ChunkInfo): boolean {
    return this.cache?.has(this.key(c)) === true || (this.disk !== undefined && c.digest !== undefined && this.disk.has(c.digest));
  }

  /** True while reads are fetching chunks: background work waits for them. */
  get busy(): boolean {
    return this.inflight.size > 0;
  }

  /**
   * How long no read nor prefetch has been reading the blob, in ms (performance.now() time): 0 while one is.
   * Chunks served from the disk cache do not count: they do not compete for the link.
   */
  idleMs(now = performance.now()): number {
    return this.blobReads > 0 ? 0 : now - this.blobReadsChangedAt;
  }

  /** `read`, a read of the blob, counted for idleMs. */
  private fromBlob<T>(read: Promise<T>): Promise<T> {
    this.blobReads++;
    this.blobReadsChangedAt = performance.now();
    const done = (): void => {
      this.blobReads--;
      this.blobReadsChangedAt = performance.now();
    };
    read.then(done, done);
    return read;
  }

  /**
   * Verifies one chunk from its complete gzip member (fetched by background fetch) and stores it on
   * disk only, so background work does not push what containers read out of the memory cache.
   */
  async warm(c: ChunkInfo, member: Buffer): Promise<void> {
    this.stats.fetchedBytes += member.length;
    const data = await this.decode(c, member);
    if (this.disk !== undefined && c.digest !== undefined) await this.disk.put(c.digest, data);
    else this.cache?.set(this.key(c), data);
  }

  /** Inflates the chunk out of its member bytes and verifies it. */
  private async decode(c: ChunkInfo, member: Buffer): Promise<Buffer> {
    this.checkChunk(c);
    const data = this.zstd ? await zstdPool.range(member, c.innerOffset, c.size) : await inflateRange(member, c.innerOffset, c.size);
    if (this.verify) {
      // WebCrypto hashes on the libuv thread pool: a 4 MiB chunk does not stall FUSE callbacks.
      const digest = 'sha256:' + Buffer.from(await webcrypto.subtle.digest('SHA-256', data)).toString('hex');
      if (digest !== c.digest) {
        throw new VerificationError(
          `chunk at compressed offset ${c.compressedOffset} (file offset ${c.fileOffset}) has digest ${digest}, TOC says ${c.digest}`,
        );
      }
      // Verified: keep it on disk too, keyed by the digest it was just checked against.
      if (this.disk !== undefined && c.digest !== undefined) void this.disk.put(c.digest, data);
    }
    return data;
  }

  private checkChunk(c: ChunkInfo): void {
    if (c.size > MAX_CHUNK_BYTES) {
      throw new EstargzFormatError(`chunk of ${c.size} bytes is larger than the limit of ${MAX_CHUNK_BYTES}`);
    }
    if (this.verify && c.digest === undefined) {
      throw new VerificationError(`chunk at compressed offset ${c.compressedOffset} has no chunkDigest to verify`);
    }
  }
}

/** A range of the blob holding the members of `chunks`. */
interface MemberSpan {
  offset: number;
  end: number;
  chunks: ChunkInfo[];
}

/**
 * `chunks`' members as ranges to request: members that touch or overlap joined while the range stays within
 * `maxBytes` (a bigger member is a range of its own), in the order of the first of `chunks` each range holds.
 */
export function memberSpans(chunks: readonly ChunkInfo[], maxBytes: number): MemberSpan[] {
  const order = chunks.map((c, i) => ({ c, i })).sort((a, b) => a.c.compressedOffset - b.c.compressedOffset || a.i - b.i);
  const spans: Array<MemberSpan & { first: number }> = [];
  for (const { c, i } of order) {
    const last = spans[spans.length - 1];
    if (last !== undefined && c.compressedOffset <= last.end && Math.max(last.end, c.compressedEnd) - last.offset <= maxBytes) {
      last.end = Math.max(last.end, c.compressedEnd);
      last.chunks.push(c);
      last.first = Math.min(last.first, i);
    } else {
      spans.push({ offset: c.compressedOffset, end: c.compressedEnd, chunks: [c], first: i });
    }
  }
  return spans.sort((a, b) => a.first - b.first).map(({ offset, end, chunks: held }) => ({ offset, end, chunks: held }));
}

/** Chunks are identified by where they are and what they must hash to, so no two files can alias. */
function chunkKey(c: ChunkInfo): string {
  return `${c.compressedOffset}:${c.innerOffset}:${c.size}:${c.digest ?? ''}`;
}

/** Index of the chunk holding file offset `pos` (chunks tile the file, sorted by fileOffset). */
function chunkIndexAt(chunks: readonly ChunkInfo[], pos: number): number {
  let lo = 0;
  let hi = chunks.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >>> 1;
    if (chunks[mid].fileOffset <= pos) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}
