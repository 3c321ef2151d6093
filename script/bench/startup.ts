/**
 * Container startup benchmark, the HelloBench method (`npm run bench -- startup`; root needed): for realistic
 * images built here from Debian packages (startup-images.ts: a minimal Debian, the same plus python3, nodejs,
 * gcc, g++), time `pull`, `create` and `run` (the workload prints `hello` and exits) in three modes:
 *
 * - legacy:   `ctr images pull` (fetch + unpack on containerd's overlayfs), `ctr containers create`,
 *             `ctr tasks start` on the plain gzip image;
 * - lazy:     `stargaze rpull` (every layer mounted lazily by the stargaze daemon), `ctr containers create
 *             --snapshotter stargz`, `ctr tasks start`, on the image converted by `stargaze convert` (no
 *             prioritized files: `.no.prefetch.landmark`, nothing prefetched);
 * - lazy-opt: the same on the image converted with `--prioritized-files` recorded from the workload (strace, see
 *             startup-images.ts): those files first, then `.prefetch.landmark`; the daemon prefetches up to the
 *             landmark and `create` waits for it (bounded by prefetch_timeout_sec), as the reference does;
 * - peer:     the reference snapshotter (`containerd-stargz-grpc`, from STARGAZE_PEER_BIN; see
 *             test/e2e/harness/peer.ts) with `ctr-remote images rpull`, then the same create and start as lazy, on
 *             the very image lazy pulls (converted by `stargaze convert`: the reference reads and verifies it);
 * - peer-opt: the same on lazy-opt's image.
 * - lazy-profile: lazy's image under a repository of its own, with a prefetch profile pushed for it: once per
 *             image and run, a recording start (fresh daemon: rpull, create, run; the daemon records what the
 *             start read) and `stargaze profile push`; then each sample is a new node as in lazy (fresh daemon
 *             root and containerd) whose rpull finds the profile through the registry and prefetches it.
 * Without STARGAZE_PEER_BIN the peer modes are left out with one note.
 *
 * Network: the registry (docker-registry, plus the harness's byte-counting proxy) on loopback, reached either
 * directly or through link-proxy.ts, a TCP proxy this benchmark starts that emulates a link (round trip and a
 * bandwidth shared by all connections). containerd and the daemon both pull through it: the image reference
 * names the proxy's host:port, the daemon gets a plain-http hosts.toml for it, ctr and rpull get --plain-http.
 *
 * State: every sample starts a fresh containerd (own root) and, for the lazy modes, a fresh daemon (own root,
 * default config: prefetch on, background fetch on), and stops and removes both afterwards; the registry and
 * the link proxy live for the whole run. Samples interleave images and modes in a random order per round.
 * Each number is the median over the samples; `fetched` is the layer bytes the registry served from the pull
 * to the end of the run (for the lazy and peer modes that includes what background fetch got meanwhile), and
 * `GETs` the blob GETs it answered meanwhile (config and layers; HEAD, manifest and token requests not counted).
 *
 * Output: a Markdown table (printed, and bench-results/startup.md), a chart (bench-results/startup.svg) and the
 * raw samples (bench-results/startup.json, written by run.ts).
 *
 * Knobs (environment):
 *   BENCH_SAMPLES=3                                 samples per image, mode and link
 *   BENCH_STARTUP_IMAGES=debian,python,node,gcc     from startup-images.ts IMAGE_SPECS (also g++)
 *   BENCH_STARTUP_MODES=legacy,lazy,lazy-opt,lazy-profile[,peer,peer-opt]   the peer modes by default when STARGAZE_PEER_BIN is set
 *   STARGAZE_PEER_BIN=/path/to/containerd-stargz-grpc
 *   BENCH_STARTUP_LINKS=direct,20ms-200mbit,20ms-50mbit   `direct` or `<rtt>ms-<rate>mbit`
 *   BENCH_STARTUP_REBUILD=1                         rebuild the cached images (bench-results/startup-cache)
 *   BENCH_STARTUP_RERECORD=1                        re-record the prioritized files only
 *   BENCH_STARTUP_DAEMON_CONFIG='no_background_fetch = true'   daemon config.toml (default: empty, defaults)
 *   BENCH_STARTUP_PEER_CONFIG='...'                 the peer's config.toml (default: empty, its defaults)
 *   BENCH_RECORD_COST_SAMPLES=9, BENCH_RECORD_COST_IMAGE=python   with lazy-profile: the FUSE server's CPU over a lazy
 *                                                   start with recording on and off, in interleaved pairs (0: skip)
 *
 * `stargaze convert` runs registry to registry; its result is kept as an OCI layout in
 * bench-results/startup-cache/converted, keyed by source layers, prioritized files and a hash of the compiled
 * converter (dist/src/estargz, dist/src/image, dist/src/cmd/convert.js), and
 * pushed from there (skopeo) while none of these change (the convert time reported is the one measured then).
 *
 * Tools: debootstrap, strace, skopeo, containerd, ctr, runc, unshare, getfattr (`apt-get install debootstrap
 * strace` beyond what script/setup.sh installs); the first run needs the Debian mirror (apt) to build images.
 * Default run on the shared 2-core machine: about 16 minutes (17 with the first conversions), mostly the legacy
 * pulls at 50 Mbit/s and one fresh containerd + daemon per sample; shrink with the knobs above.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import path from 'node:path';
import {
  CleanupStack,
  DEFAULT_CLI_PATH,
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  PEER_MISSING_NOTE,
  PEER_SNAPSHOTTER,
  REPO_ROOT,
  STARGZ_SNAPSHOTTER,
  fetchManifest,
  fuseServerPid,
  peerBinary,
  waitFor,
  peerProxyPlugin,
  run,
  startContainerd,
  startDaemon,
  startPeer,
  startRegistry,
  type Registry,
  type RunResult,
  type StargazeDaemon,
} from '../../test/e2e/harness';
import { expectLazyMounts } from './daemon-arm';
import { buildImages, type CachedImage } from './startup-images';

const MIB = 1024 * 1024;
const MODES = ['legacy', 'lazy', 'lazy-opt', 'lazy-profile', 'peer', 'peer-opt'] as const;
type Mode = (typeof MODES)[number];
const PEER_MODES: readonly Mode[] = ['peer', 'peer-opt'];
/** The peer mode each stargaze mode is measured against: the same image, the reference's daemon and client. */
const PEER_OF: Partial<Record<Mode, Mode>> = { lazy: 'peer', 'lazy-opt': 'peer-opt', 'lazy-profile': 'peer' };
/** The stargaze modes: the daemon pulls with `stargaze rpull`. */
const STARGAZE_MODES: readonly Mode[] = ['lazy', 'lazy-opt', 'lazy-profile'];
/** The image tag each mode pulls (see publish). */
const TAG_OF: Record<Mode, 'plain' | 'esgz' | 'esgz-opt' | 'esgz-profiled'> = {
  legacy: 'plain',
  lazy: 'esgz',
  'lazy-opt': 'esgz-opt',
  'lazy-profile': 'esgz-profiled',
  peer: 'esgz',
  'peer-opt': 'esgz-opt',
};
const STEP_TIMEOUT_MS = 900_000;
/** How long a recording start waits for the daemon to store a profile per layer (each after quiet_msec, 3 s). */
const PROFILE_WAIT_MS = 60_000;

