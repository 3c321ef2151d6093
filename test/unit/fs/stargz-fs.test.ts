/**
 * StargazeFileSystem over a real FUSE mount. The blob is served from memory (BufferBlobSource) instead
 * of a registry, which the e2e tests cover; everything from the TOC to the kernel is real.
 * Files are read by child processes: this process serves the mount, so its own fs calls must never enter it.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, mkdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import pino from 'pino';

import { defaultConfig, type Config } from '../../../src/config/config';
import { fileSystemOptionsFromConfig, StargazeFileSystem, type BlobResolver } from '../../../src/fs/stargz-fs';
import { listMounts, type MountInfo } from '../../../src/fs/mount-table';
import { hasLocalCopy, localCopyPath } from '../../../src/layer/local-copy';
import { log } from '../../../src/log';
import { serveMetrics } from '../../../src/metrics/fs-metrics';
import type { AddressInfo } from 'node:net';
import { BufferBlobSource, type BlobSource } from '../../../src/remote/blob-source';
import { STARGZ_DIGEST, STARGZ_LAYERS, STARGZ_REFERENCE, TARGET_SNAPSHOT_REF, TOC_DIGEST } from '../../../src/source/labels';
import { makeTar, prioritizedLayer, sha256, toEstargz } from '../estargz/fixture';
import { until } from '../until';
import { Scheduler, schedulerLimits } from '../../../src/task/scheduler';

/** The process's one scheduler, as the composition root makes it. */
const scheduler = new Scheduler(schedulerLimits(defaultConfig()));

const execFileAsync = promisify(execFile);
/**
 * Commands here read this process's own FUSE mounts: one the mount never answers fails its test after a bound
 * (and is killed, as a FUSE wait allows) instead of hanging the whole file.
 */
const run = (command: string, args: string[], opts: { maxBuffer?: number } = {}): Promise<{ stdout: string; stderr: string }> =>
  execFileAsync(command, args, { encoding: 'utf8', timeout: 30_000, killSignal: 'SIGKILL', ...opts });
/** How long after its mount the quiet-period test's container reads (see there). */
const READ_AFTER_MOUNT_MS = 300;
const canMount = process.getuid?.() === 0;

class MemoryRegistry implements BlobResolver {
  readonly blobs = new Map<string, BlobSource>();
  resolveBlob(_ref: string, digest: string): Promise<BlobSource> {
    const blob = this.blobs.get(digest);
    if (!blob) return Promise.reject(new Error(`no blob ${digest}`));
    return Promise.resolve(blob);
  }
}

/** The file system's options from `config`, as the composition root makes them; `preOpenTtlMs` shortens the pre-open's wait. */
function fsOptions(config: Config, preOpenTtlMs?: number): ReturnType<typeof fileSystemOptionsFromConfig> {
  const options = fileSystemOptionsFromConfig(config);
  return preOpenTtlMs === undefined ? options : { ...options, layer: { ...options.layer, preOpenTtlMs } };
}

const quiet = log.child({ test: 'stargz-fs' });
quiet.level = 'warn';

async function layerFixture(): Promise<{ blob: Buffer; digest: string; tocDigest: string; diffId: string; big: Buffer }> {
  const big = Buffer.alloc(9 * 1024 * 1024);
  for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((i * 2654435761) >>> 0, i);
  const tar = await makeTar([
    { name: 'etc/', type: 'directory', mode: 0o755 },
    { name: 'etc/hello.txt', mode: 0o644, content: 'hello lazy world\n', mtime: new Date(1_600_000_000_000) },
    { name: 'etc/hard.txt', type: 'link', linkname: 'etc/hello.txt' },
    { name: 'etc/link', type: 'symlink', linkname: 'hello.txt' },
    { name: 'big.bin', mode: 0o600, content: big },
    { name: 'bin/', type: 'directory', mode: 0o755 },
    { name: 'bin/su', mode: 0o4755, content: 'x' },
    { name: 'gone/.wh.old', mode: 0o644, content: '' },
    { name: 'opaque/.wh..wh..opq', mode: 0o644, content: '' },
  ]);
  const { blob, result } = await toEstargz(tar, { chunkSizeBytes: 1024 * 1024 });
  return { blob, digest: sha256(blob), tocDigest: result.tocDigest, diffId: result.diffId, big };
}

