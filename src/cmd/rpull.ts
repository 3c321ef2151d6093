/**
 * `stargaze rpull`: pull an image into containerd so that the snapshotter (our daemon, by default as the
 * `stargz` proxy plugin) mounts its eStargz layers lazily; layers it cannot mount lazily are downloaded and
 * unpacked here. The steps are in src/containerd/pull.ts (reference: cmd/ctr-remote/commands/rpull.go).
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { StargazeError, UsageError, errorMessage } from '../errors';
import type { ContainerdClient } from '../containerd/client';
import type { LayerOutcome, PullEvent } from '../containerd/pull';
import { collapseKey, joinOrLead, type CollapsedPull } from '../containerd/pull-collapse';
import { handOverToJoiners, takeLauncherJoin } from '../containerd/launcher-join';
import { formatPlatform, hostPlatform, parsePlatform, type Platform } from '../containerd/platforms';
import { parseReference, registryHostFor } from '../remote/reference';
import { pathExists } from '../path-exists';
// pino, the gRPC client, the pull and the registry client are loaded in pull() only: a pull that joins a
// concurrent one of the same image never needs them, and loading them is most of a pull's CPU time.

export const DEFAULT_CONTAINERD_ADDRESS = '/run/containerd/containerd.sock';
export const DEFAULT_NAMESPACE = 'default';
export const DEFAULT_SNAPSHOTTER = 'stargz';
/** containerd's usual config_path for hosts.toml files (the daemon's default too). */
export const DEFAULT_HOSTS_DIR = '/etc/containerd/certs.d';
/** ctr-remote rpull's prefetch size. */
export const DEFAULT_PREFETCH_BYTES = 10 * 1024 * 1024;
/**
 * What the manifest request gets to go out before the gRPC client loads (CPU work that blocks the event loop
 * for about 100 ms): reading hosts.toml and credentials and connecting take a few ms.
 */
const IO_HEAD_START_MS = 5;
/** How often a terminal progress line is redrawn at most. */
const TTY_REDRAW_MS = 100;
/** Characters of a digest shown per layer: `sha256:` and 12 hex digits. */
const SHORT_DIGEST_CHARS = 19;

const USAGE = `usage: stargaze rpull [options] REF

Pulls REF into containerd for lazy pulling: manifest, config (and index) go into containerd's content
store, each layer is prepared on the snapshotter with the remote-snapshot labels so that it is mounted
lazily, and layers that cannot be are downloaded and unpacked here. Then \`ctr run --snapshotter stargz REF\`
starts right away.

  --address SOCK          containerd socket (default ${DEFAULT_CONTAINERD_ADDRESS})
  --namespace NS          containerd namespace (default ${DEFAULT_NAMESPACE})
  --snapshotter NAME      snapshotter to unpack on (default ${DEFAULT_SNAPSHOTTER})
  --plain-http            talk to the registry over http when no hosts.toml says otherwise
  --hosts-dir DIR         containerd hosts.toml directory (default ${DEFAULT_HOSTS_DIR})
  --user USER:PASS        registry credentials (else docker's config.json)
  --platform OS/ARCH      platform to pick from a multi-platform image (default ${formatPlatform(hostPlatform())})
  --prefetch-bytes N      bytes of each layer the snapshotter prefetches (default ${DEFAULT_PREFETCH_BYTES})
  -h, --help              this help

The snapshotter fetches lazily with its own registry configuration (the daemon's --hosts-dir and
credentials); --plain-http and --user apply to what rpull itself downloads.
`;

export interface RpullArgs {
  ref: string;
  address: string;
  namespace: string;
  snapshotter: string;
  plainHttp: boolean;
  hostsDir: string;
  user: { username: string; password: string } | undefined;
  platform: string | undefined;
  prefetchBytes: number;
}

