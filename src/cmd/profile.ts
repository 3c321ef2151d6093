/**
 * `stargaze profile ls|show|export|import`: the prefetch profiles stored under a daemon root
 * (`<root>/cache/profiles`, cache/profile-store.ts). Local files only: nothing here talks to the daemon or a
 * registry. An import is checked as the daemon would check it before it is written.
 */
import { readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { PROFILE_DIR, ProfileStore } from '../cache/profile-store';
import { errorCode, errorMessage, ProfileError, UsageError } from '../errors';
import { keyOf, MAX_PROFILE_FILE_BYTES, parseProfile } from '../profile/profile-format';
import { DEFAULT_HOSTS_DIR, DEFAULT_ROOT } from './default-root';

const USAGE = `usage: stargaze profile ls [--root DIR]
       stargaze profile show KEY [--root DIR]
       stargaze profile export KEY [FILE|-] [--root DIR]
       stargaze profile import FILE|- [--root DIR]
       stargaze profile push IMAGE [--root DIR] [--plain-http] [--hosts-dir DIR] [--user USER:PASS] [--platform P]

Prefetch profiles recorded by the daemon under DIR/${PROFILE_DIR} (default root ${DEFAULT_ROOT}).
KEY is a profile's key as 'ls' prints it, or a unique prefix of it (at least 8 characters).
'export' writes the profile to FILE, or to standard output without FILE or with '-'.
'import' checks a profile (version, digests, bounds) and stores it under its own key; the daemon uses it
the next time that layer is mounted for an image with the same layers.
'push' uploads the profiles of IMAGE's layers as an OCI artifact referring to IMAGE's manifest (platform: the
host's, or --platform), listed through the registry's referrers API or its referrers tag (sha256-<hex>); a
pull by 'stargaze rpull' or CRI on another node fetches them. Registry options as 'stargaze convert' DST's
(--hosts-dir default ${DEFAULT_HOSTS_DIR}); prints the artifact's digest.
`;

/** A key prefix shorter than this is too likely to be a typo matching something else. */
const MIN_PREFIX = 8;

export async function main(argv: string[]): Promise<number> {
  let positionals: string[];
  let values: { root?: string; help?: boolean; 'plain-http'?: boolean; 'hosts-dir'?: string; user?: string; platform?: string };
  try {
    ({ positionals, values } = parseArgs({
      args: argv,
      options: {
        root: { type: 'string', default: DEFAULT_ROOT },
        'plain-http': { type: 'boolean', default: false },
        'hosts-dir': { type: 'string', default: DEFAULT_HOSTS_DIR },
        user: { type: 'string' },
        platform: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
      allowPositionals: true,
      strict: true,
    }));
  } catch (err) {
    throw new UsageError(`${errorMessage(err)}\n${USAGE}`);
  }
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const [command, ...args] = positionals;
  const store = new ProfileStore(path.join(path.resolve(values.root ?? DEFAULT_ROOT), PROFILE_DIR));
  const expect = (n: number, max = n): void => {
    if (args.length < n || args.length > max) throw new UsageError(`profile ${command}: expected ${n === max ? n : `${n} to ${max}`} argument${max === 1 ? '' : 's'}, got ${args.length}\n${USAGE}`);
  };
  switch (command) {
    case 'ls':
      expect(0);
      return list(store);
    case 'show':
      expect(1);
      process.stdout.write(await exported(store, args[0]!));
      return 0;
    case 'export': {
      expect(1, 2);
      const bytes = await exported(store, args[0]!);
      const out = args[1];
      if (out === undefined || out === '-') process.stdout.write(bytes);
      else await writeFile(out, bytes, { mode: 0o644 });
      return 0;
    }
    case 'import':
      expect(1);
      return importProfile(store, args[0]!);
    case 'push': {
      expect(1);
      // Loaded only here: the local commands need no registry client.
      const { pushCommand } = await import('./profile-push');
      return pushCommand(store, args[0]!, {
        plainHttp: values['plain-http'] === true,
        hostsDir: values['hosts-dir'] ?? DEFAULT_HOSTS_DIR,
        user: values.user,
        platform: values.platform,
      });
    }
    case undefined:
      throw new UsageError(`profile: expected a command: ls, show, export, import or push\n${USAGE}`);
    default:
      throw new UsageError(`profile: unknown command '${command}'\n${USAGE}`);
  }
}

async function list(store: ProfileStore): Promise<number> {
  const rows = [['KEY', 'LAYER', 'ENTRIES', 'BYTES', 'MODIFIED']];
  for (const info of await store.list()) {
    let layer: string;
    let entries: string;
    try {
      const bytes = await store.read(info.key);
      if (bytes === undefined) continue; // evicted meanwhile
      const profile = parseProfile(bytes);
      layer = profile.layer;
      entries = String(profile.entries.length);
      if (keyOf(profile) !== info.key) layer += ' (stored under another key: ignored)';
    } catch (err) {
      layer = `(unusable: ${errorMessage(err)})`;
      entries = '-';
    }
    rows.push([info.key, layer, entries, String(info.bytes), new Date(info.mtimeMs).toISOString()]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) process.stdout.write(r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ') + '\n');
  return 0;
}

/** The stored bytes of the profile `keyOrPrefix` names, checked to be a usable profile. */
async function exported(store: ProfileStore, keyOrPrefix: string): Promise<Buffer> {
  const key = await resolveKey(store, keyOrPrefix);
  const bytes = await store.read(key);
  if (bytes === undefined) throw new UsageError(`no profile ${key} under ${store.dir}`);
  const profile = parseProfile(bytes);
  if (keyOf(profile) !== key) throw new ProfileError(`profile stored as ${key} belongs to another key (${keyOf(profile)})`, 'foreign');
  return bytes;
}

async function resolveKey(store: ProfileStore, keyOrPrefix: string): Promise<string> {
  if (!/^[0-9a-f]+$/.test(keyOrPrefix) || keyOrPrefix.length < MIN_PREFIX) {
    throw new UsageError(`'${keyOrPrefix}' is not a profile key: 64 hex digits, or a unique prefix of at least ${MIN_PREFIX} (see 'stargaze profile ls')`);
  }
  const matches = (await store.list()).map((i) => i.key).filter((k) => k.startsWith(keyOrPrefix));
  if (matches.length === 0) throw new UsageError(`no profile ${keyOrPrefix} under ${store.dir}`);
  if (matches.length > 1) throw new UsageError(`'${keyOrPrefix}' names ${matches.length} profiles: ${matches.join(', ')}`);
  return matches[0]!;
}

async function importProfile(store: ProfileStore, file: string): Promise<number> {
  let input: string;
  try {
    // A file past the bound is not read into memory at all.
    if (file !== '-' && (await stat(file)).size > MAX_PROFILE_FILE_BYTES) throw new ProfileError(`${file}: profile larger than ${MAX_PROFILE_FILE_BYTES} bytes`, 'oversized');
    input = file === '-' ? await readBounded(process.stdin, MAX_PROFILE_FILE_BYTES, file) : await readFile(file, 'utf8');
  } catch (err) {
    if (err instanceof ProfileError) throw err;
    throw new UsageError(`cannot read ${file}: ${errorCode(err) ?? errorMessage(err)}`);
  }
  if (Buffer.byteLength(input) > MAX_PROFILE_FILE_BYTES) throw new ProfileError(`${file}: profile larger than ${MAX_PROFILE_FILE_BYTES} bytes`, 'oversized');
  let profile;
  try {
    profile = parseProfile(input);
  } catch (err) {
    throw new ProfileError(`${file}: ${errorMessage(err)}`);
  }
  await store.save(profile);
  process.stdout.write(`${keyOf(profile)}\n`);
  return 0;
}

/** A stream's text, refused as soon as it passes `limit` bytes: standard input is read no further than that. */
async function readBounded(stream: NodeJS.ReadableStream, limit: number, name: string): Promise<string> {
  const parts: Buffer[] = [];
  let total = 0;
  for await (const chunk of stream) {
    const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    total += buf.length;
    if (total > limit) throw new ProfileError(`${name}: profile larger than ${limit} bytes`, 'oversized');
    parts.push(buf);
  }
  return Buffer.concat(parts).toString('utf8');
}
