/**
 * Ready-made image contents for the e2e tests and the demo:
 * - `bigFileFixture`: a large incompressible file the workload never reads, plus a small one it
 *   does, to prove lazy pulling fetches a fraction of the layer;
 * - `trickyFixture`: three layers exercising every tar/overlay corner we know of.
 */
import type { EntrySpec, LayerSpec } from './rootfs';

const MiB = 1024 * 1024;

export interface BigFileFixture {
  /** Goes into `buildBusyboxImage({ extraFiles })`. */
  extraFiles: EntrySpec[];
  bigFilePath: string;
  bigFileBytes: number;
  /** The small file the workload reads, and its content. */
  probePath: string;
  probeContent: string;
  /** A command that reads only the probe file and prints its content. */
  workload: string[];
}

/** A `sizeBytes` (default 64 MiB) file of random-looking bytes that no workload touches. */
export function bigFileFixture(opts: { sizeBytes?: number; seed?: string } = {}): BigFileFixture {
  const bigFilePath = '/data/big.bin';
  const bigFileBytes = opts.sizeBytes ?? 64 * MiB;
  const probePath = '/hello.txt';
  const probeContent = 'hello from a lazily pulled layer\n';
  return {
    extraFiles: [
      { path: probePath, content: probeContent },
      { path: bigFilePath, content: { random: bigFileBytes, seed: opts.seed ?? 'stargaze-big-file' } },
    ],
    bigFilePath,
    bigFileBytes,
    probePath,
    probeContent,
    workload: ['/bin/cat', probePath],
  };
}

export interface TrickyFixture {
  /** Base-layer additions (next to busybox). */
  extraFiles: EntrySpec[];
  /** Upper layers, bottom first. */
  layers: LayerSpec[];
  /** Paths that must exist in the merged rootfs. */
  present: string[];
  /** Paths that must not exist in the merged rootfs (whited out / hidden by an opaque dir). */
  absent: string[];
}

/** 230 ASCII characters: longer than tar's 100-byte name field, below NAME_MAX. */
const LONG_NAME = 'n'.repeat(226) + '.txt';
/** 120 two-byte characters (240 bytes). */
const LONG_UNICODE_NAME = 'é'.repeat(120);
/** A path of about 420 bytes in nested 100-character directories. */
const DEEP_PATH = `/tricky/deep/${'a'.repeat(100)}/${'b'.repeat(100)}/${'c'.repeat(100)}/${'d'.repeat(100)}.txt`;

/**
 * Three layers:
 * 1. base: plain files, hardlinks, symlinks, fifo, char devices, xattrs (user.* and trusted.*),
 *    setuid/setgid/sticky and odd modes, owners, old and future mtimes, unicode and 200+ character
 *    names, a deep path, empty file and dir, multi-chunk files (> 4 MiB);
 * 2. upper: whiteouts (file and dir), an opaque dir recreated with new content, type changes
 *    (file -> symlink, dir -> file), a metadata-only change, a new hardlink pair;
 * 3. top: a dir recreated where layer 2 whited out a file.
 */
