/**
 * Restart readiness: containerd reaches a restarted daemon at once, also on an empty root (a new node, a
 * wiped state directory).
 *
 * containerd 1.6 redials a proxy plugin's socket while the file is missing for about a second, then sits in a
 * backoff of up to 3 s in which every call fails with "dial ... timeout". So the daemon must listen within
 * that first second of its restart and let the calls that come before it serves wait; each test here pulls
 * the moment the socket accepts connections, without waiting for containerd to reconnect.
 */
import assert from 'node:assert/strict';
import { rm } from 'node:fs/promises';
import { before, describe, test } from 'node:test';
import {
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  buildBusyboxImage,
  convertToEstargz,
  fuseServerPid,
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
});
