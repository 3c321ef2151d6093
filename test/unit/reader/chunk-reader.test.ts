import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';

import { EstargzFormatError, VerificationError } from '../../../src/errors';
import { readToc, type Toc } from '../../../src/estargz/toc';
import { buildLayerTree, type LayerNode, type LayerTree } from '../../../src/metadata/layer-tree';
import { LRUCache } from 'lru-cache';
import { LayerReader, type ChunkStore, type LayerReaderOptions } from '../../../src/reader/chunk-reader';
import { CountingBlobSource, makeTar, toEstargz } from '../estargz/fixture';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';
import { defaultConfig } from '../../../src/config/config';

/** The process's one scheduler, as the composition root makes it. */
const scheduler = new Scheduler(schedulerLimits(defaultConfig()));
/**
 * Most tests here count member fetches: their readers fetch exactly the member a read misses (blockBytes 0).
 * The tests of block reads say otherwise.
 */
const MEMBER_READS = { blockBytes: 0 } as const;

const CHUNK = 1024;
const FILE = randomBytes(5 * CHUNK + 100); // six chunks
const SMALL = Buffer.from('small file');
const OTHER = randomBytes(3000);

interface Layer {
  blob: Buffer;
  toc: Toc;
  tocOffset: number;
}

async function layer(prioritizedFiles: string[] = []): Promise<Layer> {
  const tar = await makeTar([
    { name: 'file', content: FILE },
    { name: 'small', content: SMALL },
    { name: 'other', content: OTHER },
  ]);
  const { blob } = await toEstargz(tar, { chunkSizeBytes: CHUNK, prioritizedFiles });
  const { toc, tocOffset } = await readToc(new CountingBlobSource(blob));
  return { blob, toc, tocOffset };
}

function open(l: Layer, opts: Partial<LayerReaderOptions> = {}, delayMs = 0, toc = l.toc) {
  const source = new CountingBlobSource(l.blob, undefined, delayMs);
  const tree: LayerTree = buildLayerTree(toc, { blobSize: l.blob.length, tocOffset: l.tocOffset });
  const reader = new LayerReader(source, tree, { scheduler, ...MEMBER_READS, ...opts });
  const node = (p: string): LayerNode => {
    const n = tree.resolvePath(p);
    assert.ok(n);
    return n;
  };
  return { source, tree, reader, node };
}

test('reads return file bytes for any range, clamped at end of file', async () => {
  const { reader, node } = open(await layer());
  const file = node('file');
  assert.equal(file.chunks.length, 6);
  for (const [pos, len] of [
    [0, 10],
    [0, FILE.length],
    [CHUNK - 1, 2],
    [100, 3 * CHUNK],
    [5 * CHUNK, 100],
    [FILE.length - 1, 50],
  ]) {
    assert.deepEqual(await reader.read(file, pos, len), FILE.subarray(pos, pos + len), `${pos}+${len}`);
  }
  assert.equal((await reader.read(file, FILE.length, 10)).length, 0);
  assert.equal((await reader.read(file, FILE.length + 5, 10)).length, 0);
  assert.equal((await reader.read(file, 10, 0)).length, 0);
  assert.deepEqual(await reader.read(node('small'), 0, 4096), SMALL);
});

test('a read inside one chunk is a view of the cached chunk, not a copy', async () => {
  const { reader, node } = open(await layer());
  const file = node('file');
  const a = await reader.read(file, 10, 20);
  const b = await reader.read(file, 10, 20);
  assert.equal(a.buffer, b.buffer, 'same backing memory');
});

test('the cache serves repeated reads; stats count hits, misses and fetched bytes', async () => {
  const { reader, node, source } = open(await layer());
  const file = node('file');
  await reader.read(file, 0, 10);
  assert.equal(reader.stats.cacheMisses, 1);
  assert.equal(source.reads.length, 1);
  const c = file.chunks[0];
  assert.deepEqual(source.reads[0], { offset: c.compressedOffset, length: c.compressedEnd - c.compressedOffset });
  assert.equal(reader.stats.fetchedBytes, c.compressedEnd - c.compressedOffset);
  await reader.read(file, 500, 10);
  await reader.read(file, 0, CHUNK);
  assert.equal(reader.stats.cacheHits, 2);
  assert.equal(source.reads.length, 1, 'no new fetch');
});

