import { createHash } from 'node:crypto';
import { posix } from 'node:path';
import type { Readable, Writable } from 'node:stream';

import { EstargzFormatError } from '../errors';
import { encodeFooter } from './footer';
import { GzipMemberWriter } from './gzip-member-writer';
import {
  TAR_EOF_BYTES,
  TYPEFLAG,
  encodeTarHeader,
  tarPaddingBytes,
  type TarHeaderFields,
} from './tar-header';
import { spoolTar, type SpooledEntry, type TarSpool } from './tar-spool';
import {
  LANDMARK_CONTENTS,
  NO_PREFETCH_LANDMARK,
  PREFETCH_LANDMARK,
  TOC_TAR_NAME,
  TOC_VERSION,
  type TocEntry,
} from './toc';

/**
 * The eStargz builder: tar in, eStargz blob out (reference §1.1, §1.2, §1.6, §1.7). Every payload chunk
 * starts its own gzip member; a tar header rides at the tail of the member before it. The TOC is the
 * last tar entry, in its own member with the tar EOF blocks, and the 51-byte footer points at it.
 */

/** Uncompressed bytes of file data per gzip member (reference default). */
export const DEFAULT_CHUNK_SIZE_BYTES = 4 * 1024 * 1024;
/** gzip level: best compression, as the reference. */
export const DEFAULT_COMPRESSION_LEVEL = 9;
/** Payload is copied from the spool file in pieces of at most this size. */
const COPY_PIECE_BYTES = 1024 * 1024;

export interface EstargzWriterOptions {
  /** Uncompressed file bytes per gzip member. Default DEFAULT_CHUNK_SIZE_BYTES. */
  chunkSizeBytes?: number;
  /** gzip level 0-9. Default DEFAULT_COMPRESSION_LEVEL. */
  compressionLevel?: number;
  /**
   * Files to put first, in this (access) order, followed by `.prefetch.landmark`. Their parent dirs and
   * hardlink targets move with them. Empty or absent: `.no.prefetch.landmark` goes first instead.
   */
  prioritizedFiles?: readonly string[];
  /** Where to spool the input's payloads. Default: the OS temp dir. */
  tmpDir?: string;
}

export interface EstargzWriteResult {
  /** `sha256:` of the TOC JSON: the `containerd.io/snapshot/stargz/toc.digest` annotation. */
  tocDigest: string;
  /** `sha256:` of the whole decompressed stream. */
  diffId: string;
  /** `sha256:` of the blob. */
  blobDigest: string;
  blobSize: number;
  /** Decompressed size: the `io.containers.estargz.uncompressed-size` annotation. */
  uncompressedSize: number;
  /** Compressed offset of the TOC member. */
  tocOffset: number;
  /** Prioritized files that were not in the input (skipped, as the reference does when allowed). */
  missedPrioritizedFiles: string[];
}

/**
 * Reads a tar (plain or gzip) from `input` and writes an eStargz blob to `output`, which is ended when
 * done. Payloads are spooled to a temp file first, so memory holds headers only.
 */
export async function writeEstargz(
  input: Readable,
  output: Writable,
  opts: EstargzWriterOptions = {},
): Promise<EstargzWriteResult> {
  const chunkSize = opts.chunkSizeBytes ?? DEFAULT_CHUNK_SIZE_BYTES;
  const level = opts.compressionLevel ?? DEFAULT_COMPRESSION_LEVEL;
  if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) throw new RangeError(`chunk size ${chunkSize} must be positive`);
  if (!Number.isInteger(level) || level < 0 || level > 9) throw new RangeError(`compression level ${level} is not 0-9`);

  const spool = await spoolTar(input, {
    tmpDir: opts.tmpDir,
    skipNames: new Set([TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK]),
  });
  const gz = new GzipMemberWriter(output, level);
  try {
    const { ordered, missed } = orderEntries(spool.entries, opts.prioritizedFiles ?? []);
    const toc = new TocBuilder();
    for (const item of ordered) {
      if (item === 'landmark') {
        const name = (opts.prioritizedFiles ?? []).length > 0 ? PREFETCH_LANDMARK : NO_PREFETCH_LANDMARK;
        await writeLandmark(gz, toc, name);
      } else {
        await writeEntry(gz, toc, spool, item, chunkSize);
      }
    }

    await gz.closeMember();
    const tocOffset = gz.offset;
    const tocJson = toc.toJson();
    await gz.write(encodeTarHeader(plainFile(TOC_TAR_NAME, tocJson.length)));
    await gz.write(tocJson);
    await gz.write(Buffer.alloc(tarPaddingBytes(tocJson.length) + TAR_EOF_BYTES));
    await gz.closeMember();
    await gz.writeRaw(encodeFooter(tocOffset));
    const sums = await gz.finish();
    return {
      tocDigest: 'sha256:' + createHash('sha256').update(tocJson).digest('hex'),
      ...sums,
      tocOffset,
      missedPrioritizedFiles: missed,
    };
  } catch (err) {
    gz.destroy(err instanceof Error ? err : new Error(String(err)));
    throw err;
  } finally {
    await spool.close();
  }
}

