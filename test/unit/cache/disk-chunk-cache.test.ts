import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtemp, mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { BLOCK_BYTES } from '../../../src/cache/disk-budget';
import { DiskChunkCache } from '../../../src/cache/disk-chunk-cache';
import { log } from '../../../src/log';

const run = promisify(execFile);
const quiet = log.child({ test: 'disk-chunk-cache' });
quiet.level = 'silent';

function chunk(seed: string, size: number): { digest: string; data: Buffer } {
  const data = Buffer.alloc(size, seed);
  return { digest: 'sha256:' + createHash('sha256').update(data).digest('hex'), data };
}

async function tmpDir(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-cache-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

test('stores chunks by digest and finds them again after a reopen', async (t) => {
  const dir = await tmpDir(t);
  const a = chunk('a', 1000);
  let cache = await DiskChunkCache.open({ dir, maxBytes: 1 << 20, log: quiet });
  assert.equal(await cache.get(a.digest), undefined);
  await cache.put(a.digest, a.data);
  assert.deepEqual(await cache.get(a.digest), a.data);
  await cache.put(a.digest, a.data); // stored once
  assert.equal(cache.usedBytes, 1000);

  cache = await DiskChunkCache.open({ dir, maxBytes: 1 << 20, log: quiet });
  assert.ok(cache.has(a.digest));
  assert.deepEqual(await cache.get(a.digest), a.data);
  assert.equal(cache.stats.hits, 1);
});

test('a corrupted file is dropped and reported as a miss, never served', async (t) => {
  const dir = await tmpDir(t);
  const a = chunk('a', 4096);
  const cache = await DiskChunkCache.open({ dir, maxBytes: 1 << 20, log: quiet });
  await cache.put(a.digest, a.data);
  const hex = a.digest.slice('sha256:'.length);
  await writeFile(path.join(dir, hex.slice(0, 2), hex), Buffer.alloc(4096, 'b'));
  assert.equal(await cache.get(a.digest), undefined);
  assert.equal(cache.stats.corrupt, 1);
  assert.equal(cache.has(a.digest), false);
  assert.deepEqual(await readdir(path.join(dir, hex.slice(0, 2))), []);
});

test('a file cut short or grown is dropped as corrupt, never served', async (t) => {
  const dir = await tmpDir(t);
  const a = chunk('a', 4096);
  const b = chunk('b', 4096);
  const cache = await DiskChunkCache.open({ dir, maxBytes: 1 << 20, log: quiet });
  await cache.put(a.digest, a.data);
  await cache.put(b.digest, b.data);
  const file = (d: string): string => path.join(dir, d.slice(7, 9), d.slice(7));
  await writeFile(file(a.digest), a.data.subarray(0, 100));
  await writeFile(file(b.digest), Buffer.concat([b.data, Buffer.from('x')]));
  assert.equal(await cache.get(a.digest), undefined);
  assert.equal(await cache.get(b.digest), undefined);
  assert.equal(cache.stats.corrupt, 2);
  assert.ok(!cache.has(a.digest) && !cache.has(b.digest));
  assert.deepEqual(await readdir(path.dirname(file(a.digest))).catch(() => []), []);
});

test('stays under its byte cap, evicting the least recently used', async (t) => {
  const dir = await tmpDir(t);
  // Without a shared budget the cache makes its own, which charges whole blocks as every budget does.
  const cache = await DiskChunkCache.open({ dir, maxBytes: 3 * BLOCK_BYTES, log: quiet });
  const [a, b, c, d] = ['a', 'b', 'c', 'd'].map((s) => chunk(s, BLOCK_BYTES));
  await cache.put(a!.digest, a!.data);
  await cache.put(b!.digest, b!.data);
  await cache.put(c!.digest, c!.data);
  assert.ok(await cache.get(a!.digest)); // a is now more recent than b
  await cache.put(d!.digest, d!.data);
  assert.ok(cache.usedBytes <= 3 * BLOCK_BYTES);
  assert.equal(cache.has(b!.digest), false, 'b was least recently used');
  assert.ok(cache.has(a!.digest) && cache.has(c!.digest) && cache.has(d!.digest));
  assert.equal(cache.stats.evictions, 1);
  // the evicted file is removed from disk
  await new Promise((r) => setTimeout(r, 50));
  const files = (await Promise.all((await readdir(dir)).map((s) => readdir(path.join(dir, s))))).flat();
  assert.equal(files.length, 3);
});

test('leftover temp files and stray names are removed at open', async (t) => {
  const dir = await tmpDir(t);
  await mkdir(path.join(dir, 'ab'), { recursive: true });
  await writeFile(path.join(dir, '.tmp-123'), 'partial');
  await writeFile(path.join(dir, 'ab', 'not-a-digest'), 'x');
  const cache = await DiskChunkCache.open({ dir, maxBytes: 1 << 20, log: quiet });
  assert.equal(cache.usedBytes, 0);
  assert.deepEqual((await readdir(dir)).sort(), ['ab']);
  assert.deepEqual(await readdir(path.join(dir, 'ab')), []);
});

test('a full disk degrades to no caching without failing', { skip: process.getuid?.() !== 0 && 'needs root to mount a tmpfs' }, async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-cache-'));
  // A real small filesystem that fills up: the fault a disk cache must survive.
  await run('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', dir]);
  t.after(async () => {
    await run('umount', [dir]);
    await rm(dir, { recursive: true, force: true });
  });
  const cache = await DiskChunkCache.open({ dir, maxBytes: 1 << 20, log: quiet });
  const big = chunk('z', 200_000);
  await cache.put(big.digest, big.data);
  assert.equal(cache.has(big.digest), false);
  assert.equal(cache.stats.writeErrors, 1);
  assert.deepEqual((await readdir(dir)).filter((n) => n.startsWith('.tmp-')), [], 'no temp file left');
  const small = chunk('s', 1000);
  await cache.put(small.digest, small.data);
  assert.deepEqual(await cache.get(small.digest), small.data);
});

test('a file whose size differs from what the TOC says is dropped before it is read', async (t) => {
  const dir = await tmpDir(t);
  const a = chunk('a', 4096);
  const cache = await DiskChunkCache.open({ dir, maxBytes: 1 << 20, log: quiet });
  await cache.put(a.digest, a.data);
  assert.equal(await cache.get(a.digest, 4095), undefined);
  assert.equal(cache.stats.corrupt, 1);
  assert.equal(cache.has(a.digest), false);
  const hex = a.digest.slice('sha256:'.length);
  assert.deepEqual(await readdir(path.join(dir, hex.slice(0, 2))), []);
});

test('a file bigger than a lowered cap is deleted, not left on disk uncounted', async (t) => {
  const dir = await tmpDir(t);
  const big = chunk('a', 8192);
  let cache = await DiskChunkCache.open({ dir, maxBytes: 1 << 20, log: quiet });
  await cache.put(big.digest, big.data);
  const restored: string[] = [];
  const budget = { restore: (entries: { key: string }[]) => restored.push(...entries.map((e) => e.key)) };
  cache = await DiskChunkCache.open({ dir, maxBytes: 4096, log: quiet, budget: budget as never });
  assert.equal(cache.has(big.digest), false);
  assert.deepEqual(restored, []);
  const hex = big.digest.slice('sha256:'.length);
  assert.deepEqual(await readdir(path.join(dir, hex.slice(0, 2))), []);
});
