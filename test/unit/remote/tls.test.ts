/**
 * hosts.toml TLS settings against real HTTPS servers (node:https), with certificates made by `openssl` in a
 * temp dir: `client` with several certificates (the server takes only the second), `ca` with several files,
 * `skip_verify`. Servers refuse a client certificate in the three ways seen in practice: TLS 1.3 (connection
 * closed after the handshake), TLS 1.2 (handshake reset), and an HTTP 400 from a server that checks the
 * certificate itself (nginx `ssl_verify_client`).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TLSSocket } from 'node:tls';
import { promisify } from 'node:util';
import { after, before, describe, it } from 'node:test';
import { RegistryError } from '../../../src/errors';
import { certVerdictOfError, certVerdictOfStatus, ClientCertChoice } from '../../../src/remote/client-certs';
import { RegistryClient } from '../../../src/remote/registry-client';

const run = promisify(execFile);
const BLOB = randomBytes(50_000);
const DIGEST = `sha256:${createHash('sha256').update(BLOB).digest('hex')}`;
const REPO = 'test/repo';

/** CA `name` (self-signed), or a leaf `name` signed by CA `issuer` (for a server: SANs localhost, 127.0.0.1). */
async function makeCert(dir: string, name: string, issuer?: string, server = false): Promise<void> {
  const key = join(dir, `${name}.key`);
  const crt = join(dir, `${name}.crt`);
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key];
  if (issuer === undefined) {
    await run('openssl', ['req', '-x509', ...ec, '-out', crt, '-days', '2', '-subj', `/CN=${name}`]);
    return;
  }
  const csr = join(dir, `${name}.csr`);
  await run('openssl', ['req', ...ec, '-out', csr, '-subj', `/CN=${name}`]);
  const ext = join(dir, `${name}.ext`);
  await writeFile(ext, server ? 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' : 'extendedKeyUsage=clientAuth\n');
  await run('openssl', ['x509', '-req', '-in', csr, '-CA', join(dir, `${issuer}.crt`), '-CAkey', join(dir, `${issuer}.key`), '-CAcreateserial', '-out', crt, '-days', '2', '-extfile', ext]);
}

interface TlsServer {
  host: string;
  /** CNs of client certificates that reached a request, in order. */
  served: string[];
  /** TLS handshakes the server refused. */
  refused: number;
  close(): Promise<void>;
}

/**
 * A registry that serves BLOB to clients presenting a certificate of CA `c2ca` only. `mode`: 'tls13' and
 * 'tls12' refuse in the handshake; 'http' completes it and answers 400 (nginx style).
 */
