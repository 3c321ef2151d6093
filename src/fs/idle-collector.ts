/**
 * Collects the FUSE server's garbage once a burst of mounts or unmounts is over.
 *
 * A mount builds its layer's tree from the TOC, and leaves behind several times that tree's size as garbage: the
 * inflated TOC member and its JSON text, the parsed entries, the blob's tail (external buffers, outside V8's
 * heap). V8 collects when the process allocates, and a FUSE server serving its mounts allocates little: that
 * garbage, the young generation grown to hold it, and the malloc'ed buffers behind it stayed resident for good, a
 * few MiB per layer. One major collection once the burst is over gives it back.
 *
 * A major collection pauses the main thread, which serves every FUSE call, for as long as it marks the heap
 * (all mounted trees): collections are at least `minIntervalMs` apart, however often containers come and go.
 *
 * It needs V8's `gc` function (node --expose-gc: the daemon starts the server so, fuse-server-client.ts);
 * without it, poke() does nothing.
 */

/** V8's collector as --expose-gc exposes it; undefined without the flag. */
export type CollectGarbage = () => void;

export function exposedGc(): CollectGarbage | undefined {
  const gc: unknown = (globalThis as { gc?: unknown }).gc;
  return typeof gc === 'function' ? (gc as CollectGarbage) : undefined;
}

/** Default least time between two collections. */
export const MIN_COLLECT_INTERVAL_MS = 30_000;

export class IdleCollector {
  private timer: NodeJS.Timeout | undefined;
  private lastCollectAt = -Infinity;

  constructor(
    /** How long after the last poke it collects: a pull mounts its layers one after another. */
    private readonly quietMs: number,
    private readonly collect: CollectGarbage | undefined = exposedGc(),
    private readonly minIntervalMs = MIN_COLLECT_INTERVAL_MS,
  ) {}

  /** A mount or unmount ended: collect once none has come for quietMs, and not sooner than minIntervalMs after the last. */
  poke(): void {
    if (this.collect === undefined) return;
    clearTimeout(this.timer);
    const wait = Math.max(this.quietMs, this.lastCollectAt + this.minIntervalMs - performance.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.lastCollectAt = performance.now();
      this.collect?.();
    }, wait).unref();
  }

  close(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}
