/**
 * The daemon's credential chain (src/remote/keychains.ts) wired into RegistryClient: docker's config.json
 * first, then the CRI keychain (by image, else newest for the host), then the kubeconfig keychain's pull
 * secrets, read from a stand-in Kubernetes API server. Against a real docker-registry behind htpasswd.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import pino from 'pino';
import { RegistryClient } from '../../../src/remote/registry-client';
import { openKeychains, type Keychains } from '../../../src/remote/keychains';
import { bcryptLine, pushBlob, startRegistry, type RunningRegistry } from './registry-harness';

const USER = 'puller';
const PASSWORD = 'right-password';
const REPO = 'private/app';
const TOKEN = 'stand-in-token';
const quiet = pino({ level: 'silent' });

function pullSecret(host: string, user: string, password: string): object {
  const auths = { [host]: { auth: Buffer.from(`${user}:${password}`).toString('base64') } };
  return {
    metadata: { name: `regcred-${host}`, namespace: 'default' },
    type: 'kubernetes.io/dockerconfigjson',
    data: { '.dockerconfigjson': Buffer.from(JSON.stringify({ auths })).toString('base64') },
  };
}

describe('keychains: docker config.json, then CRI, then kubeconfig pull secrets', () => {
  let reg: RunningRegistry;
  let api: http.Server;
  let dir: string;
  let kubeconfig: string;
  let emptyDockerConfig: string;
  let digest: string;
  const data = randomBytes(50_000);
  const open: Keychains[] = [];
  let secrets: object[] = [];

  before(async () => {
    const line = await bcryptLine(USER, PASSWORD);
    assert.ok(line, 'bcrypt htpasswd line');
    reg = await startRegistry({ htpasswdLine: line });
    digest = await pushBlob(reg.host, REPO, data, { username: USER, password: PASSWORD });
    api = http.createServer((req, res) => {
      if (req.headers.authorization !== `Bearer ${TOKEN}`) return void res.writeHead(401).end();
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ kind: 'SecretList', items: secrets }));
    });
    await new Promise<void>((resolve) => api.listen(0, '127.0.0.1', resolve));
    dir = await mkdtemp(join(tmpdir(), 'stargaze-keychains-'));
    kubeconfig = join(dir, 'kubeconfig.json');
    await writeFile(
      kubeconfig,
      JSON.stringify({
        'current-context': 'c',
        contexts: [{ name: 'c', context: { cluster: 'k', user: 'u' } }],
        clusters: [{ name: 'k', cluster: { server: `http://127.0.0.1:${(api.address() as AddressInfo).port}` } }],
        users: [{ name: 'u', user: { token: TOKEN } }],
      }),
    );
    emptyDockerConfig = join(dir, 'docker-empty');
  });

  after(async () => {
    for (const k of open) k.close();
    await new Promise<void>((resolve) => api.close(() => resolve()));
    await reg.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it('a pull secret read through the kubeconfig lets the registry client fetch a private blob', async () => {
    secrets = [pullSecret(reg.host, USER, PASSWORD)];
    const keychains = await openKeychains({ kubeconfigPath: kubeconfig }, quiet);
    open.push(keychains);
    await keychains.kube!.ready;
    const client = new RegistryClient({ dockerConfigDir: emptyDockerConfig, credentialsAfterDockerConfig: keychains.provider, log: quiet });
    try {
      const src = await client.resolveBlob(`${reg.host}/${REPO}`, digest);
      assert.ok((await src.readRange(100, 50)).equals(data.subarray(100, 150)));
    } finally {
      await client.close();
    }
    // without the keychain the same client setup has nothing to offer
    const bare = new RegistryClient({ dockerConfigDir: emptyDockerConfig, log: quiet });
    try {
      await assert.rejects(bare.resolveBlob(`${reg.host}/${REPO}`, digest), /requires credentials/);
    } finally {
      await bare.close();
    }
  });

  it('CRI credentials come before pull secrets, and the image pulled picks them over newer ones of the host', async () => {
    secrets = [pullSecret(reg.host, USER, 'stale-secret'), pullSecret('127.0.0.1:1', 'k8s', 'other')];
    const criDir = join(dir, 'cri');
    const daemonSide = await openKeychains({ criKeychainDir: criDir }, quiet);
    const fuseSide = await openKeychains({ criKeychainDir: criDir, kubeconfigPath: kubeconfig }, quiet);
    open.push(daemonSide, fuseSide);
    await fuseSide.kube!.ready;
    assert.equal(((await stat(criDir)).mode & 0o777).toString(8), '700');

    // The daemon's proxy records two pulls; the FUSE server's keychain sees them (another instance, one file).
    await daemonSide.cri!.remember(`${reg.host}/${REPO}:v1`, { username: USER, password: PASSWORD });
    await new Promise((r) => setTimeout(r, 5));
    await daemonSide.cri!.remember(`${reg.host}/other/image:v1`, { username: 'other', password: 'newer' });
    assert.deepEqual(await fuseSide.provider!(reg.host, undefined, REPO), { username: USER, password: PASSWORD });
    assert.deepEqual(await fuseSide.provider!(reg.host), { username: 'other', password: 'newer' }, 'newest of the host');
    assert.deepEqual(await fuseSide.provider!('127.0.0.1:1'), { username: 'k8s', password: 'other' }, 'pull secrets after CRI');

    // Through the registry client: the repository reaches the CRI keychain from the auth challenge's scope.
    const client = new RegistryClient({ dockerConfigDir: emptyDockerConfig, credentialsAfterDockerConfig: fuseSide.provider, log: quiet });
    try {
      const src = await client.resolveBlob(`${reg.host}/${REPO}`, digest);
      assert.ok((await src.readRange(0, 10)).equals(data.subarray(0, 10)));
    } finally {
      await client.close();
    }
  });

  it("docker's config.json comes first", async () => {
    const dockerDir = join(dir, 'docker');
    await rm(dockerDir, { recursive: true, force: true });
    await mkdir(dockerDir);
    await writeFile(join(dockerDir, 'config.json'), JSON.stringify({ auths: { [reg.host]: { auth: Buffer.from(`${USER}:${PASSWORD}`).toString('base64') } } }));
    let asked = 0;
    const client = new RegistryClient({
      dockerConfigDir: dockerDir,
      credentialsAfterDockerConfig: () => {
        asked++;
        return Promise.resolve({ username: USER, password: 'wrong' });
      },
      log: quiet,
    });
    try {
      const src = await client.resolveBlob(`${reg.host}/${REPO}`, digest);
      assert.ok((await src.readRange(5, 5)).equals(data.subarray(5, 10)));
      assert.equal(asked, 0, 'the keychains after docker config.json were not consulted');
    } finally {
      await client.close();
    }
  });
});
