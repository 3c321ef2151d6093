/**
 * The daemon's typed config, loaded from TOML at startup.
 *
 * Key names and defaults follow the reference (containerd-stargz-grpc config.toml), including its rule that
 * a key set to 0 means "use the default" (go-toml leaves 0 for absent keys, so the reference cannot tell
 * them apart). Our own key `[cache] memory_max_bytes` does not: 0 there turns the memory tier off. Reference keys we do not
 * implement yet are accepted with one warning each (see keys.ts); unknown keys and wrong types are errors
 * naming the key path, so a typo never silently falls back to a default.
 */
import { readFile } from 'node:fs/promises';
import { parse as parseToml, TomlError } from 'smol-toml';
import { ConfigError, errorCode } from '../errors';
import { parseHeaderTable } from './header-table';
import { MIRROR_KEYS, TABLE_KEYS, TOP_LEVEL_KEYS, type KeySpec, type KeyType } from './keys';

export const DEFAULT_PREFETCH_TIMEOUT_SEC = 10;
export const DEFAULT_PREFETCH_SIZE_BYTES = 0;
/**
 * FUSE attribute/entry cache lifetime. The reference's default is 1 s, which costs a lookup per path per
 * second. A layer never changes, so ours is an hour: the one file that does change, the status file, keeps
 * a fixed size and is re-read on each open (auto_cache).
 */
export const DEFAULT_FUSE_ATTR_TIMEOUT_SEC = 3600;
export const DEFAULT_FUSE_ENTRY_TIMEOUT_SEC = 3600;
/** 256 MiB of decompressed chunks in RAM. */
export const DEFAULT_CACHE_MEMORY_MAX_BYTES = 268_435_456;
/** Our default cap on the disk chunk cache: 10 GiB. */
export const DEFAULT_CACHE_DISK_MAX_BYTES = 10 * 1024 * 1024 * 1024;
/** The reference's `max_concurrency`: layers background-fetched at once. */
export const DEFAULT_MAX_CONCURRENCY = 2;
/**
 * The reference resumes background fetch only after 5 s without prioritized work (mount, prefetch, reads):
 * a container starting meanwhile has the link and the cores to itself.
 */
export const DEFAULT_BACKGROUND_FETCH_QUIET_MS = 5_000;
export const DEFAULT_REQUEST_TIMEOUT_SEC = 30;
export const DEFAULT_FETCHING_TIMEOUT_SEC = 300;
/** Reference defaults of the per-host retry policy. */
export const DEFAULT_MAX_RETRIES = 5;
export const DEFAULT_MIN_WAIT_MS = 30;
export const DEFAULT_MAX_WAIT_MS = 300_000;
/** Ours: range requests in flight when a whole blob is fetched, and bytes per request. */
export const DEFAULT_PARALLEL_FETCH_CONCURRENCY = 8;
export const DEFAULT_PARALLEL_FETCH_CHUNK_BYTES = 8 * 1024 * 1024;
/** The reference's `[blob] chunk_size`: blob reads for a missed file are whole blocks of this many bytes. */
export const DEFAULT_BLOB_CHUNK_BYTES = 50_000;
/** Above this, every missed small file would cost a download of that size: a typo, refused rather than obeyed. */
export const MAX_BLOB_CHUNK_BYTES = 16 * 1024 * 1024;

/**
 * `[prefetch_profile]`: a layer's start window ends once its reads have been quiet this long. A starting
 * container reads in bursts (exec, the loader, imports) with gaps well under a second; a second of quiet
 * already means the start is mostly over, three leave room for a slow disk or a busy node.
 */
export const DEFAULT_PROFILE_QUIET_MS = 3_000;
/** ... or once this long has passed since its first read: what a long-running workload reads later is not its start. */
export const DEFAULT_PROFILE_MAX_WINDOW_SEC = 60;
/**
 * ... or once it has read this many distinct chunks. Also the bound on a profile's entries across the starts
 * merged into it: about 60 bytes a chunk on disk (a 4 MiB chunk per big file, one per small file).
 */
export const DEFAULT_PROFILE_MAX_CHUNKS = 16_384;
/** The most `max_chunks` may say: what a profile file may hold (profile-format.ts MAX_PROFILE_ENTRIES; a test keeps them equal). */
export const MAX_PROFILE_CHUNKS = 65_536;

