import { EstargzFormatError } from '../errors';

/**
 * The few tar (POSIX ustar + PAX) pieces the format needs: encoding one entry's header blocks for the
 * writer, decoding the TOC entry's header for the reader, and parsing raw PAX records without losing
 * binary xattr values. Layout per POSIX.1-2001 `pax`.
 */

export const TAR_BLOCK_BYTES = 512;
/** Two zero blocks end a tar archive. */
export const TAR_EOF_BYTES = 2 * TAR_BLOCK_BYTES;
/** PAX key prefix that carries extended attributes (GNU tar, Go archive/tar, bsdtar all agree). */
export const PAX_XATTR_PREFIX = 'SCHILY.xattr.';

/** ustar typeflags this format knows. */
export const TYPEFLAG = {
  reg: '0',
  hardlink: '1',
  symlink: '2',
  char: '3',
  block: '4',
  dir: '5',
  fifo: '6',
  paxHeader: 'x',
} as const;
export type Typeflag = (typeof TYPEFLAG)[keyof typeof TYPEFLAG];

const NAME_BYTES = 100;
const PREFIX_BYTES = 155;
const OWNER_NAME_BYTES = 32;
/** Largest values the octal fields hold (7 and 11 digits + NUL). */
const MAX_OCTAL_8 = 0o7777777;
const MAX_OCTAL_12 = 0o77777777777;
const USTAR_MAGIC = 'ustar\0';
const USTAR_VERSION = '00';
const CHECKSUM_OFFSET = 148;
const CHECKSUM_BYTES = 8;
/** Name of the PAX extended header pseudo-entry, like Go's archive/tar writes it. */
const PAX_HEADER_DIR = 'PaxHeaders.0';
const PAX_HEADER_MODE = 0o644;

export interface TarHeaderFields {
  name: string;
  typeflag: Typeflag;
  /** Mode as stored in the header (perm bits, possibly type bits too). */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Modification time in whole seconds since the epoch. */
  mtimeSec: number;
  linkname: string;
  uname: string;
  gname: string;
  devmajor: number;
  devminor: number;
  /** Extended attributes, written as SCHILY.xattr.<name> PAX records. */
  xattrs?: ReadonlyMap<string, Buffer>;
}

/** Bytes of zero padding that follow `size` bytes of entry data. */
export function tarPaddingBytes(size: number): number {
  const rem = size % TAR_BLOCK_BYTES;
  return rem === 0 ? 0 : TAR_BLOCK_BYTES - rem;
}

/**
 * Encodes the header blocks of one entry: a PAX extended header (when some field does not fit ustar)
 * followed by the ustar header. The entry's data and its padding are the caller's.
 */
