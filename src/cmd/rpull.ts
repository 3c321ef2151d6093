/**
 * `stargaze rpull`: pull an image into containerd so that the snapshotter (our daemon, by default as the
 * `stargz` proxy plugin) mounts its eStargz layers lazily; layers it cannot mount lazily are downloaded and
 * unpacked here. The steps are in src/containerd/pull.ts (reference: cmd/ctr-remote/commands/rpull.go).
 */
import { homedir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { StargazeError, UsageError, errorMessage } from '../errors';
import type { LayerOutcome, PullEvent } from '../containerd/pull';
import type { PullRequest, PullSummary } from '../containerd/pull-request';
import type { CollapsedPull } from '../containerd/pull-collapse';
import { handOverToJoiners, takeLauncherJoin } from '../containerd/launcher-join';
import { formatPlatform, hostPlatform, parsePlatform, type Platform } from '../containerd/platforms';
import { parseReference } from '../remote/reference';
import { DEFAULT_PULL_ADDRESS, pullThroughDaemon } from './rpull-daemon';
// pino, the gRPC client, the pull and the registry client are loaded only for a pull in this process: a pull
// the daemon carries out, or one that joins a concurrent pull of the same image, never needs them, and
// loading them is most of a pull's CPU time. The collapse of concurrent pulls (pull-collapse.ts) is loaded
// only when no daemon takes the pull: the daemon shares identical pulls itself (service/shared-pulls.ts).

export const DEFAULT_CONTAINERD_ADDRESS = '/run/containerd/containerd.sock';
export const DEFAULT_NAMESPACE = 'default';
export const DEFAULT_SNAPSHOTTER = 'stargz';
/** containerd's usual config_path for hosts.toml files (the daemon's default too). */
export const DEFAULT_HOSTS_DIR = '/etc/containerd/certs.d';
/** ctr-remote rpull's prefetch size. */
export const DEFAULT_PREFETCH_BYTES = 10 * 1024 * 1024;
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
  --pull-address SOCK     the stargaze daemon's pull socket (default ${DEFAULT_PULL_ADDRESS}): the daemon, whose
                          modules are loaded, pulls and this prints its progress; when no daemon answers
                          there, rpull pulls in its own process; '' always pulls in its own process
  -h, --help              this help

The snapshotter fetches lazily with its own registry configuration (the daemon's --hosts-dir and
credentials); --plain-http, --user, --hosts-dir and docker's config.json ($DOCKER_CONFIG) apply to what
the pull itself downloads, also when the daemon carries it out.
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
  /** The daemon's pull socket; '' pulls in this process. */
  pullAddress: string;
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
        'pull-address': { type: 'string', default: DEFAULT_PULL_ADDRESS },
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
    pullAddress: values['pull-address'],
  };
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
    const request = pullRequestOf(args, platform);
    let notHandedOver: string | undefined;
    if (args.pullAddress !== '') {
      const outcome = await pullThroughDaemon(args.pullAddress, request, (e) => progress.event(e), abort.signal);
      if (outcome.kind === 'pulled') {
        // The launcher's joiners started about when this process did: how long they waited is its age.
        await handOver(printDone(progress, outcome.summary), Math.round(performance.now()));
        return 0;
      }
      notHandedOver = outcome.reason;
      if (outcome.midway) progress.line(`the daemon's pull stopped midway (${outcome.reason}): pulling in this process`);
    }
    const { collapseKey, joinOrLead } = await import('../containerd/pull-collapse');
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
      const result = printDone(progress, await pullHere(request, notHandedOver, abort.signal, progress));
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

/** The pull as the daemon or this process carries it out: every path absolute, the caller's docker config. */
export function pullRequestOf(args: RpullArgs, platform: Platform, env: NodeJS.ProcessEnv = process.env): PullRequest {
  const dockerConfig = env.DOCKER_CONFIG;
  return {
    ref: args.ref,
    address: path.resolve(args.address),
    namespace: args.namespace,
    snapshotter: args.snapshotter,
    platform,
    prefetchBytes: args.prefetchBytes,
    hostsDir: path.resolve(args.hostsDir),
    plainHttp: args.plainHttp,
    user: args.user,
    dockerConfigDir: path.resolve(dockerConfig !== undefined && dockerConfig !== '' ? dockerConfig : path.join(homedir(), '.docker')),
  };
}

/** Pulls in this process: no daemon took the pull (`notHandedOver` says why, or undefined when none was asked). */
async function pullHere(request: PullRequest, notHandedOver: string | undefined, signal: AbortSignal, progress: ProgressPrinter): Promise<PullSummary> {
  const [{ default: pino }, { runPull }] = await Promise.all([import('pino'), import('../containerd/pull-request')]);
  // Logs go to stderr (stdout is the progress); quiet unless STARGAZE_LOG_LEVEL says otherwise.
  const log = pino({ level: process.env.STARGAZE_LOG_LEVEL ?? 'warn', base: undefined }, pino.destination(2));
  if (notHandedOver !== undefined) log.debug({ reason: notHandedOver }, 'no daemon pulls for us: pulling in this process');
  return runPull(request, log, signal, (e) => progress.event(e));
}

/** Prints the pull's last line; what joined pulls are told. */
function printDone(progress: ProgressPrinter, summary: PullSummary): CollapsedPull {
  progress.done(summary.name, summary.layers, summary.ms);
  return { name: summary.name, manifestDigest: summary.manifestDigest, platform: summary.platform, layers: summary.layers.map((l) => l.digest) };
}
