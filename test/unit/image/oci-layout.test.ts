import assert from 'node:assert/strict';
import { readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { OciLayout, parseOciLayoutRef } from '../../../src/image/oci-layout';
import { sha256, tmpDir } from './helpers';

describe('OCI layout', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });

  test('parseOciLayoutRef', () => {
    assert.equal(parseOciLayoutRef('registry/x:1'), undefined);
    assert.deepEqual(parseOciLayoutRef('oci:/a/b:v1'), { dir: '/a/b', tag: 'v1' });
    assert.deepEqual(parseOciLayoutRef('oci:/a/b'), { dir: '/a/b', tag: undefined });
    assert.deepEqual(parseOciLayoutRef('oci:/a:b/c'), { dir: '/a:b/c', tag: undefined });
    assert.throws(() => parseOciLayoutRef('oci:'), /want oci:DIR/);
  });

  test('round trip: blobs, tags, retag, reopen', async () => {
    const dir = await tmpDir('layout');
    dirs.push(dir);
    const layout = await OciLayout.create(path.join(dir, 'new'));
    const body = Buffer.from('{"hello":"world"}');
    const digest = sha256(body);
    await layout.putBlob(digest, body);
    assert.ok(await layout.hasBlob(digest, body.length));
    assert.ok(!(await layout.hasBlob(digest, body.length + 1)));
    await layout.setTag('v1', { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest, size: body.length });
    const other = Buffer.from('{"other":1}');
    await layout.putBlob(sha256(other), other);
    await layout.setTag('v2', { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: sha256(other), size: other.length });
    await layout.setTag('v1', { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: sha256(other), size: other.length });

    const reopened = await OciLayout.open(layout.dir);
    const index = await reopened.readIndex();
    assert.equal(index.manifests.length, 2, 'retagging replaces the entry');
    assert.equal((await reopened.resolve('v1')).digest, sha256(other));
    assert.deepEqual(await reopened.readBlob(sha256(other), 1024), other);
    await assert.rejects(reopened.resolve(undefined), /holds 2 images; name one.*tags: v2, v1/);
    await assert.rejects(reopened.resolve('nope'), /tag "nope" not found/);
    const marker = JSON.parse(await readFile(path.join(layout.dir, 'oci-layout'), 'utf8')) as { imageLayoutVersion: string };
    assert.equal(marker.imageLayoutVersion, '1.0.0');
  });

  test('refuses corrupt blobs, bad digests and non-layouts', async () => {
    const dir = await tmpDir('layout-bad');
    dirs.push(dir);
    const layout = await OciLayout.create(dir);
    const body = Buffer.from('content');
    await layout.putBlob(sha256(body), body);
    await writeFile(layout.blobPath(sha256(body)), 'tampered');
    await assert.rejects(layout.readBlob(sha256(body), 1024), /has digest sha256:/);
    assert.throws(() => layout.blobPath('sha256:../../etc/passwd'), /invalid blob digest/);
    await assert.rejects(OciLayout.open(path.join(dir, 'blobs')), /is not an OCI image layout/);
  });
});