test('concurrent reads of the same chunk share one fetch', async () => {
  const { reader, node, source } = open(await layer(), {}, 20);
  const file = node('file');
  const results = await Promise.all(Array.from({ length: 10 }, (_, i) => reader.read(file, i * 10, 10)));
  results.forEach((r, i) => assert.deepEqual(r, FILE.subarray(i * 10, i * 10 + 10)));
  assert.equal(source.reads.length, 1);
  assert.equal(reader.stats.cacheMisses, 1);
  assert.equal(reader.stats.sharedFetches, 9);
});

test('a read spanning chunks fetches them concurrently, once each', async () => {
  const { reader, node, source } = open(await layer(), {}, 30);
  const file = node('file');
  const started = Date.now();
  const data = await reader.read(file, 0, FILE.length);
  const elapsed = Date.now() - started;
  assert.deepEqual(data, FILE);
  assert.equal(source.reads.length, 6);
  assert.ok(elapsed < 6 * 30, `fetches overlapped (${elapsed} ms)`);
});

test('a chunk whose bytes do not match its digest is a VerificationError', async () => {
  const l = await layer();
  const tampered: Toc = structuredClone(l.toc);
  const entry = tampered.entries.find((e) => e.name === 'small');
  assert.ok(entry);
  entry.chunkDigest = 'sha256:' + '0'.repeat(64);
  const { reader, node } = open(l, {}, 0, tampered);
  await assert.rejects(reader.read(node('small'), 0, 5), VerificationError);
  // Nothing unverified was cached: the next read fails again.
  await assert.rejects(reader.read(node('small'), 0, 5), VerificationError);
  // Other files are unaffected.
  assert.deepEqual(await reader.read(node('other'), 0, 10), OTHER.subarray(0, 10));
});

test('corrupted blob bytes are caught by verification', async () => {
  const l = await layer();
  const blob = Buffer.from(l.blob);
  const { node: n0 } = open(l);
  const c = n0('other').chunks[0];
  // Flip a byte inside the deflate data: either inflate fails or the digest does not match.
  blob[c.compressedOffset + 20] ^= 0x55;
  const { reader, node } = open({ ...l, blob });
  await assert.rejects(
    reader.read(node('other'), 0, 10),
    (err: unknown) => err instanceof VerificationError || err instanceof EstargzFormatError,
  );
});

test('a missing chunkDigest is an error unless verification is off', async () => {
  const l = await layer();
  const stripped: Toc = structuredClone(l.toc);
  for (const e of stripped.entries) delete e.chunkDigest;
  const verifying = open(l, {}, 0, stripped);
  await assert.rejects(verifying.reader.read(verifying.node('small'), 0, 5), /no chunkDigest/);
  assert.equal(verifying.source.reads.length, 0, 'nothing fetched for an unverifiable chunk');
  const trusting = open(l, { verify: false }, 0, stripped);
  assert.deepEqual(await trusting.reader.read(trusting.node('small'), 0, 5), SMALL.subarray(0, 5));
});

test('prefetch reads [0, landmark) in one range read and fills the cache', async () => {
  const l = await layer(['small', 'file']);
  const { reader, node, source, tree } = open(l);
  const landmark = tree.prefetchLandmarkOffset;
  assert.ok(landmark !== undefined);
  await reader.prefetch(landmark);
  assert.deepEqual(source.reads, [{ offset: 0, length: source.reads[0].length }]);
  assert.ok(source.reads[0].length <= landmark);
  assert.equal(reader.stats.prefetchedChunks, 1 + 6);
  assert.deepEqual(await reader.read(node('file'), 0, FILE.length), FILE);
  assert.deepEqual(await reader.read(node('small'), 0, 100), SMALL);
  assert.equal(source.reads.length, 1, 'prioritized files need no further fetch');
  assert.equal(reader.stats.cacheMisses, 0);
  await reader.read(node('other'), 0, 1);
  assert.equal(source.reads.length, 2, 'files after the landmark are fetched on demand');
  // A second prefetch of the same range has nothing left to do.
  await reader.prefetch(landmark);
  assert.equal(source.reads.length, 2);
});

