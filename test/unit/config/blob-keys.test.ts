/** The [blob] retry, range-mode and parallel-fetch keys, and how they reach RegistryClient options. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { defaultConfig, parseConfig } from '../../../src/config/config';
import { registryOptionsFromConfig } from '../../../src/remote/registry-config';

describe('[blob] retry and fetch keys', () => {
  it('defaults are the reference values (ours for parallel fetch)', () => {
    const b = defaultConfig().blob;
    assert.equal(b.maxRetries, 5);
    assert.equal(b.minWaitMs, 30);
    assert.equal(b.maxWaitMs, 300_000);
    assert.equal(b.forceSingleRangeMode, false);
    assert.equal(b.chunkSizeBytes, 50_000);
    assert.equal(b.parallelFetchConcurrency, 8);
    assert.equal(b.parallelFetchChunkBytes, 8 * 1024 * 1024);
  });

  it('are read without warnings; 0 means the default; negatives are refused', () => {
    const { config, warnings } = parseConfig(
      '[blob]\nmax_retries = 2\nmin_wait_msec = 50\nmax_wait_msec = 1000\nforce_single_range_mode = true\nchunk_size = 65536\nparallel_fetch_concurrency = 4\nparallel_fetch_chunk_size = 1048576\nfetching_timeout_sec = 20\n',
    );
    assert.deepEqual(warnings, []);
    assert.deepEqual(config.blob, {
      fetchingTimeoutSec: 20,
      maxRetries: 2,
      minWaitMs: 50,
      maxWaitMs: 1000,
      forceSingleRangeMode: true,
      chunkSizeBytes: 65536,
      parallelFetchConcurrency: 4,
      parallelFetchChunkBytes: 1048576,
    });
    assert.equal(parseConfig('[blob]\nmax_retries = 0\n').config.blob.maxRetries, 5);
    assert.equal(parseConfig('[blob]\nchunk_size = 0\n').config.blob.chunkSizeBytes, 50_000, 'as the reference: 0 is its default');
    assert.throws(() => parseConfig('[blob]\nchunk_size = 1073741824\n'), /blob\.chunk_size must be at most 16777216/);
    assert.throws(() => parseConfig('[blob]\nmax_retries = -1\n'), /must not be negative/);
    assert.throws(() => parseConfig('[blob]\nforce_single_range_mode = 1\n'), /must be a boolean/);

    const opts = registryOptionsFromConfig(config);
    assert.deepEqual(opts, {
      configMirrors: {},
      requestTimeoutMs: 30_000,
      fetchTimeoutMs: 20_000,
      retry: { maxRetries: 2, minWaitMs: 50, maxWaitMs: 1000 },
      forceSingleRangeMode: true,
      parallelFetch: { concurrency: 4, chunkBytes: 1048576 },
    });
  });
});
