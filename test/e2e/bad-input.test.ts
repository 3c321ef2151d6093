/**
 * Hostile layers: truncated blobs, broken footers and TOCs, lying digests, unsafe or duplicate names,
 * oversized TOCs. Each sits as the top layer of its own image over a good eStargz busybox base and is
 * pulled with `ctr-remote images rpull` through containerd into the daemon. Every case ends either in a
 * clean fallback (a `remote-snapshot-prepared: "false"` log line whose reason names the problem, and
 * containerd unpacks the layer itself — or fails to, when the blob is broken for any unpacker), or, for
 * a lying chunk digest, in a mount whose bad file reads as EIO while the rest reads fine. After every
 * case the same daemon process still serves a container from the good image, reading a file nothing
 * has read before (so the FUSE path is really exercised, not the page cache).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { before, describe, test } from 'node:test';

import { encodeFooter, FOOTER_SIZE_BYTES } from '../../src/estargz/footer';
import { MAX_TOC_BYTES, MAX_TOC_ENTRIES } from '../../src/estargz/toc';
import {
  STARGZ_SNAPSHOTTER,
  busyboxEntries,
  makeTmpRoot,
  materializeEntries,
  packLayer,
  startContainerd,
  startDaemon,
  startRegistry,
  suiteScope,
  type Containerd,
  type LogEntry,
  type Registry,
  type StargazeDaemon,
} from './harness';
import {
  diffIdOf,
  editToc,
  estargzAnnotations,
  estargzFromFile,
  estargzLayer,
  pushRawImage,
  replaceToc,
  sha256,
  tocMember,
  tocOf,
  type EstargzBlob,
  type RawEntry,
  type RawImage,
  type RawLayer,
} from './harness/raw-image';

const notRoot = process.getuid?.() !== 0;
const PREPARED = 'remote-snapshot-prepared';
const stargz = { snapshotter: STARGZ_SNAPSHOTTER };

type TocObject = { version: number; entries: Array<Record<string, unknown>> };

/** What a case must end in. */
type Expectation =
  /** Fallback, and containerd unpacks the layer itself: a container sees `/<case>/file.txt`. */
  | { kind: 'fallback'; reason: RegExp }
  /** Fallback, and containerd's own unpack fails too: the blob is broken for everyone. */
  | { kind: 'fallback-pull-fails'; reason: RegExp }
  /** Mounted lazily; `check` runs containers against it. */
  | { kind: 'mounted'; check: (ctx: CaseContext) => Promise<void> };

interface CaseContext {
  image: RawImage;
  slug: string;
}

interface BadCase {
  slug: string;
  what: string;
  layer: (slug: string) => Promise<RawLayer>;
  expect: Expectation;
}

/** The content every case layer carries, unique per case (so each has its own chainID). */
function caseEntries(slug: string, extra: RawEntry[] = []): RawEntry[] {
  return [
    { name: `${slug}/` },
    { name: `${slug}/file.txt`, content: `${slug} content\n` },
    // some bulk, so a truncation cuts through payload and not just the TOC
    { name: `${slug}/bulk.bin`, content: randomBytes(64 * 1024) },
    ...extra,
  ];
}

async function goodLayer(slug: string, extra: RawEntry[] = []): Promise<EstargzBlob> {
  return estargzLayer(caseEntries(slug, extra));
}

function asLayer(b: EstargzBlob, annotations = estargzAnnotations(b)): RawLayer {
  return { blob: b.blob, diffId: b.diffId, annotations };
}

