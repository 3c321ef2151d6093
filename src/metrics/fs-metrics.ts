/**
 * Prometheus metrics of the lazily mounted layers, under the reference's names where they apply
 * (stargz_fs_*), so its dashboards keep working. Per-layer numbers are read from the layers' own counters
 * when scraped: recording costs the read path nothing.
 *
 * prom-client (and the HTTP server) are loaded only when the metrics are served ([metrics_address]): a FUSE
 * server without it never loads them. Until then, and after, the durations and integrity failures are kept
 * here, as small per-label tallies, and handed to prom-client at scrape time.
 */
import type http from 'node:http';
import type { Registry } from 'prom-client';
import type { Logger } from '../log';

/** The reference's millisecond buckets: 1, 2, 4, ... 16384. */
const MS_BUCKETS = Array.from({ length: 15 }, (_, i) => 2 ** i);

/** What one mounted layer reports at scrape time. */
export interface LayerMetricsSnapshot {
  digest: string;
  mountpoint: string;
  sizeBytes: number;
  fetchedBytes: number;
  prefetchBytes: number;
  reads: number;
  bytesServed: number;
  readErrors: number;
  memoryCacheHits: number;
  memoryCacheMisses: number;
}

export interface CacheMetricsSnapshot {
  hits: number;
  misses: number;
  evictions: number;
  corrupt: number;
  usedBytes: number;
}

/** One series of the duration histogram: counts per bucket (not cumulative; the last is past every bound). */
interface DurationSeries {
  labels: { operation_type: string; layer: string };
  counts: number[];
  sum: number;
  count: number;
}

const DURATION_NAME = 'stargz_fs_operation_duration_milliseconds';
const DURATION_HELP = 'Latency of layer operations (mount, prefetch_total, background_fetch_total) in milliseconds.';

export class FsMetrics {
  private readonly durations = new Map<string, DurationSeries>();
  private readonly integrityFailures = new Map<string, number>();
  private registryPromise: Promise<Registry> | undefined;

  constructor(
    private readonly layers: () => LayerMetricsSnapshot[],
    private readonly cache: () => CacheMetricsSnapshot | undefined,
  ) {}

  observe(operation: string, layer: string, elapsedMs: number): void {
    const key = `${operation}\0${layer}`;
    let series = this.durations.get(key);
    if (!series) {
      series = { labels: { operation_type: operation, layer }, counts: new Array<number>(MS_BUCKETS.length + 1).fill(0), sum: 0, count: 0 };
      this.durations.set(key, series);
    }
    const bucket = MS_BUCKETS.findIndex((bound) => elapsedMs <= bound);
    series.counts[bucket < 0 ? MS_BUCKETS.length : bucket]! += 1;
    series.sum += elapsedMs;
    series.count += 1;
  }

  integrityFailure(layer: string): void {
    this.integrityFailures.set(layer, (this.integrityFailures.get(layer) ?? 0) + 1);
  }

  /** The Prometheus registry of these metrics, built (and prom-client loaded) on the first call. */
  registry(): Promise<Registry> {
    return (this.registryPromise ??= import('prom-client').then((prom) => this.buildRegistry(prom)));
  }

