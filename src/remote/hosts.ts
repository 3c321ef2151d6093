/**
 * Registry endpoints from containerd's hosts directory (`config_path`, e.g. /etc/containerd/certs.d):
 *   <hostsDir>/<host[:port]>/hosts.toml, else <hostsDir>/_default/hosts.toml.
 * The result is the ordered list of endpoints to try: `[host."..."]` mirrors in file order, then the server.
 *
 * With no hosts.toml the registry itself is the only endpoint, over https, except loopback registries
 * (localhost, 127.0.0.0/8, ::1), which we reach over plain http straight away. containerd tries https first
 * and falls back to http for localhost; going straight to http for loopback avoids a failed TLS handshake per
 * resolve, and loopback registries with TLS can still be configured with `server = "https://..."`.
 *
 * Several `client` certificates: see client-certs.ts for how one is chosen.
 *
 * Not supported (yet): legacy docker certs.d files (*.crt, *.cert/*.key) in a host directory without a
 * hosts.toml; such a directory is skipped. Unknown keys are reported as warnings, not errors, because
 * containerd ignores them and the same file is shared with containerd.
 */
import { readFile } from 'node:fs/promises';
import { isAbsolute, join, resolve as resolvePath } from 'node:path';
import { isIP } from 'node:net';
import { parse as parseToml, TomlError } from 'smol-toml';
import { ConfigError, errorCode } from '../errors';
import type { ConfigMirror } from '../config/config';
import { parseHeaderTable } from '../config/header-table';
import { registryHostFor } from './reference';

/** File name containerd reads inside each host directory. */
export const HOSTS_FILE = 'hosts.toml';
/** Directory whose hosts.toml applies to registries that have no directory of their own. */
export const DEFAULT_HOST_DIR = '_default';
/** API path prefix of a registry when the config does not override it. */
export const DEFAULT_API_PATH = '/v2';

export type HostCapability = 'pull' | 'resolve' | 'push';
const ALL_CAPABILITIES: readonly HostCapability[] = ['pull', 'resolve', 'push'];

export interface RegistryEndpoint {
  readonly scheme: 'http' | 'https';
  /** `host[:port]` to dial. */
  readonly host: string;
  /** API prefix the repository path is appended to: `/v2` unless `override_path` says otherwise. */
  readonly path: string;
  readonly capabilities: readonly HostCapability[];
  /** Extra request headers, lower-case names. */
  readonly headers: Readonly<Record<string, readonly string[]>>;
  /** Skip TLS certificate verification (`skip_verify`). */
  readonly skipVerify: boolean;
  /** Absolute paths of PEM CA bundles to trust in addition to the system ones (`ca`). */
  readonly caFiles: readonly string[];
  /** Client certificates for mutual TLS (`client`): cert file, and key file unless the PEM holds both. */
  readonly clientCerts: readonly { readonly certFile: string; readonly keyFile: string | undefined }[];
  /** Per-host request bound from a config mirror's request_timeout_sec (0 or absent: the client's own). */
  readonly requestTimeoutSec?: number;
}

/**
 * The endpoints of the reference's resolver config: the mirrors in order, then the registry itself, all with
 * pull and resolve (the reference's RegistryHostsFromConfig). Docker Hub's short host becomes its API host.
 */
export function configMirrorEndpoints(domain: string, mirrors: readonly ConfigMirror[]): RegistryEndpoint[] {
  const endpoints = mirrors.map((m): RegistryEndpoint => {
    const host = registryHostFor(m.host);
    return {
      ...defaultEndpoint(domain),
      scheme: m.insecure || isLoopbackHost(host) ? 'http' : 'https',
      host,
      capabilities: ['pull', 'resolve'],
      headers: m.headers,
      requestTimeoutSec: m.requestTimeoutSec,
    };
  });
  return [...endpoints, { ...defaultEndpoint(domain), capabilities: ['pull', 'resolve'] }];
}

export interface HostsResolution {
  readonly endpoints: readonly RegistryEndpoint[];
  /** hosts.toml that was used, if any. */
  readonly source: string | undefined;
  /** Problems that did not stop the load (unknown keys). */
  readonly warnings: readonly string[];
}

/** localhost, 127.0.0.0/8 and ::1, with or without a port. */
export function isLoopbackHost(hostPort: string): boolean {
  const host = stripPort(hostPort).toLowerCase();
  if (host === 'localhost' || host === '::1') return true;
  return isIP(host) === 4 && host.startsWith('127.');
}

