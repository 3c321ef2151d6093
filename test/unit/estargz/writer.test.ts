import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { gunzipSync, gzipSync } from 'node:zlib';

import tarStream from 'tar-stream';

import { encodeFooter } from '../../../src/estargz/footer';
import { TAR_EOF_BYTES, TYPEFLAG, encodeTarHeader, tarPaddingBytes } from '../../../src/estargz/tar-header';
import { readToc } from '../../../src/estargz/toc';
import { buildLayerTree, type LayerNode } from '../../../src/metadata/layer-tree';
import { LayerReader } from '../../../src/reader/chunk-reader';
import { BufferBlobSource } from '../../../src/remote/blob-source';
import { makeTar, sha256, toEstargz, type TarEntrySpec } from './fixture';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';
import { defaultConfig } from '../../../src/config/config';

/** The process's one scheduler, as the composition root makes it. */
const scheduler = new Scheduler(schedulerLimits(defaultConfig()));

const CHUNK = 4096;
const BIG = randomBytes(10_000); // three chunks of 4 KiB
const MTIME = new Date('2021-05-06T07:08:09Z');
const LONG_PATH = `deep/${'x'.repeat(120)}/file`; // fits ustar only with a prefix split
const VERY_LONG_NAME = `long/${'y'.repeat(200)}`; // a 200-byte component: needs PAX
const UNICODE = 'données/日本語.txt';

const ENTRIES: TarEntrySpec[] = [
  { name: 'etc/', type: 'directory', mode: 0o755, uid: 1000, gid: 1001, uname: 'user', gname: 'group', mtime: MTIME },
  { name: 'etc/hosts', content: '127.0.0.1 localhost\n', mode: 0o644, mtime: MTIME, pax: { 'SCHILY.xattr.user.comment': 'hi there' } },
  { name: 'etc/hosts.hard', type: 'link', linkname: 'etc/hosts', mtime: MTIME },
  { name: 'usr/bin/big', content: BIG, mode: 0o4755, mtime: MTIME },
  { name: 'empty', content: '', mtime: MTIME },
  { name: 'link', type: 'symlink', linkname: 'etc/hosts', mtime: MTIME },
  { name: 'dev/null', type: 'character-device', devmajor: 1, devminor: 3, mode: 0o666, mtime: MTIME },
  { name: 'dev/sda', type: 'block-device', devmajor: 8, devminor: 0, mode: 0o660, mtime: MTIME },
  { name: 'run/fifo', type: 'fifo', mode: 0o600, mtime: MTIME },
  { name: LONG_PATH, content: 'long', mtime: MTIME },
  { name: VERY_LONG_NAME, content: 'very long', mtime: MTIME },
  { name: UNICODE, content: 'unicode', mtime: MTIME },
];

interface ExtractedEntry {
  name: string;
  type: string;
  size: number;
  data: Buffer;
  linkname: string | null;
  header: tarStream.Header;
}

/** Lists a tar with tar-stream. */
async function untar(tar: Buffer): Promise<ExtractedEntry[]> {
  const extract = tarStream.extract();
  const out: ExtractedEntry[] = [];
  const done = (async (): Promise<void> => {
    for await (const entry of extract) {
      const parts: Buffer[] = [];
      for await (const chunk of entry as AsyncIterable<Uint8Array>) parts.push(Buffer.from(chunk));
      const h = entry.header;
      out.push({ name: h.name, type: h.type, size: h.size, data: Buffer.concat(parts), linkname: h.linkname, header: h });
    }
  })();
  extract.end(tar);
  await done;
  return out;
}

async function roundTrip(opts: { prioritizedFiles?: string[] } = {}) {
  const tar = await makeTar(ENTRIES);
  const { blob, result } = await toEstargz(tar, { chunkSizeBytes: CHUNK, ...opts });
  const source = new BufferBlobSource(result.blobDigest, blob);
  const { toc, tocOffset, tocJson } = await readToc(source);
  const tree = buildLayerTree(toc, { blobSize: blob.length, tocOffset });
  const reader = new LayerReader(source, tree, { scheduler });
  return { tar, blob, result, toc, tocJson, tree, reader };
}

