/**
 * The daemon <-> FUSE server wire: JSON lines (cut on bytes, bounded, checked) and the shapes each end accepts.
 * Chunk boundaries are exact here (a fake socket emits each chunk as one 'data' event); one test runs a
 * real unix socket, where the kernel cuts a big line wherever it likes.
 */
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { ProtocolError } from '../../../src/errors';
import {
  MAX_LINE_BYTES,
  onJsonLines,
  parseRequest,
  parseServerMessage,
  requestId,
  writeJsonLine,
} from '../../../src/fs/fuse-server-protocol';

/** Just what onJsonLines and writeJsonLine use of a socket, with 'data' chunks delivered exactly as given. */
class FakeSocket extends EventEmitter {
  destroyed = false;
  error: Error | undefined;
  written: string[] = [];
  destroy(err?: Error): this {
    this.destroyed = true;
    this.error = err;
    return this;
  }
  write(data: string): boolean {
    this.written.push(data);
    return true;
  }
  asSocket(): net.Socket {
    return this as unknown as net.Socket;
  }
}

/** Feeds `chunks` one 'data' event each (while the socket lives): the messages handled, and how it ended. */
function feed(chunks: (string | Buffer)[]): { messages: unknown[]; error: Error | undefined; destroyed: boolean } {
  const socket = new FakeSocket();
  const messages: unknown[] = [];
  onJsonLines(socket.asSocket(), (m) => messages.push(m));
  for (const chunk of chunks) if (!socket.destroyed) socket.emit('data', Buffer.from(chunk));
  return { messages, error: socket.error, destroyed: socket.destroyed };
}

/** A JSON string literal of exactly `bytes` bytes (quotes included). */
function jsonOfBytes(bytes: number): string {
  return `"${'a'.repeat(bytes - 2)}"`;
}

function assertProtocolError(err: Error | undefined, pattern: RegExp): void {
  assert.ok(err instanceof ProtocolError, `a ProtocolError, not ${String(err)}`);
  assert.equal(err.code, 'ERR_PROTOCOL');
  assert.match(err.message, pattern);
}

