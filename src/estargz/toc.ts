import { createHash } from 'node:crypto';
import { promisify } from 'node:util';
import { gunzip, type InputType, type ZlibOptions } from 'node:zlib';

import { EstargzFormatError, errorCode, errorMessage } from '../errors';
import { normalizeEntryName } from './entry-name';
import { FOOTER_SIZE_BYTES, LEGACY_FOOTER_SIZE_BYTES, parseFooter } from './footer';
import { modtimeMs } from './modtime';
import { TAR_BLOCK_BYTES, TYPEFLAG, decodeTarHeader, parsePaxRecords, tarPaddingBytes } from './tar-header';
import { ZSTD_CHUNKED_FOOTER_BYTES, parseZstdChunkedFooter, readZstdChunkedTocJson } from './zstd-chunked-footer';

/**
 * The table of contents (`stargz.index.json`): its types with the reference JSON names, a strict
 * parser (the TOC comes from a registry and is hostile until verified), and `readToc`, which finds and
 * decodes it at the end of a blob.
 */

/** Default bound on the TOC JSON, compressed and decompressed. */
export const MAX_TOC_BYTES = 64 * 1024 * 1024;
/** Default bound on the number of TOC entries. */
export const MAX_TOC_ENTRIES = 1_000_000;
/** Name of the TOC tar entry. */
export const TOC_TAR_NAME = 'stargz.index.json';
export const TOC_VERSION = 1;
/** Room in the decompressed TOC member beyond the JSON: headers (maybe PAX), padding, EOF blocks. */
const TOC_TAR_OVERHEAD_BYTES = 64 * 1024;
/** Root-level file that marks the end of the prioritized (prefetched) files. */
export const PREFETCH_LANDMARK = '.prefetch.landmark';
/** Root-level file that says: do not prefetch this layer. */
export const NO_PREFETCH_LANDMARK = '.no.prefetch.landmark';
/** The single byte every landmark file holds. */
export const LANDMARK_CONTENTS = 0x0f;

export type TocEntryType = 'dir' | 'reg' | 'symlink' | 'hardlink' | 'char' | 'block' | 'fifo' | 'chunk';
const ENTRY_TYPES: ReadonlySet<string> = new Set<TocEntryType>([
  'dir',
  'reg',
  'symlink',
  'hardlink',
  'char',
  'block',
  'fifo',
  'chunk',
]);

/** One TOC entry. Field order and names follow the reference JSON; absent means zero/empty. */
export interface TocEntry {
  /** After parseToc: the cleaned root-relative path ("" = root). As written: the tar name. */
  name: string;
  type: TocEntryType;
  /** Logical size of a `reg` file. */
  size?: number;
  /** RFC 3339, UTC, whole seconds. */
  modtime?: string;
  /** Symlink target, or hardlink target (a layer path; cleaned by parseToc). */
  linkName?: string;
  /** Tar header mode as stored; only perm + setuid/setgid/sticky bits are meaningful. */
  mode?: number;
  uid?: number;
  gid?: number;
  userName?: string;
  groupName?: string;
  /** Compressed offset of the gzip member holding this reg/chunk payload. */
  offset?: number;
  /** Uncompressed offset of the payload inside that member. */
  innerOffset?: number;
  devMajor?: number;
  devMinor?: number;
  /** xattr name → base64 of the value bytes. */
  xattrs?: Record<string, string>;
  /** `sha256:<hex>` of the whole regular file. */
  digest?: string;
  /** Offset of this chunk in the uncompressed file. */
  chunkOffset?: number;
  /** Uncompressed chunk size; absent/0 means "to the end of the file". */
  chunkSize?: number;
  /** `sha256:<hex>` of this chunk's uncompressed bytes. */
  chunkDigest?: string;
}

export interface Toc {
  version: number;
  entries: TocEntry[];
}

export interface ParseTocOptions {
  /** Compressed blob size: payload offsets must lie inside it. */
  blobSize?: number;
  /** Compressed offset of the TOC member: payload offsets must lie before it. */
  tocOffset?: number;
  /** Defaults to MAX_TOC_ENTRIES. */
  maxEntries?: number;
  /** Bound on the JSON bytes. Defaults to MAX_TOC_BYTES. */
  maxTocBytes?: number;
}

