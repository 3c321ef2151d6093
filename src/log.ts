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
export function createMultiLogger(streams: NodeJS.WritableStream[], level: string): Logger {
  // Each stream takes every level: the logger's own level decides what is written.
  return pino({ ...LOGGER_OPTIONS, level }, pino.multistream(streams.map((stream) => ({ stream, level: 'trace' as const }))));
}
