/**
 * `stargaze convert`: read an image from a registry or an OCI layout, rewrite every layer as eStargz and
 * write the result to a registry or an OCI layout (reference: cmd/ctr-remote/commands/convert.go with
 * `--estargz --oci`). The pipeline is in src/image/converter.ts.
 */
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import pino from 'pino';
import { InvalidArgumentError, ProfileError, UsageError, errorCode, errorMessage } from '../errors';
import { parseProfile, profileFiles } from '../profile/profile-format';
import { convertImage, parsePrioritizedFiles } from '../image/converter';
import { OciLayout, parseOciLayoutRef } from '../image/oci-layout';
import { parsePlatform, type PlatformSpec } from '../image/platform';
import { createProgress } from '../image/progress';
import { DEFAULT_ZSTD_COMPRESSION_LEVEL, MAX_ZSTD_COMPRESSION_LEVEL } from '../image/zstd-chunked';
import { OciLayoutSink, OciLayoutSource, RegistrySink, RegistrySource, type ImageSink, type ImageSource } from '../image/store';
import { DEFAULT_HOST_DIR, HOSTS_FILE } from '../remote/hosts';
import { DEFAULT_TAG, parseReference, registryHostFor } from '../remote/reference';
import { RegistryClient } from '../remote/registry-client';
import { RegistryPusher } from '../remote/registry-push';
import { DEFAULT_CHUNK_SIZE_BYTES, DEFAULT_COMPRESSION_LEVEL } from '../estargz/writer';
import { pathExists } from '../path-exists';
import { DEFAULT_HOSTS_DIR } from './default-root';

export { DEFAULT_HOSTS_DIR };

const USAGE = `usage: stargaze convert [options] SRC DST

Converts the image SRC to eStargz (or zstd:chunked) and writes it as DST. SRC and DST are registry references
(host/repo:tag) or OCI image layout directories (oci:DIR[:TAG]). Every layer becomes an eStargz blob with
the TOC digest and uncompressed size annotations; media types become OCI. An index source gives a single
manifest for one platform (the host's, or --platform), or an index with --all-platforms. Blobs DST already
has are not uploaded again; the manifest is written last.

  --plain-http               talk to registries over http when no hosts.toml says otherwise
  --hosts-dir DIR            containerd hosts.toml directory (default ${DEFAULT_HOSTS_DIR})
  --src-user USER:PASS       credentials for SRC's registry (default: docker's config.json)
  --dst-user USER:PASS       credentials for DST's registry (default: docker's config.json)
  --platform OS/ARCH[/VAR]   platform to take from an index (repeatable; default the host's)
  --all-platforms            convert every platform and keep the index
  --chunk-size BYTES         uncompressed bytes per gzip member (default ${DEFAULT_CHUNK_SIZE_BYTES})
  --compression-level N      gzip level 0-9 (default ${DEFAULT_COMPRESSION_LEVEL}); with --zstd-chunked,
                             zstd level 1-${MAX_ZSTD_COMPRESSION_LEVEL} (default ${DEFAULT_ZSTD_COMPRESSION_LEVEL})
  --prioritized-files FILE   paths to put first in each layer, one per line (or optimize's JSON records);
                             without it every layer gets .no.prefetch.landmark
  --prefetch-profile FILE    a prefetch profile ('stargaze profile export'): its files are prioritized too,
                             in the order a container read them, after --prioritized-files (repeatable)
  --zstd-chunked             write zstd:chunked layers (media type tar+zstd) instead of eStargz (gzip)
  --quiet, -q                print nothing but errors
  --help, -h                 this text
`;

interface ConvertArgs {
  src: string;
  dst: string;
  plainHttp: boolean;
  hostsDir: string;
  srcUser: { username: string; password: string } | undefined;
  dstUser: { username: string; password: string } | undefined;
  platforms: PlatformSpec[];
  allPlatforms: boolean;
  chunkSizeBytes: number;
  compressionLevel: number;
  zstdChunked: boolean;
  prioritizedFiles: string | undefined;
  /** `--prefetch-profile` files, in the order given. */
  prefetchProfiles: string[];
  quiet: boolean;
}

