import assert from 'node:assert/strict';
import { fstatSync, openSync, closeSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { JOIN_LOCK_FD_ENV, JOIN_OUTPUT_ENV, handOverToJoiners, takeLauncherJoin } from '../../../src/containerd/launcher-join';

const KEY = 'ab'.repeat(32);

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

  it('writes nothing outside the private rpull directory, nor into one that is not private', async () => {
    const outside = path.join(base, 'elsewhere');
    await mkdir(outside, { mode: 0o700 });
    const output = path.join(outside, `argv-${KEY}.out`);
    const lockFd = openSync(path.join(outside, `argv-${KEY}.lock`), 'a');
    try {
      assert.equal(await handOverToJoiners({ output, lockFd }, 'joined\n', dir), false);
      await assert.rejects(stat(output), { code: 'ENOENT' });
      assert.equal(isOpen(lockFd), true);

      const open = path.join(base, 'open');
      await mkdir(open, { mode: 0o777 });
      const inOpen = path.join(open, `argv-${KEY}.out`);
      await writeFile(path.join(open, `argv-${KEY}.lock`), '');
      assert.equal(await handOverToJoiners({ output: inOpen, lockFd }, 'joined\n', open), false);
      await assert.rejects(stat(inOpen), { code: 'ENOENT' });
    } finally {
      closeSync(lockFd);
    }
  });
});
