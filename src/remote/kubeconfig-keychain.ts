/**
 * The kubeconfig keychain of `[kubeconfig_keychain]`: registry credentials from the cluster's image pull
 * secrets (type `kubernetes.io/dockerconfigjson`), read from the Kubernetes API with the node's
 * kubeconfig (`kubeconfig_path`, else `$KUBECONFIG`, else `~/.kube/config`).
 *
 * Like the reference, it looks at every such secret cluster-wide and waits for a kubeconfig that does
 * not exist yet (retrying every `RETRY_MS`). Unlike its watch, the secrets are listed again every
 * `REFRESH_MS`; a lookup uses the last successful list.
 *
 * The kubeconfig is YAML (or JSON, which is YAML), read with the `yaml` library (parseKubeconfig). Of it:
 * the current context (else the first), its cluster's `server`, CA (`certificate-authority(-data)`) and
 * `insecure-skip-tls-verify`, and its user's `token` / `tokenFile` and client certificate
 * (`client-certificate(-data)` and `client-key(-data)`); file paths are relative to the kubeconfig.
 * Secrets never go into logs.
 */
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { homedir } from 'node:os';
import path from 'node:path';
import { createSecureContext, type SecureContext } from 'node:tls';
import type * as Yaml from 'yaml';
import type { Logger } from '../log';
import { authKeyHost, DOCKER_HUB_AUTH_KEY, type CredentialProvider, type RegistryCredentials } from './credentials';
import { isDockerHub } from './reference';
import { secureContextFor } from './trust';

const SECRET_TYPE = 'kubernetes.io/dockerconfigjson';
const DOCKER_CONFIG_JSON_KEY = '.dockerconfigjson';
export const REFRESH_MS = 30_000;
export const RETRY_MS = 10_000;
const REQUEST_TIMEOUT_MS = 10_000;
const MAX_RESPONSE_BYTES = 32 * 1024 * 1024;

// --- kubeconfig ------------------------------------------------------------------------------------

/**
 * Parses a kubeconfig (YAML 1.2, so JSON too) with the `yaml` library: a kubeconfig holds secrets, and a
 * hand-written subset parser mis-read valid YAML (flow maps, quoted keys, anchors, documents). As client-go
 * (sigs.k8s.io/yaml over go-yaml) it reads the first document, and a plain scalar that YAML resolves to a
 * number keeps its text: kubeconfig fields are strings, and `name: 0123` names "0123", not 123.
 * An error names its line and column and the library's error code only: its messages may quote the
 * source, which here may be a token or a key, and these errors are logged.
 */