test('the memory cache is bounded by bytes', async () => {
  const { reader, node, source } = open(await layer(), { memoryCacheBytes: 2 * CHUNK });
  const file = node('file');
  await reader.read(file, 0, FILE.length); // six chunks, room for two
  const before = source.reads.length;
  await reader.read(file, 0, 1); // the first chunk was evicted
  assert.equal(source.reads.length, before + 1);
  const off = open(await layer(), { memoryCacheBytes: 0 });
  await off.reader.read(off.node('small'), 0, 1);
  await off.reader.read(off.node('small'), 0, 1);
  assert.equal(off.source.reads.length, 2, 'cache disabled');
});

test('an aborted read rejects; the shared fetch still completes for others', async () => {
  const { reader, node, source } = open(await layer(), {}, 30);
  const file = node('file');
  const controller = new AbortController();
  const aborted = reader.read(file, 0, 10, controller.signal);
  const other = reader.read(file, 0, 10);
  controller.abort(new Error('timeout'));
  await assert.rejects(aborted, /timeout/);
  assert.deepEqual(await other, FILE.subarray(0, 10));
  assert.equal(source.reads.length, 1);
});

test('prefetch verifies too, and reports the first failure after trying every chunk', async () => {
  const l = await layer(['small', 'file']);
  const tampered: Toc = structuredClone(l.toc);
  const entry = tampered.entries.find((e) => e.name === 'small');
  assert.ok(entry);
  entry.chunkDigest = 'sha256:' + '1'.repeat(64);
  const { reader, tree, node, source } = open(l, {}, 0, tampered);
  await assert.rejects(reader.prefetch(tree.prefetchLandmarkOffset ?? 0), VerificationError);
  assert.equal(reader.stats.prefetchedChunks, 6, 'the good chunks were cached');
  assert.deepEqual(await reader.read(node('file'), 0, 10), FILE.subarray(0, 10));
  assert.equal(source.reads.length, 1);
});

test('layers sharing one memory cache never see each other\'s chunks, even unverified', async () => {
  const shared = new LRUCache<string, Buffer>({ maxSize: 1 << 20, sizeCalculation: (b) => b.length });
  const open = async (content: string): Promise<{ reader: LayerReader; node: LayerNode }> => {
    // Same names and sizes: the chunks sit at the same offsets in both blobs.
    const { blob } = await toEstargz(await makeTar([{ name: 'f.txt', content }]));
    const source = new CountingBlobSource(blob);
    const { toc, tocOffset } = await readToc(source);
    const tree = buildLayerTree(toc, { blobSize: source.size, tocOffset });
    // As in a legacy stargz layer: no chunk digests, so nothing but the blob tells the chunks apart.
    for (const c of tree.chunksInBlobOrder()) c.digest = undefined;
    return { reader: new LayerReader(source, tree, { scheduler, ...MEMBER_READS, sharedMemoryCache: shared, verify: false }), node: tree.resolvePath('f.txt')! };
  };
  const a = await open('a');
  const b = await open('b');
  assert.equal((await a.reader.read(a.node, 0, 1)).toString(), 'a');
  assert.equal((await b.reader.read(b.node, 0, 1)).toString(), 'b');
  assert.equal((await a.reader.read(a.node, 0, 1)).toString(), 'a');
  assert.equal(shared.size, 2);
});

test('a read during prefetch joins the prefetch instead of fetching the same bytes again', async () => {
  const l = await layer(['small', 'file']);
  const { reader, node, source, tree } = open(l, {}, 30);
  const landmark = tree.prefetchLandmarkOffset!;
  const prefetch = reader.prefetch(landmark);
  assert.deepEqual(await reader.read(node('file'), 0, FILE.length), FILE);
  await prefetch;
  assert.equal(source.reads.length, 1, 'one range read served both');
});

