/**
 * The reference snapshotter (containerd/stargz-snapshotter's `containerd-stargz-grpc`) as the benchmarks' peer:
 * its own root, socket, config and log in a tmp dir, started as its own process group, stopped with SIGTERM (as
 * a service manager stops it), and whatever it left mounted under its root unmounted afterwards: upstream's
 * daemon unmounts its layers only on SIGINT, so that a restart by SIGTERM keeps them.
 *
 * The binary is not part of this project: its path comes from STARGAZE_PEER_BIN. Without it, `peerBinary()`
 * is undefined and the benchmarks skip their peer arms with `PEER_MISSING_NOTE`. The test suite never uses it.
 */
import { accessSync, constants } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { bestEffort, type CleanupScope } from './cleanup';
import { readTail, socketAccepts, spawnGroup, waitFor, type ProcessGroup } from './exec';
import type { ProxyPlugin } from './containerd';
import { createTmpRoot, mountsUnder, unmountUnder, type MountInfo } from './tmp';

/** Environment variable naming the peer daemon's binary. */
export const PEER_BIN_ENV = 'STARGAZE_PEER_BIN';
/** The proxy plugin name the peer gets in a benchmark's containerd (stargaze keeps `stargz`). */
export const PEER_SNAPSHOTTER = 'stargz-peer';
/** One line for a benchmark that skips its peer arm. */
export const PEER_MISSING_NOTE =
  `peer arm skipped: set ${PEER_BIN_ENV} to a containerd-stargz-grpc binary ` +
  '(on our machines: ../shared/peer/stargz-reference/build.sh OUT builds the reference 0.12 from Debian\'s Go sources)';
const READY_TIMEOUT_MS = 30_000;
const STOP_GRACE_MS = 15_000;

/** The peer binary from STARGAZE_PEER_BIN; undefined when it is unset. Throws when it names no executable file. */
export function peerBinary(): string | undefined {
  const bin = process.env[PEER_BIN_ENV];
  if (bin === undefined || bin === '') return undefined;
  try {
    accessSync(bin, constants.X_OK);
  } catch {
    throw new Error(`${PEER_BIN_ENV}=${bin} is not an executable file`);
  }
  return bin;
}

export interface PeerOptions {
  scope?: CleanupScope;
  /** Path of the binary; defaults to peerBinary(). */
  binary?: string;
  /** config.toml contents (default: empty, the reference's defaults). */
  config?: string;
  /** Defaults to info. */
  logLevel?: string;
}

export interface PeerDaemon {
  readonly dir: string;
  /** Its snapshots gRPC socket (containerd's proxy plugin address). */
  readonly address: string;
  readonly root: string;
  readonly configPath: string;
  /** stdout and stderr (logrus JSON lines). */
  readonly logFile: string;
  /** PID of the daemon: the only process it runs (its FUSE servers are goroutines). */
  pid(): number;
  isRunning(): boolean;
  mounts(): Promise<MountInfo[]>;
  /**
   * SIGTERM, SIGKILL after a grace period; with `hard`, SIGKILL at once (a crash: its FUSE mounts stay behind,
   * served by no one). 0.12 unmounts its remote snapshots on SIGTERM and removes their directories, and then fails
   * to start on that root ("failed to restore remote snapshot ... bad mount point"): a restart of it with remote
   * snapshots needs `hard`.
   */
  stop(opts?: { hard?: boolean }): Promise<void>;
  /**
   * Stops it (`hard`: SIGKILL) and starts it again with the same root, socket and config; returns once its socket
   * accepts connections (it restores its snapshots, mounting every remote one again, before it listens).
   */
  restart(opts?: { hard?: boolean; readyTimeoutMs?: number }): Promise<void>;
  /** SIGTERM, SIGKILL after a grace period; unmounts what it left under its root and removes the tmp dir. */
  cleanup(): Promise<void>;
}


/** The peer's entry in a containerd's `proxyPlugins`, under PEER_SNAPSHOTTER. */
export function peerProxyPlugin(peer: PeerDaemon): ProxyPlugin {
  return { name: PEER_SNAPSHOTTER, address: peer.address, root: peer.root };
}

/** Starts the peer daemon and waits until its socket accepts connections. */
export async function startPeer(opts: PeerOptions = {}): Promise<PeerDaemon> {
  const binary = opts.binary ?? peerBinary();
  if (binary === undefined) throw new Error(PEER_MISSING_NOTE);
  const tmp = await createTmpRoot('peer');
  const dir = tmp.dir;
  const address = path.join(dir, 'peer.sock');
  const root = path.join(dir, 'root');
  const configPath = path.join(dir, 'config.toml');
  const logFile = path.join(dir, 'peer.log');
  let proc: ProcessGroup | undefined;
  let cleaned: Promise<void> | undefined;
  const cleanup = (): Promise<void> =>
    (cleaned ??= (async () => {
      if (proc) await bestEffort('stop the peer daemon', () => proc!.stop(STOP_GRACE_MS));
      const left = await unmountUnder(dir);
      if (left.length > 0) process.stderr.write(`harness: mounts left under ${dir}: ${left.map((m) => m.mountpoint).join(', ')}\n`);
      await tmp.remove();
    })());
  opts.scope?.after(cleanup);
  const startOnce = async (readyTimeoutMs = READY_TIMEOUT_MS): Promise<void> => {
    const p = spawnGroup(binary, ['-address', address, '-root', root, '-config', configPath, '-log-level', opts.logLevel ?? 'info'], {
      stdoutFile: logFile, // stderr too
    });
    proc = p;
    await waitFor(`peer socket ${address}`, () => socketAccepts(address), {
      timeoutMs: readyTimeoutMs,
      abortIf: () => (p.isRunning() ? undefined : 'the peer daemon exited'),
    });
  };
  const stop = async (o?: { hard?: boolean }): Promise<void> => {
    if (proc && o?.hard) await proc.kill();
    else if (proc) await proc.stop(STOP_GRACE_MS);
  };
  try {
    await mkdir(root, { recursive: true });
    await writeFile(configPath, opts.config ?? '');
    await startOnce();
  } catch (err) {
    const log = await readTail(logFile).catch(() => '');
    if (!opts.scope) await cleanup();
    throw new Error(`${err instanceof Error ? err.message : String(err)}\n--- peer log ---\n${log}`, { cause: err });
  }
  return {
    dir,
    address,
    root,
    configPath,
    logFile,
    pid: () => proc!.pid,
    isRunning: () => proc?.isRunning() ?? false,
    mounts: () => mountsUnder(root),
    stop,
    restart: async (o) => {
      await stop(o);
      await startOnce(o?.readyTimeoutMs);
    },
    cleanup,
  };
}