export function encodeTarHeader(h: TarHeaderFields): Buffer {
  const pax: Array<[string, Buffer]> = [];
  const split = splitUstarName(h.name);
  if (split === undefined) pax.push(['path', Buffer.from(h.name, 'utf8')]);
  const linkFits = isAscii(h.linkname) && h.linkname.length <= NAME_BYTES;
  if (!linkFits) pax.push(['linkpath', Buffer.from(h.linkname, 'utf8')]);
  if (h.uid > MAX_OCTAL_8) pax.push(['uid', Buffer.from(String(h.uid))]);
  if (h.gid > MAX_OCTAL_8) pax.push(['gid', Buffer.from(String(h.gid))]);
  const unameFits = isAscii(h.uname) && h.uname.length <= OWNER_NAME_BYTES;
  if (!unameFits) pax.push(['uname', Buffer.from(h.uname, 'utf8')]);
  const gnameFits = isAscii(h.gname) && h.gname.length <= OWNER_NAME_BYTES;
  if (!gnameFits) pax.push(['gname', Buffer.from(h.gname, 'utf8')]);
  if (h.size > MAX_OCTAL_12) pax.push(['size', Buffer.from(String(h.size))]);
  const mtimeFits = h.mtimeSec >= 0 && h.mtimeSec <= MAX_OCTAL_12;
  if (!mtimeFits) pax.push(['mtime', Buffer.from(String(h.mtimeSec))]);
  if (h.devmajor > MAX_OCTAL_8 || h.devminor > MAX_OCTAL_8) {
    throw new RangeError(`device ${h.devmajor}:${h.devminor} of ${JSON.stringify(h.name)} does not fit a tar header`);
  }
  if (h.xattrs !== undefined) {
    for (const key of [...h.xattrs.keys()].sort()) {
      const value = h.xattrs.get(key);
      if (value !== undefined) pax.push([PAX_XATTR_PREFIX + key, value]);
    }
  }

  const ustar = Buffer.alloc(TAR_BLOCK_BYTES);
  const [prefix, name] = split ?? ['', asciiFallback(h.name, NAME_BYTES)];
  ustar.write(name, 0, NAME_BYTES, 'latin1');
  writeOctal(ustar, 100, 8, h.mode & MAX_OCTAL_8);
  writeOctal(ustar, 108, 8, h.uid > MAX_OCTAL_8 ? 0 : h.uid);
  writeOctal(ustar, 116, 8, h.gid > MAX_OCTAL_8 ? 0 : h.gid);
  writeOctal(ustar, 124, 12, h.size > MAX_OCTAL_12 ? 0 : h.size);
  writeOctal(ustar, 136, 12, mtimeFits ? h.mtimeSec : 0);
  ustar.write(h.typeflag, 156, 1, 'latin1');
  ustar.write(linkFits ? h.linkname : asciiFallback(h.linkname, NAME_BYTES), 157, NAME_BYTES, 'latin1');
  ustar.write(USTAR_MAGIC, 257, 6, 'latin1');
  ustar.write(USTAR_VERSION, 263, 2, 'latin1');
  ustar.write(unameFits ? h.uname : '', 265, OWNER_NAME_BYTES, 'latin1');
  ustar.write(gnameFits ? h.gname : '', 297, OWNER_NAME_BYTES, 'latin1');
  writeOctal(ustar, 329, 8, h.devmajor);
  writeOctal(ustar, 337, 8, h.devminor);
  ustar.write(prefix, 345, PREFIX_BYTES, 'latin1');
  writeChecksum(ustar);
  if (pax.length === 0) return ustar;

  const records = encodePaxRecords(pax);
  const paxHeader = Buffer.alloc(TAR_BLOCK_BYTES);
  paxHeader.write(asciiFallback(`${PAX_HEADER_DIR}/${baseName(h.name)}`, NAME_BYTES), 0, NAME_BYTES, 'latin1');
  writeOctal(paxHeader, 100, 8, PAX_HEADER_MODE);
  writeOctal(paxHeader, 108, 8, 0);
  writeOctal(paxHeader, 116, 8, 0);
  writeOctal(paxHeader, 124, 12, records.length);
  writeOctal(paxHeader, 136, 12, mtimeFits ? h.mtimeSec : 0);
  paxHeader.write(TYPEFLAG.paxHeader, 156, 1, 'latin1');
  paxHeader.write(USTAR_MAGIC, 257, 6, 'latin1');
  paxHeader.write(USTAR_VERSION, 263, 2, 'latin1');
  writeChecksum(paxHeader);
  return Buffer.concat([paxHeader, records, Buffer.alloc(tarPaddingBytes(records.length)), ustar]);
}

/** Encodes PAX records `"<len> <key>=<value>\n"`, where len counts the whole record in bytes. */
export function encodePaxRecords(records: ReadonlyArray<readonly [string, Buffer]>): Buffer {
  const parts: Buffer[] = [];
  for (const [key, value] of records) {
    const body = Buffer.byteLength(key, 'utf8') + value.length + 3; // ' ', '=', '\n'
    let len = body + String(body).length;
    if (String(len).length !== String(body).length) len = body + String(len).length;
    parts.push(Buffer.from(`${len} ${key}=`, 'utf8'), value, Buffer.from('\n'));
  }
  return Buffer.concat(parts);
}

/** Parses PAX records keeping values as raw bytes (xattr values may be binary). */
export function parsePaxRecords(buf: Buffer): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let pos = 0;
  while (pos < buf.length) {
    if (buf[pos] === 0) break; // NUL padding after the last record
    const space = buf.indexOf(0x20, pos);
    if (space < 0) throw new EstargzFormatError('malformed PAX record: no length');
    const lenText = buf.toString('latin1', pos, space);
    const len = /^[0-9]+$/.test(lenText) ? Number(lenText) : NaN;
    if (!Number.isSafeInteger(len) || len <= space - pos + 1 || pos + len > buf.length || buf[pos + len - 1] !== 0x0a) {
      throw new EstargzFormatError(`malformed PAX record at byte ${pos}`);
    }
    const record = buf.subarray(space + 1, pos + len - 1);
    const eq = record.indexOf(0x3d);
    if (eq <= 0) throw new EstargzFormatError(`malformed PAX record at byte ${pos}: no key`);
    out.set(record.toString('utf8', 0, eq), record.subarray(eq + 1));
    pos += len;
  }
  return out;
}

