import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { BoundedLogFile } from '../../src/log';

async function sizeOf(file: string): Promise<number> {
  try {
    return (await stat(file)).size;
  } catch {
    return 0;
  }
}

test('a bounded log file rotates once it holds half its bound, keeping one older generation', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'stargaze-log-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'server.log');
  const maxBytes = 64 * 1024;
  const log = new BoundedLogFile(file, maxBytes, 0);
  const line = `${'x'.repeat(99)}\n`;
  for (let i = 0; i < 5000; i++) {
    log.write(line);
    // Let the asynchronous writes and renames finish, as they would between a server's bursts of log lines;
    // a rotation started within a burst still has the rest of the burst written around it.
    if (i % 100 === 0) await log.settled();
  }
  await log.settled();
  const current = await sizeOf(file);
  const older = await sizeOf(`${file}.1`);
  assert.ok(older > 0, 'the log was rotated');
  assert.ok(current + older <= maxBytes + 16 * 1024, `current ${current} + older ${older} stay near ${maxBytes}`);
  const tail = await readFile(file, 'utf8');
  assert.ok(tail.length === 0 || tail.endsWith('\n'), 'whole lines');
});

test('a bounded log file counts what an earlier run left in it', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'stargaze-log-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'server.log');
  await writeFile(file, 'y'.repeat(600));
  const log = new BoundedLogFile(file, 1024, 600);
  log.write('one line\n');
  await log.settled();
  assert.ok((await sizeOf(`${file}.1`)) >= 600, 'already past half the bound: the first line rotates the old content away');
  const both = (await readFile(`${file}.1`, 'utf8')) + (await readFile(file, 'utf8').catch(() => ''));
  assert.match(both, /one line\n/, 'the line that rotated it is kept');
});

test('a bounded log file is settled once every line written so far is in the file', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'stargaze-log-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'server.log');
  const log = new BoundedLogFile(file, 1 << 20, 0);
  const lines = Array.from({ length: 200 }, (_, i) => `line ${i}\n`);
  for (const line of lines) log.write(line);
  await log.settled();
  assert.equal(await readFile(file, 'utf8'), lines.join(''));
  assert.equal(await sizeOf(`${file}.1`), 0, 'far below the bound: no rotation');
});
