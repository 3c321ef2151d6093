import { mkdtemp, open, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';

import tarStream from 'tar-stream';

import { EstargzFormatError, errorMessage } from '../errors';
import { normalizeEntryName } from './entry-name';
import { PAX_XATTR_PREFIX, TYPEFLAG, parsePaxRecords, type Typeflag } from './tar-header';

/**
 * Reads an input tar (plain or gzip) once, keeping every entry's header in memory and its payload in a
 * temp file. The builder needs the whole list before writing: duplicate names keep only the last
 * occurrence, and prioritized files move to the front.
 */

const GZIP_MAGIC = [0x1f, 0x8b, 0x08];
const SPOOL_DIR_PREFIX = 'stargaze-estargz-';

/** One input entry, with the fields eStargz keeps. */
export interface SpooledEntry {
  /** Name as in the input archive (PAX path applied). */
  name: string;
  /** Cleaned root-relative name. */
  cleanName: string;
  typeflag: Typeflag;
  mode: number;
  uid: number;
  gid: number;
  uname: string;
  gname: string;
  /** Modification time in milliseconds since the epoch (PAX sub-second precision kept). */
  mtimeMs: number;
  linkname: string;
  devmajor: number;
  devminor: number;
  /** Payload size; 0 for anything but regular files. */
  size: number;
  xattrs: Map<string, Buffer>;
  /** Where the payload starts in the spool file. */
  spoolOffset: number;
}

export class TarSpool {
  constructor(
    /** Entries in input order, duplicates already dropped (last one wins, at its own position). */
    readonly entries: SpooledEntry[],
    private readonly file: FileHandle,
    private readonly dir: string,
  ) {}

  /** Reads `length` payload bytes at spool offset `offset` into a fresh buffer. */
  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.file.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) throw new Error(`spool file ended early at ${offset + done}`);
      done += bytesRead;
    }
    return buf;
  }

  async close(): Promise<void> {
    await this.file.close().catch(() => undefined);
    await rm(this.dir, { recursive: true, force: true });
  }
}

export interface SpoolOptions {
  /** Directory for the temp file; defaults to the OS temp dir. */
  tmpDir?: string;
  /** Clean names dropped from the input (the TOC and landmarks the builder writes itself). */
  skipNames?: ReadonlySet<string>;
}

