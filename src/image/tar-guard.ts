/**
 * A pass-through check of an uncompressed layer tar, run before the eStargz writer sees it. It parses only
 * the 512-byte headers (and PAX / GNU long-name records) and refuses what must not end up in a converted
 * image, naming the entry: `..` components and absolute names, names that are not UTF-8 (tar-stream would
 * silently replace their bytes), PAX or long-name records above MAX_LONG_HEADER_BYTES, hardlinks to a target
 * that no earlier entry created, corrupt headers, and a tar that ends inside an entry. It also hashes the
 * stream, so the caller can compare it with the source config's diff_id.
 *
 * Payload sizes follow tar-stream's rules (the parser downstream): every entry but a directory is followed
 * by `size` bytes (PAX `size` wins), padded to 512.
 */
import { createHash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { EstargzFormatError } from '../errors';

const BLOCK_BYTES = 512;
/** PAX and GNU long-name records larger than this are refused (tar-stream's own limit is 4 MiB). */
export const MAX_LONG_HEADER_BYTES = 1024 * 1024;

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A refused entry; `entry` is its name as far as it could be decoded. */
export class TarEntryError extends EstargzFormatError {
  constructor(
    readonly entry: string | undefined,
    why: string,
  ) {
    super(entry === undefined ? why : `tar entry ${JSON.stringify(entry)}: ${why}`);
  }
}

type State =
  | { kind: 'header' }
  | { kind: 'data'; left: number }
  | { kind: 'long'; type: string; size: number; left: number; parts: Buffer[] }
  | { kind: 'end' };

interface PendingLong {
  path?: Buffer;
  linkpath?: Buffer;
  size?: number;
}

export class TarGuard extends Transform {
  private state: State = { kind: 'header' };
  /** Bytes of an incomplete header block. */
  private partial: Buffer[] = [];
  private partialBytes = 0;
  private pending: PendingLong = {};
  /** Clean names of the entries seen so far (for hardlink targets). */
  private readonly seen = new Set<string>();
  private readonly hash = createHash('sha256');
  private total = 0;
  /** Name of the entry being read (or the last one), for error messages. */
  currentEntry: string | undefined;
  /** Number of entries seen. */
  entries = 0;

  /** `sha256:` of everything that passed through; valid after 'end'. */
  digest(): string {
    return 'sha256:' + this.hash.copy().digest('hex');
  }

  get bytes(): number {
    return this.total;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    try {
      this.hash.update(chunk);
      this.total += chunk.length;
      this.scan(chunk);
    } catch (err) {
      cb(err as Error);
      return;
    }
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    const s = this.state;
    if (s.kind === 'data' || s.kind === 'long' || this.partialBytes > 0) {
      cb(new TarEntryError(this.currentEntry, 'the layer tar ends inside this entry (truncated layer)'));
      return;
    }
    cb();
  }

  private scan(chunk: Buffer): void {
    let pos = 0;
    while (pos < chunk.length) {
      const s = this.state;
      if (s.kind === 'end') return;
      if (s.kind === 'data') {
        const n = Math.min(s.left, chunk.length - pos);
        s.left -= n;
        pos += n;
        if (s.left === 0) this.state = { kind: 'header' };
        continue;
      }
      if (s.kind === 'long') {
        const n = Math.min(s.left, chunk.length - pos);
        const wanted = Math.max(0, Math.min(n, s.size - sumLength(s.parts)));
        if (wanted > 0) s.parts.push(Buffer.from(chunk.subarray(pos, pos + wanted)));
        s.left -= n;
        pos += n;
        if (s.left === 0) {
          this.longRecord(s.type, Buffer.concat(s.parts));
          this.state = { kind: 'header' };
        }
        continue;
      }
      // header: gather one block
      const need = BLOCK_BYTES - this.partialBytes;
      const take = Math.min(need, chunk.length - pos);
      this.partial.push(chunk.subarray(pos, pos + take));
      this.partialBytes += take;
      pos += take;
      if (this.partialBytes === BLOCK_BYTES) {
        const block = Buffer.concat(this.partial, BLOCK_BYTES);
        this.partial = [];
        this.partialBytes = 0;
        this.header(block);
      }
    }
  }

  private header(block: Buffer): void {
    if (block.every((b) => b === 0)) {
      // End-of-archive marker: what follows (the second zero block, padding) is not inspected.
      this.state = { kind: 'end' };
      return;
    }
    if (checksum(block) !== readOctal(block, 148, 8)) {
      throw new TarEntryError(undefined, `corrupt tar header after ${this.afterWhat()} (bad checksum)`);
    }
    const typeflag = block[156] === 0 ? '0' : String.fromCharCode(block[156] as number);
    const size = readSize(block);
    if (size === undefined) throw new TarEntryError(undefined, `corrupt tar header after ${this.afterWhat()} (bad size field)`);

    if (typeflag === 'x' || typeflag === 'g' || typeflag === 'L' || typeflag === 'K') {
      if (size > MAX_LONG_HEADER_BYTES) {
        const what = typeflag === 'x' || typeflag === 'g' ? 'PAX header' : 'GNU long name';
        throw new TarEntryError(undefined, `${what} of ${size} bytes after ${this.afterWhat()} is larger than the ${MAX_LONG_HEADER_BYTES}-byte limit`);
      }
      this.state = size === 0 ? { kind: 'header' } : { kind: 'long', type: typeflag, size, left: padded(size), parts: [] };
      if (size === 0) this.longRecord(typeflag, Buffer.alloc(0));
      return;
    }

    const ustar = block.subarray(257, 263).toString('latin1') === 'ustar\0';
    let nameBytes = this.pending.path ?? cString(block, 0, 100);
    if (this.pending.path === undefined && ustar && block[345] !== 0) {
      nameBytes = Buffer.concat([cString(block, 345, 155), Buffer.from('/'), nameBytes]);
    }
    const linkBytes = this.pending.linkpath ?? cString(block, 157, 100);
    const dataSize = this.pending.size ?? size;
    this.pending = {};

    const name = this.decodeName(nameBytes, 'name');
    this.currentEntry = name;
    this.entries++;
    const clean = checkPath(name, 'name');
    const isDir = typeflag === '5' || (typeflag === '0' && name.endsWith('/'));
    if (typeflag === '1') {
      const target = checkPath(this.decodeName(linkBytes, 'hardlink target'), 'hardlink target');
      if (!this.seen.has(target)) throw new TarEntryError(name, `hardlink to ${JSON.stringify(target)}, which no earlier entry creates`);
    } else if (typeflag === '2') {
      this.decodeName(linkBytes, 'symlink target'); // any target is fine, as long as it is text
    }
    this.seen.add(clean);
    this.state = isDir || dataSize === 0 ? { kind: 'header' } : { kind: 'data', left: padded(dataSize) };
  }

  private longRecord(type: string, body: Buffer): void {
    if (type === 'L') {
      this.pending.path = stripNul(body);
    } else if (type === 'K') {
      this.pending.linkpath = stripNul(body);
    } else if (type === 'x') {
      for (const [k, v] of parsePax(body, () => this.afterWhat())) {
        if (k === 'path') this.pending.path = v;
        else if (k === 'linkpath') this.pending.linkpath = v;
        else if (k === 'size') {
          const n = /^[0-9]+$/.test(v.toString('latin1')) ? Number(v.toString('latin1')) : NaN;
          if (!Number.isSafeInteger(n)) throw new TarEntryError(undefined, `PAX size ${JSON.stringify(v.toString('latin1'))} after ${this.afterWhat()} is not a number`);
          this.pending.size = n;
        }
      }
    }
    // 'g' (global PAX): nothing we check.
  }

  private decodeName(bytes: Buffer, what: string): string {
    try {
      return utf8.decode(bytes);
    } catch {
      const shown = bytes.toString('latin1').replace(/[^\x20-\x7e]/g, '?');
      throw new TarEntryError(what === 'name' ? shown : this.currentEntry, `${what} ${JSON.stringify(shown)} is not valid UTF-8`);
    }
  }

  private afterWhat(): string {
    return this.currentEntry === undefined ? 'the start of the layer' : `entry ${JSON.stringify(this.currentEntry)}`;
  }
}

/** Cleans a tar name, refusing absolute names, `..` components and NUL bytes. */
function checkPath(name: string, what: string): string {
  if (name.includes('\0')) throw new TarEntryError(name, `${what} holds a NUL byte`);
  if (name.startsWith('/')) throw new TarEntryError(name, `${what} is an absolute path`);
  const parts: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') throw new TarEntryError(name, `${what} has a '..' component`);
    parts.push(part);
  }
  return parts.join('/');
}

