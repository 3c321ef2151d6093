import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

import { log as rootLog } from '../../../src/log';
import type { Layer } from '../../../src/layer/layer';
import { PreOpener } from '../../../src/layer/pre-open';
import type { LayerSourceInfo } from '../../../src/source/labels';

const log = rootLog.child({}, { level: 'silent' });
const digestOf = (c: string): string => `sha256:${c.repeat(64)}`;

function sourceOf(digest: string, layers: string[]): LayerSourceInfo {
  return { ref: 'registry.test/img:1', digest, layers } as LayerSourceInfo;
}

/** Stands in for a Layer: what the opener does with one is close it; the payload is what it must not pin. */
function fakeLayer(): Layer & { closed: boolean; payload: Buffer } {
  const layer = { closed: false, payload: Buffer.alloc(1024), close: () => void (layer.closed = true) };
  return layer as unknown as Layer & { closed: boolean; payload: Buffer };
}

test('PreOpener: once claimed, nothing of the opener holds the layer', async () => {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  let payload: WeakRef<Buffer> | undefined;
  const opener = new PreOpener(60_000, () => {
    const l = fakeLayer();
    payload = new WeakRef(l.payload);
    return Promise.resolve(l);
  });
  opener.openNeighbours(sourceOf(digestOf('a'), [digestOf('a'), digestOf('b')]), () => false, log);
  // The mount that claims it is done with it at once (here); a layer it serves lives as long as its mount.
  await (async (): Promise<void> => assert.ok((await opener.claim('registry.test/img:1', digestOf('b'))) !== undefined))();
  assert.equal(opener.claim('registry.test/img:1', digestOf('b')), undefined, 'claimed once');
  await new Promise((r) => setImmediate(r));
  gc();
  assert.equal(payload?.deref(), undefined, 'the TTL timer (a minute away) must not pin a claimed layer');
  opener.close();
});

test('PreOpener: a layer whose mount does not come within the TTL is closed', async () => {
  let opened: (Layer & { closed: boolean }) | undefined;
  const opener = new PreOpener(20, () => Promise.resolve((opened = fakeLayer())));
  opener.openNeighbours(sourceOf(digestOf('a'), [digestOf('a'), digestOf('b')]), () => false, log);
  await new Promise((r) => setTimeout(r, 60));
  assert.equal(opened?.closed, true);
  assert.equal(opener.claim('registry.test/img:1', digestOf('b')), undefined, 'gone after its TTL');
});

test('PreOpener: close() closes the layers not claimed', async () => {
  let opened: (Layer & { closed: boolean }) | undefined;
  const opener = new PreOpener(60_000, () => Promise.resolve((opened = fakeLayer())));
  opener.openNeighbours(sourceOf(digestOf('a'), [digestOf('a'), digestOf('b')]), () => false, log);
  opener.close();
  await new Promise((r) => setImmediate(r));
  assert.equal(opened?.closed, true);
});
