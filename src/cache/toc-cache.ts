/**
 * TOCs of mounted layers, kept on disk so a layer can be mounted again without the registry: after a
 * restart of the FUSE server (or of the machine) with the registry unreachable, startup does not wait for
 * it, layers whose chunks are all in the disk cache keep serving, and the others come back once it is.
 *
 * A file holds one line of JSON (blob size, TOC offset, TOC digest) and then the TOC JSON exactly as the
 * blob stores it. It is trusted only when that JSON hashes to the digest the caller expects (the
 * manifest's toc.digest annotation): a stale or tampered file is ignored.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';

const DIGEST_PATTERN = /^sha256:([0-9a-f]{64})$/;
/** A cached TOC larger than this is not read back (the parser's own bound is 64 MiB). */
const MAX_FILE_BYTES = 80 * 1024 * 1024;

export interface CachedToc {
  blobSize: number;
  tocOffset: number;
  tocJson: Buffer;
}

export class TocCache {
  constructor(private readonly dir: string) {}

  /** The cached TOC of layer `layerDigest` whose JSON hashes to `tocDigest`; undefined otherwise. */
  async load(layerDigest: string, tocDigest: string): Promise<CachedToc | undefined> {
    const file = this.file(layerDigest);
    if (!file) return undefined;
    const data = await readFile(file).catch(() => undefined);
    if (!data || data.length > MAX_FILE_BYTES) return undefined;
    const newline = data.indexOf(0x0a);
    if (newline < 0) return undefined;
    let meta: unknown;
    try {
      meta = JSON.parse(data.subarray(0, newline).toString('utf8'));
    } catch {
      return undefined;
    }
    const { blobSize, tocOffset } = (meta ?? {}) as { blobSize?: unknown; tocOffset?: unknown };
    if (!Number.isSafeInteger(blobSize) || !Number.isSafeInteger(tocOffset)) return undefined;
    const tocJson = data.subarray(newline + 1);
    if ('sha256:' + createHash('sha256').update(tocJson).digest('hex') !== tocDigest) return undefined;
    return { blobSize: blobSize as number, tocOffset: tocOffset as number, tocJson };
  }

  /** Whether a TOC of layer `layerDigest` is stored (not whether it is the right one: load() checks that). */
  async has(layerDigest: string): Promise<boolean> {
    const file = this.file(layerDigest);
    return file !== undefined && (await stat(file).then((st) => st.isFile(), () => false));
  }

  /** Stores a verified TOC; atomic (write, then rename). A failure only costs the next mount a fetch. */
  async save(layerDigest: string, toc: CachedToc): Promise<void> {
    const file = this.file(layerDigest);
    if (!file) return;
    const temp = path.join(this.dir, `.tmp-${randomBytes(8).toString('hex')}`);
    try {
      await mkdir(this.dir, { recursive: true, mode: 0o700 });
      const meta = Buffer.from(JSON.stringify({ blobSize: toc.blobSize, tocOffset: toc.tocOffset }) + '\n');
      await writeFile(temp, Buffer.concat([meta, toc.tocJson]), { mode: 0o600 });
      await rename(temp, file);
    } catch {
      await rm(temp, { force: true }).catch(() => undefined);
    }
  }

  private file(layerDigest: string): string | undefined {
    const hex = DIGEST_PATTERN.exec(layerDigest)?.[1];
    return hex === undefined ? undefined : path.join(this.dir, `${hex}.toc`);
  }
}