  private buildRegistry(prom: typeof import('prom-client')): Registry {
    const { Counter, Gauge } = prom;
    const registry = new prom.Registry();
    const registers = [registry];
    const durations = this.durations;
    // prom-client's own Histogram cannot take tallies made before it existed: this hands them over in the
    // shape its Histogram.get() has, which the registry formats the same way.
    registry.registerMetric({
      name: DURATION_NAME,
      help: DURATION_HELP,
      type: 'histogram',
      aggregator: 'sum',
      get: () => ({
        name: DURATION_NAME,
        help: DURATION_HELP,
        type: 'histogram',
        aggregator: 'sum',
        values: [...durations.values()].flatMap((series) => {
          let cumulative = 0;
          const buckets = MS_BUCKETS.map((bound, i) => {
            cumulative += series.counts[i]!;
            return { labels: { ...series.labels, le: bound }, value: cumulative, metricName: `${DURATION_NAME}_bucket` };
          });
          return [
            ...buckets,
            { labels: { ...series.labels, le: '+Inf' }, value: series.count, metricName: `${DURATION_NAME}_bucket` },
            { labels: series.labels, value: series.sum, metricName: `${DURATION_NAME}_sum` },
            { labels: series.labels, value: series.count, metricName: `${DURATION_NAME}_count` },
          ];
        }),
      }),
    } as unknown as Parameters<Registry['registerMetric']>[0]);
    const integrityFailures = this.integrityFailures;
    new Counter({
      name: 'stargaze_layer_integrity_failures_total',
      help: 'Fully fetched layers whose content did not match the chainID they were committed under.',
      labelNames: ['layer'],
      registers,
      collect() {
        this.reset();
        for (const [layer, n] of integrityFailures) this.inc({ layer }, n);
      },
    });
    const layers = this.layers;
    const cache = this.cache;
    const perLayer = (name: string, help: string, pick: (l: LayerMetricsSnapshot) => number): void => {
      new Gauge({
        name,
        help,
        labelNames: ['digest', 'mountpoint'],
        registers,
        collect() {
          this.reset();
          for (const l of layers()) this.set({ digest: l.digest, mountpoint: l.mountpoint }, pick(l));
        },
      });
    };
    perLayer('stargz_fs_layer_size_bytes', 'Compressed size of each mounted layer.', (l) => l.sizeBytes);
    perLayer('stargz_fs_layer_fetched_size_bytes', 'Compressed bytes of each layer fetched from the registry.', (l) => l.fetchedBytes);
    perLayer('stargz_fs_layer_prefetch_size_bytes', 'Bytes each layer prefetches at mount.', (l) => l.prefetchBytes);
    new Gauge({
      name: 'stargz_fs_bytes_served',
      help: 'Bytes served to readers (on_demand_bytes_served) and fetched for them (on_demand_bytes_fetched).',
      labelNames: ['operation_type', 'layer'],
      registers,
      collect() {
        this.reset();
        for (const l of layers()) {
          this.set({ operation_type: 'on_demand_bytes_served', layer: l.digest }, l.bytesServed);
          this.set({ operation_type: 'on_demand_bytes_fetched', layer: l.digest }, l.fetchedBytes);
        }
      },
    });
    new Gauge({
      name: 'stargz_fs_operation_count',
      help: 'Counts of layer operations: on_demand_read_access_count, read_error_count.',
      labelNames: ['operation_type', 'layer'],
      registers,
      collect() {
        this.reset();
        for (const l of layers()) {
          this.set({ operation_type: 'on_demand_read_access_count', layer: l.digest }, l.reads);
          this.set({ operation_type: 'read_error_count', layer: l.digest }, l.readErrors);
        }
      },
    });
    new Gauge({
      name: 'stargaze_memory_cache_lookups',
      help: 'Chunk lookups in each layer\'s memory cache, by result (hit, miss).',
      labelNames: ['result', 'layer'],
      registers,
      collect() {
        this.reset();
        for (const l of layers()) {
          this.set({ result: 'hit', layer: l.digest }, l.memoryCacheHits);
          this.set({ result: 'miss', layer: l.digest }, l.memoryCacheMisses);
        }
      },
    });
    new Gauge({
      name: 'stargaze_disk_cache',
      help: 'Disk chunk cache: hits, misses, evictions, corrupt files dropped, used bytes.',
      labelNames: ['stat'],
      registers,
      collect() {
        this.reset();
        const c = cache();
        if (!c) return;
        for (const [stat, value] of Object.entries(c) as [string, number][]) this.set({ stat }, value);
      },
    });
    return registry;
  }
}

/** Serves `/metrics` on a TCP address (`host:port`, or `:port` for every interface). */
export async function serveMetrics(metrics: FsMetrics, address: string, log: Logger): Promise<http.Server> {
  const colon = address.lastIndexOf(':');
  const host = colon > 0 ? address.slice(0, colon).replace(/^\[|\]$/g, '') : undefined;
  const port = Number(address.slice(colon + 1));
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`metrics_address ${address}: not host:port`);
  const [http, registry] = await Promise.all([import('node:http'), metrics.registry()]);
  const server = http.createServer((req, res) => {
    if (req.url !== '/metrics') {
      res.writeHead(404).end();
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (err: unknown) => res.writeHead(500).end(String(err)),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  log.info({ address }, 'serving metrics');
  return server;
}
