/**
 * `stargaze rpull`'s side of the pull protocol (src/service/pull-protocol.ts): hands the pull to the daemon
 * listening on the pull socket and prints its progress as it arrives. When nobody answers there (no daemon,
 * an older one, one that went away mid-pull), the caller pulls in its own process instead.
 */
import net from 'node:net';
import { StargazeError } from '../errors';
import { onJsonLines, writeJsonLine } from '../json-lines';
import type { PullEvent } from '../containerd/pull';
import type { PullRequest, PullSummary } from '../containerd/pull-request';
import { parsePullReply, PULL_MAX_LINE_BYTES, PULL_PROTOCOL, PULL_PROTOCOL_VERSION, type PullCall } from '../service/pull-protocol';

/** The daemon's default pull socket: beside its default snapshotter socket. */
export const DEFAULT_PULL_ADDRESS = '/run/stargaze/pull.sock';

/** Connect errors that mean "no daemon pulls here", not "the pull failed". */
const NOBODY_THERE = new Set(['ENOENT', 'ECONNREFUSED', 'ENOTSOCK', 'EACCES', 'EPERM']);

export type DaemonPullOutcome = { kind: 'pulled'; summary: PullSummary } | { kind: 'unavailable'; reason: string };

/** A pull the daemon carried out and that failed there: the same message a pull in this process would give. */
export class DaemonPullError extends StargazeError {
  constructor(
    message: string,
    /** The code the daemon reported (an ErrorCode of its process, or a system error's). */
    readonly remoteCode: string | undefined,
  ) {
    super('ERR_PULL', message);
  }
}

export function pullThroughDaemon(address: string, request: PullRequest, onEvent: (e: PullEvent) => void, signal: AbortSignal): Promise<DaemonPullOutcome> {
  return new Promise<DaemonPullOutcome>((resolve, reject) => {
    signal.throwIfAborted();
    const socket = net.connect(address);
    let connected = false;
    let settled = false;
    const settle = (fn: () => void): void => {
      if (settled) return;
      settled = true;
      signal.removeEventListener('abort', onAbort);
      fn();
      socket.destroy();
    };
    const onAbort = (): void => settle(() => reject(signal.reason));
    signal.addEventListener('abort', onAbort, { once: true });
    socket.once('connect', () => {
      connected = true;
      const call: PullCall = { v: PULL_PROTOCOL_VERSION, pull: request };
      writeJsonLine(socket, call);
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      if (!connected && err.code !== undefined && NOBODY_THERE.has(err.code)) settle(() => resolve({ kind: 'unavailable', reason: `${address}: ${err.code}` }));
      else settle(() => resolve({ kind: 'unavailable', reason: `${address}: ${err.message}` }));
    });
    socket.once('close', () => settle(() => resolve({ kind: 'unavailable', reason: `${address}: the daemon closed the connection before the pull ended` })));
    onJsonLines(socket, PULL_PROTOCOL, PULL_MAX_LINE_BYTES, (message) => {
      let reply;
      try {
        reply = parsePullReply(message);
      } catch (err) {
        return settle(() => reject(err));
      }
      if ('event' in reply) return onEvent(reply.event);
      if ('done' in reply) return settle(() => resolve({ kind: 'pulled', summary: reply.done }));
      const { error } = reply;
      if (error.unsupported === true) return settle(() => resolve({ kind: 'unavailable', reason: `${address}: ${error.message}` }));
      settle(() => reject(new DaemonPullError(error.message, error.code)));
    });
  });
}
