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
  /** Resolves when the destination's first open is done (a reopen asked before then would be queued behind it). */
  private readonly opened: Promise<void>;
  /** The rotation under way, if any: at most one at a time. */
  private rotation: Promise<void> | undefined;
  /** Bytes handed to the destination that it has not reported written yet (its 'write' events). */
  private unwrittenBytes = 0;
  /** settled() calls waiting for the next write or rotation to finish. */
  private readonly waiters = new Set<() => void>();

  constructor(
    private readonly path: string,
    private readonly maxBytes: number,
    currentSize: number,
  ) {
    // Asynchronous writes: a log line must never block a FUSE callback on the main thread.
    this.dest = pino.destination({ dest: path, sync: false, mkdir: true, mode: 0o600 });
    this.written = currentSize;
    // No 'error' listener here: a log file that cannot be opened or written stays as loud as it was.
    this.opened = new Promise((resolve) => this.dest.once('ready', () => resolve()));
    this.dest.on('write', (bytes: number) => {
      this.unwrittenBytes -= bytes;
      this.wake();
    });
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
    const bytes = Buffer.byteLength(line);
    this.written += bytes;
    this.unwrittenBytes += bytes;
    const ok = this.dest.write(line);
    if (this.written >= this.maxBytes / 2 && this.rotation === undefined) {
      this.rotation = this.rotate().finally(() => {
        this.rotation = undefined;
        this.wake();
      });
    }
    return ok;
  }

  /**
   * Resolves once every line written so far is in a file and no rotation is under way. Writes and renames
   * are asynchronous, so this is how a caller (a test, an orderly shutdown) knows what is on disk without
   * guessing a delay. A write that fails (the destination emits 'error') never settles.
   */
  async settled(): Promise<void> {
    while (this.rotation !== undefined || this.unwrittenBytes > 0) {
      await new Promise<void>((resolve) => this.waiters.add(resolve));
    }
  }

  private wake(): void {
    const waiting = [...this.waiters];
    this.waiters.clear();
    for (const resolve of waiting) resolve();
  }

  private async rotate(): Promise<void> {
    try {
      await this.opened;
      await rename(this.path, `${this.path}.1`);
      // The rotation ends when the new file is open (its 'ready'), so settled() never finds it missing.
      const reopened = new Promise<void>((resolve) => this.dest.once('ready', () => resolve()));
      // Lines written around the rename land in the old file or the new one: none is lost.
      this.dest.reopen();
      this.written = 0;
      await reopened;
    } catch {
      // Keep writing where we are; the next line tries again.
    }
  }
}
