import pino from 'pino';

/**
 * The root logger: JSON lines on stdout. Modules take a child once (`log.child({ module: 'remote' })`)
 * so bindings are serialised at setup, not per call.
 */
export const log = pino({
  level: process.env.STARGAZE_LOG_LEVEL ?? 'info',
  base: undefined,
  timestamp: pino.stdTimeFunctions.isoTime,
  formatters: { level: (label) => ({ level: label }) },
});

export type Logger = pino.Logger;

export function setLogLevel(level: string): void {
  log.level = level;
}
