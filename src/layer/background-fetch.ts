/**
 * Background fetch: after prefetch, read the rest of a layer's blob, front to back, at low priority, so the
 * layer becomes fully local and independent of the registry. The same single pass checks the layer
 * against the chainID it was committed under: otherwise a lazily mounted layer is never checked against its
 * diff_id, and a broken or forged layer would be reused by every image that shares the chainID.
 *
 * One pass does both: every blob byte goes through a streaming gunzip whose output is hashed (the diff_id),
 * and each chunk's gzip member, once complete, is handed to `onMember` to be inflated, verified and cached.
 * Memory is bounded by the window size plus the largest member. zstd:chunked blobs go through ZstdDiffHasher
 * instead of gunzip: each frame is decoded once complete (the wasm zstd has no streaming API).
 *
 * Prefetch has usually downloaded the head of the blob already: given its hash state (`resume`, see
 * diff-hash.ts), the pass starts where the head ends, and the chunks in the head (cached by prefetch) are
 * not handed over again. Without it (restart, failed prefetch, zstd:chunked) the pass starts at 0.
 */
import { createHash } from 'node:crypto';
import { VerificationError } from '../errors';
import type { ChunkInfo } from '../metadata/layer-tree';
import type { BlobSource } from '../remote/blob-source';
import { zstdPool } from '../reader/zstd-pool';
import { ZstdDiffHasher } from '../estargz/zstd-range';
import { gzipDiff, type DiffHasher, type DiffResume } from './diff-hash';

/** Compressed bytes per range request. */
export const DEFAULT_WINDOW_BYTES = 4 * 1024 * 1024;
/** How often a paused fetch looks again whether on-demand reads are done. */
const BUSY_POLL_MS = 50;

export interface BackgroundFetchOptions {
  blob: BlobSource;
  /** Every chunk of the layer in blob order (LayerTree.chunksInBlobOrder()). */
  chunks: readonly ChunkInfo[];
  /** Receives each chunk's complete gzip member; skipped for chunks `isCached` says are local. */
  onMember(chunk: ChunkInfo, member: Buffer): Promise<void>;
  isCached(chunk: ChunkInfo): boolean;
  /**
   * True while the fetch must wait: while on-demand reads run, and (quiet-link.ts) until they have been quiet
   * for a while, so it does not compete with a container's reads. Asked before each window.
   */
  isBusy(): boolean;
  windowBytes?: number;
  signal?: AbortSignal;
  /** gzip members (eStargz, the default) or zstd frames (zstd:chunked), for the diff_id. */
  compression?: 'gzip' | 'zstd';
  /** gzip only: the hash of blob bytes [0, resume.offset), fetched by prefetch; the pass starts there. */
  resume?: DiffResume;
}

export interface BackgroundFetchResult {
  /** `sha256:` of the whole decompressed stream: the layer's diff_id. */
  diffId: string;
  fetchedBytes: number;
  cachedChunks: number;
  /** Where the pass started: 0, or the end of the prefetched head it continued from. */
  startOffset: number;
}

export async function backgroundFetch(options: BackgroundFetchOptions): Promise<BackgroundFetchResult> {
  const { blob, signal } = options;
  const windowBytes = options.windowBytes ?? DEFAULT_WINDOW_BYTES;
  const chunks = [...options.chunks].sort((a, b) => a.compressedOffset - b.compressedOffset);

  // The head is skipped only while every chunk in it is still local: prefetch's disk writes can fail (a full
  // disk) or be evicted since, and a layer must end up wholly local. Else the pass starts from 0 again.
  const offered = options.resume;
  const resume =
    options.compression !== 'zstd' &&
    offered !== undefined &&
    offered.offset <= blob.size &&
    chunks.every((c) => c.compressedOffset >= offered.offset || options.isCached(c))
      ? offered
      : undefined;
  const diff = options.compression === 'zstd' ? zstdDiff() : gzipDiff(resume?.hash);
  const startOffset = resume?.offset ?? 0;

  /** Compressed bytes from `heldFrom` on, kept until every member starting in them is complete. */
  let held: Buffer = Buffer.alloc(0);
  let heldFrom = startOffset;
  // Chunks in the head lie wholly before its end (a member boundary): prefetch has them.
  let next = 0;
  while (next < chunks.length && chunks[next]!.compressedOffset < startOffset) next++;
  let fetchedBytes = 0;
  let cachedChunks = 0;

  for (let offset = startOffset; offset < blob.size; ) {
    signal?.throwIfAborted();
    while (options.isBusy()) {
      await new Promise((r) => setTimeout(r, BUSY_POLL_MS));
      signal?.throwIfAborted();
    }
    const length = Math.min(windowBytes, blob.size - offset);
    const window = await blob.readRange(offset, length, signal);
    fetchedBytes += window.length;
    await diff.write(window);
    held = held.length === 0 ? window : Buffer.concat([held, window]);
    offset += length;

    // Hand over every member that is now complete.
    while (next < chunks.length && chunks[next]!.compressedEnd <= offset) {
      const c = chunks[next++]!;
      if (options.isCached(c)) continue;
      await options.onMember(c, held.subarray(c.compressedOffset - heldFrom, c.compressedEnd - heldFrom));
      cachedChunks++;
    }
    // Drop what no remaining member needs.
    const keepFrom = next < chunks.length ? Math.min(chunks[next]!.compressedOffset, offset) : offset;
    if (keepFrom > heldFrom) {
      held = held.subarray(keepFrom - heldFrom);
      heldFrom = keepFrom;
    }
  }
  return { diffId: await diff.end(), fetchedBytes, cachedChunks, startOffset };
}

/** zstd: each frame decoded once complete; skippable frames (TOC, footer) give nothing. */
function zstdDiff(): DiffHasher {
  // Frames decode in the worker pool: a 4 MiB frame decoded here would stall every FUSE callback ~18 ms.
  const hasher = new ZstdDiffHasher(undefined, (frame, maxOutput) => zstdPool.all(frame, maxOutput));
  return { write: (window) => hasher.write(window), end: () => Promise.resolve().then(() => hasher.digest()) };
}

/** chainID of a layer: its diff_id for a base layer, else sha256 of "<parent chainID> <diff_id>". */
export function chainIdOf(parentChainId: string | undefined, diffId: string): string {
  if (!parentChainId) return diffId;
  return 'sha256:' + createHash('sha256').update(`${parentChainId} ${diffId}`).digest('hex');
}

/** Throws when the fetched layer is not the one its snapshot was committed as. */
export function checkChainId(expected: string, parentChainId: string | undefined, diffId: string): void {
  const actual = chainIdOf(parentChainId, diffId);
  if (actual !== expected) {
    throw new VerificationError(`layer content gives chainID ${actual} (diff_id ${diffId}), but it was committed as ${expected}`);
  }
}
