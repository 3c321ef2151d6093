/**
 * Kubernetes without kubelet: containerd's CRI plugin, configured as a KinD node is
 * (`snapshotter = "stargz"`, `disable_snapshot_annotations = false`), pulls an eStargz image through
 * CRI `runtime.v1.ImageService/PullImage` and runs a pod from it through `RuntimeService`. The pull
 * must be lazy: containerd's CRI passes the `containerd.io/snapshot/cri.*` labels, our daemon mounts
 * every layer through FUSE, and the registry serves only a small part of the image.
 *
 * Offline: the sandbox ("pause") image is a busybox image built here; the pod uses the node's
 * network namespace, so no CNI plugin runs.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFile, stat, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import {
  REPO_ROOT,
  bestEffort,
  bigFileFixture,
  buildBusyboxImage,
  convertToEstargz,
  makeTmpRoot,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  waitFor,
  withHost,
  writePlainHttpHostConfig,
  type BigFileFixture,
  type Containerd,
  type EstargzImage,
  type LogEntry,
  type Registry,
  type StargazeDaemon,
} from './harness';
import { criConfig } from './harness/cri-config';
import { log } from '../../src/log';
import { CriKeychain } from '../../src/remote/cri-keychain';
import { KubeconfigKeychain } from '../../src/remote/kubeconfig-keychain';
import { startCriImageProxy } from '../../src/service/cri-image-proxy';

const notRoot = process.getuid?.() !== 0;
const PREPARED = 'remote-snapshot-prepared';
const CRI_PROTO = 'runtime/v1/api.proto';
const CALL_TIMEOUT_MS = 120_000;
/** NamespaceMode.NODE: the pod shares the host's network namespace, so no CNI plugin is needed. */
const NAMESPACE_NODE = 'NODE';

type Wire = Record<string, unknown>;
type UnaryCallback = (err: grpc.ServiceError | null, res?: Wire) => void;
type UnaryMethod = (req: Wire, md: grpc.Metadata, opts: grpc.CallOptions, cb: UnaryCallback) => grpc.ClientUnaryCall;

/** A CRI client (both services) on containerd's socket. */
class CriClient {
  private readonly runtime: grpc.Client;
  private readonly image: grpc.Client;

  constructor(socket: string) {
    const def = protoLoader.loadSync(CRI_PROTO, {
      includeDirs: [path.join(REPO_ROOT, 'proto')],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
    });
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      runtime: { v1: { RuntimeService: grpc.ServiceClientConstructor; ImageService: grpc.ServiceClientConstructor } };
    };
    const address = `unix://${socket}`;
    this.runtime = new pkg.runtime.v1.RuntimeService(address, grpc.credentials.createInsecure());
    this.image = new pkg.runtime.v1.ImageService(address, grpc.credentials.createInsecure());
  }

  runtimeCall<T = Wire>(method: string, req: Wire): Promise<T> {
    return this.call<T>(this.runtime, 'RuntimeService', method, req);
  }

  imageCall<T = Wire>(method: string, req: Wire): Promise<T> {
    return this.call<T>(this.image, 'ImageService', method, req);
  }

  close(): void {
    this.runtime.close();
    this.image.close();
  }

  private call<T>(client: grpc.Client, service: string, method: string, req: Wire): Promise<T> {
    const fn = (client as unknown as Record<string, UnaryMethod>)[method];
    if (typeof fn !== 'function') throw new Error(`${service}/${method} is not in our CRI proto`);
    return new Promise((resolve, reject) => {
      fn.call(client, req, new grpc.Metadata(), { deadline: Date.now() + CALL_TIMEOUT_MS }, (err, res) => {
        if (err) reject(new Error(`CRI ${service}/${method}: ${err.message}`));
        else resolve(res as T);
      });
    });
  }
}

interface ContainerStatusWire {
  state: string;
  exit_code: number;
  reason: string;
  message: string;
  log_path: string;
}

function preparedLogs(daemon: StargazeDaemon, value: 'true' | 'false'): LogEntry[] {
  return daemon.logs().filter((e) => e[PREPARED] === value);
}

