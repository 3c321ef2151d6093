/**
 * script/stargaze, the `stargaze` command: run for real with a stand-in for Node that prints what it was given.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';

const run = promisify(execFile);
const REPO_ROOT = path.resolve(__dirname, '..', '..', '..', '..');
const SCRIPT_DIR = path.join(REPO_ROOT, 'script');

describe('launcher', () => {
  let base: string;
  let env: NodeJS.ProcessEnv;
  before(async () => {
    base = await mkdtemp(path.join(tmpdir(), 'stargaze-launcher-'));
    const fakeNode = path.join(base, 'fake-node');
    await writeFile(fakeNode, '#!/bin/sh\necho "$*"\n');
    await chmod(fakeNode, 0o755);
    env = { PATH: process.env.PATH, STARGAZE_NODE: fakeNode };
  });
  after(async () => {
    await rm(base, { recursive: true, force: true });
  });

  it('finds the app beside itself however it is called: by path, relative, through a symlink (npm\'s bin link) or a linked directory', async () => {
    const link = path.join(base, 'stargaze');
    await symlink(path.join(SCRIPT_DIR, 'stargaze'), link);
    const linkedDir = path.join(base, 'bin');
    await symlink(SCRIPT_DIR, linkedDir);
    const cases: [string, string[], string][] = [
      [REPO_ROOT, [path.join(SCRIPT_DIR, 'stargaze')], `${SCRIPT_DIR}/../dist/src/cli.js`],
      [REPO_ROOT, ['script/stargaze'], 'script/../dist/src/cli.js'],
      [SCRIPT_DIR, ['./stargaze'], './../dist/src/cli.js'],
      [SCRIPT_DIR, ['sh', 'stargaze'], '../dist/src/cli.js'],
      [base, [link], `${SCRIPT_DIR}/../dist/src/cli.js`],
      // script/ itself reached through a link: its `..` is the app only once the link is resolved.
      [base, [path.join(linkedDir, 'stargaze')], `${SCRIPT_DIR}/../dist/src/cli.js`],
    ];
    for (const [cwd, [cmd, ...rest], cli] of cases) {
      const { stdout } = await run(cmd!, [...rest, '--version'], { cwd, env });
      assert.equal(stdout, `${cli} --version\n`, `${cmd} ${rest.join(' ')} in ${cwd}`);
      assert.equal(path.resolve(cwd, cli), path.join(REPO_ROOT, 'dist', 'src', 'cli.js'));
    }
  });

  it('says how to build when dist/ is missing', async () => {
    const copy = path.join(base, 'app', 'script');
    await run('mkdir', ['-p', copy]);
    await run('cp', [path.join(SCRIPT_DIR, 'stargaze'), copy]);
    await assert.rejects(run(path.join(copy, 'stargaze'), ['--version'], { env }), (err: { code: number; stderr: string }) => {
      assert.equal(err.code, 1);
      assert.equal(err.stderr, `stargaze: ${copy}/../dist/src/cli.js is missing (run 'npm run build' in ${copy}/..)\n`);
      return true;
    });
  });
});
