/**
 * A resolved layer blob in a registry: range reads against its (possibly redirected) URL.
 *
 * Range reads expect 206 with a matching Content-Range; a 200 (server ignored Range) is read only up to the
 * wanted slice and the rest of the connection is dropped, so a whole blob is never buffered. Multi-range reads
 * send one GET `Range: bytes=a-b,c-d` and parse multipart/byteranges as a stream; a 400, or a 200 (the blob from
 * its start), switches that host to single ranges (as does force_single_range_mode).
 *
 * Each read is one request (Transport.exchange: its retries, a body cut short included), bounded end to end by
 * the fetch timeout ([blob] fetching_timeout_sec). Besides retries, a read may change where it reads from,
 * each at most once: a 403 on a redirected URL (expired pre-signed URL), or a 401 from storage on another
 * origin, locates the blob again and reads anew; a host that still fails after its retries (gone, overloaded,
 * lost the blob) gives way to the next host of hosts.toml, as resolving does.
 */
import type { Dispatcher } from 'undici';
import { RegistryError, errorMessage } from '../errors';
import type { Logger } from '../log';
import { requestTo, type BlobLocation, type BlobLocator } from './blob-locator';
import type { BlobSource, ByteRange } from './blob-source';
import { Deadline, isAborted } from './deadline';
import { discard, firstHeader, parseContentRange, parseNonNegativeInt, readSlice, readSliceInto } from './http-response';
import { boundaryOf, ByteRangesParser } from './multipart-byteranges';
import { planRanges, RangeFiller, resultsOf, type MergedRange } from './range-plan';
import type { ImageReference } from './reference';
import { ExpiredUrlError, TransientRegistryError } from './registry-errors';
import type { Transport } from './transport';

/** Ranges per multi-range request; more are split over several requests (keeps the Range header small). */
export const MAX_RANGES_PER_REQUEST = 64;

/** Which hosts get single ranges only. */
export class SingleRangeHosts {
  /** Hosts that answered a multi-range request with 400, or with 200 (the whole blob). */
  private readonly hosts = new Set<string>();

  constructor(
    /** [blob] force_single_range_mode: every host is treated as single-range. */
    private readonly forced: boolean,
    private readonly log: Logger,
  ) {}

  has(host: string): boolean {
    return this.forced || this.hosts.has(host);
  }

  /** `host` refused a multi-range request (400), or answered it with the whole blob (200). */
  add(host: string, answer: 400 | 200 = 400): void {
    if (this.hosts.has(host)) return;
    this.hosts.add(host);
    const what = answer === 400 ? 'refused a multi-range request' : 'answered a multi-range request with the whole blob';
    this.log.info({ host, status: answer }, `registry host ${what}; using single ranges for it`);
  }
}

/** What the blob sources of one client share. */
export interface BlobSourceContext {
  readonly transport: Transport;
  readonly locator: BlobLocator;
  readonly singleRangeHosts: SingleRangeHosts;
  /** End-to-end bound of one range read; null: none. */
  readonly fetchTimeoutMs: number | null;
  readonly log: Logger;
}

type ReadAnswer<T> = (res: Dispatcher.ResponseData, host: string) => Promise<T>;

export class RegistryBlobSource implements BlobSource {
  /** Current location; replaced when a pre-signed URL expires and is refreshed, or the host fails over. */
  private location: BlobLocation;
  private readonly what: string;
  /** The registry answered the resolve probe's range request with the whole blob (200). */
  rangesIgnored = false;

  constructor(
    private readonly ctx: BlobSourceContext,
    private readonly reference: ImageReference,
    readonly digest: string,
    readonly size: number,
    location: BlobLocation,
  ) {
    this.location = location;
    this.what = `blob ${digest} of ${reference.name}`;
  }

  /** Host currently serving the bytes (the storage host after a redirect). */
  get host(): string {
    return this.location.url.host;
  }

