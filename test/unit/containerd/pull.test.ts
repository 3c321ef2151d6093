/**
 * pullImage against a fake containerd (no gRPC): what it returns, and that nothing of a pull runs on after
 * it settled. The real thing is covered by test/e2e/rpull.test.ts.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import pino from 'pino';
import type { ContainerdClient } from '../../../src/containerd/client';
import { ContainerdError } from '../../../src/containerd/errors';
import { chainIds, type ImageIndex, type ImageManifest } from '../../../src/containerd/image';
import { hostPlatform } from '../../../src/containerd/platforms';
import { pullImage, type ResolvedManifest } from '../../../src/containerd/pull';
import type { Descriptor } from '../../../src/containerd/types';
import type { RegistryClient } from '../../../src/remote/registry-client';

const REF = 'registry.example/app:v1';
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
  const chain = new Set(chainIds([JSON.parse(configBody.toString()).rootfs.diff_ids[0] as string]));
  const snapshots = {
    snapshotter: 'stargz',
    stat: async (key: string) => (calls.push(`snapshots.stat ${key}`), chain.has(key) ? { name: key, parent: '', kind: 'committed', labels: {} } : undefined),
  };
  const client = {
    address: '/fake/containerd.sock',
    namespace: 'default',
    withLease: () => client,
    snapshots: () => snapshots,
    namespaces: {
      get: async () => {
        calls.push('namespaces.get');
        if (opts.failNamespaces === true) throw new ContainerdError(14, 'namespaces get', 'connection refused');
        return {};
      },
    },
    leases: { create: async (id: string) => (calls.push('leases.create'), { id, labels: {} }), delete: async () => void calls.push('leases.delete') },
    content: {
      info: async (digest: string) => (calls.push(`content.info ${digest}`), { digest, size: 0, labels: {} }),
      read: async (digest: string) => (calls.push(`content.read ${digest}`), configBody),
      updateLabels: async (digest: string) => void calls.push(`content.updateLabels ${digest}`),
    },
    images: { create: async (record: unknown) => (calls.push('images.create'), record) },
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
