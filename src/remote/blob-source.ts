/**
 * The seam between registry access (remote/) and everything that reads layer bytes (estargz/, reader/).
 * A BlobSource is one layer blob, already resolved to a URL with working credentials.
 */
export interface BlobSource {
  /** `sha256:<hex>` of the compressed blob. */
  readonly digest: string;
  /** Compressed size in bytes, as the registry reports it. */
  readonly size: number;
  /**
   * Reads exactly the bytes [offset, offset + length) of the blob. Rejects with a RegistryError when the
   * registry cannot serve them; never resolves with fewer bytes than asked for.
   */
  readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer>;
  /**
   * Optional: reads several ranges at once (one multi-range request where the server allows). Resolves with
   * one Buffer per range, in the order asked; the Buffers may be views of a shared allocation and of each
   * other when ranges overlap. Use `readRangesOf()` to call it on any BlobSource.
   */
  readRanges?(ranges: readonly ByteRange[], signal?: AbortSignal): Promise<Buffer[]>;
  /**
   * Optional: reads bytes [offset, offset + into.length) into `into` with one request, calling `arrived(n)` as
   * they come: bytes [0, n) of `into` are final, and n only grows. For a long range whose start is of use
   * before its end (prefetch inflates each member once its bytes are in). Use `readRangeIntoOf()` to call it
   * on any BlobSource.
   */
  readRangeInto?(offset: number, into: Buffer, arrived: (n: number) => void, signal?: AbortSignal): Promise<void>;
}

/** `blob.readRangeInto(...)` when the source has it, else one readRange copied into `into` once it is whole. */
export async function readRangeIntoOf(blob: BlobSource, offset: number, into: Buffer, arrived: (n: number) => void, signal?: AbortSignal): Promise<void> {
  if (blob.readRangeInto !== undefined) return blob.readRangeInto(offset, into, arrived, signal);
  (await blob.readRange(offset, into.length, signal)).copy(into);
  arrived(into.length);
}

/** Bytes [offset, offset + length) of a blob. */
export interface ByteRange {
  readonly offset: number;
  readonly length: number;
}

/** `blob.readRanges(ranges)` when the source has it, else one readRange per range, concurrently. */
export function readRangesOf(blob: BlobSource, ranges: readonly ByteRange[], signal?: AbortSignal): Promise<Buffer[]> {
  if (blob.readRanges !== undefined) return blob.readRanges(ranges, signal);
  return Promise.all(ranges.map((r) => blob.readRange(r.offset, r.length, signal)));
}

/** A BlobSource over bytes in memory: for tests and for blobs that are already local. */
export class BufferBlobSource implements BlobSource {
  readonly size: number;
  constructor(
    readonly digest: string,
    private readonly bytes: Buffer,
  ) {
    this.size = bytes.length;
  }

  readRange(offset: number, length: number): Promise<Buffer> {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      return Promise.reject(new RangeError(`range ${offset}+${length} outside blob of ${this.size} bytes`));
    }
    return Promise.resolve(this.bytes.subarray(offset, offset + length));
  }

  async readRanges(ranges: readonly ByteRange[]): Promise<Buffer[]> {
    return Promise.all(ranges.map((r) => this.readRange(r.offset, r.length)));
  }
}
