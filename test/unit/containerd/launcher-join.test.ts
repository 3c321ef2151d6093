import assert from 'node:assert/strict';
import { fstatSync, openSync, closeSync } from 'node:fs';
import { execFile } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { promisify } from 'node:util';
import { JOIN_LOCK_FD_ENV, JOIN_OUTPUT_ENV, handOverToJoiners, takeLauncherJoin } from '../../../src/containerd/launcher-join';

const KEY = 'ab'.repeat(32);
const execFileAsync = promisify(execFile);

/** Whether `fd` is still open in this process. */
function isOpen(fd: number): boolean {
  try {
    fstatSync(fd);
    return true;
  } catch {
    return false;
  }
}

describe('launcher join, Node side', () => {
  let base: string;
  let dir: string;
  before(async () => {
    base = await mkdtemp(path.join(tmpdir(), 'stargaze-launcher-join-'));
    dir = path.join(base, 'rpull');
    await mkdir(dir, { mode: 0o700 });
  });
  after(async () => {
    await rm(base, { recursive: true, force: true });
  });

  it('takes the variables out of the environment and accepts only the launcher\'s names and a descriptor past stdio', () => {
    const output = path.join(dir, `argv-${KEY}.out`);
    const env: NodeJS.ProcessEnv = { [JOIN_OUTPUT_ENV]: output, [JOIN_LOCK_FD_ENV]: '9', OTHER: 'x' };
    assert.deepEqual(takeLauncherJoin(env), { output, lockFd: 9 });
    assert.deepEqual(env, { OTHER: 'x' }, 'children must not see them');
    assert.equal(takeLauncherJoin({}), undefined);
    assert.equal(takeLauncherJoin({ [JOIN_OUTPUT_ENV]: output, [JOIN_LOCK_FD_ENV]: '2' }), undefined);
    assert.equal(takeLauncherJoin({ [JOIN_OUTPUT_ENV]: output, [JOIN_LOCK_FD_ENV]: '9x' }), undefined);
    assert.equal(takeLauncherJoin({ [JOIN_OUTPUT_ENV]: path.join(dir, 'passwd'), [JOIN_LOCK_FD_ENV]: '9' }), undefined);
  });

  it('writes the output (0600) and closes the lock descriptor, which wakes the joiners', async () => {
    const output = path.join(dir, `argv-${KEY}.out`);
    const lockFd = openSync(path.join(dir, `argv-${KEY}.lock`), 'a');
    assert.equal(await handOverToJoiners({ output, lockFd }, 'joined\n', dir), true);
    assert.equal(await readFile(output, 'utf8'), 'joined\n');
    assert.equal((await stat(output)).mode & 0o777, 0o600);
    assert.equal(isOpen(lockFd), false);
    assert.ok(!(await readdir(dir)).some((f) => f.endsWith('.tmp')));
  });

  it('writes nothing and closes nothing when the descriptor is not the lock file beside the output', async () => {
    const key = 'cd'.repeat(32);
    const output = path.join(dir, `argv-${key}.out`);
    await writeFile(path.join(dir, `argv-${key}.lock`), '');
    const other = openSync(path.join(base, 'unrelated'), 'a');
    try {
      assert.equal(await handOverToJoiners({ output, lockFd: other }, 'joined\n', dir), false);
      assert.equal(isOpen(other), true);
      await assert.rejects(stat(output), { code: 'ENOENT' });
    } finally {
      closeSync(other);
    }
  });

  it('writes nothing outside the rpull directory it was given, and leaves that descriptor alone', async () => {
    const outside = path.join(base, 'elsewhere');
    await mkdir(outside, { mode: 0o700 });
    const output = path.join(outside, `argv-${KEY}.out`);
    const lockFd = openSync(path.join(outside, `argv-${KEY}.lock`), 'a');
    try {
      assert.equal(await handOverToJoiners({ output, lockFd }, 'joined\n', dir), false);
      await assert.rejects(stat(output), { code: 'ENOENT' });
      assert.equal(isOpen(lockFd), true);
    } finally {
      closeSync(lockFd);
    }
  });

  it('writes nothing into a directory that is not private, but still wakes the joiners', async () => {
    const open = path.join(base, 'open');
    await mkdir(open);
    await chmod(open, 0o755);
    const output = path.join(open, `argv-${KEY}.out`);
    const lockFd = openSync(path.join(open, `argv-${KEY}.lock`), 'a');
    assert.equal(await handOverToJoiners({ output, lockFd }, 'joined\n', open), false);
    await assert.rejects(stat(output), { code: 'ENOENT' });
    assert.equal(isOpen(lockFd), false);
  });

  it('a directory too long for lock sockets (which Node\'s own collapse needs) still serves the launcher', async () => {
    const long = path.join(base, 'x'.repeat(100));
    await mkdir(long, { mode: 0o700 });
    const output = path.join(long, `argv-${KEY}.out`);
    const lockFd = openSync(path.join(long, `argv-${KEY}.lock`), 'a');
    assert.equal(await handOverToJoiners({ output, lockFd }, 'joined\n', long), true);
    assert.equal(await readFile(output, 'utf8'), 'joined\n');
    assert.equal(isOpen(lockFd), false);
  });

  it('children of a Node started with the lock descriptor do not inherit it (Node marks it close-on-exec)', async () => {
    // What the launcher relies on: nothing Node runs (a credential helper that leaves a process behind) can
    // keep the lock after Node is gone.
    const lock = path.join(dir, 'inherit.lock');
    const script = `require('child_process').execFile('sh', ['-c', 'test -e /proc/self/fd/9 && echo inherited || echo not'], (e, out) => process.stdout.write(out))`;
    const { stdout } = await execFileAsync('sh', ['-c', `exec 9>>"$1"; test -e /proc/self/fd/9 || exit 3; exec "$2" -e "$3"`, 'sh', lock, process.execPath, script]);
    assert.equal(stdout, 'not\n');
  });
});
