/**
 * containerd's own snapshotter test suite (snapshots/testsuite from Debian's containerd 1.6 sources),
 * driven through containerd's proxy snapshotter client against the daemon's gRPC service: what the ten
 * RPCs mean is defined there, not by us. script/conformance.sh builds and runs it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { REPO_ROOT, run } from './harness';

const isRoot = process.getuid?.() === 0;

test('containerd snapshots/testsuite passes against the daemon', { skip: !isRoot && 'needs root (overlay mounts)', timeout: 900_000 }, async () => {
  const result = await run('bash', [path.join(REPO_ROOT, 'script', 'conformance.sh')], {
    env: { MODE: 'both', SKIP_BUILD: '1' },
    timeoutMs: 840_000,
    allowFailure: true,
  });
  const output = result.stdout + result.stderr;
  const summaries = output.split('\n').filter((l) => /^conformance \((per-case|shared)\): \d+ passed/.test(l));
  assert.equal(summaries.length, 2, `expected two suite summaries:\n${output}`);
  for (const line of summaries) assert.match(line, /: [1-9]\d* passed, 0 failed/, output);
  assert.equal(result.code, 0, output);
});