/** An image as pushed: `repo:tag` on the registry, its layers' compressed bytes and digests. */
interface Published {
  repoTag: string;
  bytes: number;
  layers: string[];
}

/**
 * lazy-profile's image: lazy's, copied (same digests) into a repository of its own, so that only this mode's
 * pulls find the profile pushed for it (referrers are per repository). A recording start on a fresh daemon
 * (rpull, create, run: the daemon records what the start reads, per layer) is followed by
 * `stargaze profile push`, which attaches the profile to the image's manifest in the registry.
 */
async function publishProfiled(registry: Registry, image: CachedImage, esgz: Published): Promise<Published> {
  const [repo, tag] = esgz.repoTag.split(':') as [string, string];
  const repoTag = `${repo}-profiled:${tag}`;
  await run(
    'skopeo',
    ['--insecure-policy', 'copy', '--quiet', '--preserve-digests', '--src-tls-verify=false', '--dest-tls-verify=false', `docker://${registry.host}/${esgz.repoTag}`, `docker://${registry.host}/${repoTag}`],
    { timeoutMs: STEP_TIMEOUT_MS },
  );
  const scope = new CleanupStack();
  try {
    const daemon = await startDaemon({ scope, logLevel: 'info', plainHttpHosts: [registry.host], config: daemonConfig() });
    const containerd = await startContainerd({ scope, stargazeAddress: daemon.address, stargazeRoot: daemon.root });
    const ns = containerd.newNamespace('record');
    const ref = `${registry.host}/${repoTag}`;
    const id = containerd.uniqueId('record');
    await run(STARGAZE_COMMAND, ['rpull', '--pull-address', daemon.pullAddress, '--address', containerd.address, '--namespace', ns, '--plain-http', ref], {
      env: STARGAZE_COMMAND_ENV,
      timeoutMs: STEP_TIMEOUT_MS,
    });
    await containerd.ctr(['containers', 'create', '--net-host', '--snapshotter', STARGZ_SNAPSHOTTER, ref, id], { namespace: ns, timeoutMs: STEP_TIMEOUT_MS });
    const started = await containerd.ctr(['tasks', 'start', id], { namespace: ns, timeoutMs: STEP_TIMEOUT_MS });
    if (!started.stdout.includes(image.spec.expect)) throw new Error(`${image.spec.name}: the recording start printed ${JSON.stringify(started.stdout)}`);
    // A layer's profile is stored once its reads have been quiet for a while: every layer the start read.
    await waitFor(
      `a profile per layer of ${image.spec.name}`,
      async () => {
        const ls = await run(STARGAZE_COMMAND, ['profile', 'ls', '--root', daemon.root], { env: STARGAZE_COMMAND_ENV });
        return ls.stdout.trim().split('\n').length - 1 >= esgz.layers.length;
      },
      { timeoutMs: PROFILE_WAIT_MS, intervalMs: 500 },
    );
    await run(STARGAZE_COMMAND, ['profile', 'push', '--root', daemon.root, '--plain-http', ref], { env: STARGAZE_COMMAND_ENV, timeoutMs: STEP_TIMEOUT_MS });
  } finally {
    await scope.run();
  }
  return { ...esgz, repoTag };
}

