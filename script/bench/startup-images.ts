/**
 * Images for the startup benchmark (startup.ts), built from Debian packages on this machine and cached under
 * bench-results/startup-cache/ (git-ignored) between runs:
 *
 * - base: `debootstrap --variant=minbase bookworm` against the mirror in /etc/apt/sources.list.d/debian.sources
 *   (or /etc/apt/sources.list; default http://deb.debian.org/debian), .debs cached in startup-cache/debs;
 * - each other image: the base layer plus one layer made by `apt-get install --no-install-recommends PKGS` in a
 *   chroot on an overlayfs over the base (in a private mount namespace, so nothing stays mounted); the upper
 *   dir is the layer (overlay whiteouts turned into OCI `.wh.` files, opaque dirs into `.wh..wh..opq`);
 * - each image is written as an OCI layout (gzip layers, level 6) in startup-cache/images/NAME;
 * - the prioritized-files list of each image is recorded by running its workload once in the unpacked rootfs:
 *   `strace -f -e trace=open,openat,execve,chroot chroot ROOTFS WORKLOAD` (writable overlay, /proc and /dev
 *   mounted, all in a private mount namespace); every path the workload opened or executed successfully after
 *   the chroot(2), with each symlink on the way resolved inside the rootfs (the link and its target both
 *   listed), in first-access order, keeping only files that exist in the image. Written to
 *   startup-cache/images/NAME.prioritized.txt.
 *
 * Needs root, debootstrap and strace (`apt-get install debootstrap strace`), and network access to the
 * Debian mirror for the first build only. Delete startup-cache/ (or set BENCH_STARTUP_REBUILD=1) to rebuild.
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, readFileSync } from 'node:fs';
import { lstat, mkdir, readdir, readFile, readlink, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { hashingTap, run } from '../../test/e2e/harness';

export interface ImageSpec {
  name: string;
  /** Debian packages installed over the minimal base (none: the base alone). */
  packages: string[];
  /** What the benchmark runs: prints `expect` and exits. */
  workload: string[];
  expect: string;
}

/** Bump to re-record the prioritized files of cached images. */
const RECORD_VERSION = 2;

const HELLO_C = '#include <stdio.h>\nint main(void) { puts(\\"hello\\"); return 0; }\n';

/** Known images; pick with BENCH_STARTUP_IMAGES. */
export const IMAGE_SPECS: ImageSpec[] = [
  { name: 'debian', packages: [], workload: ['/bin/bash', '-c', 'echo hello'], expect: 'hello' },
  { name: 'python', packages: ['python3'], workload: ['/usr/bin/python3', '-c', 'print("hello")'], expect: 'hello' },
  { name: 'node', packages: ['nodejs'], workload: ['/usr/bin/node', '-e', 'console.log("hello")'], expect: 'hello' },
  {
    name: 'gcc',
    packages: ['gcc', 'libc6-dev'],
    workload: ['/bin/sh', '-c', `printf "${HELLO_C}" > /tmp/hello.c && gcc -o /tmp/hello /tmp/hello.c && /tmp/hello`],
    expect: 'hello',
  },
  {
    name: 'g++',
    packages: ['g++', 'libc6-dev'],
    workload: [
      '/bin/sh',
      '-c',
      `printf "#include <iostream>\\nint main() { std::cout << \\"hello\\" << std::endl; }\\n" > /tmp/hello.cc && g++ -o /tmp/hello /tmp/hello.cc && /tmp/hello`,
    ],
    expect: 'hello',
  },
];

export interface BuiltLayer {
  digest: string;
  size: number;
  diffId: string;
  uncompressedSize: number;
}

export interface CachedImage {
  spec: ImageSpec;
  /** OCI layout directory; the image is tagged `plain`. */
  layoutDir: string;
  layers: BuiltLayer[];
  /** Sum of the compressed layer sizes. */
  compressedBytes: number;
  uncompressedBytes: number;
  /** File with the recorded prioritized files, one per line. */
  prioritizedFile: string;
  prioritizedCount: number;
}

function log(msg: string): void {
  process.stdout.write(`  [images] ${msg}\n`);
}