export interface DecodedTarHeader {
  name: string;
  typeflag: string;
  size: number;
}

/**
 * Decodes the fields of one header block the reader needs. Returns undefined for an all-zero block
 * (end of archive). Throws EstargzFormatError on a bad checksum or number.
 */
export function decodeTarHeader(block: Buffer): DecodedTarHeader | undefined {
  if (block.length < TAR_BLOCK_BYTES) throw new EstargzFormatError(`tar header truncated to ${block.length} bytes`);
  let allZero = true;
  for (let i = 0; i < TAR_BLOCK_BYTES; i++) {
    if (block[i] !== 0) {
      allZero = false;
      break;
    }
  }
  if (allZero) return undefined;
  const want = readNumber(block, CHECKSUM_OFFSET, CHECKSUM_BYTES, 'checksum');
  if (checksum(block) !== want) throw new EstargzFormatError('tar header checksum mismatch');
  let name = readString(block, 0, NAME_BYTES);
  if (block.toString('latin1', 257, 263) === USTAR_MAGIC && block[345] !== 0) {
    name = `${readString(block, 345, PREFIX_BYTES)}/${name}`;
  }
  const typeflag = block[156] === 0 ? TYPEFLAG.reg : String.fromCharCode(block[156]);
  return { name, typeflag, size: readNumber(block, 124, 12, 'size') };
}

function readString(block: Buffer, offset: number, length: number): string {
  const end = block.indexOf(0, offset);
  return block.toString('utf8', offset, end < 0 || end > offset + length ? offset + length : end);
}

/** Octal (NUL/space terminated) or GNU base-256 for big values. */
function readNumber(block: Buffer, offset: number, length: number, what: string): number {
  if ((block[offset] & 0x80) !== 0) {
    let v = BigInt(block[offset] & 0x7f);
    for (let i = 1; i < length; i++) v = (v << 8n) | BigInt(block[offset + i]);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new EstargzFormatError(`tar header ${what} too large`);
    return Number(v);
  }
  const text = block
    .toString('latin1', offset, offset + length)
    .replace(/[\0 ]+$/, '')
    .replace(/^ +/, '');
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) throw new EstargzFormatError(`tar header ${what} ${JSON.stringify(text)} is not octal`);
  return parseInt(text, 8);
}

function writeOctal(block: Buffer, offset: number, length: number, value: number): void {
  block.write(value.toString(8).padStart(length - 1, '0') + '\0', offset, length, 'latin1');
}

function checksum(block: Buffer): number {
  let sum = 0;
  for (let i = 0; i < TAR_BLOCK_BYTES; i++) {
    sum += i >= CHECKSUM_OFFSET && i < CHECKSUM_OFFSET + CHECKSUM_BYTES ? 0x20 : block[i];
  }
  return sum;
}

function writeChecksum(block: Buffer): void {
  // Six octal digits, NUL, space: the traditional layout every reader accepts.
  block.write(checksum(block).toString(8).padStart(6, '0') + '\0 ', CHECKSUM_OFFSET, CHECKSUM_BYTES, 'latin1');
}

/** [prefix, name] when `name` fits ustar as ASCII, else undefined (PAX `path` needed). */
function splitUstarName(name: string): [string, string] | undefined {
  if (!isAscii(name)) return undefined;
  if (name.length <= NAME_BYTES) return ['', name];
  // Split at a '/' so that the prefix fits 155 bytes and the rest fits 100 (and is not empty).
  for (let i = Math.min(name.length - 1, PREFIX_BYTES); i > 0; i--) {
    if (name.charCodeAt(i) === 0x2f && name.length - i - 1 <= NAME_BYTES && name.length - i - 1 > 0) {
      return [name.slice(0, i), name.slice(i + 1)];
    }
  }
  return undefined;
}

function isAscii(s: string): boolean {
  // eslint-disable-next-line no-control-regex
  return /^[\x01-\x7f]*$/.test(s);
}

/** What a ustar field holds when the real value lives in a PAX record: printable ASCII, truncated. */
function asciiFallback(s: string, max: number): string {
  return s.replace(/[^\x20-\x7e]/g, '_').slice(0, max);
}

function baseName(name: string): string {
  const trimmed = name.replace(/\/+$/, '');
  const i = trimmed.lastIndexOf('/');
  return i < 0 ? trimmed : trimmed.slice(i + 1);
}