describe('onJsonLines', () => {
  test('cuts lines wherever the chunks end, several to a chunk or one over several, skipping empty ones', () => {
    const r = feed(['{"a":1}\n{"b"', ':2}\n\n', '\n[3', ',4]\n"five"\n']);
    assert.deepEqual(r.messages, [{ a: 1 }, { b: 2 }, [3, 4], 'five']);
    assert.equal(r.destroyed, false);
  });

  test('a line is held until its newline comes', () => {
    const r = feed(['{"a":1}']);
    assert.deepEqual(r.messages, []);
    assert.equal(r.destroyed, false);
  });

  test('a character split between two chunks arrives whole', () => {
    const line = Buffer.from('{"label":"caf\u00e9 \u20ac"}\n');
    const euro = line.indexOf(0xe2); // first byte of the euro sign
    const r = feed([line.subarray(0, euro + 1), line.subarray(euro + 1)]);
    assert.deepEqual(r.messages, [{ label: 'caf\u00e9 \u20ac' }]);
  });

  test('a line that is not JSON ends the connection, and nothing after it is handled', () => {
    const r = feed(['{"a":1}\n{not json}\n{"b":2}\n']);
    assert.deepEqual(r.messages, [{ a: 1 }]);
    assert.equal(r.destroyed, true);
    assertProtocolError(r.error, /not JSON/);
  });

  test('a line of MAX_LINE_BYTES is taken, in one chunk or many', () => {
    const line = jsonOfBytes(MAX_LINE_BYTES);
    const whole = feed([`${line}\n`]);
    assert.equal(whole.destroyed, false);
    assert.equal((whole.messages[0] as string).length, MAX_LINE_BYTES - 2);
    const pieces: string[] = [];
    for (let i = 0; i < line.length; i += 65536) pieces.push(line.slice(i, i + 65536));
    const split = feed([...pieces, '\n']);
    assert.equal(split.destroyed, false);
    assert.equal(split.messages.length, 1);
  });

  test('a line one byte over MAX_LINE_BYTES ends the connection, whether or not its newline came with it', () => {
    const line = jsonOfBytes(MAX_LINE_BYTES + 1);
    for (const chunks of [[`${line}\n`], [line], [line.slice(0, 1000), `${line.slice(1000)}\n`]]) {
      const r = feed(chunks);
      assert.deepEqual(r.messages, []);
      assert.equal(r.destroyed, true);
      assertProtocolError(r.error, /line too long/);
    }
  });

  test('the bound counts bytes, not characters', () => {
    // Three bytes per character: under the bound in characters, over it in bytes.
    const chars = Math.floor(MAX_LINE_BYTES / 3) + 1;
    const r = feed([`"${'\u20ac'.repeat(chars)}"\n`]);
    assert.equal(r.destroyed, true);
    assertProtocolError(r.error, /line too long/);
  });

  test('lines after one whose handler destroyed the socket are dropped', () => {
    const socket = new FakeSocket();
    const seen: unknown[] = [];
    onJsonLines(socket.asSocket(), (m) => {
      seen.push(m);
      socket.destroy();
    });
    socket.emit('data', Buffer.from('1\n2\n3\n'));
    assert.deepEqual(seen, [1]);
  });

  test('a big message crosses a real unix socket intact, next to small ones', async (t) => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-proto-'));
    t.after(() => rm(dir, { recursive: true, force: true }));
    const socketPath = path.join(dir, 's');
    const received: unknown[] = [];
    const labels = Object.fromEntries(Array.from({ length: 200 }, (_, i) => [`containerd.io/snapshot/label-${i}`, 'x'.repeat(4000)]));
    const done = new Promise<void>((resolve, reject) => {
      const server = net.createServer((conn) => {
        conn.on('error', reject);
        onJsonLines(conn, (m) => {
          received.push(m);
          if (received.length === 3) {
            conn.destroy();
            server.close();
            resolve();
          }
        });
      });
      server.listen(socketPath);
    });
    const client = net.connect(socketPath);
    await new Promise((r) => client.once('connect', r));
    writeJsonLine(client, { id: 1, op: 'list' });
    writeJsonLine(client, { id: 2, op: 'mount', mountpoint: '/m', labels });
    writeJsonLine(client, { id: 3, op: 'unmount', mountpoint: '/m' });
    await done;
    client.destroy();
    assert.deepEqual(received, [{ id: 1, op: 'list' }, { id: 2, op: 'mount', mountpoint: '/m', labels }, { id: 3, op: 'unmount', mountpoint: '/m' }]);
  });

  test('writeJsonLine writes one line, and nothing once the socket is destroyed', () => {
    const socket = new FakeSocket();
    writeJsonLine(socket.asSocket(), { id: 1, ok: true });
    socket.destroy();
    writeJsonLine(socket.asSocket(), { id: 2, ok: true });
    assert.deepEqual(socket.written, ['{"id":1,"ok":true}\n']);
  });
});

