/**
 * `stargaze toc-digest FILE|-`: prints the TOC digest of an eStargz or zstd:chunked layer blob (the value of
 * its `containerd.io/snapshot/stargz/toc.digest` annotation). Reads only the footer and the TOC.
 */
import { createWriteStream } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { errorMessage, UsageError } from '../errors';
import { readToc, type RangeReadable } from '../estargz/toc';

const USAGE = `usage: stargaze toc-digest FILE|-

Prints the TOC digest of an eStargz or zstd:chunked layer blob read from FILE, or from standard input
with '-'.
`;

export async function main(argv: string[]): Promise<number> {
  let positionals: string[];
  let help: boolean | undefined;
  try {
    ({ positionals, values: { help } } = parseArgs({ args: argv, options: { help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true }));
  } catch (err) {
    throw new UsageError(`${errorMessage(err)}\n${USAGE}`);
  }
  if (help) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (positionals.length !== 1) throw new UsageError(`expected one FILE or '-'\n${USAGE}`);
  const input = positionals[0]!;
  // Standard input cannot seek to the footer: spool it to a temp file first, never into memory.
  const spoolDir = input === '-' ? await mkdtemp(path.join(os.tmpdir(), 'stargaze-toc-digest-')) : undefined;
  try {
    const file = spoolDir ? path.join(spoolDir, 'blob') : input;
    if (spoolDir) await pipeline(process.stdin, createWriteStream(file));
    const handle = await open(file, 'r');
    try {
      const { size } = await handle.stat();
      const blob: RangeReadable = {
        size,
        async readRange(offset, length) {
          const buf = Buffer.alloc(length);
          const { bytesRead } = await handle.read(buf, 0, length, offset);
          if (bytesRead !== length) throw new Error(`short read at ${offset}: ${bytesRead} of ${length} bytes`);
          return buf;
        },
      };
      const { tocDigest } = await readToc(blob);
      process.stdout.write(`${tocDigest}\n`);
    } finally {
      await handle.close();
    }
  } finally {
    if (spoolDir) await rm(spoolDir, { recursive: true, force: true });
  }
  return 0;
}
