/**
 * Every key the config file may hold: the reference's keys (containerd-stargz-grpc config.toml, research notes
 * §4.2) plus our own. Keys we implement are read into Config; the reference's other keys are accepted so an
 * existing config.toml keeps working, with one warning each; anything else is an error, so typos surface.
 */

export type KeyType = 'boolean' | 'integer' | 'string';

export interface KeySpec {
  readonly type: KeyType;
  /** False: a reference key we accept but do not act on yet (warned about, then ignored). */
  readonly implemented: boolean;
}

const on = (type: KeyType): KeySpec => ({ type, implemented: true });
const off = (type: KeyType): KeySpec => ({ type, implemented: false });

/** Keys at the top level of the file. */
export const TOP_LEVEL_KEYS: Readonly<Record<string, KeySpec>> = {
  noprefetch: on('boolean'),
  no_background_fetch: on('boolean'),
  // Ours: fully fetched layers are copied to local disk for the containers created after that.
  copy_fetched_layers: on('boolean'),
  // Ours: how long the layers must have been quiet (no fetching reads, no mount) before background fetch goes on.
  background_fetch_quiet_msec: on('integer'),
  prefetch_timeout_sec: on('integer'),
  prefetch_size: on('integer'),
  disable_verification: on('boolean'),
  allow_no_verification: on('boolean'),
  metrics_address: on('string'),

  http_cache_type: off('string'),
  filesystem_cache_type: off('string'),
  resolve_result_entry_ttl_sec: off('integer'),
  resolve_result_entry: off('integer'),
  prefetch_async_size: off('integer'),
  debug: off('boolean'),
  max_concurrency: on('integer'),
  no_prometheus: off('boolean'),
  log_file_access: off('boolean'),
  debug_address: off('string'),
  ipfs: off('boolean'),
  metadata_store: off('string'),
};

/** `[table]` -> its keys. `resolver.host` is not here: its shape is checked by config.ts. */
export const TABLE_KEYS: Readonly<Record<string, Readonly<Record<string, KeySpec>>>> = {
  fuse: {
    attr_timeout: on('integer'),
    entry_timeout: on('integer'),
    passthrough: off('boolean'),
    merge_buffer_size: off('integer'),
    merge_worker_count: off('integer'),
  },
  cache: {
    // Ours: the bound of the in-memory chunk cache.
    memory_max_bytes: on('integer'),
    // Ours: the cap on the disk chunk cache.
    disk_max_bytes: on('integer'),
  },
  resolver: {
    request_timeout_sec: on('integer'),
  },
  blob: {
    fetching_timeout_sec: on('integer'),
    valid_interval: off('integer'),
    check_always: off('boolean'),
    chunk_size: on('integer'),
    force_single_range_mode: on('boolean'),
    prefetch_chunk_size: off('integer'),
    max_retries: on('integer'),
    min_wait_msec: on('integer'),
    max_wait_msec: on('integer'),
    // Ours: whole-blob fetch in parallel ranges (layers rpull downloads, background fetch).
    parallel_fetch_concurrency: on('integer'),
    parallel_fetch_chunk_size: on('integer'),
  },
  directory_cache: {
    max_lru_cache_entry: off('integer'),
    max_cache_fds: off('integer'),
    sync_add: off('boolean'),
    direct: off('boolean'),
    fadv_dontneed: off('boolean'),
  },
  kubeconfig_keychain: {
    enable_keychain: on('boolean'),
    kubeconfig_path: on('string'),
  },
  cri_keychain: {
    enable_keychain: on('boolean'),
    image_service_path: on('string'),
    listen_path: on('string'),
  },
  snapshotter: {
    allow_invalid_mounts_on_restart: off('boolean'),
  },
  // Ours: prefetch profiles learned from containers' starts (layer/profile-recorder.ts).
  prefetch_profile: {
    record: on('boolean'),
    replay: on('boolean'),
    quiet_msec: on('integer'),
    max_window_sec: on('integer'),
    max_chunks: on('integer'),
    fetch_timeout_msec: on('integer'),
  },
  fuse_manager: {
    enable: on('boolean'),
    address: off('string'),
    path: off('string'),
    metrics_address: off('string'),
  },
};

/** `[[resolver.host."<registry>".mirrors]]` entry keys (used for registries without a hosts.toml). */
export const MIRROR_KEYS: Readonly<Record<string, KeyType | 'header'>> = {
  host: 'string',
  insecure: 'boolean',
  request_timeout_sec: 'integer',
  header: 'header',
};
