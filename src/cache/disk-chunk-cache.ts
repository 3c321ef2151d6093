/**
 * Verified, decompressed chunks on disk, keyed by their digest: identical chunks of different layers and
 * images are stored once, and a restarted process finds them again.
 *
 * - Writes are atomic: a temp file in the cache dir, then rename.
 * - Reads are verified: a file whose bytes no longer match its name (bit rot, a partial copy, a meddler)
 *   is deleted and reported as a miss, so it is fetched again and never served.
 * - The byte budget (disk-budget.ts) caps the total and evicts the least recently used first, in its one
 *   order over chunks and TOCs together; this cache keeps only an unordered index. Recency survives
 *   restarts through the files' mtimes.
 * - A full disk degrades to no caching (the caller fetches directly), never to a failed read.
 */
import { randomBytes, webcrypto } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, stat, utimes } from 'node:fs/promises';
import path from 'node:path';
import { errorMessage } from '../errors';
import type { Logger } from '../log';
import { type BudgetAccount, DiskBudget } from './disk-budget';

/** Files being written carry this prefix until renamed; leftovers from a crash are removed at open. */
const TEMP_PREFIX = '.tmp-';
const DIGEST_PATTERN = /^sha256:([0-9a-f]{64})$/;
/** Refresh a file's mtime (its recency after a restart) at most this often. */
const TOUCH_INTERVAL_MS = 60_000;

export interface DiskChunkCacheOptions {
  dir: string;
  /** Cap on the bytes of cached chunks: a file found bigger than it is deleted at open. */
  maxBytes: number;
  log: Logger;
  /**
   * The root's shared byte budget (disk-budget.ts): chunks are reported to it, it evicts them when the
   * root as a whole is over `disk_max_bytes`. Without it, the cache gets a budget of its own of `maxBytes`.
   */
  budget?: BudgetAccount;
}

export interface DiskChunkCacheStats {
  hits: number;
  misses: number;
  evictions: number;
  /** Files dropped because their bytes did not match their digest. */
  corrupt: number;
  writeErrors: number;
  /** Chunks not written because the budget had no room for them (nothing left to evict, or over the cap). */
  refused: number;
}

interface Entry {
  size: number;
  touchedMs: number;
}

export class DiskChunkCache {
  readonly stats: DiskChunkCacheStats = { hits: 0, misses: 0, evictions: 0, corrupt: 0, writeErrors: 0, refused: 0 };
  /** The chunks on disk by digest hex. No order: the budget keeps the recency and decides what goes. */
  private readonly index = new Map<string, Entry>();
  /** Sum of the indexed files' sizes. */
  private indexedBytes = 0;
  /** Writes in flight by digest hex, so a chunk is written once. */
  private readonly writing = new Map<string, Promise<void>>();
  private readonly budget: BudgetAccount;

  private constructor(private readonly options: DiskChunkCacheOptions) {
    this.budget = options.budget ?? new DiskBudget(options.maxBytes, options.log).account('chunk');
  }

  /** Opens (creating) the cache dir and indexes what a previous process left; the budget orders it by mtime. */
  static async open(options: DiskChunkCacheOptions): Promise<DiskChunkCache> {
    const cache = new DiskChunkCache(options);
    await mkdir(options.dir, { recursive: true, mode: 0o700 });
    const found: { hex: string; size: number; mtimeMs: number }[] = [];
    for (const shard of await readdir(options.dir)) {
      const shardDir = path.join(options.dir, shard);
      if (shard.startsWith(TEMP_PREFIX)) {
        await rm(shardDir, { force: true });
        continue;
      }
      if (!/^[0-9a-f]{2}$/.test(shard)) continue;
      for (const name of await readdir(shardDir).catch(() => [] as string[])) {
        const file = path.join(shardDir, name);
        if (!/^[0-9a-f]{64}$/.test(name) || !name.startsWith(shard)) {
          await rm(file, { force: true });
          continue;
        }
        const st = await stat(file).catch(() => undefined);
        if (st?.isFile()) found.push({ hex: name, size: st.size, mtimeMs: st.mtimeMs });
      }
    }
    // A file bigger than the whole cap (disk_max_bytes lowered since) could never be kept: delete it now
    // rather than count it only for the budget to evict it.
    const kept: typeof found = [];
    for (const f of found) {
      if (f.size > options.maxBytes) await rm(cache.file(f.hex), { force: true });
      else kept.push(f);
    }
    for (const f of kept) cache.addToIndex(f.hex, f.size, f.mtimeMs);
    cache.budget.restore(kept.map((f) => ({ key: f.hex, bytes: f.size, lastUsedMs: f.mtimeMs, evict: () => cache.evictForBudget(f.hex) })));
    options.log.info({ dir: options.dir, chunks: cache.index.size, bytes: cache.indexedBytes }, 'disk chunk cache opened');
    return cache;
  }

  /** Bytes of the chunks on disk (their sizes; the budget charges them in whole blocks). */
  get usedBytes(): number {
    return this.indexedBytes;
  }

  has(digest: string): boolean {
    const hex = hexOf(digest);
    return hex !== undefined && this.index.has(hex);
  }

