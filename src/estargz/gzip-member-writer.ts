import { createHash, type Hash } from 'node:crypto';
import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { createGzip, type Gzip } from 'node:zlib';

/**
 * Writes a blob as a concatenation of gzip members, with the member boundaries under the caller's
 * control: eStargz needs a new member exactly where each payload chunk starts. Tracks the compressed
 * offset (where the next member will start), the digest of the compressed blob, and the digest and
 * size of the uncompressed stream (the DiffID). Compression runs on the zlib thread pool and
 * backpressure from the output is honoured, so memory stays bounded.
 */
export class GzipMemberWriter {
  /** The open member, if any. */
  private gz: Gzip | undefined;
  /** Compressed bytes handed to the output so far. */
  private compressedBytes = 0;
  private uncompressedBytes = 0;
  private readonly blobHash: Hash = createHash('sha256');
  private readonly diffHash: Hash = createHash('sha256');
  /** True while the open member is paused waiting for the output to drain. */
  private waitingForDrain = false;
  /** First error the output reported; fails every later call. */
  private outputError: Error | undefined;

  constructor(
    private readonly out: Writable,
    private readonly level: number,
  ) {
    out.on('error', (err: unknown) => {
      const e = err instanceof Error ? err : new Error(String(err));
      this.outputError ??= e;
      this.gz?.destroy(e);
    });
  }

  /** Compressed offset at which the next member starts; exact once closeMember() resolved. */
  get offset(): number {
    return this.compressedBytes;
  }

  /** Appends uncompressed bytes to the open member, opening one if needed. Do not reuse `data`. */
  async write(data: Buffer): Promise<void> {
    this.throwIfFailed();
    if (data.length === 0) return;
    const gz = this.gz ?? this.openMember();
    this.diffHash.update(data);
    this.uncompressedBytes += data.length;
    if (!gz.write(data)) await once(gz, 'drain');
  }

  /** Ends the open member (if any) and waits until all of its bytes reached the output. */
  async closeMember(): Promise<void> {
    const gz = this.gz;
    if (gz === undefined) return;
    this.gz = undefined;
    const ended = once(gz, 'end');
    gz.end();
    await ended;
    this.throwIfFailed();
  }

  /** Writes bytes verbatim, outside any member (the footer). Closes the open member first. */
  async writeRaw(data: Buffer): Promise<void> {
    await this.closeMember();
    if (!this.emit(data)) await once(this.out, 'drain');
  }

  /** Closes the open member, ends the output and waits for it to flush. */
  async finish(): Promise<{ blobDigest: string; blobSize: number; diffId: string; uncompressedSize: number }> {
    await this.closeMember();
    this.out.end();
    await finished(this.out);
    this.throwIfFailed();
    return {
      blobDigest: 'sha256:' + this.blobHash.digest('hex'),
      blobSize: this.compressedBytes,
      diffId: 'sha256:' + this.diffHash.digest('hex'),
      uncompressedSize: this.uncompressedBytes,
    };
  }

  /** Abandons the open member after a failure elsewhere. */
  destroy(err: Error): void {
    this.gz?.destroy(err);
    this.gz = undefined;
  }

  private openMember(): Gzip {
    const gz = createGzip({ level: this.level });
    gz.on('data', (chunk: Buffer) => {
      if (this.emit(chunk) || this.waitingForDrain) return;
      // The output is full: stop the compressor until it drains; its own buffer then fills and
      // write() above starts waiting for 'drain', which bounds memory end to end.
      this.waitingForDrain = true;
      gz.pause();
      this.out.once('drain', () => {
        this.waitingForDrain = false;
        gz.resume();
      });
    });
    this.gz = gz;
    return gz;
  }

  /** Hands compressed bytes to the output; false when the output wants us to wait. */
  private emit(chunk: Buffer): boolean {
    this.blobHash.update(chunk);
    this.compressedBytes += chunk.length;
    return this.out.write(chunk);
  }

  private throwIfFailed(): void {
    if (this.outputError !== undefined) throw this.outputError;
  }
}
