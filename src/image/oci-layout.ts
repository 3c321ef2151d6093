/**
 * An OCI image layout directory (image-spec image-layout.md): `oci-layout`, `index.json` and content-addressed
 * `blobs/<alg>/<hex>`. Tags are `org.opencontainers.image.ref.name` annotations on index.json entries.
 * Writes are atomic (temp file + rename), and index.json is written last, so a reader never sees a tag whose
 * blobs are not all there.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, type ReadStream } from 'node:fs';
import { copyFile, mkdir, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { InvalidArgumentError, NotFoundError, errorCode } from '../errors';
import { ANNOTATION_REF_NAME, MEDIA_TYPE_OCI_INDEX, checkDescriptor, type Descriptor, type ImageIndex } from './media-types';
import { pathExists } from '../path-exists';

/** Prefix of an image reference that names a layout directory: `oci:DIR[:TAG]`. */
export const OCI_LAYOUT_PREFIX = 'oci:';
export const OCI_LAYOUT_FILE = 'oci-layout';
export const OCI_INDEX_FILE = 'index.json';
export const OCI_LAYOUT_VERSION = '1.0.0';
/** index.json larger than this is refused. */
const MAX_INDEX_BYTES = 4 * 1024 * 1024;

const DIGEST_RE = /^(sha256):([a-f0-9]{64})$/;
const TAG_RE = /^[\w][\w.-]{0,127}$/;

export interface OciLayoutRef {
  dir: string;
  /** undefined: the only image in the layout (source) or `latest` (destination). */
  tag: string | undefined;
}

/** `oci:DIR[:TAG]` -> dir and tag; undefined when `ref` does not start with `oci:`. A last `:x` is a tag if x looks like one. */
export function parseOciLayoutRef(ref: string): OciLayoutRef | undefined {
  if (!ref.startsWith(OCI_LAYOUT_PREFIX)) return undefined;
  const rest = ref.slice(OCI_LAYOUT_PREFIX.length);
  const colon = rest.lastIndexOf(':');
  let dir = rest;
  let tag: string | undefined;
  if (colon >= 0) {
    const candidate = rest.slice(colon + 1);
    if (TAG_RE.test(candidate)) {
      dir = rest.slice(0, colon);
      tag = candidate;
    }
  }
  if (dir === '') throw new InvalidArgumentError(`invalid OCI layout reference ${JSON.stringify(ref)}: want oci:DIR[:TAG]`);
  return { dir: path.resolve(dir), tag };
}

function blobParts(digest: string): [string, string] {
  const m = DIGEST_RE.exec(digest);
  if (m === null) throw new InvalidArgumentError(`invalid blob digest ${JSON.stringify(digest)}: want sha256:<64 hex>`);
  return [m[1] as string, m[2] as string];
}

