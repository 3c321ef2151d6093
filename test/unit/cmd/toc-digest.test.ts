import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { makeTar, toEstargz } from '../estargz/fixture';

const run = promisify(execFile);
const CLI = path.resolve(__dirname, '..', '..', '..', 'src', 'cli.js');

function runWithStdin(args: string[], input: Buffer): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args]);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(input);
  });
}

test('stargaze toc-digest prints the TOC digest of a layer, from a file or stdin', async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-toc-digest-test-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const tar = await makeTar([{ name: 'a.txt', content: 'alpha\n' }, { name: 'b/', type: 'directory' }]);
  const { blob, result } = await toEstargz(tar);
  const file = path.join(dir, 'layer.tar.gz');
  await writeFile(file, blob);

  assert.equal((await run(process.execPath, [CLI, 'toc-digest', file])).stdout, `${result.tocDigest}\n`);
  const piped = await runWithStdin(['toc-digest', '-'], blob);
  assert.equal(piped.code, 0, piped.stderr);
  assert.equal(piped.stdout, `${result.tocDigest}\n`);

  const plain = path.join(dir, 'plain.tar.gz');
  await writeFile(plain, gzipSync(tar));
  const err = await run(process.execPath, [CLI, 'toc-digest', plain]).then(
    () => assert.fail('a plain gzip layer has no TOC'),
    (e: { code: number; stderr: string }) => e,
  );
  assert.equal(err.code, 1);
  assert.match(err.stderr, /^stargaze: .*not an eStargz layer/);
});