/**
 * ... and a mount whose image has no local profile waits this long at most for one pushed to the registry
 * (`stargaze profile push`): a local registry answers the referrers lookup in a few ms, a remote one in a few
 * round trips; a mount must never wait long for a hint.
 */
export const DEFAULT_PROFILE_FETCH_TIMEOUT_MS = 500;

export interface PrefetchProfileConfig {
  /** `record`: the FUSE server records each mounted layer's start window into its profile. */
  readonly record: boolean;
  /** `replay`: a layer with a profile prefetches its chunks at mount, in place of the landmark. */
  readonly replay: boolean;
  /** `quiet_msec`: the window closes once the layer's reads have been quiet this long. */
  readonly quietMs: number;
  /** `max_window_sec`: the window closes this long after its first read at the latest. */
  readonly maxWindowSec: number;
  /** `max_chunks`: the window closes after this many distinct chunks; a profile keeps at most this many. */
  readonly maxChunks: number;
  /** `fetch_timeout_msec`: a mount without a local profile waits this long at most for one at the registry. */
  readonly fetchTimeoutMs: number;
}

export interface FuseConfig {
  /** Kernel attribute cache lifetime (`[fuse] attr_timeout`). */
  readonly attrTimeoutSec: number;
  /** Kernel name-lookup cache lifetime (`[fuse] entry_timeout`). */
  readonly entryTimeoutSec: number;
}

export interface CacheConfig {
  /** Bound of the in-memory cache (`[cache] memory_max_bytes`, ours). */
  readonly memoryMaxBytes: number;
  /**
   * `[cache] disk_max_bytes`: cap on what the daemon keeps under its root, snapshot dirs aside: chunk and TOC
   * caches (least recently used evicted), files being written, metadata db and logs (cache/disk-budget.ts).
   */
  readonly diskMaxBytes: number;
}

/**
 * A mirror from `[[resolver.host."<registry>".mirrors]]` (the reference's way to set mirrors). remote/ turns it
 * into a registry endpoint, used for a registry only when no hosts.toml applies to it.
 */
export interface ConfigMirror {
  /** `host[:port]`, no scheme. */
  readonly host: string;
  /** Plain http (loopback hosts get it anyway). */
  readonly insecure: boolean;
  /** `request_timeout_sec`: bound of each request to this mirror; 0 means `[resolver] request_timeout_sec`, negative none. */
  readonly requestTimeoutSec: number;
  /** `header`: extra request headers, lower-case names (header-table.ts). */
  readonly headers: Readonly<Record<string, readonly string[]>>;
}

export interface ResolverConfig {
  /** Bound of each registry request (`[resolver] request_timeout_sec`); <= 0 means no timeout. */
  readonly requestTimeoutSec: number;
  /** `[[resolver.host."<registry>".mirrors]]` by registry; used for registries without a hosts.toml. */
  readonly mirrors: Readonly<Record<string, readonly ConfigMirror[]>>;
}

export interface BlobConfig {
  /** Bound of one blob range fetch (`[blob] fetching_timeout_sec`), retries included. */
  readonly fetchingTimeoutSec: number;
  /** Retries of one registry request on transport errors, 429 and 5xx (`[blob] max_retries`). */
  readonly maxRetries: number;
  /** First retry backoff before jitter (`[blob] min_wait_msec`). */
  readonly minWaitMs: number;
  /** Cap of one backoff, Retry-After included (`[blob] max_wait_msec`). */
  readonly maxWaitMs: number;
  /** Never send multi-range requests (`[blob] force_single_range_mode`). */
  readonly forceSingleRangeMode: boolean;
  /**
   * `[blob] chunk_size`: a chunk a read misses is fetched as the whole blocks of this size its compressed
   * member touches, and the members beside it come from those blocks if read soon after; 0 means the default.
   */
  readonly chunkSizeBytes: number;
  /** Range requests in flight for a whole-blob fetch (`[blob] parallel_fetch_concurrency`, ours). */
  readonly parallelFetchConcurrency: number;
  /** Bytes per range request of a whole-blob fetch (`[blob] parallel_fetch_chunk_size`, ours). */
  readonly parallelFetchChunkBytes: number;
}

