/**
 * pullImage against a fake containerd (no gRPC): what it returns, how many layers it downloads at once, and
 * that nothing of a pull runs on after it settled. The real thing is covered by test/e2e/rpull.test.ts.
 */
import assert from 'node:assert/strict';
import { createHash, randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { setTimeout as delay } from 'node:timers/promises';
import pino from 'pino';
import type { ContainerdClient } from '../../../src/containerd/client';
import { ContainerdError } from '../../../src/containerd/errors';
import { chainIds, type ImageConfig, type ImageIndex, type ImageManifest } from '../../../src/containerd/image';
import { hostPlatform } from '../../../src/containerd/platforms';
import { MAX_CONCURRENT_DOWNLOADS, pullImage, type ResolvedManifest } from '../../../src/containerd/pull';
import type { Descriptor } from '../../../src/containerd/types';
import type { RegistryClient } from '../../../src/remote/registry-client';
import { until } from '../until';

const REF = 'registry.example/app:v1';
/** How long a download in the limit test stays in flight once the others could have joined it. */
const OVERLAP_MS = 50;
const sha256 = (b: Buffer | string): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

/** An image whose one layer the snapshotter already has, behind an index that picked `platform`. */
function image(platform: string): ResolvedManifest & { configBody: Buffer } {
  const diffId = sha256('diff');
  const configBody = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [diffId] } }));
  const config: Descriptor = { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(configBody), size: configBody.length };
  const layer: Descriptor = { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: sha256('layer'), size: 5 };
  const manifestDoc: ImageManifest = { mediaType: 'application/vnd.oci.image.manifest.v1+json', config, layers: [layer] };
  const manifestBody = Buffer.from(JSON.stringify(manifestDoc));
  const manifest = { desc: { mediaType: manifestDoc.mediaType as string, digest: sha256(manifestBody), size: manifestBody.length }, body: manifestBody, doc: manifestDoc };
  const indexDoc: ImageIndex = { mediaType: 'application/vnd.oci.image.index.v1+json', manifests: [manifest.desc] };
  const indexBody = Buffer.from(JSON.stringify(indexDoc));
  const index = { desc: { mediaType: indexDoc.mediaType as string, digest: sha256(indexBody), size: indexBody.length }, body: indexBody, doc: indexDoc };
  return { target: index, index, manifest, platform, configBody };
}

/** A containerd that has every blob and snapshot already, recording the calls; `failNamespaces` fails the first one. */
function fakeContainerd(configBody: Buffer, opts: { failNamespaces?: boolean } = {}): { client: ContainerdClient; calls: string[] } {
  const calls: string[] = [];
  const chain = new Set(chainIds([(JSON.parse(configBody.toString()) as ImageConfig).rootfs.diff_ids[0] as string]));
  const snapshots = {
    snapshotter: 'stargz',
    stat: (key: string) => {
      calls.push(`snapshots.stat ${key}`);
      return Promise.resolve(chain.has(key) ? { name: key, parent: '', kind: 'committed', labels: {} } : undefined);
    },
  };
  const client = {
    address: '/fake/containerd.sock',
    namespace: 'default',
    withLease: () => client,
    snapshots: () => snapshots,
    namespaces: {
      get: () => {
        calls.push('namespaces.get');
        if (opts.failNamespaces === true) return Promise.reject(new ContainerdError(14, 'namespaces get', 'connection refused'));
        return Promise.resolve({});
      },
    },
    leases: {
      create: (id: string) => {
        calls.push('leases.create');
        return Promise.resolve({ id, labels: {} });
      },
      delete: () => {
        calls.push('leases.delete');
        return Promise.resolve();
      },
    },
    content: {
      info: (digest: string) => {
        calls.push(`content.info ${digest}`);
        return Promise.resolve({ digest, size: 0, labels: {} });
      },
      read: (digest: string) => {
        calls.push(`content.read ${digest}`);
        return Promise.resolve(configBody);
      },
      updateLabels: (digest: string) => {
        calls.push(`content.updateLabels ${digest}`);
        return Promise.resolve();
      },
    },
    images: {
      create: (record: unknown) => {
        calls.push('images.create');
        return Promise.resolve(record);
      },
    },
  };
  return { client: client as unknown as ContainerdClient, calls };
}

