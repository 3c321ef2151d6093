/** Profiles on disk: atomic saves, reads back across instances, budgeted and evicted like TOCs unless pinned. */
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { DiskBudget } from '../../../src/cache/disk-budget';
import { ProfileStore } from '../../../src/cache/profile-store';
import { ProfileError } from '../../../src/errors';
import { keyOf, serializeProfile } from '../../../src/profile/profile-format';
import { sampleProfile } from '../profile/sample';

async function tempDir(t: { after(fn: () => Promise<void>): void }): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'profile-store-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

const d = (c: string): string => `sha256:${c.repeat(64)}`;

test('a saved profile loads back, also in a new store over the same dir, and is listed', async (t) => {
  const dir = await tempDir(t);
  const store = new ProfileStore(dir);
  const p = sampleProfile();
  assert.equal(await store.save(p), true);
  assert.deepEqual(await new ProfileStore(dir).load(keyOf(p)), p);
  assert.deepEqual((await store.list()).map((i) => i.key), [keyOf(p)]);
  assert.equal(await store.load('0'.repeat(64)), undefined, 'none stored');
  assert.deepEqual(await new ProfileStore(path.join(dir, 'absent')).list(), []);
});

test('a profile stored under a key that is not its own is foreign; a bad key is refused', async (t) => {
  const dir = await tempDir(t);
  const other = 'f'.repeat(64);
  await writeFile(path.join(dir, `${other}.json`), serializeProfile(sampleProfile()));
  await assert.rejects(new ProfileStore(dir).load(other), (err: unknown) => err instanceof ProfileError && err.reason === 'foreign');
  await assert.rejects(new ProfileStore(dir).load('../x'), ProfileError);
});

test('profiles count in the budget: the least recently used goes first, never a pinned one; scan removes temp files', async (t) => {
  const dir = await tempDir(t);
  const budget = new DiskBudget(3 * 4096);
  const store = new ProfileStore(dir, budget.account('profile'));
  const profiles = ['1', '2', '3', '4'].map((c) => sampleProfile({ chainId: d(c) }));
  store.pin(keyOf(profiles[0]!));
  for (const p of profiles) assert.equal(await store.save(p), true);
  await new Promise((r) => setTimeout(r, 50)); // evictions delete files asynchronously
  const left = (await store.list()).map((i) => i.key).sort();
  assert.deepEqual(left, [keyOf(profiles[0]!), keyOf(profiles[2]!), keyOf(profiles[3]!)].sort(), 'the oldest unpinned profile was evicted');
  assert.equal(budget.bytesOf('profile'), 3 * 4096);

  await writeFile(path.join(dir, '.tmp-leftover'), 'x');
  const again = new DiskBudget(1 << 20);
  assert.deepEqual(await new ProfileStore(dir, again.account('profile')).scan(), { files: 3, bytes: (await sizes(dir)).total });
  assert.equal(again.bytesOf('profile'), 3 * 4096);
  assert.ok(!(await readdir(dir)).includes('.tmp-leftover'));
});

async function sizes(dir: string): Promise<{ total: number }> {
  const store = new ProfileStore(dir);
  return { total: (await store.list()).reduce((n, i) => n + i.bytes, 0) };
}
