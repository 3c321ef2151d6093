/**
 * Prefetch profiles shared through the registry (issue 15, "Share"), with real registry (Debian's
 * docker-registry 2.8: no referrers API, so the referrers tag schema), containerd, runc and FUSE:
 * - a first container start records the profiles; `stargaze profile push` uploads them as an OCI artifact;
 * - `skopeo inspect --raw` shows the artifact (a plain OCI manifest with artifactType and subject), and the
 *   `sha256-<hex>` tag's index lists it;
 * - a second daemon with an empty root and a fresh containerd (a new node) fetches it on a `stargaze rpull` and
 *   has fetched exactly the profiled members (counted at the registry) when `ctr containers create` returns,
 *   before the container's first read;
 * - an image nobody pushed a profile for mounts at once and works; a registry slow to answer the lookup delays
 *   a mount by at most `fetch_timeout_msec` (a delaying proxy in front of the real registry: a real one cannot
 *   be made slow on demand); a corrupt artifact is one log line and the layer mounts as without a profile.
 *
 * One daemon and one containerd at a time: the recording pair is stopped before the fresh one starts.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import { readToc } from '../../src/estargz/toc';
import { buildLayerTree } from '../../src/metadata/layer-tree';
import { ARTIFACT_TYPE, EMPTY_DESCRIPTOR, buildProfileArtifact, mergeReferrersIndex, referrersTag, sha256Digest } from '../../src/profile/profile-artifact';
import { parseProfile, type PrefetchProfile } from '../../src/profile/profile-format';
import { BufferBlobSource } from '../../src/remote/blob-source';
import {
  DEFAULT_CLI_PATH,
  REPO_ROOT,
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  buildBusyboxImage,
  fetchManifest,
  makeTmpRoot,
  run,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  waitFor,
  withHost,
  rangeOf,
  unionOf,
  type BlobRequest,
  type ByteRange,
  type Containerd,
  type LogEntry,
  type Registry,
  type StargazeDaemon,
} from './harness';

const notRoot = process.getuid?.() !== 0;
const KiB = 1024;
const MiB = 1024 * KiB;
const SCRIPT = 'cat /app/a.bin /app/b.bin | wc -c; cat /app/top.txt\n';
const WORKLOAD = ['/bin/sh', '/app/run.sh'];
const WORKLOAD_OUT = `${300 * KiB + 3 * MiB}\ntop\n`;
/**
 * The bound a mount waits for the registry's profile: room for the lookup's round trips on a loaded CI machine,
 * where 400 ms was sometimes passed (the mount then rightly went on without the profile, and the test failed).
 */
const FETCH_TIMEOUT_MS = 1500;
/** Short recording windows: the test waits for them to close. The fetching nodes record nothing. */
const RECORD_CONFIG = 'no_background_fetch = true\n[prefetch_profile]\nquiet_msec = 500\n';
const FETCH_CONFIG = `no_background_fetch = true\n[prefetch_profile]\nrecord = false\nfetch_timeout_msec = ${FETCH_TIMEOUT_MS}\n`;
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

async function stargaze(args: string[]): Promise<string> {
  return (await run(process.execPath, [DEFAULT_CLI_PATH, ...args], { cwd: REPO_ROOT, timeoutMs: 120_000 })).stdout;
}

