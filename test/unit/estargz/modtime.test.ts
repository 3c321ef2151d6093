import { test } from 'node:test';
import assert from 'node:assert/strict';
import { modtimeMs } from '../../../src/estargz/modtime';
import { parseToc } from '../../../src/estargz/toc';
import { buildLayerTree } from '../../../src/metadata/layer-tree';

test('modtimeMs: RFC 3339 to epoch ms, NaN for what is not a date, the same answer from the cache', () => {
  assert.equal(modtimeMs('2020-01-02T03:04:05Z'), Date.UTC(2020, 0, 2, 3, 4, 5));
  assert.equal(modtimeMs('2020-01-02T03:04:05Z'), Date.UTC(2020, 0, 2, 3, 4, 5));
  assert.ok(Number.isNaN(modtimeMs('yesterday')));
  assert.ok(Number.isNaN(modtimeMs('yesterday')), 'a bad string stays bad once cached');
  // Past the cache's bound it starts over; answers stay right.
  for (let s = 0; s < 5000; s++) assert.equal(modtimeMs(new Date(s * 1000).toISOString()), s * 1000);
  assert.equal(modtimeMs('2020-01-02T03:04:05Z'), Date.UTC(2020, 0, 2, 3, 4, 5));
});

test('the parser and the layer tree parse each modtime once, through the one cache', (t) => {
  const modtime = '2021-06-07T08:09:10Z';
  const json = Buffer.from(JSON.stringify({ version: 1, entries: [{ name: 'a/', type: 'dir', modtime }, { name: 'a/b/', type: 'dir', modtime }] }));
  const parse = t.mock.method(Date, 'parse');
  const toc = parseToc(json, { blobSize: 100, tocOffset: 50 });
  const tree = buildLayerTree(toc, { blobSize: 100, tocOffset: 50 });
  assert.equal(parse.mock.calls.filter((c) => c.arguments[0] === modtime).length, 1);
  for (const path of ['a', 'a/b']) assert.equal(tree.resolvePath(path)?.mtimeMs, Date.UTC(2021, 5, 7, 8, 9, 10));
});