export interface Link {
  name: string;
  rttMs: number;
  /** bits per second; 0: direct */
  bps: number;
}

export interface Sample {
  pullMs: number;
  createMs: number;
  runMs: number;
  fetchedBytes: number;
  /** Blob GETs the registry answered from the pull to the end of the run. */
  blobGets: number;
  /** stargaze modes: CPU time (user + system) of the FUSE server from its start to the end of the run. */
  fuseCpuMs?: number;
}

/** User + system CPU time of a process so far, from /proc/PID/stat (clock ticks of 10 ms). */
async function cpuMsOf(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command name (in parentheses, which may hold spaces): utime and stime are the 12th and 13th.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

export interface StartupRow {
  link: string;
  image: string;
  mode: Mode;
  /** Compressed layer bytes of the image this mode pulls. */
  imageBytes: number;
  pull: number;
  create: number;
  run: number;
  total: number;
  fetchedBytes: number;
  blobGets: number;
  samples: Sample[];
}

export function parseLinks(spec: string): Link[] {
  return spec
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map((name) => {
      if (name === 'direct') return { name, rttMs: 0, bps: 0 };
      const m = /^(\d+(?:\.\d+)?)ms-(\d+(?:\.\d+)?)mbit$/.exec(name);
      if (!m) throw new Error(`bad link ${name}: want direct or <rtt>ms-<rate>mbit, e.g. 20ms-200mbit`);
      return { name, rttMs: Number(m[1]), bps: Number(m[2]) * 1e6 };
    });
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

function shuffled<T>(xs: readonly T[]): T[] {
  const a = [...xs];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j]!, a[i]!];
  }
  return a;
}

const say = (msg: string): void => {
  process.stdout.write(`  ${msg}\n`);
};

/** Starts link-proxy.js in front of `target`; resolves with its host:port once it listens. */
export async function startLinkProxy(target: string, link: Link, scope: CleanupStack): Promise<string> {
  const script = path.join(REPO_ROOT, 'dist', 'script', 'bench', 'link-proxy.js');
  const child = spawn(process.execPath, [script, '0', target, String(link.rttMs), String(link.bps)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  scope.after(
    () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
        setTimeout(() => child.kill('SIGKILL'), 5_000).unref();
      }),
  );
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
      const m = /ready (\d+)/.exec(out);
      if (m) resolve(Number(m[1]));
    });
    child.once('exit', (code) => reject(new Error(`link-proxy exited (${code}) before it was ready`)));
    setTimeout(() => reject(new Error('link-proxy not ready after 10 s')), 10_000).unref();
  });
  return `127.0.0.1:${port}`;
}

const convertCacheDir = path.join(REPO_ROOT, 'bench-results', 'startup-cache', 'converted');

