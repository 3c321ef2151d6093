/**
 * script/stargaze's rpull join: concurrent `stargaze rpull`s with the same arguments wait for the first in the
 * shell, without starting Node. The launcher is run for real (sh, flock, stat, sha256sum); Node is a stand-in
 * script that plays the first pull (it logs each start, waits until the test releases it, then leaves the
 * joiners' output or fails), so each case happens in the order it names, however loaded the machine is.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, mkdir, mkdtemp, readFile, readdir, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..', '..');
const LAUNCHER = path.join(REPO_ROOT, 'script', 'stargaze');

/** Node's stand-in: logs "<pid> <output var or ->", waits for the file FAKE_RELEASE, then succeeds or fails as FAKE_MODE says. */
const FAKE_NODE = `#!/bin/sh
echo "$$ \${STARGAZE_RPULL_JOIN_OUTPUT:--}" >>"$FAKE_LOG"
while [ -n "\${FAKE_RELEASE:-}" ] && [ ! -e "$FAKE_RELEASE" ]; do sleep 0.02; done
if [ "$FAKE_MODE" = fail ]; then echo "pull failed in $$" >&2; exit 1; fi
if [ -n "\${STARGAZE_RPULL_JOIN_OUTPUT:-}" ]; then printf 'joined the pull of %s\\n' "$$" >"$STARGAZE_RPULL_JOIN_OUTPUT"; fi
echo "pulled by $$"
`;

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

