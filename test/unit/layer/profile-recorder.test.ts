/** The start window's recorder: first-read order, each chunk once, and the three ways the window ends. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

import { ProfileRecorder } from '../../../src/layer/profile-recorder';
import type { ChunkInfo } from '../../../src/metadata/layer-tree';
import type { ProfileEntry } from '../../../src/profile/profile-format';

/** A file of `n` chunks of 100 bytes. */
function chunksOf(n: number): ChunkInfo[] {
  return Array.from({ length: n }, (_, i) => ({ fileOffset: i * 100, size: 100, compressedOffset: i * 50, compressedEnd: i * 50 + 50, innerOffset: 0, digest: undefined }));
}

function recorder(opts: Partial<{ quietMs: number; maxWindowMs: number; maxChunks: number }> = {}): { rec: ProfileRecorder; windows: ProfileEntry[][] } {
  const windows: ProfileEntry[][] = [];
  const rec = new ProfileRecorder({ quietMs: 10_000, maxWindowMs: 60_000, maxChunks: 100, ...opts }, (e) => windows.push(e));
  return { rec, windows };
}

test('records the chunks each read touches, in first-read order, each once', () => {
  const a = chunksOf(4);
  const b = chunksOf(2);
  const { rec, windows } = recorder();
  rec.record('usr/a', a, 250, 100); // chunks 2 and 3
  rec.record('usr/b', b, 0, 10);
  rec.record('usr/a', a, 260, 10); // chunk 2 again
  rec.record('usr/a-link', a, 0, 1); // a hardlink's name: chunk 0 is new
  rec.record('usr/a', a, 0, 400); // nothing new
  rec.record('usr/a', a, 0, 0); // empty read
  assert.deepEqual(windows, []);
  rec.close();
  assert.deepEqual(windows, [
    [
      { name: 'usr/a', offset: 200 },
      { name: 'usr/a', offset: 300 },
      { name: 'usr/b', offset: 0 },
      { name: 'usr/a-link', offset: 0 },
      { name: 'usr/a', offset: 100 },
    ],
  ]);
  rec.record('usr/b', b, 100, 10);
  rec.close();
  assert.equal(windows.length, 1, 'nothing after the window closed, and it closes once');
});

test('the window closes once reads have been quiet, not while they go on', async () => {
  const a = chunksOf(10);
  const { rec, windows } = recorder({ quietMs: 60 });
  for (let i = 0; i < 5; i++) {
    rec.record('f', a, i * 100, 1);
    await new Promise((r) => setTimeout(r, 30));
  }
  assert.equal(windows.length, 0, 'reads 30 ms apart keep it open');
  await new Promise((r) => setTimeout(r, 120));
  assert.equal(windows.length, 1);
  assert.equal(windows[0]!.length, 5);
  assert.ok(rec.closed);
});

test('the window closes at its bound even while reads go on, and at max_chunks', async () => {
  const a = chunksOf(100);
  const { rec, windows } = recorder({ quietMs: 1000, maxWindowMs: 80 });
  for (let i = 0; i < 8; i++) {
    rec.record('f', a, i * 100, 1);
    await new Promise((r) => setTimeout(r, 20));
  }
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(windows.length, 1, 'closed after about 80 ms');
  assert.ok(windows[0]!.length < 8);

  const capped = recorder({ maxChunks: 3 });
  capped.rec.record('f', a, 0, 1000);
  assert.deepEqual(capped.windows.map((w) => w.length), [3]);
});

test('a window with no read closes with nothing to store', () => {
  const { rec, windows } = recorder();
  rec.close();
  assert.deepEqual(windows, []);
});

test('a closed window lets go of its entries: the recorder lives until unmount, the entries need not', async () => {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const a = chunksOf(1000);
  let handed: WeakRef<ProfileEntry[]> | undefined;
  const rec = new ProfileRecorder({ quietMs: 10_000, maxWindowMs: 60_000, maxChunks: 1000 }, (entries) => (handed = new WeakRef(entries)));
  rec.record('usr/lib/big', a, 0, 100_000);
  rec.close();
  assert.ok(handed?.deref()?.length === 1000);
  // The store has saved them and dropped them: only the recorder (kept by its layer) could still hold them.
  await new Promise((r) => setImmediate(r));
  gc();
  assert.equal(handed.deref(), undefined, 'the handed entries are garbage once their receiver is done with them');
  assert.ok(rec.closed);
});
