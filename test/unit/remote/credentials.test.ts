import assert from 'node:assert/strict';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ConfigError, errorMessage } from '../../../src/errors';
import { DockerConfigKeychain, authKeyHost, chainCredentials, dockerConfigDir } from '../../../src/remote/credentials';

const b64 = (s: string): string => Buffer.from(s).toString('base64');

describe('docker config keychain', () => {
  let dir = '';
  const write = (doc: unknown): Promise<void> => writeFile(join(dir, 'config.json'), typeof doc === 'string' ? doc : JSON.stringify(doc));

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stargaze-creds-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('dockerConfigDir honours $DOCKER_CONFIG', () => {
    assert.equal(dockerConfigDir({ DOCKER_CONFIG: '/x' }), '/x');
    assert.match(dockerConfigDir({}), /\.docker$/);
  });

  it('authKeyHost strips scheme and path', () => {
    assert.equal(authKeyHost('https://index.docker.io/v1/'), 'index.docker.io');
    assert.equal(authKeyHost('http://127.0.0.1:5000/v1/'), '127.0.0.1:5000');
    assert.equal(authKeyHost('reg.io'), 'reg.io');
  });

  it('no file means no credentials', async () => {
    const kc = new DockerConfigKeychain({ configDir: join(dir, 'missing') });
    assert.equal(await kc.lookup('reg.io'), undefined);
  });

  it('reads auth, username/password and identitytoken entries under any key spelling', async () => {
    await write({
      auths: {
        'reg.io': { auth: b64('alice:pa:ss') },
        'https://other.io': { username: 'bob', password: 'pw2' },
        'http://127.0.0.1:5000/v1/': { auth: b64('carol:pw3') },
        'https://index.docker.io/v1/': { auth: b64('hubuser:hubpw') },
        'tok.io': { identitytoken: 'refresh-xyz' },
        'empty.io': {},
      },
    });
    const kc = new DockerConfigKeychain({ configDir: dir });
    assert.deepEqual(await kc.lookup('reg.io'), { username: 'alice', password: 'pa:ss' });
    assert.deepEqual(await kc.lookup('other.io'), { username: 'bob', password: 'pw2' });
    assert.deepEqual(await kc.lookup('127.0.0.1:5000'), { username: 'carol', password: 'pw3' });
    for (const hub of ['docker.io', 'registry-1.docker.io', 'index.docker.io']) {
      assert.deepEqual(await kc.lookup(hub), { username: 'hubuser', password: 'hubpw' }, hub);
    }
    assert.deepEqual(await kc.lookup('tok.io'), { username: '', password: 'refresh-xyz', identityToken: 'refresh-xyz' });
    assert.equal(await kc.lookup('empty.io'), undefined);
    assert.equal(await kc.lookup('unknown.io'), undefined);
    assert.equal(await kc.lookup('127.0.0.1:5001'), undefined);
  });

  it('errors name the file and key but never the secret', async () => {
    await write({ auths: { 'reg.io': { auth: b64('no-colon-secretvalue') } } });
    const kc = new DockerConfigKeychain({ configDir: dir });
    await assert.rejects(kc.lookup('reg.io'), (err: unknown) => {
      assert.ok(err instanceof ConfigError);
      assert.match(err.message, /auths\["reg\.io"\]\.auth/);
      assert.ok(!errorMessage(err).includes('secretvalue'));
      return true;
    });
    await write('{"auths": {"reg.io": {"auth": "c2VjcmV0dmFsdWU=" ');
    await assert.rejects(kc.lookup('reg.io'), (err: unknown) => err instanceof ConfigError && !err.message.includes('c2VjcmV0dmFsdWU='));
  });

  it('runs credential helpers (credHelpers before credsStore before auths)', async () => {
    const bin = join(dir, 'bin');
    await rm(bin, { recursive: true, force: true });
    await import('node:fs/promises').then((fs) => fs.mkdir(bin));
    // A helper that answers for one server URL only, like the real ones.
    const helper = (name: string, server: string, user: string, secret: string): Promise<void> =>
      writeFile(
        join(bin, `docker-credential-${name}`),
        `#!/bin/sh\n[ "$1" = get ] || exit 2\nread url\nif [ "$url" = "${server}" ]; then echo '{"ServerURL":"${server}","Username":"${user}","Secret":"${secret}"}'; exit 0; fi\necho "credentials not found in native keychain"; exit 1\n`,
      ).then(() => chmod(join(bin, `docker-credential-${name}`), 0o755));
    await helper('pass', 'helped.io', 'huser', 'hsecret');
    await helper('store', 'https://index.docker.io/v1/', '<token>', 'idtok');
    await write({
      credHelpers: { 'helped.io': 'pass', 'broken.io': 'nonexistent' },
      credsStore: 'store',
      auths: { 'broken.io': { auth: b64('fallback:pw') }, 'plain.io': { auth: b64('p:q') } },
    });
    const oldPath = process.env.PATH;
    process.env.PATH = `${bin}:${oldPath ?? ''}`;
    try {
      const kc = new DockerConfigKeychain({ configDir: dir });
      assert.deepEqual(await kc.lookup('helped.io'), { username: 'huser', password: 'hsecret' });
      assert.deepEqual(await kc.lookup('docker.io'), { username: '', password: 'idtok', identityToken: 'idtok' });
      // Missing helper binary, store says "not found": fall back to the auths entry.
      assert.deepEqual(await kc.lookup('broken.io'), { username: 'fallback', password: 'pw' });
      assert.deepEqual(await kc.lookup('plain.io'), { username: 'p', password: 'q' });
    } finally {
      process.env.PATH = oldPath;
    }
  });

  it('chainCredentials takes the first provider that knows the host', async () => {
    const chain = chainCredentials(
      (h) => Promise.resolve(h === 'a' ? { username: 'x', password: '1' } : undefined),
      undefined,
      () => Promise.resolve({ username: 'y', password: '2' }),
    );
    assert.deepEqual(await chain('a'), { username: 'x', password: '1' });
    assert.deepEqual(await chain('b'), { username: 'y', password: '2' });
  });
});
