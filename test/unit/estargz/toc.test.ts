import assert from 'node:assert/strict';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';

import { EstargzFormatError } from '../../../src/errors';
import { encodeFooter } from '../../../src/estargz/footer';
import { parseToc, readToc, type TocEntry } from '../../../src/estargz/toc';
import { BufferBlobSource } from '../../../src/remote/blob-source';
import { blobWithToc, makeTar, sha256, toEstargz } from './fixture';

const D1 = sha256('one');
const D2 = sha256('two');

function tocJson(entries: unknown[], version: unknown = 1): string {
  return JSON.stringify({ version, entries });
}

function rejects(entries: unknown[], pattern: RegExp, opts = {}): void {
  assert.throws(
    () => parseToc(tocJson(entries), opts),
    (err: unknown) => err instanceof EstargzFormatError && pattern.test(err.message),
    `expected ${pattern}`,
  );
}

test('parseToc normalises names and keeps fields', () => {
  const toc = parseToc(
    tocJson([
      { name: './', type: 'dir', mode: 493 },
      { name: './etc/', type: 'dir', mode: 16877, uid: 1, gid: 2, userName: 'u', groupName: 'g', modtime: '2020-01-02T03:04:05Z' },
      { name: '/etc//passwd', type: 'reg', size: 3, offset: 10, digest: D1, chunkDigest: D1, xattrs: { 'user.a': 'YQ==' } },
      { name: 'etc/link', type: 'hardlink', linkName: './etc/passwd' },
      { name: 'dev/null', type: 'char', devMajor: 1, devMinor: 3 },
    ]),
  );
  assert.deepEqual(
    toc.entries.map((e) => e.name),
    ['', 'etc', 'etc/passwd', 'etc/link', 'dev/null'],
  );
  const passwd = toc.entries[2];
  assert.equal(passwd.size, 3);
  assert.equal(passwd.offset, 10);
  assert.deepEqual(passwd.xattrs, { 'user.a': 'YQ==' });
  assert.equal(toc.entries[3].linkName, 'etc/passwd', 'hardlink targets are cleaned too');
  assert.equal(toc.entries[1].uid, 1);
  assert.equal(toc.entries[4].devMinor, 3);
});

test('parseToc accepts chunked files that tile the file exactly', () => {
  const toc = parseToc(
    tocJson([
      { name: 'big', type: 'reg', size: 10, offset: 1, chunkSize: 4, chunkDigest: D1 },
      { name: './big', type: 'chunk', offset: 2, chunkOffset: 4, chunkSize: 4, chunkDigest: D2 },
      { name: 'big', type: 'chunk', offset: 3, chunkOffset: 8, chunkDigest: D2 },
      { name: 'empty', type: 'reg' },
    ]),
  );
  assert.equal(toc.entries.length, 4);
  assert.equal(toc.entries[1].name, 'big');
});

test('parseToc rejects bad JSON and bad top-level shapes', () => {
  assert.throws(() => parseToc('{"version": 1, "entries": ['), /not valid JSON/);
  assert.throws(() => parseToc('[]'), /not an object/);
  assert.throws(() => parseToc(tocJson([], 2)), /unsupported TOC version/);
  assert.throws(() => parseToc('{"version": 1}'), /entries/);
  assert.throws(() => parseToc(tocJson([1])), /not an object/);
});

test('parseToc rejects hostile names', () => {
  rejects([{ name: '../etc/passwd', type: 'reg' }], /unsafe name/);
  rejects([{ name: 'a/../../b', type: 'reg' }], /unsafe name/);
  rejects([{ name: '/../escape', type: 'dir' }], /unsafe name/);
  rejects([{ name: 'a/..', type: 'dir' }], /unsafe name/);
  rejects([{ name: 'nul\u0000byte', type: 'reg' }], /unsafe name/);
  rejects([{ name: '', type: 'reg' }], /empty name/);
  rejects([{ name: '/', type: 'symlink', linkName: 'x' }], /empty name/);
  rejects([{ type: 'reg' }], /no string "name"/);
  // Absolute names are anchored at the layer root, not at the host root.
  assert.equal(parseToc(tocJson([{ name: '/etc/shadow', type: 'reg' }])).entries[0].name, 'etc/shadow');
});

