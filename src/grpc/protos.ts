/**
 * Our .proto files (proto/ at the repository root), loaded for gRPC: one place for where they are and which
 * files each user needs, so the containerd client, the Snapshots service and the CRI proxy load them alike.
 *
 * Field names are always kept as written (keepCase): every caller wants the wire names. (Loading from a
 * prebuilt JSON descriptor instead was measured: it saves about 5 of the 35 ms, most of which is
 * proto-loader building the package definition, not parsing.)
 */
import fs from 'node:fs';
import path from 'node:path';
import * as protoLoader from '@grpc/proto-loader';
import * as protobuf from 'protobufjs';

/** The proto files of each set, relative to proto/. */
export const PROTO_SETS = {
  containerd: [
    'containerd/services/content/v1/content.proto',
    'containerd/services/images/v1/images.proto',
    'containerd/services/leases/v1/leases.proto',
    'containerd/services/diff/v1/diff.proto',
    'containerd/services/namespaces/v1/namespace.proto',
    'containerd/services/snapshots/v1/snapshots.proto',
  ],
  /** The daemon's own service alone: the whole containerd set takes several times as long to load, before it can listen. */
  snapshots: ['containerd/services/snapshots/v1/snapshots.proto'],
  cri: ['runtime/v1/api.proto'],
} as const satisfies Record<string, readonly string[]>;

export type ProtoSet = keyof typeof PROTO_SETS;

/** How the messages are handed over; keepCase is implied. */
export type LoadOptions = Omit<protoLoader.Options, 'keepCase' | 'includeDirs'>;

/** Finds proto/ by walking up from this file: it sits at src/grpc (sources) or dist/src/grpc (built). */
export function findProtoDir(start: string = __dirname): string {
  const probe = PROTO_SETS.containerd[0];
  for (let dir = start; ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, 'proto');
    if (fs.existsSync(path.join(candidate, probe))) return candidate;
    if (path.dirname(dir) === dir) throw new Error(`cannot find proto/${probe} above ${start}`);
  }
}

/** The package definition of a set (google/protobuf types come with protobufjs). */
export function loadProtoSet(set: ProtoSet, options: LoadOptions, protoDir: string = findProtoDir()): protoLoader.PackageDefinition {
  return protoLoader.loadSync([...PROTO_SETS[set]], { ...options, keepCase: true, includeDirs: [protoDir] });
}

/**
 * The protobufjs root of a set, parsed as proto-loader parses it (keepCase; our files found under proto/, the
 * google/protobuf ones from protobufjs's bundle): for a message encoded with protobufjs's own Type.encode from
 * objects already shaped like it, where proto-loader's serializer would convert every object first.
 */
export function loadProtoRoot(set: ProtoSet, protoDir: string = findProtoDir()): protobuf.Root {
  const root = new protobuf.Root();
  const bundled = root.resolvePath.bind(root);
  root.resolvePath = (origin, target) => {
    const ours = path.join(protoDir, target);
    return fs.existsSync(ours) ? ours : bundled(origin, target);
  };
  root.loadSync([...PROTO_SETS[set]], { keepCase: true });
  root.resolveAll();
  return root;
}
