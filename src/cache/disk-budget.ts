/**
 * One byte budget for everything the daemon keeps under its root: `[cache] disk_max_bytes` bounds the
 * chunk cache, the TOC cache, files being written, and the files nobody evicts (the metadata db, logs),
 * all together. Only the containers' own snapshot dirs are outside it.
 *
 * Each cache reports its files as entries through an account (a key prefix). The budget keeps one
 * least-recently-used order over all of them, so a TOC nobody mounted for days goes before a chunk read a
 * minute ago, and when the total is over the cap it evicts from the old end, skipping pinned entries (the
 * TOC of a mounted layer, which a restarted FUSE server needs to mount it again without the registry).
 * Bytes it cannot evict (`setUntrackedBytes`, reservations) still count, so the caches shrink to make room;
 * when those alone leave none, a reservation is refused and the file is not written at all (it would be
 * evicted the moment it was added).
 *
 * The budget holds no I/O of its own: evicting calls the owner's callback, which deletes the file.
 */
import type { Logger } from '../log';

/**
 * Files take whole filesystem blocks: a 100-byte chunk costs a 4 KiB block, and `du` counts it so. Charging
 * blocks keeps many small entries from overrunning the cap.
 */
export const BLOCK_BYTES = 4096;
/** Warn at most this often that bytes the budget cannot evict keep it over its cap. */
const OVER_CAP_WARN_INTERVAL_MS = 60_000;

/** What a cache sees of the budget: its own entries, by its own keys. */
export interface BudgetAccount {
  /**
   * Records a file of `bytes` as the most recently used entry (an existing key is replaced). `evict`
   * deletes the file when the budget needs the room; it is called at most once, after the entry is forgotten.
   */
  add(key: string, bytes: number, evict: () => void, lastUsedMs?: number): void;
  /**
   * Adds files found at startup, each placed by its last use (the file's mtime) among every entry already
   * there, and only then evicts: a scan finishing after another cache's must not make its old files look new.
   */
  restore(found: readonly RestoredEntry[]): void;
  /** Marks the entry as just used. */
  touch(key: string): void;
  /** Forgets the entry (its owner deleted the file). */
  remove(key: string): void;
  /** While pinned (counted: pin twice, unpin twice), the entry is never evicted. Works before it exists. */
  pin(key: string): void;
  unpin(key: string): void;
  /**
   * Counts `bytes` about to be written (a temp file) for entry `key` until the returned release is called.
   * Undefined (refused, nothing counted) when evicting every entry that can go would still leave no room:
   * the file would be evicted as soon as it was added, so the caller does not write it. A pinned key is
   * never refused, since nothing evicts its entry once added.
   */
  reserve(bytes: number, key: string): (() => void) | undefined;
}

export interface RestoredEntry {
  key: string;
  bytes: number;
  lastUsedMs: number;
  evict: () => void;
}

export interface DiskBudgetStats {
  /** Entries evicted for room, by account prefix. */
  evictions: Record<string, number>;
  /** Reservations refused because no eviction could make room, by account prefix. */
  refusals: Record<string, number>;
}

interface Entry {
  bytes: number;
  lastUsedMs: number;
  evict: () => void;
}

export class DiskBudget {
  readonly stats: DiskBudgetStats = { evictions: {}, refusals: {} };
  /** Every entry by `<prefix>:<key>`, least recently used first (a Map keeps insertion order). */
  private entries = new Map<string, Entry>();
  /** Pin counts by full key; independent of `entries` so a layer can be pinned before its TOC is saved. */
  private readonly pins = new Map<string, number>();
  private entryBytes = 0;
  private reservedBytes = 0;
  /** Bytes under the root that no cache tracks (metadata db, logs, directories), from the last scan. */
  private untrackedBytes = 0;
  private enforcing = false;
  private lastOverCapWarnMs = 0;

  constructor(
    readonly maxBytes: number,
    private readonly log?: Logger,
  ) {}

  /** Bytes counted now: entries, reservations and untracked files. */
  get usedBytes(): number {
    return this.entryBytes + this.reservedBytes + this.untrackedBytes;
  }

  /** Bytes of entries whose keys start with `prefix:`. */
  bytesOf(prefix: string): number {
    let total = 0;
    for (const [key, e] of this.entries) if (key.startsWith(prefix + ':')) total += e.bytes;
    return total;
  }

