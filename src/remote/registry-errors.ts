/**
 * Whether a registry failure is worth another try is a property of the error: its class. The retry policy
 * (retry.ts) asks `isRetryable(err)`, never the message. Both classes are RegistryErrors (code ERR_REGISTRY),
 * so service/ and fuse/ map them as before.
 *
 * Raw failures (undici's and node's errors, which carry codes) are classified once, where they enter remote/:
 * transportError() turns them into one of these, naming the host.
 */
import { RegistryError, StargazeError, errorCode } from '../errors';

/** Transport failure codes worth another try (node net errors and undici's). */
const TRANSIENT_CODES: ReadonlySet<string> = new Set([
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

/**
 * A failure of the network or of an overloaded registry rather than of the request: a reset, a timeout, a body
 * cut short, 429 or 5xx (not 501). Another try may succeed.
 */
export class TransientRegistryError extends RegistryError {
  /** What the answer's Retry-After asked for, in ms. */
  readonly retryAfterMs: number | undefined;
  constructor(message: string, status?: number, options?: { cause?: unknown; retryAfterMs?: number }) {
    super(message, status, options);
    this.retryAfterMs = options?.retryAfterMs;
  }
}

/**
 * The answer came from a pre-signed storage URL that expired (403, or 401 from storage on another origin):
 * the registry has to be asked for a fresh URL. Not retryable as such; the blob source refreshes once.
 */
export class ExpiredUrlError extends RegistryError {}

export function isRetryable(err: unknown): err is TransientRegistryError {
  return err instanceof TransientRegistryError;
}

/** True when `err` or one of its causes carries a transport failure code worth another try. */
export function hasTransientCode(err: unknown): boolean {
  for (let e: unknown = err, depth = 0; e !== undefined && e !== null && depth < 5; depth++) {
    const code = errorCode(e);
    if (code !== undefined && TRANSIENT_CODES.has(code)) return true;
    e = e instanceof Error ? e.cause : undefined;
  }
  return false;
}

/** `CODE: message` of a raw error, without repeating a code the message already holds. */
export function describeNetworkError(err: unknown): string {
  const code = errorCode(err);
  const msg = err instanceof Error ? err.message : String(err);
  return code !== undefined && !msg.includes(code) ? `${code}: ${msg}` : msg;
}

/**
 * A raw failure of a request, or of reading its answer, as a RegistryError whose message is `prefix: <what
 * failed>`: transient when its code says so. Our own errors pass through unchanged.
 */
export function transportError(err: unknown, prefix: string, note = ''): StargazeError {
  if (err instanceof StargazeError) return err;
  const message = `${prefix}: ${describeNetworkError(err)}${note}`;
  // No `cause`: errorMessage() would print the raw message a second time.
  return hasTransientCode(err) ? new TransientRegistryError(message) : new RegistryError(message);
}