export function parseKubeconfig(text: string, file: string): unknown {
  // Loaded here, on the first kubeconfig read: every process that may serve layers imports this module, and
  // only those with [kubeconfig_keychain] on ever read one.
  const { LineCounter, parseAllDocuments, visit } = require('yaml') as typeof Yaml;
  const lineCounter = new LineCounter();
  // `<<` merge keys as go-yaml reads them. No document at all (empty, or only comments) is an empty list.
  const [doc] = parseAllDocuments(text, { lineCounter, prettyErrors: false, merge: true });
  if (doc === undefined) return null;
  const error = doc.errors[0];
  if (error !== undefined) {
    const { line, col } = lineCounter.linePos(error.pos[0]);
    throw new Error(`${file}: not valid YAML at line ${line}, column ${col} (${error.code})`);
  }
  visit(doc, {
    Scalar(_key, node) {
      if (typeof node.value === 'number' || typeof node.value === 'bigint') node.value = node.source ?? String(node.value);
    },
  });
  try {
    return doc.toJS();
  } catch (err) {
    // Aliases past maxAliasCount (a "billion laughs" file): the library's message says so, without the source.
    throw new Error(`${file}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
}

function get(v: unknown, key: string): unknown {
  return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>)[key] : undefined;
}

function str(v: unknown): string | undefined {
  return typeof v === 'string' && v !== '' ? v : undefined;
}

function named(list: unknown, name: string | undefined, field: string): unknown {
  if (!Array.isArray(list)) return undefined;
  const entry: unknown = list.find((e) => str(get(e, 'name')) === name) ?? (name === undefined ? list[0] : undefined);
  return get(entry, field);
}

export interface ApiServerAccess {
  server: string;
  token?: string;
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  insecureSkipTlsVerify: boolean;
}

/** The API server and credentials of the kubeconfig's current context. */
export function loadKubeconfig(file: string): ApiServerAccess {
  const doc = parseKubeconfig(readFileSync(file, 'utf8'), file);
  const dir = path.dirname(file);
  const contextName = str(get(doc, 'current-context'));
  const context = named(get(doc, 'contexts'), contextName, 'context');
  const cluster = named(get(doc, 'clusters'), str(get(context, 'cluster')), 'cluster');
  const user = named(get(doc, 'users'), str(get(context, 'user')), 'user');
  const server = str(get(cluster, 'server'));
  if (!server) throw new Error(`${file}: no server for context ${contextName ?? '(none)'}`);
  const bytes = (dataKey: string, fileKey: string, from: unknown): Buffer | undefined => {
    const data = str(get(from, dataKey));
    if (data) return Buffer.from(data, 'base64');
    const f = str(get(from, fileKey));
    return f ? readFileSync(path.resolve(dir, f)) : undefined;
  };
  const tokenFile = str(get(user, 'tokenFile'));
  return {
    server: server.replace(/\/+$/, ''),
    token: str(get(user, 'token')) ?? (tokenFile ? readFileSync(path.resolve(dir, tokenFile), 'utf8').trim() : undefined),
    ca: bytes('certificate-authority-data', 'certificate-authority', cluster),
    cert: bytes('client-certificate-data', 'client-certificate', user),
    key: bytes('client-key-data', 'client-key', user),
    insecureSkipTlsVerify: get(cluster, 'insecure-skip-tls-verify') === true,
  };
}

/** `kubeconfig_path`, else `$KUBECONFIG` (first entry), else `~/.kube/config`. */
export function kubeconfigPath(configured: string, env: NodeJS.ProcessEnv = process.env): string {
  if (configured !== '') return configured;
  const fromEnv = env.KUBECONFIG?.split(path.delimiter).find((p) => p !== '');
  return fromEnv ?? path.join(homedir(), '.kube', 'config');
}

// --- secrets ---------------------------------------------------------------------------------------

/** One TLS context per kubeconfig read: refreshes reuse it instead of parsing certificates again each time. */
const contexts = new WeakMap<ApiServerAccess, Promise<SecureContext | undefined>>();

function contextFor(access: ApiServerAccess): Promise<SecureContext | undefined> {
  let context = contexts.get(access);
  if (context === undefined) {
    // A kubeconfig's certificate-authority is all it trusts (as client-go); without one, the default trust.
    context =
      access.ca !== undefined
        ? Promise.resolve(createSecureContext({ ca: access.ca, cert: access.cert, key: access.key }))
        : secureContextFor({ hostCas: [], cert: access.cert, key: access.key });
    contexts.set(access, context);
  }
  return context;
}

async function getJson(access: ApiServerAccess, urlPath: string): Promise<unknown> {
  const url = new URL(access.server + urlPath);
  const lib = url.protocol === 'https:' ? https : http;
  const secureContext = url.protocol === 'https:' ? await contextFor(access) : undefined;
  return new Promise((resolve, reject) => {
    const req = lib.request(
      url,
      {
        method: 'GET',
        headers: { accept: 'application/json', ...(access.token ? { authorization: `Bearer ${access.token}` } : {}) },
        timeout: REQUEST_TIMEOUT_MS,
        ...(url.protocol === 'https:' ? { secureContext, rejectUnauthorized: !access.insecureSkipTlsVerify } : {}),
      },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          size += c.length;
          if (size > MAX_RESPONSE_BYTES) req.destroy(new Error(`response from ${url.host} exceeds ${MAX_RESPONSE_BYTES} bytes`));
          else chunks.push(c);
        });
        res.on('end', () => {
          if (res.statusCode !== 200) return reject(new Error(`GET ${url.pathname} at ${url.host}: HTTP ${res.statusCode}`));
          try {
            resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
          } catch (err) {
            reject(err);
          }
        });
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`GET ${url.pathname} at ${url.host}: timed out`)));
    req.on('error', reject);
    req.end();
  });
}

interface AuthEntry {
  auth?: string;
  username?: string;
  password?: string;
  identitytoken?: string;
}

function credentialsFromEntry(e: AuthEntry): RegistryCredentials | undefined {
  if (e.identitytoken) return { username: '', password: e.identitytoken, identityToken: e.identitytoken };
  if (e.username || e.password) return { username: e.username ?? '', password: e.password ?? '' };
  if (e.auth) {
    const decoded = Buffer.from(e.auth, 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon > 0) return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
  }
  return undefined;
}

/** host -> credentials, from every dockerconfigjson secret of a secret list (later secrets do not override earlier ones). */
export function credentialsFromSecretList(list: unknown): Map<string, RegistryCredentials> {
  const out = new Map<string, RegistryCredentials>();
  const items = (list as { items?: unknown[] } | null)?.items ?? [];
  for (const item of items) {
    const secret = item as { type?: string; data?: Record<string, string> };
    const encoded = secret.type === SECRET_TYPE ? secret.data?.[DOCKER_CONFIG_JSON_KEY] : undefined;
    if (!encoded) continue;
    let auths: Record<string, AuthEntry> | undefined;
    try {
      auths = (JSON.parse(Buffer.from(encoded, 'base64').toString('utf8')) as { auths?: Record<string, AuthEntry> }).auths;
    } catch {
      continue; // a malformed secret is skipped, never logged
    }
    for (const [key, entry] of Object.entries(auths ?? {})) {
      const host = key === DOCKER_HUB_AUTH_KEY ? 'docker.io' : authKeyHost(key);
      const creds = credentialsFromEntry(entry);
      if (creds && !out.has(host)) out.set(host, creds);
    }
  }
  return out;
}

export class KubeconfigKeychain {
  /** Credentials of the last successful list, by registry host. */
  private byHost = new Map<string, RegistryCredentials>();
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  /** Resolves after the first successful list (tests; a daemon never waits for it). */
  readonly ready: Promise<void>;
  private markReady!: () => void;

  constructor(
    private readonly opts: { kubeconfigPath: string; log: Logger; refreshMs?: number; retryMs?: number },
  ) {
    this.ready = new Promise((resolve) => (this.markReady = resolve));
    void this.refresh();
  }

  readonly provider: CredentialProvider = (host) => Promise.resolve(this.credentialsFor(host));

  /** From the secrets of the last successful list; nothing is fetched per lookup. */
  private credentialsFor(host: string): RegistryCredentials | undefined {
    const direct = this.byHost.get(host);
    if (direct) return direct;
    if (isDockerHub(host)) return this.byHost.get('docker.io');
    return undefined;
  }

  close(): void {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
  }

  private async refresh(): Promise<void> {
    if (this.closed) return;
    let next = this.opts.refreshMs ?? REFRESH_MS;
    try {
      const access = loadKubeconfig(this.opts.kubeconfigPath);
      const list = await getJson(access, `/api/v1/secrets?fieldSelector=${encodeURIComponent(`type=${SECRET_TYPE}`)}`);
      this.byHost = credentialsFromSecretList(list);
      this.markReady();
    } catch (err) {
      next = this.opts.retryMs ?? RETRY_MS;
      const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
      this.opts.log.warn(
        { module: 'kubeconfig-keychain', kubeconfig: this.opts.kubeconfigPath, err: err instanceof Error ? err.message : String(err) },
        missing ? 'kubeconfig not there yet; waiting' : 'cannot list image pull secrets; retrying',
      );
    }
    if (!this.closed) {
      this.timer = setTimeout(() => void this.refresh(), next);
      this.timer.unref();
    }
  }
}