/** Marks where the landmark file goes in the output order. */
type OrderItem = SpooledEntry | 'landmark';

/**
 * Output order (reference build.go sortEntries): prioritized files with their parents and hardlink
 * targets, then `.prefetch.landmark`; or, with no prioritized files, `.no.prefetch.landmark` first.
 * Everything else follows in input order.
 */
function orderEntries(
  entries: readonly SpooledEntry[],
  prioritized: readonly string[],
): { ordered: OrderItem[]; missed: string[] } {
  if (prioritized.length === 0) return { ordered: ['landmark', ...entries], missed: [] };
  const remaining = new Map<string, SpooledEntry>(entries.map((e) => [e.cleanName, e]));
  const moved = new Set<string>();
  const front: OrderItem[] = [];
  const missed: string[] = [];

  const move = (name: string): void => {
    // Parents first (a missing parent is fine: readers synthesise it), then a hardlink's target.
    if (name !== '') move(parentOf(name));
    const e = remaining.get(name);
    if (e === undefined) return; // already moved, or no entry of its own
    remaining.delete(name);
    moved.add(name);
    if (e.typeflag === TYPEFLAG.hardlink) move(cleanPrioritized(e.linkname));
    front.push(e);
  };
  for (const file of prioritized) {
    const name = cleanPrioritized(file);
    if (remaining.has(name) || moved.has(name)) {
      move(name);
    } else {
      missed.push(file);
    }
  }
  front.push('landmark');
  return { ordered: [...front, ...entries.filter((e) => remaining.has(e.cleanName))], missed };
}

/** Reference semantics for prioritized names: "foo", "/foo", "./foo", "../foo" all mean "/foo". */
function cleanPrioritized(name: string): string {
  return posix.join('/', name).replace(/^\/+/, '').replace(/\/+$/, '');
}

function parentOf(name: string): string {
  const i = name.lastIndexOf('/');
  return i < 0 ? '' : name.slice(0, i);
}

async function writeLandmark(gz: GzipMemberWriter, toc: TocBuilder, name: string): Promise<void> {
  const payload = Buffer.from([LANDMARK_CONTENTS]);
  await gz.write(encodeTarHeader(plainFile(name, payload.length)));
  await gz.closeMember();
  const digest = sha256(payload);
  toc.add({ name, type: 'reg', size: payload.length, offset: gz.offset, digest, chunkDigest: digest });
  await gz.write(payload);
  await gz.write(Buffer.alloc(tarPaddingBytes(payload.length)));
}

async function writeEntry(
  gz: GzipMemberWriter,
  toc: TocBuilder,
  spool: TarSpool,
  e: SpooledEntry,
  chunkSize: number,
): Promise<void> {
  const mtimeSec = Math.round(e.mtimeMs / 1000);
  await gz.write(
    encodeTarHeader({
      name: e.name,
      typeflag: e.typeflag,
      mode: e.mode,
      uid: e.uid,
      gid: e.gid,
      size: e.size,
      mtimeSec,
      linkname: e.linkname,
      uname: e.uname,
      gname: e.gname,
      devmajor: e.devmajor,
      devminor: e.devminor,
      xattrs: e.xattrs,
    }),
  );
  const ent: TocEntry = {
    name: e.name,
    type: tocTypeOf(e.typeflag),
    modtime: formatModtime(mtimeSec),
    mode: e.mode,
    uid: e.uid,
    gid: e.gid,
    userName: toc.userNameIfChanged(e.uid, e.uname),
    groupName: toc.groupNameIfChanged(e.gid, e.gname),
  };
  if (e.typeflag === TYPEFLAG.symlink || e.typeflag === TYPEFLAG.hardlink) ent.linkName = e.linkname;
  if (e.typeflag === TYPEFLAG.char || e.typeflag === TYPEFLAG.block) {
    ent.devMajor = e.devmajor;
    ent.devMinor = e.devminor;
  }
  if (e.xattrs.size > 0) {
    ent.xattrs = {};
    for (const key of [...e.xattrs.keys()].sort()) ent.xattrs[key] = (e.xattrs.get(key) ?? Buffer.alloc(0)).toString('base64');
  }
  if (e.typeflag !== TYPEFLAG.reg) {
    toc.add(ent);
    return;
  }

  ent.size = e.size;
  const fileHash = createHash('sha256');
  if (e.size === 0) toc.add(ent); // no payload, so no member and no chunk of its own
  let chunkEnt: TocEntry = ent;
  for (let written = 0; written < e.size; ) {
    // Each chunk starts a member, so a reader can inflate it without anything before it.
    await gz.closeMember();
    const n = Math.min(chunkSize, e.size - written);
    // Like the reference: chunkSize is recorded only for full chunks; absent means "to end of file".
    if (n === chunkSize) chunkEnt.chunkSize = n;
    chunkEnt.offset = gz.offset;
    chunkEnt.chunkOffset = written;
    const chunkHash = createHash('sha256');
    for (let done = 0; done < n; ) {
      const piece = await spool.read(e.spoolOffset + written + done, Math.min(COPY_PIECE_BYTES, n - done));
      fileHash.update(piece);
      chunkHash.update(piece);
      await gz.write(piece);
      done += piece.length;
    }
    chunkEnt.chunkDigest = 'sha256:' + chunkHash.digest('hex');
    toc.add(chunkEnt);
    written += n;
    chunkEnt = { name: e.name, type: 'chunk' };
  }
  await gz.write(Buffer.alloc(tarPaddingBytes(e.size)));
  ent.digest = 'sha256:' + fileHash.digest('hex');
}

