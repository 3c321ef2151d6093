import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ConfigError } from '../../../src/errors';
import { configMirrorEndpoints, defaultEndpoint, isLoopbackHost, parseHostsToml, resolveHosts } from '../../../src/remote/hosts';

describe('default endpoints', () => {
  it('https for remote registries, http for loopback', () => {
    assert.equal(defaultEndpoint('ghcr.io').scheme, 'https');
    assert.equal(defaultEndpoint('127.0.0.1:5000').scheme, 'http');
    assert.equal(defaultEndpoint('localhost:5000').scheme, 'http');
    assert.equal(defaultEndpoint('[::1]:5000').scheme, 'http');
    assert.equal(defaultEndpoint('127.1.2.3').scheme, 'http');
    assert.equal(defaultEndpoint('128.0.0.1:5000').scheme, 'https');
  });
  it('docker hub is served from registry-1.docker.io', () => {
    const e = defaultEndpoint('docker.io');
    assert.equal(e.host, 'registry-1.docker.io');
    assert.equal(e.path, '/v2');
    assert.deepEqual([...e.capabilities], ['pull', 'resolve', 'push']);
  });
  it('isLoopbackHost', () => {
    for (const h of ['localhost', 'localhost:1', '127.0.0.1', '127.255.0.9:80', '::1', '[::1]', '[::1]:5000']) assert.ok(isLoopbackHost(h), h);
    for (const h of ['example.com', '10.0.0.1', '[::2]:1', 'localhost.example.com']) assert.ok(!isLoopbackHost(h), h);
  });
});

describe('parseHostsToml', () => {
  const opts = { domain: 'docker.io', baseDir: '/etc/containerd/certs.d/docker.io', source: 'hosts.toml' };

  it('parses mirrors in order, then the server', () => {
    const { endpoints, warnings } = parseHostsToml(
      `
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  header = { "X-Test" = "a" }

[host."https://mirror.example.com/base"]
  capabilities = ["pull"]
  ca = "ca.pem"
  client = [["c.cert", "/abs/c.key"]]
  [host."https://mirror.example.com/base".header]
    x-multi = ["1", "2"]

[host."mirror2.example.com"]
  override_path = true
`,
      opts,
    );
    assert.deepEqual(warnings, []);
    assert.equal(endpoints.length, 4);
    const [m1, m2, m3, server] = endpoints;
    assert.deepEqual(
      { scheme: m1?.scheme, host: m1?.host, path: m1?.path, caps: m1?.capabilities, skip: m1?.skipVerify, headers: m1?.headers },
      { scheme: 'http', host: '127.0.0.1:5000', path: '/v2', caps: ['pull', 'resolve'], skip: true, headers: { 'x-test': ['a'] } },
    );
    assert.equal(m2?.host, 'mirror.example.com');
    assert.equal(m2?.path, '/base/v2');
    assert.deepEqual(m2?.caFiles, ['/etc/containerd/certs.d/docker.io/ca.pem']);
    assert.deepEqual(m2?.clientCerts, [{ certFile: '/etc/containerd/certs.d/docker.io/c.cert', keyFile: '/abs/c.key' }]);
    assert.deepEqual(m2?.headers, { 'x-multi': ['1', '2'] });
    assert.equal(m3?.scheme, 'https', 'no scheme means https');
    assert.equal(m3?.path, '/', 'override_path keeps the path as given');
    assert.equal(server?.host, 'registry-1.docker.io');
    assert.deepEqual(server?.capabilities, ['pull', 'resolve', 'push']);
  });

  it('top-level settings apply to the default server when server is absent', () => {
    const { endpoints } = parseHostsToml(`capabilities = ["pull"]\nskip_verify = true\n`, { ...opts, domain: '127.0.0.1:5000' });
    assert.equal(endpoints.length, 1);
    assert.equal(endpoints[0]?.scheme, 'http');
    assert.equal(endpoints[0]?.host, '127.0.0.1:5000');
    assert.deepEqual(endpoints[0]?.capabilities, ['pull']);
    assert.equal(endpoints[0]?.skipVerify, true);
  });

  it('server path gets /v2 appended unless already there', () => {
    assert.equal(parseHostsToml(`server = "https://r.example.com/v2"`, opts).endpoints[0]?.path, '/v2');
    assert.equal(parseHostsToml(`server = "https://r.example.com/p/"`, opts).endpoints[0]?.path, '/p/v2');
  });

  it('warns about unknown keys', () => {
    const { warnings } = parseHostsToml(`sever = "x"\n[host."https://m"]\n  skip_verfy = true\n`, opts);
    assert.equal(warnings.length, 2);
    assert.match(warnings[0] ?? '', /"sever"/);
    assert.match(warnings[1] ?? '', /skip_verfy/);
  });

  const bad: [string, RegExp][] = [
    ['server = 5', /"server" must be a string/],
    ['server = "ftp://x"', /scheme must be http or https/],
    ['[host."https://m"]\ncapabilities = ["pull", "fly"]', /unknown capability "fly"/],
    ['[host."https://m"]\ncapabilities = "pull"', /capabilities: must be a list/],
    ['[host."https://m"]\nskip_verify = "yes"', /skip_verify: must be a boolean/],
    ['[host."https://m"]\nheader = { a = 1 }', /header\.a: must be a string/],
    // The same header rules as the daemon config's mirrors (one normaliser): no controls, token names.
    ['[host."https://m"]\nheader = { a = "x\\r\\nb: y" }', /header\.a: holds a control character/],
    ['[host."https://m"]\nheader = { "a b" = "x" }', /header\.a b: is not a valid header name/],
    ['[host."https://m"]\nca = 3', /ca: must be a path/],
    ['this is not toml', /invalid TOML/],
    ['[host."https://m"]\nclient = [["", "k.key"]]', /client/],
  ];
  it('an empty client key means the cert file holds the key too (containerd hosts.md example)', () => {
    const hosts = parseHostsToml('[host."https://m"]\nclient = [["/etc/certs/client.pem", ""]]', opts);
    assert.deepEqual(hosts.endpoints[0]?.clientCerts, [{ certFile: '/etc/certs/client.pem', keyFile: undefined }]);
  });
  for (const [text, re] of bad) {
    it(`rejects ${JSON.stringify(text)}`, () => {
      assert.throws(() => parseHostsToml(text, opts), (err: unknown) => err instanceof ConfigError && re.test(err.message));
    });
  }
});

