/**
 * The process's one scheduler of work against the registry and the CPU. Container reads come first, then
 * prefetch, then background fetch: each lane is a Limiter, whose `read` tasks never wait and whose waiting
 * tasks start in priority order. Background fetch also waits for a quiet link (the layer decides when; see
 * src/layer/), and takes a layer slot of its own so at most `max_concurrency` layers fetch at once.
 */
import type { Config } from '../config/config';
import { Limiter } from './limiter';

export interface SchedulerLimits {
  /**
   * Registry requests in flight for prefetch and background work. Reads take a slot without waiting, so under
   * load the work behind them waits instead of the container.
   */
  fetches: number;
  /**
   * Inflate jobs in flight for prefetch and background work: the size of libuv's pool (4 unless
   * UV_THREADPOOL_SIZE says otherwise), which the disk cache and crypto.subtle share; more would only queue
   * inside libuv, where a read's inflate cannot pass them.
   */
  inflates: number;
  /** Layers background-fetched at once (`max_concurrency`). */
  backgroundLayers: number;
}

/** What the config names; the request lane holds two whole-blob fetches (`[blob] parallel_fetch_concurrency` each). */
export function schedulerLimits(config: Pick<Config, 'maxConcurrency' | 'blob'>): SchedulerLimits {
  const poolSize = Number(process.env.UV_THREADPOOL_SIZE);
  return {
    fetches: 2 * Math.max(1, config.blob.parallelFetchConcurrency),
    inflates: Number.isInteger(poolSize) && poolSize > 0 ? poolSize : 4,
    backgroundLayers: Math.max(1, config.maxConcurrency),
  };
}

export class Scheduler {
  readonly fetches: Limiter;
  readonly inflates: Limiter;
  readonly backgroundLayers: Limiter;

  constructor(readonly limits: SchedulerLimits) {
    this.fetches = new Limiter(limits.fetches);
    this.inflates = new Limiter(limits.inflates);
    this.backgroundLayers = new Limiter(limits.backgroundLayers);
  }
}
