/**
 * The Snapshots gRPC service end to end: a real grpc-js client over a real unix socket in a tmp dir,
 * served by startSnapshotServer over a real Snapshotter. The remote path uses a RemoteFileSystem test
 * double (it writes a marker file instead of mounting) so no registry is needed.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import pino from 'pino';
import { FailedPreconditionError, NotFoundError, UnavailableError, UsageError } from '../../../src/errors';
import { grpcStatusOf } from '../../../src/service/grpc-status';
import { LIST_BATCH_SIZE, loadSnapshotsService, startSnapshotServer, type SnapshotServer } from '../../../src/service/snapshots-service';
import type { RemoteFileSystem } from '../../../src/fs/remote-file-system';
import { Snapshotter } from '../../../src/snapshot/snapshotter';
import { STARGZ_DIGEST, STARGZ_REFERENCE, TARGET_SNAPSHOT_REF } from '../../../src/source/labels';

interface WireMount {
  type: string;
  source: string;
  target: string;
  options: string[];
}
interface WireInfo {
  name: string;
  parent: string;
  kind: string;
  created_at: { seconds: string; nanos: number };
  updated_at: { seconds: string; nanos: number };
  labels: Record<string, string>;
}
type Callback<T> = (err: grpc.ServiceError | null, res: T) => void;
type UnaryMethod = (req: object, cb: Callback<unknown>) => void;

/** Test double: "mounts" by writing a file; check() fails when told to. */
class FakeRemoteFileSystem implements RemoteFileSystem {
  checkError: Error | undefined;
  async mount(mountpoint: string): Promise<void> {
    await fs.promises.writeFile(path.join(mountpoint, 'marker'), 'remote');
  }
  check(): Promise<void> {
    return this.checkError !== undefined ? Promise.reject(this.checkError) : Promise.resolve();
  }
  async unmount(): Promise<void> {}
}

let dir: string;
let address: string;
let snapshotter: Snapshotter;
let server: SnapshotServer;
let client: grpc.Client;
let remote: FakeRemoteFileSystem;
const silent = pino({ level: 'silent' });

function call<T>(method: string, req: object): Promise<T> {
  const fn = (client as unknown as Record<string, UnaryMethod>)[method]!.bind(client);
  return new Promise<T>((resolve, reject) => fn(req, (err, res) => (err ? reject(err) : resolve(res as T))));
}

function list(filters: string[] = []): Promise<WireInfo[][]> {
  const fn = (client as unknown as Record<string, (req: object) => grpc.ClientReadableStream<{ info: WireInfo[] }>>)['List']!.bind(client);
  return new Promise((resolve, reject) => {
    const batches: WireInfo[][] = [];
    const stream = fn({ snapshotter: 'stargaze', filters });
    stream.on('data', (m: { info: WireInfo[] }) => batches.push(m.info));
    stream.on('error', reject);
    stream.on('end', () => resolve(batches));
  });
}

async function rejectsWith(p: Promise<unknown>, code: grpc.status, message?: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    const e = err as grpc.ServiceError;
    assert.equal(e.code, code, `expected ${grpc.status[code]}, got ${grpc.status[e.code]}: ${e.details}`);
    if (message !== undefined) assert.match(e.details, message);
    return true;
  });
}

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'stargaze-svc-'));
  address = path.join(dir, 'run', 'nested', 'stargaze.sock');
  remote = new FakeRemoteFileSystem();
  snapshotter = await Snapshotter.open({ root: path.join(dir, 'root'), fs: remote, log: silent });
  server = await startSnapshotServer({ snapshotter, address, log: silent });
  const Ctor = grpc.makeClientConstructor(loadSnapshotsService(), 'Snapshots');
  client = new Ctor(`unix://${address}`, grpc.credentials.createInsecure());
});

