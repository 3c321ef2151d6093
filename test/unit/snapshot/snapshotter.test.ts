/**
 * Snapshotter: overlay snapshotter semantics (mount shapes, directories, errors, usage, cleanup), one
 * real overlay mount (we run as root), and the remote-snapshot path against a fake RemoteFileSystem.
 *
 * FakeRemoteFileSystem is a unit-test double: instead of a FUSE mount it writes a marker file into the
 * mountpoint, and it records every call, so the snapshotter's side of the contract can be checked without
 * a registry. The real filesystem is exercised by the e2e tests.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, it } from 'node:test';
import pino from 'pino';
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  UnavailableError,
} from '../../../src/errors';
import type { RemoteFileSystem } from '../../../src/fs/remote-file-system';
import { RESTORE_CONCURRENCY, Snapshotter } from '../../../src/snapshot/snapshotter';
import {
  REMOTE_SNAPSHOT,
  REMOTE_SNAPSHOT_VALUE,
  STARGZ_DIGEST,
  STARGZ_REFERENCE,
  TARGET_SNAPSHOT_REF,
} from '../../../src/source/labels';
import { until } from '../until';

const run = promisify(execFile);
const IS_ROOT = process.getuid?.() === 0;
const REMOTE_MARKER = 'remote-layer-marker';

/** Test double for the lazy layer mounter: see the file comment. */
class FakeRemoteFileSystem implements RemoteFileSystem {
  mounts: { mountpoint: string; labels: Record<string, string> }[] = [];
  checks: string[] = [];
  unmounts: string[] = [];
  /** When set, mount() rejects with it. */
  mountError: Error | undefined;
  /** When set, check() rejects with it. */
  checkError: Error | undefined;
  /** Resolves mount() only when released, to hold prepares in flight. */
  gate: Promise<void> | undefined;

  /** Mountpoints this filesystem serves now (a real one outlives a daemon restart when it is a FUSE server). */
  served = new Set<string>();

  async mount(mountpoint: string, labels: Record<string, string>): Promise<void> {
    this.mounts.push({ mountpoint, labels });
    const failure = this.mountError; // decided at call time, so a test can change it for later calls
    if (this.gate !== undefined) await this.gate;
    if (failure !== undefined) throw failure;
    await fs.promises.writeFile(path.join(mountpoint, REMOTE_MARKER), labels[STARGZ_DIGEST] ?? '');
    this.served.add(mountpoint);
  }

  check(mountpoint: string): Promise<void> {
    this.checks.push(mountpoint);
    if (this.checkError !== undefined) return Promise.reject(this.checkError);
    if (!this.served.has(mountpoint)) return Promise.reject(new UnavailableError(`${mountpoint} is not mounted`));
    return Promise.resolve();
  }

  unmount(mountpoint: string): Promise<void> {
    this.unmounts.push(mountpoint);
    this.served.delete(mountpoint);
    return Promise.resolve();
  }
}

/** Collects pino's JSON lines. */
class LogSink extends Writable {
  lines: Record<string, unknown>[] = [];
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    for (const line of chunk.toString('utf8').split('\n')) if (line.trim() !== '') this.lines.push(JSON.parse(line) as Record<string, unknown>);
    cb();
  }
  prepared(value: 'true' | 'false'): Record<string, unknown>[] {
    return this.lines.filter((l) => l['remote-snapshot-prepared'] === value);
  }
  /** Prepares that found another of the same target in flight and wait for it (debug lines). */
  waitingForInflight(): Record<string, unknown>[] {
    return this.lines.filter((l) => l.msg === 'waiting for a prepare of the same target in flight');
  }
}

let root: string;
let sink: LogSink;
let remote: FakeRemoteFileSystem;
let sn: Snapshotter;
const toUnmount: string[] = [];

async function openSnapshotter(): Promise<Snapshotter> {
  return Snapshotter.open({ root, fs: remote, log: pino({ level: 'debug' }, sink) });
}