const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** The regular file whose chunks are being read, to check that chunk entries tile it exactly. */
interface OpenFile {
  name: string;
  size: number;
  /** File offset the next chunk must start at. */
  nextChunkOffset: number;
}

/**
 * Receives each entry as walkToc validates it, in TOC order. The entry is the receiver's: walkToc keeps
 * nothing of it, so a receiver that keeps only what it needs lets the rest die young.
 */
export type TocVisitor = (entry: TocEntry, index: number) => void;

/**
 * Parses and validates TOC JSON. Returns entries with cleaned names (a `chunk` entry carries the name
 * of its file) and cleaned hardlink targets. Throws EstargzFormatError naming the first problem.
 */
export function parseToc(json: Buffer | string, opts: ParseTocOptions = {}): Toc {
  const entries: TocEntry[] = [];
  walkToc(json, opts, (e) => entries.push(e));
  return { version: TOC_VERSION, entries };
}

/**
 * parseToc without the entry list: each validated entry goes to `visit` as soon as it is checked. The checks
 * that need the whole TOC (a hardlink's target) come after the last entry, so a visitor's work can be thrown
 * away on an error at the end. Each raw JSON entry is dropped once visited: a TOC of tens of thousands of
 * entries is then never held three times over (JSON objects, entries, what the visitor builds) while a young
 * generation collection copies whatever is still alive.
 */