test('a read that joined a failed prefetch fetches on its own', async () => {
  const l = await layer(['small', 'file']);
  const { reader, node, source, tree } = open(l, {}, 30);
  let fail = true;
  const read = source.readRange.bind(source);
  source.readRange = async (offset: number, length: number) => {
    if (fail) {
      fail = false;
      throw new Error('registry hiccup');
    }
    return read(offset, length);
  };
  const prefetch = reader.prefetch(tree.prefetchLandmarkOffset!);
  const data = reader.read(node('small'), 0, 100);
  await assert.rejects(prefetch, /hiccup/);
  assert.deepEqual(await data, SMALL);
});

/**
 * A blob source that streams a range as a registry does: readRangeInto hands bytes on in slices of `slice`, and
 * stops before byte `holdAt` until release() (or fails there with `failAt`).
 */
class StreamingBlobSource extends CountingBlobSource {
  private release!: () => void;
  private readonly gate = new Promise<void>((r) => (this.release = r));
  readonly streamed: Array<{ offset: number; length: number }> = [];

  constructor(
    private readonly blob: Buffer,
    private readonly slice: number,
    private readonly stop: { holdAt?: number; failAt?: number },
  ) {
    super(blob);
  }

  letGo(): void {
    this.release();
  }

  async readRangeInto(offset: number, into: Buffer, arrived: (n: number) => void): Promise<void> {
    this.streamed.push({ offset, length: into.length });
    const stopAt = (this.stop.failAt ?? this.stop.holdAt ?? Infinity) - offset;
    for (let n = 0; n < into.length; ) {
      // a slice ends where the stream stops, so the bytes before it are all in when it does
      const next = Math.min(into.length, n + this.slice, n < stopAt ? stopAt : Infinity);
      if (n >= stopAt && this.stop.failAt !== undefined) throw new Error('registry hiccup');
      if (n >= stopAt) await this.gate;
      this.blob.copy(into, n, offset + n, offset + next);
      n = next;
      arrived(n);
      await new Promise((r) => setImmediate(r));
    }
  }
}

test('prefetch streams its range as one request, and a chunk is ready as soon as its own bytes are in', async () => {
  const l = await layer(['small', 'file']);
  const tree0 = buildLayerTree(l.toc, { blobSize: l.blob.length, tocOffset: l.tocOffset });
  const landmark = tree0.prefetchLandmarkOffset!;
  const smallChunk = tree0.resolvePath('small')!.chunks[0]!;
  // The stream stops right after 'small' (first in the blob) until the test lets it go, which it does only once
  // a read of 'small' was served.
  const source = new StreamingBlobSource(l.blob, 100, { holdAt: smallChunk.compressedEnd });
  const reader = new LayerReader(source, tree0, { scheduler, ...MEMBER_READS, prefetchParallel: { concurrency: 2, chunkBytes: 2 * CHUNK } });
  let head: Buffer | undefined;
  const prefetch = reader.prefetch(landmark, undefined, (h) => (head = h));
  const small = reader.read(tree0.resolvePath('small')!, 0, SMALL.length);
  const first = await Promise.race([small, new Promise<'stuck'>((r) => setTimeout(() => r('stuck'), 10_000))]);
  source.letGo();
  assert.notEqual(first, 'stuck', "the first chunk waited for the rest of the range");
  assert.deepEqual(first, SMALL);
  await prefetch;

  assert.equal(source.streamed.length, 1, 'one request');
  assert.equal(source.reads.length, 0, 'no other read');
  const end = source.streamed[0]!.length;
  assert.equal(source.streamed[0]!.offset, 0);
  assert.ok(tree0.chunksInBlobOrder().some((c) => c.compressedEnd === end), 'the range ends at a member end');
  assert.ok(head !== undefined && head.equals(l.blob.subarray(0, end)), "the head handed on is the blob's bytes");
  assert.equal(reader.stats.fetchedBytes, end);
  assert.deepEqual(await reader.read(tree0.resolvePath('file')!, 0, FILE.length), FILE);
  assert.equal(source.reads.length, 0, 'prioritized files need no further fetch');
  assert.equal(reader.stats.prefetchedChunks, 1 + 6);
});

