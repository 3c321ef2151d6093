import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { BlobSource } from '../../../src/remote/blob-source';
import { LayerBlob, tailBytesFor, withTail } from '../../../src/layer/layer-blob';
import { splitChunkBytes } from '../../../src/remote/parallel-fetch';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';
import { defaultConfig } from '../../../src/config/config';

/** The process's one scheduler, as the composition root makes it. */
const scheduler = new Scheduler(schedulerLimits(defaultConfig()));

/** A blob in memory that records the ranges asked for. */
function memoryBlob(size: number): BlobSource & { data: Buffer; reads: Array<[number, number]> } {
  const data = randomBytes(size);
  const reads: Array<[number, number]> = [];
  return {
    digest: `sha256:${'0'.repeat(64)}`,
    size,
    data,
    reads,
    readRange(offset: number, length: number) {
      reads.push([offset, length]);
      // Checked inside the promise: a range outside the blob rejects the read, as it would from a real blob.
      return Promise.resolve().then(() => {
        assert.ok(offset >= 0 && offset + length <= size, `range ${offset}+${length} outside the blob`);
        return Buffer.from(data.subarray(offset, offset + length));
      });
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

test('withTail: a tail that came with the resolve is used as is, and handed on', async () => {
  const blob = memoryBlob(1024 * 1024);
  const fetched = { offset: blob.size - 8000, data: Buffer.from(blob.data.subarray(blob.size - 8000)) };
  const t = withTail(blob, undefined, fetched);
  assert.deepEqual(await t.readRange(blob.size - 51, 51), blob.data.subarray(blob.size - 51));
  assert.deepEqual(blob.reads, [], 'no request for bytes the resolve brought');
  const toc = await t.readRange(blob.size - 9000, 9000 - 51);
  assert.deepEqual(toc, blob.data.subarray(blob.size - 9000, blob.size - 51));
  assert.deepEqual(blob.reads, [[blob.size - 9000, 1000]], 'only what lies before the tail');
  assert.deepEqual(await t.tail(), fetched);
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

test('LayerBlob: a long range is read as parallel chunks, in order', async () => {
  const blob = memoryBlob(100_000);
  const lb = new LayerBlob(blob, { chunkBytes: 10_000, concurrency: 3, scheduler });
  assert.deepEqual(await lb.readRange(5, 45_000), blob.data.subarray(5, 45_005));
  assert.equal(blob.reads.length, 5);
  assert.deepEqual(await lb.readRange(5, 15_000), blob.data.subarray(5, 15_005));
  assert.equal(blob.reads.length, 6, 'shorter than two chunks: one request');
});

test('LayerBlob: a long range is cut as a whole-blob fetch is, several requests a connection', async () => {
  const MiB = 1024 * 1024;
  const blob = memoryBlob(20 * MiB);
  const lb = new LayerBlob(blob, { chunkBytes: 8 * MiB, concurrency: 4, scheduler });
  assert.deepEqual(await lb.readRange(0, 20 * MiB), blob.data);
  // Two 8 MiB and a 4 MiB request would leave three of the four connections idle; splitChunkBytes says 16 x 1.25 MiB.
  const sizes = blob.reads.map(([, n]) => n);
  assert.deepEqual(sizes, Array.from({ length: 16 }, () => splitChunkBytes(20 * MiB, 4, 8 * MiB)));
  assert.equal(sizes[0], 1.25 * MiB);
});

test('LayerBlob: reads inside the tail read with the TOC come from memory', async () => {
  const blob = memoryBlob(100_000);
  const t = withTail(blob, 10_000);
  await t.readRange(100_000 - 51, 51);
  const tail = await t.tail();
  assert.deepEqual(tail?.offset, 90_000);
  const lb = new LayerBlob(blob, { chunkBytes: 0, concurrency: 1, tail, scheduler });
  blob.reads.length = 0;
  assert.deepEqual(await lb.readRange(92_000, 8_000), blob.data.subarray(92_000));
  assert.deepEqual(blob.reads, [], 'inside the tail: no request');
  assert.deepEqual(await lb.readRange(86_000, 8_000), blob.data.subarray(86_000, 94_000));
  assert.deepEqual(blob.reads, [[86_000, 4_000]], 'straddling: only the part before the tail');
  assert.deepEqual(await lb.readRange(0, 1_000), blob.data.subarray(0, 1_000));
});

test('LayerBlob: keeps the whole tail, the compressed TOC too (background fetch hashes it), and lets it go on releaseTail', async () => {
  const blob = memoryBlob(100_000);
  const t = withTail(blob, 10_000);
  await t.readRange(100_000 - 51, 51);
  const tail = await t.tail();
  const lb = new LayerBlob(blob, { chunkBytes: 0, concurrency: 1, tail, scheduler });
  assert.equal(lb.heldBytes, 10_000);
  blob.reads.length = 0;
  // background fetch's last window ends at the blob's end
  assert.deepEqual(await lb.readRange(86_000, 14_000), blob.data.subarray(86_000, 100_000));
  assert.deepEqual(blob.reads, [[86_000, 4_000]], 'only what lies before the tail is fetched');
  blob.reads.length = 0;
  lb.releaseTail();
  assert.equal(lb.heldBytes, 0);
  assert.deepEqual(await lb.readRange(90_000, 6_000), blob.data.subarray(90_000, 96_000));
  assert.deepEqual(blob.reads, [[90_000, 6_000]], 'released: fetched');
});

test('LayerBlob: a streamed read is one request however long, and takes what lies in the tail from memory', async () => {
  const blob = memoryBlob(100_000);
  const t = withTail(blob, 10_000);
  await t.readRange(100_000 - 51, 51);
  const lb = new LayerBlob(blob, { chunkBytes: 10_000, concurrency: 3, tail: await t.tail(), scheduler });
  const cases: Array<[number, number, Array<[number, number]>]> = [
    [0, 45_000, [[0, 45_000]]], // long enough to be split by readRange: still one request
    [92_000, 8_000, []], // inside the tail
    [86_000, 8_000, [[86_000, 4_000]]], // straddling: only the part before the tail
  ];
  for (const [offset, length, requests] of cases) {
    blob.reads.length = 0;
    const into = Buffer.alloc(length);
    const told: number[] = [];
    await lb.readRangeInto(offset, into, (n) => told.push(n));
    assert.deepEqual(into, blob.data.subarray(offset, offset + length), `${offset}+${length}`);
    assert.deepEqual(blob.reads, requests, `${offset}+${length}: requests`);
    assert.equal(told.at(-1), length);
  }
});
