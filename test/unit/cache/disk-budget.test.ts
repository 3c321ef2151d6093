import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { BLOCK_BYTES, DiskBudget } from '../../../src/cache/disk-budget';
import { openDiskCaches } from '../../../src/cache/disk-caches';
import { DiskChunkCache } from '../../../src/cache/disk-chunk-cache';
import { untrackedBytes } from '../../../src/cache/root-usage';
import { TocCache } from '../../../src/cache/toc-cache';
import { log } from '../../../src/log';

const run = promisify(execFile);
const quiet = log.child({ test: 'disk-budget' });
quiet.level = 'silent';
const KiB = 1024;

const sha = (b: Buffer | string): string => 'sha256:' + createHash('sha256').update(b).digest('hex');

function chunk(seed: string, size: number): { digest: string; data: Buffer } {
  const data = Buffer.alloc(size, seed);
  return { digest: sha(data), data };
}

/** A TOC of about `size` bytes (the file adds a line of metadata). */
function toc(seed: string, size: number): { layer: string; tocJson: Buffer } {
  return { layer: sha(`layer ${seed}`), tocJson: Buffer.from(`{"version":1,"entries":[],"pad":"${seed.repeat(size)}"}`) };
}

async function tmpDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-budget-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Eviction unlinks files asynchronously: polls until `done` holds (or 5 s pass, and the assertions after it tell). */
async function settled(done: () => boolean | Promise<boolean>): Promise<void> {
  for (let waited = 0; !(await done()) && waited < 5_000; waited += 20) await new Promise((r) => setTimeout(r, 20));
}

const tocFiles = async (dir: string): Promise<string[]> => (await readdir(dir).catch(() => [] as string[])).filter((n) => n.endsWith('.toc'));

test('budget: one LRU over every account, pinned entries skipped, untracked and reserved bytes counted', () => {
  const budget = new DiskBudget(4 * BLOCK_BYTES);
  const evicted: string[] = [];
  const a = budget.account('a');
  const b = budget.account('b');
  a.add('1', 100, () => evicted.push('a1')); // charged one block
  b.add('1', BLOCK_BYTES + 1, () => evicted.push('b1')); // two blocks
  a.add('2', BLOCK_BYTES, () => evicted.push('a2'));
  assert.equal(budget.usedBytes, 4 * BLOCK_BYTES);
  a.touch('1'); // now b1 is the oldest
  b.pin('1');
  const release = a.reserve(1, 'temp')!;
  assert.deepEqual(evicted, ['a2'], 'the oldest unpinned entry goes first; the pinned one stays');
  release();
  release(); // idempotent
  assert.equal(budget.usedBytes, 3 * BLOCK_BYTES);
  budget.setUntrackedBytes(2 * BLOCK_BYTES);
  assert.deepEqual(evicted, ['a2', 'a1'], 'untracked bytes make the caches shrink');
  assert.equal(budget.usedBytes, 4 * BLOCK_BYTES);
  b.unpin('1');
  budget.setUntrackedBytes(3 * BLOCK_BYTES);
  assert.deepEqual(evicted, ['a2', 'a1', 'b1']);
  assert.deepEqual(budget.stats.evictions, { a: 2, b: 1 });
  a.remove('nothing'); // unknown keys are fine
});

test('budget: a reservation no eviction can make room for is refused, unless its entry is pinned', () => {
  const budget = new DiskBudget(4 * BLOCK_BYTES);
  const evicted: string[] = [];
  const a = budget.account('a');
  a.add('old', BLOCK_BYTES, () => evicted.push('old'));
  a.add('mounted', BLOCK_BYTES, () => evicted.push('mounted'));
  a.pin('mounted');
  budget.setUntrackedBytes(2 * BLOCK_BYTES);
  const release = a.reserve(BLOCK_BYTES, 'new');
  assert.ok(release, 'room once the old entry goes');
  assert.deepEqual(evicted, ['old']);
  assert.equal(a.reserve(1, 'another'), undefined, 'untracked, reserved and pinned bytes fill the cap');
  const pinned = a.reserve(BLOCK_BYTES, 'mounted');
  assert.ok(pinned, 'a pinned entry is never evicted once added, so writing it is not wasted');
  pinned();
  release();
  budget.setUntrackedBytes(5 * BLOCK_BYTES); // the metadata db and logs alone are over the cap
  assert.equal(a.reserve(1, 'another'), undefined);
  assert.equal(budget.usedBytes, 6 * BLOCK_BYTES, 'a refused reservation counts nothing');
  assert.deepEqual(evicted, ['old'], 'a refusal evicts nothing');
  assert.deepEqual(budget.stats.refusals, { a: 2 });
});

