/**
 * TOCs of mounted layers, kept on disk so a layer can be mounted again without the registry: after a
 * restart of the FUSE server (or of the machine) with the registry unreachable, startup does not wait for
 * it, layers whose chunks are all in the disk cache keep serving, and the others come back once it is.
 *
 * A file holds one line of JSON (blob size, TOC offset, TOC digest) and then the TOC JSON exactly as the
 * blob stores it. It is trusted only when that JSON hashes to the digest the caller expects (the
 * manifest's toc.digest annotation): a stale or tampered file is ignored.
 *
 * The files count toward `disk_max_bytes` through the root's byte budget (disk-budget.ts): a TOC no mounted
 * layer needs can be evicted like a chunk, least recently used first; the TOC of a mounted layer is pinned,
 * since a restarted FUSE server mounts the layer again from it. Recency survives restarts as the files' mtimes.
 */
import { createHash, randomBytes } from 'node:crypto';
import { type FileHandle, mkdir, open, readdir, readFile, rename, rm, stat, utimes } from 'node:fs/promises';
import path from 'node:path';
import type { BudgetAccount, RestoredEntry } from './disk-budget';

const DIGEST_PATTERN = /^sha256:([0-9a-f]{64})$/;
/** A cached TOC larger than this is not read back (the parser's own bound is 64 MiB). */
const MAX_FILE_BYTES = 80 * 1024 * 1024;
/** Files being written carry this prefix until renamed; leftovers from a crash are removed by scan(). */
const TEMP_PREFIX = '.tmp-';
const FILE_PATTERN = /^([0-9a-f]{64})\.toc$/;

export interface CachedToc {
  blobSize: number;
  tocOffset: number;
  tocJson: Buffer;
}

export class TocCache {
  /** `budget`: the root's byte budget, which counts these files and may evict those not pinned. */
  constructor(
    private readonly dir: string,
    private readonly budget?: BudgetAccount,
  ) {}

  /**
   * Reports the files a previous process left to the budget (and removes its temp files). Asynchronous and
   * meant to run after startup: until it is done, only TOCs saved since are counted.
   */
  async scan(): Promise<{ files: number; bytes: number }> {
    const found = { files: 0, bytes: 0 };
    const entries: RestoredEntry[] = [];
    const names = await readdir(this.dir).catch(() => [] as string[]);
    for (const name of names) {
      const file = path.join(this.dir, name);
      if (name.startsWith(TEMP_PREFIX)) {
        await rm(file, { force: true }).catch(() => undefined);
        continue;
      }
      const hex = FILE_PATTERN.exec(name)?.[1];
      if (hex === undefined) continue;
      const st = await stat(file).catch(() => undefined);
      if (!st?.isFile()) continue;
      found.files++;
      found.bytes += st.size;
      entries.push({ key: hex, bytes: st.size, lastUsedMs: st.mtimeMs, evict: this.evictor(hex) });
    }
    this.budget?.restore(entries);
    return found;
  }

  /** Keeps the TOC of `layerDigest` from being evicted while a mounted layer needs it; counted. */
  pin(layerDigest: string): void {
    const hex = DIGEST_PATTERN.exec(layerDigest)?.[1];
    if (hex !== undefined) this.budget?.pin(hex);
  }

  unpin(layerDigest: string): void {
    const hex = DIGEST_PATTERN.exec(layerDigest)?.[1];
    if (hex !== undefined) this.budget?.unpin(hex);
  }

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
    const hex = DIGEST_PATTERN.exec(layerDigest)![1]!;
    this.budget?.touch(hex);
    // The mtime is its recency after a restart. TOCs are loaded once per mount: no need to throttle.
    const now = Date.now() / 1000;
    void utimes(file, now, now).catch(() => undefined);
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
    const temp = path.join(this.dir, `${TEMP_PREFIX}${randomBytes(8).toString('hex')}`);
    const meta = Buffer.from(JSON.stringify({ blobSize: toc.blobSize, tocOffset: toc.tocOffset }) + '\n');
    const bytes = meta.length + toc.tocJson.length;
    const hex = DIGEST_PATTERN.exec(layerDigest)![1]!;
    // Counted from the first byte written: the budget makes room before the write, not after. Refused when
    // there is no room for a layer not mounted: it would be evicted at once.
    const release = this.budget?.reserve(bytes, hex);
    if (this.budget !== undefined && release === undefined) return;
    try {
      await mkdir(this.dir, { recursive: true, mode: 0o700 });
      // Two buffers in one write: the TOC JSON (megabytes) is not copied on the main thread to join its header.
      const fh = await open(temp, 'wx', 0o600);
      try {
        await writeAll(fh, [meta, toc.tocJson]);
      } finally {
        await fh.close();
      }
      await rename(temp, file);
      release?.();
      this.budget?.add(hex, bytes, this.evictor(hex));
    } catch {
      await rm(temp, { force: true }).catch(() => undefined);
    } finally {
      release?.();
    }
  }

  private evictor(hex: string): () => void {
    const file = path.join(this.dir, `${hex}.toc`);
    return () => void rm(file, { force: true }).catch(() => undefined);
  }

  private file(layerDigest: string): string | undefined {
    const hex = DIGEST_PATTERN.exec(layerDigest)?.[1];
    return hex === undefined ? undefined : path.join(this.dir, `${hex}.toc`);
  }
}

/** writev until every byte is written: a short write (a full disk frees up, a signal) continues where it stopped. */
async function writeAll(fh: FileHandle, buffers: Buffer[]): Promise<void> {
  let pending = buffers.filter((b) => b.length > 0);
  while (pending.length > 0) {
    let { bytesWritten } = await fh.writev(pending);
    if (bytesWritten === 0) throw new Error('writev wrote nothing');
    const rest: Buffer[] = [];
    for (const b of pending) {
      if (bytesWritten >= b.length) bytesWritten -= b.length;
      else {
        rest.push(bytesWritten > 0 ? b.subarray(bytesWritten) : b);
        bytesWritten = 0;
      }
    }
    pending = rest;
  }
}