function debianMirror(): string {
  for (const f of ['/etc/apt/sources.list.d/debian.sources', '/etc/apt/sources.list']) {
    try {
      const text = readFileSync(f, 'utf8');
      const m = /^URIs:\s*(\S+)/m.exec(text) ?? /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s/m.exec(text);
      if (m && !m[1]!.includes('security')) return m[1]!;
    } catch {
      // next
    }
  }
  return 'http://deb.debian.org/debian';
}

function sh(script: string, timeoutMs = 1_800_000): Promise<unknown> {
  return run('bash', ['-euo', 'pipefail', '-c', script], { timeoutMs });
}

const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/** debootstrap minbase into cache/base/rootfs (once). */
async function buildBase(cache: string): Promise<string> {
  const dir = path.join(cache, 'base');
  const rootfs = path.join(dir, 'rootfs');
  if (existsSync(path.join(dir, 'done'))) return rootfs;
  await rm(dir, { recursive: true, force: true });
  await mkdir(path.join(cache, 'debs'), { recursive: true });
  await mkdir(dir, { recursive: true });
  const mirror = debianMirror();
  log(`debootstrap --variant=minbase bookworm from ${mirror} (first run only)`);
  await sh(
    `debootstrap --variant=minbase --cache-dir=${q(path.join(cache, 'debs'))} bookworm ${q(rootfs)} ${q(mirror)} >${q(path.join(dir, 'debootstrap.log'))} 2>&1` +
      ` && rm -rf ${q(rootfs)}/var/cache/apt/archives/*.deb ${q(rootfs)}/var/lib/apt/lists/* ${q(rootfs)}/var/log/bootstrap.log`,
  );
  await writeFile(path.join(dir, 'done'), new Date().toISOString());
  return rootfs;
}

/** `apt-get install PKGS` on an overlay over the base: the upper dir is the new layer (once). */
async function buildUpper(cache: string, base: string, spec: ImageSpec): Promise<string> {
  const dir = path.join(cache, 'layers', spec.name);
  const upper = path.join(dir, 'upper');
  const stamp = JSON.stringify(spec.packages);
  if (existsSync(path.join(dir, 'done')) && (await readFile(path.join(dir, 'done'), 'utf8')) === stamp) return upper;
  await rm(dir, { recursive: true, force: true });
  const work = path.join(dir, 'work');
  const merged = path.join(dir, 'merged');
  const debs = path.join(cache, 'apt-archives');
  await mkdir(path.join(debs, 'partial'), { recursive: true });
  for (const d of [upper, work, merged]) await mkdir(d, { recursive: true });
  log(`${spec.name}: apt-get install --no-install-recommends ${spec.packages.join(' ')}`);
  const inChroot = (cmd: string): string => `chroot ${q(merged)} /usr/bin/env DEBIAN_FRONTEND=noninteractive ${cmd}`;
  // All mounts live in a private mount namespace: they go away when the shell exits, also on failure.
  await run(
    'unshare',
    [
      '--mount',
      '--propagation',
      'private',
      'bash',
      '-euo',
      'pipefail',
      '-c',
      [
        `mount -t overlay overlay -o lowerdir=${base},upperdir=${upper},workdir=${work} ${q(merged)}`,
        `mount -t proc proc ${q(merged)}/proc`,
        `mount --bind /dev ${q(merged)}/dev`,
        `mount --bind ${q(debs)} ${q(merged)}/var/cache/apt/archives`,
        `cp /etc/resolv.conf ${q(merged)}/etc/resolv.conf`,
        inChroot('apt-get update -qq'),
        inChroot(`apt-get install -y -qq --no-install-recommends ${spec.packages.join(' ')}`),
        `rm -rf ${q(merged)}/var/lib/apt/lists/* ${q(merged)}/var/cache/apt/*.bin ${q(merged)}/var/log/apt ${q(merged)}/var/log/dpkg.log ${q(merged)}/etc/resolv.conf`,
      ].join(' && '),
    ],
    { timeoutMs: 1_800_000 },
  ).catch((err: unknown) => {
    throw new Error(`building layer ${spec.name}: ${err instanceof Error ? err.message : String(err)}`);
  });
  await overlayToOci(upper);
  await rm(work, { recursive: true, force: true });
  await rm(merged, { recursive: true, force: true });
  await writeFile(path.join(dir, 'done'), stamp);
  return upper;
}