function stripPort(hostPort: string): string {
  if (hostPort.startsWith('[')) {
    const end = hostPort.indexOf(']');
    return end > 0 ? hostPort.slice(1, end) : hostPort;
  }
  const colon = hostPort.indexOf(':');
  // More than one colon and no brackets: a bare IPv6 address without port.
  if (colon >= 0 && hostPort.indexOf(':', colon + 1) >= 0) return hostPort;
  return colon >= 0 ? hostPort.slice(0, colon) : hostPort;
}

/** The single endpoint used when no hosts.toml applies to a registry. */
export function defaultEndpoint(domain: string): RegistryEndpoint {
  const host = registryHostFor(domain);
  return {
    scheme: isLoopbackHost(host) ? 'http' : 'https',
    host,
    path: DEFAULT_API_PATH,
    capabilities: ALL_CAPABILITIES,
    headers: {},
    skipVerify: false,
    caFiles: [],
    clientCerts: [],
  };
}

/**
 * Finds and parses the hosts.toml for a registry domain (as in the image reference, e.g. `docker.io`,
 * `127.0.0.1:5000`). A missing hostsDir, or no file for the domain, gives the config mirrors for the domain
 * (if any) and the registry itself, else the default endpoint.
 */
export async function resolveHosts(domain: string, hostsDir: string | undefined, configMirrors?: readonly ConfigMirror[]): Promise<HostsResolution> {
  if (hostsDir !== undefined && hostsDir !== '') {
    for (const dir of [join(hostsDir, domain), join(hostsDir, DEFAULT_HOST_DIR)]) {
      const file = join(dir, HOSTS_FILE);
      let text: string;
      try {
        text = await readFile(file, 'utf8');
      } catch (err) {
        const code = errorCode(err);
        if (code === 'ENOENT' || code === 'ENOTDIR') continue;
        throw new ConfigError(`cannot read ${file}: ${code ?? 'read error'}`);
      }
      const parsed = parseHostsToml(text, { domain, baseDir: dir, source: file });
      return { ...parsed, source: file };
    }
  }
  if (configMirrors !== undefined && configMirrors.length > 0) return { endpoints: configMirrorEndpoints(domain, configMirrors), source: undefined, warnings: [] };
  return { endpoints: [defaultEndpoint(domain)], source: undefined, warnings: [] };
}

type Table = Record<string, unknown>;

function isTable(v: unknown): v is Table {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Date);
}

/** Keys of a host table (and of the top level, which describes the server). */
const HOST_KEYS = new Set(['capabilities', 'skip_verify', 'ca', 'client', 'header', 'override_path']);
const TOP_KEYS = new Set([...HOST_KEYS, 'server', 'host']);

/**
 * Parses hosts.toml text. `baseDir` resolves relative `ca`/`client` paths, as containerd does; `source`
 * names the file in errors.
 */
export function parseHostsToml(
  text: string,
  opts: { domain: string; baseDir: string; source: string },
): { endpoints: RegistryEndpoint[]; warnings: string[] } {
  let doc: Table;
  try {
    doc = parseToml(text, { unsafeKeyBehaviour: 'throw' });
  } catch (err) {
    const where = err instanceof TomlError ? ` (line ${err.line}, column ${err.column})` : '';
    throw new ConfigError(`${opts.source}: invalid TOML${where}: ${err instanceof Error ? err.message.split('\n')[0] : String(err)}`);
  }
  const warnings: string[] = [];
  const ctx = { source: opts.source, baseDir: opts.baseDir, warnings };
  for (const key of Object.keys(doc)) {
    if (!TOP_KEYS.has(key)) warnings.push(`${opts.source}: unknown key "${key}" ignored`);
  }

  const endpoints: RegistryEndpoint[] = [];
  const hostTables = doc.host;
  if (hostTables !== undefined) {
    if (!isTable(hostTables)) throw new ConfigError(`${opts.source}: "host" must be a table of [host."<url>"] tables`);
    // Object key order is the document order, so mirrors are tried in the order the file lists them.
    for (const [url, table] of Object.entries(hostTables)) {
      if (!isTable(table)) throw new ConfigError(`${opts.source}: host."${url}" must be a table`);
      endpoints.push(parseHost(url, table, `host."${url}"`, ctx));
    }
  }

  const server = doc.server;
  if (server !== undefined && typeof server !== 'string') throw new ConfigError(`${opts.source}: "server" must be a string`);
  if (server !== undefined && server !== '') {
    endpoints.push(parseHost(server, doc, 'server', ctx));
  } else {
    // No server: the registry itself, with the top-level settings applied to it.
    const base = defaultEndpoint(opts.domain);
    const settings = parseHost(`${base.scheme}://${base.host}`, doc, 'top level', ctx);
    endpoints.push(settings);
  }
  return { endpoints, warnings };
}

