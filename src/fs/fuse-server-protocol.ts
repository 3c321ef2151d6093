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

/** Bound on one protocol line, newline excluded: requests carry snapshot labels (at most 4 KiB each in containerd). */
export const MAX_LINE_BYTES = 4 * 1024 * 1024;
const NEWLINE = 0x0a;

export type FuseServerRequest =
  | { id: number; op: 'mount'; mountpoint: string; labels: Record<string, string>; parent?: string }
  | { id: number; op: 'check'; mountpoint: string; labels: Record<string, string> }
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
 * Splits a socket's byte stream into JSON lines and hands each parsed value to `handle`. Lines are cut on
 * bytes and decoded whole, so a character split between two reads arrives intact. Empty lines are skipped.
 * A line that is not JSON, or longer than MAX_LINE_BYTES (counted in bytes, whether it arrives in one
 * read or many), ends the connection with a ProtocolError.
 */
export function onJsonLines(socket: Socket, handle: (message: unknown) => void): void {
  /** The start of a line whose newline has not arrived yet, and its length in bytes. */
  let partial: Buffer[] = [];
  let partialBytes = 0;
  const fail = (message: string): void => void socket.destroy(new ProtocolError(`fuse server protocol: ${message}`));
  socket.on('data', (chunk: Buffer | string) => {
    const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    let start = 0;
    for (let newline = bytes.indexOf(NEWLINE); newline >= 0; newline = bytes.indexOf(NEWLINE, start)) {
      const tail = bytes.subarray(start, newline);
      start = newline + 1;
      if (partialBytes + tail.length > MAX_LINE_BYTES) return fail('line too long');
      const line = partial.length === 0 ? tail : Buffer.concat([...partial, tail], partialBytes + tail.length);
      partial = [];
      partialBytes = 0;
      if (line.length === 0) continue;
      let message: unknown;
      try {
        message = JSON.parse(line.toString('utf8'));
      } catch {
        return fail('a line is not JSON');
      }
      handle(message);
      // The handler may have given up on the connection; what followed on it is not for anyone.
      if (socket.destroyed) return;
    }
    if (start < bytes.length) {
      partialBytes += bytes.length - start;
      if (partialBytes > MAX_LINE_BYTES) return fail('line too long');
      partial.push(bytes.subarray(start));
    }
  });
}

export function writeJsonLine(socket: Socket, message: unknown): void {
  if (!socket.destroyed) socket.write(JSON.stringify(message) + '\n');
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

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