/** Parses argv; undefined means --help was asked for. */
export function parseRpullArgs(argv: string[]): RpullArgs | undefined {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        address: { type: 'string', default: DEFAULT_CONTAINERD_ADDRESS },
        namespace: { type: 'string', short: 'n', default: DEFAULT_NAMESPACE },
        snapshotter: { type: 'string', default: DEFAULT_SNAPSHOTTER },
        'plain-http': { type: 'boolean', default: false },
        'hosts-dir': { type: 'string', default: DEFAULT_HOSTS_DIR },
        user: { type: 'string', short: 'u' },
        platform: { type: 'string' },
        'prefetch-bytes': { type: 'string', default: String(DEFAULT_PREFETCH_BYTES) },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: true,
    });
  } catch (err) {
    throw new UsageError(`${errorMessage(err)}\n${USAGE}`);
  }
  const { values, positionals } = parsed;
  if (values.help) return undefined;
  if (positionals.length !== 1) throw new UsageError(`rpull takes exactly one image reference, got ${positionals.length}\n${USAGE}`);
  const prefetch = values['prefetch-bytes'];
  if (!/^\d+$/.test(prefetch) || !Number.isSafeInteger(Number(prefetch))) throw new UsageError(`--prefetch-bytes must be a number of bytes, not "${prefetch}"`);
  let user: RpullArgs['user'];
  if (values.user !== undefined) {
    const colon = values.user.indexOf(':');
    if (colon <= 0) throw new UsageError('--user must be USER:PASS');
    user = { username: values.user.slice(0, colon), password: values.user.slice(colon + 1) };
  }
  if (values.snapshotter === '') throw new UsageError('--snapshotter must not be empty');
  return {
    ref: positionals[0] as string,
    address: values.address,
    namespace: values.namespace,
    snapshotter: values.snapshotter,
    plainHttp: values['plain-http'],
    hostsDir: values['hosts-dir'],
    user,
    platform: values.platform,
    prefetchBytes: Number(prefetch),
  };
}

/**
 * The hosts dir to use. With --plain-http and no hosts.toml for the registry (nor a _default one), a
 * throw-away hosts dir says `server = "http://<host>"`, which is what ctr's --plain-http means.
 */
