import assert from 'node:assert/strict';
import { readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { gunzipSync } from 'node:zlib';
import { readToc } from '../../../src/estargz/toc';
import { convertImage, LayerConversionError } from '../../../src/image/converter';
import {
  ANNOTATION_TOC_DIGEST,
  ANNOTATION_UNCOMPRESSED_SIZE,
  MEDIA_TYPE_DOCKER_CONFIG,
  MEDIA_TYPE_DOCKER_LAYER_GZIP,
  MEDIA_TYPE_DOCKER_MANIFEST,
  MEDIA_TYPE_OCI_CONFIG,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_LAYER_GZIP,
  MEDIA_TYPE_OCI_MANIFEST,
  type ImageIndex,
  type ImageManifest,
} from '../../../src/image/media-types';
import { OciLayout } from '../../../src/image/oci-layout';
import { hostPlatform } from '../../../src/image/platform';
import type { ConvertProgress } from '../../../src/image/progress';
import { OciLayoutSink, OciLayoutSource } from '../../../src/image/store';
import { layoutImage, layoutIndex, makeTar, rawHeader, rawTar, sha256, tmpDir } from './helpers';

async function readJson<T>(layout: OciLayout, digest: string): Promise<T> {
  return JSON.parse((await layout.readBlob(digest, 1 << 24)).toString('utf8')) as T;
}

async function convertLayouts(srcDir: string, srcTag: string, dstDir: string, opts: Parameters<typeof convertImage>[2] = {}) {
  const src = new OciLayoutSource(await OciLayout.open(srcDir), srcTag);
  const dst = new OciLayoutSink(await OciLayout.create(dstDir), 'out');
  return convertImage(src, dst, { concurrency: 2, ...opts });
}

describe('convertImage (OCI layout to OCI layout)', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });
  const scratch = async (label: string): Promise<string> => {
    const d = await tmpDir(label);
    dirs.push(d);
    return d;
  };

  test('a Docker image becomes an OCI eStargz image with annotations and new diff_ids; a second run stores nothing', async () => {
    const dir = await scratch('conv');
    const tars = [
      await makeTar([
        { name: 'bin', type: 'directory' },
        { name: 'bin/tool', content: 'x'.repeat(300_000), mode: 0o755 },
        { name: 'bin/alias', type: 'link', linkname: 'bin/tool' },
      ]),
      await makeTar([{ name: 'etc/motd', content: 'hello\n' }, { name: 'etc/.wh.gone', content: '' }]),
    ];
    await layoutImage(path.join(dir, 'src'), tars, {
      layerMediaType: MEDIA_TYPE_DOCKER_LAYER_GZIP,
      manifestMediaType: MEDIA_TYPE_DOCKER_MANIFEST,
      configMediaType: MEDIA_TYPE_DOCKER_CONFIG,
    });
    const result = await convertLayouts(path.join(dir, 'src'), 'v1', path.join(dir, 'dst'), { chunkSizeBytes: 65536, prioritizedFiles: ['/etc/motd'] });
    assert.equal(result.descriptor.mediaType, MEDIA_TYPE_OCI_MANIFEST);
    assert.equal(result.blobsPushed, 3);

    const dst = await OciLayout.open(path.join(dir, 'dst'));
    const top = await dst.resolve('out');
    assert.equal(top.digest, result.descriptor.digest);
    const manifest = await readJson<ImageManifest>(dst, top.digest);
    assert.equal(manifest.mediaType, MEDIA_TYPE_OCI_MANIFEST);
    assert.equal(manifest.config.mediaType, MEDIA_TYPE_OCI_CONFIG);
    const config = await readJson<{ rootfs: { diff_ids: string[] }; config: unknown }>(dst, manifest.config.digest);
    assert.deepEqual(config.config, { Cmd: ['/bin/sh'] }, 'the rest of the config is kept');
    for (const [i, layer] of manifest.layers.entries()) {
      assert.equal(layer.mediaType, MEDIA_TYPE_OCI_LAYER_GZIP);
      const blob = await dst.readBlob(layer.digest, 1 << 24);
      const plain = gunzipSync(blob);
      assert.equal(config.rootfs.diff_ids[i], sha256(plain), 'diff_id is the sha256 of the decompressed blob');
      assert.equal(layer.annotations?.[ANNOTATION_UNCOMPRESSED_SIZE], String(plain.length));
      const { tocDigest, toc } = await readToc({ size: blob.length, readRange: (o, l) => Promise.resolve(blob.subarray(o, o + l)) });
      assert.equal(layer.annotations?.[ANNOTATION_TOC_DIGEST], tocDigest);
      const names = toc.entries.map((e) => e.name);
      if (i === 0) {
        assert.ok(names.includes('.no.prefetch.landmark') || names.includes('.prefetch.landmark'));
        assert.ok(toc.entries.filter((e) => e.name === 'bin/tool').length >= 4, 'the big file is chunked');
      } else {
        assert.deepEqual(names.slice(0, 2), ['etc/motd', '.prefetch.landmark'], 'prioritized file first, then the landmark');
      }
    }

    const again = await convertLayouts(path.join(dir, 'src'), 'v1', path.join(dir, 'dst'), { chunkSizeBytes: 65536, prioritizedFiles: ['/etc/motd'] });
    assert.equal(again.descriptor.digest, result.descriptor.digest, 'conversion is deterministic');
    assert.equal(again.blobsPushed, 0);
    assert.equal(again.blobsSkipped, 3);
  });

  test('an index gives the host platform manifest, or an index with allPlatforms', async () => {
    const dir = await scratch('conv-index');
    const host = hostPlatform();
    const a = await layoutImage(path.join(dir, 'src'), [await makeTar([{ name: 'a', content: 'a' }])], { tag: 'a' });
    const b = await layoutImage(path.join(dir, 'src'), [await makeTar([{ name: 'b', content: 'b' }])], { tag: 'b' });
    const sizeOf = async (d: string): Promise<number> => (await a.layout.readBlob(d, 1 << 20)).length;
    await layoutIndex(a.layout, 'multi', [
      { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: b.manifestDigest, size: await sizeOf(b.manifestDigest), platform: { os: 'linux', architecture: 'other-arch' } },
      { mediaType: MEDIA_TYPE_OCI_MANIFEST, digest: a.manifestDigest, size: await sizeOf(a.manifestDigest), platform: { os: host.os, architecture: host.architecture } },
    ]);
    const single = await convertLayouts(path.join(dir, 'src'), 'multi', path.join(dir, 'dst1'));
    assert.equal(single.descriptor.mediaType, MEDIA_TYPE_OCI_MANIFEST);
    assert.equal(single.layers[0]?.source.digest, a.layers[0]?.digest);

    const all = await convertLayouts(path.join(dir, 'src'), 'multi', path.join(dir, 'dst2'), { allPlatforms: true });
    assert.equal(all.descriptor.mediaType, MEDIA_TYPE_OCI_INDEX);
    const dst = await OciLayout.open(path.join(dir, 'dst2'));
    const index = await readJson<ImageIndex>(dst, all.descriptor.digest);
    assert.deepEqual(index.manifests.map((m) => m.platform?.architecture), ['other-arch', host.architecture]);
    for (const m of index.manifests) assert.ok(await dst.hasBlob(m.digest, m.size), 'child manifests are stored');

    await assert.rejects(
      convertLayouts(path.join(dir, 'src'), 'multi', path.join(dir, 'dst3'), { platforms: [{ os: 'linux', architecture: 'mips', variant: undefined }] }),
      /no manifest for platform linux\/mips \(it has: linux\/other-arch, /,
    );
  });

  /** Progress that records which layers started, and how many were converting at most at once. */
  const countingProgress = (onStart: (id: string) => void = () => undefined) => {
    const started: string[] = [];
    let active = 0;
    let peak = 0;
    const progress: ConvertProgress = {
      layerStart: (id) => {
        started.push(id);
        peak = Math.max(peak, ++active);
        onStart(id);
      },
      layerRead: () => undefined,
      layerWrite: () => undefined,
      layerUpload: () => undefined,
      layerDone: () => void active--,
      note: () => undefined,
      close: () => undefined,
    };
    return { progress, started, peak: () => peak };
  };

  test('never converts more than `concurrency` layers at once, starting them in order', async () => {
    const dir = await scratch('conv-limit');
    const tars = await Promise.all(Array.from({ length: 5 }, (_, i) => makeTar([{ name: `f${i}`, content: `${i}`.repeat(100_000) }])));
    const img = await layoutImage(path.join(dir, 'src'), tars);
    const count = countingProgress();
    const result = await convertLayouts(path.join(dir, 'src'), 'v1', path.join(dir, 'dst'), { concurrency: 2, progress: count.progress });
    assert.equal(result.layers.length, 5);
    assert.deepEqual(count.started, img.layers.map((l) => l.digest));
    assert.equal(count.peak(), 2);
  });

  test('an aborted conversion starts no more layers', async () => {
    const dir = await scratch('conv-abort');
    const tars = await Promise.all(Array.from({ length: 3 }, (_, i) => makeTar([{ name: `f${i}`, content: `${i}` }])));
    const img = await layoutImage(path.join(dir, 'src'), tars);
    const abort = new AbortController();
    const reason = new Error('interrupted');
    const count = countingProgress(() => abort.abort(reason));
    await assert.rejects(
      convertLayouts(path.join(dir, 'src'), 'v1', path.join(dir, 'dst'), { concurrency: 1, progress: count.progress, signal: abort.signal }),
      (err: unknown) => err === reason,
    );
    assert.deepEqual(count.started, [img.layers[0]?.digest], 'the layers waiting for a slot never started');
  });

  const hostile: Array<[string, () => Promise<Buffer>, RegExp]> = [
    ['a truncated gzip layer', () => Promise.resolve(Buffer.alloc(0)), /layer 2\/2 \(sha256:[0-9a-f]{64}\): .*(unexpected end of file|truncated)/],
    ['a corrupt gzip layer', () => Promise.resolve(Buffer.alloc(0)), /layer 2\/2 \(sha256:[0-9a-f]{64}\): .*(incorrect header check|invalid|corrupt)/],
    ['a ../ entry', async () => makeTar([{ name: 'ok', content: 'a' }, { name: '../../escape', content: 'x' }]), /layer 2\/2 \(sha256:[0-9a-f]{64}\): tar entry "\.\.\/\.\.\/escape"/],
    ['an absolute entry', () => Promise.resolve(rawTar([{ header: rawHeader('/abs', { size: 1 }), payload: Buffer.from('x') }])), /layer 2\/2 .*tar entry "\/abs": name is an absolute path/],
  ];
  for (const [what, makeLayer, pattern] of hostile) {
    test(`${what}: a clear error naming the layer, and nothing tagged at DST`, async () => {
      const dir = await scratch('conv-bad');
      const good = await makeTar([{ name: 'fine', content: 'fine' }]);
      const second = what.includes('gzip') ? await makeTar([{ name: 'big', content: Buffer.alloc(200_000, 7) }, { name: 'after', content: 'x' }]) : await makeLayer();
      await layoutImage(path.join(dir, 'src'), [good, second], {
        blobs: (i, gz) => {
          if (i !== 1) return gz;
          if (what.includes('truncated')) return gz.subarray(0, Math.floor(gz.length / 2));
          if (what.includes('corrupt')) {
            const bad = Buffer.from(gz);
            bad.fill(0x55, 20, 60);
            return bad;
          }
          return gz;
        },
      });
      await assert.rejects(convertLayouts(path.join(dir, 'src'), 'v1', path.join(dir, 'dst')), (err: unknown) => {
        assert.ok(err instanceof LayerConversionError, String(err));
        assert.match(err.message, pattern);
        if (process.env.SHOW_ERRORS !== undefined) console.log(err.message);
        return true;
      });
      const index = JSON.parse(await readFile(path.join(dir, 'dst', 'index.json'), 'utf8')) as ImageIndex;
      assert.equal(index.manifests.length, 0, 'no tag written');
    });
  }
});
