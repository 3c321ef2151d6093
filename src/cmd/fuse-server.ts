/**
 * `stargaze fuse-server`: the process that owns the FUSE mounts, and its composition root: it builds the
 * layer file system (wiring.ts) and serves it on the socket (src/fs/fuse-server.ts). The daemon starts it in
 * its own session and talks to it over a unix socket; it is not meant to be run by hand.
 */
import { stat } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import { loadConfig } from '../config/config';
import { errorMessage, UsageError } from '../errors';
import { BoundedLogFile, createMultiLogger } from '../log';
import { LogTap, serveFuseServer } from '../fs/fuse-server';
import { openKeychains } from '../remote/keychains';
import { warmDefaultTrust } from '../remote/trust';
import { openLayerService } from './wiring';

const USAGE = `usage: stargaze fuse-server --socket SOCK --pid-file FILE --hosts-dir DIR --cache-dir DIR [--root DIR] [--config FILE [--config-optional]] [--log-level LEVEL] [--log-file FILE]
       [--cri-keychain-dir DIR] [--kubeconfig FILE]

Started by 'stargaze daemon' (unless [fuse_manager] enable = false): serves the lazily mounted layers
from a process that outlives daemon restarts.
`;

/** The log file and its one older generation stay within this, so the root's disk budget is not eaten by logs. */
const LOG_FILE_MAX_BYTES = 8 * 1024 * 1024;

async function fileSize(file: string): Promise<number> {
  try {
    return (await stat(file)).size;
  } catch {
    return 0;
  }
}

export async function main(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        socket: { type: 'string' },
        'pid-file': { type: 'string' },
        'hosts-dir': { type: 'string' },
        'cache-dir': { type: 'string' },
        root: { type: 'string' },
        config: { type: 'string' },
        'config-optional': { type: 'boolean', default: false },
        'log-level': { type: 'string', default: 'info' },
        'log-file': { type: 'string' },
        'cri-keychain-dir': { type: 'string' },
        kubeconfig: { type: 'string' },
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
  const { socket, 'pid-file': pidFile, 'hosts-dir': hostsDir, 'cache-dir': cacheDir } = values;
  if (!socket || !pidFile || !hostsDir || !cacheDir) {
    throw new UsageError(`--socket, --pid-file, --hosts-dir and --cache-dir are required\n${USAGE}`);
  }
  const logTap = new LogTap();
  const logFile = values['log-file'];
  const logSink = logFile ? new BoundedLogFile(logFile, LOG_FILE_MAX_BYTES, await fileSize(logFile)) : process.stdout;
  const log = createMultiLogger([logSink, logTap], values['log-level']).child({ process: 'fuse-server' });
  const { config } = values.config
    ? await loadConfig(values.config, { explicit: !values['config-optional'] })
    : await loadConfig('/dev/null', { explicit: false });
  // Re-read on each lookup when the daemon's image-service proxy rewrote it.
  const keychains = await openKeychains({ criKeychainDir: values['cri-keychain-dir'], kubeconfigPath: values.kubeconfig }, log);
  // Its first registry connection is a mount or a read: the CA certificates the launcher deferred are parsed now.
  warmDefaultTrust();
  try {
    const service = await openLayerService({ config, hostsDir, cacheDir, root: values.root, credentials: keychains.provider, log });
    await serveFuseServer(service.filesystem, { socketPath: socket, pidFile, log, logTap }, () => service.close());
  } finally {
    keychains.close();
  }
  return 0;
}
