/**
 * Reading side of zstd:chunked (reference §1.9, estargz/zstdchunked): the blob ends with a skippable
 * frame whose 40-byte payload is LE u64 TOC offset (of the compressed TOC data, just past its own
 * skippable frame's 8-byte header), LE u64 compressed length, LE u64 uncompressed length, LE u64 manifest
 * type (1, the eStargz TOC schema) and the magic `GnUlInUx`. The TOC is the raw eStargz JSON, zstd-compressed.
 */
import { EstargzFormatError, errorMessage } from '../errors';
import { zstdDecompressAll } from './zstd-range';

/** Payload of the footer's skippable frame. */
export const ZSTD_CHUNKED_FOOTER_PAYLOAD_BYTES = 40;
/** The footer frame: 4-byte magic, 4-byte size, payload. */
export const ZSTD_CHUNKED_FOOTER_BYTES = 8 + ZSTD_CHUNKED_FOOTER_PAYLOAD_BYTES;
const SKIPPABLE_FRAME_HEADER_BYTES = 8;
const SKIPPABLE_MAGIC_MASK = 0xfffffff0;
const SKIPPABLE_MAGIC = 0x184d2a50;
const MANIFEST_TYPE_CRFS = 1n;
const MAGIC = Buffer.from('GnUlInUx', 'latin1');

export interface ZstdChunkedFooter {
  /** Blob offset of the compressed TOC (past its skippable frame header). */
  tocDataOffset: number;
  compressedLength: number;
  uncompressedLength: number;
}

/** Parses the last ZSTD_CHUNKED_FOOTER_BYTES of a blob; a string says why it is not a zstd:chunked footer. */
export function parseZstdChunkedFooter(tail: Buffer): ZstdChunkedFooter | string {
  if (tail.length < ZSTD_CHUNKED_FOOTER_BYTES) return `only ${tail.length} bytes available, need ${ZSTD_CHUNKED_FOOTER_BYTES}`;
  const f = tail.subarray(tail.length - ZSTD_CHUNKED_FOOTER_BYTES);
  const p = f.subarray(SKIPPABLE_FRAME_HEADER_BYTES);
  if (!p.subarray(32, 40).equals(MAGIC)) return 'magic GnUlInUx not found';
  if ((f.readUInt32LE(0) & SKIPPABLE_MAGIC_MASK) >>> 0 !== SKIPPABLE_MAGIC) return 'footer is not in a zstd skippable frame';
  if (f.readUInt32LE(4) !== ZSTD_CHUNKED_FOOTER_PAYLOAD_BYTES) {
    return `footer frame holds ${f.readUInt32LE(4)} bytes, want ${ZSTD_CHUNKED_FOOTER_PAYLOAD_BYTES}`;
  }
  const type = p.readBigUInt64LE(24);
  if (type !== MANIFEST_TYPE_CRFS) return `manifest type ${type} is not 1 (eStargz TOC)`;
  const fields = [p.readBigUInt64LE(0), p.readBigUInt64LE(8), p.readBigUInt64LE(16)];
  if (fields.some((v) => v > BigInt(Number.MAX_SAFE_INTEGER))) return 'TOC offset or length is too large';
  const [tocDataOffset, compressedLength, uncompressedLength] = fields.map(Number) as [number, number, number];
  return { tocDataOffset, compressedLength, uncompressedLength };
}

/** The part of a BlobSource this needs (as in toc.ts). */
interface RangeReadable {
  readonly size: number;
  readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer>;
}

export interface ZstdChunkedTocBytes {
  tocJson: Buffer;
  /** Blob offset of the TOC's skippable frame: chunk frames all end at or before it. */
  tocFrameOffset: number;
}

/**
 * Reads and decompresses the TOC a parsed footer points at. The TOC frame must sit right before the
 * footer, as the reference writes it, and decompress to exactly the declared length.
 */
export async function readZstdChunkedTocJson(
  blob: RangeReadable,
  footer: ZstdChunkedFooter,
  maxTocBytes: number,
  signal?: AbortSignal,
): Promise<ZstdChunkedTocBytes> {
  const { tocDataOffset, compressedLength, uncompressedLength } = footer;
  const footerStart = blob.size - ZSTD_CHUNKED_FOOTER_BYTES;
  if (tocDataOffset < SKIPPABLE_FRAME_HEADER_BYTES || tocDataOffset + compressedLength !== footerStart) {
    throw new EstargzFormatError(
      `zstd:chunked footer puts the TOC at ${tocDataOffset}+${compressedLength}, not right before the footer at ${footerStart}`,
    );
  }
  if (compressedLength > maxTocBytes) {
    throw new EstargzFormatError(`compressed TOC is ${compressedLength} bytes, more than the limit of ${maxTocBytes}`);
  }
  if (uncompressedLength > maxTocBytes) {
    throw new EstargzFormatError(`decompressed TOC is ${uncompressedLength} bytes, larger than the limit of ${maxTocBytes} bytes`);
  }
  const tocFrameOffset = tocDataOffset - SKIPPABLE_FRAME_HEADER_BYTES;
  const frame = await blob.readRange(tocFrameOffset, SKIPPABLE_FRAME_HEADER_BYTES + compressedLength, signal);
  if ((frame.readUInt32LE(0) & SKIPPABLE_MAGIC_MASK) >>> 0 !== SKIPPABLE_MAGIC || frame.readUInt32LE(4) !== compressedLength) {
    throw new EstargzFormatError(`no skippable frame of ${compressedLength} bytes holds the TOC at offset ${tocFrameOffset}`);
  }
  let tocJson: Buffer;
  try {
    tocJson = await zstdDecompressAll(frame.subarray(SKIPPABLE_FRAME_HEADER_BYTES), uncompressedLength);
  } catch (err) {
    throw new EstargzFormatError(`malformed zstd TOC at offset ${tocDataOffset}: ${errorMessage(err)}`);
  }
  if (tocJson.length !== uncompressedLength) {
    throw new EstargzFormatError(`zstd TOC decompresses to ${tocJson.length} bytes, the footer says ${uncompressedLength}`);
  }
  return { tocJson, tocFrameOffset };
}
