import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { backgroundFetch, chainIdOf, checkChainId } from '../../../src/layer/background-fetch';
import { hashGzipHead } from '../../../src/layer/diff-hash';
import { LayerReader } from '../../../src/reader/chunk-reader';
import { readToc } from '../../../src/estargz/toc';
import { buildLayerTree } from '../../../src/metadata/layer-tree';
import { inflateRange } from '../../../src/reader/inflate-range';
import { BufferBlobSource } from '../../../src/remote/blob-source';
import { CountingBlobSource, makeTar, sha256, toEstargz } from '../estargz/fixture';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';
import { defaultConfig } from '../../../src/config/config';

/** The process's one scheduler, as the composition root makes it. */
const scheduler = new Scheduler(schedulerLimits(defaultConfig()));

async function layer(): Promise<{ blob: BufferBlobSource; diffId: string; files: Map<string, Buffer> }> {
  const files = new Map<string, Buffer>([
    ['a.txt', Buffer.from('alpha\n')],
    ['big.bin', Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7919) % 251))],
    ['dir/b.txt', Buffer.from('beta\n')],
  ]);
  const tar = await makeTar([
    { name: 'dir/', type: 'directory' },
    ...[...files].map(([name, content]) => ({ name, content })),
  ]);
  const { blob, result } = await toEstargz(tar, { chunkSizeBytes: 64 * 1024 });
  return { blob: new BufferBlobSource(sha256(blob), blob), diffId: result.diffId, files };
}

test('one pass hands over every chunk member and computes the diff_id', async () => {
  const { blob, diffId } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const tree = buildLayerTree(toc, { blobSize: blob.size, tocOffset });
  const chunks = tree.chunksInBlobOrder();
  assert.ok(chunks.length > 4, 'the big file spans several chunks');
  const seen = new Set<string>();
  const result = await backgroundFetch({
    blob,
    chunks,
    windowBytes: 10_000, // smaller than a member: members must be assembled across windows
    isCached: () => false,
    isBusy: () => false,
    async onMember(c, member) {
      const data = await inflateRange(member, c.innerOffset, c.size);
      assert.equal(sha256(data), c.digest, `chunk at ${c.compressedOffset} verifies`);
      seen.add(`${c.compressedOffset}:${c.innerOffset}`);
    },
  });
  assert.equal(result.diffId, diffId);
  assert.equal(seen.size, chunks.length);
  assert.equal(result.fetchedBytes, blob.size);
});

test('skips cached chunks and waits while on-demand reads are busy', async () => {
  const { blob } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const chunks = buildLayerTree(toc, { blobSize: blob.size, tocOffset }).chunksInBlobOrder();
  let busyPolls = 0;
  let handed = 0;
  const result = await backgroundFetch({
    blob,
    chunks,
    isCached: (c) => c.compressedOffset === chunks[0]!.compressedOffset,
    isBusy: () => busyPolls++ < 3,
    onMember() {
      handed++;
      return Promise.resolve();
    },
  });
  assert.ok(busyPolls >= 3, 'polled while busy');
  assert.equal(handed, chunks.length - 1);
  assert.equal(result.cachedChunks, chunks.length - 1);
});

test('chainID check: base layer, child layer, and a mismatch', () => {
  const diff = 'sha256:' + 'a'.repeat(64);
  assert.equal(chainIdOf(undefined, diff), diff);
  const parent = 'sha256:' + 'b'.repeat(64);
  const child = 'sha256:' + createHash('sha256').update(`${parent} ${diff}`).digest('hex');
  assert.equal(chainIdOf(parent, diff), child);
  checkChainId(child, parent, diff);
  assert.throws(() => checkChainId(child, undefined, diff), /committed as/);
});

test('aborts when asked', async () => {
  const { blob } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const chunks = buildLayerTree(toc, { blobSize: blob.size, tocOffset }).chunksInBlobOrder();
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(
    backgroundFetch({ blob, chunks, isCached: () => false, isBusy: () => false, onMember: () => Promise.resolve(), signal: controller.signal }),
    /abort/i,
  );
});