test('serves an eStargz layer through FUSE', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fs-'));
  const { blob, digest, tocDigest, diffId, big } = await layerFixture();
  const registry = new MemoryRegistry();
  registry.blobs.set(digest, new BufferBlobSource(digest, blob));
  const served = new StargazeFileSystem({ registry, scheduler, ...fsOptions(defaultConfig()), log: quiet });
  // Unmount before removing: rm must never walk into a mount this process serves.
  after(async () => {
    await served.close();
    await rm(dir, { recursive: true, force: true });
  });
  const mnt = path.join(dir, 'mnt');
  await mkdir(mnt);
  const labels = {
    // A base layer's chainID is its diff_id: background fetch checks the whole layer against it.
    [TARGET_SNAPSHOT_REF]: diffId,
    [STARGZ_REFERENCE]: 'registry.test/img:1',
    [STARGZ_DIGEST]: digest,
    [TOC_DIGEST]: tocDigest,
  };
  await served.mount(mnt, labels);
  await served.check(mnt);

  const mounts = (await run('cat', ['/proc/mounts'])).stdout;
  assert.match(mounts, new RegExp(`${mnt} fuse.stargaze ro`));

  assert.equal((await run('cat', [path.join(mnt, 'etc/hello.txt')])).stdout, 'hello lazy world\n');
  assert.equal((await run('readlink', [path.join(mnt, 'etc/link')])).stdout, 'hello.txt\n');
  const st = (await run('stat', ['-c', '%i %h %a %s %Y', path.join(mnt, 'etc/hello.txt'), path.join(mnt, 'etc/hard.txt')])).stdout.trim().split('\n');
  assert.equal(st[0], st[1], 'hardlinks share one inode');
  assert.match(st[0] ?? '', / 2 644 17 1600000000$/);
  assert.equal((await run('stat', ['-c', '%a', path.join(mnt, 'bin/su')])).stdout.trim(), '4755');
  assert.equal((await run('stat', ['-c', '%F %t:%T', path.join(mnt, 'gone/old')])).stdout.trim(), 'character special file 0:0');
  const opaque = await run('getfattr', ['--only-values', '-n', 'trusted.overlay.opaque', path.join(mnt, 'opaque')]);
  assert.equal(opaque.stdout, 'y');
  const listing = (await run('ls', ['-A', mnt])).stdout.split('\n').filter(Boolean);
  assert.deepEqual(listing.sort(), ['big.bin', 'bin', 'etc', 'gone', 'opaque']);

  const statusPath = path.join(mnt, '.stargz-snapshotter', `${digest}.json`);
  const earlyStatus = JSON.parse((await run('cat', [statusPath])).stdout) as Record<string, unknown>;
  const bigSum = (await run('sha256sum', [path.join(mnt, 'big.bin')], { maxBuffer: 1 << 20 })).stdout.split(' ')[0];
  assert.equal('sha256:' + bigSum, sha256(big));

  await assert.rejects(run('sh', ['-c', `echo x > ${path.join(mnt, 'etc/hello.txt')}`]));

  // The hidden state file: reachable by name, never listed, regenerated when libfuse re-checks its attributes
  // on open, which it does once they are over a second old (ac_attr_timeout=1). Until then an open returns
  // what the page cache kept: read it again until it shows the bytes fetched since (big.bin is most of them).
  const readStatus = async (): Promise<Record<string, unknown>> => JSON.parse((await run('cat', [statusPath])).stdout) as Record<string, unknown>;
  let status = earlyStatus;
  await until('the status file to be regenerated', async () => (status = await readStatus()).fetchedSize !== earlyStatus.fetchedSize, 10_000);
  assert.equal(status.digest, digest);
  assert.equal(status.size, blob.length);
  assert.ok((status.fetchedSize as number) > big.length / 2, 'reading big.bin fetched most of the layer');
  assert.ok((status.fetchedPercent as number) > 0 && (status.fetchedPercent as number) <= 100);
  assert.equal(status.error, undefined);
  assert.equal((await run('stat', ['-c', '%a', path.join(mnt, '.stargz-snapshotter')])).stdout.trim(), '500');
  // Its content is at most a second old, not what the page cache kept from the first read, and its size
  // is fixed, so the kernel's cached size (attr_timeout is an hour) never cuts it short.
  assert.equal((await run('stat', ['-c', '%s', statusPath])).stdout.trim(), '1024');
  assert.ok((status.fetchedSize as number) > (earlyStatus.fetchedSize as number), 'the second read shows the bytes fetched since');
  // As a container sees it: through overlayfs, with another lower layer (so the hidden dir is merged). Overlay asks
  // lower entries for trusted.overlay.* xattrs on lookup and fails the lookup on anything but "no such attribute".
  const overlay = Object.fromEntries(['lower', 'upper', 'work', 'merged'].map((d) => [d, path.join(dir, `overlay-${d}`)]));
  for (const d of Object.values(overlay)) await mkdir(d);
  await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${mnt}:${overlay.lower},upperdir=${overlay.upper},workdir=${overlay.work}`, overlay.merged!]);
  try {
    const seen = JSON.parse((await run('cat', [path.join(overlay.merged!, '.stargz-snapshotter', `${digest}.json`)])).stdout) as Record<string, unknown>;
    assert.equal(seen.digest, digest, 'the state file is reachable through overlayfs');
  } finally {
    await run('umount', [overlay.merged!]);
  }
  // Prometheus metrics under the reference's names.
  const metricsServer = await serveMetrics(served.metrics, '127.0.0.1:0', quiet);
  try {
    const { port } = metricsServer.address() as AddressInfo;
    const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    assert.match(text, new RegExp(`stargz_fs_layer_size_bytes\\{digest="${digest}",mountpoint="${mnt}"\\} ${blob.length}`));
    assert.match(text, /stargz_fs_layer_fetched_size_bytes\{[^}]*\} [1-9]/);
    assert.match(text, /stargz_fs_operation_count\{operation_type="on_demand_read_access_count",layer="[^"]+"\} [1-9]/);
    assert.match(text, /stargz_fs_operation_duration_milliseconds_count\{operation_type="mount",layer="[^"]+"\} 1/);
  } finally {
    metricsServer.close();
  }

  await served.unmount(mnt);
  assert.doesNotMatch((await run('cat', ['/proc/mounts'])).stdout, new RegExp(mnt));
});

test('refuses a layer whose TOC does not match the toc.digest label', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fs-'));
  const { blob, digest } = await layerFixture();
  const registry = new MemoryRegistry();
  registry.blobs.set(digest, new BufferBlobSource(digest, blob));
  const served = new StargazeFileSystem({ registry, scheduler, ...fsOptions(defaultConfig()), log: quiet });
  after(async () => {
    await served.close();
    await rm(dir, { recursive: true, force: true });
  });
  const labels = {
    [TARGET_SNAPSHOT_REF]: 'sha256:chain',
    [STARGZ_REFERENCE]: 'registry.test/img:1',
    [STARGZ_DIGEST]: digest,
    [TOC_DIGEST]: sha256('something else'),
  };
  await assert.rejects(served.mount(dir, labels), /TOC digest/);
  const withoutDigest = { ...labels };
  delete (withoutDigest as Record<string, string>)[TOC_DIGEST];
  await assert.rejects(served.mount(dir, withoutDigest), /digest of TOC JSON must be passed/);
  await assert.rejects(served.check(dir), /not mounted/);
});

/** A logger whose lines a test can wait for. */
function capturingLog(level = 'info'): { log: typeof quiet; sawMessage: (msg: string) => boolean } {
  const lines: { msg?: string }[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) if (line.trim() !== '') lines.push(JSON.parse(line) as { msg?: string });
      cb();
    },
  });
  return { log: pino({ level }, sink), sawMessage: (msg) => lines.some((l) => l.msg === msg) };
}

test('a fully fetched layer is copied beside its mount once its chainID check passed, not without the check', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fs-'));
  const { blob, digest, tocDigest, diffId } = await layerFixture();
  const registry = new MemoryRegistry();
  registry.blobs.set(digest, new BufferBlobSource(digest, blob));
  const checked = capturingLog();
  const unchecked = capturingLog();
  const withCheck = new StargazeFileSystem({ registry, scheduler, ...fsOptions(defaultConfig()), log: checked.log });
  const withoutCheck = new StargazeFileSystem({ registry, scheduler, ...fsOptions({ ...defaultConfig(), disableVerification: true }), log: unchecked.log });
  after(async () => {
    await withCheck.close();
    await withoutCheck.close();
    await rm(dir, { recursive: true, force: true });
  });
  const labels = { [TARGET_SNAPSHOT_REF]: diffId, [STARGZ_REFERENCE]: 'registry.test/img:1', [STARGZ_DIGEST]: digest, [TOC_DIGEST]: tocDigest };
  const mntA = path.join(dir, 'a', 'fs');
  const mntB = path.join(dir, 'b', 'fs');
  await mkdir(mntA, { recursive: true });
  await mkdir(mntB, { recursive: true });
  await withCheck.mount(mntA, labels);
  await withoutCheck.mount(mntB, labels);

  await until('the local copy', () => hasLocalCopy(mntA));
  const local = localCopyPath(mntA);
  assert.deepEqual((await run('ls', ['-A', local])).stdout.split('\n').filter(Boolean).sort(), ['big.bin', 'bin', 'etc', 'gone', 'opaque']);
  assert.equal((await run('getfattr', ['--only-values', '-n', 'trusted.overlay.opaque', path.join(local, 'opaque')])).stdout, 'y');
  assert.equal((await run('stat', ['-c', '%F %t:%T', path.join(local, 'gone/old')])).stdout.trim(), 'character special file 0:0');
  assert.equal((await run('stat', ['-c', '%a', path.join(local, 'bin/su')])).stdout.trim(), '4755');
  assert.ok(checked.sawMessage('layer copied to local disk; new containers read it from there'));

  // The unchecked layer's background fetch ends with its decision not to copy: past that line nothing copies it.
  await until('the unchecked layer to be fully fetched', () => unchecked.sawMessage('layer fully fetched'));
  await until('the unchecked layer to be left uncopied', () =>
    unchecked.sawMessage('not copied to local disk: not checked against its chainID (verification is disabled)'),
  );
  assert.equal(await hasLocalCopy(mntB), false, 'a layer not checked against its chainID is not copied');
  assert.ok(!unchecked.sawMessage('layer copied to local disk; new containers read it from there'));
});

test('background fetch waits until the layers have been quiet for background_fetch_quiet_msec', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fs-'));
  const { blob, digest, tocDigest, diffId } = await layerFixture();
  // What each filesystem's blob saw: when background windows started (4 MiB; a read's chunk is 1 MiB here, the
  // tail 512 KiB at most), and when the other reads ended.
  const windows = new Map<string, number[]>();
  const otherReadsEnded = new Map<string, number[]>();
  const push = (m: Map<string, number[]>, name: string, at: number): void => void m.set(name, [...(m.get(name) ?? []), at]);
  class WatchedBlob extends BufferBlobSource {
    constructor(private readonly name: string) {
      super(digest, blob);
    }
    override async readRange(offset: number, length: number): Promise<Buffer> {
      if (length > 2 * 1024 * 1024) push(windows, this.name, Date.now());
      const bytes = await super.readRange(offset, length);
      if (length <= 2 * 1024 * 1024) push(otherReadsEnded, this.name, Date.now());
      return bytes;
    }
  }
  const quietMs = 3000;
  const labels = { [TARGET_SNAPSHOT_REF]: diffId, [STARGZ_REFERENCE]: 'registry.test/img:1', [STARGZ_DIGEST]: digest, [TOC_DIGEST]: tocDigest };
  // Nothing prefetched, nothing copied: the background pass is all the blob sees besides the container's read.
  const config = { ...defaultConfig(), noPrefetch: true, copyFetchedLayers: false };
  const serve = (name: string, backgroundFetchQuietMs: number): { fs: StargazeFileSystem; fetched: () => boolean } => {
    const registry = new MemoryRegistry();
    registry.blobs.set(digest, new WatchedBlob(name));
    const logs = capturingLog();
    return { fs: new StargazeFileSystem({ registry, scheduler, ...fsOptions({ ...config, backgroundFetchQuietMs }), log: logs.log }), fetched: () => logs.sawMessage('layer fully fetched') };
  };
  const eager = serve('eager', 0);
  const waiting = serve('quiet', quietMs);
  after(async () => {
    await waiting.fs.close();
    await eager.fs.close();
    await rm(dir, { recursive: true, force: true });
  });
  const mntA = path.join(dir, 'a');
  const mntB = path.join(dir, 'b');
  await mkdir(mntA);
  await mkdir(mntB);
  const eagerMountedAt = Date.now();
  await eager.fs.mount(mntB, labels);
  await waiting.fs.mount(mntA, labels);

  // A container reads a while after the mount: the quiet period starts again after its fetch. This delay is the
  // scenario, not a stand-in for an event: it puts the read several of background fetch's 50 ms busy polls
  // after the mount, so a quiet period counted from the mount alone would begin too early and fail the check
  // below. A longer delay (a loaded machine) only widens that margin.
  await sleep(READ_AFTER_MOUNT_MS);
  const readAt = Date.now();
  assert.equal((await run('cat', [path.join(mntA, 'etc/hello.txt')])).stdout, 'hello lazy world\n');
  await until('both layers to be fully fetched', () => waiting.fetched() && eager.fetched());

  const firstQuiet = windows.get('quiet')?.[0];
  const firstEager = windows.get('eager')?.[0];
  assert.ok(firstQuiet !== undefined && firstEager !== undefined, 'both read the blob in background windows');
  const containerRead = otherReadsEnded.get('quiet')?.filter((at) => at >= readAt && at <= firstQuiet);
  assert.equal(containerRead?.length, 1, "the container's read came before the background pass");
  // Monotonic time inside, wall time here: a millisecond of slack for the two clocks' rounding.
  assert.ok(firstQuiet - containerRead[0]! >= quietMs - 1, `background fetch began ${firstQuiet - containerRead[0]!} ms after the read, not ${quietMs}`);
  assert.ok(firstEager - eagerMountedAt < quietMs, `with no quiet period it begins at once (${firstEager - eagerMountedAt} ms)`);
});

/**
 * A layer's blob whose head (the prefetch range, or a background window) never arrives: each such read waits
 * until its signal aborts. Shows which reads are in flight and when each was aborted.
 */
class StalledHeadBlob extends BufferBlobSource {
  readonly stalled: { offset: number; length: number; abortedAt?: number }[] = [];
  /** When each read of the blob (stalled or not) started. */
  readonly startedAt: number[] = [];
  constructor(
    digest: string,
    blob: Buffer,
    private readonly stallsBefore: number,
  ) {
    super(digest, blob);
  }
  override async readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    this.startedAt.push(Date.now());
    if (offset >= this.stallsBefore) return super.readRange(offset, length);
    const read: { offset: number; length: number; abortedAt?: number } = { offset, length };
    this.stalled.push(read);
    return new Promise<Buffer>((_resolve, reject) => {
      const abort = (): void => {
        read.abortedAt = Date.now();
        reject(signal?.reason ?? new Error('aborted'));
      };
      if (signal?.aborted) abort();
      else signal?.addEventListener('abort', abort, { once: true });
    });
  }
}

/** Bound from the issue: a closed layer's fetches stop within a second. */
const STOP_WITHIN_MS = 1000;

/** A layer with a stalled head mounted on a new file system of `config`; everything goes when the test ends. */
async function mountStalled(
  seed: number,
  config: Partial<ReturnType<typeof defaultConfig>>,
  log: typeof quiet,
): Promise<{ fsys: StargazeFileSystem; source: StalledHeadBlob; mnt: string }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fs-'));
  const layer = await prioritizedLayer(seed);
  const registry = new MemoryRegistry();
  const source = new StalledHeadBlob(layer.digest, layer.blob, layer.headBytes);
  registry.blobs.set(layer.digest, source);
  const fsys = new StargazeFileSystem({ registry, scheduler, ...fsOptions({ ...defaultConfig(), copyFetchedLayers: false, ...config }), log });
  after(async () => {
    await fsys.close();
    await rm(dir, { recursive: true, force: true });
  });
  const mnt = path.join(dir, 'm');
  await mkdir(mnt);
  await fsys.mount(mnt, { [TARGET_SNAPSHOT_REF]: layer.diffId, [STARGZ_REFERENCE]: 'registry.test/img:1', [STARGZ_DIGEST]: layer.digest, [TOC_DIGEST]: layer.tocDigest });
  return { fsys, source, mnt };
}

test("unmounting a layer stops its prefetch within a second", { skip: !canMount && 'needs root for FUSE' }, async () => {
  const logs = capturingLog('debug');
  const { fsys, source, mnt } = await mountStalled(1, { noBackgroundFetch: true }, logs.log);
  await until('prefetch to be reading the head', () => source.stalled.length > 0);

  const unmountedAt = Date.now();
  await fsys.unmount(mnt);
  await until('every prefetch read to be aborted', () => source.stalled.every((r) => r.abortedAt !== undefined), STOP_WITHIN_MS);
  await until('prefetch to have ended', () => logs.sawMessage('prefetch stopped'), STOP_WITHIN_MS);
  for (const r of source.stalled) assert.ok(r.abortedAt! - unmountedAt < STOP_WITHIN_MS, `read at ${r.offset} aborted ${r.abortedAt! - unmountedAt} ms after the unmount`);
  assert.equal(logs.sawMessage('prefetch failed'), false, 'a stopped prefetch is not a failure');
  assert.ok(source.startedAt.every((at) => at <= unmountedAt), 'no read of the blob started after the unmount');
});

test('a layer opened ahead of a mount that never comes stops its prefetch when its pre-open expires', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fs-'));
  const mounted = await prioritizedLayer(2);
  const ahead = await prioritizedLayer(3);
  const registry = new MemoryRegistry();
  registry.blobs.set(mounted.digest, new BufferBlobSource(mounted.digest, mounted.blob));
  const aheadSource = new StalledHeadBlob(ahead.digest, ahead.blob, ahead.headBytes);
  registry.blobs.set(ahead.digest, aheadSource);
  const preOpenTtlMs = 500;
  const logs = capturingLog('debug');
  const fsys = new StargazeFileSystem({
    registry,
    scheduler,
    ...fsOptions({ ...defaultConfig(), noBackgroundFetch: true, copyFetchedLayers: false }, preOpenTtlMs),
    log: logs.log,
  });
  after(async () => {
    await fsys.close();
    await rm(dir, { recursive: true, force: true });
  });
  const mnt = path.join(dir, 'm');
  await mkdir(mnt);
  // The pull names both layers; only the first is ever mounted. The pre-open's timer starts inside mount().
  const mountStartedAt = Date.now();
  await fsys.mount(mnt, {
    [TARGET_SNAPSHOT_REF]: mounted.diffId,
    [STARGZ_REFERENCE]: 'registry.test/img:1',
    [STARGZ_DIGEST]: mounted.digest,
    [TOC_DIGEST]: mounted.tocDigest,
    [STARGZ_LAYERS]: `${mounted.digest},${ahead.digest}`,
  });
  await until('the following layer to be prefetching ahead of its mount', () => aheadSource.stalled.length > 0);
  await until('its prefetch reads to be aborted', () => aheadSource.stalled.every((r) => r.abortedAt !== undefined), preOpenTtlMs + STOP_WITHIN_MS);
  for (const r of aheadSource.stalled) {
    // the timer started after mountStartedAt, so load can only lengthen this
    assert.ok(r.abortedAt! - mountStartedAt >= preOpenTtlMs - 2, `aborted ${r.abortedAt! - mountStartedAt} ms after the mount began, before the pre-open expired`);
  }
  await until('its prefetch to have ended', () => logs.sawMessage('prefetch stopped'), STOP_WITHIN_MS);
  assert.equal((await run('cat', [path.join(mnt, 'app/later.txt')])).stdout, 'layer 2\n', 'the mounted layer is served meanwhile');
});

test('unmounting a layer stops its background fetch within a second', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const { fsys, source, mnt } = await mountStalled(4, { noPrefetch: true, backgroundFetchQuietMs: 0 }, quiet);
  await until('background fetch to be reading the blob', () => source.stalled.length > 0);
  const unmountedAt = Date.now();
  await fsys.unmount(mnt);
  await until('every background read to be aborted', () => source.stalled.every((r) => r.abortedAt !== undefined), STOP_WITHIN_MS);
  for (const r of source.stalled) assert.ok(r.abortedAt! - unmountedAt < STOP_WITHIN_MS);
  assert.ok(source.startedAt.every((at) => at <= unmountedAt), 'no read of the blob started after the unmount');
});

test('a layer opened ahead and mounted in time keeps its prefetch past the pre-open time', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fs-'));
  const base = await prioritizedLayer(5);
  const next = await prioritizedLayer(6);
  const registry = new MemoryRegistry();
  registry.blobs.set(base.digest, new BufferBlobSource(base.digest, base.blob));
  const nextSource = new StalledHeadBlob(next.digest, next.blob, next.headBytes);
  registry.blobs.set(next.digest, nextSource);
  const preOpenTtlMs = 300;
  const logs = capturingLog('debug');
  const fsys = new StargazeFileSystem({ registry, scheduler, ...fsOptions({ ...defaultConfig(), noBackgroundFetch: true, copyFetchedLayers: false }, preOpenTtlMs), log: logs.log });
  after(async () => {
    await fsys.close();
    await rm(dir, { recursive: true, force: true });
  });
  const layers = `${base.digest},${next.digest}`;
  const labels = (l: typeof base): Record<string, string> => ({
    [TARGET_SNAPSHOT_REF]: l.diffId,
    [STARGZ_REFERENCE]: 'registry.test/img:1',
    [STARGZ_DIGEST]: l.digest,
    [TOC_DIGEST]: l.tocDigest,
    [STARGZ_LAYERS]: layers,
  });
  const [mntA, mntB] = [path.join(dir, 'a'), path.join(dir, 'b')];
  await mkdir(mntA);
  await mkdir(mntB);
  await fsys.mount(mntA, labels(base));
  await until('the next layer to be prefetching ahead of its mount', () => nextSource.stalled.length > 0);
  await fsys.mount(mntB, labels(next)); // claims the layer opened ahead, with its prefetch running
  // The scenario is time passing: past the pre-open's expiry, its timer finds the layer claimed and leaves it.
  await sleep(preOpenTtlMs + 200);
  assert.ok(nextSource.stalled.every((r) => r.abortedAt === undefined), "the mounted layer's prefetch is still running");
  assert.equal(logs.sawMessage('prefetch stopped'), false);
  await fsys.unmount(mntB);
  await until('its prefetch to stop with its unmount', () => nextSource.stalled.every((r) => r.abortedAt !== undefined), STOP_WITHIN_MS);
});

/** A tmp dir with an empty mountpoint, a registry holding one layer, and the mount labels of that layer. */
async function oneLayerSetup(): Promise<{ dir: string; registry: MemoryRegistry; mnt: string; labels: Record<string, string> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fs-'));
  const { blob, digest, tocDigest, diffId } = await layerFixture();
  const registry = new MemoryRegistry();
  registry.blobs.set(digest, new BufferBlobSource(digest, blob));
  const mnt = path.join(dir, 'mnt');
  await mkdir(mnt);
  const labels = { [TARGET_SNAPSHOT_REF]: diffId, [STARGZ_REFERENCE]: 'registry.test/img:1', [STARGZ_DIGEST]: digest, [TOC_DIGEST]: tocDigest };
  return { dir, registry, mnt, labels };
}

test('a layer mounted while the sweep reads the mount table is not taken for vanished', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const { dir, registry, mnt, labels } = await oneLayerSetup();
  // The table as read before the mount completes: the mount finishes while the (slow) read is in flight.
  // Once: later reads (the unmount of close) see the table as it is.
  const late: { fs?: StargazeFileSystem } = {};
  const staleTable = async (): Promise<MountInfo[]> => {
    const table = await listMounts();
    const mountNow = late.fs;
    late.fs = undefined;
    await mountNow?.mount(mnt, labels);
    return table;
  };
  const fsys = new StargazeFileSystem({ registry, scheduler, ...fsOptions({ ...defaultConfig(), noBackgroundFetch: true }), log: quiet, listMounts: staleTable });
  late.fs = fsys;
  after(async () => {
    await fsys.close();
    await rm(dir, { recursive: true, force: true });
  });
  assert.deepEqual(await fsys.dropVanished(), []);
  assert.deepEqual(fsys.list().map((m) => m.mountpoint), [mnt], 'the new mount is still served');
  await fsys.check(mnt);
  assert.equal((await run('cat', [path.join(mnt, 'etc/hello.txt')])).stdout, 'hello lazy world\n');
});

test('a mount detached by the daemon between prepareUnmount and unmount is let go, its path left alone', { skip: !canMount && 'needs root for FUSE' }, async () => {
  const { dir, registry, mnt, labels } = await oneLayerSetup();
  const fsys = new StargazeFileSystem({ registry, scheduler, ...fsOptions({ ...defaultConfig(), noBackgroundFetch: true }), log: quiet });
  after(async () => {
    await fsys.close();
    if ((await listMounts()).some((m) => m.mountpoint === mnt)) await run('umount', ['-l', mnt]);
    await rm(dir, { recursive: true, force: true });
  });
  await fsys.mount(mnt, labels);
  await fsys.prepareUnmount(mnt);
  assert.deepEqual(fsys.list().map((m) => m.mountpoint), [mnt], 'still served until unmount');
  await run('umount', ['-l', mnt]); // what FuseServerClient.unmount does in the daemon
  // An umount of the path by the server would fail now (nothing mounted there): it only lets the session go.
  await fsys.unmount(mnt);
  assert.deepEqual(fsys.list(), []);
  assert.equal((await listMounts()).some((m) => m.mountpoint === mnt), false);
});
