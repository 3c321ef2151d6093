#!/usr/bin/env node
/**
 * The one `stargaze` binary: parses the subcommand and hands the rest of argv to it.
 * Subcommands are loaded lazily so `stargaze --help` does not load FUSE or gRPC.
 */
import { errorMessage, UsageError } from './errors';

interface Subcommand {
  summary: string;
  load: () => Promise<{ main: (argv: string[]) => Promise<number> }>;
}

const SUBCOMMANDS: Record<string, Subcommand> = {
  daemon: { summary: 'serve containerd snapshots with lazily pulled eStargz layers', load: () => import('./cmd/daemon') },
  convert: { summary: 'convert an image to eStargz (registry or oci:DIR)', load: () => import('./cmd/convert') },
  'fuse-server': { summary: '(started by the daemon) serve layer mounts across daemon restarts', load: () => import('./cmd/fuse-server') },
  profile: { summary: 'list, show, export and import the prefetch profiles under a daemon root', load: () => import('./cmd/profile') },
  rpull: { summary: 'pull an image into containerd for lazy pulling', load: () => import('./cmd/rpull') },
  'toc-digest': { summary: 'print the TOC digest of an eStargz or zstd:chunked layer blob', load: () => import('./cmd/toc-digest') },
};

function usage(): string {
  const lines = ['usage: stargaze <subcommand> [options]', '', 'subcommands:'];
  for (const [name, sub] of Object.entries(SUBCOMMANDS)) lines.push(`  ${name.padEnd(12)} ${sub.summary}`);
  lines.push('', "Run 'stargaze <subcommand> --help' for its options.");
  return lines.join('\n');
}

async function run(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(usage() + '\n');
    return name === undefined ? 2 : 0;
  }
  if (name === '--version' || name === 'version') {
    process.stdout.write('stargaze 0.1.0\n');
    return 0;
  }
  const sub = SUBCOMMANDS[name];
  if (!sub) {
    process.stderr.write(`stargaze: unknown subcommand '${name}'\n${usage()}\n`);
    return 2;
  }
  const mod = await sub.load();
  return mod.main(rest);
}

run(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`stargaze: ${errorMessage(err)}\n`);
    process.exitCode = err instanceof UsageError ? 2 : 1;
  },
);
