/**
 * The server's List and Stat answers (protobufjs's Type.encode over message objects built from the infos), read
 * back with proto-loader's decoder of our protos (the one containerd's messages are checked against elsewhere):
 * every field, the defaults proto3 leaves out, lengths past one varint byte, multi-byte UTF-8, times before 1970
 * and at 0.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { loadSnapshotsService, snapshotsServerDefinition } from '../../../src/service/snapshots-service';
import type { SnapshotInfo } from '../../../src/snapshot/snapshot-info';

const service = loadSnapshotsService();
const decodeList = service.List!.responseDeserialize;
const decodeStat = service.Stat!.responseDeserialize;
const server = snapshotsServerDefinition();
const encodeListResponse = server.List!.responseSerialize as (infos: SnapshotInfo[]) => Buffer;
const encodeStatResponse = server.Stat!.responseSerialize as (info: SnapshotInfo) => Buffer;

interface Decoded {
  name: string;
  parent: string;
  kind: string;
  created_at: { seconds: string; nanos: number } | null;
  updated_at: { seconds: string; nanos: number } | null;
  labels: Record<string, string>;
}

/** What the decoder must give back for `info` (the loader's options: longs as strings, enums as names, defaults). */
function expected(info: SnapshotInfo): Decoded {
  const ts = (ns: bigint): { seconds: string; nanos: number } => {
    let s = ns / 1_000_000_000n;
    let n = ns % 1_000_000_000n;
    if (n < 0n) {
      s -= 1n;
      n += 1_000_000_000n;
    }
    return { seconds: s.toString(), nanos: Number(n) };
  };
  return {
    name: info.name,
    parent: info.parent,
    kind: info.kind.toUpperCase(),
    created_at: ts(info.createdAt),
    updated_at: ts(info.updatedAt),
    labels: info.labels,
  };
}

const INFOS: SnapshotInfo[] = [
  {
    name: 'sha256:' + 'a'.repeat(64),
    parent: 'sha256:' + 'b'.repeat(64),
    kind: 'committed',
    createdAt: 1_796_656_331_116_155_977n,
    updatedAt: 1_796_656_331_116_155_978n,
    labels: { 'containerd.io/snapshot.ref': 'sha256:' + 'c'.repeat(64), 'containerd.io/snapshot/remote': 'remote snapshot' },
  },
  { name: 'extract-1 root', parent: '', kind: 'active', createdAt: 0n, updatedAt: 1n, labels: {} },
  { name: 'v', parent: 'p', kind: 'view', createdAt: -1_500_000_000n, updatedAt: 2_000_000_000n, labels: { e: '' } },
  {
    name: 'ünïcødé ✓ 𝄞',
    parent: 'x'.repeat(300),
    kind: 'committed',
    createdAt: 1_000_000_000n * 2n ** 40n,
    updatedAt: 5n,
    labels: { ['k'.repeat(200)]: 'v'.repeat(3800), 'ключ': 'значение 🙂' },
  },
];

describe('snapshots List and Stat answers', () => {
  it('a List answer decodes to the infos, in order', () => {
    const decoded = decodeList(encodeListResponse(INFOS)) as { info: Decoded[] };
    assert.deepEqual(decoded.info, INFOS.map(expected));
  });

  it('an empty List answer is an empty message', () => {
    const bytes = encodeListResponse([]);
    assert.equal(bytes.length, 0);
    assert.deepEqual((decodeList(bytes) as { info: Decoded[] }).info, []);
  });

  it('fields at their proto3 defaults are left out, as Go writes them', () => {
    const bare: SnapshotInfo = { name: 'n', parent: '', kind: 'active', createdAt: 0n, updatedAt: 0n, labels: {} };
    // info (1, bytes) of 9: name (1) "n", kind (3) ACTIVE = 2, created_at (4) and updated_at (5) empty; no parent.
    const bytes = [0x0a, 9, 0x0a, 1, 0x6e, 0x18, 2, 0x22, 0, 0x2a, 0];
    assert.deepEqual([...encodeStatResponse(bare)], bytes);
    assert.deepEqual([...encodeListResponse([bare])], bytes);
  });

  it('a Stat answer decodes to its one info', () => {
    for (const info of INFOS) {
      assert.deepEqual((decodeStat(encodeStatResponse(info)) as { info: Decoded }).info, expected(info));
    }
  });

  it('a hundred infos, as a List batch holds, decode to themselves', () => {
    const batch = Array.from({ length: 100 }, (_, i): SnapshotInfo => ({
      name: `sha256:${String(i).padStart(64, '0')}`,
      parent: i === 0 ? '' : `sha256:${String(i - 1).padStart(64, '0')}`,
      kind: 'committed',
      createdAt: 1_796_656_331_000_000_000n + BigInt(i),
      updatedAt: 1_796_656_331_000_000_000n + BigInt(i),
      labels: { 'containerd.io/snapshot/bench.group': String(i % 20) },
    }));
    assert.deepEqual((decodeList(encodeListResponse(batch)) as { info: Decoded[] }).info, batch.map(expected));
  });
});
