/**
 * zstd decoding for zstd:chunked layers, on top of @bokuweb/zstd-wasm, which has one-shot
 * ZSTD_decompress and no streaming API. One-shot decoding needs the output size up front, and frames
 * written by streaming encoders (the reference's klauspost/compress) do not declare it. So frames are
 * walked here, in TypeScript, block header by block header: that finds where each frame ends (what the
 * background pass needs to decode a blob as it streams in) and bounds its output without decoding (a
 * compressed block never regenerates more than min(window, 128 KiB); raw and RLE blocks say their size).
 * Skippable frames (the TOC and the footer) decode to nothing.
 */
import { createHash } from 'node:crypto';

import { decompress, init } from '@bokuweb/zstd-wasm';

import { EstargzFormatError } from '../errors';

const ZSTD_MAGIC = 0xfd2fb528;
/** Skippable frames: 0x184D2A50 to 0x184D2A5F. */
const SKIPPABLE_MAGIC_MASK = 0xfffffff0;
const SKIPPABLE_MAGIC = 0x184d2a50;
const BLOCK_HEADER_BYTES = 3;
const MAX_BLOCK_BYTES = 128 * 1024;
const CHECKSUM_BYTES = 4;
/** Default bound on what one frame may decode to (a reference chunk is 4 MiB plus the tar headers after it). */
export const DEFAULT_MAX_FRAME_OUTPUT_BYTES = 320 * 1024 * 1024;

/** zstd error codes (ZSTD_ErrorCode) worth naming. */
const ZSTD_ERRORS: Record<number, string> = {
  10: 'unknown frame descriptor',
  14: 'frame parameter unsupported',
  16: 'window too large',
  20: 'corrupted data',
  22: 'checksum mismatch',
  32: 'needs a dictionary',
  70: 'output larger than its bound',
  72: 'wrong compressed size',
};

let ready: Promise<void> | undefined;

/** Loads the zstd WebAssembly module, once per process (a second init() would replace the instance). */
export function zstdReady(): Promise<void> {
  ready ??= init();
  return ready;
}

export interface ZstdFrame {
  /** Offset just past the frame in the buffer scanned. */
  end: number;
  skippable: boolean;
  /** Frame_Content_Size when the header declares it. */
  contentSize?: number;
  /** Most the frame can decode to (contentSize when declared). */
  maxOutput: number;
}

/**
 * Walks the frame starting at `pos`: returns where it ends and how much it may decode to, or undefined
 * when `buf` ends first. Throws EstargzFormatError when the bytes are not a valid frame.
 */
