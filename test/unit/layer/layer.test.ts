/**
 * The layer's lifecycle without FUSE: Layers.open() takes labels to a VerifiedLayer, a TOC that fails its check
 * closes the layer (its prefetch stops), a layer opened ahead is claimed by its mount. The FUSE side is in
 * test/unit/fs/stargz-fs.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { defaultConfig } from '../../../src/config/config';
import { VerificationError } from '../../../src/errors';
import { Layers } from '../../../src/layer/layers';
import { layerOptionsFromConfig } from '../../../src/layer/layer-options';
import { QuietLink } from '../../../src/layer/quiet-link';
import { layerStatusJson, STATUS_FILE_BYTES } from '../../../src/layer/status-file';
import { log } from '../../../src/log';
import { FsMetrics } from '../../../src/metrics/fs-metrics';
import { BufferBlobSource, type BlobSource } from '../../../src/remote/blob-source';
import type { LayerSourceInfo } from '../../../src/source/labels';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';
import { prioritizedLayer, sha256 } from '../estargz/fixture';
import { until } from '../until';

const quiet = log.child({ test: 'layer' });
quiet.level = 'warn';

/** A blob whose head (the prefetch range) never arrives: each such read waits until its signal aborts. */
class StalledHeadBlob extends BufferBlobSource {
  readonly stalled: { aborted: boolean }[] = [];
  constructor(digest: string, blob: Buffer, private readonly stallsBefore: number) {
    super(digest, blob);
  }
  override async readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    if (offset >= this.stallsBefore) return super.readRange(offset, length);
    const read = { aborted: false };
    this.stalled.push(read);
    return new Promise<Buffer>((_resolve, reject) => {
      const abort = (): void => {
        read.aborted = true;
        reject(signal?.reason ?? new Error('aborted'));
      };
      if (signal?.aborted) abort();
      else signal?.addEventListener('abort', abort, { once: true });
    });
  }
}

function layersOver(blobs: Map<string, BlobSource>): Layers {
  const config = { ...defaultConfig(), noBackgroundFetch: true, copyFetchedLayers: false };
  return new Layers({
    registry: { resolveBlob: async (_ref, digest) => blobs.get(digest) ?? Promise.reject(new Error(`no blob ${digest}`)) },
    scheduler: new Scheduler(schedulerLimits(config)),
    options: layerOptionsFromConfig(config),
    metrics: new FsMetrics(() => [], () => undefined),
    log: quiet,
  });
}

function sourceOf(digest: string, tocDigest: string | undefined, layers: string[] = []): LayerSourceInfo {
  return { ref: 'registry.test/img:1', digest, chainId: 'sha256:chain', tocDigest, prefetchBytes: undefined, skipVerify: false, layers };
}

test('a layer serves only once its TOC passed: a verified layer has the tree and reader, and closing it stops its prefetch', async () => {
  const l = await prioritizedLayer(1);
  const blob = new StalledHeadBlob(l.digest, l.blob, 3 * 1024 * 1024);
  const layers = layersOver(new Map([[l.digest, blob]]));
  const layer = await layers.open(sourceOf(l.digest, l.tocDigest), quiet);
  assert.ok(layer.tree.resolvePath('app/later.txt'), 'the verified layer exposes its tree');
  await until('prefetch to be reading the head', () => blob.stalled.length > 0);
  await layer.close();
  await until('its prefetch to stop', () => blob.stalled.every((r) => r.aborted), 1000);
  assert.equal(await layer.prefetched, false);
  await layers.close();
});

test('a TOC that does not match the label is refused, and a layer opened ahead that fails its check is closed', async () => {
  const mounted = await prioritizedLayer(2);
  const ahead = await prioritizedLayer(3);
  const aheadBlob = new StalledHeadBlob(ahead.digest, ahead.blob, 3 * 1024 * 1024);
  const layers = layersOver(
    new Map<string, BlobSource>([
      [mounted.digest, new BufferBlobSource(mounted.digest, mounted.blob)],
      [ahead.digest, aheadBlob],
    ]),
  );
  await assert.rejects(layers.open(sourceOf(mounted.digest, sha256('other')), quiet), VerificationError);
  // The refused mount still opened the image's next layer ahead; its prefetch runs before any check.
  const names = [mounted.digest, ahead.digest];
  await layers.open(sourceOf(mounted.digest, mounted.tocDigest, names), quiet).then((l) => l.close());
  await until('the next layer to be prefetching ahead of its mount', () => aheadBlob.stalled.length > 0);
  await assert.rejects(layers.open(sourceOf(ahead.digest, sha256('not its toc'), names), quiet), /does not match/);
  await until('its prefetch to stop with the failed check', () => aheadBlob.stalled.every((r) => r.aborted), 1000);
  await layers.close();
});

test('QuietLink: background fetch waits for the quiet period after a mount and while a served reader is busy', async () => {
  const reader = { busy: false, idle: Infinity, idleMs(): number { return this.idle; } };
  const served = new Set([{ reader }]);
  const gate = new QuietLink(50, served);
  assert.equal(gate.mustWait(), false);
  gate.stamp();
  assert.equal(gate.mustWait(), true, 'a mount just started');
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(gate.mustWait(), false);
  reader.busy = true;
  assert.equal(gate.mustWait(), true, 'a read is loading chunks');
  reader.busy = false;
  reader.idle = 10;
  assert.equal(gate.mustWait(), true, 'a read fetched from the registry 10 ms ago');
  served.clear();
  assert.equal(gate.mustWait(), false, 'layers no longer served are not watched');
});

test('the status file keeps its size, shortening a long error to fit', () => {
  const ok = layerStatusJson('sha256:abc', 1000, 250, undefined);
  assert.equal(Buffer.byteLength(ok), STATUS_FILE_BYTES);
  assert.deepEqual(JSON.parse(ok), { digest: 'sha256:abc', size: 1000, fetchedSize: 250, fetchedPercent: 25 });
  const failed = layerStatusJson('sha256:abc', 1000, 2000, '"'.repeat(5000));
  assert.equal(Buffer.byteLength(failed), STATUS_FILE_BYTES);
  const parsed = JSON.parse(failed) as { error: string; fetchedSize: number };
  assert.ok(parsed.error.endsWith('…'));
  assert.equal(parsed.fetchedSize, 1000);
});
