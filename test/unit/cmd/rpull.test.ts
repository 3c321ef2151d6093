import assert from 'node:assert/strict';
import os from 'node:os';
import path from 'node:path';
import { describe, it, test } from 'node:test';
import { ProgressPrinter, joinedOutput, parseRpullArgs, printJoined, pullRequestOf, type RpullArgs } from '../../../src/cmd/rpull';
import type { CollapsedPull } from '../../../src/containerd/pull-collapse';
import type { PullEvent } from '../../../src/containerd/pull';

/** A non-terminal stdout that keeps the lines. */
function sink(): { out: NodeJS.WriteStream; lines: () => string[] } {
  let text = '';
  const out = { columns: 80, write: (s: string) => ((text += s), true) } as unknown as NodeJS.WriteStream;
  return { out, lines: () => text.split('\n').filter((l) => l !== '') };
}

const MANIFEST = `sha256:${'a'.repeat(64)}`;
const LAYERS = [`sha256:${'b'.repeat(64)}`, `sha256:${'c'.repeat(64)}`];

test('a pull that joined a concurrent one prints what a pull finding every layer present prints, and says it joined', () => {
  const joined: CollapsedPull = { name: 'registry.example/app:v1', manifestDigest: MANIFEST, platform: 'linux/amd64', layers: LAYERS };
  const j = sink();
  printJoined(new ProgressPrinter(j.out, false), joined, 42);

  // The same image pulled for real with every layer already there, through the normal printer.
  const n = sink();
  const normal = new ProgressPrinter(n.out, false);
  const events: PullEvent[] = [
    { type: 'resolved', name: joined.name, target: { mediaType: '', digest: MANIFEST, size: 1 }, manifest: { mediaType: '', digest: MANIFEST, size: 1 }, platform: 'linux/amd64', layers: 2 },
    ...LAYERS.flatMap((digest, index): PullEvent[] => [
      { type: 'layer-start', index, digest, size: 10 },
      { type: 'layer-done', index, digest, outcome: 'present', bytes: 0, ms: 42 },
    ]),
  ];
  for (const e of events) normal.event(e);
  normal.done(joined.name, LAYERS.map(() => ({ outcome: 'present' as const, bytes: 0 })), 42);

  const expected = n.lines();
  assert.deepEqual(j.lines(), [expected[0], 'joined a concurrent rpull of the same image', ...expected.slice(1)]);
  assert.match(expected[0] ?? '', /^registry\.example\/app:v1: sha256:aaaaaaaaaaaa \(linux\/amd64\), 2 layers$/);
  assert.match(expected.at(-1) ?? '', /^done: registry\.example\/app:v1 2 layers \(0 lazy, 0 fetched, 2 already present\), 0 bytes fetched in 42ms$/);
});

test("what the launcher's joiners print is a joined pull's lines, as one string", () => {
  const joined: CollapsedPull = { name: 'registry.example/app:v1', manifestDigest: MANIFEST, platform: undefined, layers: LAYERS };
  const j = sink();
  printJoined(new ProgressPrinter(j.out, false), joined, 7);
  const text = joinedOutput(joined, 7);
  assert.ok(text.endsWith('\n'));
  assert.deepEqual(text.split('\n').slice(0, -1), j.lines());
  assert.equal(text.split('\n').length, 2 + LAYERS.length + 2);
});

describe('pullRequestOf', () => {
  const args = (over: Partial<RpullArgs> = {}): RpullArgs => ({
    ref: 'example.com/app:v1',
    address: 'run/containerd.sock',
    namespace: 'ns',
    snapshotter: 'stargz',
    plainHttp: true,
    hostsDir: 'certs.d',
    user: undefined,
    platform: undefined,
    prefetchBytes: 5,
    pullAddress: '/run/stargaze/pull.sock',
    ...over,
  });

  it("makes every path absolute (the daemon's working directory is not ours) and names our docker config", () => {
    const req = pullRequestOf(args(), { os: 'linux', architecture: 'arm64', variant: 'v8' }, { DOCKER_CONFIG: 'dockercfg' });
    assert.equal(req.address, path.resolve('run/containerd.sock'));
    assert.equal(req.hostsDir, path.resolve('certs.d'));
    assert.equal(req.dockerConfigDir, path.resolve('dockercfg'));
    assert.deepEqual(req.platform, { os: 'linux', architecture: 'arm64', variant: 'v8' });
    assert.equal(req.plainHttp, true);
    assert.equal(req.prefetchBytes, 5);
  });

  it('without DOCKER_CONFIG names ~/.docker, as the docker CLI does', () => {
    assert.equal(pullRequestOf(args(), { os: 'linux', architecture: 'amd64' }, {}).dockerConfigDir, path.join(os.homedir(), '.docker'));
    assert.equal(pullRequestOf(args(), { os: 'linux', architecture: 'amd64' }, { DOCKER_CONFIG: '' }).dockerConfigDir, path.join(os.homedir(), '.docker'));
  });

  it("takes --pull-address, '' meaning pull in this process", () => {
    assert.equal(parseRpullArgs(['--pull-address', '', 'example.com/app:v1'])?.pullAddress, '');
    assert.equal(parseRpullArgs(['example.com/app:v1'])?.pullAddress, '/run/stargaze/pull.sock');
  });
});
