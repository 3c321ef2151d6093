/**
 * Reading undici answers: headers, Content-Range, bodies read whole (bounded), sliced, discarded or verified
 * against a digest. Nothing here sends a request.
 */
import { createHash } from 'node:crypto';
import { type Readable, Transform, type TransformCallback } from 'node:stream';
import type { Dispatcher } from 'undici';
import { RegistryError } from '../errors';
import { TransientRegistryError } from './registry-errors';

/** Bytes of an unwanted body (401 page, error JSON) read to keep the connection reusable before dropping it. */
const DRAIN_LIMIT_BYTES = 64 * 1024;

export function firstHeader(res: Dispatcher.ResponseData, name: string): string | undefined {
  const v = res.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

export function parseNonNegativeInt(s: string | undefined): number | undefined {
  if (s === undefined || !/^\d+$/.test(s.trim())) return undefined;
  const n = Number(s.trim());
  return Number.isSafeInteger(n) ? n : undefined;
}

/** `bytes a-b/total` (total may be `*`). */
export function parseContentRange(s: string | undefined): { start: number; end: number; total: number | undefined } | undefined {
  if (s === undefined) return undefined;
  const m = /^bytes\s+(\d+)-(\d+)\/(\d+|\*)$/i.exec(s.trim());
  if (m === null) return undefined;
  const start = Number(m[1]);
  const end = Number(m[2]);
  const total = m[3] === '*' ? undefined : Number(m[3]);
  // A hostile or broken server's numbers never become sizes or offsets: past 2^53 they are not exact.
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start > end) return undefined;
  if (total !== undefined && (!Number.isSafeInteger(total) || end >= total)) return undefined;
  return { start, end, total };
}

export function isRedirect(status: number): boolean {
  return status === 301 || status === 302 || status === 303 || status === 307 || status === 308;
}

/** The error for an answer with an unexpected status, naming what was asked and of which host. */
export function statusError(what: string, host: string, status: number): RegistryError {
  const why =
    status === 404 ? 'not found' : status === 403 ? 'access denied' : status === 429 ? 'too many requests' : status >= 500 ? 'server error' : 'unexpected answer';
  return new RegistryError(`${what}: ${host} answered HTTP ${status} (${why})`, status);
}

/** Best effort: read a little of an unwanted body so the socket can be reused, else drop it. */
export async function discard(res: Dispatcher.ResponseData): Promise<void> {
  try {
    await res.body.dump({ limit: DRAIN_LIMIT_BYTES });
  } catch {
    // The connection is gone either way; nothing to report.
  }
}

/** Reads a whole (small) body into one Buffer, refusing more than `limit` bytes. */
export async function readLimited(res: Dispatcher.ResponseData, limit: number, what: string, host: string): Promise<Buffer> {
  const declared = parseNonNegativeInt(firstHeader(res, 'content-length'));
  if (declared !== undefined && declared > limit) {
    res.body.destroy();
    throw new RegistryError(`${what}: ${host} sent ${declared} bytes, more than the ${limit} allowed`, res.statusCode);
  }
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of res.body as AsyncIterable<Buffer>) {
    total += chunk.length;
    if (total > limit) throw new RegistryError(`${what}: ${host} sent more than the ${limit} bytes allowed`, res.statusCode);
    chunks.push(chunk);
  }
  return chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, total);
}

/**
 * The pieces of a body holding its bytes [skip, skip + length), in order, none past the slice. With `exact`, the
 * body must be exactly `length` bytes (more is a RegistryError); otherwise the pieces stop (and the stream is
 * destroyed) as soon as the slice is complete. A body that ends early is a TransientRegistryError: worth reading
 * again.
 */
async function* slicePieces(body: Readable, skip: number, length: number, what: string, host: string, exact: boolean): AsyncGenerator<Buffer> {
  let written = 0;
  let toSkip = skip;
  for await (const raw of body as AsyncIterable<Buffer>) {
    let chunk = raw;
    if (toSkip > 0) {
      if (chunk.length <= toSkip) {
        toSkip -= chunk.length;
        continue;
      }
      chunk = chunk.subarray(toSkip);
      toSkip = 0;
    }
    if (written + chunk.length > length && exact) {
      throw new RegistryError(`${what}: ${host} sent more bytes than the range holds`);
    }
    const piece = chunk.length <= length - written ? chunk : chunk.subarray(0, length - written);
    written += piece.length;
    yield piece;
    if (!exact && written === length) break; // leaving the loop destroys the body: the rest is never read
  }
  if (written !== length) {
    throw new TransientRegistryError(`${what}: ${host} ended the body after ${written} of ${length} bytes`);
  }
}

/** Bytes [skip, skip + length) of a body in one Buffer (see slicePieces for `exact` and errors). */
export async function readSlice(body: Readable, skip: number, length: number, what: string, host: string, exact: boolean): Promise<Buffer> {
  let out: Buffer | undefined;
  let written = 0;
  for await (const piece of slicePieces(body, skip, length, what, host, exact)) {
    // One piece that is the whole slice needs no copy (the body is still read to its end: the connection is reused).
    if (out === undefined && piece.length === length) {
      out = piece;
      continue;
    }
    out ??= Buffer.allocUnsafe(length);
    written += piece.copy(out, written);
  }
  return out ?? Buffer.alloc(0);
}

/**
 * readSlice into `into` (length: into.length), calling `arrived(n)` each time bytes [0, n) of it are in. A body
 * that ends early is a TransientRegistryError, as for readSlice; what arrived before stays written.
 */
export async function readSliceInto(body: Readable, skip: number, into: Buffer, arrived: (n: number) => void, what: string, host: string, exact: boolean): Promise<void> {
  let written = 0;
  for await (const piece of slicePieces(body, skip, into.length, what, host, exact)) {
    written += piece.copy(into, written);
    arrived(written);
  }
}

/** Passes a blob through, hashing it; fails the stream at the end on a digest or length mismatch. */
export class DigestVerifier extends Transform {
  private readonly hash: ReturnType<typeof createHash> | undefined;
  private seen = 0;

  constructor(
    private readonly digest: string,
    private readonly expectedSize: number | undefined,
    private readonly what: string,
  ) {
    super();
    // Only sha256 is checked; other algorithms pass through unverified.
    this.hash = digest.startsWith('sha256:') ? createHash('sha256') : undefined;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.seen += chunk.length;
    this.hash?.update(chunk);
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    if (this.expectedSize !== undefined && this.seen !== this.expectedSize) {
      cb(new RegistryError(`${this.what}: got ${this.seen} bytes, Content-Length said ${this.expectedSize}`));
      return;
    }
    if (this.hash !== undefined) {
      const got = `sha256:${this.hash.digest('hex')}`;
      if (got !== this.digest) {
        cb(new RegistryError(`${this.what}: content has digest ${got}`));
        return;
      }
    }
    cb();
  }
}
