/**
 * How a mounted layer reads its blob, on top of the registry's BlobSource:
 *
 * - withTail(): the footer and the TOC in one round trip. readToc asks for the footer, then for the TOC before
 *   it; reading a tail sized to hold a typical TOC on the first request serves both (the reference also reads
 *   the blob's tail in one piece). LayerBlob keeps that tail, so prefetch and background fetch (which hashes
 *   every byte of the blob, the compressed TOC too, for the diff_id) do not fetch those bytes again, until the
 *   layer lets it go (releaseTail) once those passes are over: up to 512 KiB of blob per layer.
 * - LayerBlob: a long range a read or background fetch asks for is read as parallel range requests, as
 *   `[blob] parallel_fetch_*` configure: a registry or CDN may cap each connection. Prefetch instead streams its
 *   range (often tens of MiB from offset 0) as one request, as the reference reads it (readRangeInto), and
 *   inflates each member as soon as its own bytes are in.
 */
import type { RangeReadable } from '../estargz/toc';
import { readRangeIntoOf, readRangesOf, type BlobSource, type ByteRange } from '../remote/blob-source';
import { splitChunkBytes } from '../remote/parallel-fetch';
import { forEachBounded } from '../task/bounded';
import type { Scheduler } from '../task/scheduler';

/**
 * Tail read with the footer: blob size / 128, within [64 KiB, 512 KiB]. TOCs grow with the file count, not the
 * bytes, but this ratio covers the Debian-built images of the startup benchmark (TOC 31-310 KiB for layers of
 * 17-74 MiB) while a small layer wastes at most 64 KiB. A larger TOC costs its second request, as before.
 */
const TAIL_RATIO = 128;
const MIN_TAIL_BYTES = 64 * 1024;
const MAX_TAIL_BYTES = 512 * 1024;

/**
 * Suffix read at resolve, when the blob's size is not known yet: the largest tail above, so the TOCs it was
 * sized for still come in one request. A small layer fetches up to MAX_TAIL_BYTES it may not need (20 ms at
 * 200 Mbit/s), less than the round trip the separate size probe took.
 */
export const RESOLVE_TAIL_BYTES = MAX_TAIL_BYTES;

export function tailBytesFor(size: number): number {
  return Math.min(size, Math.max(MIN_TAIL_BYTES, Math.min(MAX_TAIL_BYTES, Math.floor(size / TAIL_RATIO))));
}

/** Bytes [offset, offset + data.length) of a blob: its tail, read once. */
export interface BlobTail {
  offset: number;
  data: Buffer;
}

/**
 * `blob` for readToc: the first read that touches the tail fetches the whole tail, later ones are served from
 * it. tail() hands the bytes on (to LayerBlob), so the part before the TOC is not fetched again later.
 */
export function withTail(
  blob: RangeReadable,
  tailBytes: number = tailBytesFor(blob.size),
  /** The tail when it came with the blob's resolve (a suffix range): then tailBytes is ignored. */
  fetched?: BlobTail,
): RangeReadable & { tail(): Promise<BlobTail | undefined> } {
  const tailStart = fetched !== undefined ? fetched.offset : blob.size - Math.min(blob.size, tailBytes);
  let tail: Promise<Buffer> | undefined = fetched !== undefined ? Promise.resolve(fetched.data) : undefined;
  return {
    size: blob.size,
    async readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
      const end = offset + length;
      if (end <= tailStart || end > blob.size || length === 0) return blob.readRange(offset, length, signal);
      if (tail === undefined) {
        tail = blob.readRange(tailStart, blob.size - tailStart, signal);
        tail.catch(() => (tail = undefined)); // a failed tail read is not remembered
      }
      if (offset >= tailStart) return (await tail).subarray(offset - tailStart, end - tailStart);
      const [head, t] = await Promise.all([blob.readRange(offset, tailStart - offset, signal), tail]);
      return Buffer.concat([head, t.subarray(0, end - tailStart)]);
    },
    async tail(): Promise<BlobTail | undefined> {
      const data = await tail?.catch(() => undefined);
      return data === undefined ? undefined : { offset: tailStart, data };
    },
  };
}

