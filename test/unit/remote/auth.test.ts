import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { RegistryAuthError, errorMessage } from '../../../src/errors';
import { RegistryAuthorizer, parseWwwAuthenticate, pullScope, type TokenHttp } from '../../../src/remote/auth';
import type { RegistryCredentials } from '../../../src/remote/credentials';

describe('parseWwwAuthenticate', () => {
  const cases: [string | string[], unknown[]][] = [
    [
      'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"',
      [{ scheme: 'bearer', realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:library/busybox:pull' }],
    ],
    ['Basic realm="Registry Realm"', [{ scheme: 'basic', realm: 'Registry Realm' }]],
    ['basic', [{ scheme: 'basic', realm: undefined }]],
    [
      'Basic realm="x", Bearer realm="https://a/t", service=svc',
      [
        { scheme: 'basic', realm: 'x' },
        { scheme: 'bearer', realm: 'https://a/t', service: 'svc', scope: undefined },
      ],
    ],
    [['Negotiate abc==', 'Bearer realm="https://a/t",scope="repository:a/b:pull,push"'], [{ scheme: 'bearer', realm: 'https://a/t', service: undefined, scope: 'repository:a/b:pull,push' }]],
    ['Bearer realm="with \\"quote\\""', [{ scheme: 'bearer', realm: 'with "quote"', service: undefined, scope: undefined }]],
    ['Bearer service="no realm"', []],
    ['', []],
  ];
  for (const [input, want] of cases) {
    it(JSON.stringify(input), () => assert.deepEqual(parseWwwAuthenticate(input), want));
  }
});

function fakeTokenServer(answer: (url: URL, init: Parameters<TokenHttp>[1]) => { status: number; json: unknown }): {
  http: TokenHttp;
  calls: { url: URL; init: Parameters<TokenHttp>[1] }[];
} {
  const calls: { url: URL; init: Parameters<TokenHttp>[1] }[] = [];
  const http: TokenHttp = async (url, init) => {
    calls.push({ url, init });
    await new Promise((r) => setImmediate(r));
    const { status, json } = answer(url, init);
    return { status, body: Buffer.from(JSON.stringify(json)) };
  };
  return { http, calls };
}

const CHALLENGE = 'Bearer realm="https://auth.example.com/token",service="reg",scope="repository:a/b:pull"';

describe('RegistryAuthorizer', () => {
  it('fetches a bearer token with basic creds, caches it per scope until expiry', async () => {
    let now = 1_000_000;
    const { http, calls } = fakeTokenServer(() => ({ status: 200, json: { token: `t${calls.length}`, expires_in: 120 } }));
    const creds: RegistryCredentials = { username: 'u', password: 'p' };
    const a = new RegistryAuthorizer({ credentials: () => Promise.resolve(creds), http, now: () => now });
    const scope = pullScope('a/b');
    assert.equal(a.cached('reg.io', scope), undefined);
    const h = await a.authorize('reg.io', scope, CHALLENGE, undefined);
    assert.equal(h, 'Bearer t1');
    assert.equal(calls.length, 1);
    const call = calls[0];
    assert.equal(call?.init.method, 'GET');
    assert.equal(call?.url.searchParams.get('service'), 'reg');
    assert.deepEqual(call?.url.searchParams.getAll('scope'), ['repository:a/b:pull']);
    assert.equal(call?.init.headers.authorization, `Basic ${Buffer.from('u:p').toString('base64')}`);
    assert.equal(a.cached('reg.io', scope), 'Bearer t1');
    assert.equal(a.cached('reg.io', pullScope('other')), undefined);
    assert.equal(a.cached('other.io', scope), undefined);
    now += 110_000;
    assert.equal(a.cached('reg.io', scope), 'Bearer t1');
    now += 6_000; // within the refresh margin
    assert.equal(a.cached('reg.io', scope), undefined);
  });

  it('defaults expires_in to 60 s and accepts access_token', async () => {
    let now = 0;
    const { http } = fakeTokenServer(() => ({ status: 200, json: { access_token: 'at' } }));
    const a = new RegistryAuthorizer({ credentials: () => Promise.resolve(undefined), http, now: () => now });
    assert.equal(await a.authorize('r', 's', CHALLENGE, undefined), 'Bearer at');
    now = 54_000;
    assert.equal(a.cached('r', 's'), 'Bearer at');
    now = 56_000;
    assert.equal(a.cached('r', 's'), undefined);
  });

  it('anonymous token requests carry no Authorization; the challenge scope is added when different', async () => {
    const { http, calls } = fakeTokenServer(() => ({ status: 200, json: { token: 'x' } }));
    const a = new RegistryAuthorizer({ credentials: () => Promise.resolve(undefined), http });
    await a.authorize('r', 'repository:mine:pull', CHALLENGE, undefined);
    assert.equal(calls[0]?.init.headers.authorization, undefined);
    assert.deepEqual(calls[0]?.url.searchParams.getAll('scope'), ['repository:mine:pull', 'repository:a/b:pull']);
  });

  it('identity tokens use the OAuth refresh-token grant', async () => {
    const { http, calls } = fakeTokenServer(() => ({ status: 200, json: { access_token: 'oauth' } }));
    const a = new RegistryAuthorizer({ credentials: () => Promise.resolve({ username: '', password: 'rt', identityToken: 'rt' }), http });
    assert.equal(await a.authorize('r', 'repository:a/b:pull', CHALLENGE, undefined), 'Bearer oauth');
    assert.equal(calls[0]?.init.method, 'POST');
    const form = new URLSearchParams(calls[0]?.init.body ?? '');
    assert.equal(form.get('grant_type'), 'refresh_token');
    assert.equal(form.get('refresh_token'), 'rt');
    assert.equal(form.get('service'), 'reg');
    assert.equal(form.get('scope'), 'repository:a/b:pull');
  });

  it('concurrent 401s share one token fetch; a newer token is returned without fetching', async () => {
    const { http, calls } = fakeTokenServer(() => ({ status: 200, json: { token: `t${calls.length}` } }));
    const a = new RegistryAuthorizer({ credentials: () => Promise.resolve(undefined), http });
    const hs = await Promise.all([1, 2, 3].map(() => a.authorize('r', 's', CHALLENGE, undefined)));
    assert.deepEqual(hs, ['Bearer t1', 'Bearer t1', 'Bearer t1']);
    assert.equal(calls.length, 1);
    // A request that carried an older header gets the current one.
    assert.equal(await a.authorize('r', 's', CHALLENGE, 'Bearer t0'), 'Bearer t1');
    assert.equal(calls.length, 1);
    // The current one rejected: fetch a fresh one.
    assert.equal(await a.authorize('r', 's', CHALLENGE, 'Bearer t1'), 'Bearer t2');
  });

  it('a shared token fetch outlives the request that started it when that one is aborted', async () => {
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    const calls: Parameters<TokenHttp>[1][] = [];
    const http: TokenHttp = async (_url, init) => {
      calls.push(init);
      await released;
      if (init.signal?.aborted) throw new Error('token request aborted');
      return { status: 200, body: Buffer.from(JSON.stringify({ token: 'shared' })) };
    };
    const a = new RegistryAuthorizer({ credentials: () => Promise.resolve(undefined), http });
    const closing = new AbortController(); // say, the prefetch of a layer being unmounted
    const first = a.authorize('r', 's', CHALLENGE, undefined, closing.signal);
    const second = a.authorize('r', 's', CHALLENGE, undefined); // a container's read on another layer
    await new Promise((r) => setImmediate(r));
    closing.abort(new Error('layer closed'));
    await assert.rejects(first, /layer closed/, 'the aborted caller stops waiting at once');
    release();
    assert.equal(await second, 'Bearer shared', 'the other caller still gets the token');
    assert.equal(calls.length, 1);
    assert.equal(calls[0]?.signal?.aborted, false, 'the token request did not run under the first caller\'s signal');
  });

  it('basic challenges use the credentials and are remembered per host', async () => {
    const { http, calls } = fakeTokenServer(() => ({ status: 500, json: {} }));
    const a = new RegistryAuthorizer({ credentials: () => Promise.resolve({ username: 'u', password: 'secret-pw' }), http });
    const h = await a.authorize('r', 's1', 'Basic realm="x"', undefined);
    assert.equal(h, `Basic ${Buffer.from('u:secret-pw').toString('base64')}`);
    assert.equal(a.cached('r', 'another-scope'), h);
    assert.equal(calls.length, 0);
    await assert.rejects(a.authorize('r', 's1', 'Basic realm="x"', h), (err: unknown) => {
      assert.ok(err instanceof RegistryAuthError);
      assert.match(err.message, /rejected the configured credentials/);
      assert.ok(!errorMessage(err).includes('secret-pw'));
      return true;
    });
    const anon = new RegistryAuthorizer({ credentials: () => Promise.resolve(undefined), http });
    await assert.rejects(anon.authorize('r', 's', 'Basic realm="x"', undefined), /requires credentials/);
  });

  it('token server failures are RegistryAuthErrors without secrets', async () => {
    const cases: [{ status: number; json: unknown }, RegExp][] = [
      [{ status: 401, json: {} }, /refused the configured credentials \(HTTP 401\)/],
      [{ status: 500, json: {} }, /answered HTTP 500/],
      [{ status: 200, json: { nothing: true } }, /without a token/],
    ];
    for (const [answer, re] of cases) {
      const { http } = fakeTokenServer(() => answer);
      const a = new RegistryAuthorizer({ credentials: () => Promise.resolve({ username: 'u', password: 'hunter2' }), http });
      await assert.rejects(a.authorize('reg.io', 'repository:a/b:pull', CHALLENGE, undefined), (err: unknown) => {
        assert.ok(err instanceof RegistryAuthError);
        assert.match(err.message, re);
        assert.match(err.message, /auth\.example\.com/);
        assert.ok(!err.message.includes('hunter2') && !err.message.includes(Buffer.from('u:hunter2').toString('base64')));
        return true;
      });
    }
    const a = new RegistryAuthorizer({ credentials: () => Promise.resolve(undefined), http: fakeTokenServer(() => ({ status: 200, json: {} })).http });
    await assert.rejects(a.authorize('r', 's', 'Negotiate x', undefined), /without a usable WWW-Authenticate/);
    await assert.rejects(a.authorize('r', 's', 'Bearer realm="file:///etc/passwd"', undefined), /unsupported scheme/);
  });
});
