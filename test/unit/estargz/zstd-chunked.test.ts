import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { compress } from '@bokuweb/zstd-wasm';

import { EstargzFormatError } from '../../../src/errors';
import { readToc } from '../../../src/estargz/toc';
import { parseZstdChunkedFooter } from '../../../src/estargz/zstd-chunked-footer';
import { encodeZstdChunkedFooter, transcodeToZstdChunked, type ZstdChunkedResult } from '../../../src/image/zstd-chunked';
import { backgroundFetch } from '../../../src/layer/background-fetch';
import { buildLayerTree, type LayerNode } from '../../../src/metadata/layer-tree';
import { LayerReader } from '../../../src/reader/chunk-reader';
import { scanZstdFrame, ZstdDiffHasher, zstdDecompressAll, zstdRange, zstdReady } from '../../../src/estargz/zstd-range';
import { BufferBlobSource } from '../../../src/remote/blob-source';
import { makeTar, sha256, toEstargz } from './fixture';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';
import { defaultConfig } from '../../../src/config/config';

/** The process's one scheduler, as the composition root makes it. */
const scheduler = new Scheduler(schedulerLimits(defaultConfig()));

const files = new Map<string, Buffer>([
  ['a.txt', Buffer.from('alpha\n')],
  ['big.bin', Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7919) % 251))],
  ['dir/b.txt', Buffer.from('beta\n')],
  ['dir/empty', Buffer.alloc(0)],
]);

