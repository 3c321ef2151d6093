/**
 * What `stargaze convert` shows while it works: on a terminal, one live line per layer in flight (bytes read
 * of the source blob, rate) redrawn in place, plus a permanent line per finished layer; otherwise plain lines
 * at start and end of each layer; nothing with --quiet. Everything goes to stderr, so stdout carries only
 * the result.
 */

/** Redraw at most this often on a terminal. */
const REDRAW_INTERVAL_MS = 200;
/** Digests are shown this long (`sha256:` + 12 hex), as ctr does. */
const SHORT_DIGEST_CHARS = 19;

export type LayerOutcome = 'pushed' | 'exists';

/** Events the converter reports; every method is cheap and synchronous. */
export interface ConvertProgress {
  /** A source layer starts converting; `totalBytes` is its compressed size. */
  layerStart(id: string, totalBytes: number): void;
  /** `bytes` more of the source blob were read. */
  layerRead(id: string, bytes: number): void;
  /** `bytes` more of the eStargz blob were written to the scratch file. */
  layerWrite(id: string, bytes: number): void;
  /** `bytes` more of the converted blob were uploaded. */
  layerUpload(id: string, bytes: number): void;
  /** The layer is converted and stored at the destination. */
  layerDone(id: string, result: { digest: string; size: number; outcome: LayerOutcome }): void;
  /** A line about something other than a layer (config, manifest). */
  note(text: string): void;
  /** Stops redrawing; call once, also on failure. */
  close(): void;
}

export function shortDigest(digest: string): string {
  return digest.slice(0, SHORT_DIGEST_CHARS);
}

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 * 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(1)} MiB`;
  return `${(n / (1024 * 1024 * 1024)).toFixed(2)} GiB`;
}

interface LayerState {
  total: number;
  read: number;
  written: number;
  uploaded: number;
  startedMs: number;
  /** When the whole source blob had been read (the rate is over the reading phase). */
  readDoneMs: number | undefined;
}

/** The final line of a layer; the same on a terminal and in a log. */
export function doneLine(id: string, result: { digest: string; size: number; outcome: LayerOutcome }, ms: number): string {
  const how = result.outcome === 'exists' ? 'already at destination' : 'stored';
  return `${shortDigest(id)} -> ${shortDigest(result.digest)} ${formatBytes(result.size)} ${how} (${(ms / 1000).toFixed(1)}s)`;
}

abstract class BaseProgress implements ConvertProgress {
  protected readonly layers = new Map<string, LayerState>();

  constructor(protected readonly out: NodeJS.WritableStream) {}

  layerStart(id: string, totalBytes: number): void {
    this.layers.set(id, { total: totalBytes, read: 0, written: 0, uploaded: 0, startedMs: Date.now(), readDoneMs: undefined });
  }

  layerRead(id: string, bytes: number): void {
    const s = this.layers.get(id);
    if (s === undefined) return;
    s.read += bytes;
    if (s.read >= s.total) s.readDoneMs ??= Date.now();
  }

  layerWrite(id: string, bytes: number): void {
    const s = this.layers.get(id);
    if (s !== undefined) s.written += bytes;
  }

  layerUpload(id: string, bytes: number): void {
    const s = this.layers.get(id);
    if (s !== undefined) s.uploaded += bytes;
  }

  layerDone(id: string, result: { digest: string; size: number; outcome: LayerOutcome }): void {
    const s = this.layers.get(id);
    this.layers.delete(id);
    this.line(doneLine(id, result, s === undefined ? 0 : Date.now() - s.startedMs));
  }

  note(text: string): void {
    this.line(text);
  }

  close(): void {}

  protected abstract line(text: string): void;
}

/** Plain lines, for logs and pipes. */
export class PlainProgress extends BaseProgress {
  override layerStart(id: string, totalBytes: number): void {
    super.layerStart(id, totalBytes);
    this.line(`${shortDigest(id)} converting (${formatBytes(totalBytes)})`);
  }

  protected line(text: string): void {
    this.out.write(text + '\n');
  }
}

/** Live per-layer lines on a terminal. */
export class TtyProgress extends BaseProgress {
  /** Status lines currently on screen below the permanent output. */
  private drawn = 0;
  private readonly timer: NodeJS.Timeout;

  constructor(out: NodeJS.WritableStream) {
    super(out);
    this.timer = setInterval(() => this.redraw(), REDRAW_INTERVAL_MS);
    this.timer.unref();
  }

  override close(): void {
    clearInterval(this.timer);
    this.clear();
  }

  protected line(text: string): void {
    this.clear();
    this.out.write(text + '\n');
    this.redraw();
  }

  private clear(): void {
    if (this.drawn === 0) return;
    this.out.write(`\x1b[${this.drawn}A\x1b[J`);
    this.drawn = 0;
  }

  private redraw(): void {
    this.clear();
    const now = Date.now();
    const lines: string[] = [];
    for (const [id, s] of this.layers) {
      const readSecs = Math.max(((s.readDoneMs ?? now) - s.startedMs) / 1000, 0.001);
      const rate = `${formatBytes(Math.round(s.read / readSecs))}/s`;
      let phase: string;
      if (s.uploaded > 0) phase = `storing ${formatBytes(s.uploaded)}/${formatBytes(s.written)}`;
      else if (s.readDoneMs === undefined) phase = `reading ${formatBytes(s.read)}/${formatBytes(s.total)} ${rate}`;
      else phase = `compressing ${formatBytes(s.written)} written (read at ${rate})`;
      lines.push(`${shortDigest(id)} ${phase} ${((now - s.startedMs) / 1000).toFixed(1)}s`);
    }
    if (lines.length > 0) this.out.write(lines.join('\n') + '\n');
    this.drawn = lines.length;
  }
}

export class QuietProgress implements ConvertProgress {
  layerStart(): void {}
  layerRead(): void {}
  layerWrite(): void {}
  layerUpload(): void {}
  layerDone(): void {}
  note(): void {}
  close(): void {}
}

export function createProgress(opts: { quiet: boolean; stream: NodeJS.WriteStream }): ConvertProgress {
  if (opts.quiet) return new QuietProgress();
  return opts.stream.isTTY === true ? new TtyProgress(opts.stream) : new PlainProgress(opts.stream);
}
