/**
 * Where convert reads an image from and writes it to: a registry or an OCI layout directory, behind two
 * small interfaces so the converter does not care which.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { Transform, pipeline, type Readable, type TransformCallback } from 'node:stream';
import { InvalidArgumentError, RegistryError } from '../errors';
import type { RegistryClient } from '../remote/registry-client';
import type { RegistryPusher } from '../remote/registry-push';
import type { ImageReference } from '../remote/reference';
import { OciLayout } from './oci-layout';
import type { Descriptor } from './media-types';

/** Manifests, indexes and configs bigger than this are refused (containerd's limit). */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;
/** Image configs bigger than this are refused. */
export const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

export interface RootManifest {
  mediaType: string;
  digest: string;
  body: Buffer;
}

export interface ImageSource {
  /** For messages: `registry/repo:tag` or `oci:DIR:TAG`. */
  readonly name: string;
  /** The manifest or index the reference names. */
  root(signal?: AbortSignal): Promise<RootManifest>;
  /** A small blob (child manifest, config) by descriptor, digest-checked. */
  readSmall(desc: Descriptor, limit: number, signal?: AbortSignal): Promise<Buffer>;
  /** A layer blob as a stream that errors at the end if its digest or size is wrong. */
  openBlob(desc: Descriptor, signal?: AbortSignal): Promise<Readable>;
}

export interface ImageSink {
  readonly name: string;
  /** Stores a blob from a finished file unless the destination has it already. */
  putBlobFile(desc: Descriptor, file: string, onBytes: (n: number) => void, signal?: AbortSignal): Promise<'pushed' | 'exists'>;
  /** Stores a small blob (config) unless present. */
  putBlob(desc: Descriptor, data: Buffer, signal?: AbortSignal): Promise<'pushed' | 'exists'>;
  /** Stores a manifest by digest only (children of an index): not reachable by tag yet. */
  putManifest(desc: Descriptor, body: Buffer, signal?: AbortSignal): Promise<void>;
  /** Stores the top-level manifest or index under the destination tag: the last write. */
  tag(desc: Descriptor, body: Buffer, signal?: AbortSignal): Promise<void>;
  close(): Promise<void>;
}

/** Fails at the end of the stream when the bytes do not hash to `digest` or are not `size` long. */
export class DigestCheck extends Transform {
  private readonly hash = createHash('sha256');
  private seen = 0;

  constructor(
    private readonly desc: Descriptor,
    private readonly where: string,
  ) {
    super();
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.hash.update(chunk);
    this.seen += chunk.length;
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    const got = 'sha256:' + this.hash.digest('hex');
    if (this.seen !== this.desc.size) {
      cb(new InvalidArgumentError(`blob ${this.desc.digest} in ${this.where}: ${this.seen} bytes, the manifest says ${this.desc.size} (truncated?)`));
    } else if (got !== this.desc.digest) {
      cb(new InvalidArgumentError(`blob ${this.desc.digest} in ${this.where} has digest ${got} (corrupt)`));
    } else {
      cb();
    }
  }
}

async function readAll(stream: Readable, limit: number, what: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    total += chunk.length;
    if (total > limit) {
      stream.destroy();
      throw new InvalidArgumentError(`${what} is larger than ${limit} bytes`);
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, total);
}

function sha256(data: Buffer): string {
  return 'sha256:' + createHash('sha256').update(data).digest('hex');
}

// -------------------------------------------------------------------------------------------------------------
// Registry

export class RegistrySource implements ImageSource {
  readonly name: string;

  constructor(
    private readonly client: RegistryClient,
    private readonly reference: ImageReference,
  ) {
    this.name = reference.toString();
  }

  async root(signal?: AbortSignal): Promise<RootManifest> {
    const m = await this.client.fetchManifest(this.reference.toString(), undefined, signal);
    return { mediaType: m.mediaType, digest: m.digest, body: m.body };
  }