beforeEach(async () => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'stargaze-snap-'));
  sink = new LogSink();
  remote = new FakeRemoteFileSystem();
  sn = await openSnapshotter();
});

afterEach(async () => {
  for (const mp of toUnmount.splice(0).reverse()) await run('umount', [mp]).catch(() => run('umount', ['-l', mp]).catch(() => undefined));
  await sn.close();
  fs.rmSync(root, { recursive: true, force: true });
});

function idOf(mountSource: string): string {
  return path.basename(path.dirname(mountSource));
}

function overlayOpt(options: string[], name: string): string | undefined {
  return options.find((o) => o.startsWith(`${name}=`))?.slice(name.length + 1);
}

async function commitBase(name: string, files: Record<string, string> = {}, parent = ''): Promise<string> {
  const key = `${name}-active`;
  const mounts = await sn.prepare(key, parent);
  const upper = mounts[0]!.type === 'bind' ? mounts[0]!.source : overlayOpt(mounts[0]!.options, 'upperdir')!;
  for (const [f, content] of Object.entries(files)) fs.writeFileSync(path.join(upper, f), content);
  await sn.commit(name, key);
  return upper;
}

describe('Snapshotter mounts and directories (overlay.go semantics)', () => {
  it('active without parent: rw bind of its own fs dir; fs 0755 and work 0711 exist', async () => {
    const mounts = await sn.prepare('a', '');
    assert.equal(mounts.length, 1);
    const m = mounts[0]!;
    assert.equal(m.type, 'bind');
    assert.deepEqual(m.options, ['rw', 'rbind']);
    assert.equal(m.source, path.join(root, 'snapshots', idOf(m.source), 'fs'));
    assert.equal(fs.statSync(m.source).mode & 0o777, 0o755);
    assert.equal(fs.statSync(path.join(path.dirname(m.source), 'work')).mode & 0o777, 0o711);
    const leftovers = fs.readdirSync(path.join(root, 'snapshots')).filter((d) => d.startsWith('new-'));
    assert.deepEqual(leftovers, [], 'the temp dir was renamed');
  });

  it('fs 0755 and work 0711 under a umask that takes those bits away (077), and no mode probe left behind', async () => {
    await sn.close();
    const saved = process.umask(0o077);
    try {
      sn = await openSnapshotter();
      const [m] = await sn.prepare('a', '');
      assert.equal(fs.statSync(m!.source).mode & 0o777, 0o755);
      assert.equal(fs.statSync(path.join(path.dirname(m!.source), 'work')).mode & 0o777, 0o711);
      await sn.commit('c', 'a');
      const [child] = await sn.prepare('child', 'c');
      assert.equal(fs.statSync(overlayOpt(child!.options, 'upperdir')!).mode & 0o777, 0o755);
    } finally {
      process.umask(saved);
    }
    assert.deepEqual(fs.readdirSync(path.join(root, 'snapshots')).filter((d) => d.startsWith('new-')), []);
  });

  it('fs 0755 owned as the parent root, work 0711, when the snapshots dir is setgid and of another group', async () => {
    await sn.close();
    const snapshots = path.join(root, 'snapshots');
    // A root inside a setgid directory (a volume with fsGroup, say): new dirs inherit its group and its setgid bit.
    fs.chownSync(snapshots, 0, 65534);
    fs.chmodSync(snapshots, 0o2755);
    sn = await openSnapshotter();
    const [base] = await sn.prepare('a', '');
    await sn.commit('c', 'a');
    // as a layer's root is: root's, 0755
    fs.chownSync(base!.source, 0, 0);
    fs.chmodSync(base!.source, 0o755);
    const [child] = await sn.prepare('child', 'c');
    const upper = fs.statSync(overlayOpt(child!.options, 'upperdir')!);
    assert.equal(upper.mode & 0o7777, 0o755, 'no setgid bit');
    assert.equal(fs.statSync(overlayOpt(child!.options, 'workdir')!).mode & 0o7777, 0o711);
    assert.deepEqual([upper.uid, upper.gid], [0, 0], "owned as the parent's root");
  });

  it('view without parent: ro bind, no work dir', async () => {
    const [m] = await sn.view('v', '');
    assert.equal(m!.type, 'bind');
    assert.deepEqual(m!.options, ['ro', 'rbind']);
    assert.equal(fs.existsSync(path.join(path.dirname(m!.source), 'work')), false);
  });

  it('active on parents: overlay, upper and work, lowerdir nearest parent first', async () => {
    const base = await commitBase('base');
    const mid = await commitBase('mid', {}, 'base');
    const [m] = await sn.prepare('top', 'mid');
    assert.equal(m!.type, 'overlay');
    assert.equal(m!.source, 'overlay');
    const upper = overlayOpt(m!.options, 'upperdir')!;
    assert.equal(overlayOpt(m!.options, 'workdir'), path.join(path.dirname(upper), 'work'));
    assert.equal(overlayOpt(m!.options, 'lowerdir'), `${mid}:${base}`);
    const order = m!.options.map((o) => o.split('=')[0]);
    assert.deepEqual(order.slice(-3), ['workdir', 'upperdir', 'lowerdir']);
    if (fs.existsSync('/sys/module/overlay/parameters/index')) assert.ok(m!.options.includes('index=off'));
  });

  it('view on one parent: ro bind of the parent; on two: overlay with lowerdir only', async () => {
    const base = await commitBase('base');
    const [one] = await sn.view('v1', 'base');
    assert.deepEqual(one, { type: 'bind', source: base, options: ['ro', 'rbind'] });
    const mid = await commitBase('mid', {}, 'base');
    const [two] = await sn.view('v2', 'mid');
    assert.equal(two!.type, 'overlay');
    assert.equal(overlayOpt(two!.options, 'lowerdir'), `${mid}:${base}`);
    assert.equal(overlayOpt(two!.options, 'upperdir'), undefined);
    assert.equal(overlayOpt(two!.options, 'workdir'), undefined);
    assert.deepEqual(await sn.mounts('v2'), [two]);
  });

  it('the new upper dir takes the owner of the parent root', async () => {
    const base = await commitBase('base');
    fs.chownSync(base, 1234, 5678);
    const [m] = await sn.prepare('child', 'base');
    const st = fs.statSync(overlayOpt(m!.options, 'upperdir')!);
    assert.deepEqual([st.uid, st.gid], [1234, 5678]);
  });

  it('maps misuse to the containerd error classes', async () => {
    await assert.rejects(sn.prepare('', ''), InvalidArgumentError);
    await assert.rejects(sn.commit('', 'x'), InvalidArgumentError);
    await sn.prepare('a', '');
    await assert.rejects(sn.prepare('a', ''), AlreadyExistsError);
    await assert.rejects(sn.view('a', ''), AlreadyExistsError);
    await assert.rejects(sn.prepare('b', 'missing'), NotFoundError);
    await assert.rejects(sn.prepare('b', 'a'), InvalidArgumentError); // parent not committed (containerd: InvalidArgument)
    await sn.view('v', '');
    await assert.rejects(sn.commit('c', 'v'), FailedPreconditionError);
    await assert.rejects(sn.commit('c', 'missing'), NotFoundError);
    await sn.commit('c', 'a');
    await assert.rejects(sn.mounts('c'), FailedPreconditionError);
    await assert.rejects(sn.mounts('missing'), NotFoundError);
    await sn.prepare('d', 'c');
    await assert.rejects(sn.remove('c'), FailedPreconditionError);
    await assert.rejects(sn.remove('missing'), NotFoundError);
    await assert.rejects(sn.stat('missing'), NotFoundError);
    await assert.rejects(sn.update({ name: 'd', labels: {} }, ['parent']), InvalidArgumentError);
    await assert.rejects(sn.list(['labels.']), InvalidArgumentError);
    const leftovers = fs.readdirSync(path.join(root, 'snapshots')).filter((d) => d.startsWith('new-'));
    assert.deepEqual(leftovers, [], 'failed creates leave no temp dirs');
  });

  it('commit records usage (hardlinks once); active usage is measured live', async () => {
    const [m] = await sn.prepare('a', '');
    const upper = m!.source;
    fs.writeFileSync(path.join(upper, 'f'), Buffer.alloc(10_000, 1));
    fs.linkSync(path.join(upper, 'f'), path.join(upper, 'hardlink'));
    fs.mkdirSync(path.join(upper, 'd'));
    const live = await sn.usage('a');
    assert.equal(live.inodes, 3, 'root dir, f (once), d');
    assert.ok(live.size >= 10_000);
    await sn.commit('c', 'a', { l: 'v' });
    assert.deepEqual(await sn.usage('c'), live);
    const info = await sn.stat('c');
    assert.equal(info.kind, 'committed');
    assert.deepEqual(info.labels, { l: 'v' });
    fs.writeFileSync(path.join(upper, 'later'), Buffer.alloc(50_000, 1));
    assert.deepEqual(await sn.usage('c'), live, 'committed usage is the stored value');
  });

  it('walk filters, pages past 100 rows', async () => {
    await commitBase('p');
    await sn.prepare('a', 'p', { l: '1' });
    await sn.view('v', 'p');
    for (let i = 0; i < 120; i++) await sn.view(`bulk-${i}`, '', { bulk: 'yes' });
    const names = async (filters: string[]): Promise<string[]> => (await sn.list(filters)).map((i) => i.name).sort();
    assert.deepEqual(await names(['parent==p']), ['a', 'v']);
    assert.deepEqual(await names(['labels.l==1', 'name==p']), ['a', 'p']);
    assert.equal((await names(['labels.bulk'])).length, 120);
    assert.equal((await names([])).length, 123);
  });

  it('remove deletes metadata only; cleanup removes orphan dirs and keeps live ones', async () => {
    const [keep] = await sn.prepare('keep', '');
    const [gone] = await sn.prepare('gone', '');
    fs.mkdirSync(path.join(root, 'snapshots', 'new-crashed'));
    await sn.remove('gone');
    assert.ok(fs.existsSync(gone!.source), 'remove is asynchronous');
    const removed = await sn.cleanup();
    assert.deepEqual(removed.sort(), [path.dirname(gone!.source), path.join(root, 'snapshots', 'new-crashed')].sort());
    assert.ok(fs.existsSync(keep!.source));
    assert.ok(!fs.existsSync(gone!.source));
    assert.ok(remote.unmounts.includes(gone!.source), 'orphans are unmounted before removal');
    await sn.prepare('gone', ''); // the key is reusable
  });

  it('with its metadata wiped, new snapshots pass the directories left behind by, and never touch them', async () => {
    // A wiped root whose old layer mounts rm -r stopped at: their directories stay, metadata.db goes.
    const [left] = await sn.prepare('left', '');
    fs.writeFileSync(path.join(left!.source, 'kept'), 'data');
    await sn.close();
    for (const f of fs.readdirSync(root)) if (f.startsWith('metadata.db')) fs.rmSync(path.join(root, f));
    sn = await openSnapshotter();
    const [fresh] = await sn.prepare('fresh', '');
    assert.notEqual(idOf(fresh!.source), idOf(left!.source));
    assert.ok(Number(idOf(fresh!.source)) > Number(idOf(left!.source)), 'ids go on past the leftover directory');
    assert.equal(fs.readFileSync(path.join(left!.source, 'kept'), 'utf8'), 'data', 'the leftover directory is untouched');
  });

  it('a directory named with too many digits to be a snapshot id does not stop the start nor later snapshots', async () => {
    await sn.close();
    fs.mkdirSync(path.join(root, 'snapshots', '99999999999999999999')); // past SQLite's 2^63 - 1
    fs.mkdirSync(path.join(root, 'snapshots', '9223372036854775806')); // would leave no id for the next snapshot
    sn = await openSnapshotter();
    const [a] = await sn.prepare('after-a', '');
    const [b] = await sn.prepare('after-b', '');
    assert.ok(Number(idOf(b!.source)) > Number(idOf(a!.source)));
    assert.ok(fs.existsSync(path.join(root, 'snapshots', '99999999999999999999')), 'left as it is');
  });

  it('cleanup never deletes through a live mount', { skip: !IS_ROOT && 'needs root to mount' }, async () => {
    const [m] = await sn.prepare('x', '');
    await sn.remove('x');
    const victim = path.join(root, 'outside');
    fs.mkdirSync(victim);
    fs.writeFileSync(path.join(victim, 'precious'), 'data');
    await run('mount', ['--bind', victim, m!.source]);
    toUnmount.push(m!.source);
    assert.deepEqual(await sn.cleanup(), []);
    assert.equal(fs.readFileSync(path.join(victim, 'precious'), 'utf8'), 'data');
    await run('umount', [toUnmount.pop()!]);
    assert.deepEqual(await sn.cleanup(), [path.dirname(m!.source)]);
    assert.equal(fs.readFileSync(path.join(victim, 'precious'), 'utf8'), 'data');
  });

  it('mounts work with the kernel: overlay of a committed parent', { skip: !IS_ROOT && 'needs root to mount' }, async () => {
    await commitBase('base', { hello: 'from base' });
    const [m] = await sn.prepare('top', 'base');
    const target = path.join(root, 'mnt');
    fs.mkdirSync(target);
    await run('mount', ['-t', m!.type, m!.source, target, '-o', m!.options.join(',')]);
    toUnmount.push(target);
    assert.equal(fs.readFileSync(path.join(target, 'hello'), 'utf8'), 'from base');
    fs.writeFileSync(path.join(target, 'new'), 'in upper');
    await run('umount', [toUnmount.pop()!]);
    assert.equal(fs.readFileSync(path.join(overlayOpt(m!.options, 'upperdir')!, 'new'), 'utf8'), 'in upper');
  });

  it('Update changes labels only and keeps Created', async () => {
    await sn.prepare('a', '', { x: '1' });
    const before = await sn.stat('a');
    const after = await sn.update({ name: 'a', labels: { y: '2' } });
    assert.deepEqual(after.labels, { y: '2' });
    assert.equal(after.createdAt, before.createdAt);
    assert.ok(after.updatedAt > before.updatedAt);
  });

  it('a closed snapshotter answers Unavailable; close is idempotent', async () => {
    await sn.close();
    await sn.close();
    await assert.rejects(sn.stat('x'), UnavailableError);
    sn = await openSnapshotter();
  });
});