test('untracked files alone over the cap: chunks and unmounted layers’ TOCs are not written, rather than written and evicted', async (t) => {
  const root = await tmpDir(t);
  const cacheDir = path.join(root, 'cache', 'chunks');
  const tocDir = path.join(root, 'cache', 'toc');
  const caches = await openDiskCaches({ cacheDir, maxBytes: 8 * BLOCK_BYTES, log: quiet });
  t.after(() => caches.close());
  await caches.counted;
  caches.budget.setUntrackedBytes(9 * BLOCK_BYTES);
  const c = chunk('c', BLOCK_BYTES);
  await caches.diskCache.put(c.digest, c.data); // never rejects
  assert.equal(caches.diskCache.has(c.digest), false);
  assert.equal(caches.diskCache.stats.refused, 1);
  assert.equal(caches.diskCache.stats.writeErrors, 0);
  assert.deepEqual(caches.budget.stats.evictions, {}, 'nothing was written only to be evicted');
  assert.deepEqual(await readdir(cacheDir), [], 'no chunk file, no temp file, not even its shard dir');
  const unmounted = toc('u', 100);
  const mounted = toc('m', 100);
  caches.tocCache.pin(mounted.layer);
  for (const x of [unmounted, mounted]) await caches.tocCache.save(x.layer, { blobSize: 10, tocOffset: 5, tocJson: x.tocJson });
  assert.deepEqual(await tocFiles(tocDir), [`${mounted.layer.slice(7)}.toc`], 'a mounted layer’s TOC is still kept for a restart');
  assert.deepEqual(caches.budget.stats.refusals, { chunk: 1, toc: 1 });

  // Once the untracked files shrink, chunks are cached again.
  caches.budget.setUntrackedBytes(BLOCK_BYTES);
  await caches.diskCache.put(c.digest, c.data);
  assert.deepEqual(await caches.diskCache.get(c.digest), c.data);
});

test('TOC cache entries count toward the cap and are evicted like chunks, except a mounted layer’s', async (t) => {
  const root = await tmpDir(t);
  const cacheDir = path.join(root, 'cache', 'chunks');
  const tocDir = path.join(root, 'cache', 'toc');
  // Room for 12 blocks: three TOCs of two blocks each and a few chunks.
  const caches = await openDiskCaches({ cacheDir, maxBytes: 12 * BLOCK_BYTES, log: quiet });
  t.after(() => caches.close());
  await caches.counted;
  const [t1, t2, t3] = ['1', '2', '3'].map((s) => toc(s, 6 * KiB));
  for (const x of [t1!, t2!, t3!]) await caches.tocCache.save(x.layer, { blobSize: 100_000, tocOffset: 90_000, tocJson: x.tocJson });
  assert.equal(caches.budget.bytesOf('toc'), 3 * 2 * BLOCK_BYTES, 'each TOC file is counted, in whole blocks');
  assert.equal((await tocFiles(tocDir)).length, 3);
  caches.tocCache.pin(t1!.layer); // mounted

  // 12 chunks of one block: past the cap, so the oldest entries go, the pinned TOC excepted.
  const chunks = 'abcdefghijkl'.split('').map((s) => chunk(s, BLOCK_BYTES));
  for (const c of chunks) await caches.diskCache.put(c.digest, c.data);
  await settled(async () => (await tocFiles(tocDir)).length <= 1);
  assert.ok(caches.budget.usedBytes <= 12 * BLOCK_BYTES, `within the cap (${caches.budget.usedBytes})`);
  const left = await tocFiles(tocDir);
  assert.deepEqual(left, [`${t1!.layer.slice(7)}.toc`], 'the unmounted layers’ TOCs were evicted; the mounted one stays');
  assert.equal(caches.budget.stats.evictions.toc, 2);
  assert.deepEqual(await caches.tocCache.load(t1!.layer, sha(t1!.tocJson)), { blobSize: 100_000, tocOffset: 90_000, tocJson: t1!.tocJson });
  assert.equal(await caches.tocCache.load(t2!.layer, sha(t2!.tocJson)), undefined, 'an evicted TOC is a miss (fetched again)');
  // The chunks kept are the most recent ones, and the chunk cache agrees with the budget.
  assert.equal(caches.diskCache.usedBytes, caches.budget.bytesOf('chunk'));
  assert.ok(caches.diskCache.has(chunks[11]!.digest) && !caches.diskCache.has(chunks[0]!.digest));

  // Unmounted, it becomes evictable like the rest (the load above made it more recent than every chunk).
  caches.tocCache.unpin(t1!.layer);
  for (const c of 'mnopqrstuvwx'.split('').map((s) => chunk(s, BLOCK_BYTES))) await caches.diskCache.put(c.digest, c.data);
  await settled(async () => (await tocFiles(tocDir)).length === 0);
  assert.deepEqual(await tocFiles(tocDir), []);
});

