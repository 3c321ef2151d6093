/**
 * The diff_id of a layer is the sha256 of its uncompressed stream. Background fetch computes it in its
 * pass over the blob; when prefetch has already downloaded the head of the blob, that head is hashed here
 * instead and the pass starts where the head ends, so no byte is downloaded twice.
 *
 * Only at a gzip member boundary can the stream be cut: each eStargz member is a complete gzip stream, so
 * the head inflates on its own and the rest starts a fresh gunzip, feeding the same running hash. A head
 * that does not end on a boundary fails to inflate (unexpected end of file), and the caller falls back to
 * the full pass.
 */
import { createHash, type Hash } from 'node:crypto';
import { createGunzip } from 'node:zlib';
import { VerificationError } from '../errors';

/** The hash of the uncompressed stream of blob bytes [0, offset), to continue from `offset`. */
export interface DiffResume {
  /** A member boundary: where the continuing pass starts. */
  offset: number;
  /** Running sha256 of the uncompressed bytes so far; not yet digested. */
  hash: Hash;
}

/** Hashes what a blob decompresses to, fed in order. */
export interface DiffHasher {
  write(data: Buffer): Promise<void>;
  /** `sha256:` of the whole decompressed stream. */
  end(): Promise<string>;
}

/** A streaming gunzip (it follows concatenated members) into `hash`, a fresh sha256 by default. */
export function gzipDiff(hash: Hash = createHash('sha256')): DiffHasher {
  const { write, finish } = gunzipInto(hash);
  return {
    write,
    async end() {
      await finish();
      return 'sha256:' + hash.digest('hex');
    },
  };
}

/**
 * Inflates `head` (blob bytes [0, head.length), which must end on a member boundary) into a new running
 * hash. zlib works on its thread pool, not the event loop.
 */
export async function hashGzipHead(head: Buffer): Promise<DiffResume> {
  const hash = createHash('sha256');
  const { write, finish } = gunzipInto(hash);
  await write(head);
  await finish();
  return { offset: head.length, hash };
}

/**
 * A streaming gunzip into `hash`. Its two functions are closures, not methods, so callers can take them apart
 * (`const { write, finish } = ...`).
 */
function gunzipInto(hash: Hash): { write: (data: Buffer) => Promise<void>; finish: () => Promise<void> } {
  const gunzip = createGunzip();
  gunzip.on('data', (d: Buffer) => hash.update(d));
  let written = 0;
  let finishing = false;
  const inflated = new Promise<void>((resolve, reject) => {
    gunzip.once('end', resolve);
    gunzip.once('error', reject);
  });
  inflated.catch(() => undefined); // seen by finish() or the write that waits on it
  // gunzip ends quietly where a member is followed by garbage (a zero byte, say): the rest of the blob would
  // then be hashed by nobody, and a forged tail could pass the chainID check. Every byte must be consumed.
  const endedEarly = inflated.then(() => {
    if (!finishing) throw new VerificationError(`the layer's gzip stream ended after ${gunzip.bytesWritten} of the bytes written to it`);
  });
  endedEarly.catch(() => undefined);
  return {
    write: async (data) => {
      written += data.length;
      // Never wait for a 'drain' that cannot come once the stream has ended or failed.
      if (!gunzip.write(data)) await Promise.race([new Promise((r) => gunzip.once('drain', r)), endedEarly]);
    },
    finish: async () => {
      finishing = true;
      gunzip.end();
      await inflated;
      if (gunzip.bytesWritten !== written) {
        throw new VerificationError(`the layer's gzip stream ends after ${gunzip.bytesWritten} of ${written} bytes: the rest is not gzip`);
      }
    },
  };
}