describe('resolveHosts', () => {
  let dir = '';
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stargaze-hosts-'));
    await mkdir(join(dir, '127.0.0.1:5000'));
    await writeFile(join(dir, '127.0.0.1:5000', 'hosts.toml'), 'server = "http://127.0.0.1:5000"\n[host."http://127.0.0.1:6000"]\ncapabilities = ["pull"]\n');
    await mkdir(join(dir, '_default'));
    await writeFile(join(dir, '_default', 'hosts.toml'), '[host."https://cache.example.com"]\ncapabilities = ["pull"]\n');
    await mkdir(join(dir, 'nofile.example.com'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('uses the host directory with a port in its name', async () => {
    const r = await resolveHosts('127.0.0.1:5000', dir);
    assert.equal(r.source, join(dir, '127.0.0.1:5000', 'hosts.toml'));
    assert.deepEqual(
      r.endpoints.map((e) => `${e.scheme}://${e.host}`),
      ['http://127.0.0.1:6000', 'http://127.0.0.1:5000'],
    );
  });

  it('falls back to _default (also for a host dir without hosts.toml)', async () => {
    for (const domain of ['ghcr.io', 'nofile.example.com']) {
      const r = await resolveHosts(domain, dir);
      assert.equal(r.source, join(dir, '_default', 'hosts.toml'));
      assert.deepEqual(
        r.endpoints.map((e) => `${e.scheme}://${e.host}`),
        ['https://cache.example.com', `https://${domain}`],
      );
    }
  });

  it('a missing or absent hosts dir gives the default endpoint', async () => {
    for (const hostsDir of [undefined, join(dir, 'does-not-exist')]) {
      const r = await resolveHosts('127.0.0.1:5000', hostsDir);
      assert.equal(r.source, undefined);
      assert.equal(r.endpoints.length, 1);
      assert.equal(r.endpoints[0]?.scheme, 'http');
    }
  });
  it("config mirrors: in order, then the registry, pull and resolve; http when insecure or loopback; Docker Hub's API host", () => {
    const eps = configMirrorEndpoints('docker.io', [
      { host: 'mirror.example.com', insecure: false, requestTimeoutSec: 3, headers: { 'x-a': ['1'] } },
      { host: 'plain.example.com:5000', insecure: true, requestTimeoutSec: 0, headers: {} },
      { host: 'localhost:5000', insecure: false, requestTimeoutSec: 0, headers: {} },
    ]);
    assert.deepEqual(
      eps.map((e) => `${e.scheme}://${e.host}${e.path}`),
      ['https://mirror.example.com/v2', 'http://plain.example.com:5000/v2', 'http://localhost:5000/v2', 'https://registry-1.docker.io/v2'],
    );
    assert.ok(eps.every((e) => e.capabilities.join() === 'pull,resolve'));
    assert.deepEqual(eps[0]?.headers, { 'x-a': ['1'] });
    assert.equal(eps[0]?.requestTimeoutSec, 3);
  });
});
