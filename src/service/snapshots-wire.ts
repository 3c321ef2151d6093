/**
 * The protobuf encoding of the Snapshots answers that carry infos (containerd.services.snapshots.v1
 * ListSnapshotsResponse and StatSnapshotResponse), written straight from SnapshotInfo into one buffer.
 *
 * Why by hand: proto-loader's serializer builds a message object per info (and a Timestamp and a Long per time)
 * before it encodes it, so a List of every snapshot on a busy node made two object trees per snapshot besides the
 * rows themselves. Here each message is sized in one pass and written in a second, with nothing built between.
 * The output is proto3 as Go writes it (fields at their defaults are left out); any protobuf decoder reads it
 * as the same message (test/unit/service/snapshots-wire.test.ts decodes it with proto-loader's).
 *
 * Field numbers, from proto/containerd/services/snapshots/v1/snapshots.proto and google/protobuf/timestamp.proto:
 *   ListSnapshotsResponse { repeated Info info = 1 }   StatSnapshotResponse { Info info = 1 }
 *   Info { string name = 1; string parent = 2; Kind kind = 3; Timestamp created_at = 4; Timestamp updated_at = 5;
 *          map<string, string> labels = 6 }   (a map entry: { string key = 1; string value = 2 })
 *   Timestamp { int64 seconds = 1; int32 nanos = 2 }
 */
import type { SnapshotInfo, SnapshotKind, TimestampNs } from '../snapshot/snapshot-info';

/** Kind's enum numbers: UNKNOWN = 0, VIEW = 1, ACTIVE = 2, COMMITTED = 3. */
const KIND_NUMBER: Record<SnapshotKind, number> = { view: 1, active: 2, committed: 3 };
const NS_PER_S = 1_000_000_000n;

// Tags: field number << 3 | wire type (0 varint, 2 length-delimited).
const TAG_INFO = (1 << 3) | 2;
const TAG_NAME = (1 << 3) | 2;
const TAG_PARENT = (2 << 3) | 2;
const TAG_KIND = (3 << 3) | 0;
const TAG_CREATED_AT = (4 << 3) | 2;
const TAG_UPDATED_AT = (5 << 3) | 2;
const TAG_LABEL = (6 << 3) | 2;
const TAG_ENTRY_KEY = (1 << 3) | 2;
const TAG_ENTRY_VALUE = (2 << 3) | 2;
const TAG_SECONDS = (1 << 3) | 0;
const TAG_NANOS = (2 << 3) | 0;

/** Bytes of the varint of `n`, a non-negative integer below 2^53. */
function varintSize(n: number): number {
  let size = 1;
  while (n >= 128) {
    n = Math.floor(n / 128);
    size++;
  }
  return size;
}

/** Seconds and nanos of a Timestamp (nanos in [0, 1e9), as protobuf requires). */
function split(ns: TimestampNs): { seconds: bigint; nanos: number } {
  let seconds = ns / NS_PER_S;
  let nanos = ns % NS_PER_S;
  if (nanos < 0n) {
    seconds -= 1n;
    nanos += NS_PER_S;
  }
  return { seconds, nanos: Number(nanos) };
}

/**
 * Writes infos: sizes them first (lengths of strings and sub-messages kept in `lengths`, in the order they are
 * written), then writes them.
 */
class InfoEncoder {
  /** Byte lengths found by the sizing pass, consumed in the same order by the writing pass. */
  private readonly lengths: number[] = [];
  private read = 0;
  private buf: Buffer = Buffer.alloc(0);
  private pos = 0;

  private stringSize(s: string): number {
    const n = Buffer.byteLength(s);
    this.lengths.push(n);
    return varintSize(n) + n;
  }

  /** A Timestamp message's body size; its two numbers are kept for the writer. */
  private timestampSize(ns: TimestampNs): number {
    const { seconds, nanos } = split(ns);
    let size = 0;
    if (seconds !== 0n) size += 1 + (seconds < 0n ? 10 : varintSize(Number(seconds)));
    if (nanos !== 0) size += 1 + varintSize(nanos);
    this.lengths.push(size);
    return size;
  }