  async readSmall(desc: Descriptor, limit: number, signal?: AbortSignal): Promise<Buffer> {
    if (desc.size > limit) throw new InvalidArgumentError(`${desc.mediaType} ${desc.digest} of ${this.name} is ${desc.size} bytes, more than ${limit}`);
    const isManifest = desc.mediaType.includes('manifest') || desc.mediaType.includes('index');
    if (isManifest) {
      const m = await this.client.fetchManifest(`${this.reference.name}@${desc.digest}`, [desc.mediaType], signal);
      if (sha256(m.body) !== desc.digest) throw new RegistryError(`manifest ${desc.digest} of ${this.name}: content has digest ${sha256(m.body)}`);
      return m.body;
    }
    const blob = await this.client.fetchBlob(this.reference.name, desc.digest, signal);
    return readAll(blob.body, limit, `blob ${desc.digest} of ${this.name}`);
  }

  async openBlob(desc: Descriptor, signal?: AbortSignal): Promise<Readable> {
    // fetchBlob checks the digest (and Content-Length) at the end of the stream.
    const blob = await this.client.fetchBlob(this.reference.name, desc.digest, signal);
    return blob.body;
  }
}

export class RegistrySink implements ImageSink {
  readonly name: string;

  constructor(
    private readonly pusher: RegistryPusher,
    private readonly tagName: string,
  ) {
    this.name = `${pusher.reference.name}:${tagName}`;
  }

  putBlobFile(desc: Descriptor, file: string, onBytes: (n: number) => void, signal?: AbortSignal): Promise<'pushed' | 'exists'> {
    return this.pusher.pushBlob(desc.digest, desc.size, () => createReadStream(file), { signal, onBytes });
  }

  putBlob(desc: Descriptor, data: Buffer, signal?: AbortSignal): Promise<'pushed' | 'exists'> {
    return this.pusher.pushBlob(desc.digest, desc.size, () => data, { signal });
  }

  async putManifest(desc: Descriptor, body: Buffer, signal?: AbortSignal): Promise<void> {
    await this.pusher.pushManifest(desc.digest, desc.mediaType, body, signal);
  }

  async tag(desc: Descriptor, body: Buffer, signal?: AbortSignal): Promise<void> {
    await this.pusher.pushManifest(this.tagName, desc.mediaType, body, signal);
  }

  close(): Promise<void> {
    return this.pusher.close();
  }
}

// -------------------------------------------------------------------------------------------------------------
// OCI layout

export class OciLayoutSource implements ImageSource {
  readonly name: string;

  constructor(
    private readonly layout: OciLayout,
    private readonly tagName: string | undefined,
  ) {
    this.name = `oci:${layout.dir}${tagName !== undefined ? `:${tagName}` : ''}`;
  }

  async root(): Promise<RootManifest> {
    const desc = await this.layout.resolve(this.tagName);
    const body = await this.layout.readBlob(desc.digest, MAX_MANIFEST_BYTES);
    return { mediaType: desc.mediaType, digest: desc.digest, body };
  }

  readSmall(desc: Descriptor, limit: number): Promise<Buffer> {
    return this.layout.readBlob(desc.digest, limit);
  }

  async openBlob(desc: Descriptor): Promise<Readable> {
    const { body } = await this.layout.openBlob(desc.digest);
    const check = new DigestCheck(desc, this.name);
    // Errors either way destroy both: a failed read fails the check stream, a destroyed check closes the file.
    pipeline(body, check, () => undefined);
    return check;
  }
}

export class OciLayoutSink implements ImageSink {
  readonly name: string;

  constructor(
    private readonly layout: OciLayout,
    private readonly tagName: string,
  ) {
    this.name = `oci:${layout.dir}:${tagName}`;
  }

  async putBlobFile(desc: Descriptor, file: string, onBytes: (n: number) => void): Promise<'pushed' | 'exists'> {
    if (await this.layout.hasBlob(desc.digest, desc.size)) return 'exists';
    await this.layout.putBlobFile(desc.digest, file);
    onBytes(desc.size);
    return 'pushed';
  }

  async putBlob(desc: Descriptor, data: Buffer): Promise<'pushed' | 'exists'> {
    if (await this.layout.hasBlob(desc.digest, desc.size)) return 'exists';
    await this.layout.putBlob(desc.digest, data);
    return 'pushed';
  }

  async putManifest(desc: Descriptor, body: Buffer): Promise<void> {
    await this.layout.putBlob(desc.digest, body);
  }

  async tag(desc: Descriptor, body: Buffer): Promise<void> {
    await this.layout.putBlob(desc.digest, body);
    await this.layout.setTag(this.tagName, desc);
  }

  async close(): Promise<void> {}
}
