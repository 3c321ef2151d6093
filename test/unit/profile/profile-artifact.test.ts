/**
 * The prefetch profile artifact: the OCI manifest `stargaze profile push` builds, what parsing refuses, which
 * referrers are picked, and the referrers tag schema's index merge.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { ProfileError } from '../../../src/errors';
import {
  ARTIFACT_TYPE,
  buildProfileArtifact,
  CREATED_ANNOTATION,
  EMPTY_CONFIG_BYTES,
  EMPTY_DESCRIPTOR,
  LAYER_ANNOTATION,
  MAX_ARTIFACT_LAYERS,
  mergeReferrersIndex,
  parseProfileArtifact,
  PROFILE_MEDIA_TYPE,
  profileReferrers,
  referrersTag,
  sha256Digest,
  TOC_DIGEST_ANNOTATION,
  type OciDescriptor,
} from '../../../src/profile/profile-artifact';
import { MAX_PROFILE_FILE_BYTES, parseProfile } from '../../../src/profile/profile-format';

import { sampleProfile } from './sample';

const d = (c: string): string => `sha256:${c.repeat(64)}`;
const subject: OciDescriptor = { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: d('f'), size: 1234 };
const created = new Date('2026-12-07T12:00:00.000Z');

test('the artifact is a plain OCI manifest: artifactType, the empty config, a blob per profile, the subject', () => {
  const p1 = sampleProfile();
  const p2 = sampleProfile({ layer: d('1'), tocDigest: d('2') });
  const a = buildProfileArtifact(subject, [p1, p2], created);
  const m = JSON.parse(a.manifest.toString()) as Record<string, unknown>;
  assert.equal(m.schemaVersion, 2);
  assert.equal(m.mediaType, 'application/vnd.oci.image.manifest.v1+json');
  assert.equal(m.artifactType, ARTIFACT_TYPE);
  assert.deepEqual(m.config, EMPTY_DESCRIPTOR);
  assert.equal(sha256Digest(EMPTY_CONFIG_BYTES), EMPTY_DESCRIPTOR.digest, 'the empty descriptor is the digest of {}');
  assert.deepEqual(m.subject, subject);
  assert.deepEqual(m.annotations, { [CREATED_ANNOTATION]: '2026-12-07T12:00:00.000Z' });
  // Blobs: the empty config first, then the profiles, each described by the manifest with its layer.
  assert.deepEqual(a.blobs[0]!.bytes, EMPTY_CONFIG_BYTES);
  const layers = m.layers as OciDescriptor[];
  assert.equal(layers.length, 2);
  for (const [i, p] of [p1, p2].entries()) {
    const blob = a.blobs[i + 1]!;
    assert.deepEqual(layers[i], blob.descriptor);
    assert.equal(blob.descriptor.mediaType, PROFILE_MEDIA_TYPE);
    assert.equal(blob.descriptor.digest, sha256Digest(blob.bytes));
    assert.equal(blob.descriptor.size, blob.bytes.length);
    assert.deepEqual(blob.descriptor.annotations, { [LAYER_ANNOTATION]: p.layer, [TOC_DIGEST_ANNOTATION]: p.tocDigest });
    assert.deepEqual(parseProfile(blob.bytes), p, 'each blob is the profile file itself');
  }
  // The descriptor a referrers index lists.
  assert.deepEqual(a.descriptor, {
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    digest: sha256Digest(a.manifest),
    size: a.manifest.length,
    artifactType: ARTIFACT_TYPE,
    annotations: { [CREATED_ANNOTATION]: '2026-12-07T12:00:00.000Z' },
  });
  assert.throws(() => buildProfileArtifact(subject, [], created), ProfileError);
  assert.throws(() => buildProfileArtifact(subject, Array.from({ length: MAX_ARTIFACT_LAYERS + 1 }, () => p1), created), ProfileError);
});

test('parsing an artifact gives its blobs by layer and refuses what is not one', () => {
  const a = buildProfileArtifact(subject, [sampleProfile()], created);
  const blobs = parseProfileArtifact(a.manifest, subject.digest);
  assert.deepEqual(blobs, [{ layer: d('a'), tocDigest: d('b'), descriptor: a.blobs[1]!.descriptor }]);

  const doc = (): Record<string, unknown> => JSON.parse(a.manifest.toString()) as Record<string, unknown>;
  const reason = (body: Buffer | Record<string, unknown>, about = subject.digest): string => {
    try {
      parseProfileArtifact(Buffer.isBuffer(body) ? body : Buffer.from(JSON.stringify(body)), about);
    } catch (err) {
      assert.ok(err instanceof ProfileError, String(err));
      return err.reason;
    }
    assert.fail('accepted');
  };
  assert.equal(reason(Buffer.from('{"layers": [')), 'malformed');
  assert.equal(reason(Buffer.from('[]')), 'malformed');
  assert.equal(reason(a.manifest, d('0')), 'foreign', 'about another manifest');
  assert.equal(reason({ ...doc(), artifactType: 'application/vnd.example+json' }), 'foreign');
  assert.equal(reason({ ...doc(), mediaType: 'application/vnd.oci.image.index.v1+json' }), 'malformed');
  assert.equal(reason({ ...doc(), layers: 'x' }), 'malformed');
  const layer = (over: Record<string, unknown>): Record<string, unknown> => ({ ...doc(), layers: [{ ...(doc().layers as object[])[0], ...over }] });
  assert.equal(reason(layer({ mediaType: 'application/octet-stream' })), 'malformed');
  assert.equal(reason(layer({ digest: 'md5:abc' })), 'malformed');
  assert.equal(reason(layer({ size: -1 })), 'malformed');
  assert.equal(reason(layer({ size: MAX_PROFILE_FILE_BYTES + 1 })), 'oversized', 'a blob past the bound is refused before it is read');
  assert.equal(reason(layer({ annotations: {} })), 'malformed', 'a blob naming no layer');
  assert.equal(reason({ ...doc(), layers: Array.from({ length: MAX_ARTIFACT_LAYERS + 1 }, () => (doc().layers as object[])[0]) }), 'oversized');
  // A TOC digest annotation that is not a digest is dropped, not trusted.
  assert.equal(parseProfileArtifact(Buffer.from(JSON.stringify(layer({ annotations: { [LAYER_ANNOTATION]: d('a'), [TOC_DIGEST_ANNOTATION]: 'x' } }))), subject.digest)[0]!.tocDigest, undefined);
});

test('referrers: only profile artifacts, newest first; a malformed index throws', () => {
  const art = (digest: string, at?: string): OciDescriptor => ({
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    digest,
    size: 500,
    artifactType: ARTIFACT_TYPE,
    ...(at !== undefined ? { annotations: { [CREATED_ANNOTATION]: at } } : {}),
  });
  const index = (manifests: unknown[]): Buffer => Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests }));
  const signature = { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: d('5'), size: 10, artifactType: 'application/vnd.dev.cosign.artifact.sig.v1+json' };
  const found = profileReferrers(index([art(d('1'), '2026-01-01T00:00:00Z'), signature, art(d('2'), '2026-06-01T00:00:00Z'), art(d('3'), '2025-01-01T00:00:00Z'), { bad: true }]));
  assert.deepEqual(
    found.map((f) => f.digest),
    [d('2'), d('1'), d('3')],
  );
  // Without dates, the later listing (a tag-schema push appends) wins.
  assert.deepEqual(
    profileReferrers(index([art(d('1')), art(d('2'))])).map((f) => f.digest),
    [d('2'), d('1')],
  );
  assert.deepEqual(profileReferrers(index([])), []);
  assert.throws(() => profileReferrers(Buffer.from('not json')), ProfileError);
  assert.throws(() => profileReferrers(Buffer.from('{"manifests": 1}')), ProfileError);
});

test('the tag schema index: what it listed, of any type, plus the new artifact; a re-push is listed once', () => {
  const a = buildProfileArtifact(subject, [sampleProfile()], created);
  const first = mergeReferrersIndex(undefined, a.descriptor);
  assert.deepEqual(JSON.parse(first.body.toString()), { schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests: [a.descriptor] });
  assert.equal(first.kept, 0);
  const signature = { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: d('5'), size: 10, artifactType: 'application/vnd.dev.cosign.artifact.sig.v1+json', annotations: { x: 'y' } };
  const existing = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests: [signature, a.descriptor] }));
  const b = buildProfileArtifact(subject, [sampleProfile()], new Date('2026-12-08T00:00:00Z'));
  const merged = mergeReferrersIndex(existing, b.descriptor);
  assert.deepEqual((JSON.parse(merged.body.toString()) as { manifests: unknown[] }).manifests, [signature, a.descriptor, b.descriptor], 'others kept as they were');
  assert.deepEqual(profileReferrers(merged.body)[0], b.descriptor, 'the newest push is the one a pull takes');
  const again = mergeReferrersIndex(merged.body, a.descriptor);
  assert.deepEqual((JSON.parse(again.body.toString()) as { manifests: unknown[] }).manifests, [signature, b.descriptor, a.descriptor], 'a digest is listed once');
  const fixed = mergeReferrersIndex(Buffer.from('garbage'), a.descriptor);
  assert.equal(fixed.replacedUnreadable, true);
  assert.deepEqual((JSON.parse(fixed.body.toString()) as { manifests: unknown[] }).manifests, [a.descriptor]);
});

test('the referrers tag of a digest', () => {
  assert.equal(referrersTag(d('a')), `sha256-${'a'.repeat(64)}`);
  assert.throws(() => referrersTag('sha512:abc'), ProfileError);
});
