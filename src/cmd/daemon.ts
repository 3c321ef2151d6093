/**
 * `stargaze daemon`: load the config, listen on containerd's unix socket, restore remote snapshots, then
 * answer containerd's Snapshots calls. Calls that come before the restored layers are mounted again wait
 * for them (bounded), so containerd never sees a snapshot whose directory is empty, and its first dial
 * after a restart finds the socket.
 */
import { parseArgs } from 'node:util';
import path from 'node:path';
import { mkdir } from 'node:fs/promises';
import { loadConfig, type Config } from '../config/config';
import type { RemoteFileSystem } from '../fs/remote-file-system';
import { errorMessage, UsageError } from '../errors';
import { log, setLogLevel } from '../log';
import type { Snapshotter } from '../snapshot/snapshotter';
import { startSnapshotServer } from '../service/snapshots-service';
import type { PullServer } from '../service/pull-service';
import type { CriImageProxy, CriImageProxyServer } from '../service/cri-image-proxy';
import type { KeychainPaths } from '../remote/keychains';
import { notifySystemdReady } from './sd-notify';
import { DEFAULT_ROOT } from './default-root';
// The rest is imported where it is first used, after the socket listens: loading it all first took most of
// a second here (the layer stack, SQLite, the keychains), past containerd's first redial of the socket.

export const DEFAULT_ADDRESS = '/run/stargaze/stargaze.sock';
export const DEFAULT_CONFIG = '/etc/stargaze/config.toml';
export const DEFAULT_HOSTS_DIR = '/etc/containerd/certs.d';
/** The pull socket's name beside the snapshotter's socket: `stargaze rpull`'s default is the default daemon's. */
const PULL_ADDRESS_FILE = 'pull.sock';
const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'];

const USAGE = `usage: stargaze daemon [options]

  --address SOCK     unix socket to serve containerd on (default ${DEFAULT_ADDRESS})
  --root DIR         state directory: snapshots, metadata, caches (default ${DEFAULT_ROOT})
  --config FILE      TOML config (default ${DEFAULT_CONFIG}; a missing default file means defaults)
  --hosts-dir DIR    containerd hosts.toml directory (default ${DEFAULT_HOSTS_DIR})
  --log-level LEVEL  trace, debug, info, warn, error (default info)
  --pull-address SOCK  unix socket on which the daemon pulls for \`stargaze rpull\` (default: pull.sock
                     beside --address, so ${PULL_ADDRESS_FILE} in ${path.dirname(DEFAULT_ADDRESS)} by default); '' = off
`;

