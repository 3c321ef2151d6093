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
import { AllFilter, ALWAYS, AnyFilter, parseFilters, Selector, type Filter } from './filters';
import { nowNs, snapshotFieldAdaptor, type SnapshotInfo, type SnapshotKind, type SnapshotUsage } from './snapshot-info';

/** File name of the database inside the snapshotter root. */
export const METADATA_DB_FILE = 'metadata.db';
/** Rows read per page when walking; keeps each synchronous read short. */
export const WALK_PAGE_ROWS = 100;
/** Default wait for a database another process holds (only another daemon on the same root would). */
const DEFAULT_BUSY_TIMEOUT_MS = 2000;
/** Statements kept compiled for filtered listings (one per filter shape, values are bound); the cache starts over past this. */
const MAX_FILTER_STATEMENTS = 64;
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

/**
 * What a listing reads of each row, in this order, as arrays (better-sqlite3's raw mode): only the columns of an
 * info, the id as text, so that a page makes no object or BigInt it does not hand on.
 */
const LIST_COLUMNS = `CAST(s.id AS TEXT), s.name, p.name, s.kind, s.created_ns, s.updated_ns, s.labels
  FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id`;
type ListRow = [id: string, name: string, parentName: string | null, kind: string, createdNs: bigint, updatedNs: bigint, labels: string];

function isKind(k: string): k is SnapshotKind {
  return k === 'view' || k === 'active' || k === 'committed';
}

/** Labels with empty values are dropped, as containerd's boltutil.WriteLabels does. */
function cleanLabels(labels: Record<string, string> | undefined): Record<string, string> {
  const out: [string, string][] = [];
  for (const [k, v] of Object.entries(labels ?? {})) if (v !== '') out.push([k, v]);
  return Object.fromEntries(out);
}

/** The labels column (written by us: an object of strings) as it is parsed; anything else in it is left out. */
function parseLabels(json: string): Record<string, string> {
  const parsed: unknown = JSON.parse(json);
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) return {};
  const labels = parsed as Record<string, unknown>;
  for (const k in labels) {
    if (typeof labels[k] !== 'string') {
      const out: [string, string][] = [];
      for (const [key, v] of Object.entries(labels)) if (typeof v === 'string') out.push([key, v]);
      return Object.fromEntries(out);
    }
  }
  return labels as Record<string, string>;
}

/** A WHERE clause over SELECT_COLUMNS's aliases, and its parameters in order. */
interface SqlCondition {
  sql: string;
  params: string[];
}

