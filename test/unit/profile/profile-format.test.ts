/**
 * The prefetch profile format: what parses, what is refused as malformed or oversized, the union of starts,
 * and the key a layer's profile is stored under.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { ProfileError } from '../../../src/errors';
import {
  keyOf,
  MAX_PROFILE_ENTRIES,
  MAX_PROFILE_FILE_BYTES,
  mergeEntries,
  parseProfile,
  profileKey,
  serializeProfile,
} from '../../../src/profile/profile-format';

import { sampleProfile } from './sample';

test('a profile survives serialize and parse, one entry per line', () => {
  const p = sampleProfile();
  const bytes = serializeProfile(p);
  assert.deepEqual(parseProfile(bytes), p);
  assert.equal(bytes.toString().split('\n').filter((l) => l.startsWith('{"name"')).length, 2);
  assert.deepEqual(parseProfile(serializeProfile(sampleProfile({ entries: [] }))).entries, []);
});

test('malformed profiles are refused as such', () => {
  const good = JSON.parse(serializeProfile(sampleProfile()).toString()) as Record<string, unknown>;
  const cases: Array<[string, string]> = [
    ['not json', '{"version":1,'],
    ['an array', '[]'],
    ['version 2', JSON.stringify({ ...good, version: 2 })],
    ['no version', JSON.stringify({ ...good, version: undefined })],
    ['layer not a digest', JSON.stringify({ ...good, layer: 'sha256:xyz' })],
    ['tocDigest missing', JSON.stringify({ ...good, tocDigest: undefined })],
    ['layers not a list', JSON.stringify({ ...good, layers: 'a,b' })],
    ['entry without a name', JSON.stringify({ ...good, entries: [{ offset: 0 }] })],
    ['negative offset', JSON.stringify({ ...good, entries: [{ name: 'a', offset: -1 }] })],
    ['fractional offset', JSON.stringify({ ...good, entries: [{ name: 'a', offset: 1.5 }] })],
  ];
  for (const [what, text] of cases) {
    assert.throws(
      () => parseProfile(text),
      (err: unknown) => err instanceof ProfileError && err.reason === 'malformed' && err.code === 'ERR_PROFILE',
      what,
    );
  }
});

test('oversized profiles are refused as oversized: too many bytes or entries', () => {
  const entries = Array.from({ length: MAX_PROFILE_ENTRIES + 1 }, (_, i) => ({ name: 'f', offset: i }));
  assert.throws(() => parseProfile(serializeProfile(sampleProfile({ entries }))), (err: unknown) => err instanceof ProfileError && err.reason === 'oversized');
  const big = Buffer.alloc(MAX_PROFILE_FILE_BYTES + 1, 0x20);
  assert.throws(() => parseProfile(big), (err: unknown) => err instanceof ProfileError && err.reason === 'oversized');
});

test('the union of two starts keeps first-seen order, each chunk once, within the bound', () => {
  const a = [
    { name: 'x', offset: 0 },
    { name: 'y', offset: 0 },
  ];
  const b = [
    { name: 'y', offset: 0 },
    { name: 'x', offset: 4096 },
    { name: 'z', offset: 0 },
  ];
  assert.deepEqual(mergeEntries(a, b, 10), [...a, b[1], b[2]]);
  assert.deepEqual(mergeEntries(a, b, 3), [...a, b[1]]);
});

const d = (c: string): string => `sha256:${c.repeat(64)}`;

test('the key is the chainID with the layers above: same for images that differ only in config, else different', () => {
  const p = sampleProfile();
  assert.equal(keyOf(p), profileKey(d('c'), [d('a'), d('e')]));
  assert.match(keyOf(p), /^[0-9a-f]{64}$/);
  assert.notEqual(profileKey(d('c'), [d('a'), d('f')]), keyOf(p), 'another layer above');
  assert.notEqual(profileKey(d('9'), [d('a'), d('e')]), keyOf(p), 'another chainID');
});
