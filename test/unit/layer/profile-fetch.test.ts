/**
 * Fetching a pushed prefetch profile for a mount (layer/profile-fetch.ts) from a real docker-registry 2.8,
 * which has no referrers API: found through the referrers tag schema, looked up once per image, stored under
 * the mount's own key; a missing one, one of another layer or a corrupt one is no profile. Two fakes, each for
 * what the real registry cannot show: a registry that answers slowly (the mount's wait is bounded), and one with
 * the referrers API (asked first; the tag schema then is not).
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { ProfileStore } from '../../../src/cache/profile-store';
import { profileKeyOf } from '../../../src/layer/layer-profile';
import { ProfileFetcher } from '../../../src/layer/profile-fetch';
import { buildProfileArtifact, mergeReferrersIndex, referrersTag, type OciDescriptor } from '../../../src/profile/profile-artifact';
import { keyOf, type PrefetchProfile } from '../../../src/profile/profile-format';
import { RegistryClient } from '../../../src/remote/registry-client';
import type { LayerSourceInfo } from '../../../src/source/labels';
import { sampleProfile } from '../profile/sample';
import { forward, pushBlob, pushManifest, sha256, startFakeServer, startRegistry, type RunningRegistry } from '../remote/registry-harness';
import { capturingLog } from '../capturing-log';

const d = (c: string): string => `sha256:${c.repeat(64)}`;
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

/** Pushes `profiles` as an artifact about `subject` and lists it under the tag schema, as profile push does. */
async function pushArtifact(host: string, repo: string, subject: OciDescriptor, profiles: PrefetchProfile[], blobOverride?: Buffer): Promise<string> {
  const a = buildProfileArtifact(subject, profiles, new Date());
  let manifest = a.manifest;
  for (const b of a.blobs) await pushBlob(host, repo, b.bytes);
  if (blobOverride !== undefined) {
    // A corrupt profile blob: the manifest points at other bytes than a profile.
    const doc = JSON.parse(manifest.toString()) as { layers: OciDescriptor[] };
    doc.layers[0] = { ...doc.layers[0]!, digest: await pushBlob(host, repo, blobOverride), size: blobOverride.length };
    manifest = Buffer.from(JSON.stringify(doc));
  }
  const digest = await pushManifest(host, repo, sha256(manifest), manifest, OCI_MANIFEST);
  const tag = referrersTag(subject.digest);
  const existing = await fetch(`http://${host}/v2/${repo}/manifests/${tag}`, { headers: { accept: OCI_INDEX } });
  const body = existing.ok ? Buffer.from(await existing.arrayBuffer()) : undefined;
  await pushManifest(host, repo, tag, mergeReferrersIndex(body, { ...a.descriptor, digest, size: manifest.length }).body, OCI_INDEX);
  return digest;
}

