/**
 * The wire between `stargaze daemon` and the FUSE server that owns the layer mounts (fuse-server.ts):
 * JSON lines over a unix socket under the daemon's root. Small on purpose: the daemon asks for mounts,
 * checks and unmounts; the server answers each request and forwards its log lines so they show up in
 * the daemon's log as well as the server's own file.
 *
 * Both ends check what they read (parseRequest, parseServerMessage) rather than cast it: the FUSE server
 * holds every layer mount, and a line it cannot act on must cost an error answer or the connection, never
 * the process.
 */
import type { Socket } from 'node:net';
import { ProtocolError } from '../errors';
import { isRecord, onJsonLines as onJsonLinesOf, writeJsonLine } from '../json-lines';

/** Bound on one protocol line, newline excluded: requests carry snapshot labels (at most 4 KiB each in containerd). */
export const MAX_LINE_BYTES = 4 * 1024 * 1024;

export type FuseServerRequest =
  | { id: number; op: 'mount'; mountpoint: string; labels: Record<string, string>; parent?: string }
  | { id: number; op: 'check'; mountpoint: string; labels: Record<string, string> }
  | { id: number; op: 'prepare-unmount'; mountpoint: string }
  | { id: number; op: 'unmount'; mountpoint: string }
  | { id: number; op: 'list' };

export type FuseServerResponse =
  | { id: number; ok: true; mounts?: { mountpoint: string; digest: string }[] }
  | { id: number; ok: false; code: string | undefined; message: string };

/** A log line the server emitted, forwarded verbatim to connected daemons. */
export interface FuseServerLogEvent {
  log: string;
}

/**
 * Hands each JSON line of `socket` to `handle` (src/json-lines.ts). A line that is not JSON, or longer than
 * MAX_LINE_BYTES, ends the connection with a ProtocolError.
 */
export function onJsonLines(socket: Socket, handle: (message: unknown) => void): void {
  onJsonLinesOf(socket, 'fuse server protocol', MAX_LINE_BYTES, handle);
}

export { writeJsonLine };

function isStringMap(x: unknown): x is Record<string, string> {
  return isRecord(x) && Object.values(x).every((v) => typeof v === 'string');
}

/** The id of a request, when it has a usable one: only then can an error be answered to it. */
export function requestId(message: unknown): number | undefined {
  return isRecord(message) && Number.isSafeInteger(message.id) ? (message.id as number) : undefined;
}

/** What a daemon asked for, checked field by field; a ProtocolError says what is wrong with it. */
export function parseRequest(message: unknown): FuseServerRequest {
  const id = requestId(message);
  if (!isRecord(message) || id === undefined) throw new ProtocolError('fuse server protocol: a request needs an object with an integer id');
  const { op, mountpoint, labels, parent } = message;
  const needMountpoint = (): string => {
    if (typeof mountpoint !== 'string' || mountpoint === '') throw new ProtocolError(`fuse server protocol: ${String(op)} needs a mountpoint`);
    return mountpoint;
  };
  const needLabels = (): Record<string, string> => {
    if (!isStringMap(labels)) throw new ProtocolError(`fuse server protocol: ${String(op)} needs labels, an object of strings`);
    return labels;
  };
  switch (op) {
    case 'mount': {
      if (parent !== undefined && typeof parent !== 'string') throw new ProtocolError('fuse server protocol: mount parent must be a string');
      const request: FuseServerRequest = { id, op, mountpoint: needMountpoint(), labels: needLabels() };
      return parent === undefined ? request : { ...request, parent };
    }
    case 'check':
      return { id, op, mountpoint: needMountpoint(), labels: needLabels() };
    case 'prepare-unmount':
    case 'unmount':
      return { id, op, mountpoint: needMountpoint() };
    case 'list':
      return { id, op };
    default:
      throw new ProtocolError(`fuse server protocol: unknown operation ${JSON.stringify(op) ?? 'undefined'}`);
  }
}

/** What the server sent a daemon: an answer to one of its requests, or a log line; checked, not cast. */
export function parseServerMessage(message: unknown): FuseServerResponse | FuseServerLogEvent {
  if (!isRecord(message)) throw new ProtocolError('fuse server protocol: a message must be an object');
  if ('log' in message) {
    if (typeof message.log !== 'string') throw new ProtocolError('fuse server protocol: a log event needs a string');
    return { log: message.log };
  }
  const id = requestId(message);
  if (id === undefined) throw new ProtocolError('fuse server protocol: an answer needs an integer id');
  if (message.ok === true) {
    const { mounts } = message;
    if (mounts === undefined) return { id, ok: true };
    const valid = Array.isArray(mounts) && mounts.every((m) => isRecord(m) && typeof m.mountpoint === 'string' && typeof m.digest === 'string');
    if (!valid) throw new ProtocolError('fuse server protocol: mounts must be a list of { mountpoint, digest }');
    return { id, ok: true, mounts: (mounts as { mountpoint: string; digest: string }[]).map(({ mountpoint, digest }) => ({ mountpoint, digest })) };
  }
  if (message.ok === false) {
    const { code } = message;
    if (typeof message.message !== 'string' || (code !== undefined && typeof code !== 'string')) {
      throw new ProtocolError('fuse server protocol: an error answer needs a message (and a string code, if any)');
    }
    return { id, ok: false, code, message: message.message };
  }
  throw new ProtocolError('fuse server protocol: an answer needs ok: true or false');
}
