import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, link, lstat, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { LONGEST_SOCKET_NAME_BYTES, acquireHostLock, lockPath, tryHostLock } from '../../../src/containerd/host-lock';
import { MAX_SOCKET_NAME_BYTES, privateRpullDir, UNUSABLE_DIR_WARNING } from '../../../src/containerd/rpull-dir';

const HOST_LOCK_MODULE = path.join(__dirname, '../../../src/containerd/host-lock.js');

/** A fresh private lock directory for one test. */
async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const base = await mkdtemp(path.join(os.tmpdir(), 'stargaze-lock-'));
  try {
    const dir = await privateRpullDir(path.join(base, 'locks'));
    assert.ok(dir);
    await fn(dir);
  } finally {
    await rm(base, { recursive: true, force: true });
  }
}

function listen(server: net.Server, at: string): Promise<void> {
  return new Promise((resolve) => server.listen(at, resolve));
}

function isLive(file: string): Promise<boolean> {
  return new Promise((resolve) => {
    const conn = net.connect(file);
    conn.once('connect', () => {
      conn.destroy();
      resolve(true);
    });
    conn.once('error', () => resolve(false));
  });
}

/** Leaves a socket file at `file` that nothing listens on: what a holder killed before releasing leaves. */
async function staleSocket(dir: string, file: string): Promise<void> {
  const tmp = path.join(dir, 'stale-tmp');
  const server = net.createServer();
  await listen(server, tmp);
  await link(tmp, file);
  await new Promise<void>((resolve) => server.close(() => resolve())); // unlinks tmp only
  assert.ok((await lstat(file)).isSocket());
}

/** A separate process that takes lock `name` in `dir` and holds it until it is killed. */
async function holderProcess(dir: string, name: string): Promise<{ kill: () => Promise<void> }> {
  const script = `require(${JSON.stringify(HOST_LOCK_MODULE)}).tryHostLock(${JSON.stringify(name)}, ${JSON.stringify(dir)}).then((r) => {
    if (r === undefined) process.exit(3);
    process.stdout.write('held\\n');
    setInterval(() => undefined, 60000);
  });`;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    child.stdout.on('data', (d: Buffer) => d.toString().includes('held') && resolve());
    child.once('exit', (code) => reject(new Error(`holder exited with ${code} before taking the lock`)));
  });
  return {
    kill: async () => {
      child.kill('SIGKILL');
      await exited;
    },
  };
}

test('a lock is a socket file in the private directory: taken once, a waiter gets it on release, release removes the file', () =>
  withDir(async (dir) => {
    const name = 'test lock';
    const release = await tryHostLock(name, dir);
    assert.ok(release);
    assert.ok((await lstat(lockPath(dir, name))).isSocket());
    assert.equal(await tryHostLock(name, dir), undefined);
    const waiting = acquireHostLock(name, { dir });
    await release();
    const second = await waiting;
    assert.ok(second);
    await second();
    await assert.rejects(lstat(lockPath(dir, name)), { code: 'ENOENT' });
  }));

test('a squatter on the abstract name the locks used to have holds nothing', () =>
  withDir(async (dir) => {
    const name = `squatted ${process.pid}`;
    // What anyone on the host could bind before: the lock's old abstract socket name.
    const squatter = net.createServer();
    await listen(squatter, `\0stargaze-lock-${createHash('sha256').update(name).digest('hex').slice(0, 48)}`);
    try {
      const release = await acquireHostLock(name, { dir, signal: AbortSignal.timeout(2000) });
      assert.ok(release);
      assert.ok(await isLive(lockPath(dir, name)));
      await release();
    } finally {
      squatter.close();
    }
  }));

