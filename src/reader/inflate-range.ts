import { createGunzip } from 'node:zlib';

import { EstargzFormatError, errorMessage } from '../errors';

/**
 * Decompresses just enough of a gzip stream to return bytes [skip, skip + length) of its output.
 * A payload member also carries the tar headers of the entries that follow it (unbounded: think of a
 * file followed by ten thousand directories), so a one-shot gunzip with an output cap could reject a
 * valid layer; streaming and stopping early bounds the work by what was asked for. Runs on the zlib
 * thread pool; concatenated members are followed.
 */

/** Output granularity of the inflater: big enough to keep per-callback overhead low. */
const INFLATE_CHUNK_BYTES = 256 * 1024;

export function inflateRange(compressed: Buffer, skip: number, length: number): Promise<Buffer> {
  if (length === 0) return Promise.resolve(Buffer.alloc(0));
  return new Promise<Buffer>((resolve, reject) => {
    const out = Buffer.allocUnsafe(length);
    /** Decompressed bytes seen so far. */
    let seen = 0;
    let filled = 0;
    let settled = false;
    const gunzip = createGunzip({ chunkSize: INFLATE_CHUNK_BYTES });
    gunzip.on('data', (chunk: Buffer) => {
      if (settled) return;
      const from = Math.max(0, skip - seen);
      const to = Math.min(chunk.length, skip + length - seen);
      if (to > from) filled += chunk.copy(out, filled, from, to);
      seen += chunk.length;
      if (filled === length) {
        settled = true;
        gunzip.destroy(); // the rest is other entries' headers: not needed
        resolve(out);
      }
    });
    gunzip.on('error', (err: unknown) => {
      if (settled) return;
      settled = true;
      reject(new EstargzFormatError(`corrupt gzip member: ${errorMessage(err)}`));
    });
    gunzip.on('end', () => {
      if (settled) return;
      settled = true;
      reject(new EstargzFormatError(`gzip member holds ${seen} bytes, need ${skip + length}`));
    });
    gunzip.end(compressed);
  });
}
