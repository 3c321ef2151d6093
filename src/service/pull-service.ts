/**
 * The daemon pulls for `stargaze rpull`: a warm process has its modules loaded, so a pull handed to it starts
 * its registry and containerd requests at once instead of after a fresh Node process has loaded the gRPC
 * client, the protobuf definitions and the registry client. The pull itself is the same code rpull runs when
 * no daemon answers (src/containerd/pull-request.ts), with the caller's own paths and credentials.
 *
 * Root only (mode 0600, like the snapshotter's socket): whoever can ask for a pull can make the daemon talk to
 * any containerd socket and registry, which only root may.
 */
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { errorCode, errorMessage } from '../errors';
import { onJsonLines, writeJsonLine } from '../json-lines';
import type { Logger } from '../log';
import type { runPull } from '../containerd/pull-request';
import { callVersion, parsePullCall, PULL_MAX_LINE_BYTES, PULL_PROTOCOL, PULL_PROTOCOL_VERSION, type PullReply } from './pull-protocol';
import { SharedPulls } from './shared-pulls';
import { removeStaleSocket } from './snapshots-service';

const SOCKET_MODE = 0o600;
const SOCKET_DIR_MODE = 0o700;
/** How long a stopping daemon waits for cancelled pulls to wind down (their containerd calls, their lease). */
const CLOSE_WAIT_MS = 10_000;

export interface PullServer {
  address: string;
  /** Stops listening, cancels the pulls in progress and waits for them to end. */
  close(): Promise<void>;
}

export interface PullServerOptions {
  address: string;
  log: Logger;
  /** Carries out one pull; the real one unless a test replaces it. */
  run?: typeof runPull;
}

export async function startPullServer(options: PullServerOptions): Promise<PullServer> {
  const log = options.log;
  const address = path.resolve(options.address);
  await fsp.mkdir(path.dirname(address), { recursive: true, mode: SOCKET_DIR_MODE });
  await removeStaleSocket(address, { probe: true });
  const pulls = new Set<Promise<void>>();
  const aborts = new Set<AbortController>();
  const shared = new SharedPulls(async (request, signal, onEvent) => {
    const run = options.run ?? (await import('../containerd/pull-request')).runPull;
    return run(request, log.child({ image: request.ref }), signal, onEvent);
  });

  let closing: Promise<void> | undefined;
  const sockets = new Set<net.Socket>();
  const serve = (socket: net.Socket): void => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    socket.on('error', (err) => log.debug({ err: errorMessage(err) }, 'pull connection failed'));
    let asked = false;
    const reply = (message: PullReply): void => writeJsonLine(socket, message);
    onJsonLines(socket, PULL_PROTOCOL, PULL_MAX_LINE_BYTES, (message) => {
      if (asked) {
        socket.destroy(); // one pull per connection
        return;
      }
      asked = true;
      if (callVersion(message) !== PULL_PROTOCOL_VERSION) {
        reply({ error: { code: 'ERR_PROTOCOL', message: `${PULL_PROTOCOL}: version ${String(callVersion(message))} is not ${PULL_PROTOCOL_VERSION}`, unsupported: true } });
        return void socket.end();
      }
      let call;
      try {
        call = parsePullCall(message);
      } catch (err) {
        reply({ error: { code: errorCode(err), message: errorMessage(err) } });
        return void socket.end();
      }
      if (closing !== undefined) {
        reply({ error: { code: 'ERR_SNAP_UNAVAILABLE', message: 'the daemon is stopping', unsupported: true } });
        return void socket.end();
      }
      reply({ accepted: true });
      const abort = new AbortController();
      // The client went away (Ctrl-C, killed): nobody waits for the pull, so it stops.
      socket.once('close', () => abort.abort(new Error('the rpull client closed the connection')));
      aborts.add(abort);
      const pullLog = log.child({ image: call.pull.ref });
      const pull = (async () => {
        const done = await shared.pull(call.pull, abort.signal, (event) => reply({ event }), () => pullLog.debug('joined the same pull in progress'));
        reply({ done });
        pullLog.info({ ms: done.ms, layers: done.layers.length }, 'pulled for rpull');
      })()
        .catch((err: unknown) => {
          if (!abort.signal.aborted) pullLog.warn({ err: errorMessage(err) }, 'pull for rpull failed');
          // Cut short because the daemon stops: the client can still pull by itself.
          const stopping = closing !== undefined && abort.signal.aborted;
          reply({ error: { code: errorCode(err), message: stopping ? 'the daemon is stopping' : errorMessage(err), ...(stopping ? { unsupported: true } : {}) } });
        })
        .finally(() => {
          socket.end();
          aborts.delete(abort);
          pulls.delete(pull);
        });
      pulls.add(pull);
    });
  };

  const server = net.createServer(serve);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(address, () => {
      server.off('error', reject);
      resolve();
    });
  });
  await fsp.chmod(address, SOCKET_MODE);
  server.on('error', (err) => log.error({ err: errorMessage(err) }, 'pull socket failed'));
  log.info({ socket: address }, 'serving pulls for stargaze rpull');
  if (options.run === undefined) {
    // In the background, once serving: a pull that comes first loads what it needs itself.
    setImmediate(() => {
      import('../containerd/pull-request')
        .then((m) => m.preloadPull())
        .catch((err: unknown) => log.warn({ err: errorMessage(err) }, 'could not preload the pull'));
    });
  }

  return {
    address,
    close(): Promise<void> {
      closing ??= (async () => {
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        for (const abort of aborts) abort.abort(new Error('the daemon is stopping'));
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([Promise.allSettled([...pulls]), new Promise<void>((resolve) => (timer = setTimeout(resolve, CLOSE_WAIT_MS).unref()))]);
        clearTimeout(timer);
        for (const socket of sockets) socket.destroy();
        await closed;
      })();
      return closing;
    },
  };
}
