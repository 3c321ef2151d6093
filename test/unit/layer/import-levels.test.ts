/**
 * The import levels around the layer hold: layer/ never imports the mount side (fuse/, fs/) nor what sits
 * above it, fs/ never imports snapshot/ (the RemoteFileSystem seam lives in fs/), and reader/ never imports
 * layer/. Read from the sources, so a new import that breaks a level fails here rather than in review.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';

const SRC = path.resolve(__dirname, '../../../../src');

/** Lowest first; a folder imports only lower levels (and itself). Top-level files not named here are leaf helpers. */
const LEVELS: Record<string, number> = {
  errors: 0, log: 0, config: 0, source: 0, metrics: 0, grpc: 0,
  estargz: 1, remote: 1, cache: 1,
  metadata: 2, reader: 2, task: 2,
  layer: 3,
  fuse: 4,
  fs: 5,
  snapshot: 6, image: 6, containerd: 6,
  service: 7,
  cmd: 8, cli: 8,
};

/** The folder (or top-level module) a path under src/ belongs to. */
function unitOf(file: string): string {
  const [first, second] = path.relative(SRC, file).split(path.sep);
  return second === undefined ? first!.replace(/\.ts$/, '') : first!;
}

/** The src/ units that `folder`'s files import. */
function importsOf(folder: string): { file: string; unit: string }[] {
  const found: { file: string; unit: string }[] = [];
  for (const name of readdirSync(path.join(SRC, folder))) {
    if (!name.endsWith('.ts')) continue;
    const file = path.join(SRC, folder, name);
    for (const m of readFileSync(file, 'utf8').matchAll(/^(?:import|export)[^;]*?from '(\.[^']+)'/gm)) {
      found.push({ file: `${folder}/${name}`, unit: unitOf(path.resolve(path.dirname(file), m[1]!)) });
    }
  }
  return found;
}

for (const folder of ['layer', 'fs', 'fuse']) {
  test(`${folder}/ imports only lower levels`, () => {
    const level = LEVELS[folder]!;
    const above = importsOf(folder).filter(({ unit }) => unit !== folder && (LEVELS[unit] ?? 0) >= level);
    assert.deepEqual(above, [], `${folder}/ (level ${level}) imports these at its level or above`);
  });
}

test('reader/ does not import layer/ nor anything above it', () => {
  assert.deepEqual(importsOf('reader').filter(({ unit }) => (LEVELS[unit] ?? 0) > LEVELS.reader!), []);
});
