/**
 * The layers labels a profile is keyed by, and the manifest digest a mount looks referrers up with: rpull's
 * and CRI's labels give the same layers list (so the same profile key), and rpull now names the manifest.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { layerProfileKeys } from '../../../src/cmd/profile-push';
import { chainIds, layersLabel } from '../../../src/containerd/image';
import { layerLabels } from '../../../src/containerd/pull';
import { profileKeyOf } from '../../../src/layer/layer-profile';
import { CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, layerSourceFromLabels, STARGAZE_MANIFEST_DIGEST, STARGZ_LAYERS, TARGET_SNAPSHOT_REF } from '../../../src/source/labels';

const d = (n: number): string => `sha256:${n.toString(16).padStart(64, '0')}`;

test('rpull and CRI list the same layers under their label keys, cut at the same digest', () => {
  for (const count of [1, 3, 56, 57, 80]) {
    const digests = Array.from({ length: count }, (_, i) => d(i + 1));
    for (const i of [0, 1, count - 1].filter((x) => x >= 0 && x < count)) {
      const stargz = layersLabel(STARGZ_LAYERS, digests, i);
      assert.equal(stargz, layersLabel(CRI_IMAGE_LAYERS, digests, i), `${count} layers, layer ${i}`);
      assert.ok(Buffer.byteLength(STARGZ_LAYERS) + stargz.length <= 4096, 'within the label size limit');
      assert.equal(stargz.split(',').length, Math.min(56, count - i), 'as many as containerd keeps (56 sha256 digests)');
    }
  }
});

test("a mount's profile key from rpull's labels or CRI's is the one profile push looks under", () => {
  const digests = Array.from({ length: 60 }, (_, i) => d(i + 1));
  const chain = chainIds(Array.from({ length: 60 }, (_, i) => d(1000 + i)));
  const descs = digests.map((digest) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest, size: 1 }));
  for (const i of [0, 3, 59]) {
    const rpull = layerSourceFromLabels(layerLabels('reg/app:v1', descs, i, chain[i]!, 0, d(99)))!;
    const cri = layerSourceFromLabels({
      [TARGET_SNAPSHOT_REF]: chain[i]!,
      [CRI_IMAGE_REF]: 'reg/app:v1',
      [CRI_LAYER_DIGEST]: digests[i]!,
      [CRI_IMAGE_LAYERS]: layersLabel(CRI_IMAGE_LAYERS, digests, i),
      [CRI_MANIFEST_DIGEST]: d(99),
    })!;
    assert.equal(profileKeyOf(rpull), profileKeyOf(cri));
    assert.deepEqual(layerProfileKeys(digests, chain, i), [profileKeyOf(rpull)]);
  }
});

test('the manifest digest label: rpull sets ours, CRI its own (first), nothing else is taken', () => {
  const descs = [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: d(1), size: 1 }];
  const labels = layerLabels('reg/app:v1', descs, 0, d(1), 0, d(7));
  assert.equal(labels[STARGAZE_MANIFEST_DIGEST], d(7));
  assert.equal(layerSourceFromLabels(labels)?.manifestDigest, d(7));
  assert.equal(layerLabels('reg/app:v1', descs, 0, d(1), 0)[STARGAZE_MANIFEST_DIGEST], undefined, 'no digest, no label');
  assert.equal(layerSourceFromLabels({ ...labels, [CRI_MANIFEST_DIGEST]: d(8) })?.manifestDigest, d(8));
  assert.equal(layerSourceFromLabels({ ...labels, [STARGAZE_MANIFEST_DIGEST]: 'sha256:nothex' })?.manifestDigest, undefined);
  const { [STARGAZE_MANIFEST_DIGEST]: _, ...ctrRemote } = labels;
  assert.equal(layerSourceFromLabels(ctrRemote)?.manifestDigest, undefined, 'ctr-remote names no manifest: local profiles only');
});
