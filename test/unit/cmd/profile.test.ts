/** `stargaze profile`, run as the binary over a temp root: import, ls, show, export, and its errors. */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { keyOf, MAX_PROFILE_FILE_BYTES, parseProfile, serializeProfile } from '../../../src/profile/profile-format';
import { sampleProfile } from '../profile/sample';

const exec = promisify(execFile);
const CLI = path.resolve(__dirname, '..', '..', '..', 'src', 'cli.js');

async function stargaze(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await exec(process.execPath, [CLI, ...args]);
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

test('import stores a profile under its key; ls lists it; show and export print it; a prefix names it', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-profile-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const root = path.join(dir, 'root');
  const p = sampleProfile();
  const key = keyOf(p);
  await writeFile(path.join(dir, 'in.json'), serializeProfile(p));

  const imported = await stargaze(['profile', 'import', path.join(dir, 'in.json'), '--root', root]);
  assert.equal(imported.code, 0, imported.stderr);
  assert.equal(imported.stdout, `${key}\n`);
  assert.deepEqual(parseProfile(await readFile(path.join(root, 'cache', 'profiles', `${key}.json`))), p);

  const ls = await stargaze(['profile', 'ls', '--root', root]);
  assert.equal(ls.code, 0, ls.stderr);
  const [header, row, ...rest] = ls.stdout.trimEnd().split('\n');
  assert.match(header!, /^KEY\s+LAYER\s+ENTRIES\s+BYTES\s+MODIFIED$/);
  assert.match(row!, new RegExp(`^${key}\\s+${p.layer}\\s+2\\s+\\d+\\s+\\d{4}-`));
  assert.deepEqual(rest, []);

  const show = await stargaze(['profile', 'show', key.slice(0, 12), '--root', root]);
  assert.equal(show.code, 0, show.stderr);
  assert.deepEqual(parseProfile(show.stdout), p);
  const out = path.join(dir, 'out.json');
  assert.equal((await stargaze(['profile', 'export', key, out, '--root', root])).code, 0);
  assert.deepEqual(parseProfile(await readFile(out)), p);
  assert.deepEqual(parseProfile((await stargaze(['profile', 'export', key, '-', '--root', root])).stdout), p);
});

test('bad flags, commands, keys and files are clear errors', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-profile-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const root = ['--root', path.join(dir, 'root')];
  await writeFile(path.join(dir, 'bad.json'), '{"version": 2}');
  await writeFile(path.join(dir, 'big.json'), Buffer.alloc(MAX_PROFILE_FILE_BYTES + 1, 0x20));
  const cases: Array<[string[], number, RegExp]> = [
    [['profile', '--bogus'], 2, /Unknown option '--bogus'/],
    [['profile'], 2, /expected a command: ls, show, export, import or push/],
    [['profile', 'push', ...root], 2, /profile push: expected 1 argument, got 0/],
    [['profile', 'push', '127.0.0.1:1/app:v1', '--user', 'nocolon', ...root], 2, /--user wants USER:PASS/],
    [['profile', 'push', '127.0.0.1:1/app:v1', '--platform', 'a/b/c/d', ...root], 2, /--platform/],
    [['profile', 'rm', 'x'], 2, /unknown command 'rm'/],
    [['profile', 'show', ...root], 2, /profile show: expected 1 argument, got 0/],
    [['profile', 'show', 'abc', ...root], 2, /not a profile key/],
    [['profile', 'show', 'a'.repeat(64), ...root], 2, /no profile a{64} under/],
    [['profile', 'import', path.join(dir, 'missing.json'), ...root], 2, /cannot read .*missing\.json: ENOENT/],
    [['profile', 'import', path.join(dir, 'bad.json'), ...root], 1, /bad\.json: profile version 2 is not 1/],
    [['profile', 'import', path.join(dir, 'big.json'), ...root], 1, /big\.json: profile larger than/],
  ];
  for (const [args, code, message] of cases) {
    const r = await stargaze(args);
    assert.equal(r.code, code, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, message, args.join(' '));
  }
  const empty = await stargaze(['profile', 'ls', ...root]);
  assert.equal(empty.stdout, 'KEY  LAYER  ENTRIES  BYTES  MODIFIED\n', 'no profiles yet: a header only');
});

test('import - refuses standard input past the bound once it has read that much, not after all of it', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-profile-cli-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const { spawn } = await import('node:child_process');
  const child = spawn(process.execPath, [CLI, 'profile', 'import', '-', '--root', path.join(dir, 'root')], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdin.on('error', () => undefined); // the command stops reading: later writes fail with EPIPE
  // Input that never ends (stdin stays open): the command must answer past MAX_PROFILE_FILE_BYTES, not wait for
  // an end that never comes (reading all of it first, it would hang until the test's timeout).
  const block = Buffer.alloc(1024 * 1024, 0x20);
  let written = 0;
  const feed = (): void => {
    while (written <= 4 * MAX_PROFILE_FILE_BYTES && child.stdin.writable) {
      written += block.length;
      if (!child.stdin.write(block)) return void child.stdin.once('drain', feed);
    }
  };
  feed();
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  assert.equal(code, 1);
  assert.match(stderr, /-: profile larger than/);
});