function findEntry(toc: TocObject, name: string): Record<string, unknown> {
  const e = toc.entries.find((x) => String(x.name).replace(/^\.\//, '').replace(/\/$/, '') === name);
  if (!e) throw new Error(`no TOC entry ${name} in ${toc.entries.map((x) => String(x.name)).join(', ')}`);
  return e;
}

const CASES: BadCase[] = [
  {
    slug: 'truncated-half',
    what: 'blob truncated to half its size',
    layer: async (slug) => {
      const b = await goodLayer(slug);
      // the config still claims the real diff_id: nobody can compute one for a truncated stream
      return { blob: b.blob.subarray(0, Math.floor(b.blob.length / 2)), diffId: b.diffId, annotations: estargzAnnotations(b) };
    },
    expect: { kind: 'fallback-pull-fails', reason: /footer|not an eStargz/i },
  },
  {
    slug: 'truncated-tiny',
    what: 'blob truncated to 30 bytes, shorter than any footer',
    layer: async (slug) => {
      const b = await goodLayer(slug);
      return { blob: b.blob.subarray(0, 30), diffId: b.diffId, annotations: estargzAnnotations(b) };
    },
    expect: { kind: 'fallback-pull-fails', reason: /smaller than any stargz footer|footer/i },
  },
  {
    slug: 'footer-bad-magic',
    what: 'footer magic STARGZ changed (still a valid empty gzip member)',
    layer: async (slug) => {
      const b = await goodLayer(slug);
      const blob = Buffer.from(b.blob);
      const at = blob.lastIndexOf('STARGZ');
      assert.ok(at > blob.length - FOOTER_SIZE_BYTES, 'magic is in the footer');
      blob.write('STARGX', at, 'latin1');
      assert.equal(diffIdOf(blob), b.diffId, 'the gzip stream is unchanged for containerd');
      return asLayer({ ...b, blob });
    },
    expect: { kind: 'fallback', reason: /STARGZ|footer/i },
  },
  {
    slug: 'footer-offset-past-end',
    what: 'footer TOC offset points past the end of the blob',
    layer: async (slug) => {
      const b = await goodLayer(slug);
      const blob = Buffer.concat([b.blob.subarray(0, b.blob.length - FOOTER_SIZE_BYTES), encodeFooter(b.blob.length + 4096)]);
      return asLayer({ ...b, blob, diffId: diffIdOf(blob) });
    },
    expect: { kind: 'fallback', reason: /TOC offset|past/i },
  },
  {
    slug: 'footer-offset-mid-member',
    what: 'footer TOC offset points into the middle of a gzip member',
    layer: async (slug) => {
      const b = await goodLayer(slug);
      const blob = Buffer.concat([b.blob.subarray(0, b.blob.length - FOOTER_SIZE_BYTES), encodeFooter(b.tocOffset + 7)]);
      return asLayer({ ...b, blob, diffId: diffIdOf(blob) });
    },
    expect: { kind: 'fallback', reason: /gzip|header/i },
  },
  {
    slug: 'footer-offset-at-payload',
    what: 'footer TOC offset points at a file payload member (valid gzip, not a TOC)',
    layer: async (slug) => {
      const b = await goodLayer(slug);
      const toc = JSON.parse((await tocOf(b.blob)).json.toString('utf8')) as TocObject;
      const payloadOffset = findEntry(toc, `${slug}/file.txt`).offset as number;
      assert.ok(payloadOffset > 0);
      const blob = Buffer.concat([b.blob.subarray(0, b.blob.length - FOOTER_SIZE_BYTES), encodeFooter(payloadOffset)]);
      return asLayer({ ...b, blob, diffId: diffIdOf(blob) });
    },
    expect: { kind: 'fallback', reason: /TOC.*(tar header|stargz\.index\.json)/ },
  },
  {
    slug: 'toc-bad-gzip',
    what: 'TOC gzip member with a wrong CRC32',
    layer: async (slug) => {
      const b = await goodLayer(slug);
      const { json, tocOffset } = await tocOf(b.blob);
      const member = tocMember(json);
      member.writeUInt32LE((member.readUInt32LE(member.length - 8) ^ 0xdeadbeef) >>> 0, member.length - 8);
      const blob = Buffer.concat([b.blob.subarray(0, tocOffset), member, encodeFooter(tocOffset)]);
      assert.throws(() => diffIdOf(blob), 'the blob is broken for every gunzip');
      return { blob, diffId: b.diffId, annotations: estargzAnnotations(b) };
    },
    expect: { kind: 'fallback-pull-fails', reason: /gzip|check/i },
  },
  {
    slug: 'toc-bad-json',
    what: 'TOC that is not JSON (valid gzip, valid tar)',
    layer: async (slug) => asLayer(await replaceToc((await goodLayer(slug)).blob, '{"version": 1, "entries": [{"name": "x", "type": ')),
    expect: { kind: 'fallback', reason: /JSON/ },
  },
  {
    slug: 'toc-digest-mismatch',
    what: 'toc.digest annotation differs from the TOC',
    layer: async (slug) => {
      const b = await goodLayer(slug);
      return asLayer(b, { 'containerd.io/snapshot/stargz/toc.digest': sha256('some other TOC') });
    },
    expect: { kind: 'fallback', reason: /TOC digest|does not match/i },
  },
  {
    slug: 'toc-digest-missing',
    what: 'no toc.digest annotation at all',
    layer: async (slug) => asLayer(await goodLayer(slug), {}),
    expect: { kind: 'fallback', reason: /digest of TOC/i },
  },
  {
    slug: 'chunk-digest',
    what: 'TOC digest right, one file\'s chunkDigest wrong',
    layer: async (slug) => {
      const b = await goodLayer(slug, [{ name: `${slug}/bad.txt`, content: 'these bytes do not match their chunkDigest\n'.repeat(1000) }]);
      return asLayer(
        await editToc(b.blob, (toc) => {
          findEntry(toc, `${slug}/bad.txt`).chunkDigest = sha256('what the TOC claims instead');
        }),
      );
    },
    expect: {
      kind: 'mounted',
      check: async ({ image, slug }) => {
        // the good file of the same layer reads; the bad one fails with EIO, twice (nothing bad is cached)
        const script = [
          `cat /${slug}/file.txt`,
          `cat /${slug}/bad.txt 2>&1 >/dev/null; echo "rc1=$?"`,
          `cat /${slug}/bad.txt 2>&1 >/dev/null; echo "rc2=$?"`,
          `head -c 4 /${slug}/bulk.bin | wc -c`,
        ].join('; ');
        const r = await ctx.containerd.runContainer(image.ref, ['/bin/sh', '-c', script], stargz);
        assert.match(r.stdout, new RegExp(`^${slug} content\n`), r.stdout);
        assert.match(r.stdout, /Input\/output error|I\/O error/i, r.stdout);
        assert.match(r.stdout, /rc1=[1-9]/, r.stdout);
        assert.match(r.stdout, /rc2=[1-9]/, r.stdout);
        assert.match(r.stdout, /\n\s*4\n$/, r.stdout);
        const line = await ctx.daemon.waitForLog((e) => e.msg === 'read failed' && e.path === `/${slug}/bad.txt`, {
          what: `a 'read failed' log line for /${slug}/bad.txt`,
          timeoutMs: 10_000,
        });
        assert.match(String(line.err), /digest/i, JSON.stringify(line));
        assert.ok(!ctx.daemon.logs().some((e) => e.msg === 'read failed' && e.path === `/${slug}/file.txt`));
      },
    },
  },
  {
    slug: 'name-dotdot',
    what: 'TOC entry named ../../escape',
    layer: async (slug) =>
      asLayer(
        await editToc((await goodLayer(slug)).blob, (toc) => {
          findEntry(toc, `${slug}/file.txt`).name = `../../${slug}-escape.txt`;
        }),
      ),
    expect: { kind: 'fallback', reason: /unsafe name|\.\./ },
  },
  {
    slug: 'hardlink-dotdot',
    what: 'hardlink whose target climbs out of the layer',
    layer: async (slug) =>
      asLayer(
        await editToc((await goodLayer(slug)).blob, (toc) => {
          toc.entries.push({ name: `${slug}/passwd`, type: 'hardlink', linkName: '../../../../etc/passwd', mode: 0o644 });
        }),
      ),
    expect: { kind: 'fallback', reason: /unsafe hardlink target|\.\./ },
  },
  {
    slug: 'name-absolute',
    what: 'absolute TOC names (/dir/file): cleaned to layer paths as the reference does',
    layer: async (slug) =>
      asLayer(
        await editToc((await goodLayer(slug)).blob, (toc) => {
          for (const e of toc.entries) if (String(e.name).replace(/^\.\//, '').startsWith(`${slug}/`)) e.name = '/' + String(e.name).replace(/^\.\//, '');
          toc.entries.push({ name: `//${slug}/link`, type: 'symlink', linkName: '/etc/passwd' });
        }),
      ),
    expect: {
      kind: 'mounted',
      check: async ({ image, slug }) => {
        const r = await ctx.containerd.runContainer(
          image.ref,
          ['/bin/sh', '-c', `cat /${slug}/file.txt; readlink /${slug}/link; head -n 1 /${slug}/link`],
          stargz,
        );
        assert.equal(r.stdout, `${slug} content\n/etc/passwd\nroot:x:0:0:root:/root:/bin/sh\n`);
      },
    },
  },
  {
    slug: 'duplicate-entries',
    what: 'the same file listed twice in the TOC',
    layer: async (slug) =>
      asLayer(
        await editToc((await goodLayer(slug)).blob, (toc) => {
          const i = toc.entries.indexOf(findEntry(toc, `${slug}/file.txt`));
          toc.entries.splice(i + 1, 0, { ...toc.entries[i]! });
        }),
      ),
    expect: { kind: 'fallback', reason: /duplicate/i },
  },
  {
    slug: 'toc-too-many-entries',
    what: `TOC with ${MAX_TOC_ENTRIES + 1} entries (3 MB of JSON)`,
    layer: async (slug) => {
      const json = '{"version":1,"entries":[' + '{},'.repeat(MAX_TOC_ENTRIES) + '{}]}';
      return asLayer(await replaceToc((await goodLayer(slug)).blob, json));
    },
    expect: { kind: 'fallback', reason: /entries.*limit|limit.*entries/i },
  },
  {
    slug: 'toc-too-large',
    what: `TOC JSON over ${MAX_TOC_BYTES} bytes (whitespace: tiny compressed)`,
    layer: async (slug) => {
      const json = Buffer.alloc(MAX_TOC_BYTES + 1024 * 1024, 0x20);
      json.write('{"version":1,"entries":[', 0);
      json.write(']}', json.length - 2);
      return asLayer(await replaceToc((await goodLayer(slug)).blob, json));
    },
    expect: { kind: 'fallback', reason: /limit/i },
  },
];

/** Shared by the suite's tests (set in `before`). */
const ctx = {} as { registry: Registry; daemon: StargazeDaemon; containerd: Containerd; good: RawImage; base: EstargzBlob; pid: number };

function preparedLine(chainId: string): (e: LogEntry) => boolean {
  return (e) => e[PREPARED] !== undefined && typeof e.key === 'string' && e.key.includes(chainId);
}

/** The daemon is the same process, logged nothing fatal, and still serves the good image. */
async function assertStillServing(probe: string): Promise<void> {
  assert.ok(ctx.daemon.isRunning(), 'daemon is alive');
  assert.equal(ctx.daemon.pid(), ctx.pid, 'daemon was not restarted');
  const fatal = ctx.daemon.logs().filter((e) => e.level === 60 || e.level === 'fatal' || /uncaught|unhandled/i.test(String(e.msg)));
  assert.deepEqual(fatal, [], 'no fatal log lines');
  // markers around the read tell a short read (`<` and `>0` only) from lost container output (nothing)
  const r = await ctx.containerd.runContainer(ctx.good.ref, ['/bin/sh', '-c', `echo "<"; cat /good/${probe}.txt; echo ">$?"`], stargz);
  assert.equal(r.stdout, `<\ngood ${probe}\n>0\n`, `stderr: ${r.stderr}`);
}

describe('bad input: hostile layers fall back cleanly or fail reads with EIO', { skip: notRoot && 'e2e tests need root' }, () => {
  const scope = suiteScope();

  before(async () => {
    ctx.registry = await startRegistry({ scope });
    ctx.daemon = await startDaemon({ scope });
    ctx.pid = ctx.daemon.pid();
    ctx.containerd = await startContainerd({ scope, stargazeAddress: ctx.daemon.address, stargazeRoot: ctx.daemon.root });

    // the good base: busybox plus one probe file per case, as an eStargz layer from the project's writer
    const work = await makeTmpRoot('bad-input', scope);
    const rootfs = path.join(work, 'rootfs');
    await materializeEntries(rootfs, [
      ...(await busyboxEntries()),
      ...['initial', ...CASES.map((c) => c.slug)].map((p) => ({ path: `/good/${p}.txt`, content: `good ${p}\n` })),
    ]);
    const gz = await packLayer(rootfs, path.join(work, 'base'));
    ctx.base = await estargzFromFile(gz.file);
    ctx.good = await pushRawImage({ host: ctx.registry.host, repo: 'bad-input/good', tag: 'v1', layers: [asLayer(ctx.base)] });
  });

  test('the good image is lazily pulled and runs', async () => {
    await ctx.containerd.rpull(ctx.good.ref);
    const line = await ctx.daemon.waitForLog(preparedLine(ctx.good.layers[0]!.chainId), { timeoutMs: 10_000 });
    assert.equal(line[PREPARED], 'true', JSON.stringify(line));
    await assertStillServing('initial');
  });

  for (const c of CASES) {
    test(`${c.slug}: ${c.what}`, async () => {
      const top = await c.layer(c.slug);
      const image = await pushRawImage({
        host: ctx.registry.host,
        repo: `bad-input/${c.slug}`,
        tag: 'v1',
        layers: [asLayer(ctx.base), top],
      });
      const chainId = image.layers[1]!.chainId;
      const mountsBefore = (await ctx.daemon.mounts()).length;

      const pull = await ctx.containerd.rpull(image.ref, { allowFailure: true, timeoutMs: 120_000 });
      const line = await ctx.daemon
        .waitForLog(preparedLine(chainId), { what: `the ${PREPARED} log line of ${c.slug}'s layer ${chainId}`, timeoutMs: 10_000 })
        .catch((err: unknown) => {
          const tail = ctx.daemon.logs().slice(-15).map((e) => JSON.stringify(e));
          throw new Error(
            `${err instanceof Error ? err.message : String(err)}\ndaemon running: ${ctx.daemon.isRunning()}\n` +
              `pull (exit ${pull.code}): ${pull.stdout}\n${pull.stderr}\n--- daemon log tail ---\n${tail.join('\n')}`,
          );
        });
      const detail = `log: ${JSON.stringify(line)}\npull: ${pull.stdout}\n${pull.stderr}`;

      if (c.expect.kind === 'mounted') {
        assert.equal(pull.code, 0, detail);
        assert.equal(line[PREPARED], 'true', detail);
        assert.equal((await ctx.daemon.mounts()).length, mountsBefore + 1, 'one new FUSE mount');
        await c.expect.check({ image, slug: c.slug });
      } else {
        assert.equal(line[PREPARED], 'false', detail);
        assert.equal(typeof line.reason, 'string', detail);
        assert.match(line.reason as string, c.expect.reason, detail);
        assert.equal((await ctx.daemon.mounts()).length, mountsBefore, 'a failed mount leaves no FUSE mount behind');
        if (c.expect.kind === 'fallback') {
          assert.equal(pull.code, 0, `containerd unpacks the layer itself\n${detail}`);
          const r = await ctx.containerd.runContainer(image.ref, ['/bin/cat', `/${c.slug}/file.txt`], stargz);
          assert.equal(r.stdout, `${c.slug} content\n`);
        } else {
          assert.notEqual(pull.code, 0, `the blob is broken for containerd too\n${detail}`);
        }
      }
      await assertStillServing(c.slug);
    });
  }
});