test('after a restart the budget recounts TOCs and chunks, and evicts the oldest by mtime first', async (t) => {
  const root = await tmpDir(t);
  const cacheDir = path.join(root, 'cache', 'chunks');
  const tocDir = path.join(root, 'cache', 'toc');
  {
    const chunks = await DiskChunkCache.open({ dir: cacheDir, maxBytes: 1 << 30, log: quiet });
    const tocs = new TocCache(tocDir);
    const old = toc('old', 100);
    const fresh = toc('fresh', 100);
    await tocs.save(old.layer, { blobSize: 10, tocOffset: 5, tocJson: old.tocJson });
    await tocs.save(fresh.layer, { blobSize: 10, tocOffset: 5, tocJson: fresh.tocJson });
    const c = chunk('c', 2 * BLOCK_BYTES);
    await chunks.put(c.digest, c.data);
    const hex = c.digest.slice(7);
    const day = 24 * 3600;
    const now = Date.now() / 1000;
    await utimes(path.join(tocDir, `${old.layer.slice(7)}.toc`), now - 3 * day, now - 3 * day);
    await utimes(path.join(cacheDir, hex.slice(0, 2), hex), now - 2 * day, now - 2 * day);
    await writeFile(path.join(tocDir, '.tmp-leftover'), 'partial');
  }
  // Reopened with a cap one block smaller than what is there: the 3-day-old TOC goes first.
  const caches = await openDiskCaches({ cacheDir, maxBytes: 3 * BLOCK_BYTES, log: quiet });
  t.after(() => caches.close());
  await caches.counted;
  await settled(async () => (await tocFiles(tocDir)).length <= 1);
  assert.equal(caches.budget.usedBytes, 3 * BLOCK_BYTES, 'two chunk blocks and the fresh TOC');
  assert.deepEqual(await tocFiles(tocDir), [`${toc('fresh', 100).layer.slice(7)}.toc`]);
  assert.ok(!(await readdir(tocDir)).includes('.tmp-leftover'), 'temp files of a crashed write are removed');
  assert.equal(caches.diskCache.usedBytes, 2 * BLOCK_BYTES);
});

test('untracked bytes: everything under the root but the snapshot dirs and the tracked caches’ files', async (t) => {
  const root = await tmpDir(t);
  await mkdir(path.join(root, 'snapshotter', 'snapshots', '1', 'fs'), { recursive: true });
  await writeFile(path.join(root, 'snapshotter', 'snapshots', '1', 'fs', 'upper.bin'), Buffer.alloc(64 * KiB));
  await writeFile(path.join(root, 'snapshotter', 'metadata.db'), Buffer.alloc(40 * KiB, 1));
  await mkdir(path.join(root, 'cache', 'chunks', 'ab'), { recursive: true });
  await writeFile(path.join(root, 'cache', 'chunks', 'ab', 'x'), Buffer.alloc(80 * KiB, 1));
  await mkdir(path.join(root, 'fuse'));
  await writeFile(path.join(root, 'fuse', 'fuse-server.log'), Buffer.alloc(20 * KiB, 1));
  const bytes = await untrackedBytes({
    root,
    excludeDirs: [path.join(root, 'snapshotter', 'snapshots')],
    trackedDirs: [path.join(root, 'cache', 'chunks')],
  });
  // The db and the log (60 KiB) plus the directories (root, snapshotter, cache, chunks, ab, fuse).
  assert.ok(bytes >= 60 * KiB, `db and log counted (${bytes})`);
  assert.ok(bytes < 60 * KiB + 64 * KiB, `neither the upper dir's file nor the tracked chunk (${bytes})`);
});

