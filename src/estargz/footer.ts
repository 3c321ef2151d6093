import { EstargzFormatError } from '../errors';

/**
 * The footer is the last gzip member of a blob: an empty member whose gzip "extra" field says where
 * the TOC member starts. Two shapes exist: eStargz (51 bytes, RFC 1952 subfield 'S','G') and legacy
 * stargz from CRFS (47 bytes, the extra bytes are the payload itself).
 */

/** Size of the eStargz footer in bytes. */
export const FOOTER_SIZE_BYTES = 51;
/** Size of the legacy (CRFS stargz) footer in bytes. */
export const LEGACY_FOOTER_SIZE_BYTES = 47;

const GZIP_ID1 = 0x1f;
const GZIP_ID2 = 0x8b;
const GZIP_CM_DEFLATE = 8;
const GZIP_FLG_FEXTRA = 0x04;
/** OS byte our footer carries: "unknown", as the reference writer emits. */
const GZIP_OS_UNKNOWN = 0xff;
const GZIP_HEADER_BYTES = 10;
const MAGIC = 'STARGZ';
const TOC_OFFSET_HEX_DIGITS = 16;
/** 16 hex digits + "STARGZ". */
const PAYLOAD_BYTES = TOC_OFFSET_HEX_DIGITS + MAGIC.length;
/** Subfield header: SI1, SI2 and a 2-byte little-endian LEN. */
const SUBFIELD_HEADER_BYTES = 4;
/** A final stored deflate block holding nothing: BFINAL=1/BTYPE=00, LEN=0, NLEN=0xffff. */
const EMPTY_STORED_BLOCK = Buffer.from([0x01, 0x00, 0x00, 0xff, 0xff]);
/** CRC32 and ISIZE of an empty member, both zero. */
const GZIP_TRAILER_BYTES = 8;

export interface Footer {
  /** Compressed offset of the gzip member holding the TOC tar entry. */
  tocOffset: number;
  /** Which footer matched: FOOTER_SIZE_BYTES or LEGACY_FOOTER_SIZE_BYTES. */
  footerSize: number;
}

/** Builds the 51-byte eStargz footer pointing at the TOC member at `tocOffset`. */
export function encodeFooter(tocOffset: number): Buffer {
  if (!Number.isSafeInteger(tocOffset) || tocOffset < 0) {
    throw new RangeError(`TOC offset ${tocOffset} is not a non-negative safe integer`);
  }
  const out = Buffer.alloc(FOOTER_SIZE_BYTES);
  out[0] = GZIP_ID1;
  out[1] = GZIP_ID2;
  out[2] = GZIP_CM_DEFLATE;
  out[3] = GZIP_FLG_FEXTRA;
  // MTIME (4 bytes) and XFL stay zero.
  out[9] = GZIP_OS_UNKNOWN;
  let pos = GZIP_HEADER_BYTES;
  out.writeUInt16LE(SUBFIELD_HEADER_BYTES + PAYLOAD_BYTES, pos);
  pos += 2;
  out[pos++] = 'S'.charCodeAt(0);
  out[pos++] = 'G'.charCodeAt(0);
  out.writeUInt16LE(PAYLOAD_BYTES, pos);
  pos += 2;
  pos += out.write(tocOffset.toString(16).padStart(TOC_OFFSET_HEX_DIGITS, '0') + MAGIC, pos, 'latin1');
  pos += EMPTY_STORED_BLOCK.copy(out, pos);
  // CRC32 and ISIZE stay zero.
  if (pos + GZIP_TRAILER_BYTES !== FOOTER_SIZE_BYTES) {
    throw new Error(`internal: footer is ${pos + GZIP_TRAILER_BYTES} bytes`);
  }
  return out;
}

/**
 * Parses the footer from the tail of a blob (pass the last FOOTER_SIZE_BYTES bytes, or all of the blob
 * when it is shorter). Tries eStargz first, then legacy on the last 47 bytes, like the reference reader.
 * Throws EstargzFormatError naming both failures when neither matches.
 */
