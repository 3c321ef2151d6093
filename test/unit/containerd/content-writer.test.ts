/** writeContent against a fake Content.Write stream: WRITEs are pipelined, bounded, and checked in order. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { describe, it } from 'node:test';
import type { ClientDuplexStream } from '@grpc/grpc-js';
import { WRITE_CHUNK_BYTES, WRITES_IN_FLIGHT, writeContent } from '../../../src/containerd/content-writer';

interface Req {
  action: string;
  offset?: number;
  data?: Buffer;
}

/** A Write stream that answers each request on a later tick; `lie` makes one WRITE answer report a short write. */
function fakeStream(opts: { lie?: number } = {}) {
  const state = { received: [] as Buffer[], maxUnanswered: 0, unanswered: 0, writes: 0 };
  const open = (): ClientDuplexStream<object, unknown> => {
    const s = new EventEmitter() as EventEmitter & { write: (r: Req) => boolean; end: () => void; cancel: () => void };
    let offset = 0;
    s.write = (r: Req) => {
      state.unanswered++;
      state.maxUnanswered = Math.max(state.maxUnanswered, state.unanswered);
      setImmediate(() => {
        state.unanswered--;
        if (r.action === 'WRITE') {
          state.writes++;
          state.received.push(r.data as Buffer);
          offset += (r.data as Buffer).length - (state.writes === opts.lie ? 1 : 0);
        }
        s.emit('data', { action: r.action, offset, total: 0, digest: '' });
      });
      return true;
    };
    s.end = () => setImmediate(() => s.emit('end'));
    s.cancel = () => undefined;
    return s as unknown as ClientDuplexStream<object, unknown>;
  };
  return { state, open };
}

describe('content writer', () => {
  it(`keeps up to ${WRITES_IN_FLIGHT} WRITEs in flight and sends every byte in order`, async () => {
    const bytes = randomBytes(20 * WRITE_CHUNK_BYTES + 5);
    const { state, open } = fakeStream();
    const progress: number[] = [];
    const desc = { mediaType: 'application/octet-stream', digest: 'sha256:x', size: bytes.length };
    const res = await writeContent(open, () => Promise.resolve(), 'ref', desc, () => [bytes.subarray(0, 3), bytes.subarray(3)], { onProgress: (n) => progress.push(n) });
    assert.deepEqual(res, { existed: false, written: bytes.length });
    assert.deepEqual(Buffer.concat(state.received), bytes);
    assert.ok(state.maxUnanswered > 1 && state.maxUnanswered <= WRITES_IN_FLIGHT, `unanswered at most ${state.maxUnanswered}`);
    assert.equal(progress[progress.length - 1], bytes.length);
    assert.deepEqual(progress, [...progress].sort((a, b) => a - b));
  });

  it('a WRITE answered with the wrong offset fails the write', async () => {
    const bytes = randomBytes(12 * WRITE_CHUNK_BYTES);
    const { open } = fakeStream({ lie: 3 });
    const desc = { mediaType: 'application/octet-stream', digest: 'sha256:x', size: bytes.length };
    await assert.rejects(writeContent(open, () => Promise.resolve(), 'ref', desc, () => [bytes], {}), /short write at offset 2097152/);
  });
});
