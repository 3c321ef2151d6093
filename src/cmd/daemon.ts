/**
 * `stargaze daemon`: load the config, restore remote snapshots, then serve containerd's Snapshots service
 * on a unix socket. The socket is served only once restored layers are mounted again, so containerd never
 * sees a snapshot whose directory is empty.
 */
import { parseArgs } from 'node:util';
import path from 'node:path';
import { mkdir } from 'node:fs/promises';
import { loadConfig, type Config } from '../config/config';
import { FuseServerClient } from '../fs/fuse-server-client';
import type { RemoteFileSystem } from '../fs/remote-file-system';
import { errorMessage, UsageError } from '../errors';
import { log, setLogLevel } from '../log';
import { Snapshotter } from '../snapshot/snapshotter';
import { startSnapshotServer } from '../service/snapshots-service';
import { startPullServer, type PullServer } from '../service/pull-service';
import { createCriImageProxy, startCriImageProxy, type CriImageProxy, type CriImageProxyServer } from '../service/cri-image-proxy';
import { CRI_KEYCHAIN_DIR, openCriKeychain, openKeychains, type KeychainPaths } from '../remote/keychains';
import { kubeconfigPath } from '../remote/kubeconfig-keychain';
import { notifySystemdReady } from './sd-notify';
import { openLayerService } from './wiring';
import { DEFAULT_ROOT } from './default-root';

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
    criKeychainDir: config.criKeychain.enableKeychain ? path.join(root, CRI_KEYCHAIN_DIR) : undefined,
    kubeconfigPath: config.kubeconfigKeychain.enableKeychain ? path.resolve(kubeconfigPath(config.kubeconfigKeychain.kubeconfigPath)) : undefined,
  };
  const filesystem = await openFileSystem(config, {
    root,
    hostsDir: values['hosts-dir'],
    configPath,
    configExplicit: values.config !== undefined,
    logLevel: level,
    keychains,
  });
  const snapshotter = await Snapshotter.open({
    root: path.join(root, 'snapshotter'),
    fs: filesystem,
    log: log.child({ module: 'snapshot' }),
    useLocalCopies: config.copyFetchedLayers,
  });
  await snapshotter.restore();
  // The CRI image-service proxy: on the daemon's own socket by default (as the reference), else on its own.
  const criListenPath = config.criKeychain.listenPath === '' ? address : path.resolve(config.criKeychain.listenPath);
  let criProxy: CriImageProxy | undefined;
  let criProxyServer: CriImageProxyServer | undefined;
  if (keychains.criKeychainDir !== undefined) {
    const criLog = log.child({ module: 'cri-keychain' });
    const keychain = await openCriKeychain(keychains.criKeychainDir, criLog);
    const proxyOptions = { imageServicePath: config.criKeychain.imageServicePath, keychain, log: criLog };
    if (criListenPath === address) criProxy = createCriImageProxy(proxyOptions);
    else criProxyServer = await startCriImageProxy({ ...proxyOptions, listenPath: criListenPath });
    criLog.info({ listen: criListenPath, imageService: config.criKeychain.imageServicePath }, 'serving the CRI image service proxy');
  }
  const server = await startSnapshotServer({ snapshotter, address, extraServices: criProxy ? [criProxy] : [] });
  log.info({ address, root }, 'serving containerd snapshots');
  const pullAddress = values['pull-address'] ?? path.join(path.dirname(address), PULL_ADDRESS_FILE);
  const pullServer = pullAddress === '' ? undefined : await servePulls(pullAddress);
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
async function openFileSystem(config: Config, setup: FileSystemSetup): Promise<RemoteFileSystem & { close(): Promise<void> }> {
  if (!config.fuseManager.enable) {
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
