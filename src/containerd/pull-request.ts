/**
 * One `rpull` as data, and the code that carries it out: the same whether `stargaze rpull` pulls in its own
 * process or hands the pull to the daemon (src/service/pull-service.ts), so the two cannot drift apart.
 * The heavy modules (the gRPC client, the registry client, the pull) load on first use only: a process that
 * hands its pull to the daemon never needs them.
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type { Logger } from '../log';
import type { ContainerdClient } from './client';
import type { LayerOutcome, PullEvent } from './pull';
import type { Platform } from './platforms';
import { pathExists } from '../path-exists';
import { registryHostFor } from '../remote/reference';

/** Everything that decides what a pull does. Paths are absolute: the daemon's working directory is not the caller's. */
export interface PullRequest {
  ref: string;
  /** containerd's socket. */
  address: string;
  namespace: string;
  snapshotter: string;
  platform: Platform;
  /** Value of the stargz.prefetch label. */
  prefetchBytes: number;
  /** containerd hosts.toml directory for what the pull itself downloads. */
  hostsDir: string;
  /** Without a hosts.toml for the registry: talk to it over http (ctr's --plain-http). */
  plainHttp: boolean;
  user: { username: string; password: string } | undefined;
  /** docker's config directory of the caller (`$DOCKER_CONFIG`, else `~/.docker`). */
  dockerConfigDir: string;
}

/** What a finished pull prints and what a joined pull needs. */
export interface PullSummary {
  name: string;
  manifestDigest: string;
  platform: string | undefined;
  layers: { digest: string; outcome: LayerOutcome; bytes: number }[];
  ms: number;
}

/**
 * What the manifest request gets to go out before the gRPC client loads (CPU work that blocks the event loop
 * for about 100 ms in a fresh process): reading hosts.toml and credentials and connecting take a few ms.
 */
const IO_HEAD_START_MS = 5;

/**
 * The hosts dir to use. With plainHttp and no hosts.toml for the registry (nor a _default one), a
 * throw-away hosts dir says `server = "http://<host>"`, which is what ctr's --plain-http means.
 */
export async function hostsDirFor(domain: string, hostsDir: string, plainHttp: boolean): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const none = { dir: hostsDir, cleanup: () => Promise.resolve() };
  if (!plainHttp) return none;
  const { DEFAULT_HOST_DIR, HOSTS_FILE } = await import('../remote/hosts');
  if ((await pathExists(path.join(hostsDir, domain, HOSTS_FILE))) || (await pathExists(path.join(hostsDir, DEFAULT_HOST_DIR, HOSTS_FILE)))) return none;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-rpull-hosts-'));
  const cleanup = (): Promise<void> => rm(dir, { recursive: true, force: true });
  try {
    await mkdir(path.join(dir, domain), { recursive: true });
    await writeFile(path.join(dir, domain, HOSTS_FILE), `server = ${JSON.stringify(`http://${registryHostFor(domain)}`)}\n`);
  } catch (err) {
    await cleanup(); // the daemon runs for months: a failed pull must not leave its directory behind
    throw err;
  }
  return { dir, cleanup };
}

/**
 * Loads what runPull loads on first use: the daemon calls it once it is serving, so the first `stargaze rpull`
 * it carries out does not wait for module loading and protobuf parsing (most of a pull's own CPU time).
 */
export async function preloadPull(): Promise<void> {
  const [{ preloadProtos }] = await Promise.all([import('./client'), import('./pull'), import('./resolve'), import('../remote/registry-client'), import('../remote/reference'), import('../remote/hosts')]);
  preloadProtos();
}

/** Pulls `req` into containerd; `onEvent` sees each step as it happens. */
export async function runPull(req: PullRequest, log: Logger, signal: AbortSignal, onEvent: (e: PullEvent) => void): Promise<PullSummary> {
  const [{ RegistryClient }, { resolveManifest }, { parseReference }] = await Promise.all([
    import('../remote/registry-client'),
    import('./resolve'),
    import('../remote/reference'),
  ]);
  const hosts = await hostsDirFor(parseReference(req.ref).domain, req.hostsDir, req.plainHttp);
  let registry: InstanceType<typeof RegistryClient> | undefined;
  let client: ContainerdClient | undefined;
  try {
    const user = req.user;
    registry = new RegistryClient({
      hostsDir: hosts.dir,
      credentials: user !== undefined ? () => user : undefined,
      dockerConfigDir: req.dockerConfigDir,
      log: log.child({ module: 'remote' }),
    });
    // The registry round trips for the manifest go on while the gRPC client loads and connects. containerd's
    // errors still come first: the pull awaits this after them.
    const resolved = resolveManifest(registry, req.ref, req.platform, signal);
    resolved.catch(() => undefined);
    // Loading them blocks the event loop: the manifest request must be on the wire first, or it only leaves
    // once the load is done and the round trips no longer overlap it.
    await Promise.race([resolved.then(() => undefined, () => undefined), delay(IO_HEAD_START_MS)]);
    const [{ ContainerdClient }, { pullImage }] = await Promise.all([import('./client'), import('./pull')]);
    client = await ContainerdClient.connect({ address: req.address, namespace: req.namespace });
    const result = await pullImage({
      client,
      registry,
      ref: req.ref,
      snapshotter: req.snapshotter,
      platform: req.platform,
      prefetchBytes: req.prefetchBytes,
      log: log.child({ module: 'rpull' }),
      signal,
      resolved,
      onEvent,
    });
    return {
      name: result.name,
      manifestDigest: result.manifest.digest,
      platform: result.platform,
      layers: result.layers.map((l) => ({ digest: l.digest, outcome: l.outcome, bytes: l.bytes })),
      ms: result.ms,
    };
  } finally {
    client?.close();
    await registry?.close();
    await hosts.cleanup();
  }
}