async function startServer(dir: string, mode: 'tls13' | 'tls12' | 'http'): Promise<TlsServer> {
  const state = { served: [] as string[], refused: 0 };
  const server: Server = createServer(
    {
      key: await readFile(join(dir, 'server.key')),
      cert: await readFile(join(dir, 'server.crt')),
      ca: [await readFile(join(dir, 'c2ca.crt'))],
      requestCert: true,
      rejectUnauthorized: mode !== 'http',
      maxVersion: mode === 'tls12' ? 'TLSv1.2' : 'TLSv1.3',
    },
    (req, res) => {
      const socket = req.socket as TLSSocket;
      if (!socket.authorized) {
        res.writeHead(400).end('The SSL certificate error');
        return;
      }
      state.served.push(String(socket.getPeerCertificate().subject.CN));
      if (req.url === `/v2/${REPO}/blobs/${DIGEST}`) res.writeHead(200, { 'content-length': BLOB.length }).end(BLOB);
      else res.writeHead(404).end();
    },
  );
  server.on('tlsClientError', () => state.refused++);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    host: `127.0.0.1:${port}`,
    get served() {
      return state.served;
    },
    get refused() {
      return state.refused;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

async function fetchAll(client: RegistryClient, host: string): Promise<Buffer> {
  const blob = await client.fetchBlob(`${host}/${REPO}`, DIGEST);
  const parts: Buffer[] = [];
  for await (const c of blob.body) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

describe('hosts.toml TLS: client certificates, ca, skip_verify', () => {
  let dir: string;
  const clients: RegistryClient[] = [];
  const servers: TlsServer[] = [];

  /** A client whose hosts dir has `toml` for `host`. */
  async function clientFor(host: string, toml: string): Promise<RegistryClient> {
    const hostsDir = await mkdtemp(join(dir, 'hosts-'));
    await mkdir(join(hostsDir, host));
    await writeFile(join(hostsDir, host, 'hosts.toml'), `server = "https://${host}"\n${toml}`);
    const client = new RegistryClient({ hostsDir, requestTimeoutMs: 10_000, retry: { maxRetries: 0 } });
    clients.push(client);
    return client;
  }

  async function server(mode: 'tls13' | 'tls12' | 'http'): Promise<TlsServer> {
    const s = await startServer(dir, mode);
    servers.push(s);
    return s;
  }

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stargaze-tls-'));
    for (const ca of ['srvca', 'otherca', 'c1ca', 'c2ca']) await makeCert(dir, ca);
    await makeCert(dir, 'server', 'srvca', true);
    await makeCert(dir, 'c1', 'c1ca');
    await makeCert(dir, 'c2', 'c2ca');
    // The single-file form: certificate and key in one PEM.
    for (const c of ['c1', 'c2']) await writeFile(join(dir, `${c}.pem`), Buffer.concat([await readFile(join(dir, `${c}.crt`)), await readFile(join(dir, `${c}.key`))]));
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await Promise.all(servers.map((s) => s.close()));
    await rm(dir, { recursive: true, force: true });
  });

  const twoCerts = (d: () => string): string => `ca = ["${d()}/otherca.crt", "${d()}/srvca.crt"]\nclient = [["${d()}/c1.crt", "${d()}/c1.key"], ["${d()}/c2.crt", "${d()}/c2.key"]]\n`;

  for (const mode of ['tls13', 'tls12', 'http'] as const) {
    it(`${mode}: of two client certificates the second is taken, then used first; the first alone fails`, async () => {
      const s = await server(mode);
      const client = await clientFor(s.host, twoCerts(() => dir));
      assert.deepEqual(await fetchAll(client, s.host), BLOB);
      assert.deepEqual(s.served, ['c2']);
      const refusedBefore = s.refused;
      // Remembered: later requests (new connections too) go straight to the second certificate.
      await Promise.all([fetchAll(client, s.host), fetchAll(client, s.host), fetchAll(client, s.host)]);
      assert.deepEqual(s.served, ['c2', 'c2', 'c2', 'c2']);
      assert.equal(s.refused, refusedBefore, 'no more refused handshakes once the accepted certificate is known');

      // What the first-only behaviour did: present c1 and fail.
      const firstOnly = await clientFor(s.host, `ca = "${dir}/srvca.crt"\nclient = [["${dir}/c1.crt", "${dir}/c1.key"]]\n`);
      await assert.rejects(fetchAll(firstOnly, s.host), (err: unknown) => err instanceof RegistryError);
    });
  }

  it('client as one PEM path, and as a list of paths', async () => {
    const s = await server('tls13');
    assert.deepEqual(await fetchAll(await clientFor(s.host, `ca = "${dir}/srvca.crt"\nclient = "${dir}/c2.pem"\n`), s.host), BLOB);
    assert.deepEqual(await fetchAll(await clientFor(s.host, `ca = "${dir}/srvca.crt"\nclient = ["${dir}/c1.pem", "${dir}/c2.pem"]\n`), s.host), BLOB);
  });

  it('two client certificates, none accepted: the error names the host and says both were tried', async () => {
    const s = await server('tls13');
    const client = await clientFor(s.host, `ca = "${dir}/srvca.crt"\nclient = [["${dir}/c1.crt", "${dir}/c1.key"], ["${dir}/server.crt", "${dir}/server.key"]]\n`);
    await assert.rejects(fetchAll(client, s.host), /request to 127\.0\.0\.1:\d+ failed: .*\(tried 2 client certificates\)/);
  });

  it('ca: the server CA in any of several files is trusted; without it the server is not; skip_verify trusts it anyway', async () => {
    const s = await server('tls13');
    const c2 = `client = [["${dir}/c2.crt", "${dir}/c2.key"]]\n`;
    await assert.rejects(fetchAll(await clientFor(s.host, `ca = "${dir}/otherca.crt"\n${c2}`), s.host), /certificate|self.signed|issuer/i);
    assert.deepEqual(await fetchAll(await clientFor(s.host, `ca = ["${dir}/otherca.crt", "${dir}/srvca.crt"]\n${c2}`), s.host), BLOB);
    assert.deepEqual(await fetchAll(await clientFor(s.host, `skip_verify = true\n${c2}`), s.host), BLOB);
  });

  it('which outcomes move on to the next certificate', () => {
    const alert = Object.assign(new Error('alert'), { code: 'ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED' });
    const closed = Object.assign(new Error('other side closed'), { code: 'UND_ERR_SOCKET' });
    const refusedConn = Object.assign(new Error('connect'), { code: 'ECONNREFUSED' });
    assert.equal(certVerdictOfError(alert), 'refused');
    assert.equal(certVerdictOfError(new Error('wrapped', { cause: closed })), 'maybe-refused');
    assert.equal(certVerdictOfError(refusedConn), undefined);
    assert.equal(certVerdictOfStatus(403), 'maybe-refused');
    assert.equal(certVerdictOfStatus(401), 'accepted');
    const choice = new ClientCertChoice();
    assert.deepEqual(choice.order('k', 3), [0, 1, 2]);
    assert.ok(choice.shouldTryNext('k', 'maybe-refused'));
    choice.accept('k', 2);
    assert.deepEqual(choice.order('k', 3), [2, 0, 1]);
    assert.ok(choice.shouldTryNext('k', 'refused'), 'a TLS alert always moves on');
    assert.ok(!choice.shouldTryNext('k', 'maybe-refused'), 'once a certificate was accepted, a closed connection or a 403 stands');
  });
});
