/**
 * The wire between `stargaze daemon` and the FUSE server that owns the layer mounts (fuse-server.ts):
 * JSON lines over a unix socket under the daemon's root. Small on purpose: the daemon asks for mounts,
 * checks and unmounts; the server answers each request and forwards its log lines so they show up in
 * the daemon's log as well as the server's own file.
 */
import type { Socket } from 'node:net';

/** Bound on one protocol line: requests carry snapshot labels (at most 4 KiB each in containerd). */
export const MAX_LINE_BYTES = 4 * 1024 * 1024;

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

/** Splits a socket's byte stream into JSON lines; a line over MAX_LINE_BYTES ends the connection. */
export function onJsonLines(socket: Socket, handle: (message: unknown) => void): void {
  let pending = '';
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    pending += chunk;
    let newline: number;
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      if (line.length === 0) continue;
      let message: unknown;
      try {
        message = JSON.parse(line);
      } catch {
        socket.destroy(new Error('fuse server protocol: a line is not JSON'));
        return;
      }
      handle(message);
    }
    if (pending.length > MAX_LINE_BYTES) socket.destroy(new Error('fuse server protocol: line too long'));
  });
}

export function writeJsonLine(socket: Socket, message: unknown): void {
  if (!socket.destroyed) socket.write(JSON.stringify(message) + '\n');
}
