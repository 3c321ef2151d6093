/**
 * Private images under Kubernetes (`[cri_keychain]`): kubelet hands the pod's pull secret to CRI, not to
 * snapshotters. With `[cri_keychain] enable_keychain = true` the daemon serves `runtime.v1.ImageService`
 * on its own socket (kubelet's `--image-service-endpoint`), forwards every call to containerd, and keeps
 * the credentials of each PullImage (in a 0600 file under its root) for the FUSE server, which fetches
 * the layers lazily with them.
 *
 * The registry here checks basic auth (htpasswd) and the daemon has no docker config.json: the only
 * credentials it can get are those of the CRI requests. After a restart of both the daemon and its FUSE
 * server, a pull sent to containerd directly (the daemon learns nothing new) of another image of the
 * same private repository, sharing no layer, is still lazy: the credentials came back from the file.
 * The control: the same pull sent to containerd before the daemon learned any credentials is not lazy.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, readFile, stat, symlink } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import {
  DEFAULT_CLI_PATH,
  REPO_ROOT,
  buildBusyboxImage,
  makeTmpRoot,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  waitFor,
  writePlainHttpHostConfig,
  type Containerd,
  type LogEntry,
  type StargazeDaemon,
} from './harness';
import { criConfig } from './harness/cri-config';
import { bcryptLine, startRegistry as startAuthRegistry, type RunningRegistry } from '../unit/remote/registry-harness';

const execFileAsync = promisify(execFile);
const notRoot = process.getuid?.() !== 0;
const PREPARED = 'remote-snapshot-prepared';
const CALL_TIMEOUT_MS = 90_000;
const USER = 'kube';
const PASSWORD = 'from-a-pull-secret';
const REPO = 'private/app';

type Wire = Record<string, unknown>;
type UnaryMethod = (req: Wire, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res?: Wire) => void) => unknown;

/** A CRI ImageService client on a unix socket. */
function imageService(socket: string): { call<T = Wire>(method: string, req: Wire): Promise<T>; close(): void } {
  const def = protoLoader.loadSync('runtime/v1/api.proto', {
    includeDirs: [path.join(REPO_ROOT, 'proto')],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const pkg = grpc.loadPackageDefinition(def) as unknown as { runtime: { v1: { ImageService: grpc.ServiceClientConstructor } } };
  const client = new pkg.runtime.v1.ImageService(`unix://${socket}`, grpc.credentials.createInsecure());
  return {
    call: <T,>(method: string, req: Wire) =>
      new Promise<T>((resolve, reject) => {
        const fn = (client as unknown as Record<string, UnaryMethod>)[method]!;
        fn.call(client, req, new grpc.Metadata(), { deadline: Date.now() + CALL_TIMEOUT_MS }, (err, res) =>
          err ? reject(new Error(`CRI ImageService/${method} via ${socket}: ${err.message}`)) : resolve(res as T),
        );
      }),
    close: () => client.close(),
  };
}

function prepared(entries: LogEntry[], value: 'true' | 'false'): LogEntry[] {
  return entries.filter((e) => e[PREPARED] === value);
}

/** The FUSE server outlives daemon restarts; stopping it too makes the restarted pair start from files only. */
async function stopFuseServer(root: string): Promise<void> {
  const pid = Number(await readFile(path.join(root, 'fuse', 'fuse-server.pid'), 'utf8'));
  assert.ok(Number.isInteger(pid) && pid > 1, 'the FUSE server wrote its pid');
  process.kill(pid, 'SIGTERM');
  await waitFor(
    'the FUSE server to exit',
    () => {
      try {
        process.kill(pid, 0);
        return false;
      } catch {
        return true;
      }
    },
    { timeoutMs: 15_000, intervalMs: 100 },
  );
}

const MODES = [
  { name: 'FUSE server, proxy on the daemon socket', fuseManager: true, ownListenPath: false },
  { name: '[fuse_manager] enable = false, proxy on its own listen_path', fuseManager: false, ownListenPath: true },
];

for (const mode of MODES) {
  describe(`private images under Kubernetes, CRI keychain (${mode.name})`, { skip: notRoot && 'e2e tests need root' }, () => {
    const cleanup = suiteScope();
    let registry: RunningRegistry;
    let daemon: StargazeDaemon;
    let containerd: Containerd;
    let workDir: string;
    /** Where the daemon serves the CRI image-service proxy. */
    let proxySocket: string;
    const refs: string[] = [];
    const layerCounts: number[] = [];

    before(async () => {
      const htpasswd = await bcryptLine(USER, PASSWORD);
      assert.ok(htpasswd, 'htpasswd (apache2-utils) makes a bcrypt line');
      registry = await startAuthRegistry({ htpasswdLine: htpasswd });
      cleanup.after(() => registry.stop());
      const anonymous = await fetch(`http://${registry.host}/v2/`);
      await anonymous.arrayBuffer();
      assert.equal(anonymous.status, 401, 'the registry wants credentials');

      // Two images of one private repository sharing no layer (each base layer has its own file), built in
      // a public scratch registry and converted into the private one with credentials.
      const scratch = await startRegistry({ scope: cleanup });
      for (const [i, tag] of ['v0', 'v1', 'v2'].entries()) {
        const built = await buildBusyboxImage({
          host: scratch.host,
          repo: 'e2e/private-src',
          tag,
          extraFiles: [{ path: `/private-${tag}.txt`, content: `private ${tag}\n` }],
          layers: [[{ path: `/upper-${tag}.txt`, content: `upper ${tag} ${i}\n` }]],
        });
        const ref = `${registry.host}/${REPO}:${tag}`;
        await execFileAsync(process.execPath, [DEFAULT_CLI_PATH, 'convert', '--quiet', '--plain-http', '--dst-user', `${USER}:${PASSWORD}`, built.ref, ref]);
        refs.push(ref);
        layerCounts.push(built.layers.length);
      }

      workDir = await makeTmpRoot('private-images', cleanup);
      const hostsDir = path.join(workDir, 'certs.d');
      await writePlainHttpHostConfig(hostsDir, registry.host);
      // containerd's socket is known only once it runs, after the daemon: the config names a link to it
      const containerdLink = path.join(workDir, 'containerd.sock');
      const dockerConfig = path.join(workDir, 'no-docker-config');
      await mkdir(dockerConfig);
      daemon = await startDaemon({
        scope: cleanup,
        plainHttpHosts: [registry.host],
        env: { DOCKER_CONFIG: dockerConfig },
        config: [
          'no_background_fetch = true',
          '[cri_keychain]',
          'enable_keychain = true',
          `image_service_path = ${JSON.stringify(containerdLink)}`,
          ...(mode.ownListenPath ? [`listen_path = ${JSON.stringify(path.join(workDir, 'cri-proxy.sock'))}`] : []),
          '[fuse_manager]',
          `enable = ${mode.fuseManager}`,
          '',
        ].join('\n'),
      });
      containerd = await startContainerd({
        scope: cleanup,
        stargazeAddress: daemon.address,
        stargazeRoot: daemon.root,
        enableCri: true,
        // No pod runs here: the sandbox image is never pulled.
        extraConfig: criConfig({
          sandboxImage: '127.0.0.1:1/none/pause:v1',
          hostsDir,
          runcRoot: path.join(workDir, 'runc'),
          cniConfDir: path.join(workDir, 'cni'),
        }),
      });
      await symlink(containerd.address, containerdLink);
      proxySocket = mode.ownListenPath ? path.join(workDir, 'cri-proxy.sock') : daemon.address;
      assert.equal(((await stat(proxySocket)).mode & 0o777).toString(8), '600', 'the proxy socket is for root only');
    });

    // The control: the same kind of pull, but sent to containerd directly before the daemon learned anything.
    test('without the proxy, the daemon has no credentials: containerd downloads the layers itself', async (t) => {
      const direct = imageService(containerd.address);
      t.after(() => direct.close());
      const before = { lazy: prepared(daemon.logs(), 'true').length, eager: prepared(daemon.logs(), 'false').length };
      const pulled = await direct.call<{ image_ref: string }>('PullImage', {
        image: { image: refs[0] },
        auth: { username: USER, password: PASSWORD },
      });
      assert.match(pulled.image_ref, /^sha256:[0-9a-f]{64}$/);
      assert.equal(prepared(daemon.logs(), 'true').length - before.lazy, 0, 'no remote snapshot without credentials');
      assert.equal(prepared(daemon.logs(), 'false').length - before.eager, layerCounts[0], 'every layer fell back');
    });

    test("a CRI PullImage with credentials sent to the daemon's proxy is lazy, and the credentials are kept 0600", async (t) => {
      const viaDaemon = imageService(proxySocket);
      t.after(() => viaDaemon.close());
      const before = { lazy: prepared(daemon.logs(), 'true').length, eager: prepared(daemon.logs(), 'false').length };

      const pulled = await viaDaemon.call<{ image_ref: string }>('PullImage', {
        image: { image: refs[1] },
        auth: { username: USER, password: PASSWORD },
      });
      assert.match(pulled.image_ref, /^sha256:[0-9a-f]{64}$/);
      assert.equal(prepared(daemon.logs(), 'true').length - before.lazy, layerCounts[1], 'every layer is a remote snapshot');
      assert.equal(prepared(daemon.logs(), 'false').length - before.eager, 0, 'no layer fell back to a normal pull');
      const fuse = (await daemon.mounts()).filter((m) => m.fstype === 'fuse.stargaze');
      assert.equal(fuse.length, layerCounts[1], 'each layer is a FUSE mount');

      // the proxy answers every ImageService call, as containerd does
      const status = await viaDaemon.call<{ image: { id: string } | null }>('ImageStatus', { image: { image: refs[1] } });
      assert.equal(status.image?.id, pulled.image_ref);

      const dir = path.join(daemon.root, 'cri-keychain');
      const file = path.join(dir, 'cri-credentials.json');
      assert.equal(((await stat(dir)).mode & 0o777).toString(8), '700');
      assert.equal(((await stat(file)).mode & 0o777).toString(8), '600');
      const stored = JSON.parse(await readFile(file, 'utf8')) as { images: Record<string, unknown> };
      assert.deepEqual(Object.keys(stored.images), [`${registry.host}/${REPO}`]);
    });

    test('after a restart of the daemon and its FUSE server, another tag of the repository is still lazy', async (t) => {
      await daemon.stop();
      if (mode.fuseManager) await stopFuseServer(daemon.root);
      await daemon.restart();
      // the restored snapshots of the first image were mounted again by the new FUSE server
      const restored = (await daemon.mounts()).filter((m) => m.fstype === 'fuse.stargaze');
      assert.equal(restored.length, layerCounts[1], 'the lazily pulled image is mounted again after the restart');
      // containerd's connection to the proxy plugin sits in its reconnect backoff for a few seconds after
      // the daemon went away, failing calls fast: wait until it talks to the snapshotter again.
      await waitFor(
        'containerd to reconnect to the stargz snapshotter',
        async () => (await containerd.ctr(['snapshots', '--snapshotter', 'stargz', 'ls'], { allowFailure: true })).code === 0,
        { timeoutMs: 60_000 },
      );

      // Straight to containerd: kubelet's credentials reach containerd, but the daemon sees none of them.
      const direct = imageService(containerd.address);
      t.after(() => direct.close());
      const run = daemon.logs({ currentRunOnly: true });
      const before = { lazy: prepared(run, 'true').length, eager: prepared(run, 'false').length };
      // Right after a restart containerd's connection to the proxy plugin can still fail a call with
      // "connection error ... unavailable"; kubelet retries a failed pull, and so does this test.
      const pulled = await waitFor(
        'a PullImage that containerd passes to the restarted snapshotter',
        async () => {
          try {
            return await direct.call<{ image_ref: string }>('PullImage', {
              image: { image: refs[2] },
              auth: { username: USER, password: PASSWORD },
            });
          } catch (err) {
            if (/UNAVAILABLE.*connection error/.test(String(err))) return undefined;
            throw err;
          }
        },
        { timeoutMs: 60_000, intervalMs: 500 },
      );
      assert.match(pulled.image_ref, /^sha256:[0-9a-f]{64}$/);
      const after = daemon.logs({ currentRunOnly: true });
      assert.equal(prepared(after, 'true').length - before.lazy, layerCounts[2], 'lazy with the credentials kept on disk');
      assert.equal(prepared(after, 'false').length - before.eager, 0, 'no layer fell back to a normal pull');
    });
  });
}