export interface Config {
  /** `noprefetch`: don't prefetch the landmark/prefetch range at mount. */
  readonly noPrefetch: boolean;
  /** `no_background_fetch`: don't fetch the rest of each layer in the background. */
  readonly noBackgroundFetch: boolean;
  /**
   * `copy_fetched_layers` (ours): a layer fully fetched (and checked against its chainID) is copied to a plain
   * directory beside its mount, and containers created after that read it from there instead of through FUSE.
   */
  readonly copyFetchedLayers: boolean;
  /** `prefetch_timeout_sec`: how long the first Check waits for prefetch. */
  readonly prefetchTimeoutSec: number;
  /** `prefetch_size`: bytes to prefetch when the layer has no landmark and no label says. */
  readonly prefetchSizeBytes: number;
  /** `disable_verification`: skip TOC and chunk digest checks everywhere. */
  readonly disableVerification: boolean;
  /** `allow_no_verification`: let the skip-verify label mount layers without a TOC digest. */
  readonly allowNoVerification: boolean;
  /** `metrics_address`: TCP address for /metrics; empty = off. */
  readonly metricsAddress: string;
  readonly fuse: FuseConfig;
  readonly cache: CacheConfig;
  /** `max_concurrency`: layers fetched in the background at once. */
  readonly maxConcurrency: number;
  /**
   * `background_fetch_quiet_msec` (ours): background fetch waits until no read has been fetching and no layer
   * has been mounting for this long; 0: it waits only while reads are fetching.
   */
  readonly backgroundFetchQuietMs: number;
  readonly resolver: ResolverConfig;
  readonly blob: BlobConfig;
  readonly prefetchProfile: PrefetchProfileConfig;
  readonly fuseManager: FuseManagerConfig;
  readonly criKeychain: CriKeychainConfig;
  readonly kubeconfigKeychain: KubeconfigKeychainConfig;
}

/** containerd's socket: where `[cri_keychain]` forwards CRI image calls by default. */
export const DEFAULT_CRI_IMAGE_SERVICE_PATH = '/run/containerd/containerd.sock';

export interface CriKeychainConfig {
  /** `[cri_keychain] enable_keychain`: serve the CRI image-service proxy and use the credentials of its pulls. */
  readonly enableKeychain: boolean;
  /** `image_service_path`: the CRI image service calls are forwarded to (default containerd's socket). */
  readonly imageServicePath: string;
  /** `listen_path`: where the proxy is served; empty means the daemon's own socket (the reference's default). */
  readonly listenPath: string;
}

export interface KubeconfigKeychainConfig {
  /** `[kubeconfig_keychain] enable_keychain`: registry credentials from the cluster's image pull secrets. */
  readonly enableKeychain: boolean;
  /** `kubeconfig_path`: empty means $KUBECONFIG, else ~/.kube/config. */
  readonly kubeconfigPath: string;
}

export interface FuseManagerConfig {
  /**
   * `[fuse_manager] enable`: serve the FUSE mounts from a separate long-lived process, so restarting the
   * daemon does not cut running containers off their files. Default true (the reference's is false).
   */
  readonly enable: boolean;
}

export interface LoadedConfig {
  config: Config;
  /** One line per ignored (not yet implemented) key. */
  warnings: string[];
}

