/**
 * Default TLS trust with NODE_EXTRA_CA_CERTS handed over by the launcher (src/remote/trust.ts,
 * script/stargaze): a real node:https server whose CA is only in the extra-certs file, certificates made by
 * `openssl` in a temp dir. The registry client must trust it through STARGAZE_EXTRA_CA_CERTS exactly as
 * Node would through NODE_EXTRA_CA_CERTS, also beside a hosts.toml `ca`.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { connect as tlsConnect, type SecureContext } from 'node:tls';
import { RegistryClient } from '../../../src/remote/registry-client';
import { childEnv, DEFERRED_EXTRA_CA_ENV, secureContextFor } from '../../../src/remote/trust';

const run = promisify(execFile);
const REPO_ROOT = resolve(__dirname, '..', '..', '..', '..');

async function makeCa(dir: string, name: string): Promise<void> {
  await run('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(dir, `${name}.key`), '-out', join(dir, `${name}.crt`), '-days', '2', '-subj', `/CN=${name}`]);
}

async function makeServerCert(dir: string, issuer: string): Promise<void> {
  await run('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(dir, 'server.key'), '-out', join(dir, 'server.csr'), '-subj', '/CN=server']);
  await writeFile(join(dir, 'server.ext'), 'subjectAltName=IP:127.0.0.1\n');
  await run('openssl', ['x509', '-req', '-in', join(dir, 'server.csr'), '-CA', join(dir, `${issuer}.crt`), '-CAkey', join(dir, `${issuer}.key`), '-CAcreateserial', '-out', join(dir, 'server.crt'), '-days', '2', '-extfile', join(dir, 'server.ext')]);
}

describe('default TLS trust with deferred extra CA certificates', () => {
  let dir: string;
  let server: Server;
  let host: string;
  const saved = { deferred: process.env[DEFERRED_EXTRA_CA_ENV], node: process.env.NODE_EXTRA_CA_CERTS };

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stargaze-trust-'));
    await makeCa(dir, 'extra-ca');
    await makeCa(dir, 'other-ca');
    await makeServerCert(dir, 'extra-ca');
    // The extra-certs file holds a bundle: another CA first, then the one that signed the server.
    await writeFile(join(dir, 'bundle.pem'), (await readFile(join(dir, 'other-ca.crt'), 'utf8')) + (await readFile(join(dir, 'extra-ca.crt'), 'utf8')));
    server = createServer({ key: await readFile(join(dir, 'server.key')), cert: await readFile(join(dir, 'server.crt')) }, (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'docker-content-digest': 'x' }).end('{}');
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    host = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(async () => {
    process.env[DEFERRED_EXTRA_CA_ENV] = saved.deferred;
    if (saved.deferred === undefined) delete process.env[DEFERRED_EXTRA_CA_ENV];
    process.env.NODE_EXTRA_CA_CERTS = saved.node;
    if (saved.node === undefined) delete process.env.NODE_EXTRA_CA_CERTS;
    await new Promise<void>((r) => server.close(() => r()));
    await rm(dir, { recursive: true, force: true });
  });

  /** Whether a TLS handshake with the test server verifies under `secureContext` (undefined: Node's default). */
  async function verifies(secureContext: SecureContext | undefined): Promise<boolean> {
    const [hostname, port] = host.split(':') as [string, string];
    return new Promise((resolve) => {
      const socket = tlsConnect({ host: hostname, port: Number(port), ...(secureContext ? { secureContext } : {}) }, () => {
        socket.destroy();
        resolve(true);
      });
      socket.on('error', () => resolve(false));
    });
  }

  it("leaves Node its default context when there is nothing to add", async () => {
    assert.equal(await secureContextFor({ hostCas: [] }, { env: {} }), undefined);
    assert.equal(await secureContextFor({ hostCas: [] }, { env: { NODE_EXTRA_CA_CERTS: join(dir, 'bundle.pem') } }), undefined, 'Node loaded that one itself');
  });

  it('trusts the deferred certificates, and a host CA besides them; adds nothing to the default context', async () => {
    const env = { [DEFERRED_EXTRA_CA_ENV]: join(dir, 'bundle.pem') };
    const otherCa = await readFile(join(dir, 'other-ca.crt'));
    assert.equal(await verifies(undefined), false, "Node's default context does not know the test CA");
    assert.equal(await verifies(await secureContextFor({ hostCas: [] }, { env })), true);
    assert.equal(await verifies(await secureContextFor({ hostCas: [otherCa] }, { env })), true, 'a host CA adds to the deferred ones');
    assert.equal(await verifies(await secureContextFor({ hostCas: [otherCa] }, { env: {} })), false, 'and only adds: the test CA is still unknown');
    const signer = await readFile(join(dir, 'extra-ca.crt'));
    assert.equal(await verifies(await secureContextFor({ hostCas: [signer] }, { env: {} })), true, "a host CA on Node's default store");
    assert.equal(await verifies(undefined), false, 'certificates added to a context stay in it');
  });

  it("keeps Node's default store when it is the system's (--use-openssl-ca)", async () => {
    // The child's system store (SSL_CERT_FILE) holds the server's CA; the deferred file and the host CA do not.
    const trust = join(REPO_ROOT, 'dist', 'src', 'remote', 'trust.js');
    const script = `
      const tls = require('node:tls');
      const { secureContextFor } = require(${JSON.stringify(trust)});
      const [hostname, port] = ${JSON.stringify(host)}.split(':');
      (async () => {
        const secureContext = await secureContextFor({ hostCas: [require('node:fs').readFileSync(${JSON.stringify(join(dir, 'other-ca.crt'))})] });
        const socket = tls.connect({ host: hostname, port: Number(port), secureContext }, () => { console.log('verified'); socket.destroy(); });
        socket.on('error', (err) => console.log(err.code));
      })();`;
    const { stdout } = await run(process.execPath, ['--use-openssl-ca', '-e', script], {
      env: { PATH: process.env.PATH, SSL_CERT_FILE: join(dir, 'extra-ca.crt'), [DEFERRED_EXTRA_CA_ENV]: join(dir, 'other-ca.crt') },
    });
    assert.equal(stdout.trim(), 'verified');
  });

  it('default trust is one SecureContext per process; a host CA gets its own', async () => {
    const env = { [DEFERRED_EXTRA_CA_ENV]: join(dir, 'bundle.pem') };
    const a = await secureContextFor({ hostCas: [] }, { env });
    assert.ok(a !== undefined);
    assert.equal(await secureContextFor({ hostCas: [] }, { env }), a, 'built once');
    assert.notEqual(await secureContextFor({ hostCas: [await readFile(join(dir, 'other-ca.crt'))] }, { env }), a);
  });

  it('an unreadable file is ignored with a warning, as Node does', async () => {
    const warnings: string[] = [];
    const onWarning = (w: Error): void => void warnings.push(w.message);
    process.on('warning', onWarning);
    try {
      const context = await secureContextFor({ hostCas: [] }, { env: { [DEFERRED_EXTRA_CA_ENV]: join(dir, 'missing.pem') } });
      assert.ok(context !== undefined);
      assert.equal(await verifies(context), false);
      await new Promise((r) => setImmediate(r));
      assert.ok(warnings.some((w) => w.includes('missing.pem')), warnings.join('; '));
    } finally {
      process.off('warning', onWarning);
    }
  });

  it('a certificate in the deferred file that does not parse does not stop the others from counting', async () => {
    const mixed = join(dir, 'mixed.pem');
    const broken = '-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n';
    await writeFile(mixed, broken + (await readFile(join(dir, 'extra-ca.crt'), 'utf8')));
    assert.equal(await verifies(await secureContextFor({ hostCas: [] }, { env: { [DEFERRED_EXTRA_CA_ENV]: mixed } })), true);
  });

  it('a child that is not stargaze gets NODE_EXTRA_CA_CERTS back', () => {
    assert.deepEqual(childEnv({ env: { PATH: '/bin', [DEFERRED_EXTRA_CA_ENV]: '/ca.pem' } }), { PATH: '/bin', NODE_EXTRA_CA_CERTS: '/ca.pem' });
    const untouched = { PATH: '/bin', NODE_EXTRA_CA_CERTS: '/ca.pem' };
    assert.equal(childEnv({ env: untouched }), untouched);
  });

  it('the registry client trusts a server signed by a CA of the deferred file, and not without it', async () => {
    delete process.env.NODE_EXTRA_CA_CERTS;
    delete process.env[DEFERRED_EXTRA_CA_ENV];
    // HTTPS only (no hosts.toml `ca`): a loopback host would otherwise be tried over plain HTTP too.
    const hostsDir = join(dir, 'hosts');
    await mkdir(join(hostsDir, host), { recursive: true });
    await writeFile(join(hostsDir, host, 'hosts.toml'), `server = "https://${host}"\n`);
    const options = { hostsDir, requestTimeoutMs: 10_000, retry: { maxRetries: 0 } };
    const untrusting = new RegistryClient(options);
    try {
      await assert.rejects(untrusting.fetchManifest(`${host}/test/repo:v1`), /certificate|self-signed|issuer/i);
    } finally {
      await untrusting.close();
    }
    process.env[DEFERRED_EXTRA_CA_ENV] = join(dir, 'bundle.pem');
    const trusting = new RegistryClient(options);
    try {
      const manifest = await trusting.fetchManifest(`${host}/test/repo:v1`);
      assert.equal(manifest.body.toString(), '{}');
    } finally {
      await trusting.close();
    }
  });

  it('the launcher hands NODE_EXTRA_CA_CERTS over instead of letting Node parse it at start', async () => {
    // A stand-in for node that prints the environment it was started with.
    const fakeNode = join(dir, 'fake-node');
    await writeFile(fakeNode, '#!/bin/sh\necho "node=${NODE_EXTRA_CA_CERTS:-unset} stargaze=${STARGAZE_EXTRA_CA_CERTS:-unset} args=$*"\n');
    await chmod(fakeNode, 0o755);
    const launcher = join(REPO_ROOT, 'script', 'stargaze');
    // The launcher finds the app beside itself without forking readlink or dirname: script/.. as it is.
    const cli = `${join(REPO_ROOT, 'script')}/../dist/src/cli.js`;
    // Its own rpull directory, so that rpull's launcher join leaves nothing in the host's.
    const rpullDir = join(dir, 'rpull');
    const env = { PATH: process.env.PATH, STARGAZE_NODE: fakeNode, STARGAZE_RPULL_DIR: rpullDir };
    const withVar = await run(launcher, ['rpull', 'x'], { env: { ...env, NODE_EXTRA_CA_CERTS: '/some/bundle.pem' } });
    assert.equal(withVar.stdout.trim(), `node=unset stargaze=/some/bundle.pem args=${cli} rpull x`);
    const without = await run(launcher, ['--version'], { env });
    assert.equal(without.stdout.trim(), `node=unset stargaze=unset args=${cli} --version`);
  });
});
