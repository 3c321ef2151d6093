/**
 * MetadataStore against containerd's MetaStoreSuite (snapshots/storage/metastore_test.go), plus label
 * updates, timestamps, persistence across reopen and the single-owner lock.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, it } from 'node:test';
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
} from '../../../src/errors';
import { MetadataStore } from '../../../src/snapshot/metadata-store';
import type { SnapshotInfo, SnapshotKind } from '../../../src/snapshot/snapshot-info';

let dir: string;
let store: MetadataStore;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'stargaze-meta-'));
  store = MetadataStore.open(dir);
});

afterEach(() => {
  store.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** metastore_test.go basePopulate: 2 committed, 3 active, 2 views. */
function basePopulate(s: MetadataStore): void {
  s.createSnapshot('active', 'committed-tmp-1', '');
  s.commitActive('committed-tmp-1', 'committed-1', { size: 1, inodes: 0 });
  s.createSnapshot('active', 'committed-tmp-2', 'committed-1');
  s.commitActive('committed-tmp-2', 'committed-2', { size: 2, inodes: 0 });
  s.createSnapshot('active', 'active-1', '');
  s.createSnapshot('active', 'active-2', 'committed-1');
  s.createSnapshot('active', 'active-3', 'committed-2');
  s.createSnapshot('view', 'view-1', '');
  s.createSnapshot('view', 'view-2', 'committed-2');
}

const BASE_INFO: Record<string, { parent: string; kind: SnapshotKind }> = {
  'committed-1': { parent: '', kind: 'committed' },
  'committed-2': { parent: 'committed-1', kind: 'committed' },
  'active-1': { parent: '', kind: 'active' },
  'active-2': { parent: 'committed-1', kind: 'active' },
  'active-3': { parent: 'committed-2', kind: 'active' },
  'view-1': { parent: '', kind: 'view' },
  'view-2': { parent: 'committed-2', kind: 'view' },
};

/** Created/Updated must be "now" to within a few seconds, as cmpSnapshotInfo checks. */
function assertRecent(ns: bigint): void {
  const deltaMs = Math.abs(Number(ns / 1_000_000n) - Date.now());
  assert.ok(deltaMs < 30_000, `timestamp ${ns} is not recent`);
}