function parseHost(
  rawUrl: string,
  table: Table,
  where: string,
  ctx: { source: string; baseDir: string; warnings: string[] },
): RegistryEndpoint {
  const fail = (key: string, why: string): ConfigError => new ConfigError(`${ctx.source}: ${where}${key ? `.${key}` : ''}: ${why}`);
  if (where.startsWith('host.')) {
    for (const key of Object.keys(table)) {
      if (!HOST_KEYS.has(key)) ctx.warnings.push(`${ctx.source}: unknown key "${where}.${key}" ignored`);
    }
  }

  // containerd: no scheme means https.
  const withScheme = /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//.test(rawUrl) ? rawUrl : `https://${rawUrl}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    throw fail('', `invalid URL ${JSON.stringify(rawUrl)}`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw fail('', `scheme must be http or https, not ${url.protocol}`);
  if (url.host === '') throw fail('', `URL ${JSON.stringify(rawUrl)} has no host`);

  const overridePath = optionalBool(table.override_path, () => fail('override_path', 'must be a boolean')) ?? false;
  let path = url.pathname.replace(/\/+$/, '');
  if (!overridePath && !path.endsWith(DEFAULT_API_PATH)) path += DEFAULT_API_PATH;

  let capabilities = ALL_CAPABILITIES;
  if (table.capabilities !== undefined) {
    const raw = table.capabilities;
    if (!Array.isArray(raw)) throw fail('capabilities', 'must be a list of strings');
    const caps = stringList(raw, () => fail('capabilities', 'must be a list of strings'));
    for (const c of caps) {
      if (!(ALL_CAPABILITIES as readonly string[]).includes(c)) throw fail('capabilities', `unknown capability ${JSON.stringify(c)} (pull, resolve, push)`);
    }
    capabilities = caps as HostCapability[];
  }

  const headers = table.header === undefined ? {} : parseHeaderTable(table.header, (name, why) => fail(name === undefined ? 'header' : `header.${name}`, why));

  const skipVerify = optionalBool(table.skip_verify, () => fail('skip_verify', 'must be a boolean')) ?? false;
  const caFiles =
    table.ca === undefined ? [] : stringList(table.ca, () => fail('ca', 'must be a path or a list of paths')).map((p) => absolute(p, ctx.baseDir));
  const clientCerts = parseClient(table.client, () => fail('client', 'must be a path, a list of paths, or a list of [cert, key] pairs'), ctx.baseDir);

  return {
    scheme: url.protocol === 'http:' ? 'http' : 'https',
    host: url.host,
    path: path === '' ? '/' : path,
    capabilities,
    headers,
    skipVerify,
    caFiles,
    clientCerts,
  };
}

function absolute(p: string, baseDir: string): string {
  return isAbsolute(p) ? p : resolvePath(baseDir, p);
}

function optionalBool(v: unknown, fail: () => Error): boolean | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'boolean') throw fail();
  return v;
}

function stringList(v: unknown, fail: () => Error): string[] {
  if (typeof v === 'string') return [v];
  if (Array.isArray(v) && v.every((x): x is string => typeof x === 'string')) return v;
  throw fail();
}

/**
 * containerd accepts `client = "a.pem"`, `client = ["a.pem"]`, `client = [["a.cert", "a.key"]]`, and an empty
 * key (`[["a.pem", ""]]`, its hosts.md example) for a PEM file holding both.
 */
function parseClient(v: unknown, fail: () => Error, baseDir: string): RegistryEndpoint['clientCerts'] {
  if (v === undefined) return [];
  const cert = (file: string): string => {
    if (file === '') throw fail();
    return absolute(file, baseDir);
  };
  if (typeof v === 'string') return [{ certFile: cert(v), keyFile: undefined }];
  if (!Array.isArray(v)) throw fail();
  return v.map((item: unknown) => {
    if (typeof item === 'string') return { certFile: cert(item), keyFile: undefined };
    if (Array.isArray(item) && item.length >= 1 && item.length <= 2 && item.every((x): x is string => typeof x === 'string')) {
      const [certFile, key] = item;
      return { certFile: cert(certFile as string), keyFile: key === undefined || key === '' ? undefined : absolute(key, baseDir) };
    }
    throw fail();
  });
}