/** A proxy to `upstream` that holds referrers lookups (API and tag schema) for `delayMs`; the rest goes through. */
async function startSlowLookupProxy(upstream: string, delayMs: number): Promise<{ host: string; close(): void }> {
  const [hostname, port] = upstream.split(':');
  const server = http.createServer((req, res) => {
    const url = req.url ?? '/';
    const lookup = url.includes('/referrers/') || /\/manifests\/sha256-[0-9a-f]{64}$/.test(url);
    const go = (): void => {
      const up = http.request({ hostname, port: Number(port), method: req.method, path: url, headers: req.headers }, (r) => {
        res.writeHead(r.statusCode ?? 502, r.headers);
        r.pipe(res);
      });
      up.on('error', () => res.destroy());
      req.pipe(up);
    };
    if (lookup) setTimeout(go, delayMs);
    else go();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    host: `127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

describe('prefetch profiles shared through the registry', { skip: notRoot && 'e2e tests need root' }, () => {
  const cleanup = suiteScope();
  let registry: Registry;
  /** The image, pulled through the counting proxy. */
  let esgzRef: string;
  let manifestDigest: string;
  let base: { digest: string; size: number; blob: Buffer };
  /** The same files converted with another chunk size: other layer digests, another manifest, no profile. */
  let otherRef: string;
  let otherManifestDigest: string;
  let otherManifestSize: number;
  let otherBase: string;
  let otherBaseToc: string;
  let artifactDigest: string;
  /** The base layer's profile as the recording node stored it. */
  let recorded: PrefetchProfile;

  before(async () => {
    registry = await startRegistry({ scope: cleanup });
    await buildBusyboxImage({
      host: registry.host,
      repo: 'share/app',
      tag: 'v1',
      extraFiles: [
        { path: '/app/a.bin', content: randomBytes(300 * KiB) },
        { path: '/app/data/unread.bin', content: randomBytes(8 * MiB) },
        { path: '/app/b.bin', content: randomBytes(3 * MiB) },
      ],
      layers: [
        [
          { path: '/app/top.txt', content: 'top\n' },
          { path: '/app/run.sh', content: SCRIPT },
        ],
      ],
    });
    for (const [tag, chunk] of [['esgz', 1 * MiB], ['other', 512 * KiB]] as const) {
      await run(process.execPath, [DEFAULT_CLI_PATH, 'convert', '--quiet', '--plain-http', '--chunk-size', String(chunk), `${registry.host}/share/app:v1`, `${registry.host}/share/app:${tag}`], {
        cwd: REPO_ROOT,
        timeoutMs: 120_000,
      });
    }
    esgzRef = withHost(`${registry.host}/share/app:esgz`, registry.countingHost);
    otherRef = withHost(`${registry.host}/share/app:other`, registry.countingHost);
    const esgz = await fetchManifest(registry.host, 'share/app', 'esgz');
    manifestDigest = esgz.digest;
    const layer = esgz.manifest.layers[0]!;
    const res = await fetch(`http://${registry.host}/v2/share/app/blobs/${layer.digest}`);
    base = { digest: layer.digest, size: layer.size, blob: Buffer.from(await res.arrayBuffer()) };
    const other = await fetchManifest(registry.host, 'share/app', 'other');
    otherManifestDigest = other.digest;
    const raw = await fetch(`http://${registry.host}/v2/share/app/manifests/other`, { headers: { accept: OCI_MANIFEST } });
    otherManifestSize = (await raw.arrayBuffer()).byteLength;
    otherBase = other.manifest.layers[0]!.digest;
    otherBaseToc = other.manifest.layers[0]!.annotations?.['containerd.io/snapshot/stargz/toc.digest'] ?? '';
  });

  /** `stargaze rpull` through the daemon's pull socket, as users run it. */
  async function rpull(daemon: StargazeDaemon, containerd: Containerd, ref: string, ns: string): Promise<number> {
    const started = Date.now();
    await run(STARGAZE_COMMAND, ['rpull', '--address', containerd.address, '--plain-http', '--pull-address', daemon.pullAddress, '--namespace', ns, ref], {
      env: STARGAZE_COMMAND_ENV,
      timeoutMs: 120_000,
    });
    return Date.now() - started;
  }

  test('a recorded profile is pushed as an artifact that skopeo shows, listed under the referrers tag', async (t) => {
    const daemon = await startDaemon({ scope: t, config: RECORD_CONFIG });
    const containerd = await startContainerd({ scope: t, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    const ns = containerd.newNamespace('record');
    await containerd.rpull(esgzRef, { namespace: ns });
    const r = await containerd.runContainer(esgzRef, WORKLOAD, { namespace: ns, snapshotter: 'stargz', id: containerd.uniqueId('record') });
    assert.equal(r.stdout, WORKLOAD_OUT);
    await daemon.waitForLog((e) => e.msg === 'prefetch profile recorded' && e.layer === base.digest, { what: 'the base layer profile', timeoutMs: 30_000 });
    const keys = (await stargaze(['profile', 'ls', '--root', daemon.root])).trim().split('\n').slice(1).map((row) => row.split(/\s+/)[0]!);
    const work = await makeTmpRoot('profile-share', t);
    for (const key of keys) {
      const file = path.join(work, `${key}.json`);
      await stargaze(['profile', 'export', key, file, '--root', daemon.root]);
      const p = parseProfile(await readFile(file));
      if (p.layer === base.digest) recorded = p;
    }
    assert.ok(recorded !== undefined, 'the base layer has a profile');

    // Pushed to the registry itself: the image's manifest is the same whichever host it is named by.
    const pushed = (await stargaze(['profile', 'push', `${registry.host}/share/app:esgz`, '--plain-http', '--root', daemon.root])).trim();
    assert.match(pushed, /^sha256:[0-9a-f]{64}$/);
    artifactDigest = pushed;

    const raw = JSON.parse((await run('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${registry.host}/share/app@${artifactDigest}`], { timeoutMs: 60_000 })).stdout) as {
      mediaType: string;
      artifactType: string;
      config: unknown;
      subject: { digest: string; mediaType: string };
      layers: Array<{ annotations: Record<string, string>; digest: string }>;
    };
    assert.equal(raw.mediaType, OCI_MANIFEST);
    assert.equal(raw.artifactType, ARTIFACT_TYPE);
    assert.deepEqual(raw.config, EMPTY_DESCRIPTOR);
    assert.equal(raw.subject.digest, manifestDigest, 'its subject is the image manifest');
    assert.ok(raw.layers.length >= 2, 'a profile blob per layer read');
    const baseBlob = raw.layers.find((l) => l.annotations['dev.stargaze.prefetch-profile.layer'] === base.digest);
    assert.ok(baseBlob, 'the base layer has a profile blob');

    const index = JSON.parse((await run('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${registry.host}/share/app:${referrersTag(manifestDigest)}`], { timeoutMs: 60_000 })).stdout) as {
      mediaType: string;
      manifests: Array<{ digest: string; artifactType: string; mediaType: string }>;
    };
    assert.equal(index.mediaType, OCI_INDEX);
    assert.deepEqual(
      index.manifests.map((m) => [m.digest, m.artifactType, m.mediaType]),
      [[artifactDigest, ARTIFACT_TYPE, OCI_MANIFEST]],
    );
  });

  describe('on a new node (empty root, fresh containerd)', () => {
    let daemon: StargazeDaemon;
    let containerd: Containerd;
    const scope = suiteScope();

    before(async () => {
      assert.ok(artifactDigest !== undefined, 'the push test pushed the artifact');
      daemon = await startDaemon({ scope, config: FETCH_CONFIG });
      containerd = await startContainerd({ scope, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    });

    /** rpull, create, start in a new namespace; what the registry served before the first read; the logs. */
    async function pullCreateStart(ref: string, label: string, layer: string): Promise<{ beforeFirstRead: BlobRequest[]; logs: LogEntry[]; output: string; pullMs: number }> {
      const logsBefore = daemon.logs().length;
      const ns = containerd.newNamespace(label);
      const id = containerd.uniqueId(label);
      registry.resetCounters();
      const pullMs = await rpull(daemon, containerd, ref, ns);
      await containerd.ctr(['containers', 'create', '--snapshotter', 'stargz', ref, id, ...WORKLOAD], { namespace: ns });
      const beforeFirstRead = registry.blobRequests();
      const started = await containerd.ctr(['tasks', 'start', id], { namespace: ns });
      await containerd.ctr(['containers', 'rm', id], { namespace: ns });
      await containerd.removeImages([ref], { namespace: ns });
      await waitFor('the base layer unmounted', () => daemon.logs().slice(logsBefore).some((e) => e.msg === 'layer unmounted' && e.layer === layer), { timeoutMs: 30_000 });
      return { beforeFirstRead, logs: daemon.logs().slice(logsBefore), output: started.stdout, pullMs };
    }

    test('stargaze rpull fetches the pushed profile; create has prefetched exactly its members before the first read', async () => {
      const { beforeFirstRead, logs, output } = await pullCreateStart(esgzRef, 'fetch', base.digest);
      assert.equal(output, WORKLOAD_OUT);
      const fetched = logs.filter((e) => e.msg === 'prefetch profile fetched from the registry');
      assert.ok(
        fetched.some((e) => e.layer === base.digest),
        `the base layer's profile came from the registry: ${JSON.stringify(logs.filter((e) => /profile/.test(String(e.msg))))}`,
      );
      const lookups = logs.filter((e) => e.msg === 'prefetch profile artifact found at the registry');
      assert.equal(lookups.length, 1, 'the referrers were looked up once for the image');
      assert.equal(lookups[0]!.via, 'tag schema', 'docker-registry 2.8 has no referrers API');

      const { toc, tocOffset } = await readToc(new BufferBlobSource(base.digest, base.blob));
      const tree = buildLayerTree(toc, { blobSize: base.size, tocOffset });
      const members: ByteRange[] = recorded.entries.map((e) => {
        const c = tree.resolvePath(e.name)!.chunks.find((x) => x.fileOffset === e.offset)!;
        return [c.compressedOffset, c.compressedEnd];
      });
      const gets = beforeFirstRead.filter((q) => q.digest === base.digest && q.method === 'GET');
      assert.ok(gets.every((q) => rangeOf(q, base.size) !== undefined), `every blob GET asks for one range: ${JSON.stringify(gets)}`);
      const ranges = gets.map((q) => rangeOf(q, base.size)!);
      const tail = ranges.find((r) => r[1] === base.size);
      assert.ok(tail, `the tail was read: ${JSON.stringify(ranges)}`);
      const expected = unionOf(members.map(([a, b]): ByteRange => [a, Math.min(b, tail[0])]).filter(([a, b]) => a < b));
      assert.deepEqual(unionOf(ranges.filter((r) => r !== tail)), expected, 'the registry served exactly the profiled members before the first read');
      assert.ok(expected.length >= 2, 'the unread file in between is skipped');
      const done = logs.find((e) => e.msg === 'prefetch done' && e.layer === base.digest);
      assert.equal(done?.profileChunks, recorded.entries.length, 'the fetched profile was replayed, all of it');

      // Stored on this node under the mount's key: the next pull uses it without asking the registry.
      const ls = await stargaze(['profile', 'ls', '--root', daemon.root]);
      assert.ok(ls.includes(base.digest), ls);
    });

    test('an image nobody pushed a profile for mounts without waiting and works', async () => {
      const { logs, output } = await pullCreateStart(otherRef, 'none', otherBase);
      assert.equal(output, WORKLOAD_OUT);
      const none = logs.filter((e) => e.msg === 'no prefetch profile at the registry');
      assert.equal(none.length, 1, 'looked up once for the image');
      assert.equal(none[0]!.manifest, otherManifestDigest);
      assert.ok((none[0]!.ms as number) < FETCH_TIMEOUT_MS, `two 404s answered in ${String(none[0]!.ms)} ms`);
      assert.ok(!logs.some((e) => e.msg === 'prefetch done' && e.layer === otherBase), 'nothing prefetched: no landmark, no profile');
    });

    test('a registry slow to answer the lookup delays each mount by at most fetch_timeout_msec (a delaying proxy)', async (t) => {
      const DELAY_MS = 8_000;
      const slow = await startSlowLookupProxy(registry.host, DELAY_MS);
      t.after(() => slow.close());
      // A fresh manifest digest for this daemon: the lookup of `other` above is remembered.
      const ref = withHost(`${registry.host}/share/app:other`, slow.host);
      const { logs, output, pullMs } = await pullCreateStart(ref, 'slow', otherBase);
      assert.equal(output, WORKLOAD_OUT);
      const waited = logs.filter((e) => e.msg === 'no prefetch profile from the registry within fetch_timeout_msec; mounting without one');
      assert.ok(waited.length >= 1, 'the mount stopped waiting');
      for (const w of waited) assert.ok((w.ms as number) < FETCH_TIMEOUT_MS + 300, `waited ${String(w.ms)} ms`);
      assert.ok(pullMs < DELAY_MS, `the pull took ${pullMs} ms, less than one slow answer`);
    });

    test('a corrupt artifact: one log line, and the layer mounts as without a profile', async () => {
      // Pushed as profile push would, but the base layer's profile blob is not a profile.
      const garbage = Buffer.from('{"version": 1, "entries": [');
      const subject = { mediaType: OCI_MANIFEST, digest: otherManifestDigest, size: otherManifestSize };
      const fake = buildProfileArtifact(subject, [{ ...recorded, layer: otherBase, tocDigest: otherBaseToc }], new Date());
      const doc = JSON.parse(fake.manifest.toString()) as { layers: Array<{ digest: string; size: number }> };
      doc.layers[0] = { ...doc.layers[0]!, digest: sha256Digest(garbage), size: garbage.length };
      const manifest = Buffer.from(JSON.stringify(doc));
      for (const [digest, bytes] of [[EMPTY_DESCRIPTOR.digest, Buffer.from('{}')], [sha256Digest(garbage), garbage]] as const) await putBlob(digest, bytes);
      const digest = sha256Digest(manifest);
      await putManifest(digest, OCI_MANIFEST, manifest);
      await putManifest(referrersTag(otherManifestDigest), OCI_INDEX, mergeReferrersIndex(undefined, { ...fake.descriptor, digest, size: manifest.length }).body);
      // A new node again: this one remembers that `other` had no profile.
      const fresh = await startDaemon({ scope, config: FETCH_CONFIG });
      const freshContainerd = await startContainerd({ scope, stargazeAddress: fresh.address, stargazeRoot: fresh.root });
      const ns = freshContainerd.newNamespace('corrupt');
      await rpull(fresh, freshContainerd, otherRef, ns);
      const r = await freshContainerd.runContainer(otherRef, WORKLOAD, { namespace: ns, snapshotter: 'stargz', id: freshContainerd.uniqueId('corrupt') });
      assert.equal(r.stdout, WORKLOAD_OUT, 'the container runs');
      const mounted = fresh.logs().find((e) => e.msg === 'layer mounted' && e.layer === otherBase);
      assert.ok(mounted, 'the base layer was mounted');
      const ofMount = fresh.logs().filter((e) => e.mountpoint === mounted.mountpoint);
      const about = ofMount.filter((e) => typeof e.msg === 'string' && /profile/.test(e.msg) && e.msg !== 'prefetch profile artifact found at the registry');
      assert.deepEqual(about.map((e) => [e.level, e.msg]), [['warn', 'prefetch profile from the registry unusable; mounting without it']], 'one log line about the profile');
      assert.ok(!ofMount.some((e) => e.msg === 'prefetch done'), 'nothing prefetched, as without a profile');
    });

    async function putBlob(digest: string, bytes: Buffer): Promise<void> {
      const start = await fetch(`http://${registry.host}/v2/share/app/blobs/uploads/`, { method: 'POST' });
      assert.equal(start.status, 202);
      const url = new URL(start.headers.get('location')!, `http://${registry.host}`);
      url.searchParams.set('digest', digest);
      const put = await fetch(url, { method: 'PUT', headers: { 'content-type': 'application/octet-stream' }, body: bytes });
      assert.equal(put.status, 201, await put.text());
    }

    async function putManifest(tag: string, mediaType: string, body: Buffer): Promise<void> {
      const put = await fetch(`http://${registry.host}/v2/share/app/manifests/${tag}`, { method: 'PUT', headers: { 'content-type': mediaType }, body });
      assert.equal(put.status, 201, await put.text());
    }
  });
});