export function defaultConfig(): Config {
  return {
    noPrefetch: false,
    noBackgroundFetch: false,
    copyFetchedLayers: true,
    prefetchTimeoutSec: DEFAULT_PREFETCH_TIMEOUT_SEC,
    prefetchSizeBytes: DEFAULT_PREFETCH_SIZE_BYTES,
    disableVerification: false,
    allowNoVerification: false,
    metricsAddress: '',
    fuse: { attrTimeoutSec: DEFAULT_FUSE_ATTR_TIMEOUT_SEC, entryTimeoutSec: DEFAULT_FUSE_ENTRY_TIMEOUT_SEC },
    cache: { memoryMaxBytes: DEFAULT_CACHE_MEMORY_MAX_BYTES, diskMaxBytes: DEFAULT_CACHE_DISK_MAX_BYTES },
    maxConcurrency: DEFAULT_MAX_CONCURRENCY,
    backgroundFetchQuietMs: DEFAULT_BACKGROUND_FETCH_QUIET_MS,
    resolver: { requestTimeoutSec: DEFAULT_REQUEST_TIMEOUT_SEC, mirrors: {} },
    blob: {
      fetchingTimeoutSec: DEFAULT_FETCHING_TIMEOUT_SEC,
      maxRetries: DEFAULT_MAX_RETRIES,
      minWaitMs: DEFAULT_MIN_WAIT_MS,
      maxWaitMs: DEFAULT_MAX_WAIT_MS,
      forceSingleRangeMode: false,
      chunkSizeBytes: DEFAULT_BLOB_CHUNK_BYTES,
      parallelFetchConcurrency: DEFAULT_PARALLEL_FETCH_CONCURRENCY,
      parallelFetchChunkBytes: DEFAULT_PARALLEL_FETCH_CHUNK_BYTES,
    },
    prefetchProfile: {
      record: true,
      replay: true,
      quietMs: DEFAULT_PROFILE_QUIET_MS,
      maxWindowSec: DEFAULT_PROFILE_MAX_WINDOW_SEC,
      maxChunks: DEFAULT_PROFILE_MAX_CHUNKS,
      fetchTimeoutMs: DEFAULT_PROFILE_FETCH_TIMEOUT_MS,
    },
    fuseManager: { enable: true },
    criKeychain: { enableKeychain: false, imageServicePath: DEFAULT_CRI_IMAGE_SERVICE_PATH, listenPath: '' },
    kubeconfigKeychain: { enableKeychain: false, kubeconfigPath: '' },
  };
}

/**
 * Loads the config file. A missing file is fine when it is the default path (`explicit: false`) and an
 * error when the user named it. An empty file gives the defaults.
 */
export async function loadConfig(path: string, opts: { explicit: boolean }): Promise<LoadedConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    const code = errorCode(err);
    if (code === 'ENOENT' && !opts.explicit) return { config: defaultConfig(), warnings: [] };
    if (code === 'ENOENT') throw new ConfigError(`config file ${path} does not exist`);
    throw new ConfigError(`cannot read config file ${path}: ${code ?? (err instanceof Error ? err.message : String(err))}`);
  }
  return parseConfig(text, path);
}

type Table = Record<string, unknown>;

function isTable(v: unknown): v is Table {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Date);
}

/** TOML key path as a user would write it: bare keys joined by dots, others quoted. */
function keyPath(parts: readonly string[]): string {
  return parts.map((p) => (/^[A-Za-z0-9_-]+$/.test(p) ? p : JSON.stringify(p))).join('.');
}

function describe(v: unknown): string {
  if (Array.isArray(v)) return 'an array';
  if (v instanceof Date || (typeof v === 'object' && v !== null && 'toISOString' in v)) return 'a date';
  if (isTable(v)) return 'a table';
  if (typeof v === 'number') return Number.isInteger(v) ? 'an integer' : 'a float';
  return `a ${typeof v}`;
}

function checkType(v: unknown, type: KeyType, source: string, path: string): void {
  const ok = type === 'boolean' ? typeof v === 'boolean' : type === 'string' ? typeof v === 'string' : typeof v === 'number' && Number.isInteger(v);
  if (!ok) throw new ConfigError(`${source}: ${path} must be ${type === 'integer' ? 'an integer' : `a ${type}`}, got ${describe(v)}`);
}

