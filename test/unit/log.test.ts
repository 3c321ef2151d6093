import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
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
    // Let the asynchronous writes and renames run, as they would between a server's log lines.
    if (i % 100 === 0) await sleep(1);
  }
  await sleep(100);
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
  await sleep(100);
  assert.ok((await sizeOf(`${file}.1`)) >= 600, 'already past half the bound: the first line rotates the old content away');
  const both = (await readFile(`${file}.1`, 'utf8')) + (await readFile(file, 'utf8').catch(() => ''));
  assert.match(both, /one line\n/, 'the line that rotated it is kept');
});