describe('MetadataStore (containerd MetaStoreSuite)', () => {
  it('GetInfo', () => {
    basePopulate(store);
    for (const [name, want] of Object.entries(BASE_INFO)) {
      const { info } = store.getInfo(name);
      assert.equal(info.name, name);
      assert.equal(info.parent, want.parent, name);
      assert.equal(info.kind, want.kind, name);
      assert.deepEqual(info.labels, {});
      assertRecent(info.createdAt);
      assertRecent(info.updatedAt);
    }
    assert.equal(store.getInfo('committed-2').usage.size, 2);
  });

  it('GetInfoNotExist / GetInfoEmptyDB', () => {
    assert.throws(() => store.getInfo('active-not-exist'), NotFoundError);
    basePopulate(store);
    assert.throws(() => store.getInfo('active-not-exist'), NotFoundError);
  });

  it('Walk', () => {
    basePopulate(store);
    const found = new Map<string, SnapshotInfo>();
    store.walkInfo([], (info) => {
      assert.ok(!found.has(info.name), 'entry already encountered');
      found.set(info.name, info);
    });
    assert.deepEqual([...found.keys()].sort(), Object.keys(BASE_INFO).sort());
    for (const [name, want] of Object.entries(BASE_INFO)) {
      assert.equal(found.get(name)!.parent, want.parent);
      assert.equal(found.get(name)!.kind, want.kind);
    }
  });

  it('Walk with filters; bad syntax is InvalidArgument', () => {
    basePopulate(store);
    const names = (filters: string[]): string[] => {
      const out: string[] = [];
      store.walkInfo(filters, (info) => out.push(info.name));
      return out.sort();
    };
    assert.deepEqual(names(['kind==view']), ['view-1', 'view-2']);
    assert.deepEqual(names(['parent==committed-2']), ['active-3', 'view-2']);
    assert.deepEqual(names(['name==active-1', 'name==view-1']), ['active-1', 'view-1']);
    assert.throws(() => names(['labels.']), InvalidArgumentError);
  });

  it('Walk pages through more rows than one page', () => {
    for (let i = 0; i < 250; i++) store.createSnapshot('active', `a-${i}`, '');
    let n = 0;
    store.walkInfo([], () => n++);
    assert.equal(n, 250);
    assert.equal(store.listPage(undefined, 100).length, 100);
  });

  it('Walk with filters pushed into SQL answers what the filters alone answer', () => {
    // Labels with dots, quotes and a backslash in keys and values; parents, kinds and names of each sort.
    const labelSets: Record<string, string>[] = [
      {},
      { 'containerd.io/snapshot.ref': 'sha256:aa', group: '1' },
      { 'containerd.io/snapshot.ref': 'sha256:bb', group: '2', 'q"uote': 'x' },
      { group: '1', 'back\\slash': 'y', empty: 'v"al' },
    ];
    let parent = '';
    for (let i = 0; i < 260; i++) {
      const labels = labelSets[i % labelSets.length];
      if (i % 3 === 2) {
        store.createSnapshot('view', `view-${i}`, parent, labels);
        continue;
      }
      store.createSnapshot('active', `tmp-${i}`, i % 7 === 0 ? '' : parent, labels);
      store.commitActive(`tmp-${i}`, `c-${i}`, { size: i, inodes: 1 }, labels);
      parent = `c-${i}`;
    }
    const all: SnapshotInfo[] = [];
    store.walkInfo([], (info) => all.push(info));
    assert.equal(all.length, 260);
    const cases: [string[], (i: SnapshotInfo) => boolean][] = [
      [['labels.group==1'], (i) => i.labels.group === '1'],
      [['labels."containerd.io/snapshot.ref"==sha256:bb,parent==c-13'], (i) => i.labels['containerd.io/snapshot.ref'] === 'sha256:bb' && i.parent === 'c-13'],
      [['labels."containerd.io/snapshot.ref"'], (i) => 'containerd.io/snapshot.ref' in i.labels],
      [['labels."q\\"uote"==x'], (i) => i.labels['q"uote'] === 'x'],
      [['labels."back\\\\slash"'], (i) => 'back\\slash' in i.labels],
      [['labels.empty=="v\\"al"'], (i) => i.labels.empty === 'v"al'],
      [['parent==""'], (i) => i.parent === ''],
      [['kind==view', 'name==c-7'], (i) => i.kind === 'view' || i.name === 'c-7'],
      [['kind==committed,name~=^c-1[0-9]$'], (i) => i.kind === 'committed' && /^c-1[0-9]$/.test(i.name)],
      [['labels.group!=1', 'name==view-2'], (i) => i.labels.group !== '1' || i.name === 'view-2'],
      [['labels.group==3'], () => false],
    ];
    for (const [filters, want] of cases) {
      const got: string[] = [];
      store.walkInfo(filters, (info) => got.push(info.name));
      assert.deepEqual(got, all.filter(want).map((i) => i.name), `filters ${JSON.stringify(filters)}`);
    }
  });

  it('GetSnapshot', () => {
    store.createSnapshot('active', 'committed-tmp-1', '');
    store.commitActive('committed-tmp-1', 'committed-1', { size: 0, inodes: 0 });
    const created = new Map<string, ReturnType<MetadataStore['createSnapshot']>>();
    for (const [name, kind, parent] of [
      ['active-1', 'active', ''],
      ['active-2', 'active', 'committed-1'],
      ['view-1', 'view', ''],
      ['view-2', 'view', 'committed-1'],
    ] as const) {
      created.set(name, store.createSnapshot(kind, name, parent));
    }
    for (const [name, want] of created) assert.deepEqual(store.getSnapshot(name), want);
  });

  it('GetSnapshotNotExist / GetSnapshotCommitted', () => {
    basePopulate(store);
    assert.throws(() => store.getSnapshot('active-not-exist'), NotFoundError);
    assert.throws(() => store.getSnapshot('committed-1'), FailedPreconditionError);
  });

  it('CreateActive', () => {
    const a1 = store.createSnapshot('active', 'active-1', '');
    assert.equal(a1.kind, 'active');
    const a2 = store.createSnapshot('view', 'view-1', '');
    assert.notEqual(a2.id, a1.id);
    assert.equal(a2.kind, 'view');
    const commitId = store.commitActive('active-1', 'committed-1', { size: 0, inodes: 0 });
    assert.equal(commitId, a1.id, 'snapshot identifier must not change on commit');
    const a3 = store.createSnapshot('active', 'active-3', 'committed-1');
    assert.notEqual(a3.id, a1.id);
    assert.deepEqual(a3.parentIds, [commitId]);
    const a4 = store.createSnapshot('view', 'view-2', 'committed-1');
    assert.notEqual(a4.id, a1.id);
    assert.equal(a4.kind, 'view');
  });

  it('CreateActiveNotExist / CreateActiveExist / CreateActiveFromActive', () => {
    assert.throws(() => store.createSnapshot('active', 'active-1', 'does-not-exist'), NotFoundError);
    basePopulate(store);
    assert.throws(() => store.createSnapshot('active', 'active-1', ''), AlreadyExistsError);
    assert.throws(() => store.createSnapshot('active', 'committed-1', ''), AlreadyExistsError);
    // containerd's metastore answers InvalidArgument for a parent that is not committed.
    assert.throws(() => store.createSnapshot('active', 'active-new', 'active-1'), InvalidArgumentError);
    assert.throws(() => store.createSnapshot('committed', 'x', ''), InvalidArgumentError);
  });

  it('Commit', () => {
    const a1 = store.createSnapshot('active', 'active-1', '');
    const id = store.commitActive('active-1', 'committed-1', { size: 0, inodes: 0 });
    assert.equal(id, a1.id);
    assert.throws(() => store.getSnapshot('active-1'), NotFoundError);
    assert.throws(() => store.getSnapshot('committed-1'), FailedPreconditionError);
  });

  it('CommitExist / CommitNotExist / CommitCommitted / CommitViewFails', () => {
    basePopulate(store);
    assert.throws(() => store.commitActive('active-1', 'committed-1', { size: 0, inodes: 0 }), AlreadyExistsError);
    assert.throws(() => store.commitActive('nope', 'committed-9', { size: 0, inodes: 0 }), NotFoundError);
    assert.throws(() => store.commitActive('committed-1', 'committed-3', { size: 0, inodes: 0 }), FailedPreconditionError);
    assert.throws(() => store.commitActive('view-1', 'committed-3', { size: 0, inodes: 0 }), FailedPreconditionError);
  });

  it('commit replaces labels, records usage, resets timestamps, guards the id', () => {
    const a = store.createSnapshot('active', 'a', '', { keep: 'no' });
    assert.throws(() => store.commitActive('a', 'c', { size: 1, inodes: 1 }, {}, String(Number(a.id) + 1)), FailedPreconditionError);
    store.commitActive('a', 'c', { size: 4096, inodes: 3 }, { l: 'v', empty: '' }, a.id);
    const { info, usage } = store.getInfo('c');
    assert.deepEqual(info.labels, { l: 'v' });
    assert.deepEqual(usage, { size: 4096, inodes: 3 });
    assert.equal(info.createdAt, info.updatedAt);
  });

  it('Remove', () => {
    const a1 = store.createSnapshot('active', 'active-1', '');
    const commitId = store.commitActive('active-1', 'committed-1', { size: 0, inodes: 0 });
    assert.equal(commitId, a1.id);
    const a2 = store.createSnapshot('view', 'view-1', 'committed-1');
    const a3 = store.createSnapshot('view', 'view-2', 'committed-1');
    assert.throws(() => store.remove('active-1'), NotFoundError);
    assert.deepEqual(store.remove('view-2'), { id: a3.id, kind: 'view' });
    assert.deepEqual(store.remove('view-1'), { id: a2.id, kind: 'view' });
    assert.deepEqual(store.remove('committed-1'), { id: commitId, kind: 'committed' });
  });

  it('RemoveNotExist / RemoveWithChildren', () => {
    assert.throws(() => store.remove('does-not-exist'), NotFoundError);
    basePopulate(store);
    assert.throws(() => store.remove('committed-1'), FailedPreconditionError);
    assert.throws(() => store.remove('committed-1'), FailedPreconditionError);
  });

  it('ParentIDs: nearest parent first, consistent with GetInfo ids', () => {
    basePopulate(store);
    const c1 = store.getInfo('committed-1').id;
    const c2 = store.getInfo('committed-2').id;
    assert.deepEqual(store.getSnapshot('active-1').parentIds, []);
    assert.deepEqual(store.getSnapshot('active-2').parentIds, [c1]);
    assert.deepEqual(store.getSnapshot('active-3').parentIds, [c2, c1]);
    assert.deepEqual(store.getSnapshot('view-2').parentIds, [c2, c1]);
    assert.deepEqual(store.createSnapshot('view', 'v3', 'committed-2').parentIds, [c2, c1]);
    assert.deepEqual(
      store.chain('committed-2').map((e) => e.name),
      ['committed-2', 'committed-1'],
    );
    assert.deepEqual(store.chain(''), []);
  });

  it('ids are never reused after removal', () => {
    const a = store.createSnapshot('active', 'a', '');
    store.remove('a');
    const b = store.createSnapshot('active', 'a', '');
    assert.ok(Number(b.id) > Number(a.id));
    assert.equal(store.idMap().get(b.id), 'a');
    assert.equal(store.idMap().has(a.id), false);
  });
});

