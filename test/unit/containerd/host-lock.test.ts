import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import { acquireHostLock, socketName, tryHostLock } from '../../../src/containerd/host-lock';

test('a lock is taken once, and a waiter gets it when the holder releases it', async () => {
  const name = `test lock ${process.pid} ${Date.now()}`;
  const release = await tryHostLock(name);
  assert.ok(release);
  assert.equal(await tryHostLock(name), undefined);
  const waiting = acquireHostLock(name);
  await release();
  const second = await waiting;
  assert.ok(second);
  await second();
});

test('a holder that closes every connection at once does not make a waiter spin', async () => {
  const name = `hostile lock ${process.pid} ${Date.now()}`;
  let connections = 0;
  // Plays whoever bound the name first and hangs up on everyone (an older stargaze did exactly that).
  const hostile = net.createServer((conn) => {
    connections++;
    conn.destroy();
  });
  await new Promise<void>((resolve) => hostile.listen(socketName(name), resolve));
  try {
    const waiting = acquireHostLock(name, { signal: AbortSignal.timeout(1000) });
    await assert.rejects(waiting);
    // About one try per 50 ms poll; a busy loop made thousands in the same second.
    assert.ok(connections <= 40, `${connections} connections in one second`);
  } finally {
    hostile.close();
  }
});
