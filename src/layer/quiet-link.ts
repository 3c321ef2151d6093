/**
 * The read-first rule for the link: background fetch goes on only once the served layers have been quiet.
 * Every layer of the process shares one QuietLink (layers.ts): a read of any layer holds back every layer's
 * background fetch.
 */

/** What the gate watches of a served layer's reader (LayerReader). */
export interface ReadActivity {
  /** True while reads are loading chunks. */
  readonly busy: boolean;
  /** How long no read nor prefetch has read the blob, in ms of performance.now() time; 0 while one is. */
  idleMs(now: number): number;
}

export class QuietLink {
  /** When a mount last started or came up (performance.now()). */
  private lastMountActivityAt = -Infinity;

  constructor(
    private readonly quietMs: number,
    /** The layers being served (a live view). */
    private readonly served: Iterable<{ readonly reader: ReadActivity }>,
  ) {}

  /** A mount started or came up: the quiet period starts again. */
  stamp(): void {
    this.lastMountActivityAt = performance.now();
  }

  /**
   * Whether background fetch must wait: while reads are loading chunks, and until no read nor prefetch has
   * read the blob and no layer has mounted for background_fetch_quiet_msec, so a container that is starting
   * has the link and the cores to itself. Its reads come in bursts with gaps between (create, then start; one
   * program, then the next): without the quiet period a 4 MiB background window fills each gap and the next
   * read waits behind it. Reads from the disk cache do not restart the quiet period (a long-running service
   * reading a fetched layer, or a local copy being made, would hold every other layer's fetch back). A
   * neighbour layer opened ahead prefetches before it is served: its mount, soon after, stamps the time.
   * Monotonic time: a clock stepped back must not stall it.
   */
  mustWait(): boolean {
    const now = performance.now();
    if (now - this.lastMountActivityAt < this.quietMs) return true;
    for (const { reader } of this.served) if (reader.busy || reader.idleMs(now) < this.quietMs) return true;
    return false;
  }
}
