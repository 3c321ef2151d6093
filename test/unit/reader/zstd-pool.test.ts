import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, test } from 'node:test';

import { compress } from '@bokuweb/zstd-wasm';

import { EstargzFormatError } from '../../../src/errors';
import { INLINE_MAX_BYTES, ZstdPool } from '../../../src/reader/zstd-pool';
import { ZstdDiffHasher, zstdRange, zstdReady } from '../../../src/estargz/zstd-range';
import { createHash } from 'node:crypto';

const MIB = 1024 * 1024;
const pool = new ZstdPool(2);
after(() => pool.close());

/** Compressible but not trivial: what a binary chunk looks like to zstd. */
function content(size: number): Buffer {
  const out = Buffer.alloc(size);
  const block = randomBytes(4096);
  for (let i = 0; i < size; i += 4096) {
    block.copy(out, i, 0, Math.min(4096, size - i));
    block[i % 4096] ^= 0x5a;
  }
  return out;
}

test('a big member decodes in a worker to the same bytes as inline, also from a view into a bigger buffer', async () => {
  await zstdReady();
  const data = content(4 * MIB);
  const frame = Buffer.from(compress(data, 3));
  const around = Buffer.concat([randomBytes(100), frame, randomBytes(100)]);
  const member = around.subarray(100, 100 + frame.length);
  const [a, b] = await Promise.all([pool.range(member, 0, data.length), pool.range(member, 1000, 2 * MIB)]);
  assert.ok(a.equals(data));
  assert.ok(b.equals(data.subarray(1000, 1000 + 2 * MIB)));
  assert.ok(around.subarray(100, 100 + frame.length).equals(frame), 'the caller keeps its buffer');
  assert.ok((await zstdRange(member, 0, data.length)).equals(a));
});

test('small members are decoded inline', async () => {
  const data = content(INLINE_MAX_BYTES);
  assert.ok((await pool.range(Buffer.from(compress(data, 3)), 0, data.length)).equals(data));
});

test('a corrupt member is an EstargzFormatError from the worker too', async () => {
  const data = content(MIB);
  const frame = Buffer.from(compress(data, 3));
  frame.writeUInt32LE(0x12345678, 0); // no zstd magic
  await assert.rejects(pool.range(frame, 0, data.length), EstargzFormatError);
  // The worker survives a bad member.
  const good = Buffer.from(compress(data, 3));
  assert.ok((await pool.range(good, 0, data.length)).equals(data));
});

test('decoding 4 MiB chunks does not hold up the main thread', async () => {
  const data = content(4 * MIB);
  const frame = Buffer.from(compress(data, 3));
  await pool.range(frame, 0, data.length); // workers started and their wasm loaded
  // Event-loop turns while the decodes run: inline, a decode is one synchronous block (a FUSE callback
  // waits behind all of it); in the pool the loop keeps turning.
  const turnsDuring = async (work: Promise<unknown>): Promise<number> => {
    let turns = 0;
    let done = false;
    const spin = (): void => {
      turns++;
      if (!done) setImmediate(spin);
    };
    setImmediate(spin);
    await work;
    done = true;
    return turns;
  };
  const pooled = await turnsDuring(Promise.all(Array.from({ length: 4 }, () => pool.range(frame, 0, data.length))));
  const inline = await turnsDuring(Promise.all(Array.from({ length: 4 }, () => zstdRange(frame, 0, data.length))));
  assert.ok(inline <= 8, `inline: ${inline} turns`);
  assert.ok(pooled > 50, `pool: only ${pooled} event-loop turns during four 4 MiB decodes`);
});

test('the diff_id hasher can decode its frames in the pool', async () => {
  const a = content(2 * MIB);
  const b = content(MIB);
  const blob = Buffer.concat([Buffer.from(compress(a, 3)), Buffer.from(compress(b, 3))]);
  const hasher = new ZstdDiffHasher(undefined, (frame, maxOutput) => pool.all(frame, maxOutput));
  for (let i = 0; i < blob.length; i += 100_000) await hasher.write(blob.subarray(i, i + 100_000));
  assert.equal(hasher.digest(), 'sha256:' + createHash('sha256').update(a).update(b).digest('hex'));
});
