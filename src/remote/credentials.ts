/**
 * Registry credentials from docker's config.json (`$DOCKER_CONFIG/config.json`, else ~/.docker/config.json),
 * the keychain the reference always consults first.
 *
 * Lookup for a registry host, like the docker CLI:
 *   1. `credHelpers[host]` -> run `docker-credential-<name> get`;
 *   2. `credsStore` -> the same with the default helper;
 *   3. `auths`: an exact key, else any key whose host part matches (`host`, `https://host`, `http://host/v1/`).
 * Docker Hub (docker.io, index.docker.io, registry-1.docker.io) is stored under `https://index.docker.io/v1/`.
 * An `identitytoken` is an OAuth refresh token: it is returned with an empty username, as the reference does.
 *
 * Secrets never go into logs or error messages: errors name the file and the key, never a value.
 */
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, errorCode } from '../errors';
import type { Logger } from '../log';
import { isDockerHub } from './reference';
import { childEnv } from './trust';

/** Key docker uses for Docker Hub in `auths` and as the server URL given to credential helpers. */
export const DOCKER_HUB_AUTH_KEY = 'https://index.docker.io/v1/';
const DOCKER_HUB_AUTH_HOST = 'index.docker.io';
export const DOCKER_CONFIG_FILE = 'config.json';
/** A credential helper that has not answered by then is killed; the lookup then finds nothing. */
export const CRED_HELPER_TIMEOUT_MS = 10_000;
/** Helpers answer with a small JSON document; more than this is not a credential. */
const CRED_HELPER_MAX_OUTPUT_BYTES = 64 * 1024;
/** Username a credential helper returns when the secret is an identity token. */
const HELPER_TOKEN_USERNAME = '<token>';

export interface RegistryCredentials {
  readonly username: string;
  readonly password: string;
  /** OAuth refresh token (docker `identitytoken`); when set, username is empty and password is the token. */
  readonly identityToken?: string;
}

/**
 * A source of credentials for a registry host (`host[:port]`). Undefined means anonymous. `repository`
 * (`library/busybox`), when known, is the repository the credentials are for (the CRI keychain keeps them per image).
 */
export type CredentialProvider = (host: string, signal?: AbortSignal, repository?: string) => Promise<RegistryCredentials | undefined>;

/** `$DOCKER_CONFIG`, else `~/.docker`. */
export function dockerConfigDir(env: NodeJS.ProcessEnv = process.env): string {
  const fromEnv = env.DOCKER_CONFIG;
  return fromEnv !== undefined && fromEnv !== '' ? fromEnv : join(homedir(), '.docker');
}

/** Host part of an `auths` key: strips the scheme and any path (docker's ConvertToHostname). */
export function authKeyHost(key: string): string {
  let rest = key;
  if (rest.startsWith('http://')) rest = rest.slice('http://'.length);
  else if (rest.startsWith('https://')) rest = rest.slice('https://'.length);
  const slash = rest.indexOf('/');
  return slash >= 0 ? rest.slice(0, slash) : rest;
}

interface AuthEntry {
  auth?: unknown;
  username?: unknown;
  password?: unknown;
  identitytoken?: unknown;
}

interface DockerConfigFile {
  auths?: Record<string, AuthEntry>;
  credHelpers?: Record<string, string>;
  credsStore?: string;
}

export interface DockerConfigKeychainOptions {
  /** Directory holding config.json; default dockerConfigDir(). */
  configDir?: string;
  log?: Logger;
  helperTimeoutMs?: number;
}

export class DockerConfigKeychain {
  private readonly configDir: string;
  private readonly log: Logger | undefined;
  private readonly helperTimeoutMs: number;

  constructor(opts: DockerConfigKeychainOptions = {}) {
    this.configDir = opts.configDir ?? dockerConfigDir();
    this.log = opts.log;
    this.helperTimeoutMs = opts.helperTimeoutMs ?? CRED_HELPER_TIMEOUT_MS;
  }

  get configFile(): string {
    return join(this.configDir, DOCKER_CONFIG_FILE);
  }

  /** A CredentialProvider bound to this keychain. */
  readonly provider: CredentialProvider = (host, signal) => this.lookup(host, signal);

  /**
   * Credentials for `host[:port]`, or undefined. The file is read on every call (asynchronously): lookups
   * happen only when a registry challenges us, and a `docker login` in between should be picked up.
   */
  async lookup(host: string, signal?: AbortSignal): Promise<RegistryCredentials | undefined> {
    const config = await this.readConfig();
    if (config === undefined) return undefined;
    const hub = isDockerHub(host);
    const helperName = config.credHelpers?.[hub ? DOCKER_HUB_AUTH_KEY : host] ?? (hub ? config.credHelpers?.[DOCKER_HUB_AUTH_HOST] : undefined);
    for (const helper of [helperName, config.credsStore]) {
      if (helper === undefined || helper === '') continue;
      const creds = await this.runHelper(helper, hub ? DOCKER_HUB_AUTH_KEY : host, signal);
      if (creds !== undefined) return creds;
    }
    return this.fromAuths(config, hub ? DOCKER_HUB_AUTH_HOST : host, hub);
  }