function node(tree: ReturnType<typeof buildLayerTree>, path: string): LayerNode {
  const n = tree.resolvePath(path);
  assert.ok(n, `${path} exists`);
  return n;
}

test('round trip: every entry type reads back through readToc + LayerTree + LayerReader', async () => {
  const { tree, reader, toc } = await roundTrip();
  for (const spec of ENTRIES) {
    if (spec.content === undefined) continue;
    const want = typeof spec.content === 'string' ? Buffer.from(spec.content) : spec.content;
    const n = node(tree, spec.name);
    assert.equal(n.size, want.length, spec.name);
    assert.deepEqual(await reader.read(n, 0, n.size + 100), want, spec.name);
  }
  const big = node(tree, 'usr/bin/big');
  assert.equal(big.chunks.length, 3);
  assert.deepEqual(await reader.read(big, 4000, 4300), BIG.subarray(4000, 8300), 'read across two chunk boundaries');
  assert.deepEqual(await reader.read(big, 9999, 10), BIG.subarray(9999));
  assert.equal(big.mode, 0o104755, 'setuid kept, type from the TOC');

  const hosts = node(tree, 'etc/hosts');
  assert.equal(node(tree, 'etc/hosts.hard'), hosts, 'hardlink shares the node');
  assert.equal(hosts.nlink, 2);
  assert.deepEqual(hosts.xattrs.get('user.comment'), Buffer.from('hi there'));
  assert.equal(hosts.mtimeMs, MTIME.getTime());

  const etc = node(tree, 'etc');
  assert.equal(etc.uid, 1000);
  assert.equal(etc.gid, 1001);
  assert.equal(etc.mode, 0o40755);
  const link = node(tree, 'link');
  assert.equal(link.linkName, 'etc/hosts');
  assert.equal(link.size, 'etc/hosts'.length);
  assert.equal(node(tree, 'dev/null').rdev, (1 << 8) | 3);
  assert.equal(node(tree, 'dev/null').mode, 0o20666);
  assert.equal(node(tree, 'dev/sda').rdev, 8 << 8);
  assert.equal(node(tree, 'dev/sda').mode, 0o60660);
  assert.equal(node(tree, 'run/fifo').mode, 0o10600);
  assert.equal(node(tree, 'empty').size, 0);
  assert.equal(node(tree, 'usr').mode, 0o40755, 'implicit parent dir');
  assert.equal(tree.noPrefetch, true);
  assert.equal(tree.root.children?.has('.no.prefetch.landmark'), false);

  const etcEntry = toc.entries.find((e) => e.name === 'etc');
  assert.equal(etcEntry?.userName, 'user');
  assert.equal(etcEntry?.groupName, 'group');
  assert.equal(etcEntry?.modtime, '2021-05-06T07:08:09Z');
});

test('the blob is a plain gzip tar with the same entries, landmark first and TOC last', async () => {
  const { blob, result, tocJson } = await roundTrip();
  assert.equal(result.blobSize, blob.length);
  assert.equal(result.blobDigest, sha256(blob));
  const plain = gunzipSync(blob);
  assert.equal(result.diffId, sha256(plain));
  assert.equal(result.uncompressedSize, plain.length);
  assert.deepEqual(plain.subarray(plain.length - TAR_EOF_BYTES), Buffer.alloc(TAR_EOF_BYTES), 'ends with tar EOF blocks');

  const entries = await untar(plain);
  assert.equal(entries[0].name, '.no.prefetch.landmark');
  assert.deepEqual(entries[0].data, Buffer.from([0x0f]));
  const last = entries[entries.length - 1];
  assert.equal(last.name, 'stargz.index.json');
  assert.deepEqual(last.data, tocJson);
  assert.equal(result.tocDigest, sha256(tocJson));

  const middle = entries.slice(1, -1);
  assert.deepEqual(
    middle.map((e) => e.name),
    ENTRIES.map((e) => e.name),
  );
  for (const [i, spec] of ENTRIES.entries()) {
    const got = middle[i];
    if (spec.content !== undefined) assert.deepEqual(got.data, Buffer.from(spec.content), spec.name);
    if (spec.linkname !== undefined) assert.equal(got.linkname, spec.linkname);
    assert.equal(got.header.mtime.getTime(), MTIME.getTime());
  }
  assert.equal(middle[0].header.uname, 'user');
  assert.equal(middle[6].header.devmajor, 1);
  assert.equal(middle[6].header.devminor, 3);
  assert.deepEqual((middle[1].header.pax as Record<string, string>)['SCHILY.xattr.user.comment'], 'hi there');
});