test('a source that cannot stream gets the prefetch range as one plain read', async () => {
  const l = await layer(['small', 'file']);
  const single = open(l, { prefetchParallel: { concurrency: 3, chunkBytes: 512 } });
  let head: Buffer | undefined;
  await single.reader.prefetch(single.tree.prefetchLandmarkOffset!, undefined, (h) => (head = h));
  assert.equal(single.source.reads.length, 1);
  assert.ok(head !== undefined && head.equals(l.blob.subarray(0, head.length)));
  assert.deepEqual(await single.reader.read(single.node('file'), 0, FILE.length), FILE);
  assert.deepEqual(await single.reader.read(single.node('small'), 0, SMALL.length), SMALL);
  assert.equal(single.source.reads.length, 1, 'every prioritized chunk came from the one read');
});

test('a stream that breaks off fails the prefetch and hands on no head; the chunks that arrived stay, a read of the others fetches', async () => {
  const l = await layer(['small', 'file']);
  const tree0 = buildLayerTree(l.toc, { blobSize: l.blob.length, tocOffset: l.tocOffset });
  const smallChunk = tree0.resolvePath('small')!.chunks[0]!;
  const source = new StreamingBlobSource(l.blob, 100, { failAt: smallChunk.compressedEnd });
  const reader = new LayerReader(source, tree0, { scheduler, ...MEMBER_READS });
  let head: Buffer | undefined;
  const prefetch = reader.prefetch(tree0.prefetchLandmarkOffset!, undefined, (h) => (head = h));
  // joins the prefetch of the file's chunks, which never arrive
  const file = reader.read(tree0.resolvePath('file')!, 0, FILE.length);
  await assert.rejects(prefetch, /hiccup/);
  assert.equal(head, undefined);
  assert.deepEqual(await file, FILE);
  const reads = source.reads.length;
  assert.ok(reads > 0, 'the read fetched on its own');
  assert.deepEqual(await reader.read(tree0.resolvePath('small')!, 0, SMALL.length), SMALL);
  assert.equal(source.reads.length, reads, "'small' arrived before the break and was kept");
});

test('a reader streaming a file gets the next chunk fetched ahead, one at most; a first or jumping read does not', async () => {
  const l = await layer();
  const { reader, node, source } = open(l, {}, 20);
  const file = node('file');
  const chunkAt = (offset: number): number => file.chunks.findIndex((c) => c.compressedOffset === offset);
  const asked = (): number[] => source.reads.map((r) => chunkAt(r.offset));

  // The first read of the file: its own chunk only (a program reading a header needs no more).
  await reader.read(file, 0, 256);
  assert.deepEqual(asked(), [0]);
  // On from where it ended, into chunk 1: chunk 2 is asked for at once, before the reader gets there.
  await reader.read(file, 256, CHUNK);
  assert.deepEqual(asked(), [0, 1, 2]);
  assert.equal(reader.stats.fetchedAheadChunks, 1);
  // The reader pauses here: one chunk ahead, no more.
  await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(asked(), [0, 1, 2]);

  // Streaming on to the end: each chunk was asked for before the reader's first read in it.
  for (let pos = 256 + CHUNK; pos < FILE.length; pos += 256) {
    const k = Math.floor(pos / CHUNK);
    if (pos % CHUNK < 256) assert.ok(asked().includes(k), `chunk ${k} asked for before the reader reached it`);
    assert.deepEqual(await reader.read(file, pos, 256), FILE.subarray(pos, pos + 256));
  }
  assert.deepEqual([...asked()].sort(), [0, 1, 2, 3, 4, 5], 'every chunk once');
  assert.equal(reader.stats.fetchedAheadChunks, 4);

  // Reads that jump further than a chunk, even forward into the next chunk, start nothing ahead.
  const other = open(l, {}, 0);
  await other.reader.read(other.node('file'), 3 * CHUNK, 10);
  await other.reader.read(other.node('file'), 5 * CHUNK - 20, 10); // chunk 4, 2 KiB on from the last read's end
  await other.reader.read(other.node('file'), CHUNK + 10, 10);
  assert.equal(other.reader.stats.fetchedAheadChunks, 0);
  assert.equal(other.source.reads.length, 3);
});

