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

/**
 * How long the daemon has to say it took the pull: a daemon that accepts connections but never answers (stopped,
 * its event loop stuck) must not leave rpull waiting, as a pull in this process would not.
 */
export const ACCEPT_TIMEOUT_MS = 5_000;

/** Connect errors that mean "no daemon pulls here", not "the pull failed". */
const NOBODY_THERE = new Set(['ENOENT', 'ECONNREFUSED', 'ENOTSOCK', 'EACCES', 'EPERM']);

/**
 * `unavailable`: the daemon did not carry the pull out; `midway` when it went away after it had started, so the
 * caller says so before pulling itself (lines already printed are printed again).
 */
export type DaemonPullOutcome = { kind: 'pulled'; summary: PullSummary } | { kind: 'unavailable'; reason: string; midway: boolean };

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

export function pullThroughDaemon(
  address: string,
  request: PullRequest,
  onEvent: (e: PullEvent) => void,
  signal: AbortSignal,
  acceptTimeoutMs = ACCEPT_TIMEOUT_MS,
): Promise<DaemonPullOutcome> {
  return new Promise<DaemonPullOutcome>((resolve, reject) => {
    signal.throwIfAborted();
    const socket = net.connect(address);
    let connected = false;
    /** Whether the daemon has taken the pull (its first line). */
    let accepted = false;
    let settled = false;
    const settle = (fn: () => void): void => {
      if (settled) return;
      settled = true;
      clearTimeout(acceptTimer);
      signal.removeEventListener('abort', onAbort);
      fn();
      socket.destroy();
    };
    const unavailable = (reason: string): void => settle(() => resolve({ kind: 'unavailable', reason: `${address}: ${reason}`, midway: accepted }));
    const acceptTimer = setTimeout(() => unavailable(`no answer within ${acceptTimeoutMs} ms`), acceptTimeoutMs);
    const onAbort = (): void => settle(() => reject(signal.reason));
    signal.addEventListener('abort', onAbort, { once: true });
    socket.once('connect', () => {
      connected = true;
      const call: PullCall = { v: PULL_PROTOCOL_VERSION, pull: request };
      writeJsonLine(socket, call);
    });
    socket.on('error', (err: NodeJS.ErrnoException) => {
      unavailable(!connected && err.code !== undefined && NOBODY_THERE.has(err.code) ? err.code : err.message);
    });
    socket.once('close', () => unavailable('the daemon closed the connection before the pull ended'));
    onJsonLines(socket, PULL_PROTOCOL, PULL_MAX_LINE_BYTES, (message) => {
      let reply;
      try {
        reply = parsePullReply(message);
      } catch (err) {
        return settle(() => reject(err));
      }
      if (!accepted) {
        accepted = true;
        clearTimeout(acceptTimer);
      }
      if ('accepted' in reply) return;
      if ('event' in reply) return onEvent(reply.event);
      if ('done' in reply) return settle(() => resolve({ kind: 'pulled', summary: reply.done }));
      const { error } = reply;
      if (error.unsupported === true) return unavailable(error.message);
      settle(() => reject(new DaemonPullError(error.message, error.code)));
    });
  });
}