/** Spools `input` (a tar, optionally gzip-compressed) and returns the entry list. */
export async function spoolTar(input: Readable, opts: SpoolOptions = {}): Promise<TarSpool> {
  const dir = await mkdtemp(join(opts.tmpDir ?? tmpdir(), SPOOL_DIR_PREFIX));
  let file: FileHandle | undefined;
  try {
    file = await open(join(dir, 'payloads'), 'w+');
    const entries = await readEntries(input, file, opts.skipNames ?? new Set());
    return new TarSpool(entries, file, dir);
  } catch (err) {
    await file?.close().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

async function readEntries(input: Readable, file: FileHandle, skipNames: ReadonlySet<string>): Promise<SpooledEntry[]> {
  const source = await sniffGzip(input);
  const extract = tarStream.extract();
  const rawPax = captureRawPax(extract);
  const feeding = pipeline([...source, extract as unknown as NodeJS.WritableStream]);
  feeding.catch(() => undefined); // surfaced below, after the entry loop

  const all: Array<SpooledEntry | undefined> = [];
  const indexByName = new Map<string, number>();
  let spoolOffset = 0;
  try {
    for await (const entry of extract) {
      const header = entry.header;
      const raw = rawPax.take();
      const typeflag = typeflagOf(header.type, header.name);
      const cleanName = normalizeEntryName(header.name);
      if (cleanName === undefined) throw new EstargzFormatError(`unsafe tar entry name ${JSON.stringify(header.name)}`);
      if (cleanName === '' && typeflag !== TYPEFLAG.dir) {
        throw new EstargzFormatError(`tar entry ${JSON.stringify(header.name)} has an empty name`);
      }
      const size = typeflag === TYPEFLAG.reg ? (header.size ?? 0) : 0;
      if (skipNames.has(cleanName)) {
        for await (const chunk of entry as AsyncIterable<Buffer>) void chunk; // drain: the next header follows it
        continue;
      }
      const pax = paxRecords(header, raw);
      const spooled: SpooledEntry = {
        name: header.name,
        cleanName,
        typeflag,
        mode: header.mode ?? 0,
        uid: paxNumber(pax, 'uid') ?? header.uid ?? 0,
        gid: paxNumber(pax, 'gid') ?? header.gid ?? 0,
        uname: pax.get('uname')?.toString('utf8') ?? header.uname ?? '',
        gname: pax.get('gname')?.toString('utf8') ?? header.gname ?? '',
        mtimeMs: paxMtimeMs(pax) ?? header.mtime?.getTime() ?? 0,
        linkname: header.linkname ?? '',
        devmajor: header.devmajor ?? 0,
        devminor: header.devminor ?? 0,
        size,
        xattrs: new Map(),
        spoolOffset,
      };
      for (const [key, value] of pax) {
        if (key.startsWith(PAX_XATTR_PREFIX)) spooled.xattrs.set(key.slice(PAX_XATTR_PREFIX.length), value);
      }
      let written = 0;
      for await (const chunk of entry as AsyncIterable<Buffer>) {
        if (written + chunk.length > size) {
          written += chunk.length; // hardlinks/devices with data: dropped, like every tar extractor
          continue;
        }
        await writeAll(file, chunk, spoolOffset + written);
        written += chunk.length;
      }
      if (typeflag === TYPEFLAG.reg && written !== size) {
        throw new EstargzFormatError(`tar entry ${JSON.stringify(header.name)} ended after ${written} of ${size} bytes`);
      }
      spoolOffset += size;
      const previous = indexByName.get(cleanName);
      if (previous !== undefined) all[previous] = undefined;
      indexByName.set(cleanName, all.length);
      all.push(spooled);
    }
  } catch (err) {
    extract.destroy();
    await feeding.catch(() => undefined);
    throw err instanceof EstargzFormatError ? err : new EstargzFormatError(`reading input tar: ${errorMessage(err)}`, { cause: err });
  }
  try {
    await feeding;
  } catch (err) {
    throw new EstargzFormatError(`reading input tar: ${errorMessage(err)}`, { cause: err });
  }
  return all.filter((e): e is SpooledEntry => e !== undefined);
}

async function writeAll(file: FileHandle, chunk: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < chunk.length) {
    const { bytesWritten } = await file.write(chunk, done, chunk.length - done, position + done);
    done += bytesWritten;
  }
}

/** Returns the stream stages that turn `input` into tar bytes: gunzip is added when it starts with gzip magic. */
async function sniffGzip(input: Readable): Promise<Array<NodeJS.ReadableStream | NodeJS.ReadWriteStream>> {
  const it = input[Symbol.asyncIterator]() as AsyncIterator<Buffer | string>;
  const head: Buffer[] = [];
  let headBytes = 0;
  let done = false;
  while (headBytes < GZIP_MAGIC.length) {
    const r = await it.next();
    if (r.done === true) {
      done = true;
      break;
    }
    const chunk = typeof r.value === 'string' ? Buffer.from(r.value) : r.value;
    head.push(chunk);
    headBytes += chunk.length;
  }
  const first = Buffer.concat(head);
  const rest = Readable.from(
    (async function* (): AsyncGenerator<Buffer> {
      if (first.length > 0) yield first;
      if (done) return;
      for (;;) {
        const r = await it.next();
        if (r.done === true) return;
        yield typeof r.value === 'string' ? Buffer.from(r.value) : r.value;
      }
    })(),
    { objectMode: false },
  );
  const gzipped = GZIP_MAGIC.every((b, i) => first[i] === b);
  return gzipped ? [rest, createGunzip()] : [rest];
}

function typeflagOf(type: tarStream.Header['type'] | undefined | null, name: string): Typeflag {
  switch (type) {
    case 'file':
    case 'contiguous-file':
    case undefined:
    case null:
      return TYPEFLAG.reg;
    case 'link':
      return TYPEFLAG.hardlink;
    case 'symlink':
      return TYPEFLAG.symlink;
    case 'character-device':
      return TYPEFLAG.char;
    case 'block-device':
      return TYPEFLAG.block;
    case 'directory':
      return TYPEFLAG.dir;
    case 'fifo':
      return TYPEFLAG.fifo;
    default:
      throw new EstargzFormatError(`unsupported tar entry type ${JSON.stringify(type)} for ${JSON.stringify(name)}`);
  }
}

/** tar-stream's `pax` field: the entry's PAX records as text. */
type HeaderWithPax = Omit<tarStream.Header, 'pax'> & { pax?: Record<string, string> | null };

/** The entry's PAX records: raw bytes when captured, else tar-stream's text values re-encoded. */
function paxRecords(header: tarStream.Header, raw: Map<string, Buffer> | undefined): Map<string, Buffer> {
  const text = (header as HeaderWithPax).pax;
  if (text === undefined || text === null) return new Map();
  const out = new Map<string, Buffer>();
  for (const [k, v] of Object.entries(text)) out.set(k, raw?.get(k) ?? Buffer.from(v, 'utf8'));
  return out;
}

function paxNumber(pax: Map<string, Buffer>, key: string): number | undefined {
  const v = pax.get(key)?.toString('latin1');
  if (v === undefined || !/^[0-9]+$/.test(v)) return undefined;
  const n = Number(v);
  return Number.isSafeInteger(n) ? n : undefined;
}

function paxMtimeMs(pax: Map<string, Buffer>): number | undefined {
  const v = pax.get('mtime')?.toString('latin1');
  if (v === undefined || !/^-?[0-9]+(\.[0-9]+)?$/.test(v)) return undefined;
  return Math.round(Number(v) * 1000);
}

/** The part of tar-stream's Extract internals the raw-PAX capture wraps. */
interface ExtractInternals {
  _decodeLongHeader?: (this: ExtractInternals, buf: Buffer) => void;
  _header?: { type?: string } | null;
}

/**
 * tar-stream decodes PAX values as UTF-8 text, which corrupts binary xattr values such as
 * security.capability. We wrap its (private) long-header decoder to keep the raw record bytes of the
 * next entry's PAX header. If a future tar-stream renames it, we fall back to its text values, which
 * are exact for every UTF-8 value.
 */
function captureRawPax(extract: tarStream.Extract): { take(): Map<string, Buffer> | undefined } {
  let pending: Map<string, Buffer> | undefined;
  const internals = extract as unknown as ExtractInternals;
  const original = internals._decodeLongHeader;
  if (typeof original === 'function') {
    internals._decodeLongHeader = function (this: ExtractInternals, buf: Buffer): void {
      if (this._header?.type === 'pax-header') {
        try {
          pending = parsePaxRecords(buf);
        } catch {
          pending = undefined; // tar-stream's own decoding still applies
        }
      }
      original.call(this, buf);
    };
  }
  return {
    take(): Map<string, Buffer> | undefined {
      const out = pending;
      pending = undefined;
      return out;
    },
  };
}
