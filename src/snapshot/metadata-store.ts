/**
 * Persistent snapshot metadata: containerd's snapshots/storage MetaStore semantics over SQLite.
 *
 * Why better-sqlite3 (synchronous) on an async daemon: every operation here is one tiny transaction on
 * a few rows (sub-millisecond, an fsync included on a normal disk), and a synchronous transaction can't
 * be interleaved with another request's — the same isolation bbolt's single writer gives containerd,
 * without a lock held across awaits. Nothing slow (directory walks, mounts) ever runs inside one; the
 * snapshotter does those before or after. Listing is paged so a large table is read in small slices.
 *
 * Crash safety: WAL journal, synchronous=FULL by default (each commit is durable before we answer
 * containerd, as bbolt fsyncs each commit); NORMAL keeps consistency but may lose the last commits on
 * power loss. Ids come from AUTOINCREMENT, so they are never reused: a snapshot directory named by an id
 * can never be mistaken for a later snapshot's.
 */
import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError } from '../errors';
import { parseFilters, type Filter } from './filters';
import { nowNs, snapshotFieldAdaptor, type SnapshotInfo, type SnapshotKind, type SnapshotUsage } from './snapshot-info';

/** File name of the database inside the snapshotter root. */
export const METADATA_DB_FILE = 'metadata.db';
/** Rows read per page when walking; keeps each synchronous read short. */
export const WALK_PAGE_ROWS = 100;
/** Default wait for a database another process holds (only another daemon on the same root would). */
const DEFAULT_BUSY_TIMEOUT_MS = 2000;
/** Bumped when the schema changes; stored in PRAGMA user_version. */
const SCHEMA_VERSION = 1;

/** An active or view snapshot as the snapshotter needs it to build mounts. */
export interface SnapshotRecord {
  id: string;
  kind: SnapshotKind;
  /** Ids of the committed ancestors, nearest parent first (overlay lowerdir order). */
  parentIds: string[];
}

/** One ancestor, for availability checks of remote layers. */
export interface ChainEntry {
  id: string;
  name: string;
  labels: Record<string, string>;
}

export interface MetadataStoreOptions {
  /** 'full' (default): fsync each commit; 'normal': consistent, but the last commits may be lost on power loss. */
  durability?: 'full' | 'normal';
  /** How long open() waits for another process holding the database before failing. */
  busyTimeoutMs?: number;
}

interface SnapshotRow {
  id: bigint;
  name: string;
  parent_name: string | null;
  parent_id: bigint | null;
  kind: string;
  created_ns: bigint;
  updated_ns: bigint;
  labels: string;
  size: bigint;
  inodes: bigint;
}

const SELECT_COLUMNS = `s.id, s.name, p.name AS parent_name, s.parent_id, s.kind, s.created_ns, s.updated_ns,
  s.labels, s.size, s.inodes FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id`;

function isKind(k: string): k is SnapshotKind {
  return k === 'view' || k === 'active' || k === 'committed';
}

/** Labels with empty values are dropped, as containerd's boltutil.WriteLabels does. */
function cleanLabels(labels: Record<string, string> | undefined): Record<string, string> {
  const out: [string, string][] = [];
  for (const [k, v] of Object.entries(labels ?? {})) if (v !== '') out.push([k, v]);
  return Object.fromEntries(out);
}

function parseLabels(json: string): Record<string, string> {
  const parsed: unknown = JSON.parse(json);
  const out: [string, string][] = [];
  if (parsed !== null && typeof parsed === 'object') {
    for (const [k, v] of Object.entries(parsed)) if (typeof v === 'string') out.push([k, v]);
  }
  return Object.fromEntries(out);
}

function rowToInfo(row: SnapshotRow): SnapshotInfo {
  if (!isKind(row.kind)) throw new Error(`corrupt metadata: snapshot ${row.name} has kind ${row.kind}`);
  return {
    name: row.name,
    parent: row.parent_name ?? '',
    kind: row.kind,
    createdAt: row.created_ns,
    updatedAt: row.updated_ns,
    labels: parseLabels(row.labels),
  };
}

export class MetadataStore {
  /** The open database; null after close(). */
  private db: Database.Database | null;
  readonly file: string;

  private constructor(db: Database.Database, file: string) {
    this.db = db;
    this.file = file;
  }

