/** A logger whose lines a unit test reads back, parsed, at debug level. */
import { Writable } from 'node:stream';
import { createMultiLogger, type Logger } from '../../src/log';

export function capturingLog(): { log: Logger; lines: Array<{ level: string; msg: string }> } {
  const lines: Array<{ level: string; msg: string }> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb): void {
      for (const l of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(l) as { level: string; msg: string });
      cb();
    },
  });
  return { log: createMultiLogger([sink], 'debug'), lines };
}
