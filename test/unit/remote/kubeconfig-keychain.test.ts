/**
 * Reading a kubeconfig (src/remote/kubeconfig-keychain.ts): which context, cluster and user it takes, inline
 * data against files, the YAML a hand-written subset parser used to mis-read, errors that keep secrets out of
 * logs, and where the file is looked for. Then the keychain itself against a stand-in Kubernetes API.
 */
import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { homedir, tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pino from 'pino';
import {
  credentialsFromSecretList,
  KubeconfigKeychain,
  kubeconfigPath,
  loadKubeconfig,
  parseKubeconfig,
} from '../../../src/remote/kubeconfig-keychain';

const SERVER = 'https://10.0.0.1:6443';
const b64 = (s: string): string => Buffer.from(s).toString('base64');

let dir: string;
let n = 0;
before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'stargaze-kubeconfig-'));
});
after(() => rm(dir, { recursive: true, force: true }));

/** Writes `lines` as a kubeconfig file of its own and loads it. */
async function load(lines: string[] | string): Promise<ReturnType<typeof loadKubeconfig>> {
  const file = path.join(dir, `kubeconfig-${n++}`);
  await writeFile(file, Array.isArray(lines) ? lines.join('\n') : lines);
  return loadKubeconfig(file);
}

describe('loadKubeconfig: what it takes', () => {
  test('the shape kubectl and kind write: block maps, lists of maps, `{}`, a tokenFile beside it', async () => {
    await writeFile(path.join(dir, 'token'), 'the-token\n');
    const access = await load([
      'apiVersion: v1',
      'kind: Config',
      'clusters:',
      '- cluster:',
      `    server: ${SERVER}/`,
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
    ]);
    assert.deepEqual(access, { server: SERVER, token: 'the-token', ca: undefined, cert: undefined, key: undefined, insecureSkipTlsVerify: false });
  });

  test('JSON, as kubectl config view -o json writes it', async () => {
    const access = await load(
      JSON.stringify(
        {
          'current-context': 'c',
          contexts: [{ name: 'c', context: { cluster: 'k', user: 'u' } }],
          clusters: [{ name: 'k', cluster: { server: SERVER, 'insecure-skip-tls-verify': true } }],
          users: [{ name: 'u', user: { token: 'json-token' } }],
        },
        null,
        '\t',
      ),
    );
    assert.equal(access.server, SERVER);
    assert.equal(access.token, 'json-token');
    assert.equal(access.insecureSkipTlsVerify, true);
  });

  test('the current context picks its cluster and user by name, wherever they are listed', async () => {
    const access = await load([
      'current-context: prod',
      'contexts:',
      '- name: dev',
      '  context: {cluster: dev-cluster, user: dev-user}',
      '- name: prod',
      '  context: {cluster: prod-cluster, user: prod-user}',
      'clusters:',
      '- name: dev-cluster',
      '  cluster: {server: "https://dev:6443"}',
      '- name: prod-cluster',
      '  cluster: {server: "https://prod:6443"}',
      'users:',
      '- name: prod-user',
      '  user: {token: prod-token}',
      '- name: dev-user',
      '  user: {token: dev-token}',
    ]);
    assert.equal(access.server, 'https://prod:6443');
    assert.equal(access.token, 'prod-token');
  });

  test('without a current context, the first context', async () => {
    const access = await load([
      'contexts:',
      '- {name: first, context: {cluster: a, user: ua}}',
      '- {name: second, context: {cluster: b, user: ub}}',
      'clusters:',
      '- {name: b, cluster: {server: "https://b"}}',
      '- {name: a, cluster: {server: "https://a"}}',
      'users:',
      '- {name: ua, user: {token: ta}}',
    ]);
    assert.equal(access.server, 'https://a');
    assert.equal(access.token, 'ta');
  });

  test('a context naming a cluster that is not there: no server, and the error says for which context', async () => {
    await assert.rejects(
      load(['current-context: c', 'contexts:', '- {name: c, context: {cluster: missing}}', 'clusters:', '- {name: other, cluster: {server: "https://o"}}']),
      /no server for context c$/,
    );
    await assert.rejects(load(''), /no server for context \(none\)/);
    await assert.rejects(load('# only a comment\n'), /no server for context \(none\)/);
  });

  test('certificates inline (-data, base64) or from files, relative to the kubeconfig or absolute; inline wins', async () => {
    await mkdir(path.join(dir, 'pki'), { recursive: true });
    await writeFile(path.join(dir, 'pki', 'ca.crt'), 'CA FROM FILE');
    await writeFile(path.join(dir, 'pki', 'client.crt'), 'CERT FROM FILE');
    const keyFile = path.join(dir, 'pki', 'client.key');
    await writeFile(keyFile, 'KEY FROM FILE');
    const fromFiles = await load([
      'clusters:',
      `- {name: k, cluster: {server: "${SERVER}", certificate-authority: pki/ca.crt}}`,
      'users:',
      `- {name: u, user: {client-certificate: ./pki/client.crt, client-key: ${keyFile}}}`,
      'contexts:',
      '- {name: c, context: {cluster: k, user: u}}',
    ]);
    assert.equal(fromFiles.ca?.toString(), 'CA FROM FILE');
    assert.equal(fromFiles.cert?.toString(), 'CERT FROM FILE');
    assert.equal(fromFiles.key?.toString(), 'KEY FROM FILE');
    assert.equal(fromFiles.token, undefined);

    const inline = await load([
      'clusters:',
      '- name: k',
      '  cluster:',
      `    server: ${SERVER}`,
      `    certificate-authority-data: ${b64('CA INLINE')}`,
      '    certificate-authority: pki/ca.crt',
      'users:',
      '- name: u',
      '  user:',
      `    client-certificate-data: ${b64('CERT INLINE')}`,
      `    client-key-data: ${b64('KEY INLINE')}`,
      '    client-key: /nonexistent/never/read',
      'contexts:',
      '- {name: c, context: {cluster: k, user: u}}',
    ]);
    assert.equal(inline.ca?.toString(), 'CA INLINE');
    assert.equal(inline.cert?.toString(), 'CERT INLINE');
    assert.equal(inline.key?.toString(), 'KEY INLINE');
  });

  test('a token in the kubeconfig wins over a tokenFile; a missing file is an error', async () => {
    const base = ['clusters:', `- {name: k, cluster: {server: "${SERVER}"}}`, 'contexts:', '- {name: c, context: {cluster: k, user: u}}', 'users:'];
    assert.equal((await load([...base, '- {name: u, user: {token: inline, tokenFile: /nonexistent}}'])).token, 'inline');
    await assert.rejects(load([...base, '- {name: u, user: {tokenFile: missing-token}}']), { code: 'ENOENT' });
    await assert.rejects(load([...base, '- {name: u, user: {client-certificate: missing.crt}}']), { code: 'ENOENT' });
  });

  test('insecure-skip-tls-verify only when it is the boolean true', async () => {
    const withFlag = (flag: string): string[] => [
      'clusters:',
      `- {name: k, cluster: {server: "${SERVER}"${flag}}}`,
      'contexts:',
      '- {name: c, context: {cluster: k}}',
    ];
    assert.equal((await load(withFlag(', insecure-skip-tls-verify: true'))).insecureSkipTlsVerify, true);
    assert.equal((await load(withFlag(', insecure-skip-tls-verify: false'))).insecureSkipTlsVerify, false);
    assert.equal((await load(withFlag(', insecure-skip-tls-verify: "true"'))).insecureSkipTlsVerify, false, 'a string is not the boolean');
    assert.equal((await load(withFlag(''))).insecureSkipTlsVerify, false);
  });
});

