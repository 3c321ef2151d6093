import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it, test } from 'node:test';
import { type Config, defaultConfig, loadConfig, MAX_PROFILE_CHUNKS, parseConfig } from '../../../src/config/config';
import { ConfigError } from '../../../src/errors';
import { MAX_PROFILE_ENTRIES } from '../../../src/profile/profile-format';

type DeepPartial<T> = { [K in keyof T]?: T[K] extends object ? DeepPartial<T[K]> : T[K] };

function merged(over: DeepPartial<Config>): Config {
  const d = defaultConfig();
  return {
    ...d,
    ...over,
    fuse: { ...d.fuse, ...over.fuse },
    cache: { ...d.cache, ...over.cache },
    resolver: { ...d.resolver, ...over.resolver },
    blob: { ...d.blob, ...over.blob },
    prefetchProfile: { ...d.prefetchProfile, ...over.prefetchProfile },
  } as Config;
}

describe('config defaults', () => {
  it('match the reference', () => {
    assert.deepEqual(defaultConfig(), {
      noPrefetch: false,
      noBackgroundFetch: false,
      copyFetchedLayers: true,
      prefetchTimeoutSec: 10,
      prefetchSizeBytes: 0,
      disableVerification: false,
      allowNoVerification: false,
      metricsAddress: '',
      fuse: { attrTimeoutSec: 3600, entryTimeoutSec: 3600 },
      cache: { memoryMaxBytes: 268435456, diskMaxBytes: 10737418240 },
      maxConcurrency: 2,
      backgroundFetchQuietMs: 5000,
      resolver: { requestTimeoutSec: 30, mirrors: {} },
      blob: {
        fetchingTimeoutSec: 300,
        maxRetries: 5,
        minWaitMs: 30,
        maxWaitMs: 300000,
        forceSingleRangeMode: false,
        chunkSizeBytes: 50_000,
        parallelFetchConcurrency: 8,
        parallelFetchChunkBytes: 8388608,
      },
      prefetchProfile: { record: true, replay: true, quietMs: 3000, maxWindowSec: 60, maxChunks: 16384, fetchTimeoutMs: 500 },
      fuseManager: { enable: true },
      criKeychain: { enableKeychain: false, imageServicePath: '/run/containerd/containerd.sock', listenPath: '' },
      kubeconfigKeychain: { enableKeychain: false, kubeconfigPath: '' },
    });
  });
});

test('[prefetch_profile] max_chunks is capped at what a profile file may hold', () => {
  assert.equal(MAX_PROFILE_CHUNKS, MAX_PROFILE_ENTRIES);
});