export async function main(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        address: { type: 'string', default: DEFAULT_ADDRESS },
        root: { type: 'string', default: DEFAULT_ROOT },
        config: { type: 'string' },
        'hosts-dir': { type: 'string', default: DEFAULT_HOSTS_DIR },
        'log-level': { type: 'string', default: 'info' },
        'pull-address': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    throw new UsageError(`${errorMessage(err)}\n${USAGE}`);
  }
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const level = values['log-level'];
  if (!LOG_LEVELS.includes(level)) throw new UsageError(`--log-level must be one of ${LOG_LEVELS.join(', ')}, not '${level}'`);
  setLogLevel(level);

  const root = path.resolve(values.root);
  const address = path.resolve(values.address);
  const { config, warnings } = await loadConfig(values.config ?? DEFAULT_CONFIG, { explicit: values.config !== undefined });
  for (const warning of warnings) log.warn({ module: 'config' }, warning);

  const configPath = values.config ?? DEFAULT_CONFIG;
  // [cri_keychain] and [kubeconfig_keychain]: used by the process resolving blobs (after docker's config.json).
  const keychains: KeychainPaths = {
    criKeychainDir: config.criKeychain.enableKeychain ? path.join(root, (await import('../remote/keychains')).CRI_KEYCHAIN_DIR) : undefined,
    kubeconfigPath: config.kubeconfigKeychain.enableKeychain
      ? path.resolve((await import('../remote/kubeconfig-keychain')).kubeconfigPath(config.kubeconfigKeychain.kubeconfigPath))
      : undefined,
  };
  // The CRI image-service proxy: on the daemon's own socket by default (as the reference), else on its own.
  // Its keychain is a small file: read before listening, as the proxy is a service of the socket.
  const criListenPath = config.criKeychain.listenPath === '' ? address : path.resolve(config.criKeychain.listenPath);
  let criProxy: CriImageProxy | undefined;
  let criProxyServer: CriImageProxyServer | undefined;
  const criLog = log.child({ module: 'cri-keychain' });
  const cri = keychains.criKeychainDir === undefined ? undefined : await import('../service/cri-image-proxy');
  const criKeychain = keychains.criKeychainDir === undefined ? undefined : await (await import('../remote/keychains')).openCriKeychain(keychains.criKeychainDir, criLog);
  const proxyOptions = criKeychain && { imageServicePath: config.criKeychain.imageServicePath, keychain: criKeychain, log: criLog };
  if (cri && proxyOptions && criListenPath === address) criProxy = cri.createCriImageProxy(proxyOptions);

  // Listen first, answer once restored: containerd redials a missing socket for about a second after the
  // daemon went away, then backs off for up to 3 s failing every call; starting the FUSE server and mounting
  // restored layers takes longer than that second. Calls that come meanwhile wait for `started`.
  let markStarted!: (snapshotter: Snapshotter) => void;
  let markFailed!: (err: unknown) => void;
  const started = new Promise<Snapshotter>((resolve, reject) => {
    markStarted = resolve;
    markFailed = reject;
  });
  const server = await startSnapshotServer({ snapshotter: started, address, extraServices: criProxy ? [criProxy] : [] });
  log.info({ address, sinceStartMs: Math.round(process.uptime() * 1000) }, 'listening for containerd; calls wait until restored');
  let filesystem: FileSystem | undefined;
  let snapshotter: Snapshotter;
  try {
    filesystem = await openFileSystem(config, {
      root,
      hostsDir: values['hosts-dir'],
      configPath,
      configExplicit: values.config !== undefined,
      logLevel: level,
      keychains,
    });
    const { Snapshotter } = await import('../snapshot/snapshotter');
    snapshotter = await Snapshotter.open({
      root: path.join(root, 'snapshotter'),
      fs: filesystem,
      log: log.child({ module: 'snapshot' }),
      useLocalCopies: config.copyFetchedLayers,
    });
    await snapshotter.restore();
    if (cri && proxyOptions && criListenPath !== address) criProxyServer = await cri.startCriImageProxy({ ...proxyOptions, listenPath: criListenPath });
  } catch (err) {
    // The calls waiting answer with the reason; then the socket goes, so containerd sees no half-started daemon.
    markFailed(err);
    await server.close();
    criProxy?.close();
    await filesystem?.close();
    throw err;
  }
  if (proxyOptions) criLog.info({ listen: criListenPath, imageService: config.criKeychain.imageServicePath }, 'serving the CRI image service proxy');
  markStarted(snapshotter);
  log.info({ address, root, sinceStartMs: Math.round(process.uptime() * 1000) }, 'serving containerd snapshots');
  const pullAddress = values['pull-address'] ?? path.join(path.dirname(address), PULL_ADDRESS_FILE);
  const pullServer = pullAddress === '' ? undefined : await servePulls(pullAddress);
  // READY=1 only now: the snapshots are restored and every call is answered at once.
  await notifySystemdReady(log);

  await new Promise<void>((resolve) => {
    const stop = (signal: NodeJS.Signals): void => {
      log.info({ signal }, 'shutting down');
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  await pullServer?.close();
  await server.close();
  criProxy?.close();
  await criProxyServer?.close();
  await snapshotter.close();
  // With the FUSE server, this only disconnects: running containers keep their files.
  await filesystem.close();
  log.info('stopped');
  return 0;
}

/**
 * Pulls for `stargaze rpull` on their own socket. Optional to the daemon: when it cannot listen (another
 * daemon holds the socket), rpull pulls in its own process, as it does without a daemon.
 */
async function servePulls(address: string): Promise<PullServer | undefined> {
  const pullLog = log.child({ module: 'pull' });
  try {
    const { startPullServer } = await import('../service/pull-service');
    return await startPullServer({ address: path.resolve(address), log: pullLog });
  } catch (err) {
    pullLog.warn({ socket: address, err: errorMessage(err) }, 'not serving pulls for stargaze rpull: it pulls in its own process');
    return undefined;
  }
}

interface FileSystemSetup {
  root: string;
  hostsDir: string;
  configPath: string;
  configExplicit: boolean;
  logLevel: string;
  keychains: KeychainPaths;
}

/**
 * The layer mounts live in a separate FUSE server process by default ([fuse_manager] enable), so a daemon
 * restart leaves running containers' files served; with it off, the daemon serves them itself.
 */
type FileSystem = RemoteFileSystem & { close(): Promise<void> };

async function openFileSystem(config: Config, setup: FileSystemSetup): Promise<FileSystem> {
  if (!config.fuseManager.enable) {
    const { openKeychains } = await import('../remote/keychains');
    const { openLayerService } = await import('./wiring');
    const keychains = await openKeychains(setup.keychains, log);
    const service = await openLayerService({
      config,
      hostsDir: setup.hostsDir,
      cacheDir: path.join(setup.root, 'cache', 'chunks'),
      root: setup.root,
      credentials: keychains.provider,
      log,
    });
    const { filesystem } = service;
    return {
      mount: (mountpoint, labels, parent) => filesystem.mount(mountpoint, labels, parent),
      check: (mountpoint) => filesystem.check(mountpoint),
      unmount: (mountpoint) => filesystem.unmount(mountpoint),
      close: async () => {
        await service.close();
        keychains.close();
      },
    };
  }
  const dir = path.join(setup.root, 'fuse');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const socketPath = path.join(dir, 'fuse-server.sock');
  const logFile = path.join(dir, 'fuse-server.log');
  const { FuseServerClient } = await import('../fs/fuse-server-client');
  const client = new FuseServerClient({
    socketPath,
    // Its stdout and stderr: what it prints before its logger exists, and a crash's stack trace. Kept apart
    // from the rotated log, so a rotation never sends them into a deleted file.
    logFile: path.join(dir, 'fuse-server.stderr'),
    serverArgv: [
      path.resolve(process.argv[1] ?? 'stargaze'),
      'fuse-server',
      '--socket', socketPath,
      '--pid-file', path.join(dir, 'fuse-server.pid'),
      '--hosts-dir', setup.hostsDir,
      '--cache-dir', path.join(setup.root, 'cache', 'chunks'),
      '--root', setup.root,
      '--config', setup.configPath,
      ...(setup.configExplicit ? [] : ['--config-optional']),
      '--log-level', setup.logLevel,
      // The server writes its log lines to this file itself, bounded in size.
      '--log-file', logFile,
      ...(setup.keychains.criKeychainDir ? ['--cri-keychain-dir', setup.keychains.criKeychainDir] : []),
      ...(setup.keychains.kubeconfigPath ? ['--kubeconfig', setup.keychains.kubeconfigPath] : []),
    ],
    log: log.child({ module: 'fs' }),
  });
  await client.connect();
  return client;
}
