/**
 * The seam of the transport layers (transport.ts composes them): a request, and the one shape every layer has,
 * a function from a request to its answer. Kept apart from the layers so they can import it without cycles.
 */
import type { Dispatcher } from 'undici';
import type { RegistryEndpoint } from './hosts';

/** What a request needs to know of its endpoint besides the URL (a RegistryEndpoint is one). */
export interface TlsSettings {
  readonly skipVerify: boolean;
  readonly caFiles: readonly string[];
  readonly clientCerts: RegistryEndpoint['clientCerts'];
  /** A config mirror's own request bound: > 0 seconds, < 0 none; 0 or absent: the client's. */
  readonly requestTimeoutSec?: number;
}

/** Other origins (redirect targets, token servers): default trust, no client certificate. */
export const DEFAULT_TLS: TlsSettings = { skipVerify: false, caFiles: [], clientCerts: [] };

export interface HttpRequest {
  readonly url: URL;
  readonly method: 'GET' | 'HEAD' | 'POST';
  readonly headers: Record<string, string | string[]>;
  readonly body?: string;
  readonly signal: AbortSignal | undefined;
  /**
   * The registry endpoint `url` belongs to (same origin): its TLS settings, its headers and registry auth
   * apply. Undefined for other origins (a redirect target, a token server): default TLS, nothing added.
   */
  readonly endpoint?: RegistryEndpoint;
  /** Repository whose pull scope registry auth asks for; needed with `endpoint`. */
  readonly repository?: string;
  /** Names the request in errors, e.g. `blob sha256:... of host/repo`; never holds the URL (it may carry secrets). */
  readonly what: string;
}

/** One attempt at a request: the answer whatever its status, or a RegistryError naming the host. */
export type Send = (req: HttpRequest) => Promise<Dispatcher.ResponseData>;

/** The TLS settings a request is sent with. */
export function tlsOf(req: HttpRequest): TlsSettings {
  return req.endpoint ?? DEFAULT_TLS;
}