export interface LayerBlobOptions {
  /**
   * Ranges at least twice this long are split into parallel requests of at most this size (smaller for a
   * range that would give each connection too few, as for a whole-blob fetch: splitChunkBytes).
   */
  chunkBytes: number;
  /** Parallel requests of one split range. */
  concurrency: number;
  /** The process's scheduler: the requests of a split range take slots in its request lane. */
  scheduler: Scheduler;
  /** The blob's tail as read with the TOC: reads inside it are served from memory, until releaseTail(). */
  tail?: BlobTail;
}

export class LayerBlob implements BlobSource {
  readonly digest: string;
  readonly size: number;
  private tail: BlobTail | undefined;
  /** The options but the tail, which is this.tail's alone to hold. */
  private readonly opts: Omit<LayerBlobOptions, 'tail'>;

  constructor(
    private readonly blob: BlobSource,
    { tail, ...opts }: LayerBlobOptions,
  ) {
    this.digest = blob.digest;
    this.size = blob.size;
    this.opts = opts;
    this.tail = tail;
  }

  /** Bytes of the blob held in memory (the kept tail). */
  get heldBytes(): number {
    return this.tail?.data.length ?? 0;
  }

  /** Lets the tail go: later reads of it fetch (the disk cache has what prefetch and background fetch read). */
  releaseTail(): void {
    this.tail = undefined;
  }

  /** Reads inside the tail come from memory; one that ends inside it fetches only what comes before. */
  async readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    const tail = this.tail;
    const end = offset + length;
    if (tail === undefined || end <= tail.offset || end > tail.offset + tail.data.length) return this.fetch(offset, length, signal);
    if (offset >= tail.offset) return tail.data.subarray(offset - tail.offset, end - tail.offset);
    const before = await this.fetch(offset, tail.offset - offset, signal);
    return Buffer.concat([before, tail.data.subarray(0, end - tail.offset)]);
  }

  readRanges(ranges: readonly ByteRange[], signal?: AbortSignal): Promise<Buffer[]> {
    return readRangesOf(this.blob, ranges, signal);
  }

  /** One request streamed into `into` (never split: its reader uses the start before the end); the tail from memory. */
  async readRangeInto(offset: number, into: Buffer, arrived: (n: number) => void, signal?: AbortSignal): Promise<void> {
    const tail = this.tail;
    const end = offset + into.length;
    if (tail === undefined || end <= tail.offset || end > tail.offset + tail.data.length) return readRangeIntoOf(this.blob, offset, into, arrived, signal);
    const fromTail = Math.max(offset, tail.offset);
    if (fromTail > offset) await readRangeIntoOf(this.blob, offset, into.subarray(0, fromTail - offset), arrived, signal);
    tail.data.copy(into, fromTail - offset, fromTail - tail.offset, end - tail.offset);
    arrived(into.length);
  }

  /** One request, or parallel ones for a long range (a registry may cap each connection). */
  private async fetch(offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    const { concurrency } = this.opts;
    if (this.opts.chunkBytes <= 0 || concurrency <= 1 || length < 2 * this.opts.chunkBytes) return this.blob.readRange(offset, length, signal);
    // Cut as a whole-blob fetch is: the last round of requests should not leave most connections idle.
    const chunkBytes = splitChunkBytes(length, concurrency, this.opts.chunkBytes);
    const out = Buffer.allocUnsafe(length);
    const parts: number[] = [];
    for (let from = 0; from < length; from += chunkBytes) parts.push(from);
    // At read priority, which never waits: the range is a read's (prefetch cuts its parts no longer than
    // chunkBytes), or a background window that holds a slot of the lane already and must not wait for another.
    // The parts still count in the lane, so prefetch and background work wait behind them. The first failure
    // stops the other requests: the caller gets nothing from a partial range anyway.
    await forEachBounded(
      parts,
      async (from, _i, sig) => {
        (await this.blob.readRange(offset + from, Math.min(chunkBytes, length - from), sig)).copy(out, from);
      },
      { concurrency, signal, shared: { limiter: this.opts.scheduler.fetches, priority: 'read' } },
    );
    return out;
  }
}
