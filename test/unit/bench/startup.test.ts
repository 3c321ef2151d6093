/**
 * The startup benchmark's peer arm: which modes run with and without a peer binary, and the table's ratios of
 * each stargaze mode to its peer mode. (The benchmark itself is run by `npm run bench`, never by the suite.)
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { markdownTable, selectModes, type StartupRow } from '../../../script/bench/startup';
import { PEER_MISSING_NOTE } from '../../e2e/harness';

describe('startup benchmark modes', () => {
  test('every mode by default with a peer binary', () => {
    const notes: string[] = [];
    assert.deepEqual(selectModes(undefined, true, notes), ['legacy', 'lazy', 'lazy-opt', 'lazy-profile', 'peer', 'peer-opt']);
    assert.deepEqual(notes, []);
  });

  test('without a peer binary the peer modes are left out with one note, and the rest runs as before', () => {
    const notes: string[] = [];
    assert.deepEqual(selectModes('legacy,peer,lazy,peer-opt', false, notes), ['legacy', 'lazy']);
    assert.deepEqual(notes, [PEER_MISSING_NOTE]);
    const byDefault: string[] = [];
    assert.deepEqual(selectModes(undefined, false, byDefault), ['legacy', 'lazy', 'lazy-opt', 'lazy-profile']);
    assert.deepEqual(byDefault, [PEER_MISSING_NOTE], 'the default run says how to add the peer');
    const none: string[] = [];
    selectModes('lazy', false, none);
    assert.deepEqual(none, [], 'nothing to say when no peer mode was asked for');
  });

  test('an unknown mode is an error naming it', () => {
    assert.throws(() => selectModes('lazy,peer-fast', true, []), /unknown mode peer-fast/);
  });

  test('only peer modes without a peer binary is an error, not an empty table', () => {
    assert.throws(() => selectModes('peer,peer-opt', false, []), /no mode left to run.*STARGAZE_PEER_BIN/);
  });

  test('a mode named twice runs once', () => {
    assert.deepEqual(selectModes('lazy,peer,lazy', true, []), ['lazy', 'peer']);
  });
});

describe('startup benchmark table', () => {
  const row = (mode: StartupRow['mode'], total: number, blobGets: number, fetchedMib: number): StartupRow => ({
    link: 'direct',
    image: 'python',
    mode,
    imageBytes: 66 * 1024 * 1024,
    pull: total / 2,
    create: 0,
    run: total / 2,
    total,
    fetchedBytes: fetchedMib * 1024 * 1024,
    blobGets,
    samples: [],
  });

  test('each stargaze mode is set beside its peer mode: total, GETs and bytes', () => {
    const table = markdownTable([
      row('legacy', 4000, 3, 60),
      row('lazy', 1500, 24, 5.3),
      row('peer', 1200, 20, 5),
      row('lazy-opt', 900, 9, 2.5),
      row('peer-opt', 1000, 12, 2),
      row('lazy-profile', 600, 6, 5.5),
    ]);
    const line = (mode: string): string[] =>
      table
        .split('\n')
        .find((l) => l.split('|')[3]?.trim() === mode)!
        .split('|')
        .map((c) => c.trim());
    assert.deepEqual(line('lazy').slice(7, 13), ['1.50', '0.38x', '1.25x', '24', '5.3', '1.20x, 1.06x']);
    assert.deepEqual(line('lazy-opt').slice(7, 13), ['0.90', '0.23x', '0.90x', '9', '2.5', '0.75x, 1.25x']);
    assert.deepEqual(line('lazy-profile').slice(7, 13), ['0.60', '0.15x', '0.50x', '6', '5.5', '0.30x, 1.10x'], 'a profile is measured against the peer on the same image');
    assert.deepEqual(line('peer').slice(8, 10), ['0.30x', ''], 'a peer mode has no peer of its own');
    assert.equal(line('legacy')[8], '', 'legacy has no ratio to itself');
  });
});