/**
 * sha256 over the compiled converter (dist/src/estargz, dist/src/image, dist/src/cmd/convert.js): a converted
 * image is reused only while the code that decides its bytes is unchanged.
 */
async function converterFingerprint(): Promise<string> {
  const h = createHash('sha256');
  const walk = async (dir: string): Promise<void> => {
    for (const e of (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1))) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.name.endsWith('.js')) h.update(e.name).update(await readFile(p));
    }
  };
  const dist = path.join(REPO_ROOT, 'dist', 'src');
  await walk(path.join(dist, 'estargz'));
  await walk(path.join(dist, 'image'));
  h.update(await readFile(path.join(dist, 'cmd', 'convert.js')));
  return h.digest('hex');
}

/** Pushes the cached plain image and makes the two eStargz versions with `stargaze convert`. */
async function publish(
  registry: Registry,
  image: CachedImage,
  notes: string[],
): Promise<Record<'plain' | 'esgz' | 'esgz-opt', Published> & { 'esgz-profiled'?: Published }> {
  const repo = `bench/${image.spec.name.replace(/[^a-z0-9]/g, 'x')}`;
  const plain = `${registry.host}/${repo}:plain`;
  await run(
    'skopeo',
    ['--insecure-policy', 'copy', '--quiet', '--preserve-digests', '--dest-tls-verify=false', `oci:${image.layoutDir}:plain`, `docker://${plain}`],
    { timeoutMs: STEP_TIMEOUT_MS },
  );
  const fingerprint = await converterFingerprint();
  const prioritized = await readFile(image.prioritizedFile);
  /**
   * `stargaze convert --plain-http plain dst` (registry to registry), unless the cache has the result for the
   * same source image, prioritized files and build of dist/src: then that is pushed (skopeo) instead. Returns
   * the convert's seconds (cached: those of the run that made it).
   */
  const convert = async (tag: string, extra: string[]): Promise<number> => {
    const key = createHash('sha256')
      .update(JSON.stringify({ layers: image.layers.map((l) => l.digest), extra, fingerprint }))
      .update(extra.length > 0 ? prioritized : '')
      .digest('hex')
      .slice(0, 16);
    const cached = path.join(convertCacheDir, `${image.spec.name}-${tag}-${key}`);
    const dst = `${registry.host}/${repo}:${tag}`;
    if (existsSync(path.join(cached, 'done'))) {
      await run('skopeo', ['--insecure-policy', 'copy', '--quiet', '--preserve-digests', '--dest-tls-verify=false', `oci:${cached}:${tag}`, `docker://${dst}`], {
        timeoutMs: STEP_TIMEOUT_MS,
      });
      return Number(await readFile(path.join(cached, 'done'), 'utf8'));
    }
    const r = await run(process.execPath, [DEFAULT_CLI_PATH, 'convert', '--plain-http', '--quiet', ...extra, plain, dst], { timeoutMs: STEP_TIMEOUT_MS });
    await mkdir(convertCacheDir, { recursive: true });
    // one cached conversion per image and tag: drop those of older builds or lists
    for (const old of await readdir(convertCacheDir)) {
      if (old.length === `${image.spec.name}-${tag}-`.length + 16 && old.startsWith(`${image.spec.name}-${tag}-`)) await rm(path.join(convertCacheDir, old), { recursive: true, force: true });
    }
    await run('skopeo', ['--insecure-policy', 'copy', '--quiet', '--preserve-digests', '--src-tls-verify=false', `docker://${dst}`, `oci:${cached}:${tag}`], {
      timeoutMs: STEP_TIMEOUT_MS,
    });
    await writeFile(path.join(cached, 'done'), String(r.durationMs));
    return r.durationMs;
  };
  const t1 = await convert('esgz', []);
  const t2 = await convert('esgz-opt', ['--prioritized-files', image.prioritizedFile]);
  const describe = async (tag: string): Promise<{ repoTag: string; bytes: number; layers: string[] }> => {
    const { manifest } = await fetchManifest(registry.host, repo, tag);
    return { repoTag: `${repo}:${tag}`, bytes: manifest.layers.reduce((n, l) => n + l.size, 0), layers: manifest.layers.map((l) => l.digest) };
  };
  const out = { plain: await describe('plain'), esgz: await describe('esgz'), 'esgz-opt': await describe('esgz-opt') };
  notes.push(
    `${image.spec.name}: gzip ${(out.plain.bytes / MIB).toFixed(1)} MiB (${(image.uncompressedBytes / MIB).toFixed(0)} MiB unpacked, ` +
      `${image.layers.length} layers); stargaze convert: ${(t1 / 1000).toFixed(1)} s -> ${(out.esgz.bytes / MIB).toFixed(1)} MiB, ` +
      `with ${image.prioritizedCount} prioritized files ${(t2 / 1000).toFixed(1)} s -> ${(out['esgz-opt'].bytes / MIB).toFixed(1)} MiB`,
  );
  return out;
}

