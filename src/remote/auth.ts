/**
 * The registry auth flow (containerd's docker authorizer, as the reference uses it):
 *   a request gets a 401 -> parse `WWW-Authenticate`;
 *   Bearer: GET <realm>?service=..&scope=repository:<name>:pull with basic credentials when we have some
 *           (anonymous otherwise), or POST an OAuth refresh-token grant when we hold an identity token;
 *           the token (`token` or `access_token`) is cached per (host, scope) until `expires_in` runs out;
 *   Basic:  send `Authorization: Basic base64(user:pass)` from then on.
 * The caller retries the request once with the fresh header; a second 401 is final.
 *
 * Credentials and tokens never appear in logs or error messages: messages name hosts and scopes only.
 */
import { abortable } from '../abortable';
import { RegistryAuthError, errorMessage } from '../errors';
import type { Logger } from '../log';
import type { CredentialProvider, RegistryCredentials } from './credentials';

/** Token lifetime when the token server does not say (the distribution token spec's default). */
export const DEFAULT_TOKEN_EXPIRY_SEC = 60;
/** Refresh a token this long before it expires so in-flight requests don't carry a dead one. */
export const TOKEN_REFRESH_MARGIN_MS = 5_000;
/** Token responses are small JSON documents. */
export const MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024;
/** client_id sent with OAuth grants (containerd sends "containerd-client"). */
export const OAUTH_CLIENT_ID = 'stargaze';

export type AuthChallenge =
  | { readonly scheme: 'bearer'; readonly realm: string; readonly service: string | undefined; readonly scope: string | undefined }
  | { readonly scheme: 'basic'; readonly realm: string | undefined };

/** `repository:<name>:pull`, the scope a lazy pull needs. */
export function pullScope(repository: string): string {
  return `repository:${repository}:pull`;
}

/**
 * Parses one or more `WWW-Authenticate` header values (RFC 7235: `scheme k=v, k="v", scheme2 ...`).
 * Unknown schemes are skipped; malformed input yields what could be read.
 */
export function parseWwwAuthenticate(value: string | readonly string[] | undefined): AuthChallenge[] {
  if (value === undefined) return [];
  const values = typeof value === 'string' ? [value] : value;
  const out: AuthChallenge[] = [];
  for (const v of values) {
    for (const { scheme, params } of tokenizeChallenges(v)) {
      if (scheme === 'bearer') {
        const realm = params.get('realm');
        if (realm !== undefined && realm !== '') out.push({ scheme, realm, service: params.get('service'), scope: params.get('scope') });
      } else if (scheme === 'basic') {
        out.push({ scheme, realm: params.get('realm') });
      }
    }
  }
  return out;
}

