/**
 * zstd:chunked layers (reference §1.9, estargz/zstdchunked): the eStargz layout with every gzip member
 * replaced by a zstd frame, the TOC (raw JSON, not a tar entry) zstd-compressed inside a skippable frame,
 * and a skippable-frame footer whose 40-byte payload locates it.
 *
 * We do not write a second builder: the eStargz writer makes the layer (with gzip level 0, so its members
 * are cheap stored blocks), and this module transcodes it member by member. Member boundaries are exactly
 * the TOC's payload offsets (plus 0 and the TOC member); each member is inflated, recompressed as one zstd
 * frame, and the TOC's offsets are remapped. Only one member is in memory at a time.
 *
 * As in the reference, the TOC and footer decompress to nothing, so the diff_id covers the entries only (no
 * TOC entry, no tar end-of-archive blocks).
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { gunzipSync } from 'node:zlib';
import { compress } from '@bokuweb/zstd-wasm';
import { EstargzFormatError } from '../errors';
import { readToc } from '../estargz/toc';
import { zstdReady } from '../estargz/zstd-range';

/** The reference's default zstd level for zstd:chunked. */
export const DEFAULT_ZSTD_COMPRESSION_LEVEL = 3;
export const MAX_ZSTD_COMPRESSION_LEVEL = 22;
/** Payload of the footer's skippable frame. */
export const ZSTD_CHUNKED_FOOTER_PAYLOAD_BYTES = 40;
/** `manifest type` in the footer: the CRFS (eStargz) TOC schema. */
const MANIFEST_TYPE_CRFS = 1;
const SKIPPABLE_FRAME_MAGIC = Buffer.from([0x50, 0x2a, 0x4d, 0x18]);
/** `GnUlInUx`, the last 8 bytes of every zstd:chunked blob. */
export const ZSTD_CHUNKED_MAGIC = Buffer.from([0x47, 0x6e, 0x55, 0x6c, 0x49, 0x6e, 0x55, 0x78]);

export interface ZstdChunkedResult {
  /** `sha256:` of the uncompressed TOC JSON (the toc.digest annotation). */
  tocDigest: string;
  diffId: string;
  blobDigest: string;
  blobSize: number;
  uncompressedSize: number;
  /** `sha256:` of the compressed TOC (manifest-checksum annotation). */
  manifestChecksum: string;
  /** `offset:compressedLength:uncompressedLength:1` (manifest-position annotation). */
  manifestPosition: string;
}

function skippableFrame(payload: Buffer): Buffer {
  const size = Buffer.alloc(4);
  size.writeUInt32LE(payload.length);
  return Buffer.concat([SKIPPABLE_FRAME_MAGIC, size, payload]);
}

/** The 48 bytes that end a zstd:chunked blob. */
export function encodeZstdChunkedFooter(tocOffset: number, compressedLength: number, uncompressedLength: number): Buffer {
  const p = Buffer.alloc(ZSTD_CHUNKED_FOOTER_PAYLOAD_BYTES);
  p.writeBigUInt64LE(BigInt(tocOffset), 0);
  p.writeBigUInt64LE(BigInt(compressedLength), 8);
  p.writeBigUInt64LE(BigInt(uncompressedLength), 16);
  p.writeBigUInt64LE(BigInt(MANIFEST_TYPE_CRFS), 24);
  ZSTD_CHUNKED_MAGIC.copy(p, 32);
  return skippableFrame(p);
}

/** Transcodes the eStargz blob in `esgzFile` into a zstd:chunked blob at `outFile`. */
export async function transcodeToZstdChunked(esgzFile: string, outFile: string, level: number, onBytes?: (n: number) => void): Promise<ZstdChunkedResult> {
  if (!Number.isInteger(level) || level < 1 || level > MAX_ZSTD_COMPRESSION_LEVEL) throw new RangeError(`zstd level ${level} is not 1-${MAX_ZSTD_COMPRESSION_LEVEL}`);
  await zstdReady();
  const input = await open(esgzFile, 'r');
  const output = await open(outFile, 'w');
  try {
    const { size } = await input.stat();
    const readRange = async (offset: number, length: number): Promise<Buffer> => {
      const buf = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await input.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) throw new EstargzFormatError(`${esgzFile} ended at ${offset + done}`);
        done += bytesRead;
      }
      return buf;
    };
    const { tocJson, tocOffset } = await readToc({ size, readRange });
    const doc = JSON.parse(tocJson.toString('utf8')) as { entries: Array<Record<string, unknown>> };

    const starts = new Set<number>([0]);
    for (const e of doc.entries) if (typeof e.offset === 'number' && e.offset > 0 && e.offset < tocOffset) starts.add(e.offset);
    const boundaries = [...starts].sort((a, b) => a - b);
    boundaries.push(tocOffset);

    const blobHash = createHash('sha256');
    const diffHash = createHash('sha256');
    let uncompressed = 0;
    let written = 0;
    const write = async (data: Buffer): Promise<void> => {
      blobHash.update(data);
      let done = 0;
      while (done < data.length) done += (await output.write(data, done, data.length - done, written + done)).bytesWritten;
      written += data.length;
      onBytes?.(data.length);
    };
    const remap = new Map<number, number>();
    for (let i = 0; i + 1 < boundaries.length; i++) {
      const start = boundaries[i] as number;
      const end = boundaries[i + 1] as number;
      remap.set(start, written);
      if (end === start) continue;
      const raw = gunzipSync(await readRange(start, end - start));
      diffHash.update(raw);
      uncompressed += raw.length;
      await write(Buffer.from(compress(raw, level)));
    }
    for (const e of doc.entries) {
      if (typeof e.offset !== 'number' || e.offset === 0) continue;
      const moved = remap.get(e.offset);
      if (moved === undefined) throw new EstargzFormatError(`TOC entry ${JSON.stringify(e.name)} has offset ${e.offset}, which is not a member start`);
      e.offset = moved;
    }
    const json = Buffer.from(JSON.stringify(doc, null, '\t'), 'utf8');
    const compressedToc = Buffer.from(compress(json, level));
    const tocDataOffset = written + 8; // after the skippable frame's magic and size
    await write(skippableFrame(compressedToc));
    await write(encodeZstdChunkedFooter(tocDataOffset, compressedToc.length, json.length));
    return {
      tocDigest: 'sha256:' + createHash('sha256').update(json).digest('hex'),
      diffId: 'sha256:' + diffHash.digest('hex'),
      blobDigest: 'sha256:' + blobHash.digest('hex'),
      blobSize: written,
      uncompressedSize: uncompressed,
      manifestChecksum: 'sha256:' + createHash('sha256').update(compressedToc).digest('hex'),
      manifestPosition: `${tocDataOffset}:${compressedToc.length}:${json.length}:${MANIFEST_TYPE_CRFS}`,
    };
  } finally {
    await input.close();
    await output.close();
  }
}
