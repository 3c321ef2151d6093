/**
 * The top-level Dockerfile, built for real with Debian's buildah (vfs storage, chroot isolation, a
 * private storage root in a tmp dir), offline. Nothing can be pulled here, so its base images are
 * stand-ins made from this machine's files:
 *
 * - `NODE_IMAGE` / `NODE_RUNTIME_IMAGE`: busybox, glibc, this machine's node and npm, npm pointed at a
 *   stand-in registry this test serves from npm's local cache, and better-sqlite3's compiled addon as
 *   a local prebuild (what prebuild-install would download);
 * - `KIND_NODE_IMAGE`: busybox, glibc, systemd's unit files and a KinD-like containerd config.
 *
 * Both carry an `apt-get` that installs a package from this machine's installed copy (its `dpkg -L`
 * files) and fails on a package it does not know, like apt-get without a mirror would.
 *
 * The build context is the committed tree (`git archive HEAD`) with the packaging files (Dockerfile,
 * .dockerignore, script/kind, script/systemd) from the working tree, so work in progress elsewhere
 * does not break it. The built images are then checked: containerd's config (read back by containerd
 * itself), the systemd unit (`systemd-analyze verify` against the image's root) and its links, the
 * installed packages, pruned dependencies, and `stargaze daemon --help` run inside the image.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createReadStream, existsSync, readdirSync } from 'node:fs';
import { copyFile, cp, lstat, stat, mkdir, readFile, readlink, realpath, symlink, writeFile, chmod } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { before, describe, test } from 'node:test';
import * as TOML from 'smol-toml';
import { REPO_ROOT, makeTmpRoot, run, suiteScope, type RunResult } from './harness';
import { findStaticBusybox } from './harness/images';

const notRoot = process.getuid?.() !== 0;
const BUILDAH = 'buildah';
const BUILD_TIMEOUT_MS = 600_000;
const NODE_STANDIN = 'localhost/stargaze-standin-node:test';
const KIND_STANDIN = 'localhost/stargaze-standin-kind:test';
const KIND_NODE_IMAGE = 'localhost/stargaze-kind-node:test';
const DAEMON_IMAGE = 'localhost/stargaze-daemon:test';
/** Packages the stand-in apt-get can install (copied from this machine). */
const STANDIN_PACKAGES = ['libfuse2', 'fuse3', 'pigz', 'ca-certificates'];
/** Files of the packaging, taken from the working tree on top of HEAD. */
const PACKAGING_PATHS = ['Dockerfile', '.dockerignore', 'script/kind', 'script/systemd'];
const SOCKET = '/run/stargaze/stargaze.sock';
const CRI_PLUGIN = 'io.containerd.grpc.v1.cri';
/** What a KinD v1.29 node's /etc/containerd/config.toml says that matters here. */
const KIND_CONTAINERD_CONFIG = `version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    restrict_oom_score_adj = false
    sandbox_image = "registry.k8s.io/pause:3.9"
    tolerate_missing_hugepages_controller = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      discard_unpacked_layers = true
      snapshotter = "overlayfs"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
`;
const APT_GET_STANDIN = `#!/bin/sh
# Stand-in apt-get for the offline Dockerfile test: installs packages from copies of this machine's.
POOL=/var/cache/stand-in-apt
echo "apt-get $*" >> /var/log/stand-in-apt.log
[ "$1" = update ] && exit 0
[ "$1" = install ] || { echo "stand-in apt-get: only update and install" >&2; exit 100; }
shift
for p in "$@"; do
  case "$p" in -*) continue ;; esac
  [ -d "$POOL/$p" ] || { echo "E: Unable to locate package $p" >&2; exit 100; }
  cp -a "$POOL/$p/." / || exit 100
  echo "$p" >> /var/log/stand-in-apt.installed
done
`;

type Buildah = (args: string[], opts?: { allowFailure?: boolean; timeoutMs?: number }) => Promise<RunResult>;