  async readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    this.checkRange(offset, length);
    if (length === 0) return Buffer.alloc(0);
    const rangeWhat = `${this.what} bytes ${offset}-${offset + length - 1}`;
    return this.exchange(rangeWhat, `bytes=${offset}-${offset + length - 1}`, signal, (res, host) => this.readResponse(res, offset, length, rangeWhat, host));
  }

  /**
   * One request, written into `into` as it arrives. A retry inside the request (a body cut short) reads its range
   * from the start again into the same bytes, so `arrived` is told only when the count passes what it was told
   * before. A request that fails after bytes arrived (its retries spent, or its fetch timeout passed: a long
   * range on a slow link) is followed by one for the rest, each with its own timeout, as long as each brings
   * bytes.
   */
  async readRangeInto(offset: number, into: Buffer, arrived: (n: number) => void, signal?: AbortSignal): Promise<void> {
    const length = into.length;
    this.checkRange(offset, length);
    if (length === 0) return arrived(0);
    let told = 0;
    const tell = (n: number): void => {
      if (n <= told) return;
      told = n;
      arrived(n);
    };
    for (;;) {
      const from = told;
      const start = offset + from;
      const rangeWhat = `${this.what} bytes ${start}-${offset + length - 1}`;
      try {
        await this.exchange(rangeWhat, `bytes=${start}-${offset + length - 1}`, signal, async (res, host) => {
          const answer = await this.rangeAnswer(res, start, length - from, rangeWhat, host);
          await readSliceInto(res.body, answer === 'range' ? 0 : start, into.subarray(from), (n) => tell(from + n), rangeWhat, host, answer === 'range');
        });
        return;
      } catch (err) {
        if (told === from || isAborted(signal)) throw err;
        this.ctx.log.debug({ digest: this.digest, resumeAt: start + (told - from), err: errorMessage(err) }, 'streamed range read broke off; reading the rest');
      }
    }
  }

  /**
   * Reads several ranges with one GET `Range: bytes=a-b,c-d,...` (overlapping and adjacent ranges merged;
   * more than MAX_RANGES_PER_REQUEST split over parallel requests). Answers understood: 206 multipart/byteranges
   * (parsed as a stream; the Content-Type may be missing), 206 with one Content-Range (a server that merged the
   * ranges), 200 (the whole blob, read only up to the last wanted byte). Whatever the answer left out is read
   * with single ranges. A 400 or a 200 switches the host to single ranges for good, as does
   * force_single_range_mode: after a 200, each later request (a background pass asks one per window) would read
   * the blob from its start again, quadratic in the blob's size.
   */
  async readRanges(ranges: readonly ByteRange[], signal?: AbortSignal): Promise<Buffer[]> {
    for (const r of ranges) this.checkRange(r.offset, r.length);
    const plan = planRanges(ranges);
    const merged = plan.merged;
    if (merged.length === 1) {
      const m = merged[0] as MergedRange;
      const data = await this.readRange(m.offset, m.length, signal);
      return ranges.map((r) => (r.length === 0 ? Buffer.alloc(0) : data.subarray(r.offset - m.offset, r.offset - m.offset + r.length)));
    }
    const batches: MergedRange[][] = [];
    for (let i = 0; i < merged.length; i += MAX_RANGES_PER_REQUEST) batches.push(merged.slice(i, i + MAX_RANGES_PER_REQUEST));
    await Promise.all(batches.map((b) => this.readMerged(b, signal)));
    return resultsOf(plan, ranges);
  }

  /** Fills `merged` (sorted, disjoint ranges with their buffers) from one multi-range request, or singles. */
  private async readMerged(merged: MergedRange[], signal: AbortSignal | undefined): Promise<void> {
    const singles = async (): Promise<void> => {
      await Promise.all(merged.map(async (m) => (await this.readRange(m.offset, m.length, signal)).copy(m.buffer)));
    };
    if (merged.length === 1 || this.ctx.singleRangeHosts.has(this.location.url.host)) return singles();
    const what = `${this.what} (${merged.length} ranges)`;
    const header = `bytes=${merged.map((m) => `${m.offset}-${m.offset + m.length - 1}`).join(',')}`;
    let filler: RangeFiller | undefined;
    const outcome = await this.exchange(what, header, signal, async (res, host) => {
      if (res.statusCode === 400) {
        await discard(res);
        this.ctx.singleRangeHosts.add(host);
        return 'single' as const;
      }
      filler = new RangeFiller(merged);
      await this.readMultiResponse(res, filler, what, host);
      return 'ok' as const;
    });
    if (outcome === 'single' || filler === undefined) return singles();
    // A server may answer fewer ranges than asked (some answer just the first): read the rest one by one.
    const f = filler;
    const missing = f.missing();
    if (missing.length > 0) {
      this.ctx.log.debug({ host: this.host, missing: missing.length }, 'multi-range answer left ranges out; reading them singly');
      await Promise.all(missing.map(async (m) => f.fill(m.index, m.offset, await this.readRange(m.offset, m.length, signal))));
    }
  }

  /**
   * Sends GET with `range` to the current location and hands the answer to `read`, under the fetch timeout.
   * The request's retries are Transport.exchange's; this only moves the read, at most once each: to a fresh
   * URL when the redirected one expired, and to another host when this one still fails.
   */
  private async exchange<T>(what: string, range: string, signal: AbortSignal | undefined, read: ReadAnswer<T>): Promise<T> {
    const deadline = new Deadline(signal, this.ctx.fetchTimeoutMs);
    const headers = { range, 'accept-encoding': 'identity' };
    let refreshed = false;
    let mustRefresh = false;
    let failedOver = false;
    try {
      for (;;) {
        try {
          if (mustRefresh) {
            mustRefresh = false;
            await this.refresh(deadline.signal);
          }
          const location = this.location;
          const host = location.url.host;
          const answer = (res: Dispatcher.ResponseData): Promise<T> => (!refreshed && isExpired(location, res.statusCode) ? expired(res, what, host) : read(res, host));
          return await this.ctx.transport.exchange(requestTo(location, this.reference, { method: 'GET', headers, signal: deadline.signal, what }), answer);
        } catch (err) {
          if (isAborted(deadline.signal)) throw err;
          if (err instanceof ExpiredUrlError) {
            refreshed = mustRefresh = true;
            continue;
          }
          if (failedOver || !worthFailover(err)) throw err;
          failedOver = true;
          if (!(await this.failover(deadline.signal, err))) throw err;
        }
      }
    } catch (err) {
      throw deadline.error(err, `${what} at ${this.location.url.host}`);
    } finally {
      deadline.dispose();
    }
  }

  /** Moves to another registry host after `cause`; false when there is none or it failed too. */
  private async failover(signal: AbortSignal, cause: unknown): Promise<boolean> {
    const old = this.location;
    let found: { location: BlobLocation; size: number } | undefined;
    try {
      found = await this.ctx.locator.relocate(this.reference, this.digest, old.endpoint.host, signal);
    } catch (err) {
      this.ctx.log.debug({ digest: this.digest, err: errorMessage(err) }, 'no other registry host could serve the blob');
      return false;
    }
    if (found === undefined || found.size !== this.size) return false;
    this.location = found.location;
    this.ctx.log.info(
      { digest: this.digest, from: old.endpoint.host, to: found.location.endpoint.host, err: errorMessage(cause) },
      'registry host failed; reading the blob from another host',
    );
    return true;
  }

  /** Asks the registry for a fresh URL (the redirect's pre-signed one expired). */
  private async refresh(signal: AbortSignal): Promise<void> {
    const { location, size } = await this.ctx.locator.locate(this.location.endpoint, this.reference, this.location.blobUrl, this.what, signal);
    if (size !== this.size) throw new RegistryError(`${this.what}: size changed from ${this.size} to ${size} on refresh`);
    this.location = location;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`range ${offset}+${length} outside ${this.what} of ${this.size} bytes`);
    }
  }

  /** Reads a multi-range answer into `filler`; see readRanges. */
  private async readMultiResponse(res: Dispatcher.ResponseData, filler: RangeFiller, what: string, host: string): Promise<void> {
    const body = res.body as AsyncIterable<Buffer> & { destroy(): void };
    if (res.statusCode === 206) {
      const rawRange = firstHeader(res, 'content-range');
      if (rawRange !== undefined) {
        // One part: the server merged the ranges (or sent only some); Content-Type does not matter.
        const range = parseContentRange(rawRange);
        if (range === undefined || range.end < range.start || range.end >= this.size || (range.total !== undefined && range.total !== this.size)) {
          await discard(res);
          throw new RegistryError(`${what}: ${host} answered 206 with Content-Range ${JSON.stringify(rawRange)} for a blob of ${this.size} bytes`, 206);
        }
        let pos = range.start;
        for await (const chunk of body) {
          if (pos + chunk.length > range.end + 1) throw new RegistryError(`${what}: ${host} sent more bytes than its Content-Range holds`, 206);
          filler.add(pos, chunk);
          pos += chunk.length;
        }
        if (pos !== range.end + 1) throw new TransientRegistryError(`${what}: ${host} ended the body after ${pos - range.start} of ${range.end - range.start + 1} bytes`);
        return;
      }
      const parser = new ByteRangesParser(boundaryOf(firstHeader(res, 'content-type')), (offset, data) => filler.add(offset, data), this.size, `${what} from ${host}`);
      for await (const chunk of body) parser.write(chunk); // a malformed body throws: not transient
      parser.end(); // cut short inside a part: transient
      return;
    }
    if (res.statusCode === 200) {
      // The server ignored Range: take what we want from the whole blob, stop after the last wanted byte.
      // Single ranges from now on: another multi-range request would read the blob from 0 again.
      this.ctx.singleRangeHosts.add(host, 200);
      const len = parseNonNegativeInt(firstHeader(res, 'content-length'));
      if (len !== undefined && len !== this.size) {
        res.body.destroy();
        throw new RegistryError(`${what}: ${host} sent a ${len}-byte blob, expected ${this.size}`, 200);
      }
      let pos = 0;
      for await (const chunk of body) {
        filler.add(pos, chunk);
        pos += chunk.length;
        if (pos >= filler.end) break; // leaving the loop destroys the body
      }
      if (pos < filler.end) throw new TransientRegistryError(`${what}: ${host} ended the body after ${pos} bytes`);
      return;
    }
    await discard(res);
    throw unexpectedAnswer(what, host, res.statusCode);
  }

  private async readResponse(res: Dispatcher.ResponseData, offset: number, length: number, what: string, host: string): Promise<Buffer> {
    const answer = await this.rangeAnswer(res, offset, length, what, host);
    return answer === 'range' ? readSlice(res.body, 0, length, what, host, true) : readSlice(res.body, offset, length, what, host, false);
  }

  /**
   * Whether `res` holds exactly bytes [offset, offset + length) (206) or the whole blob (200: the server
   * ignored Range; the caller keeps only its slice and drops the connection after it). Anything else throws.
   */
  private async rangeAnswer(res: Dispatcher.ResponseData, offset: number, length: number, what: string, host: string): Promise<'range' | 'whole'> {
    if (res.statusCode === 206) {
      const type = firstHeader(res, 'content-type') ?? '';
      const range = parseContentRange(firstHeader(res, 'content-range'));
      const end = offset + length - 1;
      if (type.toLowerCase().startsWith('multipart/') || range === undefined || range.start !== offset || range.end !== end || (range.total !== undefined && range.total !== this.size)) {
        await discard(res);
        throw new RegistryError(
          `${what}: ${host} answered 206 with Content-Range ${JSON.stringify(firstHeader(res, 'content-range') ?? '')}, want bytes ${offset}-${end}/${this.size}`,
          206,
        );
      }
      return 'range';
    }
    if (res.statusCode === 200) {
      const len = parseNonNegativeInt(firstHeader(res, 'content-length'));
      if (len !== undefined && len !== this.size) {
        res.body.destroy();
        throw new RegistryError(`${what}: ${host} sent a ${len}-byte blob, expected ${this.size}`, 200);
      }
      return 'whole';
    }
    await discard(res);
    throw unexpectedAnswer(what, host, res.statusCode);
  }
}