/** Overlay whiteouts (0/0 char devices) become `.wh.NAME` files; opaque dirs get `.wh..wh..opq`. */
async function overlayToOci(upper: string): Promise<void> {
  const walk = async (dir: string): Promise<void> => {
    for (const e of await readdir(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isCharacterDevice()) {
        const st = await lstat(p);
        if (st.rdev === 0) {
          await rm(p);
          await writeFile(path.join(dir, `.wh.${e.name}`), '');
        }
      } else if (e.isDirectory()) {
        await walk(p);
      }
    }
  };
  await walk(upper);
  const r = await run('getfattr', ['-R', '--absolute-names', '-n', 'trusted.overlay.opaque', upper], { allowFailure: true });
  for (const m of r.stdout.matchAll(/^# file: (.*)\ntrusted\.overlay\.opaque="y"/gm)) {
    await writeFile(path.join(m[1]!, '.wh..wh..opq'), '');
  }
}

/** tar (posix, sorted, numeric owners, no xattrs: overlay's trusted.* must not leak) + gzip into the layout. */
async function packLayer(dir: string, blobsDir: string, tmpBase: string): Promise<BuiltLayer> {
  const tarFile = `${tmpBase}.tar`;
  const gzFile = `${tmpBase}.tar.gz`;
  await run(
    'tar',
    [
      '--create',
      `--file=${tarFile}`,
      `--directory=${dir}`,
      '--format=posix',
      '--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime',
      '--sort=name',
      '--numeric-owner',
      '--exclude=./proc/*',
      '--exclude=./sys/*',
      '--exclude=./dev/*',
      '.',
    ],
    { timeoutMs: 1_800_000 },
  );
  const raw = hashingTap();
  const gz = hashingTap();
  await pipeline(createReadStream(tarFile), raw.tap, createGzip({ level: 6 }), gz.tap, createWriteStream(gzFile));
  await rm(tarFile);
  const r = raw.result();
  const g = gz.result();
  await rename(gzFile, path.join(blobsDir, g.digest.slice('sha256:'.length)));
  return { digest: g.digest, size: g.size, diffId: r.digest, uncompressedSize: r.size };
}

function goArch(): string {
  const map: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x' };
  return map[process.arch] ?? process.arch;
}

const sha256 = (s: string): string => `sha256:${createHash('sha256').update(s).digest('hex')}`;

/** Writes the OCI layout (tag `plain`) of base + upper layers. */
async function writeLayout(layoutDir: string, spec: ImageSpec, layerDirs: string[]): Promise<BuiltLayer[]> {
  await rm(layoutDir, { recursive: true, force: true });
  const blobs = path.join(layoutDir, 'blobs', 'sha256');
  await mkdir(blobs, { recursive: true });
  const layers: BuiltLayer[] = [];
  for (const [i, d] of layerDirs.entries()) layers.push(await packLayer(d, blobs, path.join(layoutDir, `layer${i}`)));
  const created = '2025-05-20T00:00:00Z';
  const config = JSON.stringify({
    created,
    architecture: goArch(),
    os: 'linux',
    config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: spec.workload, WorkingDir: '/' },
    rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
    history: layers.map((_, i) => ({ created, created_by: i === 0 ? 'debootstrap --variant=minbase bookworm' : `apt-get install ${spec.packages.join(' ')}` })),
  });
  const configDigest = sha256(config);
  await writeFile(path.join(blobs, configDigest.slice(7)), config);
  const manifest = JSON.stringify({
    schemaVersion: 2,
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: Buffer.byteLength(config) },
    layers: layers.map((l) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: l.digest, size: l.size })),
  });
  const manifestDigest = sha256(manifest);
  await writeFile(path.join(blobs, manifestDigest.slice(7)), manifest);
  await writeFile(path.join(layoutDir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  await writeFile(
    path.join(layoutDir, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          digest: manifestDigest,
          size: Buffer.byteLength(manifest),
          annotations: { 'org.opencontainers.image.ref.name': 'plain' },
        },
      ],
    }),
  );
  return layers;
}

