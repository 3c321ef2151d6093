import assert from 'node:assert/strict';
import { test } from 'node:test';

import { EstargzFormatError } from '../../../src/errors';
import { parseToc } from '../../../src/estargz/toc';
import { makedev } from '../../../src/metadata/file-mode';
import { ROOT_INO, buildLayerTree, buildLayerTreeFromJson, type LayerTree } from '../../../src/metadata/layer-tree';
import { OPAQUE_XATTR, USER_OPAQUE_XATTR } from '../../../src/overlay-xattr';

const D = 'sha256:' + 'a'.repeat(64);

/**
 * The tree of `entries`, built both ways a layer can build it: from parsed entries, and straight from the JSON
 * (what a mount does). Every test here thereby checks that the two agree, on the tree and on the error.
 */
function tree(entries: unknown[], blobSize = 10_000, tocOffset?: number): LayerTree {
  const json = JSON.stringify({ version: 1, entries });
  let fromEntries: LayerTree | Error;
  let fromJson: LayerTree | Error;
  try {
    fromEntries = buildLayerTree(parseToc(json), { blobSize, tocOffset });
  } catch (err) {
    fromEntries = err as Error;
  }
  try {
    fromJson = buildLayerTreeFromJson(Buffer.from(json), { blobSize, tocOffset });
  } catch (err) {
    fromJson = err as Error;
  }
  if (fromEntries instanceof Error || fromJson instanceof Error) {
    assert.ok(fromJson instanceof Error && fromEntries instanceof Error, 'both ways fail, or neither');
    assert.equal(fromJson.constructor, fromEntries.constructor);
    assert.equal(fromJson.message, fromEntries.message);
    throw fromEntries;
  }
  assert.deepEqual(flatten(fromJson), flatten(fromEntries));
  return fromEntries;
}

/** Every node by inode, children as names to inodes: what two trees must agree on. */
function flatten(t: LayerTree): unknown[] {
  const out: unknown[] = [t.prefetchLandmarkOffset, t.noPrefetch, t.chunksInBlobOrder()];
  for (let ino = 1; ino <= t.nodeCount; ino++) {
    const n = t.getNode(ino);
    out.push({ ...n, children: n?.children && [...n.children].map(([name, c]) => [name, c.ino]), xattrs: n && [...n.xattrs] });
  }
  return out;
}

function names(t: LayerTree, path: string): string[] {
  return [...(t.resolvePath(path)?.children?.keys() ?? [])];
}

test('root is ino 1; inodes are assigned depth-first in name order', () => {
  const t = tree([
    { name: 'b/', type: 'dir' },
    { name: 'b/z', type: 'reg' },
    { name: 'a/', type: 'dir' },
    { name: 'a/y', type: 'reg' },
    { name: 'a/x/', type: 'dir' },
    { name: 'c', type: 'reg' },
  ]);
  assert.equal(t.root.ino, ROOT_INO);
  const ino = (p: string): number | undefined => t.resolvePath(p)?.ino;
  assert.deepEqual(
    ['a', 'a/x', 'a/y', 'b', 'b/z', 'c'].map(ino),
    [2, 3, 4, 5, 6, 7],
  );
  assert.equal(t.nodeCount, 7);
  for (let i = 1; i <= 7; i++) assert.equal(t.getNode(i)?.ino, i);
  assert.equal(t.getNode(8), undefined);
  assert.equal(t.lookup(ROOT_INO, 'a')?.ino, 2);
  assert.equal(t.lookup(2, 'y')?.ino, 4);
  assert.equal(t.lookup(4, 'anything'), undefined, 'lookup in a file');
  assert.deepEqual(names(t, '/'), ['a', 'b', 'c']);
  assert.equal(t.resolvePath('a/x')?.parentIno, 2);
  assert.equal(t.root.parentIno, ROOT_INO);
  assert.equal(t.resolvePath('a/../b'), undefined);
  assert.equal(t.resolvePath('/a/./y')?.ino, 4);
});

test('inode numbers are stable for the same TOC', () => {
  const entries = [
    { name: 'x/y/z', type: 'reg' },
    { name: 'x/a', type: 'symlink', linkName: 'y' },
    { name: 'w', type: 'fifo' },
  ];
  const a = tree(entries);
  const b = tree(entries);
  for (const p of ['x', 'x/y', 'x/y/z', 'x/a', 'w']) assert.equal(a.resolvePath(p)?.ino, b.resolvePath(p)?.ino);
});