const TOKEN_CHAR = /[!#$%&'*+\-.^_`|~0-9A-Za-z/]/; // RFC 7230 tchar, plus '/' seen in token68

function tokenizeChallenges(s: string): { scheme: string; params: Map<string, string> }[] {
  const out: { scheme: string; params: Map<string, string> }[] = [];
  let i = 0;
  const skipWs = (): void => {
    while (i < s.length && (s[i] === ' ' || s[i] === '\t')) i++;
  };
  const readToken = (): string => {
    const start = i;
    while (i < s.length && TOKEN_CHAR.test(s[i] as string)) i++;
    return s.slice(start, i);
  };
  let current: { scheme: string; params: Map<string, string> } | undefined;
  while (i < s.length) {
    skipWs();
    if (s[i] === ',') {
      i++;
      continue;
    }
    const word = readToken();
    if (word === '') {
      i++; // unexpected character: skip it
      continue;
    }
    skipWs();
    if (s[i] === '=' && current !== undefined) {
      i++;
      skipWs();
      let val = '';
      if (s[i] === '"') {
        i++;
        while (i < s.length && s[i] !== '"') {
          if (s[i] === '\\' && i + 1 < s.length) i++;
          val += s[i];
          i++;
        }
        i++; // closing quote
      } else {
        val = readToken();
        while (s[i] === '=') i++; // token68 padding
      }
      current.params.set(word.toLowerCase(), val);
    } else {
      current = { scheme: word.toLowerCase(), params: new Map() };
      out.push(current);
    }
  }
  return out;
}

/** The HTTP a token fetch needs; the registry client supplies it so the same dispatchers and timeouts apply. */
export type TokenHttp = (
  url: URL,
  init: { method: 'GET' | 'POST'; headers: Record<string, string>; body?: string; signal?: AbortSignal },
) => Promise<{ status: number; body: Buffer }>;

export interface RegistryAuthorizerOptions {
  credentials: CredentialProvider;
  http: TokenHttp;
  log?: Logger;
  /** Clock, for tests. */
  now?: () => number;
}

/** Bound on one shared answer to a challenge: credential lookup (helpers included) and the token request. */
const CHALLENGE_TIMEOUT_MS = 120_000;

interface CachedAuth {
  header: string;
  /** ms since epoch; Infinity for Basic. */
  expiresAt: number;
}

export class RegistryAuthorizer {
  private readonly credentials: CredentialProvider;
  private readonly http: TokenHttp;
  private readonly log: Logger | undefined;
  private readonly now: () => number;
  /** Authorization header per `host\nscope`. */
  private readonly cache = new Map<string, CachedAuth>();
  /** Hosts that asked for Basic auth: their header does not depend on the scope. */
  private readonly basicHosts = new Map<string, string>();
  /** In-flight token fetches, so concurrent 401s for one key share one fetch. */
  private readonly inflight = new Map<string, Promise<string>>();

  constructor(opts: RegistryAuthorizerOptions) {
    this.credentials = opts.credentials;
    this.http = opts.http;
    this.log = opts.log;
    this.now = opts.now ?? Date.now;
  }

  /** The Authorization header to send up front, if an earlier challenge left one that is still valid. */
  cached(host: string, scope: string): string | undefined {
    const basic = this.basicHosts.get(host);
    if (basic !== undefined) return basic;
    const key = `${host}\n${scope}`;
    const hit = this.cache.get(key);
    if (hit === undefined) return undefined;
    if (hit.expiresAt <= this.now()) {
      this.cache.delete(key);
      return undefined;
    }
    return hit.header;
  }

  /**
   * Answers a 401 from `host`: returns a fresh Authorization header for `scope`. `failed` is the header the
   * rejected request carried: if another request already replaced it, the newer one is returned as is.
   * Throws RegistryAuthError when the challenge cannot be met.
   */
  async authorize(
    host: string,
    scope: string,
    wwwAuthenticate: string | readonly string[] | undefined,
    failed: string | undefined,
    signal?: AbortSignal,
  ): Promise<string> {
    const key = `${host}\n${scope}`;
    const current = this.cached(host, scope);
    if (current !== undefined && current !== failed) return current;
    const running = this.inflight.get(key);
    if (running !== undefined) return abortable(running, signal);
    // Shared by every request that meets the same challenge, so it runs under its own bound, not under the
    // signal of whichever request came first: a layer being closed must not fail the others' token refresh.
    const p = this.challenge(host, scope, wwwAuthenticate, failed, AbortSignal.timeout(CHALLENGE_TIMEOUT_MS)).finally(() =>
      this.inflight.delete(key),
    );
    this.inflight.set(key, p);
    return abortable(p, signal);
  }

  /** Forgets everything cached for a host (e.g. after its credentials were rejected). */
  forget(host: string): void {
    this.basicHosts.delete(host);
    for (const key of this.cache.keys()) if (key.startsWith(`${host}\n`)) this.cache.delete(key);
  }

  private async challenge(
    host: string,
    scope: string,
    wwwAuthenticate: string | readonly string[] | undefined,
    failed: string | undefined,
    signal?: AbortSignal,
  ): Promise<string> {
    const challenges = parseWwwAuthenticate(wwwAuthenticate);
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    const basic = challenges.find((c) => c.scheme === 'basic');
    const creds = await this.credentials(host, signal, /^repository:([^:]+):/.exec(scope)?.[1]);

    if (bearer !== undefined && bearer.scheme === 'bearer') {
      const { token, expiresInSec } = await this.fetchToken(host, scope, bearer, creds, signal);
      const header = `Bearer ${token}`;
      const lifetimeMs = expiresInSec * 1000;
      // Refresh a little early, but never spend more than half a short-lived token's life on the margin.
      const expiresAt = this.now() + Math.max(lifetimeMs - TOKEN_REFRESH_MARGIN_MS, lifetimeMs / 2);
      this.cache.set(`${host}\n${scope}`, { header, expiresAt });
      this.log?.debug({ host, scope, expiresInSec }, 'registry token obtained');
      return header;
    }
    if (basic !== undefined) {
      if (creds === undefined || creds.username === '') {
        throw new RegistryAuthError(`registry ${host} requires credentials (basic auth) for ${scope} and none are configured`);
      }
      const header = `Basic ${Buffer.from(`${creds.username}:${creds.password}`, 'utf8').toString('base64')}`;
      if (header === failed) throw new RegistryAuthError(`registry ${host} rejected the configured credentials (basic auth) for ${scope}`);
      this.basicHosts.set(host, header);
      return header;
    }
    throw new RegistryAuthError(`registry ${host} answered 401 without a usable WWW-Authenticate challenge (need Bearer or Basic)`);
  }

  private async fetchToken(
    host: string,
    scope: string,
    challenge: { realm: string; service: string | undefined; scope: string | undefined },
    creds: RegistryCredentials | undefined,
    signal?: AbortSignal,
  ): Promise<{ token: string; expiresInSec: number }> {
    let realm: URL;
    try {
      realm = new URL(challenge.realm);
    } catch {
      throw new RegistryAuthError(`registry ${host} sent a Bearer challenge with an invalid realm URL`);
    }
    if (realm.protocol !== 'https:' && realm.protocol !== 'http:') {
      throw new RegistryAuthError(`registry ${host} sent a Bearer realm with unsupported scheme ${realm.protocol}`);
    }
    // Our scope first; the challenge's own scope too when it differs (containerd merges them).
    const scopes = [scope];
    if (challenge.scope !== undefined && challenge.scope !== '' && challenge.scope !== scope) scopes.push(challenge.scope);
    const where = `token server ${realm.host} (for registry ${host}, ${scopes.join(' ')})`;

    let res: { status: number; body: Buffer };
    try {
      if (creds?.identityToken !== undefined) {
        const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: creds.identityToken, client_id: OAUTH_CLIENT_ID });
        if (challenge.service !== undefined) form.set('service', challenge.service);
        form.set('scope', scopes.join(' '));
        res = await this.http(realm, {
          method: 'POST',
          headers: { 'content-type': 'application/x-www-form-urlencoded' },
          body: form.toString(),
          signal,
        });
      } else {
        const url = new URL(realm);
        if (challenge.service !== undefined) url.searchParams.set('service', challenge.service);
        for (const s of scopes) url.searchParams.append('scope', s);
        const headers: Record<string, string> = {};
        if (creds !== undefined && creds.username !== '') {
          headers.authorization = `Basic ${Buffer.from(`${creds.username}:${creds.password}`, 'utf8').toString('base64')}`;
        }
        res = await this.http(url, { method: 'GET', headers, signal });
      }
    } catch (err) {
      if (signal?.aborted === true) throw err;
      if (err instanceof RegistryAuthError) throw err;
      throw new RegistryAuthError(`${where}: request failed: ${errorMessage(err)}`);
    }

    if (res.status === 401 || res.status === 403) {
      throw new RegistryAuthError(
        `${where} refused ${creds === undefined ? 'anonymous access' : 'the configured credentials'} (HTTP ${res.status})`,
      );
    }
    if (res.status !== 200) throw new RegistryAuthError(`${where} answered HTTP ${res.status}`);
    let doc: unknown;
    try {
      doc = JSON.parse(res.body.toString('utf8'));
    } catch {
      throw new RegistryAuthError(`${where} answered with invalid JSON`);
    }
    const obj = typeof doc === 'object' && doc !== null ? (doc as Record<string, unknown>) : {};
    const token = typeof obj.token === 'string' && obj.token !== '' ? obj.token : obj.access_token;
    if (typeof token !== 'string' || token === '') throw new RegistryAuthError(`${where} answered without a token`);
    const expiresIn = typeof obj.expires_in === 'number' && obj.expires_in > 0 ? obj.expires_in : DEFAULT_TOKEN_EXPIRY_SEC;
    return { token, expiresInSec: expiresIn };
  }
}