const CHAIN = 'sha256:1111111111111111111111111111111111111111111111111111111111111111';
const LAYER = 'sha256:2222222222222222222222222222222222222222222222222222222222222222';

function remoteLabels(chain = CHAIN): Record<string, string> {
  return {
    [TARGET_SNAPSHOT_REF]: chain,
    [STARGZ_REFERENCE]: '127.0.0.1:5000/library/busybox:1',
    [STARGZ_DIGEST]: LAYER,
    'containerd.io/snapshot/stargz/toc.digest': 'sha256:3333',
  };
}

describe('Snapshotter remote snapshots', () => {
  it('mounts the layer, commits it under the chainID and answers AlreadyExists', async () => {
    await assert.rejects(sn.prepare('extract-1', '', remoteLabels()), (err: unknown) => {
      assert.ok(err instanceof AlreadyExistsError);
      assert.equal(err.message, `target snapshot "${CHAIN}": already exists`);
      return true;
    });
    assert.equal(remote.mounts.length, 1);
    const info = await sn.stat(CHAIN);
    assert.equal(info.kind, 'committed');
    assert.equal(info.labels[REMOTE_SNAPSHOT], REMOTE_SNAPSHOT_VALUE);
    assert.equal(info.labels[STARGZ_DIGEST], LAYER, 'prepare labels are kept for restore');
    assert.deepEqual(await sn.usage(CHAIN), { size: 0, inodes: 0 });
    await assert.rejects(sn.stat('extract-1'), NotFoundError, 'the active key became the committed snapshot');
    assert.equal(fs.readFileSync(path.join(remote.mounts[0]!.mountpoint, REMOTE_MARKER), 'utf8'), LAYER);
    const ok = sink.prepared('true');
    assert.equal(ok.length, 1);
    assert.equal(ok[0]!.key, 'extract-1');
    assert.equal(ok[0]!.parent, '');
    // containerd then looks the target up with this filter:
    const found = await sn.list([`labels."containerd.io/snapshot.ref"==${CHAIN},parent==""`]);
    assert.deepEqual(found.map((i) => i.name), [CHAIN]);
  });

  it('answers AlreadyExists at once when the target is already committed', async () => {
    await assert.rejects(sn.prepare('k1', '', remoteLabels()), AlreadyExistsError);
    await assert.rejects(sn.prepare('k2', '', remoteLabels()), AlreadyExistsError);
    assert.equal(remote.mounts.length, 1);
    await assert.rejects(sn.stat('k2'), NotFoundError, 'no snapshot was created for k2');
  });

  it('concurrent prepares of one target mount once', async () => {
    let release!: () => void;
    remote.gate = new Promise<void>((r) => (release = r));
    const all = Promise.allSettled([1, 2, 3].map((i) => sn.prepare(`k${i}`, '', remoteLabels())));
    // Released only once all three are in flight, each mounting or waiting for a mount (one and two, asserted below).
    await until('all three prepares in flight', () => remote.mounts.length + sink.waitingForInflight().length === 3);
    release();
    const results = await all;
    for (const r of results) {
      assert.equal(r.status, 'rejected');
      assert.ok(r.reason instanceof AlreadyExistsError);
    }
    assert.equal(remote.mounts.length, 1);
    assert.equal(sink.waitingForInflight().length, 2);
    assert.equal((await sn.list(['kind==active'])).length, 0, 'waiters created nothing');
  });

  it('a failed mount falls back to a normal snapshot and logs why; waiters then try themselves', async () => {
    let release!: () => void;
    remote.gate = new Promise<void>((r) => (release = r));
    remote.mountError = new Error('registry unreachable');
    const first = sn.prepare('k1', '', remoteLabels());
    await until('the first prepare to mount', () => remote.mounts.length === 1);
    const second = sn.prepare('k2', '', remoteLabels());
    second.catch(() => undefined); // asserted below; keep an early failure from going unhandled
    // Either it says it waits, or it mounts too (which fails the assertion below at once).
    await until('the second prepare to wait or mount', () => sink.waitingForInflight().length === 1 || remote.mounts.length > 1);
    assert.equal(remote.mounts.length, 1, 'the second waits for the first');
    assert.equal(sink.waitingForInflight()[0]!.key, 'k2');
    remote.mountError = undefined; // the retry succeeds
    remote.gate = undefined;
    release();
    const mounts = await first;
    assert.deepEqual(mounts[0]!.options, ['rw', 'rbind']);
    assert.equal((await sn.stat('k1')).kind, 'active');
    await assert.rejects(second, AlreadyExistsError);
    assert.equal(remote.mounts.length, 2);
    const failed = sink.prepared('false');
    assert.equal(failed.length, 1);
    assert.equal(failed[0]!.key, 'k1');
    assert.equal(failed[0]!.reason, 'registry unreachable');
    assert.equal(failed[0]!.level, 30, 'info: a fallback is routine, not a warning');
  });

  it('target label without a recognisable layer: normal snapshot, logged as not prepared', async () => {
    const mounts = await sn.prepare('k', '', { [TARGET_SNAPSHOT_REF]: CHAIN });
    assert.equal(mounts[0]!.type, 'bind');
    assert.equal(remote.mounts.length, 0);
    assert.equal(sink.prepared('false').length, 1);
  });

  it('checks remote ancestors before handing out mounts; failure is Unavailable', async () => {
    await assert.rejects(sn.prepare('k', '', remoteLabels()), AlreadyExistsError);
    const layerDir = remote.mounts[0]!.mountpoint;
    await sn.prepare('container', CHAIN);
    assert.deepEqual(remote.checks, [layerDir]);
    await sn.mounts('container');
    assert.equal(remote.checks.length, 2);
    remote.checkError = new UnavailableError('blob fetch failed');
    await assert.rejects(sn.mounts('container'), UnavailableError);
    await assert.rejects(sn.view('v', CHAIN), UnavailableError);
    await assert.rejects(sn.stat('v'), NotFoundError, 'nothing is created when the parent is unavailable');
  });

  it('a remote layer with a local copy is a lower dir from the copy, and needs no check', async () => {
    await assert.rejects(sn.prepare('k', '', remoteLabels()), AlreadyExistsError);
    const layerDir = remote.mounts[0]!.mountpoint;
    const before = await sn.prepare('before', CHAIN);
    assert.equal(overlayOpt(before[0]!.options, 'lowerdir'), layerDir, 'no copy yet: the mount');
    const local = path.join(path.dirname(layerDir), 'local');
    fs.mkdirSync(`${local}.tmp`);
    assert.equal(overlayOpt((await sn.prepare('partial', CHAIN))[0]!.options, 'lowerdir'), layerDir, 'a copy being made is not used');
    fs.renameSync(`${local}.tmp`, local);
    remote.checkError = new UnavailableError('FUSE server gone');
    const after = await sn.prepare('after', CHAIN);
    assert.equal(overlayOpt(after[0]!.options, 'lowerdir'), local);
    assert.equal(overlayOpt((await sn.mounts('after'))[0]!.options, 'lowerdir'), local);
    assert.deepEqual((await sn.view('v', CHAIN))[0], { type: 'bind', source: local, options: ['ro', 'rbind'] });
    // Mounts handed out before the copy existed are built anew on each call, from the copy now.
    assert.equal(overlayOpt((await sn.mounts('before'))[0]!.options, 'lowerdir'), local);

    // A restart (its FUSE server gone too) mounts nothing for it: the copy is all new containers need.
    remote.served.clear();
    const mountsBefore = remote.mounts.length;
    const restored = await sn.restore();
    assert.deepEqual(restored, { restored: [CHAIN], failed: [] });
    assert.equal(remote.mounts.length, mountsBefore, 'not mounted again');

    await sn.close();
    sn = await Snapshotter.open({ root, fs: remote, log: pino({ level: 'silent' }), useLocalCopies: false });
    remote.checkError = undefined;
    remote.served.add(layerDir);
    assert.equal(overlayOpt((await sn.mounts('after'))[0]!.options, 'lowerdir'), layerDir, 'copy_fetched_layers = false: the mount');
  });

  it('restore re-mounts remote snapshots with their labels; failures keep data', async () => {
    await assert.rejects(sn.prepare('k', '', remoteLabels()), AlreadyExistsError);
    await commitBase('local', { keep: 'me' });
    const layerDir = remote.mounts[0]!.mountpoint;
    await sn.close();

    remote = new FakeRemoteFileSystem();
    sn = await openSnapshotter();
    const result = await sn.restore();
    assert.deepEqual(result, { restored: [CHAIN], failed: [] });
    assert.equal(remote.mounts.length, 1);
    assert.equal(remote.mounts[0]!.mountpoint, layerDir);
    assert.equal(remote.mounts[0]!.labels[STARGZ_DIGEST], LAYER);
    assert.ok(remote.unmounts.includes(layerDir), 'a stale mount is dropped first');
    await sn.close();

    // A filesystem that still serves the layer (the FUSE server outlived the daemon) is left alone.
    const stillServing = remote;
    stillServing.mounts = [];
    stillServing.unmounts = [];
    remote = stillServing;
    sn = await openSnapshotter();
    assert.deepEqual(await sn.restore(), { restored: [CHAIN], failed: [] });
    assert.equal(remote.mounts.length, 0, 'not mounted again');
    assert.equal(remote.unmounts.length, 0, 'not unmounted');
    await sn.close();

    remote = new FakeRemoteFileSystem();
    remote.mountError = new Error('offline');
    sn = await openSnapshotter();
    const failed = await sn.restore();
    assert.deepEqual(failed.restored, []);
    assert.deepEqual(failed.failed, [{ name: CHAIN, reason: 'offline' }]);
    assert.equal((await sn.stat(CHAIN)).kind, 'committed', 'metadata survives a failed restore');
    const local = await sn.view('check', 'local');
    assert.equal(fs.readFileSync(path.join(local[0]!.source, 'keep'), 'utf8'), 'me');
  });

  it(`restore re-mounts at most RESTORE_CONCURRENCY (${RESTORE_CONCURRENCY}) at once, and one failing stops none of the others`, async () => {
    const chains = Array.from({ length: 9 }, (_, i) => `sha256:${String(i + 1).repeat(64)}`);
    for (const chain of chains) await assert.rejects(sn.prepare(`k-${chain}`, '', remoteLabels(chain)), AlreadyExistsError);
    await sn.close();

    const failing = chains[1]!;
    let active = 0;
    let peak = 0;
    let done = 0;
    remote = new (class extends FakeRemoteFileSystem {
      override async mount(mountpoint: string, labels: Record<string, string>): Promise<void> {
        peak = Math.max(peak, ++active);
        try {
          // In flight until as many are as may be, and a little longer so that more would show.
          await until('remounts in flight', () => active >= Math.min(RESTORE_CONCURRENCY, chains.length - done));
          await new Promise((r) => setTimeout(r, 20));
          if (labels[TARGET_SNAPSHOT_REF] === failing) throw new Error('offline');
          await super.mount(mountpoint, labels);
        } finally {
          active--;
          done++;
        }
      }
    })();
    sn = await openSnapshotter();
    const result = await sn.restore();
    assert.equal(peak, RESTORE_CONCURRENCY);
    assert.deepEqual(result.failed, [{ name: failing, reason: 'offline' }]);
    assert.deepEqual([...result.restored].sort(), chains.filter((c) => c !== failing).sort());
  });

  it('restore re-creates the directory of an interrupted create', async () => {
    const [m] = await sn.prepare('a', '');
    await sn.close();
    fs.rmSync(path.dirname(m!.source), { recursive: true });
    sn = await openSnapshotter();
    await sn.restore();
    assert.ok(fs.statSync(m!.source).isDirectory());
    assert.ok(fs.statSync(path.join(path.dirname(m!.source), 'work')).isDirectory());
  });

  it('without a RemoteFileSystem the target label gives a normal snapshot', async () => {
    await sn.close();
    sn = await Snapshotter.open({ root, log: pino({ level: 'info' }, sink) });
    const mounts = await sn.prepare('k', '', remoteLabels());
    assert.equal(mounts[0]!.type, 'bind');
    assert.equal(sink.prepared('false')[0]!.reason, 'no remote filesystem configured');
  });
});