export function parseFooter(tail: Buffer): Footer {
  const failures: string[] = [];
  if (tail.length >= FOOTER_SIZE_BYTES) {
    const r = parseEstargzFooter(tail.subarray(tail.length - FOOTER_SIZE_BYTES));
    if (typeof r === 'number') return { tocOffset: r, footerSize: FOOTER_SIZE_BYTES };
    failures.push(`eStargz footer: ${r.error}`);
  } else {
    failures.push(`eStargz footer: only ${tail.length} bytes available, need ${FOOTER_SIZE_BYTES}`);
  }
  if (tail.length >= LEGACY_FOOTER_SIZE_BYTES) {
    const r = parseLegacyFooter(tail.subarray(tail.length - LEGACY_FOOTER_SIZE_BYTES));
    if (typeof r === 'number') return { tocOffset: r, footerSize: LEGACY_FOOTER_SIZE_BYTES };
    failures.push(`legacy stargz footer: ${r.error}`);
  } else {
    failures.push(`legacy stargz footer: only ${tail.length} bytes available, need ${LEGACY_FOOTER_SIZE_BYTES}`);
  }
  throw new EstargzFormatError(`not an eStargz layer (no stargz footer at the end of the blob): ${failures.join('; ')}`);
}

interface ParseFailure {
  error: string;
}

/** 51 bytes: gzip header with XLEN=26, subfield 'S','G' LEN=22, payload, empty body. */
function parseEstargzFooter(p: Buffer): number | ParseFailure {
  const header = checkGzipHeader(p);
  if (header !== undefined) return header;
  const xlen = p.readUInt16LE(GZIP_HEADER_BYTES);
  if (xlen !== SUBFIELD_HEADER_BYTES + PAYLOAD_BYTES) {
    return { error: `extra field is ${xlen} bytes, want ${SUBFIELD_HEADER_BYTES + PAYLOAD_BYTES}` };
  }
  const extra = GZIP_HEADER_BYTES + 2;
  if (p[extra] !== 'S'.charCodeAt(0) || p[extra + 1] !== 'G'.charCodeAt(0)) {
    return { error: `subfield id is 0x${p.subarray(extra, extra + 2).toString('hex')}, want 'SG'` };
  }
  const len = p.readUInt16LE(extra + 2);
  if (len !== PAYLOAD_BYTES) return { error: `subfield is ${len} bytes, want ${PAYLOAD_BYTES}` };
  return finishFooter(p, extra + SUBFIELD_HEADER_BYTES);
}

/** 47 bytes: gzip header with XLEN=22 whose extra bytes are the payload directly. */
function parseLegacyFooter(p: Buffer): number | ParseFailure {
  const header = checkGzipHeader(p);
  if (header !== undefined) return header;
  const xlen = p.readUInt16LE(GZIP_HEADER_BYTES);
  if (xlen !== PAYLOAD_BYTES) return { error: `extra field is ${xlen} bytes, want ${PAYLOAD_BYTES}` };
  return finishFooter(p, GZIP_HEADER_BYTES + 2);
}

function checkGzipHeader(p: Buffer): ParseFailure | undefined {
  if (p[0] !== GZIP_ID1 || p[1] !== GZIP_ID2) return { error: 'no gzip magic number' };
  if (p[2] !== GZIP_CM_DEFLATE) return { error: `gzip compression method ${p[2]} is not deflate` };
  // Only FEXTRA fits in the fixed footer size; FNAME/FCOMMENT/FHCRC would shift every field.
  if (p[3] !== GZIP_FLG_FEXTRA) return { error: `gzip flags 0x${p[3].toString(16)}, want FEXTRA only` };
  return undefined;
}

/** Reads the hex offset and magic at `at`, then checks the member decompresses to nothing. */
function finishFooter(p: Buffer, at: number): number | ParseFailure {
  const payload = p.subarray(at, at + PAYLOAD_BYTES).toString('latin1');
  if (payload.slice(TOC_OFFSET_HEX_DIGITS) !== MAGIC) return { error: 'magic string STARGZ not found' };
  const hex = payload.slice(0, TOC_OFFSET_HEX_DIGITS);
  if (!/^[0-9a-fA-F]{16}$/.test(hex)) return { error: `TOC offset ${JSON.stringify(hex)} is not hexadecimal` };
  const offset = BigInt('0x' + hex);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER)) return { error: `TOC offset 0x${hex} is too large` };
  const trailer = p.subarray(p.length - GZIP_TRAILER_BYTES);
  if (trailer.readUInt32LE(0) !== 0 || trailer.readUInt32LE(4) !== 0) {
    return { error: 'footer gzip member is not empty (CRC32/ISIZE non-zero)' };
  }
  return Number(offset);
}
