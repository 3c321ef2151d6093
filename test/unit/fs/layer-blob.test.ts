import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { BlobSource } from '../../../src/remote/blob-source';
import { LayerBlob, tailBytesFor, withTail } from '../../../src/fs/layer-blob';

/** A blob in memory that records the ranges asked for. */
function memoryBlob(size: number): BlobSource & { data: Buffer; reads: Array<[number, number]> } {
  const data = randomBytes(size);
  const reads: Array<[number, number]> = [];
  return {
    digest: `sha256:${'0'.repeat(64)}`,
    size,
    data,
    reads,
    async readRange(offset: number, length: number) {
      reads.push([offset, length]);
      assert.ok(offset >= 0 && offset + length <= size, `range ${offset}+${length} outside the blob`);
      return Buffer.from(data.subarray(offset, offset + length));
    },
  };
}

test('withTail: footer and a TOC inside the tail cost one read', async () => {
  const blob = memoryBlob(10 * 1024 * 1024);
  const t = withTail(blob);
  const tail = tailBytesFor(blob.size);
  assert.ok(tail >= 64 * 1024 && tail <= 512 * 1024);
  const footer = await t.readRange(blob.size - 51, 51);
  const toc = await t.readRange(blob.size - 20_000, 20_000 - 51);
  assert.deepEqual(footer, blob.data.subarray(blob.size - 51));
  assert.deepEqual(toc, blob.data.subarray(blob.size - 20_000, blob.size - 51));
  assert.deepEqual(blob.reads, [[blob.size - tail, tail]]);
});

test('withTail: a TOC larger than the tail reads only what the tail lacks', async () => {
  const blob = memoryBlob(1024 * 1024);
  const t = withTail(blob, 1000);
  await t.readRange(blob.size - 51, 51);
  const toc = await t.readRange(blob.size - 5000, 5000 - 51);
  assert.deepEqual(toc, blob.data.subarray(blob.size - 5000, blob.size - 51));
  assert.deepEqual(blob.reads, [
    [blob.size - 1000, 1000],
    [blob.size - 5000, 4000],
  ]);
});

test('withTail: a blob smaller than the tail is read whole', async () => {
  const blob = memoryBlob(700);
  const t = withTail(blob);
  assert.deepEqual(await t.readRange(649, 51), blob.data.subarray(649));
  assert.deepEqual(blob.reads, [[0, 700]]);
});

test('LayerBlob: the prefetched head serves background fetch until released', async () => {
  const blob = memoryBlob(100_000);
  const lb = new LayerBlob(blob, { chunkBytes: 0, concurrency: 1, retainHead: true });
  await lb.readRange(0, 40_000); // prefetch
  assert.equal(lb.retainedBytes, 40_000);
  assert.deepEqual(await lb.readRange(0, 16_000), blob.data.subarray(0, 16_000));
  assert.deepEqual(await lb.readRange(32_000, 16_000), blob.data.subarray(32_000, 48_000)); // straddles the head
  assert.deepEqual(await lb.readRanges([{ offset: 100, length: 10 }, { offset: 5, length: 3 }]), [blob.data.subarray(100, 110), blob.data.subarray(5, 8)]);
  assert.deepEqual(blob.reads, [
    [0, 40_000],
    [40_000, 8_000],
  ]);
  lb.release();
  assert.equal(lb.retainedBytes, 0);
  await lb.readRange(0, 10);
  assert.equal(lb.retainedBytes, 0, 'nothing is kept after release');
  assert.equal(blob.reads.length, 3);
});

test('LayerBlob: without retainHead nothing is kept', async () => {
  const blob = memoryBlob(10_000);
  const lb = new LayerBlob(blob, { chunkBytes: 0, concurrency: 1, retainHead: false });
  await lb.readRange(0, 5_000);
  await lb.readRange(0, 5_000);
  assert.equal(blob.reads.length, 2);
});

test('LayerBlob: a long range is read as parallel chunks, in order', async () => {
  const blob = memoryBlob(100_000);
  const lb = new LayerBlob(blob, { chunkBytes: 10_000, concurrency: 3, retainHead: false });
  assert.deepEqual(await lb.readRange(5, 45_000), blob.data.subarray(5, 45_005));
  assert.equal(blob.reads.length, 5);
  assert.deepEqual(await lb.readRange(5, 15_000), blob.data.subarray(5, 15_005));
  assert.equal(blob.reads.length, 6, 'shorter than two chunks: one request');
});