describe('parseRequest', () => {
  const labels = { 'containerd.io/snapshot/remote/stargz.digest': 'sha256:1' };
  test('takes each operation with what it needs, and keeps nothing else', () => {
    const cases: [unknown, unknown][] = [
      [{ id: 1, op: 'mount', mountpoint: '/m', labels }, { id: 1, op: 'mount', mountpoint: '/m', labels }],
      [{ id: 2, op: 'mount', mountpoint: '/m', labels, parent: 'p' }, { id: 2, op: 'mount', mountpoint: '/m', labels, parent: 'p' }],
      [{ id: 3, op: 'check', mountpoint: '/m', labels: {} }, { id: 3, op: 'check', mountpoint: '/m', labels: {} }],
      [{ id: 4, op: 'unmount', mountpoint: '/m', labels }, { id: 4, op: 'unmount', mountpoint: '/m' }],
      [{ id: 5, op: 'prepare-unmount', mountpoint: '/m' }, { id: 5, op: 'prepare-unmount', mountpoint: '/m' }],
      [{ id: 0, op: 'list', extra: true }, { id: 0, op: 'list' }],
    ];
    for (const [input, expected] of cases) assert.deepEqual(parseRequest(input), expected, JSON.stringify(input));
  });

  test('refuses what is not a request, saying what is wrong', () => {
    const cases: [unknown, RegExp][] = [
      [null, /integer id/],
      [[1], /integer id/],
      ['list', /integer id/],
      [{ op: 'list' }, /integer id/],
      [{ id: '1', op: 'list' }, /integer id/],
      [{ id: 1.5, op: 'list' }, /integer id/],
      [{ id: 1 }, /unknown operation undefined/],
      [{ id: 1, op: 'format' }, /unknown operation "format"/],
      [{ id: 1, op: 'mount', labels }, /mount needs a mountpoint/],
      [{ id: 1, op: 'mount', mountpoint: '', labels }, /mount needs a mountpoint/],
      [{ id: 1, op: 'mount', mountpoint: '/m' }, /mount needs labels/],
      [{ id: 1, op: 'mount', mountpoint: '/m', labels: { a: 1 } }, /mount needs labels/],
      [{ id: 1, op: 'mount', mountpoint: '/m', labels: ['a'] }, /mount needs labels/],
      [{ id: 1, op: 'mount', mountpoint: '/m', labels, parent: 7 }, /parent must be a string/],
      [{ id: 1, op: 'check', mountpoint: 7, labels }, /check needs a mountpoint/],
      [{ id: 1, op: 'unmount' }, /unmount needs a mountpoint/],
      [{ id: 1, op: 'prepare-unmount', mountpoint: '' }, /prepare-unmount needs a mountpoint/],
    ];
    for (const [input, pattern] of cases) {
      assert.throws(() => parseRequest(input), (err: unknown) => {
        assert.ok(err instanceof ProtocolError, JSON.stringify(input));
        assert.match(err.message, pattern, JSON.stringify(input));
        return true;
      });
    }
  });

  test('requestId: the id an error can be answered to, when there is one', () => {
    assert.equal(requestId({ id: 7, op: 'format' }), 7);
    assert.equal(requestId({ id: 0 }), 0);
    for (const m of [null, 7, [7], {}, { id: '7' }, { id: 7.5 }, { id: Number.MAX_SAFE_INTEGER + 1 }]) assert.equal(requestId(m), undefined);
  });
});

describe('parseServerMessage', () => {
  test('takes answers and log events', () => {
    const cases: [unknown, unknown][] = [
      [{ log: '{"level":"info"}' }, { log: '{"level":"info"}' }],
      [{ id: 1, ok: true }, { id: 1, ok: true }],
      [{ id: 2, ok: true, mounts: [{ mountpoint: '/m', digest: 'sha256:1', more: 1 }] }, { id: 2, ok: true, mounts: [{ mountpoint: '/m', digest: 'sha256:1' }] }],
      [{ id: 3, ok: false, code: 'ERR_SNAP_NOT_FOUND', message: 'no' }, { id: 3, ok: false, code: 'ERR_SNAP_NOT_FOUND', message: 'no' }],
      // JSON drops an undefined code: the answer of an error that had none.
      [{ id: 4, ok: false, message: 'boom' }, { id: 4, ok: false, code: undefined, message: 'boom' }],
    ];
    for (const [input, expected] of cases) assert.deepEqual(parseServerMessage(input), expected, JSON.stringify(input));
  });

  test('refuses anything else', () => {
    const cases: unknown[] = [
      null,
      'text',
      42,
      { log: 1 },
      { ok: true },
      { id: 'x', ok: true },
      { id: 1 },
      { id: 1, ok: 'yes' },
      { id: 1, ok: true, mounts: {} },
      { id: 1, ok: true, mounts: [{ mountpoint: '/m' }] },
      { id: 1, ok: false },
      { id: 1, ok: false, message: 'x', code: 5 },
    ];
    for (const input of cases) assert.throws(() => parseServerMessage(input), ProtocolError, JSON.stringify(input));
  });
});