test('modes, owners, times, devices, symlinks, xattrs', () => {
  const t = tree([
    { name: 'dir/', type: 'dir', mode: 0o41777, uid: 5, gid: 6, modtime: '2020-01-02T03:04:05Z' },
    { name: 'dir/suid', type: 'reg', mode: 0o104755, size: 3, offset: 1, chunkDigest: D },
    { name: 'dir/link', type: 'symlink', linkName: 'ünïcode', mode: 0o777 },
    { name: 'dev/tty', type: 'char', devMajor: 5, devMinor: 0, mode: 0o666 },
    { name: 'dev/big', type: 'block', devMajor: 259, devMinor: 0x12345, mode: 0o660 },
    { name: 'fifo', type: 'fifo', mode: 0o600, xattrs: { 'user.k': Buffer.from([0, 1, 255]).toString('base64') } },
  ]);
  const dir = t.resolvePath('dir');
  assert.equal(dir?.mode, 0o41777, 'sticky bit kept, type bits from the TOC type');
  assert.equal(dir?.uid, 5);
  assert.equal(dir?.gid, 6);
  assert.equal(dir?.mtimeMs, Date.parse('2020-01-02T03:04:05Z'));
  assert.equal(t.resolvePath('dir/suid')?.mode, 0o104755);
  const link = t.resolvePath('dir/link');
  assert.equal(link?.mode, 0o120777);
  assert.equal(link?.size, Buffer.byteLength('ünïcode'), 'symlink size is the target length in bytes');
  assert.equal(link?.linkName, 'ünïcode');
  assert.equal(t.resolvePath('dev/tty')?.rdev, (5 << 8) | 0);
  assert.equal(t.resolvePath('dev/tty')?.mode, 0o20666);
  assert.equal(t.resolvePath('dev/big')?.rdev, makedev(259, 0x12345));
  assert.equal(makedev(259, 0x12345), 0x12310345, 'glibc layout: minor high bits above major low bits');
  assert.equal(makedev(0x1000, 0), 2 ** 44);
  assert.equal(t.resolvePath('dev/big')?.mode, 0o60660);
  assert.equal(t.resolvePath('fifo')?.mode, 0o10600);
  assert.deepEqual(t.resolvePath('fifo')?.xattrs.get('user.k'), Buffer.from([0, 1, 255]));
});

test('implicit parent dirs are synthesised with 0755; an explicit entry later fills them in', () => {
  const t = tree([
    { name: 'a/b/c/file', type: 'reg' },
    { name: 'a/b/', type: 'dir', mode: 0o700, uid: 9 },
  ]);
  const a = t.resolvePath('a');
  assert.equal(a?.mode, 0o40755);
  assert.equal(a?.uid, 0);
  assert.equal(t.resolvePath('a/b')?.mode, 0o40700);
  assert.equal(t.resolvePath('a/b')?.uid, 9);
  assert.equal(t.resolvePath('a/b/c')?.mode, 0o40755);
  assert.equal(t.resolvePath('a/b/c/file')?.type, 'reg');
});

test('an explicit root entry sets the root attributes', () => {
  const t = tree([
    { name: './', type: 'dir', mode: 0o700, uid: 3 },
    { name: 'f', type: 'reg' },
  ]);
  assert.equal(t.root.mode, 0o40700);
  assert.equal(t.root.uid, 3);
  assert.equal(t.root.ino, 1);
});

test('dir nlink is 2 + child dirs; hardlinks share ino and count names', () => {
  const t = tree([
    { name: 'd/', type: 'dir' },
    { name: 'd/e/', type: 'dir' },
    { name: 'd/f/', type: 'dir' },
    { name: 'd/file', type: 'reg', size: 4, offset: 10, chunkDigest: D },
    { name: 'other/link1', type: 'hardlink', linkName: 'd/file' },
    { name: 'link2', type: 'hardlink', linkName: './other/link1' }, // chain: link to a link
  ]);
  assert.equal(t.root.nlink, 4, 'root: 2 + d + other');
  assert.equal(t.resolvePath('d')?.nlink, 4);
  assert.equal(t.resolvePath('d/e')?.nlink, 2);
  const file = t.resolvePath('d/file');
  assert.equal(file?.nlink, 3);
  assert.equal(t.resolvePath('other/link1'), file);
  assert.equal(t.resolvePath('link2'), file);
  assert.equal(t.resolvePath('link2')?.ino, file?.ino);
  assert.equal(file?.chunks.length, 1);
  // Each node is numbered once.
  const inos = new Set<number>();
  for (let i = 1; i <= t.nodeCount; i++) inos.add(t.getNode(i)?.ino ?? -1);
  assert.equal(inos.size, t.nodeCount);
});

