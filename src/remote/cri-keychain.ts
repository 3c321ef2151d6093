/**
 * The CRI keychain's memory (`[cri_keychain]`): the registry credentials kubelet sent with each CRI
 * `PullImage` (from the pod's image pull secrets), recorded by the image-service proxy
 * (src/service/cri-image-proxy.ts) and handed to the registry client as a `CredentialProvider`.
 *
 * Unlike the reference, which keeps them in memory and loses them on restart, they are kept in one
 * JSON file readable by root alone (0600, in a 0700 directory), written atomically (temp file, then
 * rename). A restarted daemon reads it back, and another process (the FUSE server) sees new entries:
 * lookups re-read the file when its mtime changed.
 *
 * Entries are keyed by image name (`domain/repository`); a lookup by registry host returns the
 * credentials of the most recent pull from that host. Secrets never go into logs or error messages.
 */
import { mkdir, open, readFile, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log';
import type { CredentialProvider, RegistryCredentials } from './credentials';
import { isDockerHub, parseReference, registryHostFor } from './reference';

export const CRI_KEYCHAIN_FILE = 'cri-credentials.json';
const FILE_MODE = 0o600;
const DIR_MODE = 0o700;
const FORMAT_VERSION = 1;

/** `runtime.v1.AuthConfig` as proto-loader decodes it (keepCase). */
export interface CriAuthConfig {
  username?: string;
  password?: string;
  /** base64 of `username:password`. */
  auth?: string;
  server_address?: string;
  identity_token?: string;
  registry_token?: string;
}

interface StoredEntry {
  /** The host serving the registry API (Docker Hub: registry-1.docker.io). */
  registryHost: string;
  username: string;
  password: string;
  identityToken?: string;
  /** ms since the epoch; the newest entry for a host wins. */
  updatedAtMs: number;
}

interface StoredFile {
  version: number;
  images: Record<string, StoredEntry>;
}

/** Registry credentials from a CRI AuthConfig; undefined when it carries none we can use. */
export function credentialsFromCriAuth(auth: CriAuthConfig | null | undefined): RegistryCredentials | undefined {
  if (!auth) return undefined;
  if (auth.identity_token) return { username: '', password: auth.identity_token, identityToken: auth.identity_token };
  if (auth.username || auth.password) return { username: auth.username ?? '', password: auth.password ?? '' };
  if (auth.auth) {
    const decoded = Buffer.from(auth.auth, 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon > 0) return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
  }
  // registry_token (a bearer token for the registry itself) has no place in RegistryCredentials.
  return undefined;
}

function sameRegistry(a: string, b: string): boolean {
  return a === b || (isDockerHub(a) && isDockerHub(b));
}

export class CriKeychain {
  /** Entries as last read or written. */
  private images: Record<string, StoredEntry> = {};
  /** mtime of the file when `images` was read or written; a different one means another process wrote it. */
  private loadedMtimeMs = -1;
  /** Serialises writes, so concurrent pulls never interleave read-modify-write. */
  private writing: Promise<void> = Promise.resolve();

  private constructor(
    /** The JSON file. */
    readonly file: string,
    private readonly log: Logger | undefined,
  ) {}

  /** Opens (and creates the directory of) the keychain file `dir/cri-credentials.json`. */
  static async open(dir: string, log?: Logger): Promise<CriKeychain> {
    await mkdir(dir, { recursive: true, mode: DIR_MODE });
    const keychain = new CriKeychain(path.join(dir, CRI_KEYCHAIN_FILE), log);
    await keychain.reload();
    return keychain;
  }

  /** Remembers `auth` for `imageRef` (a reference kubelet pulls); does nothing without usable credentials. */
  remember(imageRef: string, auth: CriAuthConfig | null | undefined): Promise<void> {
    const creds = credentialsFromCriAuth(auth);
    if (!creds) return Promise.resolve();
    const ref = parseReference(imageRef);
    return this.update((images) => {
      images[ref.name] = {
        registryHost: registryHostFor(ref.domain),
        username: creds.username,
        password: creds.password,
        ...(creds.identityToken ? { identityToken: creds.identityToken } : {}),
        updatedAtMs: Date.now(),
      };
    });
  }

  /** Forgets the credentials of `imageRef` (after CRI RemoveImage); an image ID or unknown name is ignored. */
  forget(imageRef: string): Promise<void> {
    let name: string;
    try {
      name = parseReference(imageRef).name;
    } catch {
      return Promise.resolve(); // an image ID, not a reference
    }
    return this.update((images) => {
      delete images[name];
    });
  }

  /** Image names with credentials (never the secrets). */
  async names(): Promise<string[]> {
    await this.reloadIfChanged();
    return Object.keys(this.images).sort();
  }

  /**
   * The registry client's provider: the credentials recorded for the image (`host` + `repository`) when
   * the caller names the repository and a pull of it was recorded, else the newest recorded for `host`.
   */
  readonly provider: CredentialProvider = async (host, _signal, repository) => {
    await this.reloadIfChanged();
    let best: StoredEntry | undefined;
    let exact = false;
    for (const [name, entry] of Object.entries(this.images)) {
      if (!sameRegistry(entry.registryHost, host)) continue;
      // name is `domain/repository`; a domain never holds a slash
      const isImage = repository !== undefined && name.slice(name.indexOf('/') + 1) === repository;
      if (exact && !isImage) continue;
      if (!best || (isImage && !exact) || entry.updatedAtMs > best.updatedAtMs) best = entry;
      exact ||= isImage;
    }
    if (!best) return undefined;
    return { username: best.username, password: best.password, ...(best.identityToken ? { identityToken: best.identityToken } : {}) };
  };

  private update(change: (images: Record<string, StoredEntry>) => void): Promise<void> {
    const next = this.writing.then(async () => {
      await this.reloadIfChanged();
      const images = { ...this.images };
      change(images);
      await this.write(images);
    });
    this.writing = next.catch(() => undefined);
    return next;
  }

  private async write(images: Record<string, StoredEntry>): Promise<void> {
    const tmp = `${this.file}.tmp-${process.pid}`;
    const body: StoredFile = { version: FORMAT_VERSION, images };
    const fh = await open(tmp, 'w', FILE_MODE);
    try {
      await fh.chmod(FILE_MODE); // the umask never widens it, and an old tmp file is narrowed
      await fh.writeFile(JSON.stringify(body));
      await fh.sync();
    } finally {
      await fh.close();
    }
    try {
      await rename(tmp, this.file);
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
    this.images = images;
    this.loadedMtimeMs = (await stat(this.file)).mtimeMs;
  }

  private async reloadIfChanged(): Promise<void> {
    let mtimeMs: number;
    try {
      mtimeMs = (await stat(this.file)).mtimeMs;
    } catch {
      mtimeMs = -1;
    }
    if (mtimeMs !== this.loadedMtimeMs) await this.reload();
  }

  private async reload(): Promise<void> {
    let text: string;
    try {
      const st = await stat(this.file);
      text = await readFile(this.file, 'utf8');
      this.loadedMtimeMs = st.mtimeMs;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      this.images = {};
      this.loadedMtimeMs = -1;
      return;
    }
    try {
      const parsed = JSON.parse(text) as Partial<StoredFile>;
      if (parsed.version !== FORMAT_VERSION || typeof parsed.images !== 'object' || parsed.images === null) {
        throw new Error(`unknown format (version ${String(parsed.version)})`);
      }
      this.images = parsed.images;
    } catch (err) {
      // A damaged file only costs lazy pulls of private images (they fall back); never the daemon.
      this.log?.warn({ module: 'cri-keychain', file: this.file, err: err instanceof Error ? err.message : String(err) }, 'ignoring unreadable CRI keychain file');
      this.images = {};
    }
  }
}