let dir: string;
let blob: Buffer;
let written: ZstdChunkedResult;

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-zstd-unit-'));
  const tar = await makeTar([
    { name: 'dir/', type: 'directory' },
    ...[...files].map(([name, content]) => ({ name, content })),
    { name: 'dir/sub/', type: 'directory' },
    { name: 'link', type: 'symlink', linkname: 'a.txt' },
  ]);
  const { blob: esgz } = await toEstargz(tar, { chunkSizeBytes: 64 * 1024, compressionLevel: 0 });
  await writeFile(path.join(dir, 'in.esgz'), esgz);
  written = await transcodeToZstdChunked(path.join(dir, 'in.esgz'), path.join(dir, 'out.zst'), 3);
  blob = await readFile(path.join(dir, 'out.zst'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

function find(root: LayerNode, name: string): LayerNode {
  let node = root;
  for (const part of name.split('/')) node = node.children!.get(part)!;
  assert.ok(node, name);
  return node;
}

test('readToc detects zstd:chunked, verifies the TOC digest, and files read back through LayerReader', async () => {
  const source = new BufferBlobSource(written.blobDigest, blob);
  const r = await readToc(source);
  assert.equal(r.compression, 'zstd');
  assert.equal(r.footerSize, 48);
  assert.equal(r.tocDigest, written.tocDigest);
  const [pos] = written.manifestPosition.split(':');
  assert.equal(r.tocOffset, Number(pos) - 8, 'payload ends where the TOC skippable frame starts');
  const tree = buildLayerTree(r.toc, { blobSize: blob.length, tocOffset: r.tocOffset });
  const reader = new LayerReader(source, tree, { scheduler, compression: 'zstd' });
  assert.equal(reader.compression, 'zstd');
  for (const [name, content] of files) {
    const node = find(tree.root, name);
    assert.equal(node.size, content.length);
    const got = await reader.read(node, 0, content.length + 10);
    assert.ok(got.equals(content), `${name} reads back`);
  }
  const big = find(tree.root, 'big.bin');
  assert.ok(big.chunks.length > 3, 'big file has several chunks');
  const mid = await reader.read(big, 100_000, 70_000);
  assert.ok(mid.equals(files.get('big.bin')!.subarray(100_000, 170_000)), 'a read across chunk boundaries');
  assert.equal(find(tree.root, 'link').linkName, 'a.txt');
});

test('a gzip reader on a zstd layer fails loudly (the kind matters)', async () => {
  const source = new BufferBlobSource(written.blobDigest, blob);
  const { toc, tocOffset } = await readToc(source);
  const tree = buildLayerTree(toc, { blobSize: blob.length, tocOffset });
  await assert.rejects(new LayerReader(source, tree, { scheduler }).read(find(tree.root, 'a.txt'), 0, 6), EstargzFormatError);
});

test('background fetch computes the zstd diff_id (skippable frames decode to nothing) and hands over members', async () => {
  const source = new BufferBlobSource(written.blobDigest, blob);
  const { toc, tocOffset } = await readToc(source);
  const tree = buildLayerTree(toc, { blobSize: blob.length, tocOffset });
  const reader = new LayerReader(source, tree, { scheduler, compression: 'zstd', memoryCacheBytes: 0 });
  let members = 0;
  const result = await backgroundFetch({
    blob: source,
    chunks: tree.chunksInBlobOrder(),
    compression: 'zstd',
    windowBytes: 7_000, // frames span windows
    isCached: () => false,
    isBusy: () => false,
    onMember: async (c, member) => {
      members++;
      await reader.warm(c, member);
    },
  });
  assert.equal(result.diffId, written.diffId);
  assert.equal(members, tree.chunksInBlobOrder().length);
});

test('frames without a content size (as streaming encoders write them), several frames, skippable frames', async () => {
  await zstdReady();
  // FHD 0: no content size, no checksum; window descriptor 0 (1 KiB); one raw block, last.
  const rawFrame = (text: string): Buffer => {
    const data = Buffer.from(text);
    const h = (data.length << 3) | 1;
    return Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00, h & 0xff, (h >> 8) & 0xff, h >> 16]), data]);
  };
  const skippable = Buffer.concat([Buffer.from([0x5f, 0x2a, 0x4d, 0x18, 3, 0, 0, 0]), Buffer.from('xyz')]);
  const member = Buffer.concat([rawFrame('hello '), skippable, Buffer.from(compress(Buffer.from('zstd world'), 3)), rawFrame('!')]);
  assert.equal((await zstdRange(member, 0, 17)).toString(), 'hello zstd world!');
  assert.equal((await zstdRange(member, 6, 4)).toString(), 'zstd');
  assert.equal((await zstdDecompressAll(member, 100)).toString(), 'hello zstd world!');
  await assert.rejects(zstdRange(member, 0, 18), /holds 17 bytes, need 18/);
  await assert.rejects(zstdDecompressAll(member, 10), /larger than the limit/);
  await assert.rejects(zstdRange(member.subarray(0, member.length - 1), 0, 17), /truncated/);
  await assert.rejects(zstdRange(Buffer.concat([Buffer.from('junk'), member]), 0, 1), /no zstd frame/);
  const hasher = new ZstdDiffHasher();
  for (let i = 0; i < member.length; i += 5) await hasher.write(member.subarray(i, i + 5));
  assert.equal(hasher.digest(), sha256('hello zstd world!'));
  const cut = new ZstdDiffHasher();
  await cut.write(member.subarray(0, 10));
  assert.throws(() => cut.digest(), /ends inside the frame/);
});

test('hostile frames: absurd sizes, reserved bits, dictionaries, corrupt data', async () => {
  await zstdReady();
  const frame = Buffer.from(compress(Buffer.alloc(5000, 7), 3));
  const fhd = frame[4]!;
  // Declared content size (single segment, 2-byte field: 1000) larger than its one 5-byte raw block holds.
  const lying = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x60, (1000 - 256) & 0xff, (1000 - 256) >> 8, (5 << 3) | 1, 0, 0, 1, 2, 3, 4, 5]);
  assert.throws(() => scanZstdFrame(lying, 0), /declares 1000 bytes but its blocks hold at most 5/);
  const reserved = Buffer.from(frame);
  reserved[4] = fhd | 0x08;
  assert.throws(() => scanZstdFrame(reserved, 0), /reserved header bit/);
  const dict = Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x01, 0x00, 0x09]), Buffer.from([1, 0, 0])]);
  assert.throws(() => scanZstdFrame(dict, 0), /needs dictionary 9/);
  const corrupt = Buffer.from(frame);
  corrupt[corrupt.length - 2] ^= 0xff;
  await assert.rejects(zstdRange(corrupt, 0, 5000), EstargzFormatError);
  // Many tiny "compressed" blocks claim a huge output: refused before any allocation.
  const blocks: number[] = [];
  for (let i = 0; i < 4000; i++) blocks.push((1 << 3) | (2 << 1), 0, 0, 0);
  blocks[blocks.length - 4] |= 1;
  const bomb = Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x58]), Buffer.from(blocks)]);
  await assert.rejects(zstdRange(bomb, 0, 1, 64 * 1024 * 1024), /more than the limit/);
});

