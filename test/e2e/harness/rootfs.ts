/**
 * Layer contents for test images: a list of `EntrySpec`s is materialised into a directory (as root:
 * owners, modes, devices, xattrs, fixed mtimes) and packed with GNU tar into a reproducible,
 * gzip-compressed layer whose digest and diff_id are computed on the way.
 */
import { createCipheriv, createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { chmod, copyFile, lchown, link, lstat, lutimes, mkdir, open, readdir, rm, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { run } from './exec';

/** Every entry without an explicit mtime gets this one (2024-01-02T03:04:05Z), so layers are reproducible. */
export const DEFAULT_MTIME_SEC = 1_704_164_645;
const WHITEOUT_PREFIX = '.wh.';
const OPAQUE_MARKER = '.wh..wh..opq';
const RANDOM_CHUNK_BYTES = 1 << 20;

/** File contents: literal, deterministic incompressible bytes, zeros, or a copy of a host file. */
export type FileContent = string | Buffer | { random: number; seed?: string } | { zeros: number } | { fromFile: string };

interface EntryBase {
  /** Absolute path inside the image, e.g. `/data/big.bin`. */
  path: string;
  uid?: number;
  gid?: number;
  /** Seconds since the epoch. */
  mtime?: number;
}

interface Attributed extends EntryBase {
  /** Permission bits including setuid/setgid/sticky (e.g. 0o4755). */
  mode?: number;
  /** Extended attributes (`user.*`, `trusted.*`); strings are UTF-8. */
  xattrs?: Record<string, string | Buffer>;
}

export type EntrySpec =
  | (Attributed & { type?: 'file'; content?: FileContent })
  | (Attributed & { type: 'dir' })
  | (EntryBase & { type: 'symlink'; target: string })
  /** A hard link to `target` (an image path listed earlier in the same layer). */
  | { type: 'hardlink'; path: string; target: string }
  | (Attributed & { type: 'fifo' })
  | (Attributed & { type: 'char' | 'block'; major: number; minor: number })
  /** An OCI whiteout: deletes `path` of lower layers (written as `.wh.<name>`). */
  | { type: 'whiteout'; path: string }
  /** Makes directory `path` opaque: lower layers' contents are hidden (`.wh..wh..opq`). */
  | { type: 'opaque'; path: string; mode?: number };

/** A layer is the list of entries it adds, changes or deletes. */
export type LayerSpec = EntrySpec[];

export interface LayerBlob {
  /** Path of the tar.gz on disk. */
  file: string;
  /** sha256 of the compressed blob (the layer digest). */
  digest: string;
  size: number;
  /** sha256 of the uncompressed tar (the config's diff_id). */
  diffId: string;
  uncompressedSize: number;
}

function inside(dir: string, imagePath: string): string {
  const rel = path.posix.normalize('/' + imagePath).slice(1);
  if (rel === '' || rel.startsWith('..')) throw new Error(`bad image path: ${imagePath}`);
  return path.join(dir, rel);
}

/** Creates missing parent directories one by one with mode 0755 (independent of the umask). */
async function ensureDir(dir: string, stopAt: string): Promise<void> {
  if (dir === stopAt) return;
  try {
    await lstat(dir);
    return;
  } catch {
    // missing
  }
  await ensureDir(path.dirname(dir), stopAt);
  await mkdir(dir);
  await chmod(dir, 0o755);
}

/** Writes `bytes` of deterministic incompressible data (AES-256-CTR keystream of `seed`). */
async function writeRandom(file: string, bytes: number, seed: string): Promise<void> {
  const key = createHash('sha256').update(seed).digest();
  const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  const zeros = Buffer.alloc(RANDOM_CHUNK_BYTES);
  const fh = await open(file, 'w');
  try {
    for (let left = bytes; left > 0; ) {
      const n = Math.min(left, RANDOM_CHUNK_BYTES);
      await fh.write(cipher.update(n === RANDOM_CHUNK_BYTES ? zeros : zeros.subarray(0, n)));
      left -= n;
    }
  } finally {
    await fh.close();
  }
}

async function writeZeros(file: string, bytes: number): Promise<void> {
  const chunk = Buffer.alloc(Math.min(bytes, RANDOM_CHUNK_BYTES));
  const fh = await open(file, 'w');
  try {
    for (let left = bytes; left > 0; ) {
      const n = Math.min(left, chunk.length);
      await fh.write(chunk, 0, n);
      left -= n;
    }
  } finally {
    await fh.close();
  }
}

async function writeContent(file: string, content: FileContent | undefined, imagePath: string): Promise<void> {
  if (content === undefined || typeof content === 'string' || Buffer.isBuffer(content)) {
    await writeFile(file, content ?? '');
  } else if ('random' in content) {
    await writeRandom(file, content.random, content.seed ?? imagePath);
  } else if ('zeros' in content) {
    await writeZeros(file, content.zeros);
  } else {
    await copyFile(content.fromFile, file);
  }
}

async function setXattrs(file: string, xattrs: Record<string, string | Buffer> | undefined): Promise<void> {
  for (const [name, value] of Object.entries(xattrs ?? {})) {
    const bytes = Buffer.isBuffer(value) ? value : Buffer.from(value, 'utf8');
    // an empty value must be passed as "" (setfattr rejects a bare 0x)
    const encoded = bytes.length === 0 ? '' : '0x' + bytes.toString('hex');
    await run('setfattr', ['-h', '-n', name, '-v', encoded, file]);
  }
}

/**
 * Creates the entries under `dir` (which stands for the image root). Must run as root for owners,
 * devices and `trusted.*` xattrs. Entries are created in order; hardlink targets come first.
 */
export async function materializeEntries(dir: string, entries: readonly EntrySpec[]): Promise<void> {
  await mkdir(dir, { recursive: true });
  const explicitMtimes = new Map<string, number>();
  for (const e of entries) {
    const p = inside(dir, e.path);
    await ensureDir(path.dirname(p), dir);
    switch (e.type) {
      case undefined:
      case 'file':
        await writeContent(p, e.content, e.path);
        break;
      case 'dir':
        await mkdir(p, { recursive: true });
        break;
      case 'symlink':
        await symlink(e.target, p);
        break;
      case 'hardlink':
        await link(inside(dir, e.target), p);
        continue;
      case 'fifo':
        await run('mknod', [p, 'p']);
        break;
      case 'char':
      case 'block':
        await run('mknod', [p, e.type === 'char' ? 'c' : 'b', String(e.major), String(e.minor)]);
        break;
      case 'whiteout':
        await writeFile(path.join(path.dirname(p), WHITEOUT_PREFIX + path.basename(p)), '');
        continue;
      case 'opaque':
        await mkdir(p, { recursive: true });
        await chmod(p, e.mode ?? 0o755);
        await writeFile(path.join(p, OPAQUE_MARKER), '');
        continue;
    }
    if (e.uid !== undefined || e.gid !== undefined) await lchown(p, e.uid ?? 0, e.gid ?? 0);
    if (e.type !== 'symlink') {
      // after chown, which clears setuid/setgid
      const defaultMode = e.type === 'dir' ? 0o755 : e.type === 'char' || e.type === 'block' ? 0o666 : 0o644;
      await chmod(p, e.mode ?? defaultMode);
      await setXattrs(p, e.xattrs);
    }
    if (e.mtime !== undefined) explicitMtimes.set(p, e.mtime);
  }
  await setMtimes(dir, explicitMtimes);
}

/** Gives every entry below `dir` DEFAULT_MTIME_SEC (or its explicit mtime); creation order does not matter. */
async function setMtimes(dir: string, explicit: Map<string, number>): Promise<void> {
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) await walk(p);
      const t = explicit.get(p) ?? DEFAULT_MTIME_SEC;
      await lutimes(p, t, t);
    }
  };
  await walk(dir);
}