describe('MetadataStore.updateInfo (containerd checkUpdate semantics)', () => {
  it('replaces, sets and deletes labels by field path; only labels are mutable', () => {
    store.createSnapshot('active', 'a', '', { 'containerd.io/gc.root': 'r' });
    const before = store.getInfo('a').info;
    assert.equal(before.createdAt, before.updatedAt);

    let info = store.updateInfo({ name: 'a', labels: { l1: 'v1', l2: 'v2', l3: 'v3', 'containerd.io/gc.root': 'r' } });
    assert.deepEqual(info.labels, { l1: 'v1', l2: 'v2', l3: 'v3', 'containerd.io/gc.root': 'r' });
    assert.equal(info.createdAt, before.createdAt);
    assert.ok(info.updatedAt > before.updatedAt);

    // labels.l1 is set; labels.l2 is absent from the given labels, so it is deleted; l4 is not in the mask.
    info = store.updateInfo({ name: 'a', labels: { l1: 'updated', l4: 'v4' } }, ['labels.l1', 'labels.l2']);
    assert.deepEqual(info.labels, { l1: 'updated', l3: 'v3', 'containerd.io/gc.root': 'r' });

    info = store.updateInfo({ name: 'a', labels: { l4: 'v4', 'containerd.io/gc.root': 'r' } }, ['labels']);
    assert.deepEqual(info.labels, { l4: 'v4', 'containerd.io/gc.root': 'r' });
    assert.deepEqual(store.getInfo('a').info.labels, info.labels);

    assert.throws(() => store.updateInfo({ name: 'a', labels: {} }, ['parent']), InvalidArgumentError);
    assert.throws(() => store.updateInfo({ name: 'a', labels: {} }, ['labels', 'kind']), InvalidArgumentError);
    assert.deepEqual(store.getInfo('a').info.labels, info.labels, 'a failed update changes nothing');
    assert.throws(() => store.updateInfo({ name: 'nope', labels: {} }), NotFoundError);
  });

  it('stores awkward label keys verbatim', () => {
    const labels = JSON.parse('{"__proto__":"p","a.b.c":"d","ünï":"ç"}') as Record<string, string>;
    store.createSnapshot('active', 'a', '', labels);
    const got = store.getInfo('a').info.labels;
    assert.equal(Object.getPrototypeOf(got), Object.prototype);
    assert.deepEqual(Object.entries(got).sort(), Object.entries(labels).sort());
    const info = store.updateInfo({ name: 'a', labels: JSON.parse('{"__proto__":"q"}') as Record<string, string> }, ['labels.__proto__']);
    assert.equal(Object.getOwnPropertyDescriptor(info.labels, '__proto__')?.value, 'q');
  });
});

