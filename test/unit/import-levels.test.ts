/**
 * The import levels have one source, the LEVELS table in .dependency-cruiser.cjs (npm run check:deps generates
 * its rules from it). These tests keep docs/design.md's copy of the table equal to it, and every part of src/ on
 * a level.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { test } from 'node:test';

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');

interface Level {
  level: string;
  parts: string[];
  what: string;
}

function levels(): Level[] {
  const load = createRequire(__filename);
  const config = load(path.join(REPO_ROOT, '.dependency-cruiser.cjs')) as { levels?: Level[] };
  assert.ok(Array.isArray(config.levels) && config.levels.length > 0, '.dependency-cruiser.cjs exports its LEVELS as `levels`');
  return config.levels;
}

/** The table as docs/design.md shows it. */
function markdownTable(table: Level[]): string {
  const rows = table.map((l) => `| ${l.level} | ${l.parts.map((p) => `\`${p}\``).join(', ')} | ${l.what} |`);
  return ['| level | part of `src/` | what |', '|---|---|---|', ...rows].join('\n');
}

test('docs/design.md shows the import levels the check uses', () => {
  const expected = markdownTable(levels());
  const design = readFileSync(path.join(REPO_ROOT, 'docs', 'design.md'), 'utf8');
  assert.ok(design.includes(expected), `docs/design.md should hold this table (from .dependency-cruiser.cjs):\n\n${expected}\n`);
});

test('every folder and top-level file of src/ is on exactly one level', () => {
  const placed = levels().flatMap((l) => l.parts);
  assert.equal(new Set(placed).size, placed.length, `a part is on two levels: ${placed.join(' ')}`);
  const parts = readdirSync(path.join(REPO_ROOT, 'src'), { withFileTypes: true })
    .filter((e) => e.isDirectory() || e.name.endsWith('.ts'))
    .map((e) => e.name);
  const missing = parts.filter((p) => !placed.includes(p));
  assert.deepEqual(missing, [], 'add these to LEVELS in .dependency-cruiser.cjs (and the table in docs/design.md)');
});