function tocTypeOf(typeflag: string): TocEntry['type'] {
  switch (typeflag) {
    case TYPEFLAG.reg:
      return 'reg';
    case TYPEFLAG.hardlink:
      return 'hardlink';
    case TYPEFLAG.symlink:
      return 'symlink';
    case TYPEFLAG.char:
      return 'char';
    case TYPEFLAG.block:
      return 'block';
    case TYPEFLAG.dir:
      return 'dir';
    case TYPEFLAG.fifo:
      return 'fifo';
    default:
      throw new EstargzFormatError(`unsupported tar typeflag ${JSON.stringify(typeflag)}`);
  }
}

/** Header of a root-owned, mode-0, epoch-dated regular file: what the reference writes for the TOC and landmarks. */
function plainFile(name: string, size: number): TarHeaderFields {
  return {
    name,
    typeflag: TYPEFLAG.reg,
    mode: 0,
    uid: 0,
    gid: 0,
    size,
    mtimeSec: 0,
    linkname: '',
    uname: '',
    gname: '',
    devmajor: 0,
    devminor: 0,
  };
}

/** RFC 3339 UTC in whole seconds; undefined (omitted) for the epoch, as the reference. */
function formatModtime(mtimeSec: number): string | undefined {
  if (mtimeSec === 0 || !Number.isFinite(mtimeSec)) return undefined;
  return new Date(mtimeSec * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z');
}

function sha256(data: Buffer): string {
  return 'sha256:' + createHash('sha256').update(data).digest('hex');
}

/** Accumulates TOC entries and serialises them like the reference (Go MarshalIndent, tab indent). */
class TocBuilder {
  private readonly entries: TocEntry[] = [];
  /** Last user name written per uid: names are only written when they change. */
  private readonly userNames = new Map<number, string>();
  private readonly groupNames = new Map<number, string>();

  add(e: TocEntry): void {
    this.entries.push(e);
  }

  userNameIfChanged(uid: number, name: string): string | undefined {
    return nameIfChanged(this.userNames, uid, name);
  }

  groupNameIfChanged(gid: number, name: string): string | undefined {
    return nameIfChanged(this.groupNames, gid, name);
  }

  toJson(): Buffer {
    const doc = { version: TOC_VERSION, entries: this.entries.map(canonicalEntry) };
    return Buffer.from(JSON.stringify(doc, null, '\t'), 'utf8');
  }
}

function nameIfChanged(names: Map<number, string>, id: number, name: string): string | undefined {
  if (name === '' || names.get(id) === name) return undefined;
  names.set(id, name);
  return name;
}

/** Field order of the reference struct, zero values omitted (Go `omitempty`). */
function canonicalEntry(e: TocEntry): Record<string, unknown> {
  const out: Record<string, unknown> = { name: e.name, type: e.type };
  const put = (key: string, v: string | number | Record<string, string> | undefined): void => {
    if (v === undefined || v === '' || v === 0) return;
    if (typeof v === 'object' && Object.keys(v).length === 0) return;
    out[key] = v;
  };
  put('size', e.size);
  put('modtime', e.modtime);
  put('linkName', e.linkName);
  put('mode', e.mode);
  put('uid', e.uid);
  put('gid', e.gid);
  put('userName', e.userName);
  put('groupName', e.groupName);
  put('offset', e.offset);
  put('innerOffset', e.innerOffset);
  put('devMajor', e.devMajor);
  put('devMinor', e.devMinor);
  put('xattrs', e.xattrs);
  put('digest', e.digest);
  put('chunkOffset', e.chunkOffset);
  put('chunkSize', e.chunkSize);
  put('chunkDigest', e.chunkDigest);
  return out;
}