test('a failed TOC write releases its reservation and leaves no file', async (t) => {
  const root = await tmpDir(t);
  const budget = new DiskBudget(1 << 20);
  await writeFile(path.join(root, 'toc'), 'a file where the directory should be');
  const tocs = new TocCache(path.join(root, 'toc'), budget.account('toc'));
  const x = toc('x', 10);
  await tocs.save(x.layer, { blobSize: 10, tocOffset: 5, tocJson: x.tocJson }); // never rejects
  assert.equal(budget.usedBytes, 0);
  assert.equal(await tocs.load(x.layer, sha(x.tocJson)), undefined);
});

test('a full disk under the budget: writes fail soft, reservations are released, small writes still work', { skip: process.getuid?.() !== 0 && 'needs root to mount a tmpfs' }, async (t) => {
  const root = await mkdtemp(path.join(os.tmpdir(), 'stargaze-budget-full-'));
  // A real small filesystem that fills up, far below disk_max_bytes: the cap is not what stops the write.
  await run('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', root]);
  t.after(async () => {
    await run('umount', [root]);
    await rm(root, { recursive: true, force: true });
  });
  const caches = await openDiskCaches({ cacheDir: path.join(root, 'cache', 'chunks'), root, maxBytes: 1 << 20, log: quiet });
  t.after(() => caches.close());
  await caches.counted;
  const big = chunk('z', 200_000);
  await caches.diskCache.put(big.digest, big.data);
  assert.equal(caches.diskCache.has(big.digest), false);
  assert.equal(caches.diskCache.stats.writeErrors, 1);
  const bigToc = toc('z', 200_000);
  await caches.tocCache.save(bigToc.layer, { blobSize: 10, tocOffset: 5, tocJson: bigToc.tocJson });
  assert.equal(await caches.tocCache.load(bigToc.layer, sha(bigToc.tocJson)), undefined);
  assert.equal(caches.budget.bytesOf('chunk') + caches.budget.bytesOf('toc'), 0, 'failed writes are not counted');
  const small = chunk('s', 1000);
  await caches.diskCache.put(small.digest, small.data);
  assert.deepEqual(await caches.diskCache.get(small.digest), small.data);
  assert.equal(caches.budget.bytesOf('chunk'), BLOCK_BYTES);
});

test('with a root, untracked files (the metadata db) take their share and the caches shrink to fit', async (t) => {
  const root = await tmpDir(t);
  const cacheDir = path.join(root, 'cache', 'chunks');
  {
    const chunks = await DiskChunkCache.open({ dir: cacheDir, maxBytes: 1 << 30, log: quiet });
    for (const s of 'abcdefgh') {
      const c = chunk(s, 4 * BLOCK_BYTES);
      await chunks.put(c.digest, c.data);
    }
  }
  await mkdir(path.join(root, 'snapshotter', 'snapshots', '1', 'fs'), { recursive: true });
  await writeFile(path.join(root, 'snapshotter', 'snapshots', '1', 'fs', 'upper'), Buffer.alloc(256 * KiB, 1)); // not counted
  await writeFile(path.join(root, 'snapshotter', 'metadata.db'), Buffer.alloc(64 * KiB, 1));
  const cap = 48 * BLOCK_BYTES; // 192 KiB: the 128 KiB of chunks fit alone, not with the db and directories
  const caches = await openDiskCaches({ cacheDir, root, maxBytes: cap, log: quiet });
  t.after(() => caches.close());
  assert.equal(caches.diskCache.usedBytes, 8 * 4 * BLOCK_BYTES, 'the chunk index is there when open returns');
  await caches.counted;
  await settled(() => caches.diskCache.usedBytes < 8 * 4 * BLOCK_BYTES); // the first walk of the root runs in the background
  assert.ok(caches.budget.usedBytes <= cap, `within the cap (${caches.budget.usedBytes})`);
  assert.ok(caches.diskCache.usedBytes < 8 * 4 * BLOCK_BYTES, `chunks were evicted for the db (${caches.diskCache.usedBytes})`);
  assert.ok(caches.diskCache.usedBytes >= 4 * 4 * BLOCK_BYTES, `but not more than needed (${caches.diskCache.usedBytes})`);
});
