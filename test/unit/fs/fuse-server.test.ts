/**
 * The FUSE server's side of a daemon connection (serveConnection) over a real unix socket, with a fake
 * filesystem: what it answers to good, malformed and failing requests, and that a line it cannot answer
 * costs the connection, not the server (which holds every layer mount).
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pino from 'pino';
import { NotFoundError } from '../../../src/errors';
import { onJsonLines, writeJsonLine } from '../../../src/fs/fuse-server-protocol';
import { LogTap, serveConnection, type ServedFileSystem } from '../../../src/fs/fuse-server';
import { IdleCollector } from '../../../src/fs/idle-collector';

class FakeFileSystem implements ServedFileSystem {
  calls: unknown[][] = [];
  mount(mountpoint: string, labels: Record<string, string>, parent?: string): Promise<void> {
    this.calls.push(['mount', mountpoint, labels, parent]);
    if (mountpoint === '/missing') return Promise.reject(new NotFoundError('no such layer'));
    return Promise.resolve();
  }
  check(mountpoint: string): Promise<void> {
    this.calls.push(['check', mountpoint]);
    return Promise.resolve();
  }
  prepareUnmount(mountpoint: string): Promise<void> {
    this.calls.push(['prepareUnmount', mountpoint]);
    return Promise.resolve();
  }
  unmount(mountpoint: string): Promise<void> {
    this.calls.push(['unmount', mountpoint]);
    return Promise.resolve();
  }
  list(): { mountpoint: string; digest: string }[] {
    return [{ mountpoint: '/m', digest: 'sha256:1' }];
  }
  dropVanished(): Promise<string[]> {
    return Promise.resolve([]);
  }
}

/** A daemon's end: sends lines, collects what comes back, and knows when the server hung up. */
class Daemon {
  readonly received: unknown[] = [];
  readonly closed: Promise<void>;
  private readonly wakeups = new Set<() => void>();
  private constructor(readonly socket: net.Socket) {
    onJsonLines(socket, (m) => {
      this.received.push(m);
      for (const wake of this.wakeups) wake();
    });
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }
  static async connect(socketPath: string): Promise<Daemon> {
    const socket = net.connect(socketPath);
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new Daemon(socket);
  }
  /** The answer to request `id`, once it has come. */
  answer(id: number): Promise<unknown> {
    return this.next((m) => (m as { id?: unknown }).id === id);
  }
  /** The first message that matches, once it has come. */
  async next(match: (m: unknown) => boolean): Promise<unknown> {
    for (;;) {
      const found = this.received.find(match);
      if (found !== undefined) return found;
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          this.wakeups.delete(wake);
          resolve();
        };
        this.wakeups.add(wake);
      });
    }
  }
}