/** `$."<key>"`: the JSON path of a label; undefined for a key the path syntax cannot quote. */
function labelPath(key: string): string | undefined {
  return /["\\]/.test(key) ? undefined : `$."${key}"`;
}

/** One selector as SQL, or undefined when it has no SQL form here (the row filter decides it alone). */
function selectorToSql(sel: Selector): SqlCondition | undefined {
  const [field, ...rest] = sel.fieldpath;
  if (field === 'labels' && rest.length > 0) {
    const jsonPath = labelPath(rest.join('.'));
    if (jsonPath === undefined) return undefined;
    if (sel.operator === '==') return { sql: 'json_extract(s.labels, ?) = ?', params: [jsonPath, sel.value] };
    if (sel.operator === 'present') return { sql: 'json_type(s.labels, ?) IS NOT NULL', params: [jsonPath] };
    return undefined;
  }
  if (sel.operator !== '==' || rest.length > 0) return undefined;
  if (field === 'name') return { sql: 's.name = ?', params: [sel.value] };
  if (field === 'kind') return { sql: 's.kind = ?', params: [sel.value] };
  if (field === 'parent') return { sql: "COALESCE(p.name, '') = ?", params: [sel.value] };
  return undefined;
}

/**
 * A condition every row `filter` matches satisfies: the filter pushed into SQL as far as it goes, so a filtered
 * walk reads only the rows that may match instead of parsing every row's labels. It may let through more than
 * the filter (a selector without an SQL form is left out), never less; undefined when it restricts nothing.
 * Rows are matched against the filter itself after it, so the answer is the filter's exactly.
 */
export function filterToSql(filter: Filter): SqlCondition | undefined {
  if (filter === ALWAYS) return undefined;
  if (filter instanceof Selector) return selectorToSql(filter);
  if (filter instanceof AllFilter) {
    const parts = filter.filters.map(filterToSql).filter((c): c is SqlCondition => c !== undefined);
    if (parts.length === 0) return undefined;
    return { sql: parts.map((c) => `(${c.sql})`).join(' AND '), params: parts.flatMap((c) => c.params) };
  }
  if (filter instanceof AnyFilter) {
    const parts = filter.filters.map(filterToSql);
    if (parts.length === 0 || parts.some((c) => c === undefined)) return undefined;
    const conds = parts as SqlCondition[];
    return { sql: conds.map((c) => `(${c.sql})`).join(' OR '), params: conds.flatMap((c) => c.params) };
  }
  return undefined;
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
  /** Compiled statements by their SQL: compiling costs more than running most of them. */
  private readonly statements = new Map<string, Database.Statement>();
  /** Compiled listing statements by their WHERE clause; bounded by MAX_FILTER_STATEMENTS. */
  private readonly filterStatements = new Map<string, Database.Statement>();

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
      const row = this.stmt(`SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'`).get() as { seq: bigint } | undefined;
      if (row === undefined) this.stmt(`INSERT INTO sqlite_sequence (name, seq) VALUES ('snapshots', ?)`).run(BigInt(id));
      else if (row.seq < BigInt(id)) this.stmt(`UPDATE sqlite_sequence SET seq = ? WHERE name = 'snapshots'`).run(BigInt(id));
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

  /** `sql` compiled once per store. */
  private stmt(sql: string): Database.Statement {
    let statement = this.statements.get(sql);
    if (statement === undefined) {
      statement = this.conn.prepare(sql);
      this.statements.set(sql, statement);
    }
    return statement;
  }

  private rowByName(name: string): SnapshotRow | undefined {
    return this.stmt(`SELECT ${SELECT_COLUMNS} WHERE s.name = ?`).get(name) as SnapshotRow | undefined;
  }

  /** Id and kind of the snapshot `name`; undefined when there is none (no error built for the common miss). */
  lookup(name: string): { id: string; kind: SnapshotKind } | undefined {
    const row = this.stmt('SELECT id, kind FROM snapshots WHERE name = ?').get(name) as { id: bigint; kind: string } | undefined;
    if (row === undefined) return undefined;
    if (!isKind(row.kind)) throw new Error(`corrupt metadata: snapshot ${name} has kind ${row.kind}`);
    return { id: String(row.id), kind: row.kind };
  }

  /** Ids of `id` and its ancestors, nearest first. */
  private chainIds(id: bigint): string[] {
    const rows = this
      .stmt(
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
        const p = this.lookup(parent);
        if (p === undefined) throw new NotFoundError(`missing parent "${parent}": snapshot does not exist`);
        // containerd's MetaStore answers InvalidArgument here (its metastore tests assert it).
        if (p.kind !== 'committed') throw new InvalidArgumentError(`parent "${parent}" is not committed snapshot`);
        parentId = BigInt(p.id);
      }
      if (this.lookup(key) !== undefined) throw new AlreadyExistsError(`snapshot ${key}: already exists`);
      const now = nowNs();
      const info = this
        .stmt(
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
      this
        .stmt('UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?')
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
      if (this.lookup(name) !== undefined) throw new AlreadyExistsError(`committed snapshot ${name}: already exists`);
      const row = this.lookup(key);
      if (row === undefined) throw new NotFoundError(`failed to get active snapshot "${key}": snapshot does not exist`);
      if (row.kind !== 'active') throw new FailedPreconditionError(`snapshot "${key}" is not active`);
      if (expectedId !== undefined && row.id !== expectedId) {
        throw new FailedPreconditionError(`snapshot "${key}" changed while it was being committed`);
      }
      const now = nowNs();
      this
        .stmt(
          `UPDATE snapshots SET name = ?, kind = 'committed', created_ns = ?, updated_ns = ?, labels = ?,
             size = ?, inodes = ? WHERE id = ?`,
        )
        .run(name, now, now, JSON.stringify(cleanLabels(labels)), BigInt(usage.size), BigInt(usage.inodes), BigInt(row.id));
      return row.id;
    })();
  }

  /** containerd storage.Remove: deletes the metadata of a snapshot without children. */
  remove(key: string): { id: string; kind: SnapshotKind } {
    return this.conn.transaction((): { id: string; kind: SnapshotKind } => {
      const row = this.rowByName(key);
      if (row === undefined) throw new NotFoundError(`snapshot ${key}: snapshot does not exist`);
      const child = this.stmt('SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1').get(row.id);
      if (child !== undefined) throw new FailedPreconditionError(`cannot remove snapshot with child: ${key}`);
      this.stmt('DELETE FROM snapshots WHERE id = ?').run(row.id);
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
    const rows = this
      .stmt(
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
    const rows = this.stmt('SELECT id, name FROM snapshots').all() as { id: bigint; name: string }[];
    return new Map(rows.map((r) => [String(r.id), r.name]));
  }

  /**
   * One page of snapshots with id greater than `afterId`, in id order; with `where` (filterToSql), only rows
   * satisfying it. A page may be short before the end only when `where` left rows out: the walk ends at an empty page.
   */
  listPage(afterId: string | undefined, limit: number = WALK_PAGE_ROWS, where?: SqlCondition): { id: string; info: SnapshotInfo }[] {
    const after = BigInt(afterId ?? 0);
    let rows: ListRow[];
    if (where === undefined) {
      rows = this.stmt(`SELECT ${LIST_COLUMNS} WHERE s.id > ? ORDER BY s.id LIMIT ?`).raw(true).all(after, limit) as ListRow[];
    } else {
      let statement = this.filterStatements.get(where.sql);
      if (statement === undefined) {
        if (this.filterStatements.size >= MAX_FILTER_STATEMENTS) this.filterStatements.clear();
        statement = this.conn.prepare(`SELECT ${LIST_COLUMNS} WHERE s.id > ? AND (${where.sql}) ORDER BY s.id LIMIT ?`).raw(true);
        this.filterStatements.set(where.sql, statement);
      }
      rows = statement.all(after, ...where.params, limit) as ListRow[];
    }
    const page: { id: string; info: SnapshotInfo }[] = new Array<{ id: string; info: SnapshotInfo }>(rows.length);
    for (let i = 0; i < rows.length; i++) {
      const [id, name, parentName, kind, createdNs, updatedNs, labels] = rows[i]!;
      if (!isKind(kind)) throw new Error(`corrupt metadata: snapshot ${name} has kind ${kind}`);
      page[i] = {
        id,
        info: { name, parent: parentName ?? '', kind, createdAt: createdNs, updatedAt: updatedNs, labels: parseLabels(labels) },
      };
    }
    return page;
  }

  /**
   * containerd storage.WalkInfo: calls `fn` for every snapshot matching any of `filters` (containerd
   * filter syntax; none = all). Syntax errors are InvalidArgument. Synchronous; for large tables use
   * listPage and yield between pages.
   */
  walkInfo(filters: readonly string[] | Filter, fn: (info: SnapshotInfo, id: string) => void): void {
    const filter = Array.isArray(filters) ? parseFilters(filters) : (filters as Filter);
    const where = filterToSql(filter);
    let after: string | undefined;
    for (;;) {
      const page = this.listPage(after, WALK_PAGE_ROWS, where);
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