describe('CRI: PullImage and a pod through containerd CRI with the stargz snapshotter', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  let daemon: StargazeDaemon;
  let containerd: Containerd;
  let cri: CriClient;
  let big: BigFileFixture;
  let esgz: EstargzImage;
  let sandboxImage: string;
  let workDir: string;

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    workDir = await makeTmpRoot('cri', cleanup);
    const hostsDir = path.join(workDir, 'certs.d');
    for (const host of [registry.host, registry.countingHost]) await writePlainHttpHostConfig(hostsDir, host);
    const pause = await buildBusyboxImage({
      host: registry.host,
      repo: 'e2e/pause',
      tag: 'v1',
      config: { Entrypoint: ['/bin/sleep'], Cmd: ['1000000'] },
    });
    sandboxImage = pause.ref;
    // The byte counts below are what a pull and a container start cost; background fetch would
    // download the rest of each layer.
    daemon = await startDaemon({
      scope: cleanup,
      plainHttpHosts: [registry.host, registry.countingHost],
      config: 'no_background_fetch = true\n',
    });
    containerd = await startContainerd({
      scope: cleanup,
      stargazeAddress: daemon.address,
      stargazeRoot: daemon.root,
      enableCri: true,
      extraConfig: criConfig({
        sandboxImage,
        hostsDir,
        cniConfDir: path.join(workDir, 'cni'),
        runcRoot: path.join(workDir, 'runc'),
      }),
    });
    cri = new CriClient(containerd.address);
    cleanup.after(() => cri.close());
    big = bigFileFixture();
    const original = await buildBusyboxImage({ host: registry.host, repo: 'e2e/cri-big', tag: 'v1', extraFiles: big.extraFiles });
    esgz = await convertToEstargz(containerd, original.ref, `${registry.host}/e2e/cri-big:v1-esgz`);
  });

  test('runtime.v1 answers on containerd socket', async () => {
    const v = await cri.runtimeCall<{ runtime_name: string; runtime_api_version: string }>('Version', { version: 'v1' });
    assert.equal(v.runtime_name, 'containerd');
    assert.equal(v.runtime_api_version, 'v1');
  });

  test('PullImage mounts each layer lazily; a pod container runs from it and reads its files', async (t) => {
    const ref = withHost(esgz.ref, registry.countingHost);
    registry.resetCounters();
    const preparedBefore = preparedLogs(daemon, 'true').length;
    const fuseBefore = (await daemon.mounts()).filter((m) => m.fstype === 'fuse.stargaze').length;

    const pulled = await cri.imageCall<{ image_ref: string }>('PullImage', { image: { image: ref } });
    assert.match(pulled.image_ref, /^sha256:[0-9a-f]{64}$/);

    const lazy = preparedLogs(daemon, 'true').slice(preparedBefore);
    assert.equal(lazy.length, esgz.layers.length, 'every layer of the CRI pull is a remote snapshot');
    const fuseMounts = (await daemon.mounts()).filter((m) => m.fstype === 'fuse.stargaze');
    assert.equal(fuseMounts.length - fuseBefore, esgz.layers.length, 'each layer is its own FUSE mount');
    const layer = esgz.layers[0]!;
    const fetchedByPull = registry.bytesServed(layer.digest);
    assert.ok(fetchedByPull < layer.size / 2, `the pull fetched ${fetchedByPull} of ${layer.size} bytes`);

    const status = await cri.imageCall<{ image: { id: string } | null }>('ImageStatus', { image: { image: ref } });
    assert.equal(status.image?.id, pulled.image_ref);

    // The pod: host network (no CNI), its own cgroup parent swept by the harness, logs in the tmp dir.
    const uid = randomBytes(8).toString('hex');
    const logDir = path.join(workDir, 'pods', uid);
    const sandboxConfig = {
      metadata: { name: `lazy-${uid}`, uid, namespace: 'stargaze-e2e', attempt: 0 },
      log_directory: logDir,
      linux: {
        cgroup_parent: `/${containerd.newNamespace('cri-pod')}`,
        security_context: { namespace_options: { network: NAMESPACE_NODE, pid: 'CONTAINER', ipc: 'POD' } },
      },
    };
    const { pod_sandbox_id: podId } = await cri.runtimeCall<{ pod_sandbox_id: string }>('RunPodSandbox', { config: sandboxConfig });
    t.after(async () => {
      await bestEffort(`stop pod ${podId}`, () => cri.runtimeCall('StopPodSandbox', { pod_sandbox_id: podId }));
      await bestEffort(`remove pod ${podId}`, () => cri.runtimeCall('RemovePodSandbox', { pod_sandbox_id: podId }));
    });

    const script = `cat ${big.probePath}; head -c 1048576 ${big.bigFilePath} | wc -c`;
    const { container_id: containerId } = await cri.runtimeCall<{ container_id: string }>('CreateContainer', {
      pod_sandbox_id: podId,
      config: {
        metadata: { name: 'reader', attempt: 0 },
        image: { image: pulled.image_ref },
        command: ['/bin/sh', '-c', script],
        log_path: 'reader/0.log',
      },
      sandbox_config: sandboxConfig,
    });
    t.after(() => bestEffort(`remove container ${containerId}`, () => cri.runtimeCall('RemoveContainer', { container_id: containerId })));
    await cri.runtimeCall('StartContainer', { container_id: containerId });

    const exited = await waitFor(
      'the container to exit',
      async () => {
        const r = await cri.runtimeCall<{ status: ContainerStatusWire }>('ContainerStatus', { container_id: containerId });
        return r.status.state === 'CONTAINER_EXITED' ? r.status : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 200 },
    );
    assert.equal(exited.exit_code, 0, `exit code (${exited.reason}: ${exited.message})`);
    // CRI log lines: "<RFC3339Nano time> <stream> <F|P> <content>"
    const log = await readFile(path.join(logDir, 'reader/0.log'), 'utf8');
    const stdout = log
      .split('\n')
      .filter((l) => l.split(' ')[1] === 'stdout')
      .map((l) => l.split(' ').slice(3).join(' '));
    assert.deepEqual(stdout, [big.probeContent.trimEnd(), '1048576']);

    const fetched = registry.bytesServed(layer.digest);
    assert.ok(fetched > 0, 'the container read the layer through the registry');
    assert.ok(fetched < layer.size / 2, `fetched ${fetched} of ${layer.size} bytes: the unread rest stays in the registry`);
  });

  // The image-service proxy of [cri_keychain], on its own socket in front of containerd's. (This registry
  // does not check credentials: this shows the forwarding and that the credentials a pull carried are
  // kept, 0600, across a restart, and dropped by RemoveImage. The daemon serving it against a registry
  // with auth: private-images.test.ts.)
  test('the CRI image-service proxy forwards calls and keeps the pull credentials (0600) across a restart', async (t) => {
    const image = await buildBusyboxImage({
      host: registry.host,
      repo: 'e2e/cri-private',
      tag: 'v1',
      extraFiles: [{ path: '/private.txt', content: 'private\n' }],
    });
    const converted = await convertToEstargz(containerd, image.ref, `${registry.host}/e2e/cri-private:v1-esgz`);
    const ref = withHost(converted.ref, registry.countingHost);
    const keychainDir = path.join(workDir, 'cri-keychain');
    const keychain = await CriKeychain.open(keychainDir, log);
    const proxy = await startCriImageProxy({
      listenPath: path.join(workDir, 'cri-proxy.sock'),
      imageServicePath: containerd.address,
      keychain,
      log,
    });
    t.after(() => proxy.close());
    const viaProxy = new CriClient(proxy.address);
    t.after(() => viaProxy.close());

    const preparedBefore = preparedLogs(daemon, 'true').length;
    const auth = { username: 'kube', password: 'from-a-pull-secret' };
    const pulled = await viaProxy.imageCall<{ image_ref: string }>('PullImage', { image: { image: ref }, auth });
    assert.match(pulled.image_ref, /^sha256:[0-9a-f]{64}$/);
    assert.equal(preparedLogs(daemon, 'true').length - preparedBefore, converted.layers.length, 'lazy through the proxy');
    const status = await viaProxy.imageCall<{ image: { id: string } | null }>('ImageStatus', { image: { image: ref } });
    assert.equal(status.image?.id, pulled.image_ref, 'responses pass through unchanged');

    const file = (await stat(path.join(keychainDir, 'cri-credentials.json'))).mode & 0o777;
    assert.equal(file.toString(8), '600');
    assert.equal(((await stat(keychainDir)).mode & 0o777).toString(8), '700');
    const restarted = await CriKeychain.open(keychainDir, log);
    assert.deepEqual(await restarted.names(), [`${registry.countingHost}/e2e/cri-private`]);
    assert.deepEqual(await restarted.provider(registry.countingHost), auth);
    assert.equal(await restarted.provider(registry.host), undefined, 'only for the registry pulled from');

    await viaProxy.imageCall('RemoveImage', { image: { image: ref } });
    await waitFor('the credentials to be forgotten', async () => (await restarted.names()).length === 0, { timeoutMs: 10_000 });
  });
});