const log = pino({ level: 'silent' });
const registry = {} as RegistryClient; // never asked: the manifest is given and the config is in the content store

test('the result names the manifest and the platform picked from the index (rpull reports them from it)', async () => {
  const img = image('linux/amd64');
  const { client } = fakeContainerd(img.configBody);
  const result = await pullImage({ client, registry, ref: REF, snapshotter: 'stargz', platform: hostPlatform(), prefetchBytes: 0, log, resolved: Promise.resolve(img) });
  assert.equal(result.platform, 'linux/amd64');
  assert.deepEqual(result.manifest, img.manifest.desc);
  assert.deepEqual(result.target, img.index?.desc);
  assert.deepEqual(
    result.layers.map((l) => l.outcome),
    ['present'],
  );
});

test('containerd failing before the resolve is done: pullImage settles only once nothing of the pull runs any more', async () => {
  const img = image('linux/amd64');
  const { client, calls } = fakeContainerd(img.configBody, { failNamespaces: true });
  let finishResolve: (r: ResolvedManifest) => void = () => undefined;
  // The caller's resolve, still waiting for the registry when containerd's error comes.
  const resolved = new Promise<ResolvedManifest>((resolve) => (finishResolve = resolve));
  await assert.rejects(
    pullImage({ client, registry, ref: REF, snapshotter: 'stargz', platform: hostPlatform(), prefetchBytes: 0, log, resolved }),
    (err: unknown) => err instanceof ContainerdError,
  );
  const settledCalls = calls.length;
  // The registry answers after the pull failed: the pull must not go on to read the config.
  finishResolve(img);
  await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(calls.slice(settledCalls), [], 'calls made after pullImage settled');
  assert.ok(!calls.some((c) => c.startsWith('content.')), calls.join('\n'));
});

/** An image of `count` layers without a TOC digest (never mounted lazily), each with its own digest and diffID. */
function plainImage(count: number): ResolvedManifest & { configBody: Buffer; diffIdOf: Map<string, string> } {
  const run = randomUUID(); // the unpack locks are host-wide: no two runs share a chainID
  const diffIdOf = new Map<string, string>();
  const layers: Descriptor[] = [];
  for (let i = 0; i < count; i++) {
    const layer: Descriptor = { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: sha256(`layer ${i} ${run}`), size: 5 };
    layers.push(layer);
    diffIdOf.set(layer.digest, sha256(`diff ${i} ${run}`));
  }
  const configBody = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', rootfs: { type: 'layers', diff_ids: [...diffIdOf.values()] } }));
  const config: Descriptor = { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(configBody), size: configBody.length };
  const manifestDoc: ImageManifest = { mediaType: 'application/vnd.oci.image.manifest.v1+json', config, layers };
  const manifestBody = Buffer.from(JSON.stringify(manifestDoc));
  const manifest = { desc: { mediaType: manifestDoc.mediaType as string, digest: sha256(manifestBody), size: manifestBody.length }, body: manifestBody, doc: manifestDoc };
  return { target: manifest, index: undefined, manifest, platform: undefined, configBody, diffIdOf };
}

/**
 * A containerd with none of the image's layers and a snapshotter that is not a lazy one (Prepare hands out
 * mounts), so every layer is downloaded, applied and committed; the content store takes what `open` yields.
 */
