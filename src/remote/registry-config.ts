/**
 * The RegistryClient options that come from the daemon's config file. Structural types, so remote/ does not
 * depend on config/: pass the loaded Config.
 *
 *   new RegistryClient({ hostsDir, log, ...registryOptionsFromConfig(config) })
 */
import type { ConfigMirror } from './hosts';
import type { RegistryClientOptions } from './registry-client';

export interface RegistryConfigSubset {
  readonly resolver: { readonly requestTimeoutSec: number; readonly mirrors?: Readonly<Record<string, readonly ConfigMirror[]>> };
  readonly blob: {
    readonly fetchingTimeoutSec: number;
    readonly maxRetries: number;
    readonly minWaitMs: number;
    readonly maxWaitMs: number;
    readonly forceSingleRangeMode: boolean;
    readonly parallelFetchConcurrency: number;
    readonly parallelFetchChunkBytes: number;
  };
}

export function registryOptionsFromConfig(config: RegistryConfigSubset): Pick<
  RegistryClientOptions,
  'requestTimeoutMs' | 'fetchTimeoutMs' | 'retry' | 'forceSingleRangeMode' | 'parallelFetch' | 'configMirrors'
> {
  return {
    configMirrors: config.resolver.mirrors,
    requestTimeoutMs: config.resolver.requestTimeoutSec * 1000,
    fetchTimeoutMs: config.blob.fetchingTimeoutSec * 1000,
    retry: { maxRetries: config.blob.maxRetries, minWaitMs: config.blob.minWaitMs, maxWaitMs: config.blob.maxWaitMs },
    forceSingleRangeMode: config.blob.forceSingleRangeMode,
    parallelFetch: { concurrency: config.blob.parallelFetchConcurrency, chunkBytes: config.blob.parallelFetchChunkBytes },
  };
}
