/**
 * Retry policy for registry requests (reference: the hashicorp retryable client each registry host gets,
 * research notes §3.2): retry on transport errors and on HTTP 429 and 5xx except 501; wait
 * min·2^attempt capped at max (or what Retry-After asks, also capped), then add jitter so the total lies
 * in [d, 2d). Retries are bounded per request by `maxRetries`; the caller's deadline bounds them in time.
 */
import { errorCode } from '../errors';

/** [blob] max_retries default. */
export const DEFAULT_MAX_RETRIES = 5;
/** [blob] min_wait_msec default. */
export const DEFAULT_MIN_WAIT_MS = 30;
/** [blob] max_wait_msec default. */
export const DEFAULT_MAX_WAIT_MS = 300_000;

export interface RetryPolicy {
  /** Retries after the first attempt; 0 disables retrying. */
  readonly maxRetries: number;
  /** First backoff before jitter. */
  readonly minWaitMs: number;
  /** Cap of one backoff before jitter (Retry-After is capped too). */
  readonly maxWaitMs: number;
}

export const DEFAULT_RETRY_POLICY: RetryPolicy = {
  maxRetries: DEFAULT_MAX_RETRIES,
  minWaitMs: DEFAULT_MIN_WAIT_MS,
  maxWaitMs: DEFAULT_MAX_WAIT_MS,
};

/** 429 and 5xx except 501 (Not Implemented will not change by asking again). */
export function isRetryableStatus(status: number): boolean {
  return status === 429 || (status >= 500 && status <= 599 && status !== 501);
}

/** Transport-level failure codes worth another try (node net errors and undici's). */
const TRANSIENT_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EAI_AGAIN',
  'UND_ERR_SOCKET',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH',
  'UND_ERR_RES_CONTENT_LENGTH_MISMATCH',
]);

/** Errors we made ourselves for transient conditions (a body cut short): retried like network errors. */
const transient = new WeakSet<object>();

/** Marks `err` as worth another try; returns it. */
export function markTransient<T extends object>(err: T): T {
  transient.add(err);
  return err;
}

/** True for errors of the network rather than of the request (walks `cause` chains). */
export function isTransientNetworkError(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e !== undefined && e !== null && depth < 5; depth++) {
    if (typeof e === 'object' && transient.has(e)) return true;
    const code = errorCode(e);
    if (code !== undefined && TRANSIENT_CODES.has(code)) return true;
    if (e instanceof Error && /other side closed|socket hang up|terminated/i.test(e.message)) return true;
    e = e instanceof Error ? e.cause : undefined;
  }
  return false;
}

/**
 * Retry-After as milliseconds: delta-seconds or an HTTP date; undefined when absent or unparseable.
 * A date in the past means "now" (0).
 */
export function parseRetryAfter(value: string | string[] | undefined, now = Date.now()): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (v === undefined) return undefined;
  const s = v.trim();
  if (/^\d+$/.test(s)) return Number(s) * 1000;
  const t = Date.parse(s);
  if (Number.isNaN(t)) return undefined;
  return Math.max(0, t - now);
}

/**
 * Wait before retry number `attempt` (0 = first retry): min·2^attempt capped at max, or Retry-After
 * capped at max, plus jitter in [0, d).
 */
export function backoffMs(policy: RetryPolicy, attempt: number, retryAfterMs?: number, random: () => number = Math.random): number {
  const exp = policy.minWaitMs * 2 ** Math.min(attempt, 30);
  const base = Math.min(retryAfterMs ?? exp, policy.maxWaitMs);
  return Math.floor(base + random() * base);
}

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
export function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  if (signal?.aborted === true) return Promise.reject(signal.reason);
  return new Promise<void>((resolve, reject) => {
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, Math.min(ms, 2 ** 31 - 1));
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Builds a policy from config values where 0/undefined means the default (the reference's rule). */
export function retryPolicy(opts: Partial<RetryPolicy> | undefined): RetryPolicy {
  const pick = (v: number | undefined, d: number): number => (v === undefined || !(v > 0) ? d : v);
  return {
    maxRetries: opts?.maxRetries === undefined ? DEFAULT_MAX_RETRIES : Math.max(0, opts.maxRetries),
    minWaitMs: pick(opts?.minWaitMs, DEFAULT_MIN_WAIT_MS),
    maxWaitMs: pick(opts?.maxWaitMs, DEFAULT_MAX_WAIT_MS),
  };
}
