/**
 * Worker thread body for zstd-pool.ts: decodes one chunk's zstd member per message with zstdRange and
 * posts the bytes back (transferred, not copied). Runs no other code of the daemon.
 */
import { parentPort } from 'node:worker_threads';

import { errorCode, errorMessage } from '../errors';
import { zstdDecompressAll, zstdRange } from '../estargz/zstd-range';
import type { ZstdJob, ZstdReply } from './zstd-pool';

const port = parentPort;
if (port === null) throw new Error('zstd-worker runs as a worker thread only');

port.on('message', (job: ZstdJob) => {
  const member = Buffer.from(job.member);
  const work = job.kind === 'all' ? zstdDecompressAll(member, job.length) : zstdRange(member, job.skip, job.length, job.maxFrameOutput);
  work.then(
    (out) => {
      // A small Buffer is a view of Node's shared pool: transferring that would detach the pool, so copy it.
      const own = out.byteOffset === 0 && out.buffer.byteLength === out.length ? out.buffer : out.buffer.slice(out.byteOffset, out.byteOffset + out.length);
      const reply: ZstdReply = { id: job.id, data: own as ArrayBuffer };
      port.postMessage(reply, [own as ArrayBuffer]);
    },
    (err: unknown) => {
      const reply: ZstdReply = { id: job.id, error: { message: errorMessage(err), code: errorCode(err) } };
      port.postMessage(reply);
    },
  );
});