test('parseToc rejects bad types, numbers and strings', () => {
  rejects([{ name: 'a', type: 'socket' }], /unknown type/);
  rejects([{ name: 'a', type: 'reg', size: -1 }], /"size" is not a non-negative integer/);
  rejects([{ name: 'a', type: 'reg', size: 1.5 }], /"size"/);
  rejects([{ name: 'a', type: 'reg', size: 2 ** 60 }], /"size"/);
  rejects([{ name: 'a', type: 'reg', size: '3' }], /"size"/);
  rejects([{ name: 'a', type: 'reg', uid: null }], /"uid"/);
  rejects([{ name: 'a', type: 'dir', mode: -493 }], /"mode"/);
  rejects([{ name: 'a', type: 'reg', modtime: 5 }], /"modtime" is not a string/);
  rejects([{ name: 'a', type: 'reg', modtime: 'yesterday' }], /bad modtime/);
  rejects([{ name: 'a', type: 'reg', digest: 'md5:abc' }], /"digest" is not a sha256 digest/);
  rejects([{ name: 'a', type: 'reg', xattrs: { 'user.x': 'not base64!' } }], /bad xattr/);
  rejects([{ name: 'a', type: 'reg', xattrs: [] }], /"xattrs" is not an object/);
  rejects([{ name: 'a', type: 'symlink' }], /has no linkName/);
  rejects([{ name: 'a', type: 'symlink', linkName: 'x\u0000' }], /NUL/);
});

test('parseToc rejects duplicates and misplaced chunks', () => {
  rejects(
    [
      { name: 'a', type: 'reg' },
      { name: './a', type: 'reg' },
    ],
    /duplicate entry/,
  );
  rejects(
    [
      { name: './', type: 'dir' },
      { name: '/', type: 'dir' },
    ],
    /duplicate entry/,
  );
  rejects(
    [
      { name: 'a', type: 'reg', size: 2, offset: 1, chunkSize: 1 },
      { name: 'b', type: 'chunk', offset: 2, chunkOffset: 1 },
    ],
    /chunk does not follow a regular file of the same name/,
  );
  rejects([{ name: 'a', type: 'chunk', offset: 1 }], /chunk does not follow/);
  rejects(
    [
      { name: 'a', type: 'dir' },
      { name: 'a', type: 'chunk', offset: 1 },
    ],
    /chunk does not follow/,
  );
  rejects(
    [
      { name: 'a', type: 'reg', size: 4, offset: 1, chunkSize: 2 },
      { name: 'a', type: 'chunk', offset: 2, chunkOffset: 3 },
    ],
    /chunk at 3, want 2/,
  );
  rejects([{ name: 'a', type: 'reg', size: 4, offset: 1, chunkSize: 2 }], /cover 2 of its 4 bytes/);
  rejects(
    [
      { name: 'a', type: 'reg', size: 2, offset: 1 },
      { name: 'a', type: 'chunk', offset: 2, chunkOffset: 2 },
    ],
    /outside a 2-byte file/,
  );
});

test('parseToc checks offsets against the blob and their order', () => {
  rejects([{ name: 'a', type: 'reg', size: 2 }], /payload has no offset/);
  rejects([{ name: 'a', type: 'reg', size: 2, offset: 100 }], /past the data/, { tocOffset: 100 });
  rejects([{ name: 'a', type: 'reg', size: 2, offset: 500 }], /past the data/, { blobSize: 200 });
  rejects(
    [
      { name: 'a', type: 'reg', size: 2, offset: 50 },
      { name: 'b', type: 'reg', size: 2, offset: 10 },
    ],
    /goes back/,
  );
});

test('parseToc checks hardlink targets', () => {
  rejects([{ name: 'a', type: 'hardlink', linkName: 'missing' }], /points at missing/);
  rejects(
    [
      { name: 'd', type: 'dir' },
      { name: 'a', type: 'hardlink', linkName: 'd' },
    ],
    /points at directory/,
  );
  rejects([{ name: 'a', type: 'hardlink', linkName: '../../etc/passwd' }], /unsafe hardlink target/);
  // A target listed after the link is fine.
  parseToc(
    tocJson([
      { name: 'a', type: 'hardlink', linkName: 'b' },
      { name: 'b', type: 'reg' },
    ]),
  );
});

test('parseToc enforces the JSON size limit', () => {
  const json = tocJson([{ name: 'a', type: 'reg' }]);
  assert.throws(() => parseToc(json, { maxTocBytes: 10 }), /more than the limit of 10/);
  assert.equal(parseToc(json, { maxTocBytes: json.length }).entries.length, 1);
});

test('parseToc enforces the entry limit', () => {
  const entries = Array.from({ length: 5 }, (_, i) => ({ name: `f${i}`, type: 'reg' }));
  rejects(entries, /more than the limit of 4/, { maxEntries: 4 });
  assert.equal(parseToc(tocJson(entries), { maxEntries: 5 }).entries.length, 5);
});