/** Byte-wise (C locale) order, as `tar --sort=name` uses below the top level. */
function byteOrder(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

/** Counts and hashes what flows through. */
export function hashingTap(): { tap: Transform; result: () => { digest: string; size: number } } {
  const hash = createHash('sha256');
  let size = 0;
  const tap = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      hash.update(chunk);
      size += chunk.length;
      cb(null, chunk);
    },
  });
  return { tap, result: () => ({ digest: 'sha256:' + hash.digest('hex'), size }) };
}

/**
 * Packs `dir` into `<outBase>.tar.gz` with GNU tar (POSIX format, sorted, numeric owners, all
 * xattrs, no atime/ctime, no root entry) and returns its digests. The uncompressed tar is removed.
 */
export async function packLayer(dir: string, outBase: string): Promise<LayerBlob> {
  const tarFile = outBase + '.tar';
  const gzFile = outBase + '.tar.gz';
  const names = (await readdir(dir)).sort(byteOrder);
  await run('tar', [
    '--create',
    `--file=${tarFile}`,
    `--directory=${dir}`,
    '--format=posix',
    '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime',
    '--sort=name',
    '--numeric-owner',
    '--xattrs',
    '--xattrs-include=*',
    // an empty layer is legal; tar refuses an empty argument list, so read names from /dev/null
    ...(names.length > 0 ? ['--', ...names] : ['--files-from=/dev/null']),
  ]);
  const raw = hashingTap();
  const gz = hashingTap();
  await pipeline(createReadStream(tarFile), raw.tap, createGzip({ level: 6 }), gz.tap, createWriteStream(gzFile));
  await rm(tarFile);
  const r = raw.result();
  const g = gz.result();
  return { file: gzFile, digest: g.digest, size: g.size, diffId: r.digest, uncompressedSize: r.size };
}