test('resumes from the hash of a head that ends on a member boundary: same diff_id, the rest fetched once', async () => {
  const { blob, diffId } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const chunks = buildLayerTree(toc, { blobSize: blob.size, tocOffset }).chunksInBlobOrder();
  const cut = chunks[Math.floor(chunks.length / 2)]!.compressedEnd; // a member boundary mid-blob
  const resume = await hashGzipHead(await blob.readRange(0, cut));
  assert.equal(resume.offset, cut);
  const handed: number[] = [];
  const counting = new CountingBlobSource(await blob.readRange(0, blob.size), blob.digest);
  const result = await backgroundFetch({
    blob: counting,
    chunks,
    resume,
    windowBytes: 10_000,
    isCached: (c) => c.compressedOffset < cut, // prefetch stored the head's chunks
    isBusy: () => false,
    onMember(c) {
      handed.push(c.compressedOffset);
      return Promise.resolve();
    },
  });
  assert.equal(result.diffId, diffId, 'the diff_id (and so the chainID check) is exact');
  assert.equal(result.startOffset, cut);
  assert.equal(result.fetchedBytes, blob.size - cut);
  assert.ok(counting.reads.every((r) => r.offset >= cut), 'nothing before the head’s end is read again');
  assert.deepEqual(handed, chunks.filter((c) => c.compressedOffset >= cut).map((c) => c.compressedOffset));
});

test('a head whose chunks are no longer all local is fetched again, so the layer ends up wholly local', async () => {
  const { blob, diffId } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const chunks = buildLayerTree(toc, { blobSize: blob.size, tocOffset }).chunksInBlobOrder();
  const cut = chunks[Math.floor(chunks.length / 2)]!.compressedEnd;
  const lost = chunks[0]!; // its disk write failed, or the budget evicted it
  const handed: number[] = [];
  const result = await backgroundFetch({
    blob,
    chunks,
    resume: await hashGzipHead(await blob.readRange(0, cut)),
    isCached: (c) => c.compressedOffset < cut && c !== lost,
    isBusy: () => false,
    onMember(c) {
      handed.push(c.compressedOffset);
      return Promise.resolve();
    },
  });
  assert.equal(result.diffId, diffId);
  assert.equal(result.startOffset, 0);
  assert.ok(handed.includes(lost.compressedOffset), 'the lost chunk is fetched and stored again');
});

test('a head cut inside a member is refused (the caller falls back to a full pass)', async () => {
  const { blob } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const chunks = buildLayerTree(toc, { blobSize: blob.size, tocOffset }).chunksInBlobOrder();
  const c = chunks[1]!;
  await assert.rejects(hashGzipHead(await blob.readRange(0, c.compressedOffset + Math.floor((c.compressedEnd - c.compressedOffset) / 2))));
});

test('prefetch hands its head to background fetch: the blob is fetched exactly once in total', async () => {
  const { blob, diffId } = await layer();
  const bytes = await blob.readRange(0, blob.size);
  const counting = new CountingBlobSource(bytes, blob.digest);
  const { toc, tocOffset } = await readToc(blob);
  const tree = buildLayerTree(toc, { blobSize: blob.size, tocOffset });
  const chunks = tree.chunksInBlobOrder();
  const reader = new LayerReader(counting, tree, { scheduler });
  let head: Buffer | undefined;
  await reader.prefetch(chunks[3]!.compressedEnd + 1, undefined, (h) => (head = h));
  assert.ok(head !== undefined && head.length === chunks[3]!.compressedEnd, 'the head ends at the last prefetched member');
  const result = await backgroundFetch({
    blob: counting,
    chunks,
    resume: await hashGzipHead(head),
    isCached: (c) => reader.isLocal(c),
    isBusy: () => false,
    onMember: (c, member) => reader.warm(c, member),
  });
  assert.equal(result.diffId, diffId);
  const fetched = counting.reads.reduce((n, r) => n + r.length, 0);
  assert.equal(fetched, blob.size, 'prefetch + background fetch = the blob, not the blob + the prefetched head');
  const sorted = [...counting.reads].sort((a, b) => a.offset - b.offset);
  sorted.forEach((r, i) => i > 0 && assert.ok(r.offset >= sorted[i - 1]!.offset + sorted[i - 1]!.length, 'no byte read twice'));
});