export function scanZstdFrame(buf: Buffer, pos: number): ZstdFrame | undefined {
  if (pos + 4 > buf.length) return undefined;
  const magic = buf.readUInt32LE(pos);
  if ((magic & SKIPPABLE_MAGIC_MASK) >>> 0 === SKIPPABLE_MAGIC) {
    if (pos + 8 > buf.length) return undefined;
    const end = pos + 8 + buf.readUInt32LE(pos + 4);
    return end > buf.length ? undefined : { end, skippable: true, maxOutput: 0 };
  }
  if (magic !== ZSTD_MAGIC) throw new EstargzFormatError(`no zstd frame at offset ${pos} (magic 0x${magic.toString(16)})`);
  let p = pos + 4;
  if (p + 1 > buf.length) return undefined;
  const fhd = buf[p++]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd & 0x20) !== 0;
  if ((fhd & 0x08) !== 0) throw new EstargzFormatError(`zstd frame at offset ${pos}: reserved header bit set`);
  const hasChecksum = (fhd & 0x04) !== 0;
  const dictIdBytes = [0, 1, 2, 4][fhd & 0x03]!;
  const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  const headerRest = (singleSegment ? 0 : 1) + dictIdBytes + fcsBytes;
  if (p + headerRest > buf.length) return undefined;
  let windowSize = 0;
  if (!singleSegment) {
    const wd = buf[p++]!;
    const windowLog = 10 + (wd >> 3);
    const base = 2 ** windowLog;
    windowSize = base + (base / 8) * (wd & 7);
  }
  let dictId = 0;
  for (let i = 0; i < dictIdBytes; i++) dictId += buf[p++]! * 2 ** (8 * i);
  if (dictId !== 0) throw new EstargzFormatError(`zstd frame at offset ${pos} needs dictionary ${dictId}`);
  let contentSize: number | undefined;
  if (fcsBytes > 0) {
    let v = 0;
    for (let i = 0; i < fcsBytes; i++) v += buf[p++]! * 2 ** (8 * i);
    contentSize = fcsBytes === 2 ? v + 256 : v;
    if (!Number.isSafeInteger(contentSize)) throw new EstargzFormatError(`zstd frame at offset ${pos} declares an absurd size`);
    if (singleSegment) windowSize = contentSize;
  }
  const blockMax = Math.min(windowSize, MAX_BLOCK_BYTES);
  let maxOutput = 0;
  for (;;) {
    if (p + BLOCK_HEADER_BYTES > buf.length) return undefined;
    const h = buf[p]! | (buf[p + 1]! << 8) | (buf[p + 2]! << 16);
    p += BLOCK_HEADER_BYTES;
    const last = (h & 1) !== 0;
    const type = (h >> 1) & 3;
    const size = h >>> 3;
    if (type === 3) throw new EstargzFormatError(`zstd frame at offset ${pos}: reserved block type`);
    if (size > blockMax) throw new EstargzFormatError(`zstd frame at offset ${pos}: block of ${size} bytes, more than ${blockMax}`);
    if (type === 1) {
      p += 1; // RLE: one byte, repeated `size` times
      maxOutput += size;
    } else {
      p += size;
      maxOutput += type === 0 ? size : blockMax;
    }
    if (last) break;
  }
  if (hasChecksum) p += CHECKSUM_BYTES;
  if (p > buf.length) return undefined;
  if (contentSize !== undefined) {
    if (contentSize > maxOutput) {
      throw new EstargzFormatError(`zstd frame at offset ${pos} declares ${contentSize} bytes but its blocks hold at most ${maxOutput}`);
    }
    maxOutput = contentSize;
  }
  return { end: p, skippable: false, contentSize, maxOutput };
}

/** Decodes one complete, scanned, non-skippable frame into at most `capacity` bytes. Needs zstdReady(). */
function decodeFrame(frame: Buffer, info: ZstdFrame, capacity: number, where: number): Buffer {
  if (info.maxOutput === 0) return Buffer.alloc(0); // only empty blocks
  try {
    return Buffer.from(decompress(frame, { defaultHeapSize: Math.max(1, capacity) }));
  } catch (err) {
    const code = /code (-?\d+)/.exec(String((err as Error)?.message ?? err))?.[1];
    const n = code === undefined ? NaN : Math.abs(Number(code));
    const why = ZSTD_ERRORS[n] ?? (Number.isNaN(n) ? String(err) : `zstd error ${n}`);
    throw new EstargzFormatError(`corrupt zstd frame at offset ${where}: ${why}`);
  }
}

/**
 * Bytes [skip, skip + length) of what the frames in `member` decode to (a chunk's member: its frame, maybe
 * followed by others). Frames past what is needed are not decoded.
 */
export async function zstdRange(member: Buffer, skip: number, length: number, maxFrameOutput = DEFAULT_MAX_FRAME_OUTPUT_BYTES): Promise<Buffer> {
  if (length === 0) return Buffer.alloc(0);
  await zstdReady();
  const want = skip + length;
  const out = Buffer.allocUnsafe(length);
  let seen = 0;
  let filled = 0;
  let pos = 0;
  while (filled < length) {
    if (pos >= member.length) throw new EstargzFormatError(`zstd member holds ${seen} bytes, need ${want}`);
    const info = scanZstdFrame(member, pos);
    if (info === undefined) throw new EstargzFormatError(`zstd frame at offset ${pos} of the member is truncated`);
    if (!info.skippable) {
      if (info.maxOutput > maxFrameOutput) {
        throw new EstargzFormatError(`zstd frame at offset ${pos} may hold ${info.maxOutput} bytes, more than the limit of ${maxFrameOutput}`);
      }
      const data = decodeFrame(member.subarray(pos, info.end), info, info.maxOutput, pos);
      const from = Math.max(0, skip - seen);
      const to = Math.min(data.length, want - seen);
      if (to > from) filled += data.copy(out, filled, from, to);
      seen += data.length;
    }
    pos = info.end;
  }
  return out;
}

