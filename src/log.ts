import { rename } from 'node:fs/promises';
import pino from 'pino';

/** Shared by every logger we make: JSON lines, ISO times, level names rather than numbers. */
const LOGGER_OPTIONS: pino.LoggerOptions = {
  level: process.env.STARGAZE_LOG_LEVEL ?? 'info',
  base: undefined,
  timestamp: pino.stdTimeFunctions.isoTime,
  formatters: { level: (label) => ({ level: label }) },
};

/**
 * The root logger: JSON lines on stdout. Modules take a child once (`log.child({ module: 'remote' })`)
 * so bindings are serialised at setup, not per call.
 */
export const log = pino(LOGGER_OPTIONS);

export type Logger = pino.Logger;

export function setLogLevel(level: string): void {
  log.level = level;
}

/** A logger of the same format writing to several streams (the FUSE server: its file and its daemons). */
export function createMultiLogger(streams: pino.DestinationStream[], level: string): Logger {
  // Each stream takes every level: the logger's own level decides what is written.
  return pino({ ...LOGGER_OPTIONS, level }, pino.multistream(streams.map((stream) => ({ stream, level: 'trace' as const }))));
}

/**
 * A log file that never grows past about `maxBytes` on disk: when the current file reaches half of it,
 * it becomes `<path>.1` (replacing the older one) and a new file is started. The FUSE server logs here
 * for as long as it runs, which may be months; an unbounded file would eat into the disk budget of
 * the chunk cache (`[cache] disk_max_bytes` covers everything under the root).
 */
export class BoundedLogFile {
  private readonly dest: ReturnType<typeof pino.destination>;
  private written: number;
  private rotating = false;

  constructor(
    private readonly path: string,
    private readonly maxBytes: number,
    currentSize: number,
  ) {
    // Asynchronous writes: a log line must never block a FUSE callback on the main thread.
    this.dest = pino.destination({ dest: path, sync: false, mkdir: true, mode: 0o600 });
    this.written = currentSize;
    // The last lines before an exit (a fatal error) are the ones worth having.
    process.once('exit', () => {
      try {
        this.dest.flushSync();
      } catch {
        // not open yet, or the disk is full: nothing more to do on the way out
      }
    });
  }

  write(line: string): boolean {
    this.written += Buffer.byteLength(line);
    const ok = this.dest.write(line);
    if (this.written >= this.maxBytes / 2 && !this.rotating) void this.rotate();
    return ok;
  }

  private async rotate(): Promise<void> {
    this.rotating = true;
    try {
      await rename(this.path, `${this.path}.1`);
      // Lines written around the rename land in the old file or the new one: none is lost.
      this.dest.reopen();
      this.written = 0;
    } catch {
      // Keep writing where we are; the next line tries again.
    } finally {
      this.rotating = false;
    }
  }
}
