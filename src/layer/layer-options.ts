/**
 * What a layer reads of the config: one typed slice, built in one place (layerOptionsFromConfig), so the
 * layer's code never sees the whole Config and a test states exactly the settings it depends on.
 */
import type { Config } from '../config/config';

/**
 * How long a layer opened ahead of its mount (pre-open.ts) is kept for it. rpull Prepares the layers of an
 * image one after the other within seconds; an image whose later layers are never prepared must not pin their
 * TOCs for long.
 */
export const PRE_OPEN_TTL_MS = 60_000;

export interface LayerOptions {
  /** `noprefetch`: nothing is prefetched at mount. */
  readonly noPrefetch: boolean;
  /** `prefetch_size`: bytes prefetched when the layer has no landmark and no label says. */
  readonly prefetchSizeBytes: number;
  /** `no_background_fetch`: the rest of a layer is fetched only as it is read. */
  readonly noBackgroundFetch: boolean;
  /** `background_fetch_quiet_msec`: background fetch waits for this long without reads or mounts. */
  readonly backgroundFetchQuietMs: number;
  /** `copy_fetched_layers`: a fetched layer that passed its chainID check is copied beside its mount. */
  readonly copyFetchedLayers: boolean;
  /** `disable_verification`: no TOC, chunk or chainID check. */
  readonly disableVerification: boolean;
  /** `allow_no_verification`: the skipverify label may mount a layer that has no toc.digest label. */
  readonly allowNoVerification: boolean;
  /** `[blob] parallel_fetch_concurrency` and `parallel_fetch_chunk_size`: how a long range is split. */
  readonly parallelFetch: { readonly concurrency: number; readonly chunkBytes: number };
  /** `[blob] chunk_size`: a missed chunk is fetched as the whole blocks of this size its member touches. */
  readonly blockBytes: number;
  /** `[cache] memory_max_bytes`: decompressed chunks kept in memory, all layers together; 0: none. */
  readonly memoryCacheBytes: number;
  /** `[prefetch_profile]`: record start windows, replay stored profiles (profile-recorder.ts, layer-profile.ts). */
  readonly profile: {
    readonly record: boolean;
    readonly replay: boolean;
    readonly quietMs: number;
    readonly maxWindowMs: number;
    readonly maxChunks: number;
    /** `fetch_timeout_msec`: the wait for a profile pushed to the registry (profile-fetch.ts). */
    readonly fetchTimeoutMs: number;
  };
  /** How long a layer opened ahead of its mount waits for it (PRE_OPEN_TTL_MS). */
  readonly preOpenTtlMs: number;
}

export function layerOptionsFromConfig(config: Config): LayerOptions {
  return {
    noPrefetch: config.noPrefetch,
    prefetchSizeBytes: config.prefetchSizeBytes,
    noBackgroundFetch: config.noBackgroundFetch,
    backgroundFetchQuietMs: config.backgroundFetchQuietMs,
    copyFetchedLayers: config.copyFetchedLayers,
    disableVerification: config.disableVerification,
    allowNoVerification: config.allowNoVerification,
    parallelFetch: { concurrency: config.blob.parallelFetchConcurrency, chunkBytes: config.blob.parallelFetchChunkBytes },
    blockBytes: config.blob.chunkSizeBytes,
    memoryCacheBytes: config.cache.memoryMaxBytes,
    profile: {
      record: config.prefetchProfile.record,
      replay: config.prefetchProfile.replay,
      quietMs: config.prefetchProfile.quietMs,
      maxWindowMs: config.prefetchProfile.maxWindowSec * 1000,
      maxChunks: config.prefetchProfile.maxChunks,
      fetchTimeoutMs: config.prefetchProfile.fetchTimeoutMs,
    },
    preOpenTtlMs: PRE_OPEN_TTL_MS,
  };
}