describe('fetching pushed prefetch profiles', () => {
  let reg: RunningRegistry;
  let root: string;
  const REPO = 'fetch/app';
  /** A real image manifest for the subject (docker-registry does not check subjects; a pull would have one). */
  let subject: OciDescriptor;
  const base = sampleProfile({ layer: d('1'), tocDigest: d('2'), chainId: d('3'), layers: [d('1'), d('4')] });
  const upper = sampleProfile({ layer: d('4'), tocDigest: d('5'), chainId: d('6'), layers: [d('4')] });

  before(async () => {
    reg = await startRegistry();
    root = await mkdtemp(path.join(tmpdir(), 'stargaze-profile-fetch-'));
    const config = Buffer.from('{}');
    await pushBlob(reg.host, REPO, config);
    const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(config), size: 2 }, layers: [] }));
    subject = { mediaType: OCI_MANIFEST, digest: await pushManifest(reg.host, REPO, 'v1', manifest, OCI_MANIFEST), size: manifest.length };
    await pushArtifact(reg.host, REPO, subject, [base, upper]);
  });
  after(async () => {
    await reg.stop();
    await rm(root, { recursive: true, force: true });
  });

  /** A mount's source for `p`'s layer, with the pull's layers label as given. */
  const sourceOf = (p: PrefetchProfile, host: string, over: Partial<LayerSourceInfo> = {}): LayerSourceInfo => ({
    ref: `${host}/${REPO}:v1`,
    digest: p.layer,
    chainId: p.chainId,
    tocDigest: p.tocDigest,
    prefetchBytes: undefined,
    skipVerify: false,
    layers: [...p.layers],
    manifestDigest: subject.digest,
    ...over,
  });
  const client = (): RegistryClient => new RegistryClient({ retry: { maxRetries: 0 } });
  const newStore = async (name: string): Promise<ProfileStore> => new ProfileStore(await mkdtemp(path.join(root, `${name}-`)));

  test('found through the tag schema, once per image, stored under the mount key', async () => {
    // Counted through a forwarding proxy: how many referrers lookups the two layers cost.
    const proxy = await startFakeServer((req, res) => forward(req, res, reg.host));
    const registry = client();
    try {
      const store = await newStore('found');
      const fetcher = new ProfileFetcher(registry, store, 5_000);
      const { log, lines } = capturingLog();
      // This node's labels list one layer more above the base than the pusher's did: it is stored under this node's key.
      const mine = sourceOf(base, proxy.host, { layers: [d('1'), d('4'), d('7')] });
      const [got, gotUpper] = await Promise.all([fetcher.fetch(mine, log), fetcher.fetch(sourceOf(upper, proxy.host), log)]);
      assert.deepEqual(got?.entries, base.entries);
      assert.deepEqual(got?.layers, mine.layers);
      assert.deepEqual(await store.load(profileKeyOf(mine)), got, 'stored under the mount key');
      assert.deepEqual(gotUpper?.entries, upper.entries);
      const paths = proxy.requests.map((r) => r.url.split('?')[0]);
      assert.equal(paths.filter((p) => p!.includes('/referrers/')).length, 1, `referrers asked once: ${paths.join(' ')}`);
      assert.equal(paths.filter((p) => p!.endsWith(`/manifests/${referrersTag(subject.digest)}`)).length, 1, 'the tag schema read once');
      assert.equal(lines.filter((l) => l.msg === 'prefetch profile fetched from the registry').length, 2);
      // A mount of a layer the artifact has no profile of.
      assert.equal(await fetcher.fetch(sourceOf(base, proxy.host, { digest: d('9') }), log), undefined);
    } finally {
      await registry.close();
      await proxy.close();
    }
  });

  test('another TOC or chainID than the mount: ignored with a debug line', async () => {
    const registry = client();
    try {
      const fetcher = new ProfileFetcher(registry, await newStore('foreign'), 5_000);
      const { log, lines } = capturingLog();
      assert.equal(await fetcher.fetch(sourceOf(base, reg.host, { tocDigest: d('8') }), log), undefined);
      assert.equal(await fetcher.fetch(sourceOf(base, reg.host, { chainId: d('8') }), log), undefined);
      assert.deepEqual(
        lines.filter((l) => /profile/.test(l.msg) && l.msg !== 'prefetch profile artifact found at the registry').map((l) => [l.level, l.msg]),
        [
          ['debug', 'prefetch profile at the registry is of another TOC; ignored'],
          ['debug', 'prefetch profile of another layer ignored'],
        ],
      );
    } finally {
      await registry.close();
    }
  });

  test('an image nobody pushed a profile for, or no manifest label: none, without waiting', async () => {
    const registry = client();
    try {
      const fetcher = new ProfileFetcher(registry, await newStore('none'), 5_000);
      const { log, lines } = capturingLog();
      const started = Date.now();
      assert.equal(await fetcher.fetch(sourceOf(base, reg.host, { manifestDigest: d('e') }), log), undefined);
      assert.ok(Date.now() - started < 2_000, 'two 404s, no wait for the bound');
      assert.ok(lines.some((l) => l.msg === 'no prefetch profile at the registry'));
      assert.equal(await fetcher.fetch(sourceOf(base, reg.host, { manifestDigest: undefined }), log), undefined);
    } finally {
      await registry.close();
    }
  });

  test('a corrupt profile blob: one warning, no profile', async () => {
    const repo = 'fetch/corrupt';
    const config = Buffer.from('{}');
    await pushBlob(reg.host, repo, config);
    const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(config), size: 2 }, layers: [], annotations: { n: 'corrupt' } }));
    const corruptSubject = { mediaType: OCI_MANIFEST, digest: await pushManifest(reg.host, repo, 'v1', manifest, OCI_MANIFEST), size: manifest.length };
    await pushArtifact(reg.host, repo, corruptSubject, [base], Buffer.from('{"version": 1, "entries": ['));
    const registry = client();
    try {
      const store = await newStore('corrupt');
      const fetcher = new ProfileFetcher(registry, store, 5_000);
      const { log, lines } = capturingLog();
      assert.equal(await fetcher.fetch({ ...sourceOf(base, reg.host), ref: `${reg.host}/${repo}:v1`, manifestDigest: corruptSubject.digest }, log), undefined);
      assert.deepEqual(
        lines.filter((l) => l.level === 'warn' || l.level === 'error').map((l) => l.msg),
        ['prefetch profile from the registry unusable; mounting without it'],
      );
      assert.deepEqual(await store.list(), [], 'nothing stored');
    } finally {
      await registry.close();
    }
  });

  test('a registry that answers slowly: the mount waits fetch_timeout_msec, and a later mount gets what came (fake: a slow answer)', async () => {
    const DELAY_MS = 1_500;
    const slow = await startFakeServer((req, res) => {
      setTimeout(() => forward(req, res, reg.host), DELAY_MS);
    });
    const registry = client();
    try {
      const store = await newStore('slow');
      const fetcher = new ProfileFetcher(registry, store, 200);
      const { log, lines } = capturingLog();
      const started = Date.now();
      assert.equal(await fetcher.fetch(sourceOf(base, slow.host), log), undefined);
      const waited = Date.now() - started;
      assert.ok(waited >= 190 && waited < 1_000, `waited ${waited} ms for a 200 ms bound`);
      assert.ok(lines.some((l) => l.msg === 'no prefetch profile from the registry within fetch_timeout_msec; mounting without one'));
      // The lookup went on and stored the profile: the next mount of the layer finds it locally.
      await new Promise((r) => setTimeout(r, 5 * DELAY_MS));
      assert.deepEqual((await store.load(keyOf(base)))?.entries, base.entries);
    } finally {
      await registry.close();
      await slow.close();
    }
  });

  test('a registry with the referrers API is asked there first, and its answer is used (fake: docker-registry 2.8 has no such API)', async () => {
    const referrers = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: OCI_INDEX,
        manifests: [await tagIndexEntry()],
      }),
    );
    async function tagIndexEntry(): Promise<unknown> {
      const res = await fetch(`http://${reg.host}/v2/${REPO}/manifests/${referrersTag(subject.digest)}`, { headers: { accept: OCI_INDEX } });
      return ((await res.json()) as { manifests: unknown[] }).manifests[0];
    }
    const server = await startFakeServer((req, res) => {
      if (req.url?.includes('/referrers/')) {
        res.writeHead(200, { 'content-type': OCI_INDEX });
        res.end(referrers);
      } else forward(req, res, reg.host);
    });
    const registry = client();
    try {
      const fetcher = new ProfileFetcher(registry, await newStore('api'), 5_000);
      const { log } = capturingLog();
      const got = await fetcher.fetch(sourceOf(base, server.host), log);
      assert.deepEqual(got?.entries, base.entries);
      const referrersReq = server.requests.find((r) => r.url.includes('/referrers/'));
      assert.equal(referrersReq?.url, `/v2/${REPO}/referrers/${subject.digest}?artifactType=${encodeURIComponent('application/vnd.stargaze.prefetch-profile.v1+json')}`);
      assert.ok(!server.requests.some((r) => r.url.includes(`/manifests/${referrersTag(subject.digest)}`)), 'the tag schema is not read');
    } finally {
      await registry.close();
      await server.close();
    }
  });
});
