import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { TocCache } from '../../../src/cache/toc-cache';
import { DeferredBlobSource } from '../../../src/remote/deferred-blob-source';
import { BufferBlobSource, type BlobSource } from '../../../src/remote/blob-source';

const sha = (b: Buffer | string): string => 'sha256:' + createHash('sha256').update(b).digest('hex');

test('a cached TOC is returned only for the digest it hashes to', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-toc-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const cache = new TocCache(dir);
  const layer = sha('layer');
  const tocJson = Buffer.from('{"version":1,"entries":[]}');
  await cache.save(layer, { blobSize: 1000, tocOffset: 900, tocJson });
  assert.deepEqual(await cache.load(layer, sha(tocJson)), { blobSize: 1000, tocOffset: 900, tocJson });
  assert.equal(await cache.load(layer, sha('another toc')), undefined, 'a different expected digest is a miss');
  assert.equal(await cache.load(sha('other layer'), sha(tocJson)), undefined);
  // Tampered or truncated files are ignored, never trusted.
  const [file] = (await readdir(dir)).filter((n) => n.endsWith('.toc'));
  await writeFile(path.join(dir, file!), '{"blobSize":1000,"tocOffset":900}\n{"version":1,"entries":[{"name":"x"}]}');
  assert.equal(await cache.load(layer, sha(tocJson)), undefined);
  await writeFile(path.join(dir, file!), 'garbage');
  assert.equal(await cache.load(layer, sha(tocJson)), undefined);
});

test('a deferred blob resolves on first read, forgets failures, and checks the size', async () => {
  const bytes = Buffer.from('0123456789');
  let calls = 0;
  let failing = true;
  const deferred = new DeferredBlobSource(sha(bytes), bytes.length, (): Promise<BlobSource> => {
    calls++;
    return failing ? Promise.reject(new Error('registry unreachable')) : Promise.resolve(new BufferBlobSource(sha(bytes), bytes));
  });
  assert.equal(calls, 0, 'nothing resolved before a read');
  await assert.rejects(deferred.readRange(0, 4), /unreachable/);
  failing = false;
  assert.equal((await deferred.readRange(2, 3)).toString(), '234');
  assert.deepEqual((await deferred.readRanges([{ offset: 0, length: 1 }, { offset: 9, length: 1 }])).map(String), ['0', '9']);
  assert.equal(calls, 2, 'resolved once after the failure');

  const wrongSize = new DeferredBlobSource(sha(bytes), 99, () => Promise.resolve(new BufferBlobSource(sha(bytes), bytes)));
  await assert.rejects(wrongSize.readRange(0, 1), /not 99/);
});
