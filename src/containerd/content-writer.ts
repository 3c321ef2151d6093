/**
 * Writing one blob into containerd's content store over the Content.Write bidirectional stream, the way
 * containerd's proxy content store and content.OpenWriter/Copy do it:
 *
 *   1. STAT {ref, total, expected}: opens (and locks) the ingest `ref`. ALREADY_EXISTS means the namespace has
 *      the blob: nothing to write, the source is never opened. UNAVAILABLE means another writer holds the ref
 *      (another client pulling the same blob): wait with a randomised, doubling back-off (16 ms .. 2 s) and try
 *      again, until the other writer committed it (then ALREADY_EXISTS) or gave up. The answer's offset says how
 *      much an earlier, interrupted write already left in the ingest; that many bytes of the source are skipped.
 *   2. WRITE {offset, data} in chunks of WRITE_CHUNK_BYTES, each acknowledged with the new offset; up to
 *      WRITES_IN_FLIGHT are sent ahead of their answers (so memory stays at that many chunks, and the source is
 *      read at containerd's pace).
 *   3. COMMIT {total, offset, expected, labels}: containerd checks size and digest. ALREADY_EXISTS here means
 *      someone else committed the same blob meanwhile, which is success too. A failed commit after resuming
 *      an old ingest aborts that ingest and starts over once from byte 0.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { ClientDuplexStream } from '@grpc/grpc-js';
import { StargazeError } from '../errors';
import { fromGrpc, isAlreadyExists, isUnavailable } from './errors';
import type { Descriptor } from './types';

/** Bytes per WRITE message; content.Copy uses 1 MiB buffers too. */
export const WRITE_CHUNK_BYTES = 1024 * 1024;
/** Source buffers at least this big become WRITE messages without being copied (see rechunk). */
const PASS_THROUGH_BYTES = 256 * 1024;
/**
 * WRITE messages sent before the oldest one's answer is awaited. containerd handles a stream's messages in
 * order and answers each, so the answers still arrive in order; with one at a time, every MiB waited a round
 * trip through containerd's disk write, which held a content write to ~110 MB/s (below what a parallel
 * download delivers). Memory stays bounded at this many chunks.
 */
export const WRITES_IN_FLIGHT = 8;
/**
 * Back-off while a ref is locked by another writer, as content.OpenWriter: up to 16 ms at first, doubling up
 * to 2048 ms. (Each refused attempt costs containerd up to a second inside a metadata transaction, so
 * stargaze's own concurrent pulls do not get here: they queue on a host lock first, see host-lock.ts.)
 */
const LOCK_RETRY_START_MS = 16;
const LOCK_RETRY_MAX_MS = 2048;
/** How long to wait for another writer of the same ref before giving up (it may be downloading a big layer). */
export const DEFAULT_LOCK_WAIT_MS = 30 * 60 * 1000;

/** Opens the blob's bytes; called at most twice per write (again only when a resumed ingest was bad). */
export type ContentSource = () => Promise<AsyncIterable<Buffer>> | AsyncIterable<Buffer> | Iterable<Buffer>;

export interface WriteContentOptions {
  /** Labels set on the blob at commit. */
  labels?: Record<string, string>;
  signal?: AbortSignal;
  /** Called after each acknowledged chunk with the bytes of the blob now in the ingest. */
  onProgress?: (bytes: number) => void;
  lockWaitMs?: number;
}

export interface WriteContentResult {
  /** True when the store already had the blob (or another writer committed it first). */
  existed: boolean;
  /** Bytes sent to containerd by this write (0 when the blob existed). */
  written: number;
}

type WriteAction = 'STAT' | 'WRITE' | 'COMMIT';

interface WireWriteRequest {
  action: WriteAction;
  ref?: string;
  total?: number;
  expected?: string;
  offset?: number;
  data?: Buffer;
  labels?: Record<string, string>;
}

interface WireWriteResponse {
  action: WriteAction;
  offset: string | number;
  total: string | number;
  digest: string;
}

class ContentWriteError extends StargazeError {
  constructor(message: string) {
    super('ERR_INTERNAL', message);
  }
}

/** Request/response over one Write stream: each request gets exactly one response, in order. */
class WriteSession {
  /** Callers waiting for their response, oldest first. */
  private readonly waiting: Array<{ resolve: (r: WireWriteResponse) => void; reject: (e: unknown) => void }> = [];
  /** Set once the stream failed or ended; every later request fails with it. */
  private failure: Error | undefined;

  constructor(
    private readonly call: ClientDuplexStream<object, unknown>,
    private readonly what: string,
  ) {
    call.on('data', (res: WireWriteResponse) => this.waiting.shift()?.resolve(res));
    call.on('error', (err: unknown) => this.fail(fromGrpc(err, what)));
    call.on('end', () => this.fail(new ContentWriteError(`${what}: containerd closed the write stream`)));
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const w of this.waiting.splice(0)) w.reject(this.failure);
  }

  send(req: WireWriteRequest): Promise<WireWriteResponse> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const answer = new Promise<WireWriteResponse>((resolve, reject) => this.waiting.push({ resolve, reject }));
    this.call.write(req);
    return answer;
  }

  /** Half-closes after a commit; containerd then ends the stream. */
  close(): void {
    this.failure ??= new ContentWriteError(`${this.what}: write stream closed`);
    this.call.end();
  }

  /** Drops the stream (containerd releases the ref lock, keeping what was written for a later resume). */
  cancel(): void {
    this.failure ??= new ContentWriteError(`${this.what}: write cancelled`);
    this.call.cancel();
  }
}

/** A function, not an inline check, so TypeScript does not narrow `aborted` across awaits. */
function isAborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

function num(v: string | number): number {
  return typeof v === 'number' ? v : Number(v);
}