/**
 * [kubeconfig_keychain]: image pull secrets read through a kubeconfig, from a stand-in Kubernetes API
 * server (no real one can run here) that serves `GET /api/v1/secrets` to a bearer token. (Wired into
 * the registry client: test/unit/remote/keychains.test.ts.)
 */
describe('kubeconfig keychain: kubernetes.io/dockerconfigjson secrets through a kubeconfig', () => {
  /** Its "waiting for the kubeconfig" warnings are expected here. */
  const quiet = log.child({}, { level: 'silent' });
  const TOKEN = 'stand-in-service-account-token';
  const dockerConfigSecret = (name: string, host: string, user: string, password: string): object => ({
    metadata: { name, namespace: 'default' },
    type: 'kubernetes.io/dockerconfigjson',
    data: {
      '.dockerconfigjson': Buffer.from(
        JSON.stringify({ auths: { [host]: { auth: Buffer.from(`${user}:${password}`).toString('base64') } } }),
      ).toString('base64'),
    },
  });

  test('finds a pull secret for a registry host, follows changes, and waits for a kubeconfig that is not there yet', async (t) => {
    let secrets: object[] = [
      { metadata: { name: 'other' }, type: 'Opaque', data: { password: Buffer.from('not a registry').toString('base64') } },
      dockerConfigSecret('regcred', '127.0.0.1:5000', 'alice', 'first'),
    ];
    const seen: string[] = [];
    const api = http.createServer((req, res) => {
      seen.push(req.url ?? '');
      if (req.headers.authorization !== `Bearer ${TOKEN}`) return void res.writeHead(401).end();
      const url = new URL(req.url ?? '/', 'http://x');
      if (url.pathname !== '/api/v1/secrets') return void res.writeHead(404).end();
      const wanted = url.searchParams.get('fieldSelector');
      const items = secrets.filter((s) => wanted !== 'type=kubernetes.io/dockerconfigjson' || (s as { type: string }).type === 'kubernetes.io/dockerconfigjson');
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ kind: 'SecretList', items }));
    });
    await new Promise<void>((resolve) => api.listen(0, '127.0.0.1', resolve));
    t.after(() => new Promise<void>((resolve) => api.close(() => resolve())));
    const server = `http://127.0.0.1:${(api.address() as AddressInfo).port}`;

    const dir = await makeTmpRoot('kubeconfig', t);
    const kubeconfig = path.join(dir, 'kubeconfig');
    await writeFile(path.join(dir, 'token'), `${TOKEN}\n`);
    const keychain = new KubeconfigKeychain({ kubeconfigPath: kubeconfig, log: quiet, refreshMs: 100, retryMs: 100 });
    t.after(() => keychain.close());
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(await keychain.provider('127.0.0.1:5000'), undefined, 'nothing before the kubeconfig exists');

    // the shape kubectl and kind write
    await writeFile(
      kubeconfig,
      [
        'apiVersion: v1',
        'kind: Config',
        'clusters:',
        '- cluster:',
        `    server: ${server}`,
        '  name: kind-lazy',
        'contexts:',
        '- context:',
        '    cluster: kind-lazy',
        '    user: stargaze',
        '  name: kind-lazy',
        'current-context: kind-lazy',
        'preferences: {}',
        'users:',
        '- name: stargaze',
        '  user:',
        '    tokenFile: token',
        '',
      ].join('\n'),
    );
    await keychain.ready;
    assert.deepEqual(await keychain.provider('127.0.0.1:5000'), { username: 'alice', password: 'first' });
    assert.equal(await keychain.provider('127.0.0.1:5001'), undefined);
    assert.ok(seen.some((u) => u.includes('fieldSelector=type%3Dkubernetes.io%2Fdockerconfigjson')), 'lists only pull secrets');

    secrets = [dockerConfigSecret('regcred', '127.0.0.1:5000', 'alice', 'rotated')];
    await waitFor('the rotated secret', async () => (await keychain.provider('127.0.0.1:5000'))?.password === 'rotated', { timeoutMs: 5_000 });
    keychain.close();
  });
});