async function writeAtomic(file: string, data: Buffer | string): Promise<void> {
  const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
  try {
    await writeFile(tmp, data);
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

export class OciLayout {
  private constructor(readonly dir: string) {}

  /** Opens an existing layout; throws NotFoundError naming what is missing. */
  static async open(dir: string): Promise<OciLayout> {
    const layout = new OciLayout(path.resolve(dir));
    let marker: string;
    try {
      marker = await readFile(path.join(layout.dir, OCI_LAYOUT_FILE), 'utf8');
    } catch (err) {
      throw new NotFoundError(`${layout.dir} is not an OCI image layout: cannot read ${OCI_LAYOUT_FILE} (${errorCode(err) ?? 'read error'})`);
    }
    let version: unknown;
    try {
      version = (JSON.parse(marker) as { imageLayoutVersion?: unknown }).imageLayoutVersion;
    } catch {
      version = undefined;
    }
    if (typeof version !== 'string') throw new InvalidArgumentError(`${layout.dir}/${OCI_LAYOUT_FILE} has no imageLayoutVersion`);
    return layout;
  }

  /** Opens a layout, creating the directory, `oci-layout`, `blobs/` and an empty index as needed. */
  static async create(dir: string): Promise<OciLayout> {
    const layout = new OciLayout(path.resolve(dir));
    await mkdir(path.join(layout.dir, 'blobs', 'sha256'), { recursive: true });
    const markerFile = path.join(layout.dir, OCI_LAYOUT_FILE);
    if (!(await pathExists(markerFile))) await writeAtomic(markerFile, JSON.stringify({ imageLayoutVersion: OCI_LAYOUT_VERSION }));
    const indexFile = path.join(layout.dir, OCI_INDEX_FILE);
    if (!(await pathExists(indexFile))) await writeAtomic(indexFile, JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_INDEX, manifests: [] }));
    return layout;
  }

  blobPath(digest: string): string {
    const [alg, hex] = blobParts(digest);
    return path.join(this.dir, 'blobs', alg, hex);
  }

  async readIndex(): Promise<ImageIndex> {
    const file = path.join(this.dir, OCI_INDEX_FILE);
    let body: Buffer;
    try {
      body = await readFile(file);
    } catch (err) {
      throw new NotFoundError(`cannot read ${file}: ${errorCode(err) ?? 'read error'}`);
    }
    if (body.length > MAX_INDEX_BYTES) throw new InvalidArgumentError(`${file} is larger than ${MAX_INDEX_BYTES} bytes`);
    let doc: unknown;
    try {
      doc = JSON.parse(body.toString('utf8'));
    } catch (err) {
      throw new InvalidArgumentError(`${file} is not JSON: ${err instanceof Error ? err.message : String(err)}`);
    }
    const manifests = (doc as { manifests?: unknown } | null)?.manifests;
    if (!Array.isArray(manifests)) throw new InvalidArgumentError(`${file} has no manifests list`);
    manifests.forEach((m, i) => checkDescriptor(m, `${file} manifests[${i}]`));
    return doc as ImageIndex;
  }

  /** The index.json entry for `tag`, or the only entry when no tag is given. */
  async resolve(tag: string | undefined): Promise<Descriptor> {
    const index = await this.readIndex();
    if (tag === undefined) {
      if (index.manifests.length === 1) return index.manifests[0] as Descriptor;
      const tags = index.manifests.map((m) => m.annotations?.[ANNOTATION_REF_NAME]).filter((t) => t !== undefined);
      throw new InvalidArgumentError(
        `${this.dir} holds ${index.manifests.length} images; name one with oci:${this.dir}:TAG` + (tags.length > 0 ? ` (tags: ${tags.join(', ')})` : ''),
      );
    }
    const found = index.manifests.filter((m) => m.annotations?.[ANNOTATION_REF_NAME] === tag);
    if (found.length === 0) throw new NotFoundError(`tag ${JSON.stringify(tag)} not found in OCI layout ${this.dir}`);
    return found[found.length - 1] as Descriptor;
  }

  async hasBlob(digest: string, size?: number): Promise<boolean> {
    try {
      const st = await stat(this.blobPath(digest));
      return st.isFile() && (size === undefined || st.size === size);
    } catch {
      return false;
    }
  }

  /** Reads a small blob (manifest, config) whole, refusing more than `maxBytes`, and checks its digest. */
  async readBlob(digest: string, maxBytes: number): Promise<Buffer> {
    const file = this.blobPath(digest);
    const fh = await open(file, 'r').catch((err: unknown) => {
      throw new NotFoundError(`blob ${digest} not found in OCI layout ${this.dir} (${errorCode(err) ?? 'read error'})`);
    });
    try {
      const { size } = await fh.stat();
      if (size > maxBytes) throw new InvalidArgumentError(`blob ${digest} in ${this.dir} is ${size} bytes, more than the ${maxBytes} allowed`);
      const body = await fh.readFile();
      const got = 'sha256:' + createHash('sha256').update(body).digest('hex');
      if (got !== digest) throw new InvalidArgumentError(`blob ${digest} in ${this.dir} has digest ${got}`);
      return body;
    } finally {
      await fh.close();
    }
  }

  /** Streams a blob; the caller verifies its digest. */
  async openBlob(digest: string): Promise<{ size: number; body: ReadStream }> {
    const file = this.blobPath(digest);
    let size: number;
    try {
      size = (await stat(file)).size;
    } catch (err) {
      throw new NotFoundError(`blob ${digest} not found in OCI layout ${this.dir} (${errorCode(err) ?? 'read error'})`);
    }
    return { size, body: createReadStream(file) };
  }

  async putBlob(digest: string, data: Buffer): Promise<void> {
    const file = this.blobPath(digest);
    await mkdir(path.dirname(file), { recursive: true });
    await writeAtomic(file, data);
  }

  /** Copies a finished file in as blob `digest` (the caller computed the digest while writing it). */
  async putBlobFile(digest: string, source: string): Promise<void> {
    const file = this.blobPath(digest);
    await mkdir(path.dirname(file), { recursive: true });
    const tmp = `${file}.${randomBytes(6).toString('hex')}.tmp`;
    try {
      await copyFile(source, tmp);
      await rename(tmp, file);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
  }

  /** Points `tag` at `desc` in index.json (replacing the tag's old entry); the last write of a conversion. */
  async setTag(tag: string, desc: Descriptor): Promise<void> {
    if (!TAG_RE.test(tag)) throw new InvalidArgumentError(`invalid tag ${JSON.stringify(tag)}`);
    const index = await this.readIndex();
    const manifests = index.manifests.filter((m) => m.annotations?.[ANNOTATION_REF_NAME] !== tag);
    manifests.push({ ...desc, annotations: { ...desc.annotations, [ANNOTATION_REF_NAME]: tag } });
    const next: ImageIndex = { ...index, schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_INDEX, manifests };
    await writeAtomic(path.join(this.dir, OCI_INDEX_FILE), JSON.stringify(next));
  }
}
