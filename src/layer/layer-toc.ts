/**
 * The first steps of a layer's life: resolve its blob in its registry and read its TOC (readLayerToc), then
 * check that TOC against what the mount's labels say it must be (checkTocDigest). What they produce is data:
 * nothing is started until a Layer (layer.ts) is made of it.
 */
import { EstargzFormatError, VerificationError } from '../errors';
import { readTocJson, type LayerCompression } from '../estargz/toc';
import type { Logger } from '../log';
import type { BlobSource } from '../remote/blob-source';
import type { LayerSourceInfo } from '../source/labels';
import { RESOLVE_TAIL_BYTES, withTail, type BlobTail } from './layer-blob';
import type { LayerOptions } from './layer-options';

/** Resolves a layer blob of an image in its registry. RegistryClient implements it. */
export interface BlobResolver {
  resolveBlob(ref: string, digest: string, signal?: AbortSignal): Promise<BlobSource>;
  /** resolveBlob that also reads the blob's last tailBytes in the same request when the host allows. */
  resolveBlobTail?(ref: string, digest: string, tailBytes: number, signal?: AbortSignal): Promise<{ source: BlobSource; tail: BlobTail | undefined }>;
}

/**
 * A layer's blob and TOC, not yet checked against any mount's labels. The JSON is parsed (and validated) only
 * into the layer's tree (layer.ts): no list of entries is kept beside it.
 */
export interface LayerToc {
  blob: BlobSource;
  /** The TOC JSON as stored. */
  tocJson: Buffer;
  /** sha256 of the TOC JSON as read: what checkTocDigest compares with the toc.digest label. */
  tocDigest: string;
  /** It came from the TOC cache (so it need not be saved there again). */
  fromCache: boolean;
  tocOffset: number;
  compression: LayerCompression;
  /** The blob's tail as read with the TOC. */
  tail: BlobTail | undefined;
}

/** Resolves a layer's blob and reads its TOC. */
export async function readLayerToc(registry: BlobResolver, ref: string, digest: string, signal: AbortSignal, log: Logger): Promise<LayerToc> {
  const started = Date.now();
  // The footer and TOC come with the resolve when the registry serves suffix ranges: one round trip, not two.
  const { source: blob, tail: fetchedTail } =
    registry.resolveBlobTail !== undefined
      ? await registry.resolveBlobTail(ref, digest, RESOLVE_TAIL_BYTES, signal)
      : { source: await registry.resolveBlob(ref, digest, signal), tail: undefined };
  const resolvedMs = Date.now() - started;
  const tailed = withTail(blob, undefined, fetchedTail);
  const { tocJson, tocDigest, tocOffset, compression } = await readTocJson(tailed, { signal });
  const tail = await tailed.tail();
  log.debug({ layer: digest, resolvedMs, tocMs: Date.now() - started - resolvedMs, tocBytes: blob.size - tocOffset }, 'blob resolved and TOC read');
  return { blob, tocJson, tocDigest, fromCache: false, tocOffset, compression, tail };
}

/**
 * The reference's rule: disable_verification skips; a toc.digest label must match; without one, only a
 * skipverify label plus allow_no_verification mounts unverified.
 */
export function checkTocDigest(
  source: LayerSourceInfo,
  tocDigest: string,
  options: Pick<LayerOptions, 'disableVerification' | 'allowNoVerification'>,
  log: Logger,
): void {
  if (options.disableVerification) return;
  if (source.tocDigest !== undefined) {
    if (source.tocDigest !== tocDigest) {
      throw new VerificationError(`TOC digest ${tocDigest} does not match the manifest's ${source.tocDigest}`);
    }
    return;
  }
  if (source.skipVerify && options.allowNoVerification) {
    log.warn('mounting without TOC verification (skipverify label, allow_no_verification)');
    return;
  }
  throw new EstargzFormatError('digest of TOC JSON must be passed (no containerd.io/snapshot/stargz/toc.digest label)');
}

/** Whether the layer's chunks are checked against their TOC digests (the reference's rule as well). */
export function verifiesChunks(source: LayerSourceInfo, options: Pick<LayerOptions, 'disableVerification'>): boolean {
  return !options.disableVerification && !(source.skipVerify && source.tocDigest === undefined);
}
