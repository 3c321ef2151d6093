/** The profile's prefetched bytes held for the background pass: gaps fetched, held bytes copied, then let go. */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { HeldBudget, HeldRanges } from '../../../src/layer/held-ranges';
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

test('layers share one budget: a span past it is not held, and what a layer lets go returns to it', async () => {
  const budget = new HeldBudget(40);
  const a = new HeldRanges(1000, budget);
  const b = new HeldRanges(1000, budget);
  assert.equal(a.add(0, span(0, 20)), true);
  assert.equal(b.add(0, span(0, 15)), true);
  assert.equal(budget.bytes, 35);
  assert.equal(b.add(50, span(50, 60)), false, 'past the budget, though within the own bound of its layer');
  assert.equal(a.add(40, span(40, 45)), true, 'what still fits is held');
  assert.equal(budget.bytes, 40);
  assert.equal(a.add(30, span(30, 31)), false);
  const fetch = (gaps: readonly ByteRange[]): Promise<Buffer[]> => Promise.resolve(gaps.map((g) => span(g.offset, g.offset + g.length)));
  // b's background pass consumes its span: the bytes go back to the budget.
  assert.deepEqual(await b.read(0, 30, fetch), blob.subarray(0, 30));
  assert.equal(budget.bytes, 25);
  assert.equal(b.add(50, span(50, 60)), true, 'room again');
  b.clear(); // its layer closed
  a.clear(); // a local copy made a's bytes moot
  assert.equal(budget.bytes, 0);
  assert.equal(a.bytes + b.bytes, 0);
});

test('many spans cost no quadratic work: adds out of order and windows that let go of a few at a time', async () => {
  // A profile at max_chunks holds about 16,384 spans; all of this runs on the FUSE server's main thread.
  const n = 16_384;
  const held = new HeldRanges(n * 10);
  const order = Array.from({ length: n }, (_, i) => (i * 7919) % n); // every span once, scattered
  let started = performance.now();
  for (const i of order) assert.equal(held.add(i * 20, Buffer.alloc(10, i & 0xff)), true);
  assert.equal(held.add(5 * 20 + 5, Buffer.alloc(10)), false, 'still refuses an overlap');
  const addMs = performance.now() - started;
  const fetch = (gaps: readonly ByteRange[]): Promise<Buffer[]> => Promise.resolve(gaps.map((g) => Buffer.alloc(g.length)));
  started = performance.now();
  for (let w = 0; w < 64; w++) {
    const out = await held.read(w * 40, 40, fetch); // two spans a window
    assert.equal(out[0], (2 * w) & 0xff);
    assert.equal(out[20], (2 * w + 1) & 0xff);
  }
  const readMs = performance.now() - started;
  assert.equal(held.bytes, (n - 128) * 10);
  // Both take milliseconds; scanning and sorting per add, or `includes` per let-go span, took seconds.
  assert.ok(addMs < 500, `adds took ${addMs.toFixed(0)} ms`);
  assert.ok(readMs < 500, `windows took ${readMs.toFixed(0)} ms`);
});