test('footer bytes and gzip member boundaries follow the spec', async () => {
  const { blob, result, toc } = await roundTrip();
  const footer = blob.subarray(blob.length - 51);
  assert.deepEqual(footer, encodeFooter(result.tocOffset));
  assert.equal(footer.subarray(16, 32).toString('latin1'), result.tocOffset.toString(16).padStart(16, '0'));
  assert.equal(footer.subarray(32, 38).toString('latin1'), 'STARGZ');

  // The TOC member starts at tocOffset and holds the TOC tar header first.
  const tocMember = gunzipSync(blob.subarray(result.tocOffset, blob.length - 51));
  assert.equal(tocMember.subarray(0, 17).toString('latin1'), 'stargz.index.json');

  // Every payload starts a member: inflating from its offset yields the chunk bytes first.
  const payloads = toc.entries.filter((e) => e.offset !== undefined);
  assert.ok(payloads.length >= 8);
  for (const e of payloads) {
    const off = e.offset as number;
    assert.deepEqual([...blob.subarray(off, off + 3)], [0x1f, 0x8b, 0x08], `${e.name} member header`);
    const data = gunzipSync(blob.subarray(off, result.tocOffset));
    const size = e.chunkSize ?? (e.type === 'reg' ? (e.size ?? 0) : 10_000 - (e.chunkOffset ?? 0));
    assert.equal(sha256(data.subarray(0, size)), e.chunkDigest, `${e.name}@${e.chunkOffset ?? 0}`);
  }

  // Chunk layout: reg entry with chunkSize, chunk entries, the last without chunkSize.
  const big = toc.entries.filter((e) => e.name === 'usr/bin/big');
  assert.deepEqual(
    big.map((e) => [e.type, e.chunkOffset, e.chunkSize]),
    [
      ['reg', undefined, CHUNK],
      ['chunk', CHUNK, CHUNK],
      ['chunk', 2 * CHUNK, undefined],
    ],
  );
  assert.equal(big[0].digest, sha256(BIG));
  assert.equal(big[0].size, BIG.length);
});

