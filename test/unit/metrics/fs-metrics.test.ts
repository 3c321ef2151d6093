import assert from 'node:assert/strict';
import type { AddressInfo } from 'node:net';
import { test } from 'node:test';
import pino from 'pino';
import { FsMetrics, serveMetrics } from '../../../src/metrics/fs-metrics';

const quiet = pino({ level: 'silent' });
const promClientLoaded = (): boolean => Object.keys(require.cache).some((file) => file.includes('/node_modules/prom-client/'));

test('durations and integrity failures recorded before the metrics are served are scraped as prom-client histograms and counters', async () => {
  const layer = { digest: 'sha256:aa', mountpoint: '/mnt/a', sizeBytes: 10, fetchedBytes: 4, prefetchBytes: 0, reads: 3, bytesServed: 7, readErrors: 0, memoryCacheHits: 1, memoryCacheMisses: 2 };
  const metrics = new FsMetrics(() => [layer], () => undefined);
  metrics.observe('mount', 'sha256:aa', 1); // on a bound: counted in le="1"
  metrics.observe('mount', 'sha256:aa', 3);
  metrics.observe('mount', 'sha256:aa', 20_000); // past the last bound: +Inf only
  metrics.observe('prefetch_total', 'sha256:aa', 0.5);
  metrics.integrityFailure('sha256:aa');
  metrics.integrityFailure('sha256:aa');
  // recording alone loads nothing: a process that never serves the metrics never loads prom-client
  assert.equal(promClientLoaded(), false);

  const server = await serveMetrics(metrics, '127.0.0.1:0', quiet);
  try {
    assert.equal(promClientLoaded(), true);
    const { port } = server.address() as AddressInfo;
    const res = await fetch(`http://127.0.0.1:${port}/metrics`);
    assert.match(res.headers.get('content-type') ?? '', /^text\/plain/);
    const text = await res.text();
    const name = 'stargz_fs_operation_duration_milliseconds';
    const mount = 'operation_type="mount",layer="sha256:aa"';
    assert.match(text, new RegExp(`^# TYPE ${name} histogram$`, 'm'));
    assert.match(text, new RegExp(`^${name}_bucket\\{${mount},le="1"\\} 1$`, 'm'));
    assert.match(text, new RegExp(`^${name}_bucket\\{${mount},le="2"\\} 1$`, 'm'));
    assert.match(text, new RegExp(`^${name}_bucket\\{${mount},le="4"\\} 2$`, 'm'));
    assert.match(text, new RegExp(`^${name}_bucket\\{${mount},le="16384"\\} 2$`, 'm'));
    assert.match(text, new RegExp(`^${name}_bucket\\{${mount},le="\\+Inf"\\} 3$`, 'm'));
    assert.match(text, new RegExp(`^${name}_sum\\{${mount}\\} 20004$`, 'm'));
    assert.match(text, new RegExp(`^${name}_count\\{${mount}\\} 3$`, 'm'));
    assert.match(text, new RegExp(`^${name}_count\\{operation_type="prefetch_total",layer="sha256:aa"\\} 1$`, 'm'));
    assert.match(text, /^stargaze_layer_integrity_failures_total\{layer="sha256:aa"\} 2$/m);
    assert.match(text, /^stargz_fs_layer_size_bytes\{digest="sha256:aa",mountpoint="\/mnt\/a"\} 10$/m);

    // observed after the registry exists: the next scrape has it
    metrics.observe('mount', 'sha256:aa', 2);
    const again = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    assert.match(again, new RegExp(`^${name}_count\\{${mount}\\} 4$`, 'm'));
    assert.match(again, new RegExp(`^${name}_bucket\\{${mount},le="2"\\} 2$`, 'm'));
  } finally {
    server.close();
  }
});
