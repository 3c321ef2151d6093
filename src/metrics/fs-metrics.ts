/**
 * Prometheus metrics of the lazily mounted layers, under the reference's names where they apply
 * (stargz_fs_*), so its dashboards keep working. Per-layer numbers are read from the layers' own counters
 * when scraped: recording costs the read path nothing.
 */
import http from 'node:http';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
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

export class FsMetrics {
  readonly registry = new Registry();
  private readonly durations: Histogram<'operation_type' | 'layer'>;
  private readonly integrityFailures: Counter<'layer'>;

  constructor(layers: () => LayerMetricsSnapshot[], cache: () => CacheMetricsSnapshot | undefined) {
    const registers = [this.registry];
    this.durations = new Histogram({
      name: 'stargz_fs_operation_duration_milliseconds',
      help: 'Latency of layer operations (mount, prefetch_total, background_fetch_total) in milliseconds.',
      labelNames: ['operation_type', 'layer'],
      buckets: MS_BUCKETS,
      registers,
    });
    this.integrityFailures = new Counter({
      name: 'stargaze_layer_integrity_failures_total',
      help: 'Fully fetched layers whose content did not match the chainID they were committed under.',
      labelNames: ['layer'],
      registers,
    });
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
  }

  observe(operation: string, layer: string, elapsedMs: number): void {
    this.durations.observe({ operation_type: operation, layer }, elapsedMs);
  }

  integrityFailure(layer: string): void {
    this.integrityFailures.inc({ layer });
  }
}

/** Serves `/metrics` on a TCP address (`host:port`, or `:port` for every interface). */
export async function serveMetrics(metrics: FsMetrics, address: string, log: Logger): Promise<http.Server> {
  const colon = address.lastIndexOf(':');
  const host = colon > 0 ? address.slice(0, colon).replace(/^\[|\]$/g, '') : undefined;
  const port = Number(address.slice(colon + 1));
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`metrics_address ${address}: not host:port`);
  const server = http.createServer((req, res) => {
    if (req.url !== '/metrics') {
      res.writeHead(404).end();
      return;
    }
    metrics.registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text),
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