export function parseConvertArgs(argv: string[]): ConvertArgs | 'help' {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        'plain-http': { type: 'boolean', default: false },
        'hosts-dir': { type: 'string', default: DEFAULT_HOSTS_DIR },
        'src-user': { type: 'string' },
        'dst-user': { type: 'string' },
        platform: { type: 'string', multiple: true },
        'all-platforms': { type: 'boolean', default: false },
        'chunk-size': { type: 'string' },
        'compression-level': { type: 'string' },
        'prioritized-files': { type: 'string' },
        'prefetch-profile': { type: 'string', multiple: true },
        'zstd-chunked': { type: 'boolean', default: false },
        quiet: { type: 'boolean', short: 'q', default: false },
        help: { type: 'boolean', short: 'h', default: false },
      },
      strict: true,
      allowPositionals: true,
    });
  } catch (err) {
    throw new UsageError(`${errorMessage(err)}\n${USAGE}`);
  }
  const v = parsed.values;
  if (v.help) return 'help';
  if (parsed.positionals.length !== 2) throw new UsageError(`want SRC and DST, got ${parsed.positionals.length} argument(s)\n${USAGE}`);
  if (v['all-platforms'] && v.platform !== undefined) throw new UsageError('--platform and --all-platforms exclude each other');
  const platforms: PlatformSpec[] = [];
  for (const p of v.platform ?? []) {
    try {
      platforms.push(parsePlatform(p));
    } catch (err) {
      throw new UsageError(`--platform: ${errorMessage(err)}`);
    }
  }
  return {
    src: parsed.positionals[0] as string,
    dst: parsed.positionals[1] as string,
    plainHttp: v['plain-http'],
    hostsDir: v['hosts-dir'],
    srcUser: v['src-user'] === undefined ? undefined : parseUser(v['src-user'], '--src-user'),
    dstUser: v['dst-user'] === undefined ? undefined : parseUser(v['dst-user'], '--dst-user'),
    platforms,
    allPlatforms: v['all-platforms'],
    chunkSizeBytes: v['chunk-size'] === undefined ? DEFAULT_CHUNK_SIZE_BYTES : parseIntFlag(v['chunk-size'], '--chunk-size', 1, 2 ** 31),
    zstdChunked: v['zstd-chunked'],
    compressionLevel: v['zstd-chunked']
      ? v['compression-level'] === undefined
        ? DEFAULT_ZSTD_COMPRESSION_LEVEL
        : parseIntFlag(v['compression-level'], '--compression-level', 1, MAX_ZSTD_COMPRESSION_LEVEL)
      : v['compression-level'] === undefined
        ? DEFAULT_COMPRESSION_LEVEL
        : parseIntFlag(v['compression-level'], '--compression-level', 0, 9),
    prioritizedFiles: v['prioritized-files'],
    prefetchProfiles: v['prefetch-profile'] ?? [],
    quiet: v.quiet,
  };
}

export function parseUser(text: string, flag: string): { username: string; password: string } {
  const colon = text.indexOf(':');
  if (colon <= 0) throw new UsageError(`${flag} wants USER:PASS`);
  return { username: text.slice(0, colon), password: text.slice(colon + 1) };
}

function parseIntFlag(text: string, flag: string, min: number, max: number): number {
  if (!/^\d+$/.test(text)) throw new UsageError(`${flag} wants a whole number, not ${JSON.stringify(text)}`);
  const n = Number(text);
  if (n < min || n > max) throw new UsageError(`${flag} must be between ${min} and ${max}, not ${n}`);
  return n;
}

/** A logger for warnings (hosts.toml, credentials) on stderr: stdout carries only the result. */
export function stderrLogger(): pino.Logger {
  return pino({ level: process.env.STARGAZE_LOG_LEVEL ?? 'warn', base: undefined, timestamp: pino.stdTimeFunctions.isoTime }, pino.destination(2));
}

/**
 * The hosts dir to use for a registry. With --plain-http and no hosts.toml for it (nor a _default one), a
 * throw-away hosts dir says `server = "http://<host>"`, which is what ctr's --plain-http means.
 */
