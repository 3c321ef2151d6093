/**
 * Compares two directory trees entry by entry (e.g. an image rootfs mounted through stargaze vs
 * the same image unpacked by containerd's overlayfs snapshotter): type, mode, owner, size, mtime,
 * symlink target, device numbers, xattrs, hardlink grouping and file contents.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, readdir, readlink } from 'node:fs/promises';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { run } from './exec';

export type EntryType = 'file' | 'dir' | 'symlink' | 'fifo' | 'char' | 'block' | 'socket' | 'unknown';

/** What `snapshotTree` records for one path. */
export interface FsEntry {
  /** Path relative to the tree root, '' for the root itself, '/'-separated. */
  path: string;
  type: EntryType;
  /** Permission bits including setuid/setgid/sticky (st_mode & 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtimeSec: number;
  /** `major:minor` for devices. */
  rdev?: string;
  target?: string;
  /** `sha256:<hex>` of regular files. */
  sha256?: string;
  /** name -> hex value. */
  xattrs: Record<string, string>;
  /** Other paths in this tree with the same inode (sorted), for non-directories. */
  hardlinks: string[];
  /** Any error met reading this entry (EIO from a broken FUSE mount, say). */
  error?: string;
}

export type DiffField =
  | 'missing'
  | 'type'
  | 'mode'
  | 'uid'
  | 'gid'
  | 'size'
  | 'mtime'
  | 'target'
  | 'rdev'
  | 'xattrs'
  | 'hardlinks'
  | 'content'
  | 'error';

export interface FsDifference {
  path: string;
  field: DiffField;
  /** Value in tree A (undefined if missing there). */
  a?: unknown;
  b?: unknown;
}

export interface SnapshotOptions {
  /** Skip these relative paths (and everything below them). */
  exclude?: (relPath: string) => boolean;
  /** Hash regular files (default true). */
  hashContents?: boolean;
  /** Read xattrs (default true). */
  xattrs?: boolean;
  /**
   * Which xattr names to record (default: all). containerd's own tar applier drops `trusted.*`,
   * so comparing against an overlayfs-unpacked tree may call for `(n) => !n.startsWith('trusted.')`.
   */
  xattrFilter?: (name: string) => boolean;
  /** Parallel file hashes (default 4). */
  concurrency?: number;
}

export interface CompareOptions extends SnapshotOptions {
  /** Fields not compared at all. */
  ignore?: DiffField[];
  /**
   * Compare the root dir's own metadata (default false: its mtime/mode come from the snapshot's
   * fresh upper dir, not from the image).
   */
  compareRoot?: boolean;
  /** Ignore mtime for these paths (directories touched by the mounter, say). */
  ignoreMtime?: (relPath: string) => boolean;
}

function typeOf(mode: number): EntryType {
  switch (mode & 0o170000) {
    case 0o100000:
      return 'file';
    case 0o040000:
      return 'dir';
    case 0o120000:
      return 'symlink';
    case 0o010000:
      return 'fifo';
    case 0o020000:
      return 'char';
    case 0o060000:
      return 'block';
    case 0o140000:
      return 'socket';
    default:
      return 'unknown';
  }
}

function errorText(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  return e.code ?? (err instanceof Error ? err.message : String(err));
}

async function hashFile(file: string): Promise<string> {
  const hash = createHash('sha256');
  await pipeline(createReadStream(file), hash);
  return 'sha256:' + hash.digest('hex');
}

async function mapLimit<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