test('whiteouts become 0/0 char devices; opaque dirs get the overlay xattr', () => {
  const t = tree([
    { name: 'etc/', type: 'dir' },
    { name: 'etc/.wh.passwd', type: 'reg' },
    { name: 'etc/.wh.shadow', type: 'reg' },
    { name: 'etc/shadow', type: 'reg', mode: 0o600 }, // a real entry wins over its whiteout
    { name: 'opq/', type: 'dir' },
    { name: 'opq/.wh..wh..opq', type: 'reg' },
    { name: 'opq/keep', type: 'reg' },
    { name: '.wh..wh.plnk', type: 'dir' },
  ]);
  assert.deepEqual(names(t, 'etc'), ['passwd', 'shadow']);
  const wh = t.resolvePath('etc/passwd');
  assert.equal(wh?.type, 'whiteout');
  assert.equal(wh?.mode, 0o20000);
  assert.equal(wh?.rdev, 0);
  assert.equal(wh?.uid, 0);
  assert.equal(wh?.gid, 0);
  assert.equal(wh?.size, 0);
  assert.equal(wh?.nlink, 1);
  assert.equal(t.resolvePath('etc/shadow')?.type, 'reg');
  assert.deepEqual(names(t, 'opq'), ['keep']);
  assert.deepEqual(t.resolvePath('opq')?.xattrs.get(OPAQUE_XATTR), Buffer.from('y'));
  assert.equal(t.resolvePath('etc')?.xattrs.has(OPAQUE_XATTR), false);
  assert.deepEqual(names(t, '/'), ['etc', 'opq'], 'overlay metadata names are hidden');
});

test('for overlayfs with userxattr (a user namespace) opaque dirs carry user.overlay.opaque instead', () => {
  const entries = [{ name: 'opq/', type: 'dir' }, { name: 'opq/.wh..wh..opq', type: 'reg' }];
  const t = buildLayerTree(parseToc(JSON.stringify({ version: 1, entries })), { blobSize: 10_000, opaqueXattr: USER_OPAQUE_XATTR });
  assert.deepEqual(t.resolvePath('opq')?.xattrs.get(USER_OPAQUE_XATTR), Buffer.from('y'));
  assert.equal(t.resolvePath('opq')?.xattrs.has(OPAQUE_XATTR), false, 'only the one overlayfs reads: the other would show in containers');
});

test('landmarks are hidden; the tree reports prefetch information', () => {
  const withLandmark = tree([
    { name: 'important', type: 'reg', size: 5, offset: 100, chunkDigest: D },
    { name: '.prefetch.landmark', type: 'reg', size: 1, offset: 200, chunkDigest: D },
    { name: 'rest', type: 'reg', size: 5, offset: 300, chunkDigest: D },
    { name: 'sub/.prefetch.landmark', type: 'reg' }, // only the root one is special
  ]);
  assert.equal(withLandmark.prefetchLandmarkOffset, 200);
  assert.equal(withLandmark.noPrefetch, false);
  assert.deepEqual(names(withLandmark, '/'), ['important', 'rest', 'sub']);
  assert.deepEqual(names(withLandmark, 'sub'), ['.prefetch.landmark']);
  assert.equal(withLandmark.resolvePath('important')?.chunks[0]?.compressedEnd, 200, "a hidden landmark's member still ends the one before it");
  const chunkedLandmark = tree([
    { name: 'a', type: 'reg', size: 5, offset: 100, chunkDigest: D },
    { name: '.prefetch.landmark', type: 'reg', size: 10, offset: 100, chunkSize: 5, chunkDigest: D },
    { name: '.prefetch.landmark', type: 'chunk', offset: 150, chunkOffset: 5, chunkSize: 5, chunkDigest: D },
    { name: 'rest', type: 'reg', size: 5, offset: 300, chunkDigest: D },
  ]);
  assert.equal(chunkedLandmark.resolvePath('a')?.chunks[0]?.compressedEnd, 150, "a landmark's later chunks are members too");

  const none = tree([
    { name: '.no.prefetch.landmark', type: 'reg', size: 1, offset: 10, chunkDigest: D },
    { name: 'a', type: 'reg' },
  ]);
  assert.equal(none.noPrefetch, true);
  assert.equal(none.prefetchLandmarkOffset, undefined);
  assert.deepEqual(names(none, '/'), ['a']);

  const neither = tree([{ name: 'a', type: 'reg' }]);
  assert.equal(neither.noPrefetch, false);
  assert.equal(neither.prefetchLandmarkOffset, undefined);
});