describe('loadKubeconfig: valid YAML the subset parser mis-read', () => {
  const cluster = ['clusters:', `- {name: k, cluster: {server: "${SERVER}"}}`, 'contexts:', '- {name: c, context: {cluster: k, user: u}}'];

  test('a kubeconfig that is one flow map (it starts with `{` and is not JSON)', async () => {
    const access = await load(`{current-context: c, contexts: [{name: c, context: {cluster: k, user: u}}], clusters: [{name: k, cluster: {server: "${SERVER}"}}], users: [{name: u, user: {token: t}}]}`);
    assert.equal(access.server, SERVER);
    assert.equal(access.token, 't');
  });

  test('quoted keys, and quoted values holding " #", ": " and escapes', async () => {
    const access = await load([
      ...cluster,
      '"users":',
      "- 'name': u",
      '  "user":',
      '    "token": "abc #not-a-comment: still\\u0021"',
    ]);
    assert.equal(access.token, 'abc #not-a-comment: still!');
  });

  test('a comment after a value, and a single-quoted value with a quote in it', async () => {
    const access = await load([...cluster, 'users:', '- name: u # the node', "  user: {token: 'it''s'}  # a comment"]);
    assert.equal(access.token, "it's");
  });

  test('block scalars (folded base64 data, as some tools wrap it)', async () => {
    const data = b64('A CERTIFICATE THAT IS LONG ENOUGH TO BE WRAPPED OVER LINES');
    const access = await load([
      ...cluster,
      'users:',
      '- name: u',
      '  user:',
      '    client-certificate-data: >-',
      `      ${data.slice(0, 30)}`,
      `      ${data.slice(30)}`,
    ]);
    // Folding joins the lines with a space, which base64 decoding skips.
    assert.equal(access.cert?.toString(), 'A CERTIFICATE THAT IS LONG ENOUGH TO BE WRAPPED OVER LINES');
  });

  test('anchors, aliases and merge keys', async () => {
    const access = await load([
      'defaults: &defaults {server: "https://shared:6443", insecure-skip-tls-verify: true}',
      'clusters:',
      '- name: k',
      '  cluster:',
      '    <<: *defaults',
      'contexts:',
      '- name: c',
      '  context: &ctx {cluster: k, user: u}',
      '- {name: d, context: *ctx}',
      'current-context: d',
      'users:',
      '- {name: u, user: {token: anchored}}',
    ]);
    assert.deepEqual([access.server, access.insecureSkipTlsVerify, access.token], ['https://shared:6443', true, 'anchored']);
  });

  test('several documents: the first one only, as client-go reads it', async () => {
    const access = await load([
      '---',
      ...cluster,
      'users:',
      '- {name: u, user: {token: first}}',
      '---',
      'users:',
      '- {name: u, user: {token: second}}',
      'clusters:',
      '- {name: k, cluster: {server: "https://other"}}',
    ]);
    assert.equal(access.server, SERVER);
    assert.equal(access.token, 'first');
  });

  test('names and tokens that look like numbers keep their text', async () => {
    const access = await load([
      'current-context: 0123',
      'contexts:',
      '- {name: 0123, context: {cluster: 1e3, user: 42}}',
      'clusters:',
      '- {name: 1e3, cluster: {server: "https://numbers"}}',
      'users:',
      '- {name: 42, user: {token: 12345678901234567890123}}',
    ]);
    assert.equal(access.server, 'https://numbers');
    assert.equal(access.token, '12345678901234567890123');
  });
});