describe('launcher rpull join', () => {
  let base: string;
  let fakeNode: string;
  let cwd: string;
  let n = 0;

  before(async () => {
    base = await mkdtemp(path.join(tmpdir(), 'stargaze-launcher-'));
    fakeNode = path.join(base, 'fake-node');
    await writeFile(fakeNode, FAKE_NODE);
    await chmod(fakeNode, 0o755);
    cwd = path.join(base, 'cwd');
    await mkdir(cwd);
  });
  after(async () => {
    await rm(base, { recursive: true, force: true });
  });

  /** A fresh private rpull directory and start log for one case. */
  async function fresh(mode = 0o700): Promise<{ dir: string; log: string; release: string }> {
    n++;
    const dir = path.join(base, `rpull-${n}`);
    await mkdir(dir, { mode });
    await chmod(dir, mode);
    return { dir, log: path.join(base, `starts-${n}.log`), release: path.join(base, `release-${n}`) };
  }

  /** Polls `cond` every 20 ms, for 10 s at most. */
  async function until(what: string, cond: () => Promise<boolean>): Promise<void> {
    for (let i = 0; !(await cond()); i++) {
      assert.ok(i < 500, `timed out waiting until ${what}`);
      await delay(20);
    }
  }

  /** Launchers of ours waiting for a pull in progress: `flock -s` processes in our working directory. */
  async function waitingJoiners(): Promise<number> {
    let count = 0;
    for (const pid of await readdir('/proc')) {
      if (!/^\d+$/.test(pid)) continue;
      try {
        const [cmdline, dirOf] = await Promise.all([readFile(`/proc/${pid}/cmdline`, 'utf8'), readlink(`/proc/${pid}/cwd`)]);
        if (dirOf === cwd && cmdline.startsWith('flock\0-s\0')) count++;
      } catch {
        // gone meanwhile
      }
    }
    return count;
  }

  function launch(args: string[], env: Record<string, string>): Promise<Result> {
    return new Promise((resolve, reject) => {
      const child = spawn(LAUNCHER, args, {
        cwd,
        env: { PATH: process.env.PATH, STARGAZE_NODE: fakeNode, ...env },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('error', reject);
      child.on('close', (code) => resolve({ code, stdout, stderr }));
    });
  }

  /** The stand-in's starts: [pid, output path or '-'] each. */
  async function starts(log: string): Promise<[string, string][]> {
    const text = await readFile(log, 'utf8').catch(() => '');
    return text
      .split('\n')
      .filter((l) => l !== '')
      .map((l) => l.split(' ') as [string, string]);
  }

  /** The launcher's file names for these arguments run in `cwd`. */
  function argvFile(dir: string, args: string[], suffix: string): string {
    const key = createHash('sha256').update([cwd, ...args].map((a) => `${a}\0`).join('')).digest('hex');
    return path.join(dir, `argv-${key}${suffix}`);
  }

  /**
   * Starts the first pull and waits until the stand-in runs (so it holds the lock), then the others, and
   * releases the first once each of them waits for it or runs a stand-in of its own.
   */
  async function firstThenOthers(args: string[], env: Record<string, string>, log: string, release: string, others: number): Promise<Result[]> {
    const first = launch(args, { ...env, FAKE_RELEASE: release });
    await until('the first pull started', async () => (await starts(log)).length === 1);
    const rest = Array.from({ length: others }, () => launch(args, { ...env, FAKE_RELEASE: release }));
    await until('the others wait or run', async () => (await starts(log)).length + (await waitingJoiners()) === 1 + others);
    await writeFile(release, '');
    return Promise.all([first, ...rest]);
  }

  it('pulls with the same arguments print the first one\'s output without starting Node', async () => {
    const { dir, log, release } = await fresh();
    const args = ['rpull', '--namespace', 'ns', 'registry.example/app:v1'];
    const env = { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'succeed' };
    const results = await firstThenOthers(args, env, log, release, 4);
    const started = await starts(log);
    assert.equal(started.length, 1, `Node started ${started.length} times`);
    const [leaderPid, output] = started[0]!;
    assert.equal(output, argvFile(dir, args, '.out'), 'the first is told where to leave its output');
    assert.deepEqual(results.map((r) => r.code), [0, 0, 0, 0, 0]);
    assert.equal(results[0]!.stdout, `pulled by ${leaderPid}\n`);
    for (const r of results.slice(1)) assert.equal(r.stdout, `joined the pull of ${leaderPid}\n`);
    const entries = (await readdir(dir)).sort();
    assert.deepEqual(entries, [path.basename(argvFile(dir, args, '.lock')), path.basename(argvFile(dir, args, '.out'))].sort());
  });

  it('a missing directory is made, private, and used', async () => {
    const { dir: parent, log, release } = await fresh();
    const dir = path.join(parent, 'made', 'here');
    const args = ['rpull', 'registry.example/app:v0'];
    const env = { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'succeed' };
    const results = await firstThenOthers(args, env, log, release, 2);
    assert.equal((await stat(dir)).mode & 0o777, 0o700);
    assert.equal((await stat(path.dirname(dir))).mode & 0o777, 0o700, 'every directory made is private, as Node makes them');
    assert.equal((await starts(log)).length, 1);
    for (const r of results.slice(1)) assert.match(r.stdout, /^joined the pull of \d+\n$/);
  });

  it('when the first pull fails, the others each run Node (and report for themselves)', async () => {
    const { dir, log, release } = await fresh();
    const args = ['rpull', 'registry.example/missing:v1'];
    const env = { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'fail' };
    const results = await firstThenOthers(args, env, log, release, 3);
    const started = await starts(log);
    assert.equal(started.length, 4);
    // Only the first was handed the output: the others run Node as a plain rpull.
    assert.deepEqual(started.slice(1).map(([, out]) => out), ['-', '-', '-']);
    for (const r of results) {
      assert.equal(r.code, 1);
      assert.match(r.stderr, /^pull failed in \d+\n$/);
    }
  });

  it('an output that was there before the joiner started waiting is not taken', async () => {
    const { dir, log, release } = await fresh();
    const args = ['rpull', 'registry.example/app:v2'];
    const env = { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'succeed' };
    const first = launch(args, { ...env, FAKE_RELEASE: release });
    await until('the first pull started', async () => (await starts(log)).length === 1);
    // What an earlier pull would have left, appearing while the first still runs (it removed its own at start).
    await writeFile(argvFile(dir, args, '.out'), 'an earlier pull\n');
    const joiner = await launch(args, env);
    await writeFile(release, '');
    await first;
    assert.equal((await starts(log)).length, 2, 'the joiner ran Node');
    assert.match(joiner.stdout, /^pulled by \d+\n$/);
  });

  it('the first pull removes an earlier output, so its joiners print its own', async () => {
    const { dir, log, release } = await fresh();
    const args = ['rpull', 'registry.example/app:v3'];
    await writeFile(argvFile(dir, args, '.out'), 'an earlier pull\n');
    const env = { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'succeed' };
    const [first, joiner] = await firstThenOthers(args, env, log, release, 1);
    const [[leaderPid]] = (await starts(log)) as [[string, string]];
    assert.equal(first!.stdout, `pulled by ${leaderPid}\n`);
    assert.equal(joiner!.stdout, `joined the pull of ${leaderPid}\n`);
  });

  it('different arguments are not joined here (Node\'s own collapse decides)', async () => {
    const { dir, log, release } = await fresh();
    const env = { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'succeed' };
    const first = launch(['rpull', 'registry.example/app:v4'], { ...env, FAKE_RELEASE: release });
    await until('the first pull started', async () => (await starts(log)).length === 1);
    const other = await launch(['rpull', '--namespace', 'other', 'registry.example/app:v4'], env);
    await writeFile(release, '');
    await first;
    assert.equal((await starts(log)).length, 2);
    assert.match(other.stdout, /^pulled by \d+\n$/);
  });

  it('a directory that is not private is not used: every pull runs Node and nothing is written there', async () => {
    const { dir, log, release } = await fresh(0o755);
    const args = ['rpull', 'registry.example/app:v5'];
    const env = { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'succeed' };
    const results = await firstThenOthers(args, env, log, release, 2);
    const started = await starts(log);
    assert.equal(started.length, 3);
    assert.deepEqual(started.map(([, out]) => out), ['-', '-', '-']);
    for (const r of results) assert.match(r.stdout, /^pulled by \d+\n$/);
    assert.deepEqual(await readdir(dir), []);
  });

  it('a lock file that cannot be opened skips the join: the pull runs Node as usual', async () => {
    const { dir, log } = await fresh();
    const args = ['rpull', 'registry.example/app:v6'];
    await mkdir(argvFile(dir, args, '.lock'));
    const r = await launch(args, { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'succeed' });
    assert.equal(r.code, 0);
    assert.equal(r.stderr, '');
    assert.match(r.stdout, /^pulled by \d+\n$/);
    assert.deepEqual((await starts(log)).map(([, out]) => out), ['-']);
  });

  it('other subcommands, and variables from the caller, are left alone', async () => {
    const { dir, log } = await fresh();
    // A caller cannot make Node write an output: the launcher drops these unless it set them itself.
    const env = { STARGAZE_RPULL_DIR: dir, FAKE_LOG: log, FAKE_MODE: 'succeed', STARGAZE_RPULL_JOIN_OUTPUT: path.join(dir, 'x'), STARGAZE_RPULL_JOIN_LOCK_FD: '9' };
    const r = await launch(['convert', 'a', 'b'], env);
    assert.equal(r.code, 0);
    assert.deepEqual((await starts(log)).map(([, out]) => out), ['-']);
    assert.deepEqual(await readdir(dir), []);
  });
});