afterEach(async () => {
  client.close();
  await server.close();
  await snapshotter.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('Snapshots gRPC service', () => {
  it('serves the socket with mode 0600 in a created parent dir, and removes it on close', async () => {
    const st = fs.lstatSync(address);
    assert.ok(st.isSocket());
    assert.equal(st.mode & 0o777, 0o600);
    await server.close();
    assert.equal(fs.existsSync(address), false);
  });

  it('runs the containerd lifecycle: prepare, commit, stat, view, mounts, usage, update, remove, cleanup', async () => {
    const p = await call<{ mounts: WireMount[] }>('Prepare', { snapshotter: 'stargaze', key: 'k', parent: '', labels: { a: '1' } });
    assert.equal(p.mounts.length, 1);
    assert.equal(p.mounts[0]!.type, 'bind');
    assert.deepEqual(p.mounts[0]!.options, ['rw', 'rbind']);
    fs.writeFileSync(path.join(p.mounts[0]!.source, 'file'), Buffer.alloc(5000, 7));

    const usage = await call<{ size: string; inodes: string }>('Usage', { key: 'k' });
    assert.equal(usage.inodes, '2');
    assert.ok(Number(usage.size) >= 5000);

    await call('Commit', { name: 'c', key: 'k', labels: { b: '2' } });
    const stat = await call<{ info: WireInfo }>('Stat', { key: 'c' });
    assert.equal(stat.info.name, 'c');
    assert.equal(stat.info.kind, 'COMMITTED');
    assert.equal(stat.info.parent, '');
    assert.deepEqual(stat.info.labels, { b: '2' });
    const info = await snapshotter.stat('c');
    assert.equal(BigInt(stat.info.created_at.seconds) * 1_000_000_000n + BigInt(stat.info.created_at.nanos), info.createdAt);
    assert.deepEqual(stat.info.created_at, stat.info.updated_at);

    const v = await call<{ mounts: WireMount[] }>('View', { key: 'v', parent: 'c' });
    assert.deepEqual(v.mounts[0]!.options, ['ro', 'rbind']);
    assert.deepEqual((await call<{ mounts: WireMount[] }>('Mounts', { key: 'v' })).mounts, v.mounts);
    const child = await call<{ mounts: WireMount[] }>('Prepare', { key: 'child', parent: 'c' });
    assert.equal(child.mounts[0]!.type, 'overlay');

    const updated = await call<{ info: WireInfo }>('Update', {
      info: { name: 'c', labels: { b: '3', extra: 'x' } },
      update_mask: { paths: ['labels.b'] },
    });
    assert.deepEqual(updated.info.labels, { b: '3' });
    const all = await call<{ info: WireInfo }>('Update', { info: { name: 'c', labels: { z: '9' } } });
    assert.deepEqual(all.info.labels, { z: '9' }, 'no mask: all mutable fields');

    await call('Remove', { key: 'child' });
    await call('Remove', { key: 'v' });
    await call('Cleanup', {});
    assert.equal(fs.readdirSync(path.join(dir, 'root', 'snapshots')).length, 1);
  });

  it('maps errors to the status codes containerd expects', async () => {
    await rejectsWith(call('Stat', { key: 'missing' }), grpc.status.NOT_FOUND);
    await rejectsWith(call('Prepare', { key: '' }), grpc.status.INVALID_ARGUMENT, /key must not be empty/);
    await rejectsWith(call('Commit', { name: 'x', key: '' }), grpc.status.INVALID_ARGUMENT);
    await rejectsWith(call('Update', { update_mask: { paths: [] } }), grpc.status.INVALID_ARGUMENT);
    await call('Prepare', { key: 'a' });
    await rejectsWith(call('Prepare', { key: 'a' }), grpc.status.ALREADY_EXISTS);
    await rejectsWith(call('Prepare', { key: 'b', parent: 'nope' }), grpc.status.NOT_FOUND);
    await rejectsWith(call('Update', { info: { name: 'a' }, update_mask: { paths: ['parent'] } }), grpc.status.INVALID_ARGUMENT);
    await call('Commit', { name: 'base', key: 'a' });
    await rejectsWith(call('Commit', { name: 'base2', key: 'base' }), grpc.status.FAILED_PRECONDITION);
    await call('View', { key: 'v', parent: 'base' });
    await rejectsWith(call('Remove', { key: 'base' }), grpc.status.FAILED_PRECONDITION, /remove/);
    await rejectsWith(call('Mounts', { key: 'base' }), grpc.status.FAILED_PRECONDITION);
    await rejectsWith(list(['labels.']), grpc.status.INVALID_ARGUMENT, /filters: parse error/);
    const big = 'x'.repeat(4097);
    await rejectsWith(call('Prepare', { key: 'big', labels: { k: big } }), grpc.status.INVALID_ARGUMENT, /maximum size/);
  });

  it('lists in batches of 100 and honours filters', async () => {
    for (let i = 0; i < 2 * LIST_BATCH_SIZE + 50; i++) await snapshotter.view(`v-${i}`, '', i % 2 === 0 ? { even: 'yes' } : {});
    const batches = await list();
    assert.deepEqual(batches.map((b) => b.length), [100, 100, 50]);
    const even = (await list(['labels.even==yes'])).flat();
    assert.equal(even.length, 125);
    assert.ok(even.every((i) => i.kind === 'VIEW'));
    assert.deepEqual(await list(['name==none']), []);
  });

  it('serves hundreds of committed snapshots in chains: List in messages of at most 100, filtered List, Stat and Usage', async () => {
    // As containerd unpacks: Prepare on the previous layer, write into it, Commit under the chain id; 6 chains of 50.
    const chains = 6;
    const depth = 50;
    const group = (c: number): string => String(c % 4);
    const created = new Map<string, { parent: string; group: string; bytes: number }>();
    for (let c = 0; c < chains; c++) {
      let parent = '';
      for (let l = 0; l < depth; l++) {
        const name = `sha256:chain-${c}-layer-${l}`;
        const key = `extract-${c}-${l} ${name}`;
        const labels = { 'containerd.io/snapshot/bench.group': group(c) };
        const { mounts } = await call<{ mounts: WireMount[] }>('Prepare', { key, parent, labels });
        const upper = mounts[0]!.type === 'bind' ? mounts[0]!.source : /upperdir=([^,]+)/.exec(mounts[0]!.options.join(','))![1]!;
        const bytes = l % 10 === 0 ? 8192 : 0;
        if (bytes > 0) fs.writeFileSync(path.join(upper, 'file'), Buffer.alloc(bytes, 1));
        await call('Commit', { name, key, labels });
        created.set(name, { parent, group: group(c), bytes });
        parent = name;
      }
    }
    const messages = await list();
    assert.ok(messages.every((m) => m.length > 0 && m.length <= LIST_BATCH_SIZE), `message sizes ${messages.map((m) => m.length).join(',')}`);
    const listed = messages.flat();
    assert.deepEqual(listed.map((i) => i.name).sort(), [...created.keys()].sort());
    for (const info of listed) {
      const want = created.get(info.name)!;
      assert.equal(info.kind, 'COMMITTED');
      assert.equal(info.parent, want.parent);
      assert.deepEqual(info.labels, { 'containerd.io/snapshot/bench.group': want.group });
    }

    const byGroup = await list(['labels."containerd.io/snapshot/bench.group"==1']);
    assert.ok(byGroup.every((m) => m.length <= LIST_BATCH_SIZE));
    const wantGroup = [...created].filter(([, c]) => c.group === '1').map(([n]) => n);
    assert.deepEqual(byGroup.flat().map((i) => i.name).sort(), wantGroup.sort());
    // containerd's look-up after a remote Prepare answered AlreadyExists: one snapshot by label and parent.
    const one = (await list(['labels."containerd.io/snapshot/bench.group"==2,parent==sha256:chain-2-layer-9'])).flat();
    assert.deepEqual(one.map((i) => i.name), ['sha256:chain-2-layer-10']);
    const either = (await list(['name==sha256:chain-0-layer-0', 'parent==sha256:chain-5-layer-48'])).flat();
    assert.deepEqual(either.map((i) => i.name).sort(), ['sha256:chain-0-layer-0', 'sha256:chain-5-layer-49']);

    for (const [name, want] of created) {
      const { info } = await call<{ info: WireInfo }>('Stat', { key: name });
      assert.equal(info.name, name);
      assert.equal(info.parent, want.parent);
      const usage = await call<{ size: string; inodes: string }>('Usage', { key: name });
      assert.equal(usage.inodes, want.bytes > 0 ? '2' : '1', name);
      // An empty upper dir is one directory's blocks; one with the file holds its 8 KiB too.
      assert.ok(want.bytes > 0 ? Number(usage.size) >= want.bytes : Number(usage.size) < 8192, `${name} size ${usage.size}`);
    }
  });

  it('a remote Prepare answers ALREADY_EXISTS and the target is found by containerd\'s filter', async () => {
    const chain = 'sha256:aaaa';
    const labels = {
      [TARGET_SNAPSHOT_REF]: chain,
      [STARGZ_REFERENCE]: 'registry.test/img:1',
      [STARGZ_DIGEST]: 'sha256:bbbb',
    };
    await rejectsWith(call('Prepare', { key: 'extract', labels }), grpc.status.ALREADY_EXISTS, /target snapshot "sha256:aaaa": already exists/);
    const found = (await list([`labels."containerd.io/snapshot.ref"==${chain},parent==""`])).flat();
    assert.deepEqual(found.map((i) => i.name), [chain]);
    assert.equal(found[0]!.labels['containerd.io/snapshot/remote'], 'remote snapshot');
    const usage = await call<{ size: string; inodes: string }>('Usage', { key: chain });
    assert.deepEqual(usage, { size: '0', inodes: '0' });

    await call('Prepare', { key: 'container', parent: chain });
    remote.checkError = new UnavailableError('registry down');
    await rejectsWith(call('Mounts', { key: 'container' }), grpc.status.UNAVAILABLE, /layer unavailable/);
  });
});

describe('startSnapshotServer socket handling', () => {
  it('replaces a stale socket, refuses a live one and a regular file', async () => {
    // A process killed while listening leaves its socket file behind.
    const stale = path.join(dir, 'stale.sock');
    const script = "require('net').createServer().listen(process.argv[1], () => process.kill(process.pid, 'SIGKILL'))";
    try {
      execFileSync(process.execPath, ['-e', script, stale], { stdio: 'ignore' });
    } catch {
      // killed by design
    }
    assert.ok(fs.lstatSync(stale).isSocket(), 'the dead server left its socket');
    const revived = await startSnapshotServer({ snapshotter, address: stale, log: silent });
    await revived.close();

    await assert.rejects(startSnapshotServer({ snapshotter, address, log: silent }), /in use by a running server/);
    assert.ok(fs.lstatSync(address).isSocket(), 'the live socket is untouched');

    const file = path.join(dir, 'not-a-socket');
    fs.writeFileSync(file, 'keep me');
    await assert.rejects(startSnapshotServer({ snapshotter, address: file, log: silent }), /not a socket/);
    assert.equal(fs.readFileSync(file, 'utf8'), 'keep me');
  });
});

describe('startSnapshotServer before the snapshotter is started', () => {
  /** A server on its own socket whose snapshotter comes later (or never), with a client for it. */
  async function serveLater(source: Promise<Snapshotter>): Promise<{ call<T>(method: string, req: object): Promise<T>; close(): Promise<void> }> {
    const lateAddress = path.join(dir, 'late.sock');
    const late = await startSnapshotServer({ snapshotter: source, address: lateAddress, log: silent });
    const Ctor = grpc.makeClientConstructor(loadSnapshotsService(), 'Snapshots');
    const lateClient = new Ctor(`unix://${lateAddress}`, grpc.credentials.createInsecure());
    return {
      call: <T>(method: string, req: object) => {
        const fn = (lateClient as unknown as Record<string, UnaryMethod>)[method]!.bind(lateClient);
        return new Promise<T>((resolve, reject) => fn(req, (err, res) => (err ? reject(err) : resolve(res as T))));
      },
      close: async () => {
        lateClient.close();
        await late.close();
      },
    };
  }

  it('listens at once; a call made before the snapshotter is there waits for it and is answered', async () => {
    let start!: (s: Snapshotter) => void;
    const late = await serveLater(new Promise<Snapshotter>((resolve) => (start = resolve)));
    try {
      assert.ok(fs.lstatSync(path.join(dir, 'late.sock')).isSocket(), 'listening before the snapshotter exists');
      await call('Prepare', { snapshotter: 'stargaze', key: 'early', parent: '', labels: {} });
      let answered = false;
      const stat = late.call<{ info: WireInfo }>('Stat', { key: 'early' }).finally(() => (answered = true));
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(answered, false, 'the call waits');
      start(snapshotter);
      assert.equal((await stat).info.name, 'early');
    } finally {
      await late.close();
    }
  });

  it('answers UNAVAILABLE with the reason when the snapshotter fails to start', async () => {
    const late = await serveLater(Promise.reject(new Error('fuse server did not start')));
    try {
      await rejectsWith(late.call('Stat', { key: 'any' }), grpc.status.UNAVAILABLE, /did not start: fuse server did not start/);
    } finally {
      await late.close();
    }
  });
});

describe('grpc status mapping', () => {
  it('maps our codes and leaves the rest UNKNOWN', () => {
    assert.equal(grpcStatusOf(new NotFoundError('x')), grpc.status.NOT_FOUND);
    assert.equal(grpcStatusOf(new FailedPreconditionError('x')), grpc.status.FAILED_PRECONDITION);
    assert.equal(grpcStatusOf(new UnavailableError('x')), grpc.status.UNAVAILABLE);
    assert.equal(grpcStatusOf(new UsageError('x')), grpc.status.UNKNOWN);
    assert.equal(grpcStatusOf(new Error('boom')), grpc.status.UNKNOWN);
    assert.equal(grpcStatusOf('string'), grpc.status.UNKNOWN);
  });
});