test('hostile footers and TOCs give clear errors', async () => {
  const src = (b: Buffer): BufferBlobSource => new BufferBlobSource('sha256:x', b);
  const tail = blob.subarray(blob.length - 48);
  const footer = parseZstdChunkedFooter(tail);
  assert.equal(typeof footer, 'object');
  const { tocDataOffset, compressedLength, uncompressedLength } = footer as Exclude<typeof footer, string>;
  const withFooter = (f: Buffer): Buffer => Buffer.concat([blob.subarray(0, blob.length - 48), f]);

  // Neither eStargz nor zstd:chunked: every reason is named.
  const plain = Buffer.concat([blob.subarray(0, blob.length - 8), Buffer.from('NOTMAGIC')]);
  await assert.rejects(readToc(src(plain)), (err: unknown) => {
    assert.ok(err instanceof EstargzFormatError);
    assert.match(err.message, /not an eStargz layer/);
    assert.match(err.message, /eStargz footer: .*legacy stargz footer: .*zstd:chunked footer: magic GnUlInUx not found/);
    return true;
  });
  const wrongType = Buffer.from(tail);
  wrongType.writeBigUInt64LE(2n, 8 + 24);
  await assert.rejects(readToc(src(withFooter(wrongType))), /manifest type 2 is not 1/);
  const notSkippable = Buffer.from(tail);
  notSkippable.writeUInt32LE(0xfd2fb528, 0);
  await assert.rejects(readToc(src(withFooter(notSkippable))), /not in a zstd skippable frame/);
  const huge = Buffer.from(tail);
  huge.writeBigUInt64LE(1n << 60n, 8);
  await assert.rejects(readToc(src(withFooter(huge))), /too large/);
  await assert.rejects(
    readToc(src(withFooter(encodeZstdChunkedFooter(tocDataOffset - 1, compressedLength, uncompressedLength)))),
    /not right before the footer/,
  );
  await assert.rejects(
    readToc(src(withFooter(encodeZstdChunkedFooter(tocDataOffset, compressedLength, uncompressedLength + 1)))),
    /decompresses to \d+ bytes, the footer says/,
  );
  await assert.rejects(
    readToc(src(withFooter(encodeZstdChunkedFooter(tocDataOffset, compressedLength, uncompressedLength - 1)))),
    /malformed zstd TOC.*larger than the limit/,
  );
  await assert.rejects(readToc(src(blob), { maxTocBytes: compressedLength - 1 }), /compressed TOC is \d+ bytes, more than the limit/);
  await assert.rejects(readToc(src(blob), { maxTocBytes: uncompressedLength - 1 }), /decompressed TOC is \d+ bytes, larger than the limit/);
  // A corrupt TOC frame, and a TOC frame whose skippable header lies.
  const corrupt = Buffer.from(blob);
  corrupt[tocDataOffset + compressedLength - 3] ^= 0xff;
  await assert.rejects(readToc(src(corrupt)), /malformed zstd TOC/);
  const badHeader = Buffer.from(blob);
  badHeader.writeUInt32LE(compressedLength + 1, tocDataOffset - 4);
  await assert.rejects(readToc(src(badHeader)), /no skippable frame of \d+ bytes holds the TOC/);
  // Hostile TOC JSON inside a well-formed zstd:chunked envelope is refused by the same TOC parser.
  const evil = Buffer.from(JSON.stringify({ version: 1, entries: [{ name: '../etc/passwd', type: 'reg', size: 1, offset: 0 }] }));
  const z = Buffer.from(compress(evil, 3));
  const skip = Buffer.alloc(8);
  skip.writeUInt32LE(0x184d2a50, 0);
  skip.writeUInt32LE(z.length, 4);
  const evilBlob = Buffer.concat([skip, z, encodeZstdChunkedFooter(8, z.length, evil.length)]);
  await assert.rejects(readToc(src(evilBlob)), /unsafe name/);
});