test('no fetch ahead where the memory cache cannot hold it beside the chunk being read', async () => {
  const l = await layer();
  const { reader, node, source } = open(l, { memoryCacheBytes: CHUNK + CHUNK / 2 });
  const file = node('file');
  for (let pos = 0; pos < FILE.length; pos += 256) assert.deepEqual(await reader.read(file, pos, 256), FILE.subarray(pos, pos + 256));
  // Only the last chunk (100 bytes) fits beside a full one: the full ones are fetched when reached.
  assert.equal(reader.stats.fetchedAheadChunks, 1);
  assert.equal(source.reads.length, 6, 'each chunk fetched once, none pushed out before its use');
});

test('a fetch ahead that fails is fetched again by the reader that gets there', async () => {
  const l = await layer();
  const { reader, node, source } = open(l, {}, 10);
  const file = node('file');
  const chunk2 = file.chunks[2]!.compressedOffset;
  const read = source.readRange.bind(source);
  let failed = false;
  source.readRange = async (offset: number, length: number) => {
    if (offset === chunk2 && !failed) {
      failed = true;
      await new Promise((r) => setTimeout(r, 30)); // still in flight when the reader joins it
      throw new Error('registry hiccup');
    }
    return read(offset, length);
  };
  await reader.read(file, 0, CHUNK); // chunk 0
  await reader.read(file, CHUNK, CHUNK); // into chunk 1: chunk 2 fetched ahead, and failing
  assert.equal(reader.stats.fetchedAheadChunks, 1);
  assert.deepEqual(await reader.read(file, 2 * CHUNK, 256), FILE.subarray(2 * CHUNK, 2 * CHUNK + 256));
  assert.ok(failed);
});

/** A ChunkStore in memory that counts its gets. */
class MemoryChunkStore implements ChunkStore {
  readonly data = new Map<string, Buffer>();
  gets = 0;
  has(digest: string): boolean {
    return this.data.has(digest);
  }
  get(digest: string): Promise<Buffer | undefined> {
    this.gets++;
    return Promise.resolve(this.data.get(digest));
  }
  put(digest: string, data: Buffer): Promise<void> {
    this.data.set(digest, data);
    return Promise.resolve();
  }
}

test('sequential reads load the next chunks from the disk cache ahead of the reader', async () => {
  const l = await layer();
  const disk = new MemoryChunkStore();
  const first = open(l, { diskCache: disk });
  await first.reader.read(first.node('file'), 0, FILE.length); // verified chunks land on disk
  await new Promise((r) => setImmediate(r));
  assert.equal(disk.data.size >= 6, true);

  // A new reader (as after a restart): memory empty, every chunk on disk.
  const { reader, node, source } = open(l, { diskCache: disk, memoryCacheBytes: 64 * CHUNK });
  const file = node('file');
  const readsBefore = source.reads.length;
  for (let pos = 0; pos < FILE.length; pos += 256) {
    assert.deepEqual(await reader.read(file, pos, 256), FILE.subarray(pos, pos + 256));
  }
  assert.equal(source.reads.length, readsBefore, 'nothing from the blob');
  assert.ok(reader.stats.readAheadChunks >= 4, `read ahead ${reader.stats.readAheadChunks}`);
  assert.equal(reader.stats.diskHits, 6, 'each chunk read from disk once');

  // A random read does not start read-ahead.
  const other = open(l, { diskCache: disk, memoryCacheBytes: 64 * CHUNK });
  await other.reader.read(other.node('file'), 3 * CHUNK, 10);
  assert.equal(other.reader.stats.readAheadChunks, 0);
});

test('with no memory tier, reads go to the disk cache every time and nothing is read ahead', async () => {
  const l = await layer();
  const disk = new MemoryChunkStore();
  const warm = open(l, { diskCache: disk });
  await warm.reader.read(warm.node('file'), 0, FILE.length);
  await new Promise((r) => setImmediate(r));
  const { reader, node, source } = open(l, { diskCache: disk, memoryCacheBytes: 0 });
  const before = { blob: source.reads.length, gets: disk.gets };
  await reader.read(node('file'), 0, 10);
  await reader.read(node('file'), 10, 10);
  assert.equal(disk.gets - before.gets, 2);
  assert.equal(source.reads.length, before.blob);
  assert.equal(reader.stats.readAheadChunks, 0);
});

