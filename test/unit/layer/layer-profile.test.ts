/**
 * Prefetch profiles through real layers (Layers over an in-memory blob, a ProfileStore on disk, no FUSE): a
 * served layer records what containers read and stores it; a later mount replays exactly those chunks in place
 * of the landmark; a foreign, oversized or malformed profile changes nothing but a log line.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { ProfileStore } from '../../../src/cache/profile-store';
import { defaultConfig } from '../../../src/config/config';
import { layerOptionsFromConfig } from '../../../src/layer/layer-options';
import { profileKeyOf } from '../../../src/layer/layer-profile';
import { Layers } from '../../../src/layer/layers';
import * as layerModule from '../../../src/layer/layer';
import type { Logger } from '../../../src/log';
import { FsMetrics } from '../../../src/metrics/fs-metrics';
import { MAX_PROFILE_FILE_BYTES, PROFILE_FORMAT_VERSION, serializeProfile, type PrefetchProfile } from '../../../src/profile/profile-format';
import type { LayerSourceInfo } from '../../../src/source/labels';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';
import { CountingBlobSource, prioritizedLayer, sha256, type PrioritizedLayer } from '../estargz/fixture';
import { until } from '../until';
import { capturingLog } from '../capturing-log';

const MiB = 1024 * 1024;

function layersOver(blob: CountingBlobSource, profiles: ProfileStore, log: Logger, background = false, record = true): Layers {
  const base = defaultConfig();
  const config = { ...base, noBackgroundFetch: !background, backgroundFetchQuietMs: 0, copyFetchedLayers: false, prefetchProfile: { ...base.prefetchProfile, record } };
  const options = layerOptionsFromConfig(config);
  return new Layers({
    // The layer above (in the labels) is not in this registry: opening it ahead fails, reading nothing.
    registry: { resolveBlob: (_ref, digest) => (digest === blob.digest ? Promise.resolve(blob) : Promise.reject(new Error(`no blob ${digest}`))) },
    scheduler: new Scheduler(schedulerLimits(config)),
    options: { ...options, profile: { ...options.profile, quietMs: 50 } },
    metrics: new FsMetrics(() => [], () => undefined),
    profiles,
    log,
  });
}

function sourceOf(l: PrioritizedLayer): LayerSourceInfo {
  return { ref: 'registry.test/img:1', digest: l.digest, chainId: l.diffId, tocDigest: l.tocDigest, prefetchBytes: undefined, skipVerify: false, layers: [l.digest, sha256('above')] };
}

async function fixture(t: { after(fn: () => Promise<void>): void }): Promise<{ l: PrioritizedLayer; store: ProfileStore; dir: string }> {
  const dir = await mkdtemp(path.join(tmpdir(), 'layer-profile-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return { l: await prioritizedLayer(7), store: new ProfileStore(path.join(dir, 'profiles')), dir };
}

const serveAt = (dir: string): { mountpoint: string; parent: undefined; fail: () => void } => ({ mountpoint: path.join(dir, 'mnt'), parent: undefined, fail: () => undefined });

test('a served layer records what containers read, in first-read order, and stores it under its key', async (t) => {
  const { l, store, dir } = await fixture(t);
  const { log } = capturingLog();
  const layers = layersOver(new CountingBlobSource(l.blob), store, log);
  const layer = await layers.open(sourceOf(l), log);
  layer.serve(serveAt(dir));
  const later = layer.tree.resolvePath('app/later.txt')!;
  const first = layer.tree.resolvePath('app/first.bin')!;
  layer.recordRead('/app/later.txt', later, 0, 4096);
  layer.recordRead('/app/first.bin', first, 2 * MiB + 10, 4096);
  layer.recordRead('/app/later.txt', later, 0, 4096);
  await until('the quiet window to close and its profile to be stored', async () => (await store.list()).length === 1);
  const saved = await store.load(profileKeyOf(sourceOf(l)));
  assert.deepEqual(saved?.entries, [
    { name: 'app/later.txt', offset: 0 },
    { name: 'app/first.bin', offset: 2 * MiB },
  ]);
  assert.equal(saved?.layer, l.digest);
  assert.equal(saved?.tocDigest, l.tocDigest);
  await layer.close();
  await layers.close();
});

test('a mount with a profile prefetches exactly its chunks, not the landmark, and a second start adds to it', async (t) => {
  const { l, store, dir } = await fixture(t);
  const profile: PrefetchProfile = {
    version: PROFILE_FORMAT_VERSION,
    layer: l.digest,
    tocDigest: l.tocDigest,
    chainId: l.diffId,
    layers: sourceOf(l).layers,
    entries: [
      { name: 'app/first.bin', offset: 2 * MiB },
      { name: 'app/first.bin', offset: 1 * MiB },
      { name: 'app/not-in-toc', offset: 0 },
      { name: 'app/first.bin', offset: 123 }, // no chunk starts there
    ],
  };
  await store.save(profile);
  const blob = new CountingBlobSource(l.blob);
  const { log, lines } = capturingLog();
  const layers = layersOver(blob, store, log);
  const layer = await layers.open(sourceOf(l), log);
  assert.equal(await layer.prefetched, true);
  const chunks = layer.tree.resolvePath('app/first.bin')!.chunks;
  const [c1, c2] = [chunks[1]!, chunks[2]!];
  // The two members touch in the blob: one request, exactly them, none of the landmark's head.
  const payloadReads = blob.reads.filter((r) => r.offset + r.length < l.blob.length);
  assert.deepEqual(payloadReads, [{ offset: c1.compressedOffset, length: c2.compressedEnd - c1.compressedOffset }]);
  assert.equal(layer.reader.stats.prefetchedChunks, 2);
  assert.equal(layer.prefetchBytes, c2.compressedEnd - c1.compressedOffset);
  assert.ok(lines.some((e) => e.msg === 'prefetch profile entries not in the TOC ignored'));

  // Served again, a start that reads something new appends it; what the profile had stays first.
  layer.serve(serveAt(dir));
  const later = layer.tree.resolvePath('app/later.txt')!;
  layer.recordRead('/app/later.txt', later, 0, 1);
  layer.recordRead('/app/first.bin', layer.tree.resolvePath('app/first.bin')!, 1 * MiB, 1);
  await layer.close(); // closing the window stores it
  const merged = await store.load(profileKeyOf(sourceOf(l)));
  assert.deepEqual(merged?.entries.slice(-1), [{ name: 'app/later.txt', offset: 0 }]);
  assert.equal(merged?.entries.length, 5);
  await layers.close();
});

test('a foreign, oversized or malformed profile changes nothing but a log line: the landmark is prefetched', async (t) => {
  const { l, store } = await fixture(t);
  const key = profileKeyOf(sourceOf(l));
  const file = path.join(store.dir, `${key}.json`);
  const base: PrefetchProfile = { version: PROFILE_FORMAT_VERSION, layer: l.digest, tocDigest: l.tocDigest, chainId: l.diffId, layers: sourceOf(l).layers, entries: [{ name: 'app/later.txt', offset: 0 }] };
  const cases: Array<{ what: string; bytes: Buffer | string; level: string; msg: string }> = [
    { what: 'another layer', bytes: serializeProfile({ ...base, layer: sha256('other layer') }), level: 'debug', msg: 'prefetch profile of another layer ignored' },
    { what: 'another TOC', bytes: serializeProfile({ ...base, tocDigest: sha256('other toc') }), level: 'debug', msg: 'prefetch profile of another layer ignored' },
    { what: 'stored under another key', bytes: serializeProfile({ ...base, chainId: sha256('other chain') }), level: 'debug', msg: 'prefetch profile ignored' },
    { what: 'oversized', bytes: Buffer.alloc(MAX_PROFILE_FILE_BYTES + 1, 0x20), level: 'debug', msg: 'prefetch profile ignored' },
    { what: 'malformed', bytes: '{"version": 1, "entries": [', level: 'warn', msg: 'prefetch profile unusable; mounting without it' },
  ];
  await store.save(base); // makes the directory
  for (const c of cases) {
    await writeFile(file, c.bytes);
    const blob = new CountingBlobSource(l.blob);
    const { log, lines } = capturingLog();
    const layers = layersOver(blob, store, log);
    const layer = await layers.open(sourceOf(l), log);
    assert.equal(await layer.prefetched, true, c.what);
    assert.ok(layer.prefetchBytes > 3 * MiB, `${c.what}: the landmark's head is prefetched (${layer.prefetchBytes})`);
    const about = lines.filter((e) => e.msg.includes('profile'));
    assert.deepEqual(about.map((e) => [e.level, e.msg]), [[c.level, c.msg]], `${c.what}: one log line`);
    await layer.close();
    await layers.close();
  }
});

test('after a profile prefetch, background fetch downloads none of its members again and the chainID check passes', async (t) => {
  const { l, store, dir } = await fixture(t);
  const entries = [
    { name: 'app/first.bin', offset: 1 * MiB },
    { name: 'app/first.bin', offset: 3 * MiB },
  ];
  await store.save({ version: PROFILE_FORMAT_VERSION, layer: l.digest, tocDigest: l.tocDigest, chainId: l.diffId, layers: sourceOf(l).layers, entries });
  const blob = new CountingBlobSource(l.blob);
  const { log, lines } = capturingLog();
  const layers = layersOver(blob, store, log, true);
  assert.equal(blob.reads.length, 0);
  const layer = await layers.open(sourceOf(l), log);
  assert.equal(blob.reads[0]!.offset + blob.reads[0]!.length, l.blob.length, 'the first read is the tail');
  layer.serve(serveAt(dir));
  await until('the background pass to end', () => lines.some((e) => e.msg === 'layer fully fetched' || e.msg.includes('background fetch failed')));
  assert.ok(lines.some((e) => e.msg === 'layer fully fetched'), 'fetched and checked against its chainID');
  const chunks = layer.tree.resolvePath('app/first.bin')!.chunks;
  const profiled = [chunks[1]!, chunks[3]!];
  // Every profiled byte was read once: by the prefetch (the mount's tail read, TOC and footer, aside).
  for (const c of profiled) {
    const covering = blob.reads.slice(1).filter((r) => r.offset < c.compressedEnd && c.compressedOffset < r.offset + r.length);
    assert.equal(covering.length, 1, `member at ${c.compressedOffset} read once: ${JSON.stringify(covering)}`);
  }
  await layer.close();
  await layers.close();
  // Prefetch and background fetch read every chunk, but not through the mount: nothing was recorded.
  assert.deepEqual((await store.load(profileKeyOf(sourceOf(l))))?.entries, entries);
  assert.ok(!lines.some((e) => e.msg === 'prefetch profile recorded'));
});

test("a served layer's profile is pinned in the disk budget while it is mounted, also when only replaying", async (t) => {
  const { l, dir } = await fixture(t);
  const pins = new Map<string, number>();
  const budget = {
    pin: (key: string) => pins.set(key, (pins.get(key) ?? 0) + 1),
    unpin: (key: string) => pins.set(key, (pins.get(key) ?? 0) - 1),
    add: () => undefined,
    restore: () => undefined,
    touch: () => undefined,
    remove: () => undefined,
    reserve: () => () => undefined,
  };
  const store = new ProfileStore(path.join(dir, 'profiles'), budget);
  const { log } = capturingLog();
  const layers = layersOver(new CountingBlobSource(l.blob), store, log, false, false);
  const layer = await layers.open(sourceOf(l), log);
  layer.serve(serveAt(dir));
  const key = profileKeyOf(sourceOf(l));
  assert.equal(pins.get(key), 1, 'pinned while served, though nothing is recorded');
  await layer.close();
  assert.equal(pins.get(key), 0, 'unpinned when closed');
  await layers.close();
});

test("a mount looks its image's profile up in the registry while it reads the TOC and builds its tree, not before", async (t) => {
  const { l, store } = await fixture(t);
  const blob = new CountingBlobSource(l.blob);
  const { log } = capturingLog();
  let lookups = 0;
  let answer!: () => void;
  const answered = new Promise<void>((resolve) => (answer = resolve));
  // The lookup is held until the TOC has been read: a mount that waited for it first would never read it.
  const profileRegistry = {
    fetchReferrers: async (): Promise<Buffer | undefined> => {
      lookups++;
      await answered;
      return undefined;
    },
    fetchManifest: (): Promise<{ body: Buffer; digest: string }> => Promise.reject(new Error('no tag')),
    fetchSmallBlob: (): Promise<Buffer> => Promise.reject(new Error('no blob')),
  };
  const config = { ...defaultConfig(), noBackgroundFetch: true, copyFetchedLayers: false };
  const options = layerOptionsFromConfig(config);
  const layers = new Layers({
    registry: { resolveBlob: (_ref, digest) => (digest === blob.digest ? Promise.resolve(blob) : Promise.reject(new Error(`no blob ${digest}`))) },
    scheduler: new Scheduler(schedulerLimits(config)),
    options: { ...options, profile: { ...options.profile, fetchTimeoutMs: 60_000 } },
    metrics: new FsMetrics(() => [], () => undefined),
    profiles: store,
    profileRegistry,
    log,
  });
  // The tree is CPU the mount spends while the lookup's round trips are under way, not after them.
  let treesBuilt = 0;
  const treeOf = layerModule.treeOf;
  t.mock.method(layerModule, 'treeOf', (...args: Parameters<typeof treeOf>) => {
    treesBuilt++;
    return treeOf(...args);
  });
  const opening = layers.open({ ...sourceOf(l), manifestDigest: sha256('manifest') }, log);
  // The lookup cannot finish before answer(): a mount that waited for it before reading would time out here.
  await until('the TOC read while the lookup is pending', () => blob.reads.some((r) => r.offset + r.length === l.blob.length), 5_000);
  await until('the tree built while the lookup is pending', () => treesBuilt === 1, 5_000);
  answer();
  const layer = await opening;
  assert.equal(lookups, 1, 'the registry was asked');
  assert.equal(await layer.prefetched, true, 'no profile: the landmark is prefetched as before');
  await layer.close();
  await layers.close();
});