/** Parses config TOML text; `source` names the file in messages. */
export function parseConfig(text: string, source = 'config'): LoadedConfig {
  let doc: Table;
  try {
    doc = parseToml(text, { unsafeKeyBehaviour: 'throw' });
  } catch (err) {
    const where = err instanceof TomlError ? ` at line ${err.line}, column ${err.column}` : '';
    const first = err instanceof Error ? (err.message.split('\n')[0] ?? '') : String(err);
    throw new ConfigError(`${source}: invalid TOML${where}: ${first}`);
  }

  const warnings: string[] = [];
  const values = new Map<string, unknown>();
  let mirrors: Record<string, ConfigMirror[]> = {};
  const ignored = (path: string, extra = ''): void => {
    warnings.push(`${source}: config key ${path} is not implemented yet, ignored${extra}`);
  };
  const takeKey = (spec: KeySpec | undefined, value: unknown, parts: string[]): void => {
    const path = keyPath(parts);
    if (spec === undefined) throw new ConfigError(`${source}: unknown config key ${path}`);
    checkType(value, spec.type, source, path);
    if (spec.implemented) values.set(parts.join('.'), value);
    else ignored(path);
  };

  for (const [key, value] of Object.entries(doc)) {
    const tableSpec = TABLE_KEYS[key];
    if (tableSpec !== undefined) {
      if (!isTable(value)) throw new ConfigError(`${source}: ${keyPath([key])} must be a table, got ${describe(value)}`);
      for (const [sub, subValue] of Object.entries(value)) {
        if (key === 'resolver' && sub === 'host') {
          mirrors = parseResolverHosts(subValue, source);
          continue;
        }
        takeKey(tableSpec[sub], subValue, [key, sub]);
      }
      continue;
    }
    takeKey(TOP_LEVEL_KEYS[key], value, [key]);
  }

  const get = <T>(path: string): T | undefined => values.get(path) as T | undefined;
  const nonNegative = (path: string, dflt: number): number => {
    const v = get<number>(path);
    if (v === undefined || v === 0) return dflt;
    if (v < 0) throw new ConfigError(`${source}: ${path} must not be negative, got ${v}`);
    return v;
  };
  const atMost = (path: string, v: number, max: number): number => {
    if (v > max) throw new ConfigError(`${source}: ${path} must be at most ${max}, got ${v}`);
    return v;
  };
  const d = defaultConfig();
  const requestTimeout = get<number>('resolver.request_timeout_sec');
  const config: Config = {
    noPrefetch: get<boolean>('noprefetch') ?? d.noPrefetch,
    noBackgroundFetch: get<boolean>('no_background_fetch') ?? d.noBackgroundFetch,
    copyFetchedLayers: get<boolean>('copy_fetched_layers') ?? d.copyFetchedLayers,
    prefetchTimeoutSec: nonNegative('prefetch_timeout_sec', d.prefetchTimeoutSec),
    prefetchSizeBytes: nonNegative('prefetch_size', d.prefetchSizeBytes),
    disableVerification: get<boolean>('disable_verification') ?? d.disableVerification,
    allowNoVerification: get<boolean>('allow_no_verification') ?? d.allowNoVerification,
    metricsAddress: get<string>('metrics_address') ?? d.metricsAddress,
    fuse: {
      attrTimeoutSec: nonNegative('fuse.attr_timeout', d.fuse.attrTimeoutSec),
      entryTimeoutSec: nonNegative('fuse.entry_timeout', d.fuse.entryTimeoutSec),
    },
    cache: {
      // Ours, so not bound by the reference's rule: 0 means no memory tier (reads go to disk or registry).
      memoryMaxBytes: get<number>('cache.memory_max_bytes') === 0 ? 0 : nonNegative('cache.memory_max_bytes', d.cache.memoryMaxBytes),
      diskMaxBytes: nonNegative('cache.disk_max_bytes', d.cache.diskMaxBytes),
    },
    maxConcurrency: nonNegative('max_concurrency', d.maxConcurrency),
    // Ours: 0 is no quiet period, not the default.
    backgroundFetchQuietMs:
      get<number>('background_fetch_quiet_msec') === 0 ? 0 : nonNegative('background_fetch_quiet_msec', d.backgroundFetchQuietMs),
    // Reference: 0 -> default, negative -> no timeout (kept negative; consumers treat <= 0 as "none").
    resolver: { requestTimeoutSec: requestTimeout === undefined || requestTimeout === 0 ? d.resolver.requestTimeoutSec : requestTimeout, mirrors },
    blob: {
      fetchingTimeoutSec: nonNegative('blob.fetching_timeout_sec', d.blob.fetchingTimeoutSec),
      maxRetries: nonNegative('blob.max_retries', d.blob.maxRetries),
      minWaitMs: nonNegative('blob.min_wait_msec', d.blob.minWaitMs),
      maxWaitMs: nonNegative('blob.max_wait_msec', d.blob.maxWaitMs),
      forceSingleRangeMode: get<boolean>('blob.force_single_range_mode') ?? d.blob.forceSingleRangeMode,
      chunkSizeBytes: atMost('blob.chunk_size', nonNegative('blob.chunk_size', d.blob.chunkSizeBytes), MAX_BLOB_CHUNK_BYTES),
      parallelFetchConcurrency: nonNegative('blob.parallel_fetch_concurrency', d.blob.parallelFetchConcurrency),
      parallelFetchChunkBytes: nonNegative('blob.parallel_fetch_chunk_size', d.blob.parallelFetchChunkBytes),
    },
    prefetchProfile: {
      record: get<boolean>('prefetch_profile.record') ?? d.prefetchProfile.record,
      replay: get<boolean>('prefetch_profile.replay') ?? d.prefetchProfile.replay,
      quietMs: nonNegative('prefetch_profile.quiet_msec', d.prefetchProfile.quietMs),
      maxWindowSec: nonNegative('prefetch_profile.max_window_sec', d.prefetchProfile.maxWindowSec),
      maxChunks: atMost('prefetch_profile.max_chunks', nonNegative('prefetch_profile.max_chunks', d.prefetchProfile.maxChunks), MAX_PROFILE_CHUNKS),
      fetchTimeoutMs: nonNegative('prefetch_profile.fetch_timeout_msec', d.prefetchProfile.fetchTimeoutMs),
    },
    fuseManager: { enable: get<boolean>('fuse_manager.enable') ?? d.fuseManager.enable },
    criKeychain: {
      enableKeychain: get<boolean>('cri_keychain.enable_keychain') ?? d.criKeychain.enableKeychain,
      imageServicePath: get<string>('cri_keychain.image_service_path') || d.criKeychain.imageServicePath,
      listenPath: get<string>('cri_keychain.listen_path') ?? d.criKeychain.listenPath,
    },
    kubeconfigKeychain: {
      enableKeychain: get<boolean>('kubeconfig_keychain.enable_keychain') ?? d.kubeconfigKeychain.enableKeychain,
      kubeconfigPath: get<string>('kubeconfig_keychain.kubeconfig_path') ?? d.kubeconfigKeychain.kubeconfigPath,
    },
  };
  return { config, warnings };
}

