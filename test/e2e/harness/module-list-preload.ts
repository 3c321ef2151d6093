/**
 * Preloaded into stargaze's processes by a test (`NODE_OPTIONS=--require <this file, compiled>`, which the FUSE
 * server inherits from its daemon): on SIGUSR2 the process writes the files of the modules it has loaded
 * (require.cache's keys, one a line) to `<$STARGAZE_TEST_MODULE_LIST_DIR>/<pid>.txt`. Nothing else: the
 * product has no such hook, so what a test reads is what the process loaded by itself.
 */
import { renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';

export const MODULE_LIST_DIR_ENV = 'STARGAZE_TEST_MODULE_LIST_DIR';

const dir = process.env[MODULE_LIST_DIR_ENV];
if (dir) {
  process.on('SIGUSR2', () => {
    const file = path.join(dir, `${process.pid}.txt`);
    // written whole, then renamed, so a reader never sees half a list
    writeFileSync(`${file}.tmp`, Object.keys(require.cache).join('\n') + '\n');
    renameSync(`${file}.tmp`, file);
  });
}