test('chunks carry member bounds: next distinct offset, or the TOC offset for the last', () => {
  const t = tree(
    [
      { name: 'a', type: 'reg', size: 10, offset: 100, chunkSize: 4, chunkDigest: D },
      { name: 'a', type: 'chunk', offset: 150, chunkOffset: 4, chunkSize: 4, chunkDigest: D },
      { name: 'a', type: 'chunk', offset: 200, chunkOffset: 8, chunkDigest: D },
      { name: 'dir/', type: 'dir' },
      { name: 'small1', type: 'reg', size: 3, offset: 300, chunkDigest: D },
      { name: 'small2', type: 'reg', size: 3, offset: 300, innerOffset: 1024, chunkDigest: D },
      { name: 'last', type: 'reg', size: 7, offset: 400 },
    ],
    10_000,
    500,
  );
  const a = t.resolvePath('a');
  assert.deepEqual(
    a?.chunks.map((c) => [c.fileOffset, c.size, c.compressedOffset, c.compressedEnd, c.innerOffset]),
    [
      [0, 4, 100, 150, 0],
      [4, 4, 150, 200, 0],
      [8, 2, 200, 300, 0],
    ],
  );
  assert.equal(a?.chunks[0].digest, D);
  assert.deepEqual(t.resolvePath('small1')?.chunks[0].compressedEnd, 400, 'shared member ends at the next distinct offset');
  assert.deepEqual(t.resolvePath('small2')?.chunks[0].innerOffset, 1024);
  assert.deepEqual(t.resolvePath('small2')?.chunks[0].compressedEnd, 400);
  assert.deepEqual(t.resolvePath('last')?.chunks[0].compressedEnd, 500, 'the last member ends at the TOC');
  assert.equal(t.resolvePath('last')?.chunks[0].digest, undefined);
  assert.equal(tree([{ name: 'x', type: 'reg', size: 1, offset: 5 }], 777).resolvePath('x')?.chunks[0].compressedEnd, 777);
  assert.deepEqual(
    t.chunksInBlobOrder().map((c) => c.compressedOffset),
    [100, 150, 200, 300, 300, 400],
  );
});

test('contradicting entries are rejected', () => {
  assert.throws(
    () =>
      tree([
        { name: 'f', type: 'reg' },
        { name: 'f/child', type: 'reg' },
      ]),
    (err: unknown) => err instanceof EstargzFormatError && /not a directory/.test(err.message),
  );
  assert.throws(
    () =>
      tree([
        { name: 'a/b', type: 'reg' },
        { name: 'a', type: 'reg' },
      ]),
    EstargzFormatError,
  );
});

test('an empty TOC is an empty root', () => {
  const t = tree([]);
  assert.equal(t.nodeCount, 1);
  assert.equal(t.root.type, 'dir');
  assert.equal(t.root.mode, 0o40755);
  assert.equal(t.root.nlink, 2);
});

test('file and chunk digests: a file of one chunk with the same digest twice keeps both values', () => {
  const E = 'sha256:' + 'e'.repeat(64);
  const t = tree([
    { name: 'one', type: 'reg', size: 3, offset: 10, digest: D, chunkDigest: D },
    { name: 'other', type: 'reg', size: 3, offset: 20, digest: D, chunkDigest: E },
    { name: 'big', type: 'reg', size: 8, offset: 30, digest: E, chunkSize: 4, chunkDigest: D },
    { name: 'big', type: 'chunk', offset: 40, chunkOffset: 4, chunkDigest: E },
    { name: 'bare', type: 'reg', size: 3, offset: 50 },
  ]);
  const digests = (p: string): unknown[] => {
    const n = t.resolvePath(p);
    return [n?.digest, ...(n?.chunks.map((c) => c.digest) ?? [])];
  };
  assert.deepEqual(digests('one'), [D, D]);
  assert.deepEqual(digests('other'), [D, E]);
  assert.deepEqual(digests('big'), [E, D, E]);
  assert.deepEqual(digests('bare'), [undefined, undefined]);
});