/** `[[resolver.host."<registry>".mirrors]]`: checked for shape and types; mirrors by registry. */
function parseResolverHosts(value: unknown, source: string): Record<string, ConfigMirror[]> {
  const out: Record<string, ConfigMirror[]> = {};
  const base = ['resolver', 'host'];
  if (!isTable(value)) throw new ConfigError(`${source}: ${keyPath(base)} must be a table of registries, got ${describe(value)}`);
  for (const [registry, entry] of Object.entries(value)) {
    const at = [...base, registry];
    if (!isTable(entry)) throw new ConfigError(`${source}: ${keyPath(at)} must be a table, got ${describe(entry)}`);
    for (const [key, mirrors] of Object.entries(entry)) {
      if (key !== 'mirrors') throw new ConfigError(`${source}: unknown config key ${keyPath([...at, key])}`);
      if (!Array.isArray(mirrors)) throw new ConfigError(`${source}: ${keyPath([...at, key])} must be an array of tables ([[...mirrors]]), got ${describe(mirrors)}`);
      out[registry] = mirrors.map((mirror: unknown, i: number): ConfigMirror => {
        const mpath = `${keyPath([...at, key])}[${i}]`;
        if (!isTable(mirror)) throw new ConfigError(`${source}: ${mpath} must be a table, got ${describe(mirror)}`);
        let headers: Record<string, string[]> = {};
        for (const [mk, mv] of Object.entries(mirror)) {
          const type = MIRROR_KEYS[mk];
          const path = `${mpath}.${keyPath([mk])}`;
          if (type === undefined) throw new ConfigError(`${source}: unknown config key ${path}`);
          if (type !== 'header') {
            checkType(mv, type, source, path);
            continue;
          }
          headers = parseHeaderTable(mv, (name, why) => new ConfigError(`${source}: ${path}${name === undefined ? '' : `.${keyPath([name])}`} ${why}`));
        }
        if (typeof mirror.host !== 'string' || mirror.host === '') throw new ConfigError(`${source}: ${mpath}.host must be set`);
        // The reference's key is a bare host[:port]; `https://m.example` or a path would make a nonsense URL.
        if (!/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$/.test(mirror.host)) {
          throw new ConfigError(`${source}: ${mpath}.host must be host[:port] (no scheme, path or user), got ${JSON.stringify(mirror.host)}`);
        }
        return {
          host: mirror.host,
          insecure: mirror.insecure === true,
          requestTimeoutSec: typeof mirror.request_timeout_sec === 'number' ? mirror.request_timeout_sec : 0,
          headers,
        };
      });
    }
  }
  return out;
}
