import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { gzipDiff, hashGzipHead } from '../../../src/layer/diff-hash';

const a = Buffer.from('first member '.repeat(100));
const b = Buffer.from('second member '.repeat(100));
const sha = (d: Buffer): string => 'sha256:' + createHash('sha256').update(d).digest('hex');

test('the diff of concatenated gzip members is the sha256 of their joined contents', async () => {
  const diff = gzipDiff();
  await diff.write(Buffer.concat([gzipSync(a), gzipSync(b)]));
  assert.equal(await diff.end(), sha(Buffer.concat([a, b])));
});

test('a head hashed apart and the rest continued give the same diff', async () => {
  const resume = await hashGzipHead(gzipSync(a));
  const diff = gzipDiff(resume.hash);
  await diff.write(gzipSync(b));
  assert.equal(await diff.end(), sha(Buffer.concat([a, b])));
});

test('bytes after a member that gunzip would quietly ignore (a zero byte, then more) fail the diff', async () => {
  // Without the check, this hashed to sha(a): the forged member after the zero byte went unhashed.
  const forged = Buffer.concat([gzipSync(a), Buffer.from([0]), gzipSync(Buffer.from('forged'))]);
  const diff = gzipDiff();
  await diff.write(forged);
  await assert.rejects(diff.end(), /gzip stream ends after/);
  await assert.rejects(hashGzipHead(forged), /gzip stream ends after/);
});

test('writes after the stream ended early reject instead of waiting forever for drain', async () => {
  const diff = gzipDiff();
  await diff.write(Buffer.concat([gzipSync(a), Buffer.from([0])]));
  const big = Buffer.alloc(8 * 1024 * 1024, 1);
  const outcome = await Promise.race([
    (async () => {
      for (let i = 0; i < 8; i++) await diff.write(big);
      return diff.end().then(() => 'ended', () => 'rejected');
    })().catch(() => 'rejected'),
    new Promise((r) => setTimeout(() => r('hung'), 5000).unref()),
  ]);
  assert.equal(outcome, 'rejected');
});
