/**
 * The RegistryClient options that come from the daemon's config file:
 *
 *   new RegistryClient({ hostsDir, log, ...registryOptionsFromConfig(config) })
 */
import type { BlobConfig, ResolverConfig } from '../config/config';
import type { RegistryClientOptions } from './registry-client';

/** The parts of Config that concern registry access. */
export interface RegistryConfigSubset {
  readonly resolver: ResolverConfig;
  readonly blob: BlobConfig;
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