  private async readConfig(): Promise<DockerConfigFile | undefined> {
    const file = this.configFile;
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (err) {
      const code = errorCode(err);
      if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
      throw new ConfigError(`cannot read docker config ${file}: ${code ?? 'read error'}`);
    }
    if (text.trim() === '') return undefined;
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch {
      // The parser's message can quote file content (secrets), so it is not passed on.
      throw new ConfigError(`docker config ${file} is not valid JSON`);
    }
    if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw new ConfigError(`docker config ${file} is not a JSON object`);
    const obj = doc as Record<string, unknown>;
    const out: DockerConfigFile = {};
    if (isRecord(obj.auths)) {
      const auths: Record<string, AuthEntry> = {};
      for (const [k, v] of Object.entries(obj.auths)) if (isRecord(v)) auths[k] = v;
      out.auths = auths;
    }
    if (isRecord(obj.credHelpers)) {
      const helpers: Record<string, string> = {};
      for (const [k, v] of Object.entries(obj.credHelpers)) if (typeof v === 'string') helpers[k] = v;
      out.credHelpers = helpers;
    }
    if (typeof obj.credsStore === 'string') out.credsStore = obj.credsStore;
    return out;
  }

  private fromAuths(config: DockerConfigFile, host: string, hub: boolean): RegistryCredentials | undefined {
    const auths = config.auths;
    if (auths === undefined) return undefined;
    const exact = hub ? DOCKER_HUB_AUTH_KEY : host;
    let key: string | undefined = exact in auths ? exact : undefined;
    if (key === undefined) {
      key = Object.keys(auths).find((k) => {
        const h = authKeyHost(k);
        return h === host || (hub && isDockerHub(h));
      });
    }
    if (key === undefined) return undefined;
    return decodeEntry(auths[key] as AuthEntry, key, this.configFile);
  }

  /** Runs `docker-credential-<name> get` without blocking the event loop; failures mean "no credentials". */
  private runHelper(name: string, serverUrl: string, signal?: AbortSignal): Promise<RegistryCredentials | undefined> {
    const bin = `docker-credential-${name}`;
    return new Promise((resolve) => {
      let settled = false;
      const done = (creds: RegistryCredentials | undefined, problem?: string): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        // Only the helper name and what went wrong: never its output, which may hold the secret.
        if (problem !== undefined) this.log?.warn({ helper: bin, host: serverUrl }, `credential helper: ${problem}`);
        resolve(creds);
      };
      // A Node-based helper gets NODE_EXTRA_CA_CERTS back, if the launcher handed it over (trust.ts).
      const child = spawn(bin, ['get'], { stdio: ['pipe', 'pipe', 'ignore'], env: childEnv() });
      const onAbort = (): void => {
        child.kill('SIGKILL');
        done(undefined);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        done(undefined, `no answer within ${this.helperTimeoutMs} ms`);
      }, this.helperTimeoutMs);
      const chunks: Buffer[] = [];
      let bytes = 0;
      child.stdout.on('data', (chunk: Buffer) => {
        bytes += chunk.length;
        if (bytes > CRED_HELPER_MAX_OUTPUT_BYTES) {
          child.kill('SIGKILL');
          done(undefined, 'answer too large');
          return;
        }
        chunks.push(chunk);
      });
      child.on('error', (err) => done(undefined, `cannot run (${errorCode(err) ?? 'spawn error'})`));
      child.on('close', (code) => {
        // Exit 1 with "credentials not found" is the helpers' normal "nothing stored".
        if (code !== 0) return done(undefined);
        let parsed: unknown;
        try {
          parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
        } catch {
          return done(undefined, 'answer is not JSON');
        }
        if (!isRecord(parsed) || typeof parsed.Secret !== 'string' || parsed.Secret === '') return done(undefined);
        const username = typeof parsed.Username === 'string' ? parsed.Username : '';
        if (username === HELPER_TOKEN_USERNAME) return done({ username: '', password: parsed.Secret, identityToken: parsed.Secret });
        return done({ username, password: parsed.Secret });
      });
      child.stdin.on('error', () => undefined); // helper exited before reading: its exit code tells the story
      child.stdin.end(serverUrl);
    });
  }
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function decodeEntry(entry: AuthEntry, key: string, file: string): RegistryCredentials | undefined {
  const where = `docker config ${file}: auths[${JSON.stringify(key)}]`;
  if (typeof entry.identitytoken === 'string' && entry.identitytoken !== '') {
    return { username: '', password: entry.identitytoken, identityToken: entry.identitytoken };
  }
  if (typeof entry.auth === 'string' && entry.auth !== '') {
    const decoded = Buffer.from(entry.auth, 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon <= 0) throw new ConfigError(`${where}.auth is not base64 of "username:password"`);
    return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
  }
  if (typeof entry.username === 'string' && entry.username !== '' && typeof entry.password === 'string') {
    return { username: entry.username, password: entry.password };
  }
  return undefined;
}

/** Tries providers in order; the first that knows the host wins (the reference's keychain chain). */
export function chainCredentials(...providers: (CredentialProvider | undefined)[]): CredentialProvider {
  const list = providers.filter((p): p is CredentialProvider => p !== undefined);
  return async (host, signal, repository) => {
    for (const p of list) {
      const creds = await p(host, signal, repository);
      if (creds !== undefined) return creds;
    }
    return undefined;
  };
}