export function walkToc(json: Buffer | string, opts: ParseTocOptions, visit: TocVisitor): void {
  const maxEntries = opts.maxEntries ?? MAX_TOC_ENTRIES;
  const dataEnd = opts.tocOffset ?? opts.blobSize ?? Number.MAX_SAFE_INTEGER;
  const maxTocBytes = opts.maxTocBytes ?? MAX_TOC_BYTES;
  const jsonBytes = typeof json === 'string' ? Buffer.byteLength(json, 'utf8') : json.length;
  if (jsonBytes > maxTocBytes) {
    throw new EstargzFormatError(`TOC JSON is ${jsonBytes} bytes, more than the limit of ${maxTocBytes}`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(typeof json === 'string' ? json : json.toString('utf8'));
  } catch (err) {
    throw new EstargzFormatError(`TOC is not valid JSON: ${errorMessage(err)}`);
  }
  if (!isRecord(doc)) throw new EstargzFormatError('TOC JSON is not an object');
  if (doc.version !== TOC_VERSION) {
    throw new EstargzFormatError(`unsupported TOC version ${JSON.stringify(doc.version)}, want ${TOC_VERSION}`);
  }
  const rawEntries = doc.entries;
  if (!Array.isArray(rawEntries)) throw new EstargzFormatError('TOC has no "entries" array');
  if (rawEntries.length > maxEntries) {
    throw new EstargzFormatError(`TOC has ${rawEntries.length} entries, more than the limit of ${maxEntries}`);
  }

  /** Type of every non-chunk entry by cleaned name, to find duplicates and check hardlink targets. */
  const types = new Map<string, TocEntryType>();
  /** Hardlinks as [name, cleaned target]: their targets may come later. */
  const hardlinks: [string, string][] = [];
  let open: OpenFile | undefined;
  let lastDataOffset = 0;

  const closeOpenFile = (): void => {
    if (open !== undefined && open.nextChunkOffset !== open.size) {
      throw new EstargzFormatError(
        `chunks of ${JSON.stringify(open.name)} cover ${open.nextChunkOffset} of its ${open.size} bytes`,
      );
    }
    open = undefined;
  };

  const count = rawEntries.length;
  for (let i = 0; i < count; i++) {
    const e = parseEntry(rawEntries[i], i);
    rawEntries[i] = undefined;

    if (e.type === 'chunk') {
      if (open === undefined || open.name !== e.name) {
        throw new EstargzFormatError(`${entryAt(i, e.name)}: chunk does not follow a regular file of the same name`);
      }
    } else {
      closeOpenFile();
      if (e.name === '' && e.type !== 'dir') throw new EstargzFormatError(`${entryAt(i, e.name)}: empty name`);
      if (types.has(e.name)) throw new EstargzFormatError(`${entryAt(i, e.name)}: duplicate entry`);
      types.set(e.name, e.type);
    }

    if (e.type === 'symlink' || e.type === 'hardlink') {
      if (e.linkName === undefined || e.linkName === '') throw new EstargzFormatError(`${entryAt(i, e.name)}: ${e.type} has no linkName`);
      if (e.linkName.includes('\0')) throw new EstargzFormatError(`${entryAt(i, e.name)}: linkName contains NUL`);
      if (e.type === 'hardlink') {
        const target = normalizeEntryName(e.linkName);
        if (target === undefined || target === '') {
          throw new EstargzFormatError(`${entryAt(i, e.name)}: unsafe hardlink target ${JSON.stringify(e.linkName)}`);
        }
        e.linkName = target;
        hardlinks.push([e.name, target]);
      }
    }

    if (e.type === 'reg' || e.type === 'chunk') {
      const fileSize = e.type === 'reg' ? (e.size ?? 0) : (open?.size ?? 0);
      const chunkOffset = e.chunkOffset ?? 0;
      if (e.type === 'reg' && chunkOffset !== 0) throw new EstargzFormatError(`${entryAt(i, e.name)}: first chunk at ${chunkOffset}`);
      if (e.type === 'chunk' && chunkOffset !== open?.nextChunkOffset) {
        throw new EstargzFormatError(`${entryAt(i, e.name)}: chunk at ${chunkOffset}, want ${open?.nextChunkOffset}`);
      }
      const chunkSize = e.chunkSize !== undefined && e.chunkSize > 0 ? e.chunkSize : fileSize - chunkOffset;
      if (chunkOffset + chunkSize > fileSize || (fileSize > 0 && chunkSize === 0)) {
        throw new EstargzFormatError(`${entryAt(i, e.name)}: chunk ${chunkOffset}+${chunkSize} outside a ${fileSize}-byte file`);
      }
      if (fileSize > 0) {
        if (e.offset === undefined) throw new EstargzFormatError(`${entryAt(i, e.name)}: payload has no offset`);
        if (e.offset >= dataEnd) throw new EstargzFormatError(`${entryAt(i, e.name)}: offset ${e.offset} is past the data (${dataEnd})`);
        if (e.offset < lastDataOffset) {
          throw new EstargzFormatError(`${entryAt(i, e.name)}: offset ${e.offset} goes back before ${lastDataOffset}`);
        }
        lastDataOffset = e.offset;
      }
      if (e.type === 'reg') open = { name: e.name, size: fileSize, nextChunkOffset: chunkOffset + chunkSize };
      else if (open !== undefined) open.nextChunkOffset = chunkOffset + chunkSize;
    }
    visit(e, i);
  }
  closeOpenFile();

  for (const [name, target] of hardlinks) {
    const targetType = types.get(target);
    if (targetType === undefined) {
      throw new EstargzFormatError(`hardlink ${JSON.stringify(name)} points at missing ${JSON.stringify(target)}`);
    }
    if (targetType === 'dir') {
      throw new EstargzFormatError(`hardlink ${JSON.stringify(name)} points at directory ${JSON.stringify(target)}`);
    }
  }
}

/** An entry named in an error; built only then (a message per entry cost more than checking it). */
function entryAt(index: number, name: string): string {
  return `TOC entry ${index} (${JSON.stringify(name)})`;
}

/**
 * One raw entry to a TocEntry. Fields are read one by one with literal keys, not by looping over key lists:
 * with a TOC of tens of thousands of entries, the keyed lookups and per-entry allocations were most of the
 * parse.
 */
function parseEntry(raw: unknown, index: number): TocEntry {
  if (!isRecord(raw)) throw new EstargzFormatError(`TOC entry ${index} is not an object`);
  if (typeof raw.name !== 'string') throw new EstargzFormatError(`TOC entry ${index} has no string "name"`);
  const name = normalizeEntryName(raw.name);
  if (name === undefined) throw new EstargzFormatError(`TOC entry ${index}: unsafe name ${JSON.stringify(raw.name)}`);
  const type = raw.type;
  if (typeof type !== 'string' || !ENTRY_TYPES.has(type)) {
    throw new EstargzFormatError(`${entryAt(index, name)}: unknown type ${JSON.stringify(type)}`);
  }
  const e: TocEntry = { name, type: type as TocEntryType };
  if (raw.size !== undefined) e.size = checkNumber(raw.size, 'size', index, name);
  if (raw.mode !== undefined) e.mode = checkNumber(raw.mode, 'mode', index, name);
  if (raw.uid !== undefined) e.uid = checkNumber(raw.uid, 'uid', index, name);
  if (raw.gid !== undefined) e.gid = checkNumber(raw.gid, 'gid', index, name);
  if (raw.offset !== undefined) e.offset = checkNumber(raw.offset, 'offset', index, name);
  if (raw.innerOffset !== undefined) e.innerOffset = checkNumber(raw.innerOffset, 'innerOffset', index, name);
  if (raw.devMajor !== undefined) e.devMajor = checkNumber(raw.devMajor, 'devMajor', index, name);
  if (raw.devMinor !== undefined) e.devMinor = checkNumber(raw.devMinor, 'devMinor', index, name);
  if (raw.chunkOffset !== undefined) e.chunkOffset = checkNumber(raw.chunkOffset, 'chunkOffset', index, name);
  if (raw.chunkSize !== undefined) e.chunkSize = checkNumber(raw.chunkSize, 'chunkSize', index, name);
  if (raw.modtime !== undefined) {
    const modtime = checkString(raw.modtime, 'modtime', index, name);
    // Parsed through the cache the layer tree reads its mtimes from: each distinct string once.
    if (Number.isNaN(modtimeMs(modtime))) throw new EstargzFormatError(`${entryAt(index, name)}: bad modtime ${JSON.stringify(modtime)}`);
    e.modtime = modtime;
  }
  if (raw.linkName !== undefined) e.linkName = checkString(raw.linkName, 'linkName', index, name);
  if (raw.userName !== undefined) e.userName = checkString(raw.userName, 'userName', index, name);
  if (raw.groupName !== undefined) e.groupName = checkString(raw.groupName, 'groupName', index, name);
  if (raw.digest !== undefined) {
    const digest = checkString(raw.digest, 'digest', index, name);
    if (!isSha256Digest(digest)) throw new EstargzFormatError(`${entryAt(index, name)}: "digest" is not a sha256 digest`);
    e.digest = digest;
  }
  if (raw.chunkDigest !== undefined) {
    const digest = checkString(raw.chunkDigest, 'chunkDigest', index, name);
    if (!isSha256Digest(digest)) throw new EstargzFormatError(`${entryAt(index, name)}: "chunkDigest" is not a sha256 digest`);
    e.chunkDigest = digest;
  }
  if (raw.xattrs !== undefined && raw.xattrs !== null) {
    if (!isRecord(raw.xattrs)) throw new EstargzFormatError(`${entryAt(index, name)}: "xattrs" is not an object`);
    const xattrs: Record<string, string> = {};
    for (const [k, v] of Object.entries(raw.xattrs)) {
      if (k === '' || k.includes('\0') || typeof v !== 'string' || !BASE64_RE.test(v)) {
        throw new EstargzFormatError(`${entryAt(index, name)}: bad xattr ${JSON.stringify(k)}`);
      }
      xattrs[k] = v;
    }
    e.xattrs = xattrs;
  }
  return e;
}

function checkNumber(v: unknown, key: string, index: number, name: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw new EstargzFormatError(`${entryAt(index, name)}: "${key}" is not a non-negative integer`);
  }
  return v;
}