describe('parseConfig: good configs', () => {
  const good: [string, string, DeepPartial<Config>, RegExp[]][] = [
    ['empty', '', {}, []],
    ['comments only', '# nothing\n', {}, []],
    [
      'implemented keys',
      `noprefetch = true
no_background_fetch = true
copy_fetched_layers = false
prefetch_timeout_sec = 20
prefetch_size = 1048576
disable_verification = true
allow_no_verification = true
metrics_address = "127.0.0.1:8234"
[fuse]
attr_timeout = 3600
entry_timeout = 60
[cache]
memory_max_bytes = 1024
[resolver]
request_timeout_sec = 5
[blob]
fetching_timeout_sec = 60
`,
      {
        noPrefetch: true,
        noBackgroundFetch: true,
        copyFetchedLayers: false,
        prefetchTimeoutSec: 20,
        prefetchSizeBytes: 1048576,
        disableVerification: true,
        allowNoVerification: true,
        metricsAddress: '127.0.0.1:8234',
        fuse: { attrTimeoutSec: 3600, entryTimeoutSec: 60 },
        cache: { memoryMaxBytes: 1024 },
        resolver: { requestTimeoutSec: 5 },
        blob: { fetchingTimeoutSec: 60 },
      },
      [],
    ],
    [
      'zero means default, like the reference',
      'prefetch_timeout_sec = 0\n[fuse]\nattr_timeout = 0\n[resolver]\nrequest_timeout_sec = 0\n[blob]\nfetching_timeout_sec = 0\n',
      {},
      [],
    ],
    ['memory_max_bytes = 0 turns the memory tier off (not the default)', '[cache]\nmemory_max_bytes = 0\n', { cache: { memoryMaxBytes: 0 } }, []],
    ['background_fetch_quiet_msec', 'background_fetch_quiet_msec = 1500\n', { backgroundFetchQuietMs: 1500 }, []],
    [
      '[prefetch_profile] keys; 0 means the default',
      '[prefetch_profile]\nrecord = false\nreplay = false\nquiet_msec = 500\nmax_window_sec = 0\nmax_chunks = 100\nfetch_timeout_msec = 250\n',
      { prefetchProfile: { record: false, replay: false, quietMs: 500, maxWindowSec: 60, maxChunks: 100, fetchTimeoutMs: 250 } },
      [],
    ],
    ['background_fetch_quiet_msec = 0 waits only while reads fetch (not the default)', 'background_fetch_quiet_msec = 0\n', { backgroundFetchQuietMs: 0 }, []],
    ['negative request timeout means none', '[resolver]\nrequest_timeout_sec = -1\n', { resolver: { requestTimeoutSec: -1 } }, []],
    [
      'keychain keys',
      '[cri_keychain]\nenable_keychain = true\nimage_service_path = "/run/k3s/containerd.sock"\nlisten_path = "/run/stargaze/cri.sock"\n' +
        '[kubeconfig_keychain]\nenable_keychain = true\nkubeconfig_path = "/etc/kubernetes/kubelet.conf"\n',
      {
        criKeychain: { enableKeychain: true, imageServicePath: '/run/k3s/containerd.sock', listenPath: '/run/stargaze/cri.sock' },
        kubeconfigKeychain: { enableKeychain: true, kubeconfigPath: '/etc/kubernetes/kubelet.conf' },
      },
      [],
    ],
    [
      'reference keys not implemented are warned about once each',
      `http_cache_type = "memory"
filesystem_cache_type = "memory"
resolve_result_entry_ttl_sec = 60
max_concurrency = 4
debug = true
metadata_store = "db"
[blob]
check_always = true
[directory_cache]
direct = false
[kubeconfig_keychain]
enable_keychain = true
kubeconfig_path = "/k"
[cri_keychain]
enable_keychain = true
image_service_path = "/run/containerd/containerd.sock"
[snapshotter]
allow_invalid_mounts_on_restart = true
[fuse_manager]
enable = true
address = "/run/x.sock"
[fuse]
passthrough = true
[[resolver.host."docker.io".mirrors]]
host = "mirror.gcr.io"
insecure = false
request_timeout_sec = 3
header = { "X-A" = "1", "X-B" = ["2", "3"] }
[[resolver.host."docker.io".mirrors]]
host = "127.0.0.1:5000"
`,
      {
        maxConcurrency: 4,
        kubeconfigKeychain: { enableKeychain: true, kubeconfigPath: '/k' },
        criKeychain: { enableKeychain: true, imageServicePath: '/run/containerd/containerd.sock', listenPath: '' },
        resolver: {
          requestTimeoutSec: 30,
          mirrors: {
            'docker.io': [
              { host: 'mirror.gcr.io', insecure: false, requestTimeoutSec: 3, headers: { 'x-a': ['1'], 'x-b': ['2', '3'] } },
              { host: '127.0.0.1:5000', insecure: false, requestTimeoutSec: 0, headers: {} },
            ],
          },
        },
      },
      [
        /http_cache_type/,
        /filesystem_cache_type/,
        /resolve_result_entry_ttl_sec/,
        /debug/,
        /metadata_store/,
        /blob\.check_always/,
        /directory_cache\.direct/,
        /snapshotter\.allow_invalid_mounts_on_restart/,
        /fuse_manager\.address/,
        /fuse\.passthrough/,
      ],
    ],
  ];
  for (const [name, text, want, warnings] of good) {
    it(name, () => {
      const got = parseConfig(text, 'test.toml');
      assert.deepEqual(got.config, merged(want));
      assert.equal(got.warnings.length, warnings.length, got.warnings.join('\n'));
      warnings.forEach((re, i) => {
        assert.match(got.warnings[i] ?? '', re);
        assert.match(got.warnings[i] ?? '', /not implemented yet, ignored/);
      });
    });
  }
});