/** `/lib/x` → `/usr/lib/x` and so on: the stand-ins are merged-/usr, like Debian. */
function mergedUsr(p: string): string {
  return p.replace(/^\/(bin|sbin|lib|lib64)(\/|$)/, '/usr/$1$2');
}

async function copyIntoRootfs(rootfs: string, hostPath: string, destPath = hostPath): Promise<void> {
  const dest = path.join(rootfs, mergedUsr(destPath));
  await mkdir(path.dirname(dest), { recursive: true });
  await copyFile(await realpath(hostPath), dest);
  await chmod(dest, (await lstat(await realpath(hostPath))).mode & 0o7777);
}

/** The shared libraries `ldd` lists for `binary`, copied under the same (merged-/usr) paths. */
async function copyLibraries(rootfs: string, binary: string): Promise<void> {
  const ldd = await run('ldd', [binary]);
  for (const line of ldd.stdout.split('\n')) {
    const m = /(?:=>\s*)?(\/\S+)\s+\(0x/.exec(line);
    if (m) await copyIntoRootfs(rootfs, m[1]!);
  }
}

/** busybox with every applet, glibc for node, merged-/usr links, passwd, tmp, the apt-get stand-in. */
async function makeBaseRootfs(rootfs: string): Promise<void> {
  for (const d of ['usr/bin', 'usr/sbin', 'usr/lib', 'usr/lib64', 'usr/local/bin', 'etc', 'var/log', 'var/cache', 'root', 'tmp']) {
    await mkdir(path.join(rootfs, d), { recursive: true });
  }
  for (const d of ['bin', 'sbin', 'lib', 'lib64']) await symlink(`usr/${d}`, path.join(rootfs, d));
  await chmod(path.join(rootfs, 'tmp'), 0o1777);
  await copyFile(await findStaticBusybox(), path.join(rootfs, 'usr/bin/busybox'));
  await chmod(path.join(rootfs, 'usr/bin/busybox'), 0o755);
  const applets = (await run('busybox', ['--list'])).stdout.split('\n').filter((a) => a && a !== 'busybox');
  for (const a of applets) await symlink('busybox', path.join(rootfs, 'usr/bin', a));
  await copyLibraries(rootfs, process.execPath);
  await writeFile(path.join(rootfs, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n');
  await writeFile(path.join(rootfs, 'etc/group'), 'root:x:0:\nnogroup:x:65534:\n');
  await writeFile(path.join(rootfs, 'usr/bin/apt-get'), APT_GET_STANDIN, { mode: 0o755 });
  for (const pkg of STANDIN_PACKAGES) await addPackageToPool(rootfs, pkg);
}

/** This machine's installed files of `pkg` (docs left out) under /var/cache/stand-in-apt/<pkg>. */
async function addPackageToPool(rootfs: string, pkg: string): Promise<void> {
  const listed = await run('dpkg', ['-L', pkg], { allowFailure: true });
  if (listed.code !== 0) throw new Error(`the stand-in apt-get copies ${pkg} from this machine: apt-get install ${pkg} (script/setup.sh --test)`);
  const pool = path.join(rootfs, 'var/cache/stand-in-apt', pkg);
  await mkdir(pool, { recursive: true });
  for (const file of listed.stdout.split('\n').filter((f) => f.startsWith('/') && f !== '/.')) {
    if (/^\/usr\/share\/(doc|man|lintian)\//.test(file)) continue;
    let st;
    try {
      st = await lstat(file);
    } catch {
      continue; // diverted or removed
    }
    const dest = path.join(pool, mergedUsr(file));
    // a listed directory can be a merged-/usr link on this machine (/lib -> usr/lib)
    if (st.isDirectory() || (st.isSymbolicLink() && (await stat(file)).isDirectory())) {
      await mkdir(dest, { recursive: true });
    } else if (st.isSymbolicLink()) {
      await mkdir(path.dirname(dest), { recursive: true });
      await symlink(await readlink(file), dest);
    } else if (st.isFile()) {
      await mkdir(path.dirname(dest), { recursive: true });
      await copyFile(file, dest);
      await chmod(dest, st.mode & 0o7777);
    }
  }
}

/**
 * A stand-in npm registry on 127.0.0.1 (the build's RUN steps share this machine's network): for each
 * package of `lockFile`, a packument naming that version and a tarball served from npm's local cache
 * (content-addressed by the lock's integrity). `npm ci` in the builder installs from it as from
 * registry.npmjs.org; a package missing from the cache is a 404, so npm fails and says which.
 */
async function startNpmRegistry(lockFile: string, scope: { after(fn: () => unknown): void }): Promise<string> {
  const lock = JSON.parse(await readFile(lockFile, 'utf8')) as { packages: Record<string, { version?: string; integrity?: string; name?: string; link?: boolean }> };
  const cache = path.join((await run('npm', ['config', 'get', 'cache'])).stdout.trim(), '_cacache', 'content-v2');
  const versions = new Map<string, Map<string, string>>();
  for (const [key, entry] of Object.entries(lock.packages)) {
    if (key === '' || entry.link || !entry.version || !entry.integrity) continue;
    const name = entry.name ?? key.slice(key.lastIndexOf('node_modules/') + 'node_modules/'.length);
    if (!versions.has(name)) versions.set(name, new Map());
    versions.get(name)!.set(entry.version, entry.integrity);
  }
  const contentPath = (integrity: string): string | undefined => {
    const sri = integrity.split(/\s+/).find((s) => s.startsWith('sha512-')) ?? integrity.split(/\s+/)[0]!;
    const [algo, b64] = [sri.slice(0, sri.indexOf('-')), sri.slice(sri.indexOf('-') + 1)];
    const hex = Buffer.from(b64, 'base64').toString('hex');
    const file = path.join(cache, algo, hex.slice(0, 2), hex.slice(2, 4), hex.slice(4));
    return existsSync(file) ? file : undefined;
  };
  let base = '';
  const server = http.createServer((req, res) => {
    const url = decodeURIComponent((req.url ?? '/').split('?')[0]!);
    const tarball = /^\/-\/tarballs\/(.+)\/([^/]+)\.tgz$/.exec(url);
    if (tarball) {
      const integrity = versions.get(tarball[1]!)?.get(tarball[2]!);
      const file = integrity ? contentPath(integrity) : undefined;
      if (!file) return void res.writeHead(404).end();
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      return void createReadStream(file).pipe(res);
    }
    const name = url.slice(1);
    const known = versions.get(name);
    if (!known) return void res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":"not found"}');
    const packument = {
      name,
      'dist-tags': { latest: [...known.keys()].at(-1) },
      versions: Object.fromEntries(
        [...known].map(([version, integrity]) => [
          version,
          { name, version, dist: { integrity, tarball: `${base}/-/tarballs/${encodeURIComponent(name)}/${version}.tgz` } },
        ]),
      ),
    };
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(packument));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  scope.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return base;
}

/** NODE_IMAGE stand-in: node and npm under /usr/local, npm pointed at `registry`, the addon prebuild. */
async function makeNodeRootfs(rootfs: string, registry: string): Promise<string[]> {
  await makeBaseRootfs(rootfs);
  await copyIntoRootfs(rootfs, process.execPath, '/usr/local/bin/node');
  const npmDir = path.resolve(path.dirname(await realpath(path.join(path.dirname(process.execPath), 'npm'))), '..');
  await cp(npmDir, path.join(rootfs, 'usr/local/lib/node_modules/npm'), { recursive: true, verbatimSymlinks: true });
  await symlink('../lib/node_modules/npm/bin/npm-cli.js', path.join(rootfs, 'usr/local/bin/npm'));
  // better-sqlite3's install runs prebuild-install, which takes <dir>/<name>-v<ver>-node-v<abi>-linux-<arch>.tar.gz
  const addonDir = path.join(REPO_ROOT, 'node_modules', 'better-sqlite3');
  const { version } = JSON.parse(await readFile(path.join(addonDir, 'package.json'), 'utf8')) as { version: string };
  const prebuilds = path.join(rootfs, 'opt/stand-in-prebuilds');
  await mkdir(prebuilds, { recursive: true });
  const tarball = path.join(prebuilds, `better-sqlite3-v${version}-node-v${process.versions.modules}-linux-${process.arch}.tar.gz`);
  await run('tar', ['-czf', tarball, '-C', addonDir, 'build/Release/better_sqlite3.node']);
  return [
    'PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin',
    'HOME=/root',
    `npm_config_registry=${registry}/`,
    'npm_config_fund=false',
    'npm_config_audit=false',
    'npm_config_update_notifier=false',
    'npm_config_better_sqlite3_local_prebuilds=/opt/stand-in-prebuilds',
  ];
}

/** KIND_NODE_IMAGE stand-in: systemd's units (for systemd-analyze) and a KinD-like containerd config. */
async function makeKindRootfs(rootfs: string): Promise<string[]> {
  await makeBaseRootfs(rootfs);
  await cp('/usr/lib/systemd/system', path.join(rootfs, 'usr/lib/systemd/system'), { recursive: true, verbatimSymlinks: true });
  await mkdir(path.join(rootfs, 'etc/systemd/system'), { recursive: true });
  await mkdir(path.join(rootfs, 'etc/containerd'), { recursive: true });
  await writeFile(path.join(rootfs, 'etc/containerd/config.toml'), KIND_CONTAINERD_CONFIG);
  return ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'];
}

async function commitRootfs(buildah: Buildah, rootfs: string, env: string[], name: string): Promise<void> {
  const cid = (await buildah(['from', '--quiet', 'scratch'])).stdout.trim();
  try {
    await buildah(['copy', '--quiet', cid, `${rootfs}/`, '/']);
    await buildah(['config', ...env.flatMap((e) => ['--env', e]), cid]);
    await buildah(['commit', '--quiet', cid, name]);
  } finally {
    await buildah(['rm', cid], { allowFailure: true });
  }
}

/** HEAD's tree plus the working tree's packaging files. */
async function makeContext(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  const archive = path.join(path.dirname(dir), 'head.tar');
  await run('git', ['-C', REPO_ROOT, 'archive', '--format=tar', '-o', archive, 'HEAD']);
  await run('tar', ['-xf', archive, '-C', dir]);
  for (const p of PACKAGING_PATHS) {
    const src = path.join(REPO_ROOT, p);
    if (existsSync(src)) await cp(src, path.join(dir, p), { recursive: true, force: true });
  }
}

/** The value at `keys` in parsed TOML, or undefined. */
function dig(value: unknown, ...keys: string[]): unknown {
  for (const key of keys) {
    if (typeof value !== 'object' || value === null) return undefined;
    value = (value as Record<string, unknown>)[key];
  }
  return value;
}

/** smol-toml's tables have a null prototype; deepEqual wants plain objects. */
function plain(value: unknown): unknown {
  return value === undefined ? undefined : JSON.parse(JSON.stringify(value));
}

function buildahProbe(): string | undefined {
  const r = spawnSync(BUILDAH, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) return 'buildah is not installed (apt-get install buildah; script/setup.sh --test)';
  return undefined;
}

describe('Dockerfile: kind-node and daemon targets built offline with buildah', { skip: (notRoot && 'e2e tests need root') || buildahProbe() }, () => {
  const cleanup = suiteScope();
  let skipReason: string | undefined;
  let buildah: Buildah;
  let kindRootfs: string;
  let kindContainer: string;

  before(async () => {
    const tmp = await makeTmpRoot('dockerfile', cleanup);
    const storage = ['--root', path.join(tmp, 'storage'), '--runroot', path.join(tmp, 'run'), '--storage-driver', 'vfs'];
    const env = { TMPDIR: path.join(tmp, 'tmp'), BUILDAH_ISOLATION: 'chroot' };
    await mkdir(env.TMPDIR, { recursive: true });
    buildah = (args, opts) => run(BUILDAH, [...storage, ...args], { env, timeoutMs: opts?.timeoutMs ?? BUILD_TIMEOUT_MS, allowFailure: opts?.allowFailure });
    // Storage is a plain tmp dir (vfs); leave nothing mounted or registered in it before it is removed.
    cleanup.after(async () => {
      await buildah(['rm', '--all'], { allowFailure: true });
      await buildah(['rmi', '--all', '--force'], { allowFailure: true });
    });
    const probe = await buildah(['from', '--quiet', 'scratch'], { allowFailure: true });
    if (probe.code !== 0) {
      skipReason = `buildah cannot run in this sandbox (vfs storage, chroot isolation): ${probe.stderr.trim()}`;
      return;
    }
    await buildah(['rm', probe.stdout.trim()]);

    const context = path.join(tmp, 'context');
    await makeContext(context);
    const npmRegistry = await startNpmRegistry(path.join(context, 'package-lock.json'), cleanup);
    const nodeRootfs = path.join(tmp, 'standin-node');
    await commitRootfs(buildah, nodeRootfs, await makeNodeRootfs(nodeRootfs, npmRegistry), NODE_STANDIN);
    const kindStandin = path.join(tmp, 'standin-kind');
    await commitRootfs(buildah, kindStandin, await makeKindRootfs(kindStandin), KIND_STANDIN);
    const common = [
      'bud',
      '--isolation',
      'chroot',
      '--pull-never',
      '--build-arg',
      `NODE_IMAGE=${NODE_STANDIN}`,
      '--build-arg',
      `NODE_RUNTIME_IMAGE=${NODE_STANDIN}`,
      '--build-arg',
      `KIND_NODE_IMAGE=${KIND_STANDIN}`,
      '-f',
      path.join(context, 'Dockerfile'),
    ];
    await buildah([...common, '--target', 'kind-node', '-t', KIND_NODE_IMAGE, context]);
    await buildah([...common, '--target', 'daemon', '-t', DAEMON_IMAGE, context]);

    kindContainer = (await buildah(['from', '--quiet', '--pull-never', KIND_NODE_IMAGE])).stdout.trim();
    kindRootfs = (await buildah(['mount', kindContainer])).stdout.trim();
  });

  test('kind-node: containerd is configured with the stargz proxy plugin as CRI snapshotter, and accepts the config', async (t) => {
    if (skipReason) return t.skip(skipReason);
    const configPath = path.join(kindRootfs, 'etc/containerd/config.toml');
    const config = TOML.parse(await readFile(configPath, 'utf8'));
    const cri = ['plugins', CRI_PLUGIN];
    assert.deepEqual(plain(dig(config, 'proxy_plugins', 'stargz')), { type: 'snapshot', address: SOCKET, exports: { root: '/var/lib/stargaze' } });
    assert.equal(dig(config, ...cri, 'containerd', 'snapshotter'), 'stargz');
    assert.equal(dig(config, ...cri, 'containerd', 'disable_snapshot_annotations'), false);
    // the node's own settings are kept
    assert.equal(dig(config, ...cri, 'sandbox_image'), 'registry.k8s.io/pause:3.9');
    assert.equal(dig(config, ...cri, 'containerd', 'runtimes', 'runc', 'options', 'SystemdCgroup'), true);

    // containerd reads it back the same way (this machine's containerd; a KinD node runs its own)
    const effective = TOML.parse((await run('containerd', ['--config', configPath, 'config', 'dump'])).stdout);
    assert.equal(dig(effective, ...cri, 'containerd', 'snapshotter'), 'stargz');
    assert.equal(dig(effective, ...cri, 'containerd', 'disable_snapshot_annotations'), false);
    assert.equal(dig(effective, 'proxy_plugins', 'stargz', 'address'), SOCKET);
  });

  test('kind-node: the systemd unit is installed, enabled before containerd, and passes systemd-analyze verify', async (t) => {
    if (skipReason) return t.skip(skipReason);
    const unit = path.join(kindRootfs, 'etc/systemd/system/stargaze.service');
    assert.equal(await readFile(unit, 'utf8'), await readFile(path.join(REPO_ROOT, 'script/systemd/stargaze.service'), 'utf8'));
    for (const wants of ['multi-user.target.wants', 'containerd.service.wants']) {
      assert.equal(await readlink(path.join(kindRootfs, 'etc/systemd/system', wants, 'stargaze.service')), '/etc/systemd/system/stargaze.service');
    }
    const text = await readFile(unit, 'utf8');
    assert.match(text, /^Before=containerd\.service$/m);
    assert.match(text, /^Type=notify$/m);
    assert.match(text, /^ExecStart=\/usr\/local\/bin\/stargaze daemon /m);
    const verify = await run('systemd-analyze', ['verify', `--root=${kindRootfs}`, '/etc/systemd/system/stargaze.service'], { allowFailure: true });
    assert.equal(verify.code, 0, `systemd-analyze verify:\n${verify.stderr}${verify.stdout}`);
    assert.equal(verify.stderr.trim(), '', 'no warnings');
  });

  test('kind-node: fuse, pigz and the pruned app are installed; stargaze runs in the image', async (t) => {
    if (skipReason) return t.skip(skipReason);
    const installed = (await readFile(path.join(kindRootfs, 'var/log/stand-in-apt.installed'), 'utf8')).split('\n');
    for (const pkg of ['libfuse2', 'fuse3', 'pigz']) assert.ok(installed.includes(pkg), `${pkg} installed`);
    assert.ok(existsSync(path.join(kindRootfs, 'usr/bin/pigz')));
    assert.ok(existsSync(path.join(kindRootfs, 'opt/stargaze/dist/src/cli.js')));
    assert.ok(existsSync(path.join(kindRootfs, 'opt/stargaze/proto/containerd/services/snapshots/v1/snapshots.proto')));
    const modules = readdirSync(path.join(kindRootfs, 'opt/stargaze/node_modules'));
    assert.ok(modules.includes('better-sqlite3') && modules.includes('fuse-native'), 'runtime dependencies');
    assert.ok(!modules.includes('typescript'), 'dev dependencies pruned');
    assert.ok(!existsSync(path.join(kindRootfs, 'opt/stargaze/node_modules/@types/better-sqlite3')), 'dev dependencies pruned');
    // the daemon's module graph (gRPC, SQLite and FUSE native addons) loads inside the image
    const help = await buildah(['run', '--isolation', 'chroot', kindContainer, '--', '/usr/local/bin/stargaze', 'daemon', '--help']);
    assert.match(help.stdout, /usage: stargaze daemon/);
  });

  test('daemon: the image runs `stargaze daemon` with the default socket and root', async (t) => {
    if (skipReason) return t.skip(skipReason);
    const inspect = JSON.parse((await buildah(['inspect', '--type', 'image', DAEMON_IMAGE])).stdout) as {
      OCIv1: { config: { Entrypoint?: string[]; Cmd?: string[] } };
    };
    assert.deepEqual(inspect.OCIv1.config.Entrypoint, ['/usr/local/bin/stargaze', 'daemon']);
    assert.deepEqual(inspect.OCIv1.config.Cmd?.slice(0, 4), ['--address', SOCKET, '--root', '/var/lib/stargaze']);
    const cid = (await buildah(['from', '--quiet', '--pull-never', DAEMON_IMAGE])).stdout.trim();
    try {
      const version = await buildah(['run', '--isolation', 'chroot', cid, '--', '/usr/local/bin/stargaze', '--version']);
      assert.equal(version.stdout.trim(), 'stargaze 0.1.0');
      const rootfs = (await buildah(['mount', cid])).stdout.trim();
      const installed = await readFile(path.join(rootfs, 'var/log/stand-in-apt.installed'), 'utf8');
      for (const pkg of ['libfuse2', 'fuse3']) assert.ok(installed.split('\n').includes(pkg), `${pkg} installed`);
    } finally {
      await buildah(['rm', cid], { allowFailure: true });
    }
  });
});
