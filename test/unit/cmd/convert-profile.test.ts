/** `stargaze convert --prefetch-profile`: a profile's files become the prioritized files, in its read order. */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { readToc } from '../../../src/estargz/toc';
import type { ImageManifest } from '../../../src/image/media-types';
import { OciLayout } from '../../../src/image/oci-layout';
import { profileFiles, serializeProfile } from '../../../src/profile/profile-format';
import { layoutImage, makeTar, tmpDir } from '../image/helpers';
import { sampleProfile } from '../profile/sample';

const exec = promisify(execFile);
const CLI = path.resolve(__dirname, '..', '..', '..', 'src', 'cli.js');

test('profileFiles: absolute paths, each once, first-read order across profiles', () => {
  const a = sampleProfile({ entries: [{ name: 'usr/b', offset: 0 }, { name: 'usr/a', offset: 0 }, { name: 'usr/b', offset: 4096 }] });
  const b = sampleProfile({ entries: [{ name: 'usr/c', offset: 0 }, { name: 'usr/a', offset: 0 }] });
  assert.deepEqual(profileFiles([a, b]), ['/usr/b', '/usr/a', '/usr/c']);
});

test('convert writes the files a profile names first, in its order, then the landmark; a bad profile is a usage error', async (t) => {
  const dir = await tmpDir('convert-profile');
  t.after(() => rm(dir, { recursive: true, force: true }));
  const tar = await makeTar([
    { name: 'app/', type: 'directory' },
    { name: 'app/a.txt', content: 'a\n' },
    { name: 'app/b.txt', content: 'b\n' },
    { name: 'app/c.txt', content: 'c\n' },
  ]);
  await layoutImage(path.join(dir, 'src'), [tar]);
  const profile = path.join(dir, 'profile.json');
  await writeFile(profile, serializeProfile(sampleProfile({ entries: [{ name: 'app/c.txt', offset: 0 }, { name: 'app/a.txt', offset: 0 }] })));
  await exec(process.execPath, [CLI, 'convert', '--quiet', '--prefetch-profile', profile, `oci:${path.join(dir, 'src')}:v1`, `oci:${path.join(dir, 'dst')}:out`]);

  const dst = await OciLayout.open(path.join(dir, 'dst'));
  const manifest = JSON.parse((await dst.readBlob((await dst.resolve('out')).digest, 1 << 20)).toString()) as ImageManifest;
  const blob = await dst.readBlob(manifest.layers[0]!.digest, 1 << 24);
  const { toc } = await readToc({ size: blob.length, readRange: (o, l) => Promise.resolve(blob.subarray(o, o + l)) });
  const names = toc.entries.map((e) => e.name).filter((n) => n !== 'app/' && n !== 'app');
  assert.deepEqual(names.slice(0, 3), ['app/c.txt', 'app/a.txt', '.prefetch.landmark']);

  await writeFile(path.join(dir, 'bad.json'), '{"version": 3}');
  const failed = await exec(process.execPath, [CLI, 'convert', '--prefetch-profile', path.join(dir, 'bad.json'), 'oci:x:v1', 'oci:y:v1']).then(
    () => undefined,
    (err: unknown) => err as { code: number; stderr: string },
  );
  assert.equal(failed?.code, 2);
  assert.match(failed?.stderr ?? '', /--prefetch-profile: .*bad\.json: profile version 3 is not 1/);
});
