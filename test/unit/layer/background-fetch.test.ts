import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { backgroundFetch, chainIdOf, checkChainId } from '../../../src/layer/background-fetch';
import { readToc } from '../../../src/estargz/toc';
import { buildLayerTree } from '../../../src/metadata/layer-tree';
import { inflateRange } from '../../../src/reader/inflate-range';
import { BufferBlobSource } from '../../../src/remote/blob-source';
import { makeTar, sha256, toEstargz } from '../estargz/fixture';

async function layer(): Promise<{ blob: BufferBlobSource; diffId: string; files: Map<string, Buffer> }> {
  const files = new Map<string, Buffer>([
    ['a.txt', Buffer.from('alpha\n')],
    ['big.bin', Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7919) % 251))],
    ['dir/b.txt', Buffer.from('beta\n')],
  ]);
  const tar = await makeTar([
    { name: 'dir/', type: 'directory' },
    ...[...files].map(([name, content]) => ({ name, content })),
  ]);
  const { blob, result } = await toEstargz(tar, { chunkSizeBytes: 64 * 1024 });
  return { blob: new BufferBlobSource(sha256(blob), blob), diffId: result.diffId, files };
}

test('one pass hands over every chunk member and computes the diff_id', async () => {
  const { blob, diffId } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const tree = buildLayerTree(toc, { blobSize: blob.size, tocOffset });
  const chunks = tree.chunksInBlobOrder();
  assert.ok(chunks.length > 4, 'the big file spans several chunks');
  const seen = new Set<string>();
  const result = await backgroundFetch({
    blob,
    chunks,
    windowBytes: 10_000, // smaller than a member: members must be assembled across windows
    isCached: () => false,
    isBusy: () => false,
    async onMember(c, member) {
      const data = await inflateRange(member, c.innerOffset, c.size);
      assert.equal(sha256(data), c.digest, `chunk at ${c.compressedOffset} verifies`);
      seen.add(`${c.compressedOffset}:${c.innerOffset}`);
    },
  });
  assert.equal(result.diffId, diffId);
  assert.equal(seen.size, chunks.length);
  assert.equal(result.fetchedBytes, blob.size);
});

test('skips cached chunks and waits while on-demand reads are busy', async () => {
  const { blob } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const chunks = buildLayerTree(toc, { blobSize: blob.size, tocOffset }).chunksInBlobOrder();
  let busyPolls = 0;
  let handed = 0;
  const result = await backgroundFetch({
    blob,
    chunks,
    isCached: (c) => c.compressedOffset === chunks[0]!.compressedOffset,
    isBusy: () => busyPolls++ < 3,
    async onMember() {
      handed++;
    },
  });
  assert.ok(busyPolls >= 3, 'polled while busy');
  assert.equal(handed, chunks.length - 1);
  assert.equal(result.cachedChunks, chunks.length - 1);
});

test('chainID check: base layer, child layer, and a mismatch', () => {
  const diff = 'sha256:' + 'a'.repeat(64);
  assert.equal(chainIdOf(undefined, diff), diff);
  const parent = 'sha256:' + 'b'.repeat(64);
  const child = 'sha256:' + createHash('sha256').update(`${parent} ${diff}`).digest('hex');
  assert.equal(chainIdOf(parent, diff), child);
  checkChainId(child, parent, diff);
  assert.throws(() => checkChainId(child, undefined, diff), /committed as/);
});

test('aborts when asked', async () => {
  const { blob } = await layer();
  const { toc, tocOffset } = await readToc(blob);
  const chunks = buildLayerTree(toc, { blobSize: blob.size, tocOffset }).chunksInBlobOrder();
  const controller = new AbortController();
  controller.abort();
  await assert.rejects(
    backgroundFetch({ blob, chunks, isCached: () => false, isBusy: () => false, onMember: async () => undefined, signal: controller.signal }),
    /abort/i,
  );
});