function padded(size: number): number {
  return Math.ceil(size / BLOCK_BYTES) * BLOCK_BYTES;
}

function sumLength(parts: Buffer[]): number {
  let n = 0;
  for (const p of parts) n += p.length;
  return n;
}

function cString(block: Buffer, offset: number, length: number): Buffer {
  const field = block.subarray(offset, offset + length);
  const end = field.indexOf(0);
  return end < 0 ? field : field.subarray(0, end);
}

function stripNul(b: Buffer): Buffer {
  const end = b.indexOf(0);
  return end < 0 ? b : b.subarray(0, end);
}

function checksum(block: Buffer): number {
  let sum = 0;
  for (let i = 0; i < BLOCK_BYTES; i++) sum += i >= 148 && i < 156 ? 32 : (block[i] as number);
  return sum;
}

function readOctal(block: Buffer, offset: number, length: number): number | undefined {
  const text = block.subarray(offset, offset + length).toString('latin1').replace(/[\0 ]+$/g, '').replace(/^[ ]+/, '');
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) return undefined;
  return parseInt(text, 8);
}

/** The size field: octal, or GNU base-256 when the high bit is set. */
function readSize(block: Buffer): number | undefined {
  if (((block[124] as number) & 0x80) !== 0) {
    let n = (block[124] as number) & 0x7f;
    for (let i = 125; i < 136; i++) n = n * 256 + (block[i] as number);
    return Number.isSafeInteger(n) ? n : undefined;
  }
  return readOctal(block, 124, 12);
}

/** PAX records `<len> <key>=<value>\n`; values stay bytes. */
function parsePax(body: Buffer, where: () => string): Array<[string, Buffer]> {
  const out: Array<[string, Buffer]> = [];
  let pos = 0;
  while (pos < body.length) {
    if (body[pos] === 0) break; // padding
    const space = body.indexOf(0x20, pos);
    const len = space < 0 ? NaN : Number(body.subarray(pos, space).toString('latin1'));
    if (!Number.isSafeInteger(len) || len <= 0 || pos + len > body.length) {
      throw new TarEntryError(undefined, `malformed PAX record after ${where()}`);
    }
    const record = body.subarray(space + 1, pos + len - 1); // without the trailing newline
    const eq = record.indexOf(0x3d);
    if (eq < 0) throw new TarEntryError(undefined, `malformed PAX record after ${where()}`);
    out.push([record.subarray(0, eq).toString('utf8'), record.subarray(eq + 1)]);
    pos += len;
  }
  return out;
}