  /** Opens (creating if needed) `<root>/metadata.db`. */
  static open(root: string, options: MetadataStoreOptions = {}): MetadataStore {
    fs.mkdirSync(root, { recursive: true, mode: 0o700 });
    const file = path.join(root, METADATA_DB_FILE);
    const db = new Database(file, { timeout: options.busyTimeoutMs ?? DEFAULT_BUSY_TIMEOUT_MS });
    try {
      // Exclusive locking before WAL: no shared-memory index, and a second daemon on the same root
      // fails at open instead of corrupting state under us.
      db.pragma('locking_mode = EXCLUSIVE');
      db.pragma('journal_mode = WAL');
      db.pragma(`synchronous = ${options.durability === 'normal' ? 'NORMAL' : 'FULL'}`);
      db.pragma('foreign_keys = ON');
      db.defaultSafeIntegers(true);
      MetadataStore.migrate(db);
    } catch (err) {
      db.close();
      throw err;
    }
    return new MetadataStore(db, file);
  }

  /**
   * Makes every id handed out from now on greater than `id`. AUTOINCREMENT never reuses an id of this
   * database, but a wiped metadata.db starts again at 1 while directories named by the old ids may remain
   * (a live mount rm -r stopped at): a new snapshot must not be renamed onto one of them.
   */
  reserveIdsThrough(id: number): void {
    this.conn.transaction(() => {
      const row = this.conn.prepare(`SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'`).get() as { seq: bigint } | undefined;
      if (row === undefined) this.conn.prepare(`INSERT INTO sqlite_sequence (name, seq) VALUES ('snapshots', ?)`).run(BigInt(id));
      else if (row.seq < BigInt(id)) this.conn.prepare(`UPDATE sqlite_sequence SET seq = ? WHERE name = 'snapshots'`).run(BigInt(id));
    })();
  }

  private static migrate(db: Database.Database): void {
    const version = Number(db.pragma('user_version', { simple: true }));
    if (version > SCHEMA_VERSION) {
      throw new Error(`metadata schema version ${version} is newer than this build understands (${SCHEMA_VERSION})`);
    }
    db.transaction(() => {
      db.exec(`
        CREATE TABLE IF NOT EXISTS snapshots (
          id         INTEGER PRIMARY KEY AUTOINCREMENT,
          name       TEXT    NOT NULL UNIQUE,
          parent_id  INTEGER REFERENCES snapshots(id) ON DELETE RESTRICT,
          kind       TEXT    NOT NULL CHECK (kind IN ('view', 'active', 'committed')),
          created_ns INTEGER NOT NULL,
          updated_ns INTEGER NOT NULL,
          labels     TEXT    NOT NULL DEFAULT '{}',
          size       INTEGER NOT NULL DEFAULT 0,
          inodes     INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
      `);
      db.pragma(`user_version = ${SCHEMA_VERSION}`);
    })();
  }

  private get conn(): Database.Database {
    if (this.db === null) throw new Error('metadata store is closed');
    return this.db;
  }

  private rowByName(name: string): SnapshotRow | undefined {
    return this.conn.prepare(`SELECT ${SELECT_COLUMNS} WHERE s.name = ?`).get(name) as SnapshotRow | undefined;
  }

  /** Ids of `id` and its ancestors, nearest first. */
  private chainIds(id: bigint): string[] {
    const rows = this.conn
      .prepare(
        `WITH RECURSIVE chain(id, parent_id, depth) AS (
           SELECT id, parent_id, 0 FROM snapshots WHERE id = ?
           UNION ALL
           SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
         ) SELECT id FROM chain ORDER BY depth`,
      )
      .all(id) as { id: bigint }[];
    return rows.map((r) => String(r.id));
  }