describe('parseKubeconfig: errors', () => {
  test('invalid YAML: where, and the code, never the text (it may be a secret)', () => {
    const secret = 'sEcReT-t0ken';
    const cases = [
      `users:\n- name: u\n  user:\n    token: "${secret}\\q"\n`, // an invalid escape: the library's message quotes it
      `users:\n- name: u\n  user: {token: ${secret}\n`, // an unclosed flow map
      `a: 1\na: ${secret}\n`, // a duplicate key
    ];
    for (const text of cases) {
      assert.throws(
        () => parseKubeconfig(text, '/etc/kubeconfig'),
        (err: unknown) => {
          assert.ok(err instanceof Error);
          assert.match(err.message, /^\/etc\/kubeconfig: not valid YAML at line \d+, column \d+ \([A-Z_]+\)$/);
          assert.ok(!err.message.includes(secret), err.message);
          return true;
        },
        text,
      );
    }
  });

  test('a "billion laughs" of aliases is refused', () => {
    const lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x, x]'];
    for (let i = 1; i < 10; i++) lines.push(`a${i}: &a${i} [${Array(10).fill(`*a${i - 1}`).join(', ')}]`);
    assert.throws(() => parseKubeconfig(lines.join('\n'), 'k'), /^Error: k: .*alias/i);
  });
});

