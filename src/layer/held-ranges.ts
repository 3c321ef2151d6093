/**
 * Blob bytes a profile's prefetch downloaded, held for the background pass. That pass reads the whole blob front
 * to back because the chainID check hashes every byte of it; without these it would download the profiled
 * members a second time. It asks read() for its windows, which copies what is held and fetches only the gaps
 * (in one multi-range request where the registry allows), and lets go of what lies behind the window.
 *
 * Bounded twice: per layer (`maxBytes`) and per process (a HeldBudget all layers share, since a layer's pass can
 * wait indefinitely behind other layers and the quiet-link gate). A span past either bound is not held and the
 * pass downloads it again, as it does for a layer whose prefetch failed. What is let go returns to the budget.
 * The bytes were checked chunk by chunk when prefetched; the pass hashes them anyway.
 */
import type { ByteRange } from '../remote/blob-source';

/** Compressed bytes held per layer at most: a profile's members beyond that are downloaded again in the background. */
export const HELD_PROFILE_BYTES = 64 * 1024 * 1024;

/** Compressed bytes held by all layers of a process at most (20 profiled layers would otherwise hold 1.3 GB). */
export const HELD_PROFILE_TOTAL_BYTES = 256 * 1024 * 1024;

/** The process-wide bound on held profile bytes, shared by every layer's HeldRanges (layers.ts makes it). */
export class HeldBudget {
  /** Bytes held now, by all layers together. */
  private used = 0;

  constructor(readonly maxBytes = HELD_PROFILE_TOTAL_BYTES) {}

  get bytes(): number {
    return this.used;
  }

  /** Counts `n` more bytes as held; false (nothing counted) when that would pass the bound. */
  take(n: number): boolean {
    if (this.used + n > this.maxBytes) return false;
    this.used += n;
    return true;
  }

  /** `n` held bytes were let go. */
  give(n: number): void {
    this.used = Math.max(0, this.used - n);
  }
}

interface Held {
  offset: number;
  bytes: Buffer;
}

export class HeldRanges {
  /** Sorted by offset, disjoint. */
  private spans: Held[] = [];
  private heldBytes = 0;

  constructor(
    private readonly maxBytes = HELD_PROFILE_BYTES,
    /** Shared with the other layers of the process; absent: only the per-layer bound. */
    private readonly budget?: HeldBudget,
  ) {}

  get bytes(): number {
    return this.heldBytes;
  }

  /**
   * Holds blob bytes [offset, offset + bytes.length); false when that would pass the bound or overlap a held span.
   * A binary search and one insert: a profile's thousands of spans arrive on the main thread, in profile order.
   */
  add(offset: number, bytes: Buffer): boolean {
    const end = offset + bytes.length;
    if (bytes.length === 0 || this.heldBytes + bytes.length > this.maxBytes) return false;
    // Disjoint and sorted: only the neighbours either side of the insert point can overlap.
    const at = this.firstStartingAtOrAfter(offset);
    const before = this.spans[at - 1];
    const after = this.spans[at];
    if (before !== undefined && before.offset + before.bytes.length > offset) return false;
    if (after !== undefined && after.offset < end) return false;
    if (this.budget !== undefined && !this.budget.take(bytes.length)) return false;
    this.spans.splice(at, 0, { offset, bytes });
    this.heldBytes += bytes.length;
    return true;
  }

  /**
   * Blob bytes [offset, offset + length): held parts copied, the gaps from `fetch` (all of them in one call).
   * Held spans that end by the end of the range are let go: the pass never reads behind itself.
   */
  async read(offset: number, length: number, fetch: (gaps: readonly ByteRange[]) => Promise<Buffer[]>): Promise<Buffer> {
    const end = offset + length;
    const inside: Held[] = [];
    // Spans are disjoint, so their ends are sorted too: those inside the window follow one another.
    for (let i = Math.max(0, this.firstStartingAtOrAfter(offset) - 1); i < this.spans.length && this.spans[i]!.offset < end; i++) {
      const s = this.spans[i]!;
      if (offset < s.offset + s.bytes.length) inside.push(s);
    }
    if (inside.length === 0) return (await fetch([{ offset, length }]))[0]!;
    const gaps: ByteRange[] = [];
    let at = offset;
    for (const s of inside) {
      if (s.offset > at) gaps.push({ offset: at, length: s.offset - at });
      at = Math.max(at, s.offset + s.bytes.length);
    }
    if (at < end) gaps.push({ offset: at, length: end - at });
    const fetched = gaps.length > 0 ? await fetch(gaps) : [];
    const out = Buffer.allocUnsafe(length);
    for (const s of inside) {
      const from = Math.max(offset, s.offset);
      const to = Math.min(end, s.offset + s.bytes.length);
      s.bytes.copy(out, from - offset, from - s.offset, to - s.offset);
    }
    gaps.forEach((g, i) => fetched[i]!.copy(out, g.offset - offset, 0, g.length));
    this.release(end);
    return out;
  }

  /** Lets go of everything (the layer closed, or the pass is over). */
  clear(): void {
    this.budget?.give(this.heldBytes);
    this.spans = [];
    this.heldBytes = 0;
  }

  /** Lets go of the spans that end by `upTo`: a prefix, since disjoint sorted spans have sorted ends. */
  private release(upTo: number): void {
    let n = 0;
    let freed = 0;
    for (; n < this.spans.length && this.spans[n]!.offset + this.spans[n]!.bytes.length <= upTo; n++) freed += this.spans[n]!.bytes.length;
    if (n === 0) return;
    this.spans.splice(0, n);
    this.heldBytes -= freed;
    this.budget?.give(freed);
  }

  /** Index of the first span starting at or after `offset` (spans.length when none does). */
  private firstStartingAtOrAfter(offset: number): number {
    let lo = 0;
    let hi = this.spans.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.spans[mid]!.offset < offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