test('readToc reads what the writer wrote and digests the exact JSON bytes', async () => {
  const tar = await makeTar([
    { name: 'a.txt', content: 'hello' },
    { name: 'dir/', type: 'directory' },
  ]);
  const { blob, result } = await toEstargz(tar);
  const r = await readToc(new BufferBlobSource(result.blobDigest, blob));
  assert.equal(r.tocDigest, result.tocDigest);
  assert.equal(r.tocDigest, sha256(r.tocJson));
  assert.equal(r.tocOffset, result.tocOffset);
  assert.equal(r.footerSize, 51);
  const names = r.toc.entries.map((e: TocEntry) => e.name);
  assert.deepEqual(names, ['.no.prefetch.landmark', 'a.txt', 'dir']);
});

test('readToc accepts a legacy 47-byte footer', async () => {
  const json = tocJson([{ name: 'a', type: 'dir' }]);
  const esgz = blobWithToc(json);
  const tocOffset = 0;
  const legacy = Buffer.concat([
    Buffer.from([0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0]),
    Buffer.from(tocOffset.toString(16).padStart(16, '0') + 'STARGZ', 'latin1'),
    Buffer.from([0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]),
  ]);
  const blob = Buffer.concat([esgz.subarray(0, esgz.length - 51), legacy]);
  const r = await readToc(new BufferBlobSource('sha256:x', blob));
  assert.equal(r.footerSize, 47);
  assert.equal(r.toc.entries[0].name, 'a');
});

test('readToc rejects a plain gzip layer clearly', async () => {
  const tar = await makeTar([{ name: 'a.txt', content: 'hello' }]);
  const blob = gzipSync(tar);
  await assert.rejects(readToc(new BufferBlobSource('sha256:x', blob)), /not an eStargz layer/);
});

test('readToc rejects tiny, truncated and corrupted blobs', async () => {
  const { blob } = await toEstargz(await makeTar([{ name: 'a.txt', content: 'hello' }]));
  const src = (b: Buffer): BufferBlobSource => new BufferBlobSource('sha256:x', b);
  await assert.rejects(readToc(src(Buffer.alloc(10))), /smaller than any stargz footer/);
  await assert.rejects(readToc(src(blob.subarray(0, blob.length - 20))), EstargzFormatError, 'footer cut off');
  await assert.rejects(readToc(src(blob.subarray(20))), EstargzFormatError, 'start cut off: offsets are wrong');
  const corrupt = Buffer.from(blob);
  corrupt[corrupt.length - 60] ^= 0xff; // inside the TOC member
  await assert.rejects(readToc(src(corrupt)), EstargzFormatError);
  // A footer pointing past the end of the blob.
  const pastEnd = Buffer.concat([blob.subarray(0, blob.length - 51), encodeFooter(blob.length)]);
  await assert.rejects(readToc(src(pastEnd)), /past the/);
});

test('readToc rejects bad JSON and a wrong tar entry name', async () => {
  await assert.rejects(readToc(new BufferBlobSource('x', blobWithToc('{"version":1,'))), /not valid JSON/);
  const json = Buffer.from(tocJson([]));
  const good = blobWithToc(json);
  assert.equal((await readToc(new BufferBlobSource('x', good))).toc.entries.length, 0);
  // Same blob with the TOC entry renamed.
  const { gunzipSync } = await import('node:zlib');
  const tocEnd = good.length - 51;
  const tar = gunzipSync(good.subarray(0, tocEnd));
  tar.write('evil.index.json\0\0', 0, 'latin1');
  // Fix the header checksum so only the name is wrong.
  tar.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += tar[i];
  tar.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
  const renamed = Buffer.concat([gzipSync(tar), encodeFooter(0)]);
  await assert.rejects(readToc(new BufferBlobSource('x', renamed)), /named "evil.index.json"/);
});

test('readToc enforces the TOC size limit, compressed and decompressed', async () => {
  // Highly compressible JSON: small compressed, big decompressed.
  const entries = Array.from({ length: 2000 }, (_, i) => ({ name: `file-${i}`, type: 'reg', userName: 'x'.repeat(100) }));
  const blob = blobWithToc(tocJson(entries));
  const src = new BufferBlobSource('x', blob);
  assert.equal((await readToc(src)).toc.entries.length, 2000);
  await assert.rejects(readToc(src, { maxTocBytes: 50_000 }), /larger than the limit|more than the limit/);
  await assert.rejects(readToc(src, { maxTocBytes: 1000 }), /compressed TOC is \d+ bytes, more than the limit/);
  await assert.rejects(readToc(src, { maxEntries: 100 }), /more than the limit of 100/);
});