/** Looks `rel` (no leading /) up in the layered rootfs: upper dirs first, whiteouts hide lower files. */
async function lstatLayered(dirs: string[], rel: string): Promise<{ dir: string; isLink: boolean; isFile: boolean } | undefined> {
  for (const d of dirs) {
    const parent = path.dirname(rel);
    const wh = path.join(d, parent === '.' ? '' : parent, `.wh.${path.basename(rel)}`);
    try {
      const st = await lstat(path.join(d, rel));
      return { dir: d, isLink: st.isSymbolicLink(), isFile: st.isFile() };
    } catch {
      if (existsSync(wh)) return undefined;
    }
  }
  return undefined;
}

/** Resolves an absolute path inside the layered rootfs (chroot semantics); every symlink met and the final file. */
async function resolveInImage(dirs: string[], abs: string): Promise<string[]> {
  const out: string[] = [];
  let parts = abs.split('/').filter((p) => p !== '' && p !== '.');
  let cur: string[] = [];
  for (let hops = 0; parts.length > 0 && hops < 64; ) {
    const name = parts.shift()!;
    if (name === '..') {
      cur.pop();
      continue;
    }
    const rel = [...cur, name].join('/');
    const st = await lstatLayered(dirs, rel);
    if (!st) return out;
    if (st.isLink) {
      hops++;
      out.push('/' + rel);
      const target = await readlink(path.join(st.dir, rel));
      if (target.startsWith('/')) cur = [];
      parts = [...target.split('/').filter((p) => p !== '' && p !== '.'), ...parts];
      continue;
    }
    cur.push(name);
    if (parts.length === 0 && st.isFile) out.push('/' + rel);
  }
  return out;
}

