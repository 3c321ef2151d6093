/**
 * The proto sets (src/grpc/protos.ts): each finds its files from the built tree and holds the services its
 * users look up, with the wire paths containerd and kubelet call.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type * as protoLoader from '@grpc/proto-loader';
import { loadProtoSet } from '../../../src/grpc/protos';

const OPTIONS = { longs: String, enums: String, defaults: true, oneofs: true };

function service(def: protoLoader.PackageDefinition, name: string): protoLoader.ServiceDefinition {
  const entry = def[name];
  assert.ok(entry !== undefined && !('format' in entry), `${name} is a service`);
  return entry;
}

describe('proto sets', () => {
  it('containerd: the services rpull and the daemon speak, with field names as written', () => {
    const def = loadProtoSet('containerd', OPTIONS);
    for (const name of ['content.v1.Content', 'images.v1.Images', 'leases.v1.Leases', 'diff.v1.Diff', 'namespaces.v1.Namespaces', 'snapshots.v1.Snapshots']) {
      service(def, `containerd.services.${name}`);
    }
    const snapshots = service(def, 'containerd.services.snapshots.v1.Snapshots');
    assert.equal(snapshots.Prepare!.path, '/containerd.services.snapshots.v1.Snapshots/Prepare');
    const reply = { info: { name: 'n', kind: 'COMMITTED', created_at: { seconds: '1700000000', nanos: 5 } } };
    const decoded = snapshots.Stat!.responseDeserialize(snapshots.Stat!.responseSerialize(reply)) as { info: { created_at: { seconds: string } } };
    assert.equal(decoded.info.created_at.seconds, '1700000000', 'keepCase, and int64 as a string');
  });

  it('cri: the image service kubelet calls', () => {
    const images = service(loadProtoSet('cri', OPTIONS), 'runtime.v1.ImageService');
    assert.equal(images.PullImage!.path, '/runtime.v1.ImageService/PullImage');
  });
});
