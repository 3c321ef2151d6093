/**
 * JSON lines over a socket: the framing of stargaze's own wire protocols (daemon <-> FUSE server, rpull ->
 * daemon). Lines are cut on bytes and decoded whole, so a character split between two reads arrives intact.
 */
import type { Socket } from 'node:net';
import { ProtocolError } from './errors';

const NEWLINE = 0x0a;

/**
 * Hands each parsed line of `socket` to `handle`; empty lines are skipped. A line that is not JSON, or longer
 * than `maxLineBytes` (counted in bytes, whether it arrives in one read or many), ends the connection with a
 * ProtocolError whose message starts with `protocol`.
 */
export function onJsonLines(socket: Socket, protocol: string, maxLineBytes: number, handle: (message: unknown) => void): void {
  /** The start of a line whose newline has not arrived yet, and its length in bytes. */
  let partial: Buffer[] = [];
  let partialBytes = 0;
  const fail = (message: string): void => void socket.destroy(new ProtocolError(`${protocol}: ${message}`));
  socket.on('data', (chunk: Buffer | string) => {
    const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    let start = 0;
    for (let newline = bytes.indexOf(NEWLINE); newline >= 0; newline = bytes.indexOf(NEWLINE, start)) {
      const tail = bytes.subarray(start, newline);
      start = newline + 1;
      if (partialBytes + tail.length > maxLineBytes) return fail('line too long');
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
      if (partialBytes > maxLineBytes) return fail('line too long');
      partial.push(bytes.subarray(start));
    }
  });
}

export function writeJsonLine(socket: Socket, message: unknown): void {
  if (!socket.destroyed) socket.write(JSON.stringify(message) + '\n');
}

export function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}