export async function hostsDirFor(domain: string, hostsDir: string, plainHttp: boolean, cleanups: Array<() => Promise<void>>): Promise<string> {
  if (!plainHttp) return hostsDir;
  if ((await pathExists(path.join(hostsDir, domain, HOSTS_FILE))) || (await pathExists(path.join(hostsDir, DEFAULT_HOST_DIR, HOSTS_FILE)))) return hostsDir;
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-convert-hosts-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  await mkdir(path.join(dir, domain), { recursive: true });
  await writeFile(path.join(dir, domain, HOSTS_FILE), `server = ${JSON.stringify(`http://${registryHostFor(domain)}`)}\n`);
  return dir;
}

export async function main(argv: string[]): Promise<number> {
  const args = parseConvertArgs(argv);
  if (args === 'help') {
    process.stdout.write(USAGE);
    return 0;
  }
  let prioritized: string[] = [];
  if (args.prioritizedFiles !== undefined) {
    let text: string;
    try {
      text = await readFile(args.prioritizedFiles, 'utf8');
    } catch (err) {
      throw new UsageError(`--prioritized-files: cannot read ${args.prioritizedFiles}: ${errorCode(err) ?? 'read error'}`);
    }
    prioritized = parsePrioritizedFiles(text);
  }
  if (args.prefetchProfiles.length > 0) {
    const profiles = [];
    for (const file of args.prefetchProfiles) {
      try {
        profiles.push(parseProfile(await readFile(file)));
      } catch (err) {
        throw new UsageError(`--prefetch-profile: ${file}: ${err instanceof ProfileError ? errorMessage(err) : (errorCode(err) ?? errorMessage(err))}`);
      }
    }
    const listed = new Set(prioritized);
    for (const f of profileFiles(profiles)) {
      if (listed.has(f)) continue;
      listed.add(f);
      prioritized.push(f);
    }
  }

  const logger = stderrLogger();
  const cleanups: Array<() => Promise<void>> = [];
  const progress = createProgress({ quiet: args.quiet, stream: process.stderr });
  const abort = new AbortController();
  const onSignal = (): void => abort.abort(new Error('interrupted'));
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  let source: ImageSource;
  let sink: ImageSink | undefined;
  try {
    const srcLayout = parseOciLayoutRef(args.src);
    if (srcLayout !== undefined) {
      source = new OciLayoutSource(await OciLayout.open(srcLayout.dir), srcLayout.tag);
    } else {
      const ref = parseReference(args.src);
      const user = args.srcUser;
      const client = new RegistryClient({
        hostsDir: await hostsDirFor(ref.domain, args.hostsDir, args.plainHttp, cleanups),
        credentials: user === undefined ? undefined : () => user,
        log: logger.child({ module: 'remote' }),
      });
      cleanups.push(() => client.close());
      source = new RegistrySource(client, ref);
    }

    const dstLayout = parseOciLayoutRef(args.dst);
    if (dstLayout !== undefined) {
      sink = new OciLayoutSink(await OciLayout.create(dstLayout.dir), dstLayout.tag ?? DEFAULT_TAG);
    } else {
      const ref = parseReference(args.dst);
      if (ref.digest !== undefined) throw new InvalidArgumentError(`DST ${JSON.stringify(args.dst)} names a digest; give a tag`);
      const user = args.dstUser;
      const hostsDir = await hostsDirFor(ref.domain, args.hostsDir, args.plainHttp, cleanups);
      const client = new RegistryClient({ hostsDir, credentials: user === undefined ? undefined : () => user, log: logger.child({ module: 'remote' }) });
      cleanups.push(() => client.close());
      const pusher = new RegistryPusher(ref, { client, hostsDir, log: logger.child({ module: 'push' }) });
      sink = new RegistrySink(pusher, ref.tag ?? DEFAULT_TAG);
    }

    const result = await convertImage(source, sink, {
      platforms: args.platforms,
      allPlatforms: args.allPlatforms,
      chunkSizeBytes: args.chunkSizeBytes,
      compressionLevel: args.compressionLevel,
      zstdChunked: args.zstdChunked,
      prioritizedFiles: prioritized,
      progress,
      signal: abort.signal,
    });
    progress.close();
    if (!args.quiet) {
      process.stderr.write(`converted ${source.name} -> ${sink.name}: ${result.blobsPushed} blob(s) stored, ${result.blobsSkipped} already there\n`);
      process.stdout.write(`${result.descriptor.digest}\n`);
    }
    return 0;
  } finally {
    progress.close();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await sink?.close().catch(() => undefined);
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  }
}
