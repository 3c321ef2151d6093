/**
 * Each process loads only what it uses: at idle, the daemon and its FUSE server have not loaded the libraries
 * only the other process, or a configuration not in use, needs. What a process loads stays in its memory for
 * good (its code, its parsed data), and with two Node processes on every node that is most of stargaze's fixed
 * cost (`npm run bench -- layer-memory`, its floor). The lists come from the processes themselves
 * (harness/module-list-preload.ts), taken once the daemon serves.
 */
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import { fuseServerPid, makeTmpRoot, startDaemon, suiteScope, waitFor } from './harness';
import { MODULE_LIST_DIR_ENV } from './harness/module-list-preload';

const notRoot = process.getuid?.() !== 0;
const PRELOAD = path.join(__dirname, 'harness', 'module-list-preload.js');

/** Libraries (node_modules/<name>/) and our own folders (dist/src/<folder>/) each process must not load at idle. */
const NOT_IN_FUSE_SERVER = [
  // the daemon's: gRPC for containerd, the snapshotter's SQLite
  'node_modules/@grpc/grpc-js/',
  'node_modules/protobufjs/',
  'node_modules/better-sqlite3/',
  'dist/src/snapshot/',
  'dist/src/service/',
  'dist/src/containerd/',
  // only with [metrics_address]: prom-client, loaded when the metrics are served
  'node_modules/prom-client/',
  // only with [kubeconfig_keychain]: the kubeconfig's YAML parser
  'node_modules/yaml/',
  // `stargaze convert` only
  'node_modules/tar-stream/',
];
const NOT_IN_DAEMON = [
  // the FUSE server's: the mounts and the layers they serve
  'node_modules/fuse-native/',
  'node_modules/@bokuweb/zstd-wasm/',
  'dist/src/fuse/',
  'dist/src/metadata/',
  'dist/src/reader/',
  'dist/src/estargz/',
  'node_modules/prom-client/',
  'node_modules/yaml/',
  'node_modules/tar-stream/',
];

async function modulesOf(pid: number, dir: string): Promise<string[]> {
  process.kill(pid, 'SIGUSR2');
  const file = path.join(dir, `${pid}.txt`);
  let text = '';
  await waitFor(`the module list of process ${pid}`, async () => (text = await readFile(file, 'utf8').catch(() => '')) !== '', { timeoutMs: 10_000 });
  return text.split('\n').filter(Boolean);
}

function loadedAmong(modules: string[], forbidden: string[]): string[] {
  return forbidden.filter((prefix) => modules.some((m) => m.includes(`/${prefix}`)));
}

describe('module footprint', { skip: notRoot && 'e2e tests need root' }, () => {
  const scope = suiteScope();

  test('at idle, neither process has loaded what only the other one, or an unused configuration, needs', async () => {
    const dir = await makeTmpRoot('module-lists', scope);
    const daemon = await startDaemon({ scope, env: { NODE_OPTIONS: `--require ${PRELOAD}`, [MODULE_LIST_DIR_ENV]: dir } });
    const fuse = await fuseServerPid(daemon.root);
    assert.ok(fuse !== undefined, 'the daemon started its FUSE server');

    const daemonModules = await modulesOf(daemon.pid(), dir);
    const fuseModules = await modulesOf(fuse, dir);
    // the lists are real: each holds what its process does use
    assert.ok(daemonModules.some((m) => m.includes('/node_modules/@grpc/grpc-js/')), 'the daemon serves gRPC');
    assert.ok(fuseModules.some((m) => m.includes('/node_modules/fuse-native/')), 'the FUSE server loads fuse-native');

    assert.deepEqual(loadedAmong(fuseModules, NOT_IN_FUSE_SERVER), [], 'modules the FUSE server loaded at idle but does not use');
    assert.deepEqual(loadedAmong(daemonModules, NOT_IN_DAEMON), [], 'modules the daemon loaded at idle but does not use');
  });
});