describe('fuse server connection', () => {
  let dir: string;
  let socketPath: string;
  let server: net.Server;
  const fs = new FakeFileSystem();
  const logTap = new LogTap();
  const log = pino({ level: 'silent' });
  /** Garbage collections the connection asked for (a stand-in for V8's gc: a test cannot see a real one). */
  let collections = 0;
  const collector = new IdleCollector(30, () => void collections++, 0);

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fuse-server-'));
    socketPath = path.join(dir, 'fuse.sock');
    server = net.createServer((socket) => serveConnection(socket, fs, { log, logTap, collector }));
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  });
  after(async () => {
    collector.close();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    await rm(dir, { recursive: true, force: true });
  });

  test('answers each request by its id: results, the filesystem errors with their codes', async () => {
    const daemon = await Daemon.connect(socketPath);
    const labels = { a: 'b' };
    writeJsonLine(daemon.socket, { id: 1, op: 'list' });
    writeJsonLine(daemon.socket, { id: 2, op: 'mount', mountpoint: '/x', labels, parent: 'p' });
    writeJsonLine(daemon.socket, { id: 3, op: 'mount', mountpoint: '/missing', labels });
    writeJsonLine(daemon.socket, { id: 4, op: 'check', mountpoint: '/x', labels });
    writeJsonLine(daemon.socket, { id: 5, op: 'prepare-unmount', mountpoint: '/x' });
    writeJsonLine(daemon.socket, { id: 6, op: 'unmount', mountpoint: '/x' });
    assert.deepEqual(await daemon.answer(1), { id: 1, ok: true, mounts: [{ mountpoint: '/m', digest: 'sha256:1' }] });
    assert.deepEqual(await daemon.answer(2), { id: 2, ok: true });
    assert.deepEqual(await daemon.answer(3), { id: 3, ok: false, code: 'ERR_SNAP_NOT_FOUND', message: 'no such layer' });
    assert.deepEqual(await daemon.answer(4), { id: 4, ok: true });
    assert.deepEqual(await daemon.answer(5), { id: 5, ok: true });
    assert.deepEqual(await daemon.answer(6), { id: 6, ok: true });
    assert.deepEqual(fs.calls.slice(-5), [['mount', '/x', labels, 'p'], ['mount', '/missing', labels, undefined], ['check', '/x'], ['prepareUnmount', '/x'], ['unmount', '/x']]);
    daemon.socket.destroy();
  });

  test('the garbage of a burst of mounts and unmounts, failed ones too, is collected once, after the burst', async () => {
    const daemon = await Daemon.connect(socketPath);
    await new Promise((r) => setTimeout(r, 60)); // whatever an earlier test left is collected
    const before = collections;
    writeJsonLine(daemon.socket, { id: 1, op: 'mount', mountpoint: '/x', labels: {} });
    writeJsonLine(daemon.socket, { id: 2, op: 'mount', mountpoint: '/missing', labels: {} });
    writeJsonLine(daemon.socket, { id: 3, op: 'unmount', mountpoint: '/x' });
    for (const id of [1, 2, 3]) await daemon.answer(id);
    assert.equal(collections, before, 'not during the burst');
    await new Promise((r) => setTimeout(r, 80));
    assert.equal(collections, before + 1);
    writeJsonLine(daemon.socket, { id: 4, op: 'list' });
    writeJsonLine(daemon.socket, { id: 5, op: 'check', mountpoint: '/x', labels: {} });
    for (const id of [4, 5]) await daemon.answer(id);
    await new Promise((r) => setTimeout(r, 80));
    assert.equal(collections, before + 1, 'list and check leave no garbage worth a collection');
    daemon.socket.destroy();
  });

  test('a malformed request with an id is answered as an error, and the filesystem never sees it', async () => {
    const daemon = await Daemon.connect(socketPath);
    const before = fs.calls.length;
    writeJsonLine(daemon.socket, { id: 1, op: 'format' });
    writeJsonLine(daemon.socket, { id: 2, op: 'mount', mountpoint: '/x' });
    writeJsonLine(daemon.socket, { id: 3, op: 'list' });
    const unknownOp = (await daemon.answer(1)) as { ok: boolean; code: string; message: string };
    assert.deepEqual([unknownOp.ok, unknownOp.code], [false, 'ERR_PROTOCOL']);
    assert.match(unknownOp.message, /unknown operation "format"/);
    const noLabels = (await daemon.answer(2)) as { ok: boolean; code: string; message: string };
    assert.deepEqual([noLabels.ok, noLabels.code], [false, 'ERR_PROTOCOL']);
    assert.match(noLabels.message, /mount needs labels/);
    assert.equal(((await daemon.answer(3)) as { ok: boolean }).ok, true, 'the connection goes on');
    assert.equal(fs.calls.length, before);
    daemon.socket.destroy();
  });

  for (const line of ['null', '42', '"list"', '{"op":"list"}', '{not json}']) {
    test(`a line with nothing to answer to (${line}) ends that connection, not the server`, async () => {
      const daemon = await Daemon.connect(socketPath);
      daemon.socket.write(`${line}\n`);
      await daemon.closed;
      const next = await Daemon.connect(socketPath);
      writeJsonLine(next.socket, { id: 1, op: 'list' });
      assert.equal(((await next.answer(1)) as { ok: boolean }).ok, true);
      next.socket.destroy();
    });
  }

  test("the server's log lines go to every connected daemon", async () => {
    const daemon = await Daemon.connect(socketPath);
    // Connected once the server answered something on this connection.
    writeJsonLine(daemon.socket, { id: 1, op: 'list' });
    await daemon.answer(1);
    logTap.write('{"msg":"hello"}\n');
    assert.deepEqual(await daemon.next((m) => (m as { log?: unknown }).log !== undefined), { log: '{"msg":"hello"}' });
    daemon.socket.destroy();
  });
});