async function hostsDirFor(domain: string, hostsDir: string, plainHttp: boolean): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const none = { dir: hostsDir, cleanup: async () => undefined };
  if (!plainHttp) return none;
  const { DEFAULT_HOST_DIR, HOSTS_FILE } = await import('../remote/hosts');
  if ((await pathExists(path.join(hostsDir, domain, HOSTS_FILE))) || (await pathExists(path.join(hostsDir, DEFAULT_HOST_DIR, HOSTS_FILE)))) return none;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-rpull-hosts-'));
  await mkdir(path.join(dir, domain), { recursive: true });
  await writeFile(path.join(dir, domain, HOSTS_FILE), `server = ${JSON.stringify(`http://${registryHostFor(domain)}`)}\n`);
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

function layers(n: number): string {
  return n === 1 ? '1 layer' : `${n} layers`;
}

function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MiB`;
}

/** The line printed when a layer is done. */
export function layerLine(digest: string, outcome: LayerOutcome, bytes: number, ms: number): string {
  const d = digest.slice(0, SHORT_DIGEST_CHARS);
  switch (outcome) {
    case 'lazy':
      return `${d} lazy (remote snapshot) ${ms}ms`;
    case 'fetched':
      return `${d} fetched ${bytes} bytes ${ms}ms${bytes === 0 ? ' (blob already in the content store)' : ''}`;
    case 'present':
      return `${d} already present ${ms}ms`;
  }
}

/** Where progress goes: stdout, or a string (joinedOutput). */
export interface ProgressOutput {
  write(text: string): unknown;
  /** Terminal width, when a terminal. */
  columns?: number;
}

/**
 * Plain lines; on a terminal also a live status line for the layer in progress. A pull's lines and a joined
 * pull's (printJoined) come out of the same methods, so the two cannot drift apart.
 */
export class ProgressPrinter {
  /** Whether a status line is on screen (and must be cleared before the next line). */
  private statusShown = false;
  private lastDraw = 0;

  constructor(
    private readonly out: ProgressOutput,
    private readonly tty: boolean,
  ) {}

  private status(text: string, force: boolean): void {
    if (!this.tty) return;
    const now = Date.now();
    if (!force && now - this.lastDraw < TTY_REDRAW_MS) return;
    this.lastDraw = now;
    const columns = this.out.columns ?? 0;
    const width = columns > 1 ? columns - 1 : 79;
    this.out.write(`\r\x1b[2K${text.slice(0, width)}`);
    this.statusShown = true;
  }

  line(text: string): void {
    if (this.statusShown) this.out.write('\r\x1b[2K');
    this.statusShown = false;
    this.out.write(`${text}\n`);
  }

  /** The first line of a pull: the image, its manifest and platform. */
  resolved(name: string, manifestDigest: string, platform: string | undefined, layerCount: number): void {
    this.line(`${name}: ${manifestDigest.slice(0, SHORT_DIGEST_CHARS)}${platform ? ` (${platform})` : ''}, ${layers(layerCount)}`);
  }

  /** The last line of a pull: what happened to its layers. */
  done(name: string, results: readonly { outcome: LayerOutcome; bytes: number }[], ms: number): void {
    const count = (o: LayerOutcome): number => results.filter((l) => l.outcome === o).length;
    const bytes = results.reduce((n, l) => n + l.bytes, 0);
    this.line(
      `done: ${name} ${layers(results.length)} (${count('lazy')} lazy, ${count('fetched')} fetched, ${count('present')} already present), ` +
        `${bytes} bytes fetched in ${ms}ms`,
    );
  }

  /** The line of a layer that is done. */
  layerDone(digest: string, outcome: LayerOutcome, bytes: number, ms: number): void {
    this.line(layerLine(digest, outcome, bytes, ms));
  }

  event(e: PullEvent): void {
    switch (e.type) {
      case 'resolved':
        this.resolved(e.name, e.manifest.digest, e.platform, e.layers);
        break;
      case 'layer-start':
        this.status(`${e.digest.slice(0, SHORT_DIGEST_CHARS)} preparing (${formatBytes(e.size)})`, true);
        break;
      case 'layer-progress':
        this.status(`${e.digest.slice(0, SHORT_DIGEST_CHARS)} fetching ${formatBytes(e.bytes)} / ${formatBytes(e.size)}`, e.bytes === e.size);
        break;
      case 'layer-done':
        this.layerDone(e.digest, e.outcome, e.bytes, e.ms);
        break;
    }
  }
}

export async function main(argv: string[]): Promise<number> {
  const args = parseRpullArgs(argv);
  if (args === undefined) {
    process.stdout.write(USAGE);
    return 0;
  }
  const reference = parseReference(args.ref);
  const platform = args.platform !== undefined ? parsePlatform(args.platform) : hostPlatform();
  // Pulls started by the launcher with these same arguments wait for this one's output (launcher-join.ts).
  const launcherJoin = takeLauncherJoin();
  const handOver = async (r: CollapsedPull, ms: number): Promise<void> => {
    if (launcherJoin !== undefined) await handOverToJoiners(launcherJoin, joinedOutput(r, ms));
  };
  const abort = new AbortController();
  const onSignal = (): void => abort.abort(new StargazeError('ERR_INTERNAL', 'interrupted'));
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const progress = new ProgressPrinter(process.stdout, process.stdout.isTTY === true);
    const key = collapseKey({
      address: path.resolve(args.address),
      namespace: args.namespace,
      snapshotter: args.snapshotter,
      ref: reference.toString(),
      platform: formatPlatform(platform),
      prefetchBytes: args.prefetchBytes,
      hostsDir: path.resolve(args.hostsDir),
      plainHttp: args.plainHttp,
      user: args.user,
    });
    const collapse = await joinOrLead(key, { signal: abort.signal });
    if (collapse.kind === 'joined') {
      printJoined(progress, collapse.result, collapse.waitedMs);
      await handOver(collapse.result, collapse.waitedMs);
      return 0;
    }
    try {
      const result = await pull(args, reference.domain, platform, abort.signal, progress);
      // The launcher's joiners started about when this process did: how long they waited is its age.
      await Promise.all([collapse.publish(result), handOver(result, Math.round(performance.now()))]);
    } catch (err) {
      // A failure may be the waiters' too: they each try at once (pull-collapse.ts). An interrupted pull's
      // is its own: saying nothing lets one of them take the lead for the others.
      if (!abort.signal.aborted) await collapse.fail();
      throw err;
    } finally {
      await collapse.release();
    }
    return 0;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/** What a pull that joined a concurrent one prints: the same lines, every layer present (the other pull did it). */
export function printJoined(progress: ProgressPrinter, r: CollapsedPull, ms: number): void {
  progress.resolved(r.name, r.manifestDigest, r.platform, r.layers.length);
  progress.line('joined a concurrent rpull of the same image');
  const present = r.layers.map((digest) => ({ digest, outcome: 'present' as const, bytes: 0 }));
  for (const l of present) progress.layerDone(l.digest, l.outcome, l.bytes, ms);
  progress.done(r.name, present, ms);
}

/** printJoined's lines as one string: what the launcher's joiners print. */
export function joinedOutput(r: CollapsedPull, ms: number): string {
  let text = '';
  printJoined(new ProgressPrinter({ write: (s: string) => (text += s) }, false), r, ms);
  return text;
}

async function pull(args: RpullArgs, domain: string, platform: Platform, signal: AbortSignal, progress: ProgressPrinter): Promise<CollapsedPull> {
  const [{ default: pino }, { RegistryClient }, { resolveManifest }] = await Promise.all([
    import('pino'),
    import('../remote/registry-client'),
    import('../containerd/resolve'),
  ]);
  // Logs go to stderr (stdout is the progress); quiet unless STARGAZE_LOG_LEVEL says otherwise.
  const log = pino({ level: process.env.STARGAZE_LOG_LEVEL ?? 'warn', base: undefined }, pino.destination(2));

  const hosts = await hostsDirFor(domain, args.hostsDir, args.plainHttp);
  const user = args.user;
  const registry = new RegistryClient({
    hostsDir: hosts.dir,
    credentials: user !== undefined ? () => user : undefined,
    log: log.child({ module: 'remote' }),
  });
  let client: ContainerdClient | undefined;
  try {
    // The registry round trips for the manifest go on while the gRPC client loads and connects (loading it
    // is CPU work of about 100 ms). containerd's errors still come first: the pull awaits this after them.
    const resolved = resolveManifest(registry, args.ref, platform, signal);
    resolved.catch(() => undefined);
    // Loading them blocks the event loop: the manifest request must be on the wire first, or it only leaves
    // once the load is done and the round trips no longer overlap it.
    await Promise.race([resolved.then(() => undefined, () => undefined), delay(IO_HEAD_START_MS)]);
    const [{ ContainerdClient }, { pullImage }] = await Promise.all([import('../containerd/client'), import('../containerd/pull')]);
    client = await ContainerdClient.connect({ address: args.address, namespace: args.namespace });
    const result = await pullImage({
      client,
      registry,
      ref: args.ref,
      snapshotter: args.snapshotter,
      platform,
      prefetchBytes: args.prefetchBytes,
      log: log.child({ module: 'rpull' }),
      signal,
      resolved,
      onEvent: (e) => progress.event(e),
    });
    progress.done(result.name, result.layers, result.ms);
    return { name: result.name, manifestDigest: result.manifest.digest, platform: result.platform, layers: result.layers.map((l) => l.digest) };
  } finally {
    client?.close();
    await registry.close();
    await hosts.cleanup();
  }
}