/** Runs the workload under strace in the image's rootfs; returns the files it used, in first-access order. */
async function recordPrioritized(cache: string, layerDirs: string[], spec: ImageSpec, outFile: string): Promise<number> {
  const scratch = path.join(cache, 'record-scratch');
  await rm(scratch, { recursive: true, force: true });
  const upper = path.join(scratch, 'upper');
  const work = path.join(scratch, 'work');
  const merged = path.join(scratch, 'merged');
  const traceFile = path.join(scratch, 'trace.txt');
  for (const d of [upper, work, merged]) await mkdir(d, { recursive: true });
  // overlay lowerdir lists the top layer first
  const lower = [...layerDirs].reverse().join(':');
  try {
    const r = await run(
      'unshare',
      [
        '--mount',
        '--propagation',
        'private',
        'bash',
        '-euo',
        'pipefail',
        '-c',
        [
          `mount -t overlay overlay -o lowerdir=${lower},upperdir=${upper},workdir=${work} ${q(merged)}`,
          `mount -t proc proc ${q(merged)}/proc`,
          `mount --bind /dev ${q(merged)}/dev`,
          // the container's environment (the image's PATH only); env runs before chroot, so it is not traced
          `env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin strace -f -qq -s 4096 -e trace=open,openat,execve,chroot -o ${q(traceFile)} chroot ${q(merged)} ${spec.workload.map(q).join(' ')}`,
        ].join(' && '),
      ],
      { timeoutMs: 300_000 },
    );
    if (!r.stdout.includes(spec.expect)) throw new Error(`${spec.name}: the workload printed ${JSON.stringify(r.stdout)}`);
    const trace = await readFile(traceFile, 'utf8');
    const files: string[] = [];
    const seen = new Set<string>();
    const pending = new Map<string, string>();
    let chrooted = false;
    for (const raw of trace.split('\n')) {
      const m = /^(\d+)\s+(.*)$/.exec(raw);
      if (!m) continue;
      const [, pid, rest0] = m as unknown as [string, string, string];
      let line = rest0;
      if (line.endsWith('<unfinished ...>')) {
        pending.set(pid, line.slice(0, -'<unfinished ...>'.length));
        continue;
      }
      const resumed = /^<\.\.\. \w+ resumed>(.*)$/.exec(line);
      if (resumed) {
        line = (pending.get(pid) ?? '') + resumed[1]!;
        pending.delete(pid);
      }
      if (/^chroot\(/.test(line) && / = 0$/.test(line)) {
        chrooted = true;
        continue;
      }
      if (!chrooted) continue;
      const call = /^(execve|openat|open)\((?:AT_FDCWD, )?"((?:[^"\\]|\\.)*)".*\)\s+=\s+(-?\d+)/.exec(line);
      if (!call || Number(call[3]) < 0) continue;
      if (call[1] === 'openat' && !line.startsWith('openat(AT_FDCWD')) continue; // relative to another fd
      const p = JSON.parse(`"${call[2]!.replace(/\\x([0-9a-f]{2})/g, '\\u00$1')}"`) as string;
      const abs = p.startsWith('/') ? p : `/${p}`;
      if (/^\/(proc|sys|dev|tmp)(\/|$)/.test(abs)) continue;
      for (const f of await resolveInImage([...layerDirs].reverse(), abs)) {
        if (!seen.has(f)) {
          seen.add(f);
          files.push(f);
        }
      }
    }
    await writeFile(outFile, files.join('\n') + '\n');
    return files.length;
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

/** Builds (or takes from the cache) the images named in `names`. */
export async function buildImages(cache: string, names: string[], rebuild: boolean): Promise<CachedImage[]> {
  if (process.getuid?.() !== 0) throw new Error('building the startup images needs root (debootstrap, chroot, overlayfs)');
  if (rebuild) await rm(cache, { recursive: true, force: true });
  await mkdir(cache, { recursive: true });
  const base = await buildBase(cache);
  const out: CachedImage[] = [];
  for (const name of names) {
    const spec = IMAGE_SPECS.find((s) => s.name === name);
    if (!spec) throw new Error(`unknown image ${name}; known: ${IMAGE_SPECS.map((s) => s.name).join(', ')}`);
    const layoutDir = path.join(cache, 'images', spec.name);
    const metaFile = path.join(cache, 'images', `${spec.name}.json`);
    const prioritizedFile = path.join(cache, 'images', `${spec.name}.prioritized.txt`);
    const stamp = JSON.stringify(spec);
    if (existsSync(metaFile) && !process.env.BENCH_STARTUP_RERECORD) {
      const meta = JSON.parse(await readFile(metaFile, 'utf8')) as CachedImage & { stamp: string };
      if (meta.stamp === `${stamp}:${RECORD_VERSION}`) {
        out.push(meta);
        continue;
      }
    }
    const layerDirs = [base, ...(spec.packages.length > 0 ? [await buildUpper(cache, base, spec)] : [])];
    const layersFile = path.join(cache, 'images', `${spec.name}.layers.json`);
    let layers: BuiltLayer[];
    if (existsSync(layersFile) && existsSync(path.join(layoutDir, 'index.json')) && (await readFile(`${layersFile}.stamp`, 'utf8').catch(() => '')) === stamp) {
      layers = JSON.parse(await readFile(layersFile, 'utf8')) as BuiltLayer[];
    } else {
      log(`${spec.name}: packing ${layerDirs.length} layer(s) into an OCI layout`);
      layers = await writeLayout(layoutDir, spec, layerDirs);
      await writeFile(layersFile, JSON.stringify(layers));
      await writeFile(`${layersFile}.stamp`, stamp);
    }
    log(`${spec.name}: recording the workload's files (strace)`);
    const prioritizedCount = await recordPrioritized(cache, layerDirs, spec, prioritizedFile);
    const image: CachedImage = {
      spec,
      layoutDir,
      layers,
      compressedBytes: layers.reduce((n, l) => n + l.size, 0),
      uncompressedBytes: layers.reduce((n, l) => n + l.uncompressedSize, 0),
      prioritizedFile,
      prioritizedCount,
    };
    await writeFile(metaFile, JSON.stringify({ ...image, stamp: `${stamp}:${RECORD_VERSION}` }, null, 2));
    out.push(image);
  }
  return out;
}

