/**
 * Opens the image's other layers (the layers label) while one of them mounts, as the reference pre-resolves
 * neighbouring layers: a pull Prepares layers one at a time, each on its parent, so without this every layer
 * would pay its blob resolution and TOC round trips in turn. Each layer opened ahead starts its prefetch and
 * waits for its own mount, which checks its TOC against that mount's toc.digest label (Layer.verify). One
 * whose mount does not come within the TTL is closed, which stops its prefetch.
 */
import { errorMessage } from '../errors';
import type { Logger } from '../log';
import type { LayerSourceInfo } from '../source/labels';
import type { Layer } from './layer';

/** Opens one neighbour layer; undefined when it need not be (its TOC is cached: its mount needs no registry). */
export type OpenAhead = (ref: string, digest: string) => Promise<Layer | undefined>;

export class PreOpener {
  /**
   * Layers opened ahead of their mount, by `ref \0 digest`: undefined when that failed (the mount tries again),
   * each with the timer that closes it when its mount does not come. A claim stops the timer: its closure holds
   * the layer, and with it the layer's TOC JSON, which must go as soon as the mount has built its tree.
   */
  private readonly opened = new Map<string, { layer: Promise<Layer | undefined>; expiry: NodeJS.Timeout }>();

  constructor(
    private readonly ttlMs: number,
    private readonly open: OpenAhead,
  ) {}

  /** Opens the layers `source` names besides itself, but for those `skip` says are served already. */
  openNeighbours(source: LayerSourceInfo, skip: (digest: string) => boolean, log: Logger): void {
    for (const digest of source.layers) {
      const key = preOpenKey(source.ref, digest);
      if (digest === source.digest || skip(digest) || this.opened.has(key)) continue;
      const layer = this.open(source.ref, digest).catch((err: unknown) => {
        log.debug({ neighbour: digest, err: errorMessage(err) }, 'could not open a following layer ahead of its mount');
        return undefined;
      });
      const expiry = setTimeout(() => {
        this.opened.delete(key);
        void layer.then((l) => {
          if (l === undefined) return;
          l.close();
          log.debug({ neighbour: digest, preOpenTtlMs: this.ttlMs }, 'layer opened ahead was not mounted in time: its prefetch stopped');
        });
      }, this.ttlMs).unref();
      this.opened.set(key, { layer, expiry });
    }
  }

  /** The layer opened ahead for this mount, now the mount's to verify or close; undefined when there is none. */
  claim(ref: string, digest: string): Promise<Layer | undefined> | undefined {
    const key = preOpenKey(ref, digest);
    const opened = this.opened.get(key);
    if (opened === undefined) return undefined;
    this.opened.delete(key);
    clearTimeout(opened.expiry);
    return opened.layer;
  }

  /** Closes every layer opened ahead and not claimed. */
  close(): void {
    for (const { layer, expiry } of this.opened.values()) {
      clearTimeout(expiry);
      void layer.then((l) => l?.close());
    }
    this.opened.clear();
  }
}

function preOpenKey(ref: string, digest: string): string {
  return `${ref}\0${digest}`;
}