  /**
   * The chunk's bytes, verified against `digest`; undefined on a miss (also for a dropped corrupt file). With
   * `expectedSize`, a file of another size is dropped before anything is allocated or read for it.
   */
  async get(digest: string, expectedSize?: number): Promise<Buffer | undefined> {
    const hex = hexOf(digest);
    const entry = hex === undefined ? undefined : this.index.get(hex);
    if (hex === undefined || entry === undefined) {
      this.stats.misses++;
      return undefined;
    }
    let data: Buffer | undefined;
    // A digest fixes the size: a file of another size is corrupt, and is not even read.
    if (expectedSize === undefined || entry.size === expectedSize) {
      try {
        data = await readExactly(this.file(hex), entry.size);
      } catch {
        this.drop(hex);
        this.stats.misses++;
        return undefined;
      }
    }
    // A file cut short or grown is as corrupt as one with flipped bits.
    if (data === undefined || (await sha256Hex(data)) !== hex) {
      this.stats.corrupt++;
      this.options.log.warn({ digest, file: this.file(hex) }, 'cached chunk does not match its digest; dropped');
      this.drop(hex);
      await rm(this.file(hex), { force: true });
      this.stats.misses++;
      return undefined;
    }
    this.stats.hits++;
    this.budget.touch(hex);
    const now = Date.now();
    if (now - entry.touchedMs > TOUCH_INTERVAL_MS) {
      entry.touchedMs = now;
      void utimes(this.file(hex), now / 1000, now / 1000).catch(() => undefined);
    }
    return data;
  }

  /**
   * Stores `data`, which the caller has verified to hash to `digest`. Never rejects: a failed write (a
   * full disk) is counted and logged, and the chunk simply stays uncached.
   */
  put(digest: string, data: Buffer): Promise<void> {
    const hex = hexOf(digest);
    if (hex === undefined || this.index.has(hex)) return Promise.resolve();
    const running = this.writing.get(hex);
    if (running) return running;
    const p = this.write(hex, data).finally(() => this.writing.delete(hex));
    this.writing.set(hex, p);
    return p;
  }

  private async write(hex: string, data: Buffer): Promise<void> {
    const file = this.file(hex);
    const temp = path.join(this.options.dir, `${TEMP_PREFIX}${randomBytes(8).toString('hex')}`);
    // The temp file counts from its first byte: the budget makes room before it is written, not after.
    const release = this.budget.reserve(data.length, hex);
    if (release === undefined) {
      // No room even after evicting all that can go (the metadata db and logs fill disk_max_bytes): the
      // chunk stays uncached on disk, and reads are served from memory or the registry.
      this.stats.refused++;
      return;
    }
    try {
      await mkdir(path.dirname(file), { recursive: true, mode: 0o700 });
      const handle = await open(temp, 'wx', 0o600);
      try {
        await handle.writeFile(data);
      } finally {
        await handle.close();
      }
      await rename(temp, file);
      release();
      // Indexed before the budget hears of it: adding may evict it at once, and the eviction unindexes it.
      this.addToIndex(hex, data.length, Date.now());
      this.budget.add(hex, data.length, () => this.evictForBudget(hex));
    } catch (err) {
      this.stats.writeErrors++;
      this.options.log.warn({ err: errorMessage(err) }, 'could not write a chunk to the disk cache; serving without it');
      await rm(temp, { force: true }).catch(() => undefined);
    } finally {
      release();
    }
  }

  private addToIndex(hex: string, size: number, touchedMs: number): void {
    this.index.set(hex, { size, touchedMs });
    this.indexedBytes += size;
  }

  /** Unindexes a chunk; true if it was indexed. */
  private unindex(hex: string): boolean {
    const entry = this.index.get(hex);
    if (entry === undefined) return false;
    this.index.delete(hex);
    this.indexedBytes -= entry.size;
    return true;
  }

  /** Forgets a chunk whose file this cache deletes itself (unreadable or corrupt). */
  private drop(hex: string): void {
    this.unindex(hex);
    this.budget.remove(hex);
  }

  /** The budget has forgotten the chunk to make room: the index and the file follow. */
  private evictForBudget(hex: string): void {
    if (this.unindex(hex)) this.stats.evictions++;
    // The file goes even when the index no longer knows it: nothing else would ever count or delete it.
    void rm(this.file(hex), { force: true });
  }

  private file(hex: string): string {
    return path.join(this.options.dir, hex.slice(0, 2), hex);
  }
}

/**
 * The whole file, read with one pre-sized buffer (readFile grows its own in 512 KiB steps, one thread-pool
 * trip each); undefined when it is not `size` bytes long, which a short or grown file cannot hash past anyway.
 */
async function readExactly(file: string, size: number): Promise<Buffer | undefined> {
  const handle = await open(file, 'r');
  try {
    const data = Buffer.allocUnsafe(size);
    let filled = 0;
    while (filled < size) {
      const { bytesRead } = await handle.read(data, filled, size - filled, filled);
      if (bytesRead === 0) return undefined;
      filled += bytesRead;
    }
    const { bytesRead: extra } = await handle.read(Buffer.allocUnsafe(1), 0, 1, size);
    return extra === 0 ? data : undefined;
  } finally {
    await handle.close();
  }
}

function hexOf(digest: string): string | undefined {
  return DIGEST_PATTERN.exec(digest)?.[1];
}

async function sha256Hex(data: Buffer): Promise<string> {
  // webcrypto hashes on the thread pool: a 4 MiB chunk does not stall the event loop.
  return Buffer.from(await webcrypto.subtle.digest('SHA-256', data)).toString('hex');
}
