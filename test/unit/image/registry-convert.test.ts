/**
 * convert against a real registry (Debian's docker-registry, with htpasswd auth): push with HEAD skips,
 * monolithic uploads and the manifest last; pull from it; bad credentials; a failing layer leaves no tag.
 */
import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { request } from 'undici';
import { RegistryAuthError } from '../../../src/errors';
import { convertImage } from '../../../src/image/converter';
import { MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, type ImageManifest } from '../../../src/image/media-types';
import { OciLayout } from '../../../src/image/oci-layout';
import { OciLayoutSink, OciLayoutSource, RegistrySink, RegistrySource } from '../../../src/image/store';
import { parseReference } from '../../../src/remote/reference';
import { RegistryClient } from '../../../src/remote/registry-client';
import { RegistryPusher } from '../../../src/remote/registry-push';
import { bcryptLine, startRegistry, type RunningRegistry } from '../remote/registry-harness';
import { layoutImage, layoutIndex, makeTar, tmpDir } from './helpers';

const USER = { username: 'alice', password: 's3cret' };

describe('convert with a registry', async () => {
  const htpasswd = await bcryptLine(USER.username, USER.password);
  let registry: RunningRegistry;
  let dir: string;
  const clients: RegistryClient[] = [];

  before(async () => {
    registry = await startRegistry(htpasswd === undefined ? {} : { htpasswdLine: htpasswd });
    dir = await tmpDir('regconv');
  });
  after(async () => {
    for (const c of clients) await c.close();
    await registry?.stop();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  const client = (creds = USER): RegistryClient => {
    const c = new RegistryClient({ credentials: () => creds, dockerConfigDir: dir });
    clients.push(c);
    return c;
  };
  const sink = (ref: string, creds = USER): RegistrySink => {
    const r = parseReference(ref);
    return new RegistrySink(new RegistryPusher(r, { client: client(creds) }), r.tag ?? 'latest');
  };
  const manifestStatus = async (repo: string, tag: string): Promise<number> => {
    const res = await request(`http://${registry.host}/v2/${repo}/manifests/${tag}`, {
      headers: {
        accept: MEDIA_TYPE_OCI_MANIFEST,
        authorization: `Basic ${Buffer.from(`${USER.username}:${USER.password}`).toString('base64')}`,
      },
    });
    await res.body.dump();
    return res.statusCode;
  };

  test('layout -> registry pushes every blob once, then registry -> layout reads it back', async () => {
    await layoutImage(path.join(dir, 'src'), [
      await makeTar([{ name: 'a', content: 'a'.repeat(100_000) }]),
      await makeTar([{ name: 'b', content: 'b' }]),
    ]);
    const src = new OciLayoutSource(await OciLayout.open(path.join(dir, 'src')), 'v1');
    const dst = sink(`${registry.host}/conv/app:esgz`);
    const first = await convertImage(src, dst, {});
    assert.equal(first.blobsPushed, 3);
    assert.equal(await manifestStatus('conv/app', 'esgz'), 200);
    const second = await convertImage(src, sink(`${registry.host}/conv/app:esgz`), {});
    assert.equal(second.blobsPushed, 0, 'HEAD finds every blob');
    assert.equal(second.descriptor.digest, first.descriptor.digest);

    // Back from the registry into a layout: already eStargz layers are rebuilt to the same bytes.
    const back = await convertImage(new RegistrySource(client(), parseReference(`${registry.host}/conv/app:esgz`)), new OciLayoutSink(await OciLayout.create(path.join(dir, 'back')), 'v1'), {});
    const layout = await OciLayout.open(path.join(dir, 'back'));
    const manifest = JSON.parse((await layout.readBlob(back.descriptor.digest, 1 << 20)).toString()) as ImageManifest;
    assert.deepEqual(
      manifest.layers.map((l) => l.digest),
      first.layers.map((l) => l.target.digest),
    );
  });

  test('an index: --all-platforms pushes children by digest and the index under the tag; reading it back picks one', async () => {
    const a = await layoutImage(path.join(dir, 'srcidx'), [await makeTar([{ name: 'a', content: 'a' }])], { tag: 'a' });
    const b = await layoutImage(path.join(dir, 'srcidx'), [await makeTar([{ name: 'b', content: 'b' }])], { tag: 'b' });
    const size = async (d: string): Promise<number> => (await a.layout.readBlob(d, 1 << 20)).length;
    await layoutIndex(a.layout, 'multi', [
      { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: a.manifestDigest, size: await size(a.manifestDigest), platform: { os: 'linux', architecture: 'amd64' } },
      { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: b.manifestDigest, size: await size(b.manifestDigest), platform: { os: 'linux', architecture: 'arm64' } },
    ]);
    const src = new OciLayoutSource(await OciLayout.open(path.join(dir, 'srcidx')), 'multi');
    const pushed = await convertImage(src, sink(`${registry.host}/conv/multi:all`), { allPlatforms: true });
    assert.equal(pushed.descriptor.mediaType, MEDIA_TYPE_OCI_INDEX);

    const fromRegistry = new RegistrySource(client(), parseReference(`${registry.host}/conv/multi:all`));
    const arm = await convertImage(fromRegistry, new OciLayoutSink(await OciLayout.create(path.join(dir, 'arm')), 'v1'), {
      platforms: [{ os: 'linux', architecture: 'arm64', variant: undefined }],
    });
    assert.equal(arm.descriptor.mediaType, MEDIA_TYPE_OCI_MANIFEST);
    assert.equal(arm.layers.length, 1);
    assert.equal(arm.layers[0]?.target.digest, pushed.layers.find((l) => l.source.digest === b.layers[0]?.digest)?.target.digest);
  });

  test('wrong credentials: an auth error naming the registry, nothing tagged', { skip: htpasswd === undefined && 'no bcrypt tool for htpasswd' }, async () => {
    await layoutImage(path.join(dir, 'src2'), [await makeTar([{ name: 'c', content: 'c' }])]);
    const src = new OciLayoutSource(await OciLayout.open(path.join(dir, 'src2')), 'v1');
    await assert.rejects(convertImage(src, sink(`${registry.host}/conv/denied:v1`, { username: 'alice', password: 'wrong' }), {}), (err: unknown) => {
      assert.ok(err instanceof Error);
      assert.match(err.message, new RegExp(`${registry.host.replace(/\./g, '\\.')}`));
      assert.ok(err instanceof RegistryAuthError || /401|credentials/.test(err.message), err.message);
      return true;
    });
    assert.equal(await manifestStatus('conv/denied', 'v1'), 404);
  });

  test('a corrupt layer fails before anything is tagged', async () => {
    await layoutImage(path.join(dir, 'src3'), [await makeTar([{ name: 'ok', content: 'ok' }]), await makeTar([{ name: 'x', content: 'x'.repeat(50_000) }])], {
      blobs: (i, gz) => (i === 1 ? gz.subarray(0, gz.length - 20) : gz),
    });
    const src = new OciLayoutSource(await OciLayout.open(path.join(dir, 'src3')), 'v1');
    await assert.rejects(convertImage(src, sink(`${registry.host}/conv/broken:v1`), {}), /layer 2\/2 \(sha256:[0-9a-f]{64}\): the gzip stream is truncated/);
    assert.equal(await manifestStatus('conv/broken', 'v1'), 404);
  });
});