describe('MetadataStore persistence', () => {
  it('keeps everything across close and reopen', () => {
    store.createSnapshot('active', 'tmp', '', { a: '1' });
    store.commitActive('tmp', 'base', { size: 8192, inodes: 2 }, { b: '2' });
    const child = store.createSnapshot('view', 'v', 'base', { c: '3' });
    const before = store.getInfo('v').info;
    store.close();
    store.close(); // idempotent

    store = MetadataStore.open(dir);
    const after = store.getInfo('v');
    assert.deepEqual(after.info, before);
    assert.equal(after.id, child.id);
    assert.deepEqual(store.getInfo('base').usage, { size: 8192, inodes: 2 });
    assert.deepEqual(store.getInfo('base').info.labels, { b: '2' });
    assert.deepEqual(store.getSnapshot('v').parentIds, child.parentIds);
    const next = store.createSnapshot('active', 'n', '');
    assert.ok(Number(next.id) > Number(child.id));
  });

  it('refuses a second owner of the same root while open', () => {
    store.createSnapshot('active', 'a', '');
    assert.throws(() => MetadataStore.open(dir, { busyTimeoutMs: 50 }), /locked|busy/i);
  });

  it('a closed store refuses calls', () => {
    store.close();
    assert.throws(() => store.getInfo('x'), /closed/);
  });
});
