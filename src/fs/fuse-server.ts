/**
 * The FUSE server: a long-lived process that owns every lazily mounted layer, apart from the daemon.
 *
 * A FUSE mount lives only as long as the process that serves it. When the snapshotter daemon itself
 * served the mounts, restarting it (an upgrade, `systemctl restart`, a crash) cut every running
 * container off from its files: the reference's users' top complaint. So the daemon starts this server
 * in its own session (it survives a SIGKILL of the daemon's process group) and asks it for mounts over
 * a unix socket; a restarted daemon reconnects and finds the mounts still served.
 *
 * The server exits by itself when no daemon has been connected and it serves no mount for
 * IDLE_EXIT_MS, so it never lingers after the snapshotter is gone. When its socket path no longer names
 * its socket (the root was wiped; a new daemon has started a new server there), no daemon can reach it
 * again: it exits as soon as it serves no mount, and removes only files that are still its own.
 *
 * This is its socket side; the process, which builds the file system it serves, is cmd/fuse-server.ts.
 */
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import type { BigIntStats } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { Writable } from 'node:stream';
import { errorCode, errorMessage, FailedPreconditionError, ProtocolError, StargazeError } from '../errors';
import type { Logger } from '../log';
import { onJsonLines, parseRequest, requestId, writeJsonLine, type FuseServerRequest, type FuseServerResponse } from './fuse-server-protocol';
import { IdleCollector } from './idle-collector';
import type { StargazeFileSystem } from './stargz-fs';

/** How long the server stays up with no daemon connected and nothing mounted. */
const IDLE_EXIT_MS = 30_000;
/** How often it looks for mounts removed behind its back (lazy umount by an admin or a test). */
const SWEEP_INTERVAL_MS = 10_000;
/** Garbage is collected once no mount or unmount has come for this long (idle-collector.ts). */
const COLLECT_QUIET_MS = 1_000;

export interface FuseServerOptions {
  socketPath: string;
  pidFile: string;
  log: Logger;
  /** Receives every log line, so it can be forwarded to connected daemons. */
  logTap: LogTap;
  /** Told of every mount and unmount, to collect the garbage they leave once they stop coming. */
  collector?: IdleCollector;
}

/** A Writable for pino that copies each log line to the connected daemons. */
export class LogTap extends Writable {
  readonly sockets = new Set<net.Socket>();
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    if (this.sockets.size > 0) {
      const line = chunk.toString('utf8').trimEnd();
      for (const socket of this.sockets) writeJsonLine(socket, { log: line });
    }
    cb();
  }
}

/**
 * Serves `filesystem` to daemons on the socket until a signal, or until it has been idle for IDLE_EXIT_MS;
 * then stops listening and calls `close` (which unmounts every layer: cmd/fuse-server.ts built them).
 */