/** The daemon's config.toml: defaults, or BENCH_STARTUP_DAEMON_CONFIG (TOML text, `\n` for newlines). */
function daemonConfig(): string {
  return (process.env.BENCH_STARTUP_DAEMON_CONFIG ?? '').replace(/\\n/g, '\n') + '\n';
}

/** The peer's config.toml: its defaults, or BENCH_STARTUP_PEER_CONFIG (TOML text, `\n` for newlines). */
function peerConfig(): string {
  return (process.env.BENCH_STARTUP_PEER_CONFIG ?? '').replace(/\\n/g, '\n') + '\n';
}

/**
 * One sample: fresh containerd (+ the stargaze daemon for lazy modes, the peer daemon for peer modes), pull,
 * create, run, tear down.
 */
async function sample(
  registry: Registry,
  pullHost: string,
  image: CachedImage,
  mode: Mode,
  published: { repoTag: string; layers: string[] },
  config = daemonConfig(),
): Promise<Sample> {
  const scope = new CleanupStack();
  try {
    const stargaze = STARGAZE_MODES.includes(mode);
    const peer = PEER_MODES.includes(mode);
    const daemon = stargaze
      ? await startDaemon({ scope, logLevel: TRACE_DIR === undefined ? 'info' : 'debug', plainHttpHosts: [pullHost], config })
      : undefined;
    if (daemon !== undefined && TRACE_DIR !== undefined) scope.after(() => keepTrace(daemon, `${image.spec.name}-${mode}`));
    // the reference reaches registries on loopback over plain HTTP without a hosts config
    const peerDaemon = peer ? await startPeer({ scope, config: peerConfig() }) : undefined;
    const containerd = await startContainerd({
      scope,
      stargazeAddress: daemon?.address,
      stargazeRoot: daemon?.root,
      proxyPlugins: peerDaemon ? [peerProxyPlugin(peerDaemon)] : [],
    });
    const ns = containerd.newNamespace('bench');
    const ref = `${pullHost}/${published.repoTag}`;
    const id = containerd.uniqueId('bench');
    registry.resetCounters();
    let pull: RunResult;
    if (daemon !== undefined) {
      pull = await run(STARGAZE_COMMAND, ['rpull', '--pull-address', daemon.pullAddress, '--address', containerd.address, '--namespace', ns, '--plain-http', ref], {
        env: STARGAZE_COMMAND_ENV,
        timeoutMs: STEP_TIMEOUT_MS,
      });
    } else if (peer) {
      pull = await containerd.rpull(ref, { snapshotter: PEER_SNAPSHOTTER, namespace: ns, timeoutMs: STEP_TIMEOUT_MS });
    } else {
      pull = await containerd.ctr(['images', 'pull', '--plain-http', ref], { namespace: ns, timeoutMs: STEP_TIMEOUT_MS });
    }
    // A layer either daemon refused would have been downloaded by containerd: the sample would not be lazy.
    if (daemon) await expectLazyMounts('stargaze', daemon, published.layers.length);
    if (peerDaemon) await expectLazyMounts('peer', peerDaemon, published.layers.length);
    const snap = stargaze ? ['--snapshotter', STARGZ_SNAPSHOTTER] : peer ? ['--snapshotter', PEER_SNAPSHOTTER] : [];
    // no command: the workload is the image's Cmd (ctr would take its flags, python3 -c, for its own)
    const create = await containerd.ctr(['containers', 'create', '--net-host', ...snap, ref, id], {
      namespace: ns,
      timeoutMs: STEP_TIMEOUT_MS,
    });
    const started = await containerd.ctr(['tasks', 'start', id], { namespace: ns, timeoutMs: STEP_TIMEOUT_MS });
    if (!started.stdout.includes(image.spec.expect)) {
      throw new Error(`${image.spec.name}/${mode}: the workload printed ${JSON.stringify(started.stdout)} ${started.stderr}`);
    }
    const fetchedBytes = published.layers.reduce((n, d) => n + registry.bytesServed(d), 0);
    const blobGets = registry.blobRequests().filter((r) => r.method === 'GET').length;
    const fusePid = daemon !== undefined ? await fuseServerPid(daemon.root) : undefined;
    const fuseCpuMs = fusePid !== undefined ? await cpuMsOf(fusePid) : undefined;
    return { pullMs: pull.durationMs, createMs: create.durationMs, runMs: started.durationMs, fetchedBytes, blobGets, fuseCpuMs };
  } finally {
    await scope.run();
  }
}