  account(prefix: string): BudgetAccount {
    const k = (key: string): string => `${prefix}:${key}`;
    return {
      add: (key, bytes, evict, lastUsedMs) => this.add(k(key), bytes, evict, lastUsedMs),
      restore: (found) => this.restore(found.map((e) => ({ ...e, key: k(e.key) }))),
      touch: (key) => this.touch(k(key)),
      remove: (key) => this.remove(k(key)),
      pin: (key) => this.pins.set(k(key), (this.pins.get(k(key)) ?? 0) + 1),
      unpin: (key) => {
        const n = (this.pins.get(k(key)) ?? 0) - 1;
        if (n > 0) this.pins.set(k(key), n);
        else this.pins.delete(k(key));
        this.enforce();
      },
      reserve: (bytes, key) => this.reserve(prefix, bytes, k(key)),
    };
  }

  /** Sets the bytes of files no account tracks (a fresh scan of the root), then evicts if over the cap. */
  setUntrackedBytes(bytes: number): void {
    this.untrackedBytes = Math.max(0, bytes);
    this.enforce();
  }

  private add(key: string, bytes: number, evict: () => void, lastUsedMs = Date.now()): void {
    this.put(key, bytes, evict, lastUsedMs);
    this.enforce();
  }

  /** One sort for the whole scan, O(n log n), rather than a sorted insert per file. */
  private restore(found: readonly RestoredEntry[]): void {
    for (const e of found) this.put(e.key, e.bytes, e.evict, e.lastUsedMs);
    this.entries = new Map([...this.entries].sort((a, b) => a[1].lastUsedMs - b[1].lastUsedMs));
    this.enforce();
  }

  private put(key: string, bytes: number, evict: () => void, lastUsedMs: number): void {
    this.forget(key);
    const charged = allocatedBytes(bytes);
    this.entries.set(key, { bytes: charged, lastUsedMs, evict });
    this.entryBytes += charged;
  }

  private touch(key: string): void {
    const e = this.entries.get(key);
    if (e === undefined) return;
    this.entries.delete(key);
    e.lastUsedMs = Date.now();
    this.entries.set(key, e);
  }

  private remove(key: string): void {
    this.forget(key);
  }

  private forget(key: string): Entry | undefined {
    const e = this.entries.get(key);
    if (e === undefined) return undefined;
    this.entries.delete(key);
    this.entryBytes -= e.bytes;
    return e;
  }

  private reserve(prefix: string, bytes: number, key: string): (() => void) | undefined {
    const charged = allocatedBytes(bytes);
    if (!this.pins.has(key) && this.unevictableBytes() + charged > this.maxBytes) {
      this.stats.refusals[prefix] = (this.stats.refusals[prefix] ?? 0) + 1;
      return undefined;
    }
    this.reservedBytes += charged;
    this.enforce();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.reservedBytes -= charged;
    };
  }

  /**
   * What no eviction can free: untracked files, reservations and pinned entries. Pins are the mounted
   * layers' TOCs, a handful, so counting them here costs less than keeping a total in step with pin counts.
   */
  private unevictableBytes(): number {
    let pinned = 0;
    for (const key of this.pins.keys()) pinned += this.entries.get(key)?.bytes ?? 0;
    return this.untrackedBytes + this.reservedBytes + pinned;
  }

  /** Evicts unpinned entries, oldest first, until the total is within the cap or nothing is left to evict. */
  private enforce(): void {
    if (this.enforcing || this.usedBytes <= this.maxBytes) return;
    this.enforcing = true;
    try {
      for (const [key, e] of this.entries) {
        if (this.usedBytes <= this.maxBytes) break;
        if (this.pins.has(key)) continue;
        this.forget(key);
        const prefix = key.slice(0, key.indexOf(':'));
        this.stats.evictions[prefix] = (this.stats.evictions[prefix] ?? 0) + 1;
        try {
          e.evict();
        } catch (err) {
          this.log?.warn({ key, err: String(err) }, 'evicting a disk cache entry failed');
        }
      }
    } finally {
      this.enforcing = false;
    }
    const now = Date.now();
    // A cap of 0 means no disk caching: being over it is the expected state, not worth a warning.
    if (this.maxBytes > 0 && this.usedBytes > this.maxBytes && now - this.lastOverCapWarnMs > OVER_CAP_WARN_INTERVAL_MS) {
      this.lastOverCapWarnMs = now;
      this.log?.warn(
        { usedBytes: this.usedBytes, maxBytes: this.maxBytes, untrackedBytes: this.untrackedBytes, reservedBytes: this.reservedBytes },
        'disk use over disk_max_bytes with nothing left to evict (pinned TOCs, metadata, logs)',
      );
    }
  }
}

/** Bytes a file of `size` bytes takes in whole blocks. */
export function allocatedBytes(size: number): number {
  return Math.ceil(Math.max(0, size) / BLOCK_BYTES) * BLOCK_BYTES;
}
