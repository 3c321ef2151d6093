/** The profile's prefetched bytes held for the background pass: gaps fetched, held bytes copied, then let go. */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { HeldRanges } from '../../../src/layer/held-ranges';
import type { ByteRange } from '../../../src/remote/blob-source';

const blob = Buffer.from(Array.from({ length: 100 }, (_, i) => i));
const span = (from: number, to: number): Buffer => Buffer.from(blob.subarray(from, to));

test('a window is the held bytes plus the gaps, fetched in one call; spans behind the window are let go', async () => {
  const held = new HeldRanges(1000);
  assert.equal(held.add(10, span(10, 20)), true);
  assert.equal(held.add(30, span(30, 40)), true);
  assert.equal(held.add(35, span(35, 45)), false, 'overlaps a held span');
  assert.equal(held.add(60, span(60, 90)), true);
  const asked: ByteRange[][] = [];
  const fetch = (gaps: readonly ByteRange[]): Promise<Buffer[]> => {
    asked.push([...gaps]);
    return Promise.resolve(gaps.map((g) => span(g.offset, g.offset + g.length)));
  };
  assert.deepEqual(await held.read(0, 50, fetch), blob.subarray(0, 50));
  assert.deepEqual(asked, [[{ offset: 0, length: 10 }, { offset: 20, length: 10 }, { offset: 40, length: 10 }]]);
  assert.equal(held.bytes, 30, 'the two spans inside the window are let go; the one past it stays');
  assert.deepEqual(await held.read(50, 50, fetch), blob.subarray(50, 100));
  assert.deepEqual(asked[1], [{ offset: 50, length: 10 }, { offset: 90, length: 10 }]);
  assert.equal(held.bytes, 0);
  assert.deepEqual(await held.read(0, 10, fetch), blob.subarray(0, 10), 'nothing held: the whole window is fetched');
});

test('past its bound it holds nothing more', () => {
  const held = new HeldRanges(15);
  assert.equal(held.add(0, span(0, 10)), true);
  assert.equal(held.add(20, span(20, 30)), false);
  held.clear();
  assert.equal(held.bytes, 0);
});