test('idleMs counts reads of the blob (reads, batches, prefetch), not chunks served from the disk cache', async () => {
  const l = await layer();
  const disk = new MemoryChunkStore();
  // Every blob read takes 40 ms: a look 10 ms after a read starts finds it in flight. readRanges, so that a
  // read of several chunks goes out as one batch.
  class BatchingSource extends CountingBlobSource {
    batches = 0;
    async readRanges(ranges: readonly { offset: number; length: number }[]): Promise<Buffer[]> {
      this.batches++;
      return Promise.all(ranges.map((r) => this.readRange(r.offset, r.length)));
    }
  }
  const source = new BatchingSource(l.blob, undefined, 40);
  const tree = buildLayerTree(l.toc, { blobSize: l.blob.length, tocOffset: l.tocOffset });
  const reader = new LayerReader(source, tree, { scheduler, ...MEMBER_READS, diskCache: disk });
  const node = (p: string): LayerNode => tree.resolvePath(p) as LayerNode;
  const duringThenAfter = async (work: Promise<unknown>, what: string): Promise<void> => {
    await new Promise((r) => setTimeout(r, 10));
    assert.equal(reader.idleMs(), 0, `${what}: a blob read is in flight`);
    await work;
    await new Promise((r) => setTimeout(r, 20));
    assert.ok(reader.idleMs() >= 15, `${what}: quiet since: ${reader.idleMs()} ms`);
  };
  assert.equal(reader.idleMs(), Infinity, 'never read');
  await duringThenAfter(reader.read(node('file'), 0, 10), 'a read');
  await duringThenAfter(reader.read(node('file'), CHUNK, 3 * CHUNK), 'a batch of chunks');
  assert.equal(source.batches, 1);
  await duringThenAfter(reader.prefetch(l.blob.length), 'prefetch');
  await new Promise((r) => setImmediate(r)); // the verified chunks reach the disk cache

  // A new reader with every chunk on disk: its reads never touch the blob, so it stays idle.
  const fromDisk = open(l, { diskCache: disk, memoryCacheBytes: 64 * CHUNK }, 40);
  assert.deepEqual(await fromDisk.reader.read(fromDisk.node('file'), 0, FILE.length), FILE);
  assert.equal(fromDisk.source.reads.length, 0);
  assert.equal(fromDisk.reader.idleMs(), Infinity);
});

test('a missed member is fetched as the whole blocks it touches', async () => {
  const l = await layer();
  const { source, reader, node } = open(l, { blockBytes: 4096 });
  const c = node('small').chunks[0]!;
  assert.deepEqual(await reader.read(node('small'), 0, 100), SMALL);
  assert.deepEqual(source.reads, [
    { offset: Math.floor(c.compressedOffset / 4096) * 4096, length: Math.min(l.blob.length, Math.ceil(c.compressedEnd / 4096) * 4096) - Math.floor(c.compressedOffset / 4096) * 4096 },
  ]);
});

test('members next to a missed one come from its blocks, without a request of their own', async () => {
  const l = await layer();
  const { source, reader, node } = open(l, { blockBytes: 1 << 20 }); // the whole test blob is one block
  assert.deepEqual(await reader.read(node('small'), 0, 100), SMALL);
  assert.deepEqual(await reader.read(node('other'), 0, OTHER.length), OTHER);
  assert.deepEqual(await reader.read(node('file'), 0, FILE.length), FILE);
  assert.equal(source.reads.length, 1);
  assert.equal(reader.stats.blockHits, node('other').chunks.length + node('file').chunks.length);
  assert.equal(reader.stats.fetchedBytes, source.reads[0]!.length, 'bytes are counted once, when fetched');
});

test('concurrent misses in one block share its request', async () => {
  const l = await layer();
  const { source, reader, node } = open(l, { blockBytes: 1 << 20 }, 20);
  const [a, b] = await Promise.all([reader.read(node('small'), 0, 100), reader.read(node('other'), 0, OTHER.length)]);
  assert.deepEqual(a, SMALL);
  assert.deepEqual(b, OTHER);
  assert.equal(source.reads.length, 1, 'one request for the block both members lie in');
  assert.equal(reader.stats.blockHits, node('other').chunks.length);
});

