import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  ANNOTATION_TOC_DIGEST,
  ANNOTATION_UNCOMPRESSED_SIZE,
  carriedLayerAnnotations,
  layerCompression,
  parseManifest,
  toOciMediaType,
} from '../../../src/image/media-types';
import { parsePlatform, platformMatches } from '../../../src/image/platform';
import { parsePrioritizedFiles } from '../../../src/image/converter';

describe('Docker -> OCI media types', () => {
  const cases: Array<[string, string]> = [
    ['application/vnd.docker.distribution.manifest.v2+json', 'application/vnd.oci.image.manifest.v1+json'],
    ['application/vnd.docker.distribution.manifest.list.v2+json', 'application/vnd.oci.image.index.v1+json'],
    ['application/vnd.docker.container.image.v1+json', 'application/vnd.oci.image.config.v1+json'],
    ['application/vnd.docker.image.rootfs.diff.tar.gzip', 'application/vnd.oci.image.layer.v1.tar+gzip'],
    ['application/vnd.docker.image.rootfs.diff.tar', 'application/vnd.oci.image.layer.v1.tar'],
    ['application/vnd.docker.image.rootfs.foreign.diff.tar.gzip', 'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip'],
    ['application/vnd.oci.image.layer.v1.tar+gzip', 'application/vnd.oci.image.layer.v1.tar+gzip'],
    ['application/x-unknown', 'application/x-unknown'],
  ];
  for (const [docker, oci] of cases) test(docker, () => assert.equal(toOciMediaType(docker), oci));

  test('layer compression by media type', () => {
    assert.equal(layerCompression('application/vnd.docker.image.rootfs.diff.tar.gzip'), 'gzip');
    assert.equal(layerCompression('application/vnd.oci.image.layer.v1.tar'), 'none');
    assert.equal(layerCompression('application/vnd.oci.image.layer.v1.tar+zstd'), 'zstd');
    assert.equal(layerCompression('application/vnd.in-toto+json'), undefined);
  });

  test('a converted layer drops the annotations of its old blob and keeps the rest', () => {
    assert.deepEqual(carriedLayerAnnotations({ [ANNOTATION_TOC_DIGEST]: 'sha256:x', [ANNOTATION_UNCOMPRESSED_SIZE]: '1', keep: 'me' }), { keep: 'me' });
  });
});

describe('parseManifest', () => {
  const digest = 'sha256:' + 'a'.repeat(64);
  test('manifest, index, and refusals', () => {
    const m = parseManifest(Buffer.from(JSON.stringify({ schemaVersion: 2, config: { mediaType: 'c', digest, size: 1 }, layers: [] })), 'application/vnd.docker.distribution.manifest.v2+json', 'm');
    assert.equal(m.kind, 'manifest');
    const i = parseManifest(Buffer.from(JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: 'x', digest, size: 2 }] })), '', 'i');
    assert.equal(i.kind, 'index');
    assert.throws(() => parseManifest(Buffer.from('{"schemaVersion":1}'), '', 'old'), /old: schemaVersion 1 is not supported/);
    assert.throws(() => parseManifest(Buffer.from('nope'), '', 'junk'), /junk: not JSON/);
    assert.throws(
      () => parseManifest(Buffer.from(JSON.stringify({ schemaVersion: 2, config: { mediaType: 'c', digest: 'sha256:../../x', size: 1 }, layers: [] })), '', 'evil'),
      /evil config: descriptor digest/,
    );
  });
});

describe('platforms', () => {
  test('parse and match', () => {
    assert.deepEqual(parsePlatform('linux/arm64/v8'), { os: 'linux', architecture: 'arm64', variant: undefined });
    assert.deepEqual(parsePlatform('amd64'), { os: 'linux', architecture: 'amd64', variant: undefined });
    assert.throws(() => parsePlatform('linux//x'), /invalid platform/);
    assert.ok(platformMatches(parsePlatform('linux/arm/v7'), { os: 'linux', architecture: 'arm', variant: 'v7' }));
    assert.ok(!platformMatches(parsePlatform('linux/arm/v6'), { os: 'linux', architecture: 'arm', variant: 'v7' }));
    assert.ok(platformMatches(parsePlatform('linux/arm64'), { os: 'linux', architecture: 'arm64', variant: 'v8' }));
    assert.ok(!platformMatches(parsePlatform('linux/amd64'), { os: 'windows', architecture: 'amd64' }));
  });
});

describe('prioritized files list', () => {
  test('plain lines and optimize JSON records', () => {
    assert.deepEqual(parsePrioritizedFiles('# comment\n/bin/sh\n\n{"path":"/etc/passwd","layerIndex":0}\n/bin/sh\n'), ['/bin/sh', '/etc/passwd']);
    assert.throws(() => parsePrioritizedFiles('{"nope":1}'), /has no path/);
  });
});
