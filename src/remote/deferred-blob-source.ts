/**
 * A BlobSource that finds its blob in the registry only when a read needs it. A layer mounted from a cached
 * TOC serves what the disk cache holds without any registry; the first read that misses resolves the blob
 * then. A failed resolve is not remembered, so reads succeed again once the registry is back.
 */
import { RegistryError } from '../errors';
import { readRangeIntoOf, readRangesOf, type BlobSource, type ByteRange } from './blob-source';

export class DeferredBlobSource implements BlobSource {
  private resolving: Promise<BlobSource> | undefined;

  constructor(
    readonly digest: string,
    readonly size: number,
    private readonly resolve: (signal?: AbortSignal) => Promise<BlobSource>,
  ) {}

  async readRange(offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    return (await this.source(signal)).readRange(offset, length, signal);
  }

  async readRanges(ranges: readonly ByteRange[], signal?: AbortSignal): Promise<Buffer[]> {
    return readRangesOf(await this.source(signal), ranges, signal);
  }

  async readRangeInto(offset: number, into: Buffer, arrived: (n: number) => void, signal?: AbortSignal): Promise<void> {
    return readRangeIntoOf(await this.source(signal), offset, into, arrived, signal);
  }

  private source(signal?: AbortSignal): Promise<BlobSource> {
    const running =
      this.resolving ??
      this.resolve(signal).then((source) => {
        if (source.size !== this.size) {
          throw new RegistryError(`blob ${this.digest} is ${source.size} bytes in the registry, not ${this.size} as when it was mounted`);
        }
        return source;
      });
    this.resolving = running;
    // A failed resolve is forgotten: the next read tries the registry again.
    running.catch(() => {
      if (this.resolving === running) this.resolving = undefined;
    });
    return running;
  }
}