describe('parseConfig: bad configs', () => {
  const bad: [string, string, RegExp][] = [
    ['unknown top-level key', 'noprefech = true', /unknown config key noprefech/],
    ['unknown table key', '[fuse]\nattr_timout = 3', /unknown config key fuse\.attr_timout/],
    ['unknown table', '[fusee]\nx = 1', /unknown config key fusee/],
    ['string for bool', 'noprefetch = "true"', /noprefetch must be a boolean, got a string/],
    ['float for int', 'prefetch_size = 1.5', /prefetch_size must be an integer, got a float/],
    ['bool for int in table', '[blob]\nfetching_timeout_sec = true', /blob\.fetching_timeout_sec must be an integer, got a boolean/],
    ['int for string', 'metrics_address = 8080', /metrics_address must be a string, got an integer/],
    ['wrong type for ignored key', '[blob]\ncheck_always = "yes"', /blob\.check_always must be a boolean/],
    ['wrong type for chunk_size', '[blob]\nchunk_size = "big"', /blob\.chunk_size must be an integer/],
    ['prefetch_profile.max_chunks past what a profile holds', '[prefetch_profile]\nmax_chunks = 65537', /prefetch_profile\.max_chunks must be at most 65536/],
    ['negative prefetch_profile.quiet_msec', '[prefetch_profile]\nquiet_msec = -1', /prefetch_profile\.quiet_msec must not be negative/],
    ['table as value', 'fuse = 3', /fuse must be a table/],
    ['negative size', 'prefetch_size = -1', /prefetch_size must not be negative/],
    ['negative timeout', '[fuse]\nentry_timeout = -5', /fuse\.entry_timeout must not be negative/],
    ['date', 'metrics_address = 1979-05-27', /must be a string, got a date/],
    ['bad mirror key', '[[resolver.host."docker.io".mirrors]]\nhots = "x"', /unknown config key resolver\.host\."docker\.io"\.mirrors\[0\]\.hots/],
    ['bad mirror type', '[[resolver.host."docker.io".mirrors]]\ninsecure = "no"', /mirrors\[0\]\.insecure must be a boolean/],
    ['bad mirror header', '[[resolver.host."r".mirrors]]\nheader = { a = 1 }', /mirrors\[0\]\.header\.a must be a string or an array of strings/],
    ['mirror without host', '[[resolver.host."r".mirrors]]\ninsecure = true', /mirrors\[0\]\.host must be set/],
    ['mirror host with a scheme', '[[resolver.host."r".mirrors]]\nhost = "https://m.example"', /mirrors\[0\]\.host must be host\[:port\]/],
    ['mirror header name not a token', '[[resolver.host."r".mirrors]]\nhost = "m.example"\nheader = { "a b" = "x" }', /header\."a b" is not a valid header name/],
    ['mirror header not a table', '[[resolver.host."r".mirrors]]\nhost = "m.example"\nheader = "x"', /mirrors\[0\]\.header must be a table/],
    ['mirror header with a newline', '[[resolver.host."r".mirrors]]\nhost = "m.example"\nheader = { a = "x\\r\\nb: y" }', /header\.a holds a control character/],
    ['bad resolver.host entry', '[resolver.host."r"]\nfoo = 1', /unknown config key resolver\.host\.r\.foo/],
    ['syntax error', 'noprefetch = ', /test\.toml: invalid TOML at line 1/],
    ['duplicate key', 'noprefetch = true\nnoprefetch = false', /invalid TOML/],
  ];
  for (const [name, text, re] of bad) {
    it(name, () => {
      assert.throws(
        () => parseConfig(text, 'test.toml'),
        (err: unknown) => {
          assert.ok(err instanceof ConfigError, `want ConfigError, got ${String(err)}`);
          assert.match(err.message, re);
          return true;
        },
      );
    });
  }
});

describe('loadConfig', () => {
  let dir = '';
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stargaze-config-'));
  });
  after(() => rm(dir, { recursive: true, force: true }));

  it('a missing default file gives the defaults', async () => {
    assert.deepEqual(await loadConfig(join(dir, 'none.toml'), { explicit: false }), { config: defaultConfig(), warnings: [] });
  });

  it('a missing explicit file is an error', async () => {
    await assert.rejects(loadConfig(join(dir, 'none.toml'), { explicit: true }), (err: unknown) => err instanceof ConfigError && /none\.toml/.test(err.message));
  });

  it('an empty file gives the defaults', async () => {
    const file = join(dir, 'empty.toml');
    await writeFile(file, '');
    assert.deepEqual(await loadConfig(file, { explicit: true }), { config: defaultConfig(), warnings: [] });
  });

  it('reads a file and names it in errors', async () => {
    const file = join(dir, 'c.toml');
    await writeFile(file, 'noprefetch = true\nipfs = true\n');
    const { config, warnings } = await loadConfig(file, { explicit: true });
    assert.equal(config.noPrefetch, true);
    assert.equal(warnings.length, 1);
    assert.match(warnings[0] ?? '', /c\.toml: config key ipfs is not implemented yet, ignored/);
    await writeFile(file, 'bogus = 1\n');
    await assert.rejects(loadConfig(file, { explicit: false }), (err: unknown) => err instanceof ConfigError && err.message.includes(file));
  });

  it('a directory is an error even when not explicit', async () => {
    await assert.rejects(loadConfig(dir, { explicit: false }), ConfigError);
  });
});