/**
 * BENCH_STARTUP_TRACE_DIR: each stargaze sample runs at debug level and leaves its daemon's and FUSE server's logs
 * there (`IMAGE-MODE-N.daemon.log`, `.fuse-server.log`), to see where a start's time goes.
 */
const TRACE_DIR = process.env.BENCH_STARTUP_TRACE_DIR;
let traced = 0;

async function keepTrace(daemon: StargazeDaemon, name: string): Promise<void> {
  if (TRACE_DIR === undefined) return;
  const base = path.join(TRACE_DIR, `${name}-${++traced}`);
  await mkdir(TRACE_DIR, { recursive: true });
  await copyFile(daemon.logFile, `${base}.daemon.log`).catch(() => undefined);
  await copyFile(path.join(daemon.root, 'fuse', 'fuse-server.log'), `${base}.fuse-server.log`).catch(() => undefined);
}

const secs = (ms: number): string => (ms / 1000).toFixed(2);

/** Interleaved pairs of the recording-cost comparison (BENCH_RECORD_COST_SAMPLES). */
const RECORD_COST_SAMPLES = Number(process.env.BENCH_RECORD_COST_SAMPLES ?? 9);

/**
 * What recording a profile costs: the FUSE server's CPU time over a lazy start (pull, create, run of the image
 * without a profile) with recording on (the default) against `[prefetch_profile] record = false`, in
 * interleaved pairs, each on a fresh daemon. Returns a note with both medians and their ratio.
 */
async function recordingCost(registry: Registry, pullHost: string, image: CachedImage, esgz: Published, linkName: string): Promise<string> {
  const on: number[] = [];
  const off: number[] = [];
  const base = daemonConfig();
  for (let i = 0; i < RECORD_COST_SAMPLES; i++) {
    for (const record of i % 2 === 0 ? [true, false] : [false, true]) {
      const config = record ? base : `${base}[prefetch_profile]\nrecord = false\n`;
      const r = await sample(registry, pullHost, image, 'lazy', esgz, config);
      if (r.fuseCpuMs === undefined) throw new Error('the FUSE server was gone before its CPU time was read');
      (record ? on : off).push(r.fuseCpuMs);
    }
  }
  const mOn = median(on);
  const mOff = median(off);
  return (
    `${linkName} ${image.spec.name}: FUSE server CPU over a lazy start, recording on ${mOn.toFixed(0)} ms vs off ${mOff.toFixed(0)} ms ` +
    `(medians of ${RECORD_COST_SAMPLES} interleaved pairs; on/off ${(mOn / mOff).toFixed(3)}; on ${on.join(' ')}; off ${off.join(' ')})`
  );
}

/**
 * One row per link, image and mode. `vs legacy`: total over legacy's total; `stargaze/peer`: a stargaze mode's total,
 * blob GETs and bytes over those of its peer mode (lazy over peer, lazy-opt over peer-opt).
 */
