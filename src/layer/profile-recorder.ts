/**
 * Records a mounted layer's start window for its prefetch profile: the chunks containers read through FUSE,
 * in first-read order, from the layer's first read after its mount until its reads have been quiet for
 * `quietMs`, `maxWindowMs` has passed, or `maxChunks` distinct chunks were read. Then it hands the entries
 * over once and records nothing more.
 *
 * It sits on the read path (every FUSE read of the layer calls record()), so it costs a binary search, a Set
 * lookup and, for a chunk not seen before, a push: no I/O, no timer per read (one timer re-arms itself from
 * the time of the last read). Prefetch, background fetch and the local copy do not come through here: only
 * container reads do (the local copy reads the mount, so the layer stops the window before it starts).
 */
import type { ChunkInfo } from '../metadata/layer-tree';
import type { ProfileEntry } from '../profile/profile-format';

export interface ProfileRecorderOptions {
  /** `[prefetch_profile] quiet_msec`. */
  quietMs: number;
  /** `[prefetch_profile] max_window_sec`, in ms. */
  maxWindowMs: number;
  /** `[prefetch_profile] max_chunks`. */
  maxChunks: number;
}

export class ProfileRecorder {
  /** Chunks seen, by identity: a hardlink's second name reads the same chunks and adds nothing. */
  private seen = new Set<ChunkInfo>();
  /** The window's entries so far; handed over (not kept) when it closes. */
  private entries: ProfileEntry[] = [];
  private state: 'waiting' | 'recording' | 'closed' = 'waiting';
  private lastReadMs = 0;
  private startedMs = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly options: ProfileRecorderOptions,
    /** Receives the window's entries once, when it closes with at least one. */
    private readonly onClosed: (entries: ProfileEntry[]) => void,
  ) {}

  get closed(): boolean {
    return this.state === 'closed';
  }

  /**
   * A container read bytes [position, position + length) of the regular file at `fusePath` (`/` and its TOC
   * name: the name is cut out only for a chunk not seen before).
   */
  record(fusePath: string, chunks: readonly ChunkInfo[], position: number, length: number): void {
    if (this.state === 'closed' || chunks.length === 0 || length <= 0) return;
    const now = performance.now();
    if (this.state === 'waiting') {
      this.state = 'recording';
      this.startedMs = now;
      this.arm(Math.min(this.options.quietMs, this.options.maxWindowMs));
    }
    this.lastReadMs = now;
    const end = position + length;
    let name: string | undefined;
    for (let i = chunkIndexAt(chunks, position); i < chunks.length && chunks[i]!.fileOffset < end; i++) {
      const c = chunks[i]!;
      if (this.seen.has(c)) continue;
      this.seen.add(c);
      name ??= fusePath.startsWith('/') ? fusePath.slice(1) : fusePath;
      this.entries.push({ name, offset: c.fileOffset });
      if (this.entries.length >= this.options.maxChunks) return this.close();
    }
  }

  /** Ends the window now (the layer unmounts, or its local copy is about to read the mount). */
  close(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    clearTimeout(this.timer);
    this.timer = undefined;
    // Its layer keeps the recorder until unmount: what it recorded (about 1 MB at max_chunks) must not stay with it.
    const entries = this.entries;
    this.entries = [];
    this.seen = new Set();
    if (entries.length > 0) this.onClosed(entries);
  }

  /** One timer for the window: it fires when it may be over and re-arms for whatever is left. */
  private arm(delayMs: number): void {
    this.timer = setTimeout(() => {
      const now = performance.now();
      const quietLeft = this.lastReadMs + this.options.quietMs - now;
      const windowLeft = this.startedMs + this.options.maxWindowMs - now;
      if (quietLeft <= 0 || windowLeft <= 0) return this.close();
      this.arm(Math.min(quietLeft, windowLeft));
    }, Math.max(1, delayMs));
    // A window still open must not keep a stopping process alive: the layer's close ends it anyway.
    this.timer.unref();
  }
}

/** Index of the chunk holding file offset `pos` (chunks tile the file, sorted by fileOffset). */
function chunkIndexAt(chunks: readonly ChunkInfo[], pos: number): number {
  let lo = 0;
  let hi = chunks.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >>> 1;
    if (chunks[mid]!.fileOffset <= pos) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}