test('TOC JSON is tab-indented like the reference and omits empty fields', async () => {
  const { tocJson } = await roundTrip();
  const text = tocJson.toString('utf8');
  assert.match(text, /^\{\n\t"version": 1,\n\t"entries": \[\n\t\t\{\n\t\t\t"name": "\.no\.prefetch\.landmark",/);
  assert.ok(!text.endsWith('\n'));
  assert.doesNotMatch(text, /"uid": 0|"offset": 0|"linkName": ""/);
  const { entries } = JSON.parse(text) as { entries: object[] };
  assert.deepEqual(Object.keys(entries[0] ?? {}), ['name', 'type', 'size', 'offset', 'digest', 'chunkDigest']);
});

test('prioritized files come first, then .prefetch.landmark; prefetch covers them', async () => {
  const { toc, tree, result } = await roundTrip({ prioritizedFiles: ['/usr/bin/big', 'etc/hosts.hard', 'nope'] });
  const names = toc.entries.filter((e) => e.type !== 'chunk').map((e) => e.name);
  // big's parents are implicit (no entries); hosts.hard pulls its parent and its target first.
  assert.deepEqual(names.slice(0, 5), ['usr/bin/big', 'etc', 'etc/hosts', 'etc/hosts.hard', '.prefetch.landmark']);
  assert.deepEqual(result.missedPrioritizedFiles, ['nope']);
  assert.equal(tree.noPrefetch, false);
  const landmarkOffset = tree.prefetchLandmarkOffset;
  assert.ok(landmarkOffset !== undefined);
  for (const c of node(tree, 'usr/bin/big').chunks) assert.ok(c.compressedEnd <= landmarkOffset);
  assert.equal(tree.root.children?.has('.prefetch.landmark'), false);
});

test('duplicate input entries keep the last one; old landmarks and TOC are dropped', async () => {
  const tar = await makeTar([
    { name: 'a', content: 'first' },
    { name: 'b', content: 'b' },
    { name: './a', content: 'second' },
  ]);
  const { blob } = await toEstargz(tar);
  const { toc } = await readToc(new BufferBlobSource('x', blob));
  assert.deepEqual(
    toc.entries.map((e) => e.name),
    ['.no.prefetch.landmark', 'b', 'a'],
  );
  // Converting an eStargz blob again (gzip input) yields one landmark and one TOC.
  const { blob: again, result } = await toEstargz(blob);
  const entries = await untar(gunzipSync(again));
  assert.deepEqual(
    entries.map((e) => e.name),
    ['.no.prefetch.landmark', 'b', './a', 'stargz.index.json'],
  );
  assert.equal(entries[2].data.toString(), 'second');
  assert.equal(result.blobSize, again.length);
});

test('gzip-compressed input tars are accepted', async () => {
  const tar = await makeTar([{ name: 'x', content: 'zipped' }]);
  const { blob } = await toEstargz(gzipSync(tar));
  const { toc } = await readToc(new BufferBlobSource('x', blob));
  assert.equal(toc.entries[1].name, 'x');
  assert.equal(toc.entries[1].digest, sha256('zipped'));
});

test('binary xattr values, big ids and non-ASCII owner names survive (PAX records)', async () => {
  const capability = Buffer.from([0x01, 0x00, 0x00, 0x02, 0x80, 0xff, 0xc3, 0x28, 0, 0]);
  const data = Buffer.from('#!/bin/ping\n');
  const header = encodeTarHeader({
    name: 'bin/ping',
    typeflag: TYPEFLAG.reg,
    mode: 0o755,
    uid: 3_000_000, // more than the 7 octal digits ustar holds
    gid: 3_000_001,
    size: data.length,
    mtimeSec: 1_600_000_000,
    linkname: '',
    uname: 'ünïcode-user',
    gname: 'root',
    devmajor: 0,
    devminor: 0,
    xattrs: new Map([['security.capability', capability]]),
  });
  const tar = Buffer.concat([header, data, Buffer.alloc(tarPaddingBytes(data.length) + TAR_EOF_BYTES)]);
  const { blob } = await toEstargz(tar);
  const { toc, tocOffset } = await readToc(new BufferBlobSource('x', blob));
  const tree = buildLayerTree(toc, { blobSize: blob.length, tocOffset });
  const ping = node(tree, 'bin/ping');
  assert.deepEqual(ping.xattrs.get('security.capability'), capability);
  assert.equal(ping.uid, 3_000_000);
  assert.equal(ping.gid, 3_000_001);
  assert.equal(toc.entries[1].userName, 'ünïcode-user');
  assert.equal(toc.entries[1].modtime, '2020-09-13T12:26:40Z');
});

test('unsafe input names are refused', async () => {
  const tar = await makeTar([{ name: '../escape', content: 'x' }]);
  await assert.rejects(toEstargz(tar), /unsafe tar entry name/);
});

test('chunk size equal to the file size records chunkSize, like the reference', async () => {
  const tar = await makeTar([{ name: 'f', content: Buffer.alloc(CHUNK, 7) }]);
  const { blob } = await toEstargz(tar, { chunkSizeBytes: CHUNK });
  const { toc } = await readToc(new BufferBlobSource('x', blob));
  const f = toc.entries.filter((e) => e.name === 'f');
  assert.equal(f.length, 1);
  assert.equal(f[0].chunkSize, CHUNK);
});

test('an empty tar still gets a landmark and a TOC', async () => {
  const { blob } = await toEstargz(Buffer.alloc(TAR_EOF_BYTES));
  const { toc } = await readToc(new BufferBlobSource('x', blob));
  assert.deepEqual(
    toc.entries.map((e) => e.name),
    ['.no.prefetch.landmark'],
  );
});