export async function serveFuseServer(filesystem: ServedFileSystem, options: FuseServerOptions, close: () => Promise<void>): Promise<void> {
  const { socketPath, log } = options;
  await mkdir(path.dirname(socketPath), { recursive: true, mode: 0o700 });
  await removeStaleSocket(socketPath);
  const collector = options.collector ?? new IdleCollector(COLLECT_QUIET_MS);
  const server = net.createServer((socket) => serveConnection(socket, filesystem, { ...options, collector }));
  // libuv unlinks a listening socket's path by name when the server closes: by then a new server may hold
  // socketPath (a wiped root). So listen on a name of our own and rename the socket into place. The name is
  // short: a unix socket's path has at most 107 bytes, and socketPath's own must still fit beside it.
  const listenPath = path.join(path.dirname(socketPath), `.${process.pid}`);
  await rm(listenPath, { force: true });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(listenPath, () => resolve());
  });
  await rename(listenPath, socketPath);
  const ownSocket = await stat(socketPath, { bigint: true });
  await writeFile(options.pidFile, `${process.pid}\n`, { mode: 0o600 });
  log.info({ socket: socketPath, pid: process.pid }, 'fuse server listening');

  let idleSince = Date.now();
  let unreachable = false;
  await new Promise<void>((resolve) => {
    const sweep = setInterval(() => {
      void (async () => {
        await dropVanishedMounts(filesystem, log);
        if (!unreachable && !(await isSameFile(socketPath, ownSocket))) {
          unreachable = true;
          log.warn({ socket: socketPath }, 'socket path gone or taken (root wiped?): no daemon can reach this server; exiting once it serves no mount');
        }
        const mounts = filesystem.list().length;
        if (unreachable && mounts === 0) {
          log.info('unreachable and no mounts: exiting');
          return done();
        }
        const busy = options.logTap.sockets.size > 0 || mounts > 0;
        if (busy) idleSince = Date.now();
        else if (Date.now() - idleSince > IDLE_EXIT_MS) {
          log.info('no daemon and no mounts: exiting');
          done();
        }
      })();
    }, SWEEP_INTERVAL_MS);
    const done = (): void => {
      clearInterval(sweep);
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      resolve();
    };
    // A signal sent to this process on purpose means: stop serving, unmount everything.
    const onSignal = (signal: NodeJS.Signals): void => {
      log.info({ signal }, 'fuse server shutting down');
      done();
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
  server.close();
  collector.close();
  for (const socket of options.logTap.sockets) socket.destroy();
  await close();
  // A new server may have these paths by now (a wiped root): only what is still ours goes.
  if ((await readFile(options.pidFile, 'utf8').catch(() => '')).trim() === String(process.pid)) await rm(options.pidFile, { force: true });
  if (await isSameFile(socketPath, ownSocket)) await rm(socketPath, { force: true });
}

/**
 * Whether `file` is still the file `was` describes. The inode alone does not tell: a filesystem reuses a
 * freed inode number at once, so a new server's socket in a wiped root can get the old one's; its change
 * and birth times (nanoseconds) are its own.
 */
async function isSameFile(file: string, was: BigIntStats): Promise<boolean> {
  const st = await stat(file, { bigint: true }).catch(() => undefined);
  return st !== undefined && st.dev === was.dev && st.ino === was.ino && st.ctimeNs === was.ctimeNs && st.birthtimeNs === was.birthtimeNs;
}

/** What a connection needs of the filesystem it serves (a fake in tests). */
export type ServedFileSystem = Pick<StargazeFileSystem, 'mount' | 'check' | 'prepareUnmount' | 'unmount' | 'list' | 'dropVanished'>;

/** Answers one daemon's requests on `socket` and forwards the log to it (exported for tests). */
export function serveConnection(socket: net.Socket, filesystem: ServedFileSystem, options: Pick<FuseServerOptions, 'log' | 'logTap' | 'collector'>): void {
  const { log, logTap, collector } = options;
  logTap.sockets.add(socket);
  socket.on('close', () => logTap.sockets.delete(socket));
  socket.on('error', (err) => log.debug({ err: errorMessage(err) }, 'daemon connection error'));
  onJsonLines(socket, (message) => {
    const id = requestId(message);
    // Nothing to answer to: a peer that sends such lines is not a daemon of ours (or not this version).
    if (id === undefined) return void socket.destroy(new ProtocolError('fuse server protocol: a request without an integer id'));
    // parseRequest inside the promise: a malformed request is answered as an error, like a failed one.
    Promise.resolve(message)
      .then((m) => handle(filesystem, parseRequest(m), collector))
      .then(
        (mounts) => writeJsonLine(socket, { id, ok: true, mounts } satisfies FuseServerResponse),
        (err: unknown) =>
          writeJsonLine(socket, {
            id,
            ok: false,
            code: err instanceof StargazeError ? err.code : errorCode(err),
            message: errorMessage(err),
          } satisfies FuseServerResponse),
      );
  });
}

/** Runs one request; `list` answers with the mounts, the others with nothing. */
async function handle(filesystem: ServedFileSystem, request: FuseServerRequest, collector: IdleCollector | undefined): Promise<{ mountpoint: string; digest: string }[] | undefined> {
  switch (request.op) {
    case 'mount':
      // Failed or not, a mount leaves its TOC's garbage.
      await filesystem.mount(request.mountpoint, request.labels, request.parent).finally(() => collector?.poke());
      return undefined;
    case 'check':
      await filesystem.check(request.mountpoint);
      return undefined;
    case 'prepare-unmount':
      await filesystem.prepareUnmount(request.mountpoint);
      return undefined;
    case 'unmount':
      await filesystem.unmount(request.mountpoint).finally(() => collector?.poke());
      return undefined;
    case 'list':
      return filesystem.list();
  }
}

/** Forgets layers whose mount was removed from outside (umount -l): their FUSE session is over. */
async function dropVanishedMounts(filesystem: ServedFileSystem, log: Logger): Promise<void> {
  const gone = await filesystem.dropVanished().catch((err: unknown) => {
    log.warn({ err: errorMessage(err) }, 'could not read the mount table');
    return [];
  });
  for (const mountpoint of gone) log.info({ mountpoint }, 'mount removed from outside; forgetting it');
}

async function removeStaleSocket(socketPath: string): Promise<void> {
  const st = await stat(socketPath).catch(() => undefined);
  if (!st) return;
  if (!st.isSocket()) throw new FailedPreconditionError(`${socketPath} exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect(socketPath);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new FailedPreconditionError(`another fuse server is serving ${socketPath}`);
  await rm(socketPath, { force: true });
}
