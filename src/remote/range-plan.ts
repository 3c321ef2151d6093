/**
 * Planning and bookkeeping for multi-range reads: requested ranges are sorted and merged (overlapping or
 * adjacent ones become one, as the reference does), the answer's bytes are copied into one buffer per
 * merged range, and what the server did not send is listed so it can be fetched with single ranges.
 */
import type { ByteRange } from './blob-source';

/** A merged range and its destination buffer. */
export interface MergedRange extends ByteRange {
  readonly buffer: Buffer;
}

export interface RangePlan {
  /** Sorted, disjoint, non-adjacent. */
  readonly merged: MergedRange[];
  /** For each requested range (in the caller's order): index into `merged` and offset inside it. */
  readonly slots: ReadonlyArray<{ readonly merged: number; readonly delta: number }>;
}

export function planRanges(ranges: readonly ByteRange[]): RangePlan {
  const order = ranges.map((_, i) => i).filter((i) => (ranges[i] as ByteRange).length > 0);
  order.sort((a, b) => (ranges[a] as ByteRange).offset - (ranges[b] as ByteRange).offset);
  const spans: { offset: number; end: number }[] = [];
  const slotMerged = new Array<number>(ranges.length).fill(-1);
  for (const i of order) {
    const r = ranges[i] as ByteRange;
    const last = spans[spans.length - 1];
    if (last !== undefined && r.offset <= last.end) {
      last.end = Math.max(last.end, r.offset + r.length);
    } else {
      spans.push({ offset: r.offset, end: r.offset + r.length });
    }
    slotMerged[i] = spans.length - 1;
  }
  const merged = spans.map((s) => ({ offset: s.offset, length: s.end - s.offset, buffer: Buffer.allocUnsafe(s.end - s.offset) }));
  const slots = ranges.map((r, i) => {
    const m = slotMerged[i] as number;
    return m < 0 ? { merged: -1, delta: 0 } : { merged: m, delta: r.offset - (merged[m] as MergedRange).offset };
  });
  return { merged, slots };
}

/** The caller's Buffers out of a filled plan. */
export function resultsOf(plan: RangePlan, ranges: readonly ByteRange[]): Buffer[] {
  return ranges.map((r, i) => {
    const slot = plan.slots[i] as { merged: number; delta: number };
    if (slot.merged < 0) return Buffer.alloc(0);
    return (plan.merged[slot.merged] as MergedRange).buffer.subarray(slot.delta, slot.delta + r.length);
  });
}

/**
 * Copies bytes that arrive for blob offsets into the merged ranges they overlap and remembers which bytes
 * are filled, so duplicates or missing parts in a server's answer are caught.
 */
export class RangeFiller {
  /** Per merged range: filled [start, end) intervals relative to the range, unsorted. */
  private readonly filled: Array<Array<[number, number]>>;
  /** End (exclusive) of the last merged range: bytes past it are never needed. */
  readonly end: number;
  private hint = 0;

  constructor(private readonly merged: readonly MergedRange[]) {
    this.filled = merged.map(() => []);
    const last = merged[merged.length - 1];
    this.end = last === undefined ? 0 : last.offset + last.length;
  }

  /** Takes `data` found at blob offset `offset`. */
  add(offset: number, data: Buffer): void {
    const dataEnd = offset + data.length;
    // Parts arrive mostly in order: start the scan where the last one ended.
    let i = this.hint < this.merged.length && (this.merged[this.hint] as MergedRange).offset <= offset ? this.hint : 0;
    for (; i < this.merged.length; i++) {
      const m = this.merged[i] as MergedRange;
      const mEnd = m.offset + m.length;
      if (m.offset >= dataEnd) break;
      if (mEnd <= offset) continue;
      const from = Math.max(offset, m.offset);
      const to = Math.min(dataEnd, mEnd);
      data.copy(m.buffer, from - m.offset, from - offset, to - offset);
      const iv = this.filled[i] as Array<[number, number]>;
      const last = iv[iv.length - 1];
      if (last !== undefined && last[1] === from - m.offset) last[1] = to - m.offset;
      else iv.push([from - m.offset, to - m.offset]);
      this.hint = i;
    }
  }

  /** Blob ranges not filled yet, as (merged index, blob range). */
  missing(): Array<{ index: number; offset: number; length: number }> {
    const out: Array<{ index: number; offset: number; length: number }> = [];
    this.merged.forEach((m, index) => {
      const iv = (this.filled[index] as Array<[number, number]>).slice().sort((a, b) => a[0] - b[0]);
      let pos = 0;
      for (const [s, e] of iv) {
        if (s > pos) out.push({ index, offset: m.offset + pos, length: s - pos });
        pos = Math.max(pos, e);
      }
      if (pos < m.length) out.push({ index, offset: m.offset + pos, length: m.length - pos });
    });
    return out;
  }

  /** Copies a separately fetched piece into its merged range. */
  fill(index: number, offset: number, data: Buffer): void {
    const m = this.merged[index] as MergedRange;
    data.copy(m.buffer, offset - m.offset);
    (this.filled[index] as Array<[number, number]>).push([offset - m.offset, offset - m.offset + data.length]);
  }
}