export function markdownTable(rows: StartupRow[]): string {
  const lines = [
    '| link | image (gzip) | mode | pull s | create s | run s | total s | vs legacy | stargaze/peer: total | blob GETs | fetched MiB | stargaze/peer: GETs, bytes |',
    '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ];
  const ratio = (a: number, b: number): string => (b > 0 ? `${(a / b).toFixed(2)}x` : '');
  for (const r of rows) {
    const find = (mode: Mode | undefined): StartupRow | undefined =>
      mode === undefined ? undefined : rows.find((x) => x.link === r.link && x.image === r.image && x.mode === mode);
    const legacy = r.mode === 'legacy' ? undefined : find('legacy');
    const peer = find(PEER_OF[r.mode]);
    lines.push(
      `| ${r.link} | ${r.image} (${(r.imageBytes / MIB).toFixed(0)} MiB) | ${r.mode} | ${secs(r.pull)} | ${secs(r.create)} | ${secs(r.run)} | ` +
        `${secs(r.total)} | ${legacy ? ratio(r.total, legacy.total) : ''} | ${peer ? ratio(r.total, peer.total) : ''} | ${r.blobGets} | ` +
        `${(r.fetchedBytes / MIB).toFixed(1)} | ${peer ? `${ratio(r.blobGets, peer.blobGets)}, ${ratio(r.fetchedBytes, peer.fetchedBytes)}` : ''} |`,
    );
  }
  return lines.join('\n') + '\n';
}

const esc = (s: string): string => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** Horizontal stacked bars (pull / create / run), one panel per link, one bar per image and mode. */
function svgChart(rows: StartupRow[], title: string): string {
  const links = [...new Set(rows.map((r) => r.link))];
  const barH = 14;
  const gap = 4;
  const labelW = 150;
  const plotW = 560;
  const width = labelW + plotW + 90;
  const colors = { pull: '#4e79a7', create: '#f28e2b', run: '#59a14f' };
  const parts: string[] = [];
  let y = 40;
  for (const link of links) {
    const lr = rows.filter((r) => r.link === link);
    const max = Math.max(...lr.map((r) => r.total), 1);
    parts.push(`<text x="8" y="${y + 4}" font-weight="bold">${esc(link)} (max ${secs(max)} s)</text>`);
    y += 12;
    let lastImage = '';
    for (const r of lr) {
      if (r.image !== lastImage && lastImage !== '') y += 6;
      lastImage = r.image;
      parts.push(`<text x="${labelW - 6}" y="${y + barH - 3}" text-anchor="end">${esc(`${r.image} ${r.mode}`)}</text>`);
      let x = labelW;
      for (const k of ['pull', 'create', 'run'] as const) {
        const w = (r[k] / max) * plotW;
        parts.push(`<rect x="${x.toFixed(1)}" y="${y}" width="${Math.max(0, w).toFixed(1)}" height="${barH}" fill="${colors[k]}"><title>${k} ${secs(r[k])} s</title></rect>`);
        x += w;
      }
      parts.push(`<text x="${(x + 4).toFixed(1)}" y="${y + barH - 3}">${secs(r.total)} s</text>`);
      y += barH + gap;
    }
    y += 16;
  }
  const legend = (['pull', 'create', 'run'] as const)
    .map((k, i) => `<rect x="${labelW + i * 80}" y="18" width="12" height="12" fill="${colors[k]}"/><text x="${labelW + i * 80 + 16}" y="28">${k}</text>`)
    .join('');
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y}" font-family="sans-serif" font-size="11">` +
    `<rect width="100%" height="100%" fill="white"/><text x="8" y="14" font-weight="bold">${esc(title)}</text>${legend}\n` +
    parts.join('\n') +
    '\n</svg>\n'
  );
}

/**
 * The modes to run: BENCH_STARTUP_MODES, else every mode (the peer's only with a peer binary). Peer modes asked
 * for without a binary are dropped with PEER_MISSING_NOTE, so a run without the peer runs as before.
 */
export function selectModes(spec: string | undefined, havePeer: boolean, notes: string[]): Mode[] {
  const asked = [...new Set((spec ?? MODES.join(',')).split(',').map((s) => s.trim()).filter(Boolean))] as Mode[];
  for (const m of asked) if (!MODES.includes(m)) throw new Error(`unknown mode ${m}; known: ${MODES.join(', ')}`);
  const modes = havePeer ? asked : asked.filter((m) => !PEER_MODES.includes(m));
  if (modes.length === 0) throw new Error(`no mode left to run of ${asked.join(', ')}: ${PEER_MISSING_NOTE}`);
  if (!havePeer && (modes.length < asked.length || spec === undefined)) notes.push(PEER_MISSING_NOTE);
  return modes;
}