test('a directory others can enter is not used: nothing is locked, nothing waits', () =>
  withDir(async (dir) => {
    const name = 'open dir';
    const holder = net.createServer();
    await listen(holder, lockPath(dir, name));
    try {
      await chmod(dir, 0o777);
      const warnings: { message: string; code?: string }[] = [];
      const onWarning = (w: Error & { code?: string }): void => void warnings.push(w);
      process.on('warning', onWarning);
      try {
        // The socket there could be anyone's: not waited for (the lock is a no-op, the work is only repeated).
        const release = await acquireHostLock(name, { dir, signal: AbortSignal.timeout(2000) });
        assert.ok(release);
        await release();
        await acquireHostLock(name, { dir, signal: AbortSignal.timeout(2000) }).then((r) => r?.());
        await new Promise((r) => setImmediate(r));
      } finally {
        process.off('warning', onWarning);
      }
      assert.ok(await isLive(lockPath(dir, name)), 'a no-op release leaves the file alone');
      const said = warnings.filter((w) => w.code === UNUSABLE_DIR_WARNING);
      assert.equal(said.length, 1, 'said once, not at every lock');
      assert.match(said[0]!.message, /is not private to uid \d+ \(owner \d+, mode 777\): concurrent pulls of one image are not collapsed/);
    } finally {
      holder.close();
    }
  }));

test('a directory too long for socket paths is not used (Node would cut the path short and merge locks)', async () => {
  assert.ok(LONGEST_SOCKET_NAME_BYTES <= MAX_SOCKET_NAME_BYTES);
  const base = await mkdtemp(path.join(os.tmpdir(), 'stargaze-lock-'));
  try {
    assert.equal(await privateRpullDir(path.join(base, 'x'.repeat(100))), undefined);
  } finally {
    await rm(base, { recursive: true, force: true });
  }
});

test('a holder killed with SIGKILL: its waiter wakes at once and takes the lock over the socket file left behind', () =>
  withDir(async (dir) => {
    const name = 'killed holder';
    const holder = await holderProcess(dir, name);
    assert.equal(await tryHostLock(name, dir), undefined);
    const waiting = acquireHostLock(name, { dir });
    const killedAt = Date.now();
    await holder.kill();
    const release = await waiting;
    assert.ok(release);
    assert.ok(Date.now() - killedAt < 1000, `took ${Date.now() - killedAt} ms after the kill`);
    assert.ok(await isLive(lockPath(dir, name)));
    await release();

    // Nobody waiting at the kill: the file stays behind, stale, and the next taker gets the lock anyway.
    const again = await holderProcess(dir, name);
    await again.kill();
    assert.ok((await lstat(lockPath(dir, name))).isSocket());
    assert.equal(await isLive(lockPath(dir, name)), false);
    const next = await tryHostLock(name, dir);
    assert.ok(next);
    await next();
  }));

test('many takers of one stale file at once: exactly one gets the lock', () =>
  withDir(async (dir) => {
    const name = 'stale race';
    await staleSocket(dir, lockPath(dir, name));
    const takers = await Promise.all(Array.from({ length: 12 }, () => tryHostLock(name, dir)));
    const held = takers.filter((r) => r !== undefined);
    assert.equal(held.length, 1);
    await held[0]?.();
    const after = await tryHostLock(name, dir);
    assert.ok(after);
    await after();
  }));

test('a holder that closes every connection at once does not make a waiter spin', () =>
  withDir(async (dir) => {
    const name = 'hostile lock';
    let connections = 0;
    // A holder that hangs up on everyone (a misbehaving process of our own user: nobody else can get in).
    const hostile = net.createServer((conn) => {
      connections++;
      conn.destroy();
    });
    await listen(hostile, lockPath(dir, name));
    try {
      const waiting = acquireHostLock(name, { dir, signal: AbortSignal.timeout(1000) });
      await assert.rejects(waiting);
      // Two connections (the try and the wait) per 50 ms poll; a busy loop made thousands in the same second.
      assert.ok(connections <= 80, `${connections} connections in one second`);
    } finally {
      hostile.close();
    }
  }));
