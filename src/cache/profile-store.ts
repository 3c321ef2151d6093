/**
 * Prefetch profiles on disk (`<root>/cache/profiles/<key>.json`, profile/profile-format.ts), one file per
 * profile key. They survive restarts and count toward `disk_max_bytes` through the root's byte budget like TOCs:
 * least recently used evicted first, never the profile of a mounted layer (pinned while it is mounted, so its
 * recording can be merged into it). `stargaze profile` works on the same directory without a budget.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { errorCode, ProfileError } from '../errors';
import { keyOf, MAX_PROFILE_FILE_BYTES, parseProfile, PROFILE_KEY, serializeProfile, type PrefetchProfile } from '../profile/profile-format';
import type { BudgetAccount, RestoredEntry } from './disk-budget';

/** Where the profiles live under the daemon root. */
export const PROFILE_DIR = path.join('cache', 'profiles');
/** Files being written carry this prefix until renamed; leftovers from a crash are removed by scan(). */
const TEMP_PREFIX = '.tmp-';
const FILE_PATTERN = /^([0-9a-f]{64})\.json$/;

export interface StoredProfileInfo {
  key: string;
  bytes: number;
  mtimeMs: number;
}

export class ProfileStore {
  /** `budget`: the root's byte budget, which counts these files and may evict those not pinned. */
  constructor(
    readonly dir: string,
    private readonly budget?: BudgetAccount,
  ) {}

  /** Reports the files a previous process left to the budget, and removes its temp files. */
  async scan(): Promise<{ files: number; bytes: number }> {
    const found = { files: 0, bytes: 0 };
    const entries: RestoredEntry[] = [];
    for (const info of await this.list({ removeTemp: true })) {
      found.files++;
      found.bytes += info.bytes;
      entries.push({ key: info.key, bytes: info.bytes, lastUsedMs: info.mtimeMs, evict: this.evictor(info.key) });
    }
    this.budget?.restore(entries);
    return found;
  }

  /** The stored profiles, by key. */
  async list(opts: { removeTemp?: boolean } = {}): Promise<StoredProfileInfo[]> {
    const out: StoredProfileInfo[] = [];
    const names = await readdir(this.dir).catch((err: unknown) => {
      if (errorCode(err) === 'ENOENT') return [] as string[];
      throw err;
    });
    for (const name of names.sort()) {
      const file = path.join(this.dir, name);
      if (name.startsWith(TEMP_PREFIX)) {
        if (opts.removeTemp) await rm(file, { force: true }).catch(() => undefined);
        continue;
      }
      const key = FILE_PATTERN.exec(name)?.[1];
      if (key === undefined) continue;
      const st = await stat(file).catch(() => undefined);
      if (st?.isFile()) out.push({ key, bytes: st.size, mtimeMs: st.mtimeMs });
    }
    return out;
  }

  /** Keeps the profile `key` from being evicted while its layer is mounted; counted. */
  pin(key: string): void {
    this.budget?.pin(key);
  }

  unpin(key: string): void {
    this.budget?.unpin(key);
  }

  /** Whether a file is stored under `key`, usable or not: a fetch from the registry is only for keys with none. */
  async has(key: string): Promise<boolean> {
    return (await stat(this.file(key)).catch(() => undefined)) !== undefined;
  }

  /** The file's bytes as stored; undefined when there is none. Throws ProfileError when it is past the bound. */
  async read(key: string): Promise<Buffer | undefined> {
    const file = this.file(key);
    const st = await stat(file).catch(() => undefined);
    if (st === undefined) return undefined;
    if (st.size > MAX_PROFILE_FILE_BYTES) throw new ProfileError(`profile of ${st.size} bytes is larger than ${MAX_PROFILE_FILE_BYTES}`, 'oversized');
    return readFile(file).catch((err: unknown) => {
      if (errorCode(err) === 'ENOENT') return undefined; // evicted meanwhile
      throw err;
    });
  }

  /**
   * The profile stored under `key`, parsed; undefined when there is none. Throws ProfileError when the file is
   * malformed or oversized, and when it is stored under a key that is not its own.
   */
  async load(key: string): Promise<PrefetchProfile | undefined> {
    const bytes = await this.read(key);
    if (bytes === undefined) return undefined;
    const profile = parseProfile(bytes);
    if (keyOf(profile) !== key) throw new ProfileError(`profile stored as ${key} belongs to chainID ${profile.chainId} with other layers`, 'foreign');
    this.budget?.touch(key);
    // The mtime is its recency after a restart; profiles are loaded once per mount.
    const now = Date.now() / 1000;
    void utimes(this.file(key), now, now).catch(() => undefined);
    return profile;
  }

  /** Stores `profile` under its key; atomic (write, then rename). Returns false when the budget had no room. */
  async save(profile: PrefetchProfile): Promise<boolean> {
    const key = keyOf(profile);
    const bytes = serializeProfile(profile);
    if (bytes.length > MAX_PROFILE_FILE_BYTES) throw new ProfileError(`profile of ${bytes.length} bytes is larger than ${MAX_PROFILE_FILE_BYTES}`, 'oversized');
    // Counted from the first byte written; refused when there is no room (it would be evicted at once).
    const release = this.budget?.reserve(bytes.length, key);
    if (this.budget !== undefined && release === undefined) return false;
    const temp = path.join(this.dir, `${TEMP_PREFIX}${randomBytes(8).toString('hex')}`);
    try {
      await mkdir(this.dir, { recursive: true, mode: 0o700 });
      await writeFile(temp, bytes, { mode: 0o600 });
      await rename(temp, this.file(key));
      release?.();
      this.budget?.add(key, bytes.length, this.evictor(key));
      return true;
    } catch (err) {
      await rm(temp, { force: true }).catch(() => undefined);
      throw err;
    } finally {
      release?.();
    }
  }

  private evictor(key: string): () => void {
    const file = this.file(key);
    return () => void rm(file, { force: true }).catch(() => undefined);
  }

  private file(key: string): string {
    if (!PROFILE_KEY.test(key)) throw new ProfileError(`${JSON.stringify(key)} is not a profile key (64 hex digits)`);
    return path.join(this.dir, `${key}.json`);
  }
}