export function trickyFixture(): TrickyFixture {
  const base: EntrySpec[] = [
    { path: '/tricky/keep.txt', content: 'kept through all layers\n' },
    { path: '/tricky/delete-me.txt', content: 'deleted in layer 2, a dir again in layer 3\n' },
    { path: '/tricky/deleted.txt', content: 'deleted in layer 2\n' },
    { path: '/tricky/dir-to-delete/a', content: 'a\n' },
    { path: '/tricky/dir-to-delete/sub/b', content: 'b\n' },
    { path: '/tricky/opaque/old1', content: 'hidden by the opaque dir\n' },
    { path: '/tricky/opaque/sub/old2', content: 'hidden by the opaque dir\n' },
    { path: '/tricky/becomes-symlink', content: 'a file in layer 1\n' },
    { path: '/tricky/dir-becomes-file/inner', content: 'a dir in layer 1\n' },
    { path: '/tricky/meta-change.txt', content: 'mode and owner change in layer 2\n', mode: 0o644 },
    // hardlinks: three names for one inode, one of them in another directory; xattrs on the inode
    { path: '/tricky/hard/original', content: 'one inode, three names\n', xattrs: { 'user.hardlinked': 'yes' } },
    { type: 'hardlink', path: '/tricky/hard/link1', target: '/tricky/hard/original' },
    { type: 'hardlink', path: '/tricky/hard-elsewhere', target: '/tricky/hard/original' },
    // symlinks
    { type: 'symlink', path: '/tricky/links/relative', target: '../keep.txt' },
    { type: 'symlink', path: '/tricky/links/absolute', target: '/tricky/keep.txt' },
    { type: 'symlink', path: '/tricky/links/dangling', target: '/does/not/exist' },
    { type: 'symlink', path: '/tricky/links/to-dir', target: '../hard' },
    { type: 'symlink', path: '/tricky/links/long-target', target: '../' + 't'.repeat(180) },
    // special files
    { type: 'fifo', path: '/tricky/special/fifo', mode: 0o640 },
    { type: 'char', path: '/tricky/special/null', major: 1, minor: 3, mode: 0o666 },
    { type: 'char', path: '/tricky/special/char-10-200', major: 10, minor: 200, mode: 0o600, uid: 7, gid: 8 },
    // xattrs
    {
      path: '/tricky/xattrs/file',
      content: 'has xattrs\n',
      xattrs: { 'user.stargaze': 'hello', 'user.binary': Buffer.from([0, 0xff, 0x10, 0x0a]), 'trusted.stargaze': 'secret' },
    },
    { path: '/tricky/xattrs/empty-value', content: '', xattrs: { 'user.empty': '' } },
    { type: 'dir', path: '/tricky/xattrs/dir', xattrs: { 'user.on-dir': 'dir value', 'trusted.on-dir': 't' } },
    // modes and owners
    { path: '/tricky/modes/setuid', content: '#!/bin/sh\n', mode: 0o4755 },
    { path: '/tricky/modes/setgid', content: '#!/bin/sh\n', mode: 0o2755 },
    { type: 'dir', path: '/tricky/modes/setgid-dir', mode: 0o2775 },
    { type: 'dir', path: '/tricky/modes/sticky-dir', mode: 0o1777 },
    { path: '/tricky/modes/private', content: 'secret\n', mode: 0o600 },
    { path: '/tricky/modes/no-permissions', content: 'none\n', mode: 0o000 },
    { path: '/tricky/modes/read-only', content: 'ro\n', mode: 0o444 },
    { type: 'dir', path: '/tricky/modes/private-dir', mode: 0o700 },
    { path: '/tricky/owners/file', content: 'owned by 1234:5678\n', uid: 1234, gid: 5678 },
    { type: 'dir', path: '/tricky/owners/dir', uid: 1000, gid: 1000, mode: 0o750 },
    { type: 'symlink', path: '/tricky/owners/link', target: 'file', uid: 1234, gid: 5678 },
    // times
    { path: '/tricky/times/old', content: 'from 1990\n', mtime: 642_902_400 },
    { path: '/tricky/times/future', content: 'from 2100\n', mtime: 4_102_444_800 },
    // names
    { path: '/tricky/names/ünïcødé-ファイル-🚀.txt', content: 'unicode name\n' },
    { path: '/tricky/names/日本語/データ.txt', content: 'unicode dir\n' },
    { path: '/tricky/names/with space=and#hash', content: 'odd characters\n' },
    { path: `/tricky/names/${LONG_NAME}`, content: 'long name\n' },
    { path: `/tricky/names/${LONG_UNICODE_NAME}`, content: 'long unicode name\n' },
    { path: DEEP_PATH, content: 'deep path\n' },
    // empty things
    { path: '/tricky/empty-file', content: '' },
    { type: 'dir', path: '/tricky/empty-dir' },
    // sizes around the converter's 4 MiB chunk size
    { path: '/tricky/chunks/multi-chunk.bin', content: { random: 10 * MiB + 12_345 } },
    { path: '/tricky/chunks/exactly-4MiB.bin', content: { random: 4 * MiB } },
    { path: '/tricky/chunks/zeros-5MiB.bin', content: { zeros: 5 * MiB } },
    { path: '/tricky/chunks/one-byte', content: 'x' },
  ];
  const upper: EntrySpec[] = [
    { type: 'whiteout', path: '/tricky/delete-me.txt' },
    { type: 'whiteout', path: '/tricky/deleted.txt' },
    { type: 'whiteout', path: '/tricky/dir-to-delete' },
    { type: 'opaque', path: '/tricky/opaque' },
    { path: '/tricky/opaque/new1', content: 'new in the opaque dir\n' },
    { type: 'symlink', path: '/tricky/becomes-symlink', target: 'keep.txt' },
    { path: '/tricky/dir-becomes-file', content: 'a file in layer 2\n' },
    { path: '/tricky/meta-change.txt', content: 'mode and owner change in layer 2\n', mode: 0o600, uid: 42, gid: 42 },
    { path: '/tricky/upper-hard/a', content: 'hardlink pair in layer 2\n' },
    { type: 'hardlink', path: '/tricky/upper-hard/b', target: '/tricky/upper-hard/a' },
  ];
  const top: EntrySpec[] = [
    { type: 'dir', path: '/tricky/delete-me.txt', mode: 0o755 },
    { path: '/tricky/delete-me.txt/now-a-dir', content: 'layer 3\n' },
  ];
  return {
    extraFiles: base,
    layers: [upper, top],
    present: [
      '/tricky/keep.txt',
      '/tricky/delete-me.txt/now-a-dir',
      '/tricky/opaque/new1',
      '/tricky/becomes-symlink',
      '/tricky/dir-becomes-file',
      '/tricky/hard/link1',
      '/tricky/hard-elsewhere',
      '/tricky/upper-hard/b',
      '/tricky/special/fifo',
      '/tricky/special/null',
      '/tricky/xattrs/file',
      '/tricky/names/ünïcødé-ファイル-🚀.txt',
      `/tricky/names/${LONG_NAME}`,
      DEEP_PATH,
      '/tricky/chunks/multi-chunk.bin',
    ],
    absent: [
      '/tricky/deleted.txt',
      '/tricky/dir-to-delete',
      '/tricky/opaque/old1',
      '/tricky/opaque/sub',
      '/tricky/dir-becomes-file/inner',
      '/tricky/.wh.deleted.txt',
      '/tricky/opaque/.wh..wh..opq',
    ],
  };
}