  /** containerd storage.CreateSnapshot: inserts an active or view snapshot on a committed parent. */
  createSnapshot(
    kind: SnapshotKind,
    key: string,
    parent: string,
    labels?: Record<string, string>,
  ): SnapshotRecord {
    if (kind !== 'active' && kind !== 'view') {
      throw new InvalidArgumentError(`snapshot type ${kind} invalid; only snapshots of type Active or View can be created`);
    }
    return this.conn.transaction((): SnapshotRecord => {
      let parentId: bigint | null = null;
      if (parent !== '') {
        const p = this.rowByName(parent);
        if (p === undefined) throw new NotFoundError(`missing parent "${parent}": snapshot does not exist`);
        // containerd's MetaStore answers InvalidArgument here (its metastore tests assert it).
        if (p.kind !== 'committed') throw new InvalidArgumentError(`parent "${parent}" is not committed snapshot`);
        parentId = p.id;
      }
      if (this.rowByName(key) !== undefined) throw new AlreadyExistsError(`snapshot ${key}: already exists`);
      const now = nowNs();
      const info = this.conn
        .prepare(
          `INSERT INTO snapshots (name, parent_id, kind, created_ns, updated_ns, labels)
           VALUES (?, ?, ?, ?, ?, ?) RETURNING id`,
        )
        .get(key, parentId, kind, now, now, JSON.stringify(cleanLabels(labels))) as { id: bigint };
      return {
        id: String(info.id),
        kind,
        parentIds: parentId === null ? [] : this.chainIds(parentId),
      };
    })();
  }

  /** containerd storage.GetInfo: info and stored usage of any snapshot by key or name. */
  getInfo(key: string): { id: string; info: SnapshotInfo; usage: SnapshotUsage } {
    const row = this.rowByName(key);
    if (row === undefined) throw new NotFoundError(`snapshot ${key}: snapshot does not exist`);
    return {
      id: String(row.id),
      info: rowToInfo(row),
      usage: { size: Number(row.size), inodes: Number(row.inodes) },
    };
  }

  /**
   * containerd storage.UpdateInfo: only labels are mutable. With no field paths all labels are replaced;
   * `labels` replaces them too; `labels.<key>` sets (or, with an absent/empty value, deletes) one label.
   * Any other path is InvalidArgument.
   */
  updateInfo(info: { name: string; labels?: Record<string, string> }, fieldPaths: readonly string[] = []): SnapshotInfo {
    const given = info.labels ?? {};
    return this.conn.transaction((): SnapshotInfo => {
      const row = this.rowByName(info.name);
      if (row === undefined) throw new NotFoundError(`snapshot ${info.name}: snapshot does not exist`);
      const current = rowToInfo(row);
      let labels = new Map(Object.entries(current.labels));
      if (fieldPaths.length === 0) {
        labels = new Map(Object.entries(given));
      } else {
        for (const p of fieldPaths) {
          if (p.startsWith('labels.')) {
            const key = p.slice('labels.'.length);
            labels.set(key, Object.prototype.hasOwnProperty.call(given, key) ? given[key]! : '');
          } else if (p === 'labels') {
            labels = new Map(Object.entries(given));
          } else {
            throw new InvalidArgumentError(`cannot update "${p}" field on snapshot "${info.name}"`);
          }
        }
      }
      const cleaned = cleanLabels(Object.fromEntries(labels));
      const updated = nowNs();
      this.conn
        .prepare('UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?')
        .run(JSON.stringify(cleaned), updated, row.id);
      return { ...current, labels: cleaned, updatedAt: updated };
    })();
  }

  /**
   * containerd storage.CommitActive: the active snapshot `key` becomes committed snapshot `name`, keeping
   * its id (and so its directory). Labels are replaced, not inherited. `expectedId` guards against the key
   * having been removed and re-created while the caller measured disk usage.
   */
  commitActive(
    key: string,
    name: string,
    usage: SnapshotUsage,
    labels?: Record<string, string>,
    expectedId?: string,
  ): string {
    return this.conn.transaction((): string => {
      if (this.rowByName(name) !== undefined) throw new AlreadyExistsError(`committed snapshot ${name}: already exists`);
      const row = this.rowByName(key);
      if (row === undefined) throw new NotFoundError(`failed to get active snapshot "${key}": snapshot does not exist`);
      if (row.kind !== 'active') throw new FailedPreconditionError(`snapshot "${key}" is not active`);
      if (expectedId !== undefined && String(row.id) !== expectedId) {
        throw new FailedPreconditionError(`snapshot "${key}" changed while it was being committed`);
      }
      const now = nowNs();
      this.conn
        .prepare(
          `UPDATE snapshots SET name = ?, kind = 'committed', created_ns = ?, updated_ns = ?, labels = ?,
             size = ?, inodes = ? WHERE id = ?`,
        )
        .run(name, now, now, JSON.stringify(cleanLabels(labels)), BigInt(usage.size), BigInt(usage.inodes), row.id);
      return String(row.id);
    })();
  }