/**
 * Regroups a byte stream into chunks of at most `size` bytes, skipping `skip` bytes. Source buffers of at
 * least PASS_THROUGH_BYTES go out as views, cut at `size` (no copy: a parallel download hands over chunks of
 * several MiB, and copying them only fed the garbage collector); smaller ones are gathered up to `size`.
 */
async function* rechunk(source: AsyncIterable<Buffer> | Iterable<Buffer>, size: number, skip: number): AsyncGenerator<Buffer> {
  let toSkip = skip;
  let buf: Buffer | undefined;
  let filled = 0;
  for await (const raw of source) {
    let chunk = raw;
    if (toSkip > 0) {
      if (chunk.length <= toSkip) {
        toSkip -= chunk.length;
        continue;
      }
      chunk = chunk.subarray(toSkip);
      toSkip = 0;
    }
    while (chunk.length > 0) {
      // A big enough buffer needs no copy.
      if (filled === 0 && chunk.length >= Math.min(size, PASS_THROUGH_BYTES)) {
        const n = Math.min(size, chunk.length);
        yield chunk.subarray(0, n);
        chunk = chunk.subarray(n);
        continue;
      }
      buf ??= Buffer.allocUnsafe(size);
      const n = chunk.copy(buf, filled, 0, Math.min(chunk.length, size - filled));
      filled += n;
      chunk = chunk.subarray(n);
      if (filled === size) {
        yield buf;
        buf = undefined;
        filled = 0;
      }
    }
  }
  if (toSkip > 0) throw new ContentWriteError(`source ended before the ${skip} bytes already written`);
  if (buf !== undefined && filled > 0) yield buf.subarray(0, filled);
}

/** See the file comment. `openStream` opens a Content.Write call; `abort` is Content.Abort. */
export async function writeContent(
  openStream: () => ClientDuplexStream<object, unknown>,
  abort: (ref: string) => Promise<void>,
  ref: string,
  desc: Descriptor,
  open: ContentSource,
  opts: WriteContentOptions,
): Promise<WriteContentResult> {
  const what = `write ${desc.digest} to containerd's content store`;
  const lockWaitMs = opts.lockWaitMs ?? DEFAULT_LOCK_WAIT_MS;
  const started = Date.now();
  let backoffMs = LOCK_RETRY_START_MS;
  let restarted = false;
  for (;;) {
    if (opts.signal?.aborted === true) throw opts.signal.reason;
    const session = new WriteSession(openStream(), what);
    const onAbort = (): void => session.cancel();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    try {
      let status: WireWriteResponse;
      try {
        status = await session.send({ action: 'STAT', ref, total: desc.size, expected: desc.digest });
      } catch (err) {
        session.cancel();
        if (isAlreadyExists(err)) return { existed: true, written: 0 };
        if (isUnavailable(err) && Date.now() - started < lockWaitMs) {
          // Another writer holds the ref: content.OpenWriter's randomised doubling back-off.
          await sleep(Math.random() * backoffMs, undefined, { signal: opts.signal });
          backoffMs = Math.min(backoffMs * 2, LOCK_RETRY_MAX_MS);
          continue;
        }
        throw err;
      }
      let offset = num(status.offset);
      const resumed = offset > 0;
      if (offset > desc.size) {
        // An ingest longer than the blob cannot be resumed.
        session.cancel();
        if (restarted) throw new ContentWriteError(`${what}: ingest ${ref} holds ${offset} bytes, more than the ${desc.size} expected`);
        restarted = true;
        await abort(ref);
        continue;
      }
      const start = offset;
      const source = await open();
      // WRITEs in flight, oldest first, each with the offset containerd must answer once it has written it.
      const inFlight: Array<{ answer: Promise<WireWriteResponse>; from: number; to: number }> = [];
      const settleOldest = async (): Promise<void> => {
        const w = inFlight.shift() as (typeof inFlight)[number];
        const now = num((await w.answer).offset);
        if (now !== w.to) throw new ContentWriteError(`${what}: short write at offset ${w.from}: containerd is at ${now}`);
        opts.onProgress?.(now);
      };
      try {
        let sent = offset;
        for await (const chunk of rechunk(source, WRITE_CHUNK_BYTES, offset)) {
          const answer = session.send({ action: 'WRITE', offset: sent, data: chunk });
          answer.catch(() => undefined); // observed by settleOldest, or dropped with the session on an error
          inFlight.push({ answer, from: sent, to: sent + chunk.length });
          sent += chunk.length;
          if (inFlight.length >= WRITES_IN_FLIGHT) await settleOldest();
        }
        while (inFlight.length > 0) await settleOldest();
        offset = sent;
      } finally {
        inFlight.length = 0;
      }
      if (offset !== desc.size) throw new ContentWriteError(`${what}: source gave ${offset} bytes, expected ${desc.size}`);
      try {
        const res = await session.send({ action: 'COMMIT', ref, total: desc.size, offset, expected: desc.digest, labels: opts.labels ?? {} });
        if (res.digest !== '' && res.digest !== desc.digest) throw new ContentWriteError(`${what}: containerd committed digest ${res.digest}`);
      } catch (err) {
        if (isAlreadyExists(err)) {
          session.cancel();
          return { existed: true, written: offset - start };
        }
        if (resumed && !restarted) {
          // The bytes left by an earlier write did not add up: start over from scratch, once.
          session.cancel();
          restarted = true;
          await abort(ref).catch(() => undefined);
          continue;
        }
        throw err;
      }
      session.close();
      return { existed: false, written: offset - start };
    } catch (err) {
      session.cancel();
      throw isAborted(opts.signal) ? opts.signal?.reason : err;
    } finally {
      opts.signal?.removeEventListener('abort', onAbort);
    }
  }
}