/**
 * An expired pre-signed storage URL (any redirect target). Storage on another origin gets no registry auth, so
 * its 401 means the same as a 403 (some S3-compatible stores answer 401 to an expired signature); on the
 * registry's own origin a 401 was already answered by authenticating.
 */
function isExpired(location: BlobLocation, status: number): boolean {
  const expired = status === 403 || (status === 401 && location.foreign);
  return expired && (location.foreign || location.url.href !== location.blobUrl.href);
}

async function expired(res: Dispatcher.ResponseData, what: string, host: string): Promise<never> {
  await discard(res);
  throw new ExpiredUrlError(`${what}: ${host} answered HTTP ${res.statusCode} (expired URL)`, res.statusCode);
}

function unexpectedAnswer(what: string, host: string, status: number): RegistryError {
  const why = status === 404 ? 'not found' : status === 416 ? 'range not satisfiable' : 'unexpected answer';
  return new RegistryError(`${what}: ${host} answered HTTP ${status} (${why})`, status);
}

/** A host that is gone, overloaded or lost the blob is worth leaving; bad credentials or ranges are not. */
function worthFailover(err: unknown): boolean {
  if (!(err instanceof RegistryError)) return false;
  return err.status === undefined || err.status >= 500 || err.status === 429 || err.status === 404;
}