  /** The size of one Info's body; pushes its own length first, then the lengths inside it. */
  infoSize(info: SnapshotInfo): number {
    const slot = this.lengths.length;
    this.lengths.push(0);
    let size = 0;
    if (info.name !== '') size += 1 + this.stringSize(info.name);
    if (info.parent !== '') size += 1 + this.stringSize(info.parent);
    size += 1 + varintSize(KIND_NUMBER[info.kind]);
    const created = this.timestampSize(info.createdAt);
    size += 1 + varintSize(created) + created;
    const updated = this.timestampSize(info.updatedAt);
    size += 1 + varintSize(updated) + updated;
    for (const key in info.labels) {
      const entrySlot = this.lengths.length;
      this.lengths.push(0);
      const entry = 1 + this.stringSize(key) + 1 + this.stringSize(info.labels[key]!);
      this.lengths[entrySlot] = entry;
      size += 1 + varintSize(entry) + entry;
    }
    this.lengths[slot] = size;
    return size;
  }

  start(size: number): void {
    this.buf = Buffer.allocUnsafe(size);
    this.pos = 0;
    this.read = 0;
  }

  finish(): Buffer {
    if (this.pos !== this.buf.length) throw new Error(`snapshot info encoding wrote ${this.pos} of ${this.buf.length} bytes`);
    return this.buf;
  }

  private varint(n: number): void {
    while (n >= 128) {
      this.buf[this.pos++] = (n % 128) | 128;
      n = Math.floor(n / 128);
    }
    this.buf[this.pos++] = n;
  }

  /** A negative int64: ten bytes of its two's complement. */
  private negativeVarint(n: bigint): void {
    let u = BigInt.asUintN(64, n);
    for (let i = 0; i < 9; i++) {
      this.buf[this.pos++] = Number(u & 127n) | 128;
      u >>= 7n;
    }
    this.buf[this.pos++] = Number(u);
  }

  private string(tag: number, s: string): void {
    const n = this.lengths[this.read++]!;
    this.buf[this.pos++] = tag;
    this.varint(n);
    this.pos += this.buf.write(s, this.pos, n, 'utf8');
  }

  private timestamp(tag: number, ns: TimestampNs): void {
    const size = this.lengths[this.read++]!;
    this.buf[this.pos++] = tag;
    this.varint(size);
    const { seconds, nanos } = split(ns);
    if (seconds !== 0n) {
      this.buf[this.pos++] = TAG_SECONDS;
      if (seconds < 0n) this.negativeVarint(seconds);
      else this.varint(Number(seconds));
    }
    if (nanos !== 0) {
      this.buf[this.pos++] = TAG_NANOS;
      this.varint(nanos);
    }
  }

  /** One Info as a length-delimited field `tag`. */
  info(tag: number, info: SnapshotInfo): void {
    this.buf[this.pos++] = tag;
    this.varint(this.lengths[this.read++]!);
    if (info.name !== '') this.string(TAG_NAME, info.name);
    if (info.parent !== '') this.string(TAG_PARENT, info.parent);
    this.buf[this.pos++] = TAG_KIND;
    this.varint(KIND_NUMBER[info.kind]);
    this.timestamp(TAG_CREATED_AT, info.createdAt);
    this.timestamp(TAG_UPDATED_AT, info.updatedAt);
    for (const key in info.labels) {
      this.buf[this.pos++] = TAG_LABEL;
      this.varint(this.lengths[this.read++]!);
      this.string(TAG_ENTRY_KEY, key);
      this.string(TAG_ENTRY_VALUE, info.labels[key]!);
    }
  }
}

/** ListSnapshotsResponse { info: infos }. */
export function encodeListResponse(infos: readonly SnapshotInfo[]): Buffer {
  const enc = new InfoEncoder();
  let size = 0;
  for (const info of infos) {
    const body = enc.infoSize(info);
    size += 1 + varintSize(body) + body;
  }
  enc.start(size);
  for (const info of infos) enc.info(TAG_INFO, info);
  return enc.finish();
}

/** StatSnapshotResponse { info }: the same bytes as a List answer of the one info. */
export function encodeStatResponse(info: SnapshotInfo): Buffer {
  return encodeListResponse([info]);
}