test('a block fetch that fails fails the reads waiting on it, and the next read fetches again', async () => {
  const l = await layer();
  const tree = buildLayerTree(l.toc, { blobSize: l.blob.length, tocOffset: l.tocOffset });
  const inner = new CountingBlobSource(l.blob);
  let failures = 1;
  const flaky = {
    size: inner.size,
    digest: inner.digest,
    readRange: (offset: number, length: number): Promise<Buffer> =>
      failures-- > 0 ? Promise.reject(new Error('connection reset')) : inner.readRange(offset, length),
  };
  const reader = new LayerReader(flaky, tree, { scheduler, blockBytes: 1 << 20 });
  const small = tree.resolvePath('small')!;
  const other = tree.resolvePath('other')!;
  const results = await Promise.allSettled([reader.read(small, 0, 100), reader.read(other, 0, 10)]);
  assert.deepEqual(results.map((r) => r.status), ['rejected', 'rejected'], 'the read that joined the block fetch sees its failure');
  assert.deepEqual(await reader.read(small, 0, 100), SMALL);
  assert.equal(inner.reads.length, 1);
});

test("a read that joins a prefetch's chunk is not queued behind other layers' prefetch inflates", async () => {
  const l = await layer(['small', 'file']);
  // One inflate slot, held by "another layer's" prefetch until the read below has its bytes.
  const busy = new Scheduler({ fetches: 16, inflates: 1, backgroundLayers: 1 });
  let release!: () => void;
  const holder = busy.inflates.run(() => new Promise<void>((r) => (release = r)), { priority: 'prefetch' });
  const { reader, node, tree } = open(l, { scheduler: busy }, 20);
  const prefetch = reader.prefetch(tree.prefetchLandmarkOffset!);
  prefetch.catch(() => undefined);
  // The read joins the prefetch's chunk while its part is still downloading.
  const read = reader.read(node('small'), 0, 100);
  const outcome = await Promise.race([read.then(() => 'read'), new Promise((r) => setTimeout(() => r('waited'), 2000))]);
  assert.equal(outcome, 'read', "the joined chunk's inflate did not wait for the busy slot");
  assert.deepEqual(await read, SMALL);
  release();
  await holder;
  await prefetch;
});

test('prefetchChunks hands on a span only once all its chunks verified: none with a corrupt chunk', async () => {
  const l = await layer();
  const { node: n0 } = open(l);
  const [f0, f1, f2] = n0('file').chunks;
  const small = n0('small').chunks[0];
  assert.ok(f0 && f1 && f2 && small);
  assert.equal(f1.compressedOffset, f0.compressedEnd, 'the file chunks touch: one request');
  const blob = Buffer.from(l.blob);
  blob[f1.compressedOffset + 20] ^= 0x55; // the middle chunk of the file's span is corrupt
  const { reader, source } = open({ ...l, blob }, { prefetchParallel: { concurrency: 2, chunkBytes: 1 << 20 } });
  const handed: Array<{ offset: number; bytes: Buffer; cached: boolean }> = [];
  await assert.rejects(
    reader.prefetchChunks([f0, f1, f2, small], undefined, (offset, bytes) => handed.push({ offset, bytes: Buffer.from(bytes), cached: reader.stats.prefetchedChunks > 0 })),
    (err: unknown) => err instanceof VerificationError || err instanceof EstargzFormatError,
  );
  assert.equal(source.reads.length, 2, 'the file span and the small file, one request each');
  // Held for the background pass, the corrupt span would fail the layer's chainID check: it is not handed on.
  assert.deepEqual(
    handed.map((h) => [h.offset, h.bytes.length]),
    [[small.compressedOffset, small.compressedEnd - small.compressedOffset]],
  );
  assert.ok(handed[0]?.bytes.equals(l.blob.subarray(small.compressedOffset, small.compressedEnd)));
  assert.ok(handed[0]?.cached, 'handed on after its chunk was decoded and cached');
});
