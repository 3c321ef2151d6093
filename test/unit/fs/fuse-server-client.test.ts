/**
 * The daemon's end of the FUSE server connection against a stand-in server on a unix socket: answers reach
 * their requests by id, and an answer it cannot trust ends the connection (pending requests fail Unavailable)
 * rather than the daemon.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import pino from 'pino';
import { StargazeError, UnavailableError } from '../../../src/errors';
import { FuseServerClient } from '../../../src/fs/fuse-server-client';
import { onJsonLines } from '../../../src/fs/fuse-server-protocol';

/** A server on `dir`/fuse.sock answering each request with `answer(request)`, written as one raw line. */
async function standInServer(dir: string, answer: (request: { id: number; op: string }) => string): Promise<{ socketPath: string; close: () => Promise<void> }> {
  const socketPath = path.join(dir, 'fuse.sock');
  const connections = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    connections.add(socket);
    socket.on('error', () => undefined);
    onJsonLines(socket, (m) => socket.write(`${answer(m as { id: number; op: string })}\n`));
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  return {
    socketPath,
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of connections) c.destroy();
        server.close(() => resolve());
      }),
  };
}

function client(socketPath: string, dir: string): FuseServerClient {
  // serverArgv is never used: the stand-in server is listening already.
  return new FuseServerClient({ socketPath, logFile: path.join(dir, 'server.log'), serverArgv: [], log: pino({ level: 'silent' }) });
}

test('answers reach their requests; an error answer becomes an error of its code', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fuse-client-'));
  const server = await standInServer(dir, (r) =>
    r.op === 'check' ? JSON.stringify({ id: r.id, ok: false, code: 'ERR_SNAP_NOT_FOUND', message: 'gone' }) : JSON.stringify({ id: r.id, ok: true }),
  );
  const c = client(server.socketPath, dir);
  t.after(async () => {
    await c.close();
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });
  await c.mount('/m', { a: 'b' });
  await assert.rejects(c.check('/m', {}), (err: unknown) => err instanceof StargazeError && err.code === 'ERR_SNAP_NOT_FOUND' && err.message === 'gone');
  await c.unmount('/m');
});

for (const line of ['null', '7', '{"id":"1","ok":true}', '{"id":1,"ok":"yes"}']) {
  test(`an answer it cannot trust (${line}) ends the connection and fails what is pending`, async (t) => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fuse-client-'));
    const server = await standInServer(dir, () => line);
    const c = client(server.socketPath, dir);
    t.after(async () => {
      await c.close();
      await server.close();
      await rm(dir, { recursive: true, force: true });
    });
    await assert.rejects(c.unmount('/m'), (err: unknown) => err instanceof UnavailableError && /connection closed/.test(err.message));
  });
}

test('unmount asks the server to stop the layer, then to unmount it; a server without prepare-unmount just unmounts', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-fuse-client-'));
  const ops: string[] = [];
  let knowsPrepare = true;
  const server = await standInServer(dir, (r) => {
    ops.push(r.op);
    return r.op === 'prepare-unmount' && !knowsPrepare
      ? JSON.stringify({ id: r.id, ok: false, code: 'ERR_PROTOCOL', message: 'fuse server protocol: unknown operation "prepare-unmount"' })
      : JSON.stringify({ id: r.id, ok: true });
  });
  const c = client(server.socketPath, dir);
  t.after(async () => {
    await c.close();
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });
  // The directory is no mount point: the daemon has nothing to detach between the two requests.
  await c.unmount(dir);
  assert.deepEqual(ops, ['prepare-unmount', 'unmount']);
  knowsPrepare = false;
  ops.length = 0;
  await c.unmount(dir);
  assert.deepEqual(ops, ['prepare-unmount', 'unmount']);
  // Any other failure of the first step is the unmount's failure.
  const failing = await standInServer(await mkdtemp(path.join(os.tmpdir(), 'stargaze-fuse-client-')), (r) =>
    JSON.stringify({ id: r.id, ok: false, code: 'ERR_SNAP_UNAVAILABLE', message: 'busy' }),
  );
  const c2 = client(failing.socketPath, dir);
  t.after(async () => {
    await c2.close();
    await failing.close();
    await rm(path.dirname(failing.socketPath), { recursive: true, force: true });
  });
  await assert.rejects(c2.unmount(dir), (err: unknown) => err instanceof StargazeError && err.code === 'ERR_SNAP_UNAVAILABLE');
});
