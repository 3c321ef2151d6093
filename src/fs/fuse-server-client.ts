/**
 * The daemon's side of the FUSE server (fuse-server.ts): a RemoteFileSystem whose mounts live in that
 * separate, long-lived process. Connecting starts the server when none answers; a restarted daemon
 * reconnects to the one already running, whose mounts kept serving running containers meanwhile.
 */
import { spawn } from 'node:child_process';
import { open } from 'node:fs/promises';
import net from 'node:net';
import { errorMessage, StargazeError, UnavailableError, type ErrorCode } from '../errors';
import { lazyUnmount } from '../lazy-unmount';
import type { Logger } from '../log';
import { mountsUnder } from './mount-table';
import type { RemoteFileSystem } from './remote-file-system';
import { onJsonLines, parseServerMessage, writeJsonLine, type FuseServerLogEvent, type FuseServerRequest, type FuseServerResponse } from './fuse-server-protocol';

/** How long a started server may take to listen. */
const SERVER_START_TIMEOUT_MS = 15_000;
const CONNECT_RETRY_MS = 100;
/** Bound on one request; mount has its own (shorter) bound inside the server. */
const REQUEST_TIMEOUT_MS = 120_000;
/**
 * Node flags of the server: it collects the garbage a burst of mounts leaves once the burst is over (an idle
 * server would keep it for good: idle-collector.ts).
 */
const SERVER_NODE_FLAGS = ['--expose-gc'];

export interface FuseServerClientOptions {
  socketPath: string;
  /** Where the started server's stdout/stderr go (its own log). */
  logFile: string;
  /** argv (after node and its flags) that starts `stargaze fuse-server ...`. */
  serverArgv: string[];
  log: Logger;
}

type Pending = { resolve: (r: FuseServerResponse) => void; reject: (e: Error) => void; timer: NodeJS.Timeout };
type RequestBody = FuseServerRequest extends infer R ? (R extends { id: number } ? Omit<R, 'id'> : never) : never;

export class FuseServerClient implements RemoteFileSystem {
  private socket: net.Socket | undefined;
  private connecting: Promise<net.Socket> | undefined;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private closed = false;

  constructor(private readonly options: FuseServerClientOptions) {}

  /** Connects, starting the server when none is running. */
  async connect(): Promise<void> {
    await this.connection();
  }

  /** The server logs the mount (its log lines reach the daemon's log through this connection). */
  async mount(mountpoint: string, labels: Record<string, string>, parent?: string): Promise<void> {
    await this.request({ op: 'mount', mountpoint, labels, ...(parent ? { parent } : {}) });
  }

  async check(mountpoint: string, labels: Record<string, string>): Promise<void> {
    await this.request({ op: 'check', mountpoint, labels });
  }

  /**
   * The server's FUSE mount ends with its session, and a child of the server exiting just then (an umount(8)
   * it spawned) can deadlock it: libfuse cancels the session's worker threads, which do not block SIGCHLD, and
   * one cancelled inside libuv's SIGCHLD handler keeps libuv's signal lock for good. So the daemon, which has
   * no FUSE threads, detaches the mount itself, between the server stopping the layer's local copy (whose tar
   * reads the mount: the session would end as tar exits) and the server letting the session go.
   */
  async unmount(mountpoint: string): Promise<void> {
    try {
      await this.request({ op: 'prepare-unmount', mountpoint });
    } catch (err) {
      // A server of an older version, still serving after a daemon upgrade, unmounts by itself.
      if (err instanceof StargazeError && err.code === 'ERR_PROTOCOL') return void (await this.request({ op: 'unmount', mountpoint }));
      throw err;
    }
    // Also a stale mount of a server that died: it goes the same way.
    if ((await mountsUnder(mountpoint)).includes(mountpoint)) {
      // Failing here, the server unmounts it by itself.
      await lazyUnmount(mountpoint).catch((err: unknown) => this.options.log.warn({ mountpoint, err: errorMessage(err) }, 'lazy umount failed; the fuse server unmounts'));
    }
    await this.request({ op: 'unmount', mountpoint });
  }

  /** Disconnects; the server and its mounts stay up for running containers. */
  close(): Promise<void> {
    this.closed = true;
    this.socket?.end();
    this.socket = undefined;
    return Promise.resolve();
  }

  private async request(body: RequestBody): Promise<FuseServerResponse> {
    const socket = await this.connection();
    const id = this.nextId++;
    const response = await new Promise<FuseServerResponse>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new UnavailableError(`fuse server did not answer ${body.op} within ${REQUEST_TIMEOUT_MS} ms`));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(id, { resolve, reject, timer });
      writeJsonLine(socket, { id, ...body });
    });
    if (!response.ok) throw new StargazeError((response.code as ErrorCode | undefined) ?? 'ERR_INTERNAL', response.message);
    return response;
  }

  private connection(): Promise<net.Socket> {
    if (this.closed) return Promise.reject(new UnavailableError('fuse server client is closed'));
    if (this.socket && !this.socket.destroyed) return Promise.resolve(this.socket);
    this.connecting ??= this.establish().finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private async establish(): Promise<net.Socket> {
    let socket = await tryConnect(this.options.socketPath);
    if (!socket) {
      await this.startServer();
      const deadline = Date.now() + SERVER_START_TIMEOUT_MS;
      while (!socket && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, CONNECT_RETRY_MS));
        socket = await tryConnect(this.options.socketPath);
      }
      if (!socket) throw new UnavailableError(`fuse server did not start; see ${this.options.logFile}`);
    }
    this.attach(socket);
    return socket;
  }

  private attach(socket: net.Socket): void {
    this.socket = socket;
    onJsonLines(socket, (message) => {
      let m: FuseServerResponse | FuseServerLogEvent;
      try {
        m = parseServerMessage(message);
      } catch (err) {
        // Not our server (or not this version): its answers cannot be trusted; 'close' fails what is pending.
        return void socket.destroy(err as Error);
      }
      if ('log' in m) {
        // The server's own log line, shown in the daemon's log too (one JSON object per line).
        process.stdout.write(m.log + '\n');
        return;
      }
      const waiter = this.pending.get(m.id);
      if (!waiter) return;
      this.pending.delete(m.id);
      clearTimeout(waiter.timer);
      waiter.resolve(m);
    });
    socket.on('error', (err) => this.options.log.warn({ err: err.message }, 'fuse server connection error'));
    socket.on('close', () => {
      if (this.socket === socket) this.socket = undefined;
      for (const [id, waiter] of this.pending) {
        clearTimeout(waiter.timer);
        waiter.reject(new UnavailableError('fuse server connection closed'));
        this.pending.delete(id);
      }
    });
  }

  /** Starts the server in its own session, so signals to the daemon's process group never reach it. */
  private async startServer(): Promise<void> {
    const logFile = await open(this.options.logFile, 'a', 0o600);
    try {
      const child = spawn(process.execPath, [...SERVER_NODE_FLAGS, ...this.options.serverArgv], {
        detached: true,
        stdio: ['ignore', logFile.fd, logFile.fd],
      });
      child.unref();
      this.options.log.info({ pid: child.pid, socket: this.options.socketPath }, 'started fuse server');
    } finally {
      await logFile.close();
    }
  }
}

function tryConnect(socketPath: string): Promise<net.Socket | undefined> {
  return new Promise((resolve) => {
    const socket = net.connect(socketPath);
    socket.once('connect', () => {
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', () => resolve(undefined));
  });
}