function checkString(v: unknown, key: string, index: number, name: string): string {
  if (typeof v !== 'string') throw new EstargzFormatError(`${entryAt(index, name)}: "${key}" is not a string`);
  return v;
}

/**
 * `sha256:` and 64 lowercase hex digits. A regex, not a char loop: a TOC is parsed once per mount, in code not
 * yet optimised, where the regex engine's compiled matcher beats an interpreted loop.
 */
const SHA256_DIGEST_RE = /^sha256:[0-9a-f]{64}$/;

function isSha256Digest(v: string): boolean {
  return SHA256_DIGEST_RE.test(v);
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The part of a BlobSource that reading a TOC needs (kept structural: estargz/ imports nothing else). */
export interface RangeReadable {
  readonly size: number;
  readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer>;
}

export interface ReadTocOptions {
  /** Bound on the TOC, compressed and decompressed. Defaults to MAX_TOC_BYTES. */
  maxTocBytes?: number;
  /** Defaults to MAX_TOC_ENTRIES. */
  maxEntries?: number;
  signal?: AbortSignal;
}

export interface ReadTocResult extends ReadTocJsonResult {
  toc: Toc;
}

/** readTocJson's result: the TOC as found, not yet parsed. */
export interface ReadTocJsonResult {
  /** The TOC JSON exactly as stored: what the toc.digest annotation is computed over. */
  tocJson: Buffer;
  /** `sha256:<hex>` of tocJson. */
  tocDigest: string;
  /**
   * Compressed offset of the TOC member (zstd:chunked: of the TOC's skippable frame); payload members all
   * end at or before it.
   */
  tocOffset: number;
  /** Size of the footer that matched (51 eStargz, 47 legacy, 48 zstd:chunked). */
  footerSize: number;
  /** How payload members are compressed: gzip members (eStargz) or zstd frames (zstd:chunked). */
  compression: LayerCompression;
}

export type LayerCompression = 'gzip' | 'zstd';

const gunzipAsync = promisify<InputType, ZlibOptions, Buffer>(gunzip);

/**
 * Output per zlib thread-pool job when the TOC is inflated. zlib's default (16 KiB) makes a TOC of a few MiB
 * hundreds of jobs, and each one queues behind the jobs of chunks being inflated meanwhile (a neighbouring
 * layer's prefetch keeps every pool thread busy): a mount's TOC then inflated 25 times slower. A few large
 * jobs are also faster alone.
 */
const TOC_INFLATE_CHUNK_BYTES = 1024 * 1024;

/**
 * Reads the footer and TOC of an eStargz (or legacy stargz, or zstd:chunked) blob: two range reads, one
 * decompression. Throws EstargzFormatError when the blob is none of those (naming why for each) or its TOC
 * is malformed or over the limits.
 */
export async function readToc(blob: RangeReadable, opts: ReadTocOptions = {}): Promise<ReadTocResult> {
  const found = await readTocJson(blob, opts);
  const toc = parseToc(found.tocJson, { blobSize: blob.size, tocOffset: found.tocOffset, maxEntries: opts.maxEntries, maxTocBytes: opts.maxTocBytes });
  return { ...found, toc };
}

/**
 * readToc without parsing the JSON: for a caller that parses it its own way (walkToc), with the bounds the
 * result gives (blob size, tocOffset). The footer and the compressed TOC's size are checked here.
 */
export async function readTocJson(blob: RangeReadable, opts: Pick<ReadTocOptions, 'maxTocBytes' | 'signal'> = {}): Promise<ReadTocJsonResult> {
  const maxTocBytes = opts.maxTocBytes ?? MAX_TOC_BYTES;
  if (blob.size < LEGACY_FOOTER_SIZE_BYTES) {
    throw new EstargzFormatError(`not an eStargz layer: blob of ${blob.size} bytes is smaller than any stargz footer`);
  }
  const tailLength = Math.min(Math.max(FOOTER_SIZE_BYTES, ZSTD_CHUNKED_FOOTER_BYTES), blob.size);
  const tail = await blob.readRange(blob.size - tailLength, tailLength, opts.signal);
  let footer: ReturnType<typeof parseFooter>;
  try {
    footer = parseFooter(tail);
  } catch (err) {
    if (!(err instanceof EstargzFormatError)) throw err;
    const zstd = parseZstdChunkedFooter(tail);
    if (typeof zstd === 'string') throw new EstargzFormatError(`${err.message}; zstd:chunked footer: ${zstd}`);
    const { tocJson, tocFrameOffset } = await readZstdChunkedTocJson(blob, zstd, maxTocBytes, opts.signal);
    const tocDigest = 'sha256:' + createHash('sha256').update(tocJson).digest('hex');
    return { tocJson, tocDigest, tocOffset: tocFrameOffset, footerSize: ZSTD_CHUNKED_FOOTER_BYTES, compression: 'zstd' };
  }
  const { tocOffset, footerSize } = footer;
  const tocEnd = blob.size - footerSize;
  if (tocOffset >= tocEnd) {
    throw new EstargzFormatError(`footer points at TOC offset ${tocOffset}, past the ${blob.size}-byte blob`);
  }
  const compressedLength = tocEnd - tocOffset;
  if (compressedLength > maxTocBytes) {
    throw new EstargzFormatError(`compressed TOC is ${compressedLength} bytes, more than the limit of ${maxTocBytes}`);
  }
  const compressed = await blob.readRange(tocOffset, compressedLength, opts.signal);

  let tarBytes: Buffer;
  try {
    tarBytes = await gunzipAsync(compressed, { maxOutputLength: maxTocBytes + TOC_TAR_OVERHEAD_BYTES, chunkSize: TOC_INFLATE_CHUNK_BYTES });
  } catch (err) {
    if (errorCode(err) === 'ERR_BUFFER_TOO_LARGE' || err instanceof RangeError) {
      throw new EstargzFormatError(`decompressed TOC is larger than the limit of ${maxTocBytes} bytes`);
    }
    throw new EstargzFormatError(`malformed TOC gzip member at offset ${tocOffset}: ${errorMessage(err)}`);
  }

  const tocJson = extractTocJson(tarBytes, maxTocBytes);
  const tocDigest = 'sha256:' + createHash('sha256').update(tocJson).digest('hex');
  return { tocJson, tocDigest, tocOffset, footerSize, compression: 'gzip' };
}

/** Finds the `stargz.index.json` tar entry (after an optional PAX header) and returns its content. */
function extractTocJson(tar: Buffer, maxTocBytes: number): Buffer {
  let pos = 0;
  let paxPath: string | undefined;
  let paxSize: number | undefined;
  for (;;) {
    if (pos + TAR_BLOCK_BYTES > tar.length) throw new EstargzFormatError('TOC member holds no tar header');
    let header: ReturnType<typeof decodeTarHeader>;
    try {
      header = decodeTarHeader(tar.subarray(pos, pos + TAR_BLOCK_BYTES));
    } catch (err) {
      throw new EstargzFormatError(`TOC member holds no valid tar header: ${errorMessage(err)}`);
    }
    if (header === undefined) throw new EstargzFormatError('TOC member holds no tar header');
    pos += TAR_BLOCK_BYTES;
    if (header.typeflag === TYPEFLAG.paxHeader) {
      if (pos + header.size > tar.length) throw new EstargzFormatError('TOC PAX header truncated');
      const records = parsePaxRecords(tar.subarray(pos, pos + header.size));
      paxPath = records.get('path')?.toString('utf8') ?? paxPath;
      const size = records.get('size')?.toString('latin1');
      if (size !== undefined) paxSize = /^[0-9]+$/.test(size) ? Number(size) : NaN;
      pos += header.size + tarPaddingBytes(header.size);
      continue;
    }
    const name = paxPath ?? header.name;
    const size = paxSize ?? header.size;
    if (name !== TOC_TAR_NAME) {
      throw new EstargzFormatError(`TOC tar entry is named ${JSON.stringify(name)}, want ${JSON.stringify(TOC_TAR_NAME)}`);
    }
    if (header.typeflag !== TYPEFLAG.reg) throw new EstargzFormatError('TOC tar entry is not a regular file');
    if (!Number.isSafeInteger(size) || size > maxTocBytes) {
      throw new EstargzFormatError(`TOC JSON is ${size} bytes, more than the limit of ${maxTocBytes}`);
    }
    if (pos + size > tar.length) throw new EstargzFormatError(`TOC JSON truncated: ${tar.length - pos} of ${size} bytes`);
    const json = tar.subarray(pos, pos + size);
    // The inflated tar is a view of zlib's output buffer (TOC_INFLATE_CHUNK_BYTES at least): a small TOC kept
    // by a layer (pre-opened, cached) must not hold all of it.
    return json.buffer.byteLength > 2 * json.length ? Buffer.from(json) : json;
  }
}
