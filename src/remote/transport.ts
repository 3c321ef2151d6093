/**
 * How registry requests are sent: layers wrapped around one request function, each with one job.
 *
 *   exchange()          the one retry policy (retry.ts): a request and the reading of its answer, tried again
 *                       on TransientRegistryError, at most 1 + max_retries attempts
 *     followRedirects   manifests and whole blobs only: up to MAX_REDIRECTS hops, auth only on the endpoint's origin
 *       authorizedSend  endpoint headers and registry auth, 401 -> authenticate, send once more (transport-auth.ts)
 *         clientCertSend  client certificate choice; raw failures become coded errors (transport-certs.ts)
 *           TransportPools.request  undici pools and TLS contexts (transport-pool.ts)
 *
 * The layers under exchange() never retry, so the bound on a request is the one retry.ts documents.
 *
 * Timeouts: the request bound of an endpoint (requestTimeoutFor) is undici's idle limit (headers, gap between
 * body chunks) of every request to it; callers use it, or the fetch bound of a range read, as the end-to-end
 * deadline of what they send (deadline.ts). Token requests get the client's request bound end to end.
 */
import type { Dispatcher } from 'undici';
import { RegistryError } from '../errors';
import type { Logger } from '../log';
import { MAX_TOKEN_RESPONSE_BYTES, RegistryAuthorizer, type TokenHttp } from './auth';
import type { CredentialProvider } from './credentials';
import { Deadline, isAborted } from './deadline';
import { discard, firstHeader, isRedirect, readLimited, statusError } from './http-response';
import { TransientRegistryError, transportError } from './registry-errors';
import { isRetryableStatus, parseRetryAfter, retrying, type RetryPolicy } from './retry';
import { authorizedSend } from './transport-auth';
import { clientCertSend } from './transport-certs';
import type { HttpRequest, Send, TlsSettings } from './transport-interface';
import { TransportPools } from './transport-pool';

/** Redirect hops followed for manifests and whole blobs (range probes follow exactly one, as the reference). */
export const MAX_REDIRECTS = 5;

export interface TransportOptions {
  log: Logger;
  /** [resolver] request_timeout_sec in ms; null: none. */
  requestTimeoutMs: number | null;
  connectionsPerOrigin: number;
  retry: RetryPolicy;
  /** Registry credentials, asked when a registry answers 401. */
  credentials: CredentialProvider;
}

export class Transport {
  readonly retry: RetryPolicy;
  readonly authorizer: RegistryAuthorizer;
  private readonly log: Logger;
  private readonly requestTimeoutMs: number | null;
  private readonly pools: TransportPools;
  /** One attempt at a request. */
  private readonly sendOnce: Send;
  /** One attempt, following redirects. */
  private readonly sendFollowing: Send;

  constructor(opts: TransportOptions) {
    this.log = opts.log;
    this.retry = opts.retry;
    this.requestTimeoutMs = opts.requestTimeoutMs;
    this.pools = new TransportPools({ connectionsPerOrigin: opts.connectionsPerOrigin, idleTimeoutFor: (tls) => this.requestTimeoutFor(tls) });
    this.authorizer = new RegistryAuthorizer({ credentials: opts.credentials, http: this.tokenHttp, log: opts.log });
    this.sendOnce = authorizedSend(clientCertSend(this.pools, opts.log), this.authorizer);
    this.sendFollowing = followRedirects(this.sendOnce, MAX_REDIRECTS);
  }

  get closed(): boolean {
    return this.pools.closed;
  }

  /** Closes every connection pool; in-flight requests fail. */
  close(): Promise<void> {
    return this.pools.close();
  }

  /**
   * The request bound for `target` (an endpoint; undefined for other origins): a config mirror's own
   * request_timeout_sec when it sets one (negative: none), else [resolver] request_timeout_sec.
   */
  requestTimeoutFor(target: TlsSettings | undefined): number | null {
    const own = target?.requestTimeoutSec ?? 0;
    if (own > 0) return own * 1000;
    return own < 0 ? null : this.requestTimeoutMs;
  }

  /**
   * Sends `req` and hands its answer to `read`, retrying per the policy: a transport failure, a retryable
   * status (429, 5xx but 501) or an error of `read` that is a TransientRegistryError (a body cut short) costs
   * one attempt. On the last attempt a retryable status goes to `read` like any other. Raw errors of `read`
   * (the body stream's) are classified by transportError(). With `follow`, redirects are followed.
   */
  exchange<T>(req: HttpRequest, read: (res: Dispatcher.ResponseData) => Promise<T>, follow = false): Promise<T> {
    const send = follow ? this.sendFollowing : this.sendOnce;
    return retrying(
      this.retry,
      req.signal,
      async (last) => {
        const res = await send(req);
        if (!last && isRetryableStatus(res.statusCode)) {
          const retryAfterMs = parseRetryAfter(res.headers['retry-after']);
          await discard(res);
          throw new TransientRegistryError(statusError(req.what, req.url.host, res.statusCode).message, res.statusCode, { retryAfterMs });
        }
        try {
          return await read(res);
        } catch (err) {
          res.body.destroy();
          if (isAborted(req.signal)) throw err;
          throw transportError(err, `${req.what}: reading the answer of ${req.url.host} failed`);
        }
      },
      (err, retry, waitMs) => this.log.debug({ host: req.url.host, attempt: retry, waitMs, status: err.status, err: err.message }, 'registry request failed; retrying'),
    );
  }

  /** Token server requests: through the same pools and retry policy, bounded by the client's request bound. */
  private readonly tokenHttp: TokenHttp = async (url, init) => {
    const deadline = new Deadline(init.signal, this.requestTimeoutMs);
    const what = `token request to ${url.host}`;
    try {
      const req: HttpRequest = { url, method: init.method, headers: init.headers, body: init.body, signal: deadline.signal, what };
      return await this.exchange(req, async (res) => ({ status: res.statusCode, body: await readLimited(res, MAX_TOKEN_RESPONSE_BYTES, what, url.host) }));
    } catch (err) {
      throw deadline.error(err, what);
    } finally {
      deadline.dispose();
    }
  };
}

/**
 * GET following up to `maxRedirects` hops. A hop to another origin leaves the endpoint behind: no registry
 * auth, no custom headers, default TLS there.
 */
function followRedirects(inner: Send, maxRedirects: number): Send {
  return async (req) => {
    const start = req.url;
    let hopReq = req;
    for (let hop = 0; ; hop++) {
      const res = await inner(hopReq);
      if (!isRedirect(res.statusCode)) return res;
      const target = firstHeader(res, 'location');
      await discard(res);
      if (target === undefined) throw new RegistryError(`${req.what}: redirect (${res.statusCode}) from ${hopReq.url.host} without a Location`, res.statusCode);
      if (hop >= maxRedirects) throw new RegistryError(`${req.what}: more than ${maxRedirects} redirects from ${start.host}`, res.statusCode);
      const url = new URL(target, hopReq.url);
      hopReq = url.origin === start.origin ? { ...req, url } : { ...req, url, endpoint: undefined };
    }
  };
}
