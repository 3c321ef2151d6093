/**
 * Restart readiness: containerd reaches a restarted daemon at once, also on an empty root (a new node, a
 * wiped state directory), and also next to the FUSE server of the root before the wipe, still alive.
 *
 * containerd 1.6 redials a proxy plugin's socket while the file is missing for about a second, then sits in a
 * backoff of up to 3 s in which every call fails with "dial ... timeout". So the daemon must listen within
 * that first second of its restart and let the calls that come before it serves wait; each test here pulls
 * the moment the socket accepts connections, without waiting for containerd to reconnect.
 */
import assert from 'node:assert/strict';
import { readdir, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import {
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  buildBusyboxImage,
  convertToEstargz,
  fuseServerPid,
  processAlive,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  stopFuseServer,
  stopProcess,
  suiteScope,
  waitFor,
  type Containerd,
  type EstargzImage,
  type LogEntry,
  type Registry,
  type StargazeDaemon,
} from './harness';

const notRoot = process.getuid?.() !== 0;
const PROBE_PATH = '/restart.txt';
const PROBE_CONTENT = 'read after a restart\n';
const RPULL_TIMEOUT_MS = 120_000;
/** A FUSE server whose root was wiped and that serves nothing is gone within a sweep (10 s), not 30 s. */
const ORPHAN_EXIT_MS = 20_000;
/** Long enough for today's idle exit (30 s after its daemon, checked every 10 s) to happen too. */
const ORPHAN_WAIT_MS = 45_000;

function lazilyPrepared(entries: LogEntry[]): LogEntry[] {
  return entries.filter((e) => e['remote-snapshot-prepared'] === 'true' || e['remote-snapshot-prepared'] === true);
}

describe('restart readiness', { skip: notRoot && 'e2e tests need root' }, () => {
  const scope = suiteScope();
  let registry: Registry;
  let daemon: StargazeDaemon;
  let containerd: Containerd;
  let esgz: EstargzImage;
  /** Every FUSE server seen: the harness stops the one the root's pid file names, and these tests wipe it. */
  const fuseServers = new Set<number>();

  before(async () => {
    registry = await startRegistry({ scope });
    daemon = await startDaemon({ scope, plainHttpHosts: [registry.host], config: 'no_background_fetch = true\n' });
    scope.after(async () => {
      for (const pid of fuseServers) await stopProcess(pid);
    });
    containerd = await startContainerd({ scope, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    const image = await buildBusyboxImage({
      host: registry.host,
      repo: 'e2e/restart',
      tag: 'v1',
      extraFiles: [{ path: PROBE_PATH, content: PROBE_CONTENT }],
    });
    esgz = await convertToEstargz(containerd, image.ref, `${registry.host}/e2e/restart:v1-esgz`);
  });

  /**
   * containerd talks to the daemon: its connection is up, so a restart breaks it as on a node. After the test
   * before (a SIGKILL leaves a socket that refuses), containerd may still sit in its backoff: this is not what
   * is tested, so the pull is retried until it gets through.
   */
  const pullOnce = async (): Promise<void> => {
    const ns = containerd.newNamespace('before');
    await waitFor('a pull through the stargz snapshotter', async () => (await containerd.rpull(esgz.ref, { namespace: ns, allowFailure: true })).code === 0, {
      timeoutMs: 60_000,
      intervalMs: 500,
    });
    const pid = await fuseServerPid(daemon.root);
    if (pid !== undefined) fuseServers.add(pid);
  };

  /**
   * Pulls the image into a new namespace with `client`, then a container reads it. ctr-remote (Go) makes its
   * first snapshotter call within milliseconds; `stargaze rpull` spends a Node start before its first.
   */
  const pullAndRun = async (label: string, client: 'ctr-remote' | 'stargaze'): Promise<void> => {
    const ns = containerd.newNamespace(label);
    const pulled =
      client === 'ctr-remote'
        ? await containerd.rpull(esgz.ref, { namespace: ns, allowFailure: true })
        : await run(
            STARGAZE_COMMAND,
            ['rpull', '--address', containerd.address, '--namespace', ns, '--pull-address', daemon.pullAddress, '--plain-http', esgz.ref],
            { allowFailure: true, timeoutMs: RPULL_TIMEOUT_MS, env: STARGAZE_COMMAND_ENV },
          );
    const pid = await fuseServerPid(daemon.root);
    if (pid !== undefined) fuseServers.add(pid);
    assert.equal(pulled.code, 0, `${client} rpull right after the restart:\n${pulled.stdout}\n${pulled.stderr}`);
    assert.equal(lazilyPrepared(daemon.logs({ currentRunOnly: true })).length, esgz.layers.length, 'every layer mounted lazily');
    const r = await containerd.runContainer(esgz.ref, ['/bin/cat', PROBE_PATH], { namespace: ns, snapshotter: 'stargz' });
    assert.equal(r.stdout, PROBE_CONTENT);
  };

  test('restarted on an empty root, the daemon answers the ctr-remote rpull started when its socket appears', async () => {
    await pullOnce();
    // A new node: no FUSE server, nothing under the root. The FUSE server goes first, so that the daemon's
    // restart is as quick as a daemon restart is.
    await stopFuseServer(daemon.root);
    await daemon.stop();
    await daemon.unmountAll();
    await rm(daemon.root, { recursive: true, force: true });
    await daemon.restart({ until: 'socket' });
    await pullAndRun('empty-root', 'ctr-remote');
  });

  test('on a wiped root, next to the FUSE server of the root before, the daemon starts and pulls; the old server exits soon and leaves the new one alone', async (t) => {
    await pullOnce();
    const old = await fuseServerPid(daemon.root);
    assert.ok(old !== undefined, 'a FUSE server serves the root');
    t.after(() => stopProcess(old));
    // Wiped as an admin would: the mounts lazily unmounted (rm -r stops at them), then the directory removed.
    await daemon.stop();
    await daemon.unmountAll();
    await rm(daemon.root, { recursive: true, force: true });
    const wiped = Date.now();
    assert.ok(processAlive(old), 'the old FUSE server lingers');
    await daemon.restart({ until: 'socket' });
    await pullAndRun('wiped-root', 'stargaze');
    const current = await fuseServerPid(daemon.root);
    assert.ok(current !== undefined && current !== old, 'a new FUSE server serves the wiped root');

    await waitFor('the old FUSE server to exit', () => !processAlive(old), { timeoutMs: ORPHAN_WAIT_MS, intervalMs: 200 });
    const exitedAfterMs = Date.now() - wiped;
    assert.equal(await fuseServerPid(daemon.root), current, "the old server's exit left the new one's pid file");
    assert.ok((await stat(path.join(daemon.root, 'fuse', 'fuse-server.sock'))).isSocket(), "the old server's exit left the new one's socket");
    assert.ok(exitedAfterMs < ORPHAN_EXIT_MS, `the old server, unreachable and serving nothing, exited ${exitedAfterMs} ms after the wipe`);
    // The next restart finds the new server, with its mounts, and starts no other.
    await daemon.restart({ hard: true });
    assert.equal(daemon.logs({ currentRunOnly: true }).filter((e) => e.msg === 'started fuse server').length, 0, 'reconnected');
  });

  test('on a root wiped around live layer mounts, the daemon starts and pulls, and the old FUSE server keeps serving them', async (t) => {
    await pullOnce();
    const old = await fuseServerPid(daemon.root);
    assert.ok(old !== undefined, 'a FUSE server serves the root');
    t.after(() => stopProcess(old));
    await daemon.stop();
    const layerMounts = (await daemon.mounts()).filter((m) => m.fstype === 'fuse.stargaze');
    assert.ok(layerMounts.length > 0, 'layer mounts are up');
    // rm -r removes all it can and stops at the mounts (their files are read-only, their directories busy).
    await run('rm', ['-rf', daemon.root], { allowFailure: true, timeoutMs: 60_000 });
    await daemon.restart({ until: 'socket' });
    await pullAndRun('wiped-around-mounts', 'ctr-remote');
    // Nothing of the old root is deleted or unmounted by the start: the old server still serves its layers.
    assert.ok(processAlive(old), 'the old FUSE server serves live mounts: it stays');
    for (const m of layerMounts) assert.ok((await readdir(m.mountpoint)).includes('bin'), `${m.mountpoint} still served`);
  });
});
