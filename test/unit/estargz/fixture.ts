/**
 * Shared test fixtures: build tars with tar-stream, turn them into eStargz blobs in memory, and a
 * BlobSource that counts (and can delay) range reads.
 */
import { createHash } from 'node:crypto';
import { Readable, Writable } from 'node:stream';
import { gzipSync } from 'node:zlib';

import tarStream from 'tar-stream';

import { encodeFooter } from '../../../src/estargz/footer';
import { TAR_EOF_BYTES, TYPEFLAG, encodeTarHeader, tarPaddingBytes } from '../../../src/estargz/tar-header';
import { writeEstargz, type EstargzWriteResult, type EstargzWriterOptions } from '../../../src/estargz/writer';
import type { BlobSource } from '../../../src/remote/blob-source';

export type TarEntrySpec = Parameters<tarStream.Pack['entry']>[0] & { content?: Buffer | string };

/** Packs entries with tar-stream into one tar buffer. */
export async function makeTar(entries: readonly TarEntrySpec[]): Promise<Buffer> {
  const pack = tarStream.pack();
  const collected = (async (): Promise<Buffer> => {
    const parts: Buffer[] = [];
    for await (const chunk of pack as AsyncIterable<Uint8Array>) parts.push(Buffer.from(chunk));
    return Buffer.concat(parts);
  })();
  for (const { content, ...header } of entries) {
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null): void => (err ? reject(err) : resolve());
      if (content !== undefined) pack.entry(header, typeof content === 'string' ? Buffer.from(content) : content, cb);
      else pack.entry(header, cb);
    });
  }
  pack.finalize();
  return collected;
}

/** Writes an eStargz blob from a tar held in memory. */
export async function toEstargz(
  tar: Buffer,
  opts: EstargzWriterOptions = {},
): Promise<{ blob: Buffer; result: EstargzWriteResult }> {
  const parts: Buffer[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb): void {
      parts.push(chunk);
      cb();
    },
  });
  const result = await writeEstargz(Readable.from([tar]), sink, opts);
  return { blob: Buffer.concat(parts), result };
}

export function sha256(data: Buffer | string): string {
  return 'sha256:' + createHash('sha256').update(data).digest('hex');
}

/**
 * A hand-made eStargz blob around arbitrary TOC JSON: one payload member per file, then the TOC member
 * and footer. For reader tests that need TOCs the writer would never produce.
 */
export function blobWithToc(tocJson: string | Buffer, payload: Buffer = Buffer.alloc(0)): Buffer {
  const json = typeof tocJson === 'string' ? Buffer.from(tocJson) : tocJson;
  const head = payload.length > 0 ? gzipSync(payload) : Buffer.alloc(0);
  const tocMember = gzipSync(
    Buffer.concat([
      encodeTarHeader({
        name: 'stargz.index.json',
        typeflag: TYPEFLAG.reg,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: json.length,
        mtimeSec: 0,
        linkname: '',
        uname: '',
        gname: '',
        devmajor: 0,
        devminor: 0,
      }),
      json,
      Buffer.alloc(tarPaddingBytes(json.length) + TAR_EOF_BYTES),
    ]),
  );
  return Buffer.concat([head, tocMember, encodeFooter(head.length)]);
}

/** Counts range reads; `delayMs` holds each read so tests can overlap them. */
export class CountingBlobSource implements BlobSource {
  readonly size: number;
  readonly reads: Array<{ offset: number; length: number }> = [];
  constructor(
    private readonly bytes: Buffer,
    readonly digest = sha256(bytes),
    private readonly delayMs = 0,
  ) {
    this.size = bytes.length;
  }

  async readRange(offset: number, length: number): Promise<Buffer> {
    this.reads.push({ offset, length });
    if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
    if (offset < 0 || length < 0 || offset + length > this.size) throw new RangeError(`range ${offset}+${length}`);
    return this.bytes.subarray(offset, offset + length);
  }
}

/** A layer whose 4 MiB `app/first.bin` is prioritized (before the landmark): a mount prefetches those bytes. */
export interface PrioritizedLayer {
  blob: Buffer;
  digest: string;
  tocDigest: string;
  diffId: string;
  /** Blob bytes that hold only the prefetched head: the tail read (footer and TOC) lies well past them. */
  headBytes: number;
}

export async function prioritizedLayer(seed: number): Promise<PrioritizedLayer> {
  const first = Buffer.alloc(4 * 1024 * 1024);
  for (let i = 0; i < first.length; i += 4) first.writeUInt32LE(((i + seed) * 2654435761) >>> 0, i);
  const tar = await makeTar([
    { name: 'app/', type: 'directory', mode: 0o755 },
    { name: 'app/first.bin', mode: 0o644, content: first },
    { name: 'app/later.txt', mode: 0o644, content: `layer ${seed}\n` },
  ]);
  const { blob, result } = await toEstargz(tar, { chunkSizeBytes: 1024 * 1024, prioritizedFiles: ['app/first.bin'] });
  return { blob, digest: sha256(blob), tocDigest: result.tocDigest, diffId: result.diffId, headBytes: 3 * 1024 * 1024 };
}
