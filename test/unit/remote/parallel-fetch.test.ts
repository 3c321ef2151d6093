/** parallelRangeStream: how a blob is cut into requests, and the digest check (on by default). */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { BufferBlobSource } from '../../../src/remote/blob-source';
import { MIN_SPLIT_CHUNK_BYTES, parallelRangeStream, splitChunkBytes } from '../../../src/remote/parallel-fetch';

const MIB = 1024 * 1024;

async function drain(s: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const b of s) parts.push(b);
  return Buffer.concat(parts);
}

describe('parallel fetch', () => {
  it('splitChunkBytes: at least 4 chunks a connection, never above the configured size nor below 1 MiB', () => {
    // 150 MiB over 8 connections: 8 MiB chunks would leave a last round of 3 of 8 connections busy.
    assert.equal(splitChunkBytes(150 * MIB, 8, 8 * MIB), Math.ceil((150 * MIB) / 32));
    assert.equal(splitChunkBytes(150 * MIB, 16, 8 * MIB), Math.ceil((150 * MIB) / 64));
    assert.equal(splitChunkBytes(2 * 1024 * MIB, 8, 8 * MIB), 8 * MIB);
    assert.equal(splitChunkBytes(10 * MIB, 16, 8 * MIB), MIN_SPLIT_CHUNK_BYTES);
    assert.equal(splitChunkBytes(10 * MIB, 16, 128 * 1024), 128 * 1024);
  });

  it('cuts the blob as splitChunkBytes says, emits it in order, and checks the digest unless told not to', async () => {
    const bytes = randomBytes(6 * MIB + 123);
    const digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
    const asked: number[] = [];
    const source = new BufferBlobSource(digest, bytes);
    const counting = { digest, size: source.size, readRange: (o: number, l: number) => (asked.push(l), source.readRange(o, l)) };
    assert.deepEqual(await drain(parallelRangeStream(counting, { concurrency: 2, chunkBytes: 8 * MIB }, 'test')), bytes);
    assert.equal(asked.length, 7, 'ceil(6 MiB / (2 x 4)) is under 1 MiB: 1 MiB chunks');
    assert.ok(asked.every((l) => l <= MIB));

    const wrong = new BufferBlobSource(`sha256:${'0'.repeat(64)}`, bytes);
    await assert.rejects(drain(parallelRangeStream(wrong, { concurrency: 2, chunkBytes: MIB }, 'test')), /content has digest/);
    assert.deepEqual(await drain(parallelRangeStream(wrong, { concurrency: 2, chunkBytes: MIB, verifyDigest: false }, 'test')), bytes);
  });
});