export async function benchStartup(): Promise<{ rows: StartupRow[]; notes: string[]; table: string }> {
  if (process.getuid?.() !== 0) throw new Error('the startup benchmark runs containerd, FUSE and chroot: run it as root');
  const t0 = Date.now();
  const samples = Number(process.env.BENCH_SAMPLES ?? 3);
  const imageNames = (process.env.BENCH_STARTUP_IMAGES ?? 'debian,python,node,gcc').split(',').map((s) => s.trim()).filter(Boolean);
  const havePeer = peerBinary() !== undefined;
  const notes: string[] = [`load average at start: ${loadavg().map((l) => l.toFixed(2)).join(' ')} (${samples} samples, medians)`];
  const modes = selectModes(process.env.BENCH_STARTUP_MODES, havePeer, notes);
  const links = parseLinks(process.env.BENCH_STARTUP_LINKS ?? 'direct,20ms-200mbit,20ms-50mbit');
  const outDir = path.join(REPO_ROOT, 'bench-results');

  say('building / loading images (cached in bench-results/startup-cache)');
  const images = await buildImages(path.join(outDir, 'startup-cache'), imageNames, process.env.BENCH_STARTUP_REBUILD === '1');

  const cleanup = new CleanupStack();
  const rows: StartupRow[] = [];
  try {
    const registry = await startRegistry({ scope: cleanup });
    const published = new Map<string, Awaited<ReturnType<typeof publish>>>();
    for (const image of images) {
      say(`${image.spec.name}: push (skopeo) and stargaze convert (plain, --prioritized-files)`);
      const pub = await publish(registry, image, notes);
      say(notes[notes.length - 1]!);
      if (modes.includes('lazy-profile')) {
        say(`${image.spec.name}: a recording start and stargaze profile push (lazy-profile)`);
        pub['esgz-profiled'] = await publishProfiled(registry, image, pub.esgz);
      }
      published.set(image.spec.name, pub);
    }
    for (const link of links) {
      const linkScope = new CleanupStack();
      try {
        // every pull goes through the counting proxy, so `fetched` is measured in all cases
        const pullHost = link.bps === 0 ? registry.countingHost : await startLinkProxy(registry.countingHost, link, linkScope);
        const collected = new Map<string, Sample[]>();
        for (let s = 0; s < samples; s++) {
          for (const image of shuffled(images)) {
            for (const mode of shuffled(modes)) {
              const pub = published.get(image.spec.name)![TAG_OF[mode]]!;
              const r = await sample(registry, pullHost, image, mode, pub);
              const key = `${image.spec.name}\0${mode}`;
              collected.set(key, [...(collected.get(key) ?? []), r]);
              say(
                `${link.name} #${s + 1} ${image.spec.name} ${mode}: pull ${secs(r.pullMs)} create ${secs(r.createMs)} run ${secs(r.runMs)} ` +
                  `fetched ${(r.fetchedBytes / MIB).toFixed(1)} MiB`,
              );
            }
          }
        }
        const costImage = process.env.BENCH_RECORD_COST_IMAGE ?? 'python';
        for (const image of images) {
          if (!modes.includes('lazy-profile') || image.spec.name !== costImage || RECORD_COST_SAMPLES <= 0) continue;
          say(`${link.name} ${image.spec.name}: what recording costs (${RECORD_COST_SAMPLES} interleaved pairs)`);
          notes.push(await recordingCost(registry, pullHost, image, published.get(image.spec.name)!.esgz, link.name));
          say(notes[notes.length - 1]!);
        }
        for (const image of images) {
          for (const mode of modes) {
            const ss = collected.get(`${image.spec.name}\0${mode}`) ?? [];
            rows.push({
              link: link.name,
              image: image.spec.name,
              mode,
              imageBytes: published.get(image.spec.name)![TAG_OF[mode]]!.bytes,
              pull: median(ss.map((x) => x.pullMs)),
              create: median(ss.map((x) => x.createMs)),
              run: median(ss.map((x) => x.runMs)),
              total: median(ss.map((x) => x.pullMs + x.createMs + x.runMs)),
              fetchedBytes: median(ss.map((x) => x.fetchedBytes)),
              blobGets: median(ss.map((x) => x.blobGets)),
              samples: ss,
            });
          }
        }
      } finally {
        await linkScope.run();
      }
    }
  } finally {
    await cleanup.run();
  }
  notes.push(`load average at end: ${loadavg().map((l) => l.toFixed(2)).join(' ')}; wall time ${((Date.now() - t0) / 60_000).toFixed(1)} min`);
  const table = markdownTable(rows);
  await mkdir(outDir, { recursive: true });
  await writeFile(
    path.join(outDir, 'startup.md'),
    `# Startup benchmark (${new Date().toISOString()})\n\nMedians of ${samples} samples; total = median of pull+create+run.\n\n${table}\n` +
      notes.map((n) => `- ${n}`).join('\n') +
      '\n',
  );
  await writeFile(path.join(outDir, 'startup.svg'), svgChart(rows, `stargaze startup benchmark: pull / create / run, median of ${samples} (seconds)`));
  return { rows, notes, table };
}