/** Undoes getfattr's octal escapes (\012, \134, ...) in file names. */
function unescapeGetfattr(s: string): string {
  const bytes: number[] = [];
  const raw = Buffer.from(s, 'utf8');
  for (let i = 0; i < raw.length; i++) {
    if (raw[i] === 0x5c && i + 3 < raw.length && /^[0-7]{3}$/.test(raw.subarray(i + 1, i + 4).toString('latin1'))) {
      bytes.push(parseInt(raw.subarray(i + 1, i + 4).toString('latin1'), 8));
      i += 3;
    } else {
      bytes.push(raw[i]!);
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

/** All xattrs of `files` (absolute paths, not following symlinks), in batches of getfattr calls. */
async function readXattrs(files: string[]): Promise<Map<string, Record<string, string>>> {
  const result = new Map<string, Record<string, string>>();
  const BATCH = 200;
  for (let i = 0; i < files.length; i += BATCH) {
    const batch = files.slice(i, i + BATCH);
    // exit status is 1 when some file has no xattr support; what it printed is still right
    const r = await run('getfattr', ['--absolute-names', '-h', '-d', '-m', '-', '-e', 'hex', '--', ...batch], {
      allowFailure: true,
    });
    let current: Record<string, string> | undefined;
    for (const line of r.stdout.split('\n')) {
      if (line.startsWith('# file: ')) {
        current = {};
        result.set(unescapeGetfattr(line.slice('# file: '.length)), current);
      } else if (current && line.includes('=')) {
        const eq = line.indexOf('=');
        const value = line.slice(eq + 1);
        current[line.slice(0, eq)] = value.startsWith('0x') ? value.slice(2) : value === '""' ? '' : value;
      }
    }
  }
  return result;
}

/** Walks `root` (not following symlinks, not descending into excluded paths) and records every entry. */
export async function snapshotTree(treeRoot: string, opts: SnapshotOptions = {}): Promise<Map<string, FsEntry>> {
  const root = path.resolve(treeRoot);
  const entries = new Map<string, FsEntry>();
  const inodes = new Map<string, string[]>();
  const inodeOf = new Map<string, string>();
  const visit = async (rel: string): Promise<void> => {
    const abs = rel === '' ? root : path.join(root, rel);
    const entry: FsEntry = {
      path: rel,
      type: 'unknown',
      mode: 0,
      uid: 0,
      gid: 0,
      size: 0,
      mtimeSec: 0,
      xattrs: {},
      hardlinks: [],
    };
    entries.set(rel, entry);
    let st;
    try {
      st = await lstat(abs, { bigint: true });
    } catch (err) {
      entry.error = `lstat: ${errorText(err)}`;
      return;
    }
    const mode = Number(st.mode);
    entry.type = typeOf(mode);
    entry.mode = mode & 0o7777;
    entry.uid = Number(st.uid);
    entry.gid = Number(st.gid);
    entry.size = entry.type === 'dir' ? 0 : Number(st.size);
    entry.mtimeSec = Number(st.mtimeNs / 1_000_000_000n);
    if (entry.type === 'char' || entry.type === 'block') {
      // glibc's major()/minor() split of a dev_t
      const r = st.rdev;
      const major = ((r >> 8n) & 0xfffn) | ((r >> 32n) & ~0xfffn);
      const minor = (r & 0xffn) | ((r >> 12n) & ~0xffn);
      entry.rdev = `${major}:${minor}`;
    }
    if (entry.type !== 'dir') {
      const key = `${st.dev}:${st.ino}`;
      inodeOf.set(rel, key);
      const group = inodes.get(key) ?? [];
      group.push(rel);
      inodes.set(key, group);
    }
    if (entry.type === 'symlink') {
      try {
        entry.target = await readlink(abs);
      } catch (err) {
        entry.error = `readlink: ${errorText(err)}`;
      }
    }
    if (entry.type === 'dir') {
      let names: string[];
      try {
        names = await readdir(abs);
      } catch (err) {
        entry.error = `readdir: ${errorText(err)}`;
        return;
      }
      names.sort();
      for (const name of names) {
        const childRel = rel === '' ? name : `${rel}/${name}`;
        if (opts.exclude?.(childRel)) continue;
        await visit(childRel);
      }
    }
  };
  await visit('');

  for (const [rel, key] of inodeOf) {
    entries.get(rel)!.hardlinks = inodes.get(key)!.filter((p) => p !== rel).sort();
  }
  if (opts.hashContents !== false) {
    const files = [...entries.values()].filter((e) => e.type === 'file' && !e.error);
    await mapLimit(files, opts.concurrency ?? 4, async (e) => {
      try {
        e.sha256 = await hashFile(path.join(root, e.path));
      } catch (err) {
        e.error = `read: ${errorText(err)}`;
      }
    });
  }
  if (opts.xattrs !== false) {
    const list = [...entries.values()].filter((e) => !e.error);
    const byAbs = new Map(list.map((e) => [e.path === '' ? root : path.join(root, e.path), e] as const));
    const found = await readXattrs([...byAbs.keys()]);
    for (const [abs, xattrs] of found) {
      const e = byAbs.get(abs);
      if (!e) continue;
      e.xattrs = opts.xattrFilter
        ? Object.fromEntries(Object.entries(xattrs).filter(([name]) => opts.xattrFilter!(name)))
        : xattrs;
    }
  }
  return entries;
}

function sameXattrs(a: Record<string, string>, b: Record<string, string>): boolean {
  const ka = Object.keys(a).sort();
  const kb = Object.keys(b).sort();
  return ka.length === kb.length && ka.every((k, i) => k === kb[i] && a[k] === b[k]);
}

/** Differences between two snapshots (`a` is usually the reference, `b` the tree under test). */
export function diffSnapshots(
  a: Map<string, FsEntry>,
  b: Map<string, FsEntry>,
  opts: CompareOptions = {},
): FsDifference[] {
  const ignore = new Set(opts.ignore ?? []);
  const diffs: FsDifference[] = [];
  const add = (p: string, field: DiffField, va: unknown, vb: unknown): void => {
    if (!ignore.has(field)) diffs.push({ path: p, field, a: va, b: vb });
  };
  const paths = [...new Set([...a.keys(), ...b.keys()])].sort();
  for (const p of paths) {
    const ea = a.get(p);
    const eb = b.get(p);
    if (!ea || !eb) {
      add(p, 'missing', ea ? ea.type : undefined, eb ? eb.type : undefined);
      continue;
    }
    if (ea.error || eb.error) {
      if (ea.error !== eb.error) add(p, 'error', ea.error, eb.error);
      continue;
    }
    if (ea.type !== eb.type) {
      add(p, 'type', ea.type, eb.type);
      continue;
    }
    const isRoot = p === '';
    if (!isRoot || opts.compareRoot) {
      if (ea.mode !== eb.mode) add(p, 'mode', '0' + ea.mode.toString(8), '0' + eb.mode.toString(8));
      if (ea.uid !== eb.uid) add(p, 'uid', ea.uid, eb.uid);
      if (ea.gid !== eb.gid) add(p, 'gid', ea.gid, eb.gid);
      if (ea.mtimeSec !== eb.mtimeSec && !opts.ignoreMtime?.(p)) add(p, 'mtime', ea.mtimeSec, eb.mtimeSec);
      if (!sameXattrs(ea.xattrs, eb.xattrs)) add(p, 'xattrs', ea.xattrs, eb.xattrs);
    }
    if (ea.size !== eb.size) add(p, 'size', ea.size, eb.size);
    if (ea.target !== eb.target) add(p, 'target', ea.target, eb.target);
    if (ea.rdev !== eb.rdev) add(p, 'rdev', ea.rdev, eb.rdev);
    if (ea.sha256 !== eb.sha256) add(p, 'content', ea.sha256, eb.sha256);
    if (ea.hardlinks.join('\0') !== eb.hardlinks.join('\0')) add(p, 'hardlinks', ea.hardlinks, eb.hardlinks);
  }
  return diffs;
}

/** Snapshots both trees and returns their differences (empty when they match). */
export async function compareTrees(rootA: string, rootB: string, opts: CompareOptions = {}): Promise<FsDifference[]> {
  const [a, b] = await Promise.all([snapshotTree(rootA, opts), snapshotTree(rootB, opts)]);
  return diffSnapshots(a, b, opts);
}

/** A readable report, at most `limit` lines. */
export function formatDifferences(diffs: FsDifference[], limit = 50): string {
  const lines = diffs
    .slice(0, limit)
    .map((d) => `/${d.path}: ${d.field}: ${JSON.stringify(d.a)} != ${JSON.stringify(d.b)}`);
  if (diffs.length > limit) lines.push(`... and ${diffs.length - limit} more`);
  return lines.join('\n');
}