describe('kubeconfigPath', () => {
  test('the configured path, else the first entry of $KUBECONFIG, else ~/.kube/config', () => {
    assert.equal(kubeconfigPath('/etc/kubernetes/kubelet.conf', { KUBECONFIG: '/a' }), '/etc/kubernetes/kubelet.conf');
    assert.equal(kubeconfigPath('', { KUBECONFIG: `${path.delimiter}/first${path.delimiter}/second` }), '/first');
    assert.equal(kubeconfigPath('', {}), path.join(homedir(), '.kube', 'config'));
    assert.equal(kubeconfigPath('', { KUBECONFIG: '' }), path.join(homedir(), '.kube', 'config'));
  });
});

describe('credentialsFromSecretList', () => {
  test('dockerconfigjson secrets only; auth, username/password and identity tokens; the first secret for a host wins', () => {
    const secret = (type: string, auths: object): object => ({ type, data: { '.dockerconfigjson': b64(JSON.stringify({ auths })) } });
    const creds = credentialsFromSecretList({
      items: [
        secret('Opaque', { 'opaque.example': { username: 'no', password: 'no' } }),
        secret('kubernetes.io/dockerconfigjson', { 'https://index.docker.io/v1/': { auth: b64('hub:pw') }, 'a.example': { username: 'ua', password: 'pa' } }),
        secret('kubernetes.io/dockerconfigjson', { 'a.example': { username: 'later', password: 'later' }, 'b.example:5000': { identitytoken: 'idt' } }),
        { type: 'kubernetes.io/dockerconfigjson', data: { '.dockerconfigjson': 'not base64 json' } },
      ],
    });
    assert.deepEqual(Object.fromEntries(creds), {
      'docker.io': { username: 'hub', password: 'pw' },
      'a.example': { username: 'ua', password: 'pa' },
      'b.example:5000': { username: '', password: 'idt', identityToken: 'idt' },
    });
    assert.equal(credentialsFromSecretList(null).size, 0);
  });
});

// Bounded: a kubeconfig it cannot read leaves `ready` pending for ever (the keychain retries quietly).
test('the keychain lists pull secrets with the YAML kubeconfig it read', { timeout: 20_000 }, async (t) => {
  const TOKEN = 'sa-token';
  const api = http.createServer((req, res) => {
    if (req.headers.authorization !== `Bearer ${TOKEN}`) return void res.writeHead(401).end();
    const auths = { 'registry.example': { auth: b64('alice:secret') } };
    res.writeHead(200, { 'content-type': 'application/json' }).end(
      JSON.stringify({ kind: 'SecretList', items: [{ type: 'kubernetes.io/dockerconfigjson', data: { '.dockerconfigjson': b64(JSON.stringify({ auths })) } }] }),
    );
  });
  await new Promise<void>((resolve) => api.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => api.close(() => resolve())));
  const file = path.join(dir, 'keychain-kubeconfig');
  await writeFile(
    file,
    [
      'apiVersion: v1',
      'clusters:',
      `- {name: k, cluster: {server: "http://127.0.0.1:${(api.address() as AddressInfo).port}"}}`,
      'contexts: [{name: c, context: {cluster: k, user: u}}]',
      'current-context: c',
      'users:',
      `- {name: u, user: {token: "${TOKEN}"}}`,
    ].join('\n'),
  );
  const keychain = new KubeconfigKeychain({ kubeconfigPath: file, log: pino({ level: 'silent' }) });
  t.after(() => keychain.close());
  await keychain.ready;
  assert.deepEqual(await keychain.provider('registry.example'), { username: 'alice', password: 'secret' });
  assert.equal(await keychain.provider('other.example'), undefined);
});