function unpackingContainerd(img: ReturnType<typeof plainImage>): ContainerdClient {
  const committed = new Set<string>();
  const stored = new Set<string>();
  const layerDigests = new Set(img.manifest.doc.layers.map((l) => l.digest));
  const snapshots = {
    snapshotter: 'overlayfs',
    stat: (key: string) => Promise.resolve(committed.has(key) ? { name: key, parent: '', kind: 'committed', labels: {} } : undefined),
    prepare: () => Promise.resolve([{ type: 'bind', source: '/fake/extract', options: ['rw', 'rbind'] }]),
    commit: (name: string) => {
      committed.add(name);
      return Promise.resolve();
    },
    remove: () => Promise.resolve(),
  };
  const client = {
    address: '/fake/containerd.sock',
    namespace: 'default',
    withLease: () => client,
    snapshots: () => snapshots,
    namespaces: { get: () => Promise.resolve({}) },
    leases: { create: (id: string) => Promise.resolve({ id, labels: {} }), delete: () => Promise.resolve() },
    content: {
      info: (digest: string) => Promise.resolve(layerDigests.has(digest) && !stored.has(digest) ? undefined : { digest, size: 0, labels: {} }),
      read: () => Promise.resolve(img.configBody),
      write: async (_ref: string, desc: Descriptor, open: () => Promise<AsyncIterable<Buffer>>) => {
        let written = 0;
        for await (const chunk of await open()) written += chunk.length;
        stored.add(desc.digest);
        return { existed: false, written };
      },
      updateLabels: () => Promise.resolve(),
    },
    diff: { apply: (desc: Descriptor) => Promise.resolve({ mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: img.diffIdOf.get(desc.digest), size: 0 }) },
    images: { create: (record: unknown) => Promise.resolve(record) },
  };
  return client as unknown as ContainerdClient;
}

/** A registry whose layer downloads last until `hold` resolves, counting the downloads in flight. */
function countingRegistry(hold: (signal: AbortSignal) => Promise<void>): { registry: RegistryClient; calls: string[]; inFlight(): number; peak(): number } {
  const calls: string[] = [];
  let active = 0;
  let peak = 0;
  const registry = {
    fetchBlobParallel: (_ref: string, digest: string, opts: { signal: AbortSignal }) => {
      calls.push(digest);
      active++;
      peak = Math.max(peak, active);
      const body = (async function* () {
        try {
          await hold(opts.signal);
          yield Buffer.from('bytes');
        } finally {
          active--;
        }
      })();
      return Promise.resolve({ digest, size: 5, body });
    },
  };
  return { registry: registry as unknown as RegistryClient, calls, inFlight: () => active, peak: () => peak };
}

test(`rpull downloads at most MAX_CONCURRENT_DOWNLOADS (${MAX_CONCURRENT_DOWNLOADS}) layers at once`, async () => {
  const layers = 2 * MAX_CONCURRENT_DOWNLOADS + 1;
  const img = plainImage(layers);
  let done = 0;
  // Each download lasts until as many are in flight as may be, and a little longer: every layer is queued
  // before the first download starts, so any past the limit would be in flight by then too.
  const reg = countingRegistry(async () => {
    await until('downloads in flight', () => reg.inFlight() >= Math.min(MAX_CONCURRENT_DOWNLOADS, layers - done));
    await delay(OVERLAP_MS);
    done++;
  });
  const result = await pullImage({
    client: unpackingContainerd(img),
    registry: reg.registry,
    ref: REF,
    snapshotter: 'overlayfs',
    platform: hostPlatform(),
    prefetchBytes: 0,
    log,
    resolved: Promise.resolve(img),
  });
  assert.deepEqual(
    result.layers.map((l) => l.outcome),
    Array(layers).fill('fetched'),
  );
  assert.deepEqual([...reg.calls].sort(), img.manifest.doc.layers.map((l) => l.digest).sort(), 'each layer downloaded once');
  assert.equal(reg.peak(), MAX_CONCURRENT_DOWNLOADS);
});

test('a pull aborted while downloads wait for a slot starts none of them', async () => {
  const img = plainImage(2 * MAX_CONCURRENT_DOWNLOADS);
  const reg = countingRegistry((signal) => new Promise<void>((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true })));
  const abort = new AbortController();
  const pulling = pullImage({
    client: unpackingContainerd(img),
    registry: reg.registry,
    ref: REF,
    snapshotter: 'overlayfs',
    platform: hostPlatform(),
    prefetchBytes: 0,
    log,
    signal: abort.signal,
    resolved: Promise.resolve(img),
  });
  await until('the first downloads', () => reg.calls.length === MAX_CONCURRENT_DOWNLOADS);
  const reason = new Error('interrupted');
  abort.abort(reason);
  await assert.rejects(pulling, (err: unknown) => err === reason);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(reg.calls.length, MAX_CONCURRENT_DOWNLOADS, 'no download started after the abort');
  assert.equal(reg.inFlight(), 0, 'nothing of the pull runs on after it settled');
});
