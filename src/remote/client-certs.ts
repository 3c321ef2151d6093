/**
 * Which of several hosts.toml `client` certificates to present to a TLS origin.
 *
 * containerd (Go's crypto/tls) sends the first certificate whose issuer is among the CAs the server's
 * CertificateRequest names. Node's TLS stack does not expose that request, so we cannot choose up front.
 * Instead each certificate gets its own connection pool, the certificates are tried in file order, and the
 * one an origin accepted is remembered and tried first from then on.
 *
 * What "not accepted" looks like depends on the server: a TLS alert (Go: bad certificate, unknown CA,
 * certificate required), the connection closed right after the handshake (Node's TLS 1.3 server), a reset
 * during the handshake (TLS 1.2), or an HTTP 400 or 403 from a server that verifies the certificate itself
 * (nginx `ssl_verify_client`: 400). Until an origin has accepted one of the certificates, all of these move on
 * to the next certificate. Once it has, only TLS certificate alerts do: a closed connection or a 403 is then
 * more likely a transient failure or a real authorisation answer.
 */
import { errorCode } from '../errors';

/** OpenSSL alert codes (ERR_SSL_..._ALERT_<NAME>) that mean the peer refused our certificate. */
const CERT_ALERT = /_ALERT_(BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_REQUIRED|CERTIFICATE_UNKNOWN|UNSUPPORTED_CERTIFICATE|CERTIFICATE_REVOKED|CERTIFICATE_EXPIRED|ACCESS_DENIED|HANDSHAKE_FAILURE|DECRYPT_ERROR)$/;
/** Connection failures that, before any certificate was accepted, may be a refused certificate. */
const CLOSED_CODES = new Set(['ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET']);

/** How an attempt with one certificate ended, as far as choosing a certificate goes. */
export type CertVerdict = 'accepted' | 'refused' | 'maybe-refused';

function codes(err: unknown): string[] {
  const out: string[] = [];
  for (let e: unknown = err, depth = 0; e !== undefined && e !== null && depth < 5; depth++) {
    const code = errorCode(e);
    if (code !== undefined) out.push(code);
    e = e instanceof Error ? e.cause : undefined;
  }
  return out;
}

/** A transport error: did the server refuse the certificate (TLS alert), maybe (closed), or something else? */
export function certVerdictOfError(err: unknown): CertVerdict | undefined {
  const cs = codes(err);
  if (cs.some((c) => c.startsWith('ERR_SSL_') && CERT_ALERT.test(c))) return 'refused';
  if (cs.some((c) => CLOSED_CODES.has(c))) return 'maybe-refused';
  return undefined;
}

/** An HTTP answer: 400 and 403 may be a server that checks the certificate itself. */
export function certVerdictOfStatus(status: number): CertVerdict {
  return status === 400 || status === 403 ? 'maybe-refused' : 'accepted';
}

/** Per origin (and TLS settings): the certificate that was accepted last. */
export class ClientCertChoice {
  private readonly accepted = new Map<string, number>();

  /** Certificate indexes to try for `key`, out of `count`: the accepted one first, then the rest in order. */
  order(key: string, count: number): number[] {
    const first = this.accepted.get(key);
    const rest = Array.from({ length: count }, (_, i) => i).filter((i) => i !== first);
    return first === undefined || first >= count ? rest : [first, ...rest];
  }

  /** Whether `key` has accepted a certificate (then only TLS alerts move on to another one). */
  hasAccepted(key: string): boolean {
    return this.accepted.has(key);
  }

  accept(key: string, index: number): void {
    this.accepted.set(key, index);
  }

  /** Whether to try the next certificate after `verdict` (not after the last one: its answer stands). */
  shouldTryNext(key: string, verdict: CertVerdict | undefined): boolean {
    if (verdict === 'refused') return true;
    return verdict === 'maybe-refused' && !this.hasAccepted(key);
  }
}