  /** containerd storage.Remove: deletes the metadata of a snapshot without children. */
  remove(key: string): { id: string; kind: SnapshotKind } {
    return this.conn.transaction((): { id: string; kind: SnapshotKind } => {
      const row = this.rowByName(key);
      if (row === undefined) throw new NotFoundError(`snapshot ${key}: snapshot does not exist`);
      const child = this.conn.prepare('SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1').get(row.id);
      if (child !== undefined) throw new FailedPreconditionError(`cannot remove snapshot with child: ${key}`);
      this.conn.prepare('DELETE FROM snapshots WHERE id = ?').run(row.id);
      return { id: String(row.id), kind: rowToInfo(row).kind };
    })();
  }

  /**
   * containerd storage.GetSnapshot: id, kind and ancestor ids of an active or view snapshot.
   * Committed snapshots have no mounts: FailedPrecondition.
   */
  getSnapshot(key: string): SnapshotRecord {
    const row = this.rowByName(key);
    if (row === undefined) throw new NotFoundError(`snapshot ${key}: snapshot does not exist`);
    if (row.kind !== 'active' && row.kind !== 'view') {
      throw new FailedPreconditionError(`requested snapshot ${key} not active or view`);
    }
    return {
      id: String(row.id),
      kind: row.kind,
      parentIds: row.parent_id === null ? [] : this.chainIds(row.parent_id),
    };
  }

  /** `name` and its ancestors with their labels, nearest first; [] when `name` is ''. */
  chain(name: string): ChainEntry[] {
    if (name === '') return [];
    const row = this.rowByName(name);
    if (row === undefined) throw new NotFoundError(`snapshot ${name}: snapshot does not exist`);
    const rows = this.conn
      .prepare(
        `WITH RECURSIVE chain(id, name, parent_id, labels, depth) AS (
           SELECT id, name, parent_id, labels, 0 FROM snapshots WHERE id = ?
           UNION ALL
           SELECT s.id, s.name, s.parent_id, s.labels, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id
         ) SELECT id, name, labels FROM chain ORDER BY depth`,
      )
      .all(row.id) as { id: bigint; name: string; labels: string }[];
    return rows.map((r) => ({ id: String(r.id), name: r.name, labels: parseLabels(r.labels) }));
  }

  /** containerd storage.IDMap: id -> name of every snapshot. */
  idMap(): Map<string, string> {
    const rows = this.conn.prepare('SELECT id, name FROM snapshots').all() as { id: bigint; name: string }[];
    return new Map(rows.map((r) => [String(r.id), r.name]));
  }

  /** One page of snapshots with id greater than `afterId`, in id order. */
  listPage(afterId: string | undefined, limit: number = WALK_PAGE_ROWS): { id: string; info: SnapshotInfo }[] {
    const rows = this.conn
      .prepare(`SELECT ${SELECT_COLUMNS} WHERE s.id > ? ORDER BY s.id LIMIT ?`)
      .all(BigInt(afterId ?? 0), limit) as SnapshotRow[];
    return rows.map((r) => ({ id: String(r.id), info: rowToInfo(r) }));
  }

  /**
   * containerd storage.WalkInfo: calls `fn` for every snapshot matching any of `filters` (containerd
   * filter syntax; none = all). Syntax errors are InvalidArgument. Synchronous; for large tables use
   * listPage and yield between pages.
   */
  walkInfo(filters: readonly string[] | Filter, fn: (info: SnapshotInfo, id: string) => void): void {
    const filter = Array.isArray(filters) ? parseFilters(filters) : (filters as Filter);
    let after: string | undefined;
    for (;;) {
      const page = this.listPage(after);
      if (page.length === 0) return;
      for (const { id, info } of page) if (filter.match(snapshotFieldAdaptor(info))) fn(info, id);
      after = page[page.length - 1]!.id;
    }
  }

  /** Closes the database. Safe to call twice. */
  close(): void {
    if (this.db === null) return;
    const db = this.db;
    this.db = null;
    db.close();
  }
}
