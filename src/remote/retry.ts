/**
 * The retry policy of every registry request (reference: the hashicorp retryable client each registry host
 * gets, research notes §3.2), and the one loop that applies it (retrying()).
 *
 * What is retried: errors that are TransientRegistryError (registry-errors.ts): transport failures, 429 and
 * 5xx except 501, a body cut short. The wait is min·2^retry capped at max (or what Retry-After asks, also
 * capped), plus jitter so it lies in [d, 2d).
 *
 * The bound: one request (a range read, a probe, a manifest, a token, a whole-blob GET) makes at most
 * maxAttempts(policy) = 1 + max_retries attempts at one URL (6 at the defaults), whatever mix of failures it
 * meets. An attempt is one HTTP request, except for steps that are not retries and are bounded on their own:
 * a 401 from the registry authenticates and sends again once (transport-auth.ts); of several hosts.toml client
 * certificates, each may be tried once until the origin accepts one (transport-certs.ts); a manifest or whole
 * blob follows up to MAX_REDIRECTS redirects. Only retrying() retries: nothing nests another loop around it.
 * A range read may in addition refresh an expired redirect once and move to another host once, each time
 * starting a new request (registry-blob-source.ts). The caller's deadline bounds all of it in time.
 * Proven by test/unit/remote/retry-bound.test.ts.
 */
import { RegistryError } from '../errors';
import { isRetryable, type TransientRegistryError } from './registry-errors';

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

/** Attempts one request may make: the first and `maxRetries` retries. */
export function maxAttempts(policy: RetryPolicy): number {
  return 1 + policy.maxRetries;
}

/**
 * The one retry loop: runs `attempt` until it succeeds, throws an error that is not retryable, `signal`
 * aborts, or maxAttempts(policy) attempts are spent. `attempt` is told when it is the last, so it can hand a
 * retryable answer (a 503) to its caller then rather than throw it. When the retries run out, the error says
 * how many there were and is no longer retryable.
 */
export async function retrying<T>(
  policy: RetryPolicy,
  signal: AbortSignal | undefined,
  attempt: (last: boolean) => Promise<T>,
  onRetry?: (err: TransientRegistryError, retry: number, waitMs: number) => void,
): Promise<T> {
  const last = maxAttempts(policy) - 1;
  for (let n = 0; ; n++) {
    try {
      return await attempt(n === last);
    } catch (err) {
      if (!isRetryable(err) || signal?.aborted === true) throw err;
      if (n >= last) throw n === 0 ? err : new RegistryError(`${err.message} (after ${n} retries)`, err.status);
      const waitMs = backoffMs(policy, n, err.retryAfterMs);
      onRetry?.(err, n + 1, waitMs);
      await sleep(waitMs, signal);
    }
  }
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
