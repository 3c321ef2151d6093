/**
 * A streaming parser for `multipart/byteranges` bodies (RFC 9110 §14.6), the answer to a multi-range GET.
 * Part bodies are never buffered: each part's length comes from its Content-Range, and its bytes are handed
 * to `onData(blobOffset, bytes)` as they arrive, as views of the input chunks. Only delimiter lines and part
 * headers are accumulated, bounded by MAX_PART_HEADER_BYTES.
 *
 * Tolerated: an unknown boundary (taken from the first `--...` line, for servers that send no or an odd
 * Content-Type), LF instead of CRLF, a preamble, transport padding after a delimiter, a missing epilogue or
 * closing delimiter (the caller checks that every wanted byte arrived).
 */
import { RegistryError } from '../errors';
import { TransientRegistryError } from './registry-errors';

/** Bound on one part's delimiter + header block, and on a preamble. */
export const MAX_PART_HEADER_BYTES = 16 * 1024;

type State = 'delimiter' | 'headers' | 'body' | 'done';

const CRLFCRLF = Buffer.from('\r\n\r\n');
const LFLF = Buffer.from('\n\n');

/** `boundary=` parameter of a Content-Type, unquoted; undefined when absent. */
export function boundaryOf(contentType: string | undefined): string | undefined {
  if (contentType === undefined) return undefined;
  const m = /;\s*boundary\s*=\s*("([^"]*)"|[^;\s]+)/i.exec(contentType);
  if (m === null) return undefined;
  const b = m[2] ?? m[1];
  return b === undefined || b.length === 0 ? undefined : b;
}

export class ByteRangesParser {
  private state: State = 'delimiter';
  /** Bytes of a delimiter line or header block not yet complete. */
  private pending: Buffer = Buffer.alloc(0);
  private delimiter: Buffer | undefined;
  /** Blob offset of the next body byte, and body bytes left in the current part. */
  private position = 0;
  private remaining = 0;
  /** Parts whose body was read completely. */
  parts = 0;

  constructor(
    boundary: string | undefined,
    private readonly onData: (offset: number, data: Buffer) => void,
    private readonly blobSize: number | undefined,
    private readonly what: string,
  ) {
    this.delimiter = boundary === undefined ? undefined : Buffer.from(`--${boundary}`);
  }

  write(chunk: Buffer): void {
    let buf = chunk;
    while (buf.length > 0 && this.state !== 'done') {
      if (this.state === 'body') {
        const n = Math.min(this.remaining, buf.length);
        this.onData(this.position, buf.subarray(0, n));
        this.position += n;
        this.remaining -= n;
        buf = buf.subarray(n);
        if (this.remaining === 0) {
          this.parts++;
          this.state = 'delimiter';
        }
        continue;
      }
      // delimiter or headers: accumulate, bounded
      this.pending = this.pending.length === 0 ? buf : Buffer.concat([this.pending, buf]);
      const rest = this.state === 'delimiter' ? this.takeDelimiter() : this.takeHeaders();
      if (rest === undefined) {
        if (this.pending.length > MAX_PART_HEADER_BYTES) this.fail(`more than ${MAX_PART_HEADER_BYTES} bytes without a complete part header`);
        // Keep a private copy: the input chunk may be a view of a pooled buffer.
        this.pending = Buffer.from(this.pending);
        return;
      }
      this.pending = Buffer.alloc(0);
      buf = rest;
    }
  }

  /** Call when the body ended; throws unless the body ended between parts. A body cut short is worth reading again. */
  end(): void {
    if (this.state === 'body' || this.state === 'headers') this.cutShort(`body ended inside part ${this.parts + 1}`);
    if (this.parts === 0) this.cutShort('body held no part');
  }

  /** In `pending`, finds the next delimiter line; returns the bytes after it, or undefined to wait for more. */
  private takeDelimiter(): Buffer | undefined {
    const p = this.pending;
    if (this.delimiter === undefined) {
      // Unknown boundary: the first line starting with `--` is the delimiter.
      const start = p[0] === 0x2d && p[1] === 0x2d ? 0 : indexOfLineStart(p, '--');
      if (start < 0) return undefined;
      const eol = p.indexOf(0x0a, start);
      if (eol < 0) return undefined;
      const line = p.subarray(start, eol).toString('latin1').trim();
      if (line.length <= 2) this.fail('empty multipart boundary');
      this.delimiter = Buffer.from(line);
      this.state = 'headers';
      return p.subarray(eol + 1);
    }
    const at = p.indexOf(this.delimiter);
    if (at < 0) return undefined;
    const after = at + this.delimiter.length;
    if (p.length < after + 2) return undefined;
    if (p[after] === 0x2d && p[after + 1] === 0x2d) {
      this.state = 'done'; // closing delimiter; the epilogue is ignored
      return Buffer.alloc(0);
    }
    const eol = p.indexOf(0x0a, after);
    if (eol < 0) return undefined;
    this.state = 'headers';
    return p.subarray(eol + 1);
  }

  /** In `pending`, finds the end of a part's header block; returns the body bytes after it. */
  private takeHeaders(): Buffer | undefined {
    const p = this.pending;
    let end = p.indexOf(CRLFCRLF);
    let sep = 4;
    const lf = p.indexOf(LFLF);
    if (lf >= 0 && (end < 0 || lf < end)) {
      end = lf;
      sep = 2;
    }
    // A part with no headers at all starts with the blank line right away.
    if (end < 0 && (p[0] === 0x0a || (p[0] === 0x0d && p[1] === 0x0a))) {
      this.fail('part without a Content-Range');
    }
    if (end < 0) return undefined;
    const headers = p.subarray(0, end).toString('latin1').split(/\r?\n/);
    let range: { start: number; end: number; total: number | undefined } | undefined;
    for (const line of headers) {
      const colon = line.indexOf(':');
      if (colon < 0) continue;
      if (line.slice(0, colon).trim().toLowerCase() !== 'content-range') continue;
      const m = /^bytes\s+(\d+)-(\d+)\/(\d+|\*)$/i.exec(line.slice(colon + 1).trim());
      if (m === null) this.fail(`bad part Content-Range ${JSON.stringify(line.slice(colon + 1).trim())}`);
      range = { start: Number(m[1]), end: Number(m[2]), total: m[3] === '*' ? undefined : Number(m[3]) };
    }
    if (range === undefined) this.fail('part without a Content-Range');
    if (range.end < range.start || (this.blobSize !== undefined && (range.end >= this.blobSize || (range.total !== undefined && range.total !== this.blobSize)))) {
      this.fail(`part Content-Range bytes ${range.start}-${range.end}/${range.total ?? '*'} does not fit the blob of ${this.blobSize} bytes`);
    }
    this.position = range.start;
    this.remaining = range.end - range.start + 1;
    this.state = 'body';
    return p.subarray(end + sep);
  }

  private fail(why: string): never {
    throw new RegistryError(`${this.what}: bad multipart/byteranges answer: ${why}`, 206);
  }

  private cutShort(why: string): never {
    throw new TransientRegistryError(`${this.what}: bad multipart/byteranges answer: ${why}`, 206);
  }
}

/** Index of `text` at the start of a line (after `\n`) in `buf`, or -1. */
function indexOfLineStart(buf: Buffer, text: string): number {
  const needle = Buffer.from(`\n${text}`);
  const i = buf.indexOf(needle);
  return i < 0 ? -1 : i + 1;
}