/**
 * Decodes all frames of `data` (skippable ones give nothing) into one buffer of at most `limit` bytes; for
 * the TOC, whose size the footer declares.
 */
export async function zstdDecompressAll(data: Buffer, limit: number): Promise<Buffer> {
  await zstdReady();
  const parts: Buffer[] = [];
  let total = 0;
  for (let pos = 0; pos < data.length; ) {
    const info = scanZstdFrame(data, pos);
    if (info === undefined) throw new EstargzFormatError(`zstd frame at offset ${pos} is truncated`);
    if (!info.skippable) {
      const room = limit - total;
      if (info.contentSize !== undefined && info.contentSize > room) {
        throw new EstargzFormatError(`zstd data is larger than the limit of ${limit} bytes`);
      }
      const frame = data.subarray(pos, info.end);
      let part: Buffer;
      try {
        part = decodeFrame(frame, info, Math.min(info.maxOutput, room), pos);
      } catch (err) {
        if (info.maxOutput > room && err instanceof EstargzFormatError && /larger than its bound/.test(err.message)) {
          throw new EstargzFormatError(`zstd data is larger than the limit of ${limit} bytes`);
        }
        throw err;
      }
      parts.push(part);
      total += part.length;
    }
    pos = info.end;
  }
  return Buffer.concat(parts, total);
}

/**
 * The diff_id of a zstd blob fed to it in order, piece by piece: decodes each frame once it is complete
 * and hashes the output. Holds at most one frame's compressed bytes plus one window.
 */
export class ZstdDiffHasher {
  private readonly hash = createHash('sha256');
  private pending: Buffer = Buffer.alloc(0);
  /** Blob offset of pending[0], for messages. */
  private pendingFrom = 0;

  /**
   * `decode`, when given, turns one complete frame into its bytes (at most maxOutput) instead of decoding it
   * here: the daemon passes zstdPool.all, so a blob's frames are not decoded on the thread that serves FUSE.
   */
  constructor(
    private readonly maxFrameOutput = DEFAULT_MAX_FRAME_OUTPUT_BYTES,
    private readonly decode?: (frame: Buffer, maxOutput: number) => Promise<Buffer>,
  ) {}

  async write(data: Buffer): Promise<void> {
    await zstdReady();
    this.pending = this.pending.length === 0 ? data : Buffer.concat([this.pending, data]);
    let pos = 0;
    for (;;) {
      const info = scanZstdFrame(this.pending, pos);
      if (info === undefined) break;
      if (!info.skippable) {
        const where = this.pendingFrom + pos;
        if (info.maxOutput > this.maxFrameOutput) {
          throw new EstargzFormatError(`zstd frame at offset ${where} may hold ${info.maxOutput} bytes, more than the limit of ${this.maxFrameOutput}`);
        }
        const frame = this.pending.subarray(pos, info.end);
        if (this.decode === undefined) this.hash.update(decodeFrame(frame, info, info.maxOutput, where));
        else {
          const data = await this.decode(frame, info.maxOutput).catch((err: unknown) => {
            // Name the frame by its offset in the blob, not in the piece handed to decode.
            throw err instanceof EstargzFormatError ? new EstargzFormatError(`blob offset ${where}: ${err.message}`) : err;
          });
          this.hash.update(data);
        }
      }
      pos = info.end;
      if (pos >= this.pending.length) break;
    }
    this.pending = this.pending.subarray(pos);
    this.pendingFrom += pos;
    if (this.pending.length > this.maxFrameOutput) {
      throw new EstargzFormatError(`zstd frame at offset ${this.pendingFrom} is larger than ${this.maxFrameOutput} bytes`);
    }
  }

  /** `sha256:<hex>` of everything decoded; throws when the blob ended inside a frame. */
  digest(): string {
    if (this.pending.length > 0) throw new EstargzFormatError(`zstd blob ends inside the frame at offset ${this.pendingFrom}`);
    return 'sha256:' + this.hash.digest('hex');
  }
}
