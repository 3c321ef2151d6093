/** How a profile's chunks become range requests: touching members share one, gaps are never filled. */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import type { ChunkInfo } from '../../../src/metadata/layer-tree';
import { memberSpans } from '../../../src/reader/chunk-reader';

const member = (from: number, to: number): ChunkInfo => ({ fileOffset: 0, size: 1, compressedOffset: from, compressedEnd: to, innerOffset: 0, digest: undefined });

test('touching members share a request, gaps split them, and requests go in profile order', () => {
  const a = member(300, 400);
  const b = member(100, 200);
  const c = member(200, 300); // touches b and a
  const d = member(500, 600); // a gap of 100 before it
  const e = member(0, 50);
  const spans = memberSpans([d, a, b, e, c], 1000);
  assert.deepEqual(
    spans.map((s) => [s.offset, s.end, s.chunks.length]),
    [
      [500, 600, 1],
      [100, 400, 3],
      [0, 50, 1],
    ],
  );
});

test('a request stays within the part size; a bigger member is one of its own', () => {
  const spans = memberSpans([member(0, 100), member(100, 200), member(200, 300), member(300, 1000)], 200);
  assert.deepEqual(
    spans.map((s) => [s.offset, s.end]),
    [
      [0, 200],
      [200, 300],
      [300, 1000],
    ],
  );
});
