/**
 * Labels are the wire contract with containerd and its clients (ctr-remote, CRI, stargaze rpull).
 * Every key we read or write is named here once.
 */

/** Set by containerd's unpacker on Prepare: the chainID the layer will be committed under. Its presence triggers a remote-snapshot attempt. */
export const TARGET_SNAPSHOT_REF = 'containerd.io/snapshot.ref';

/** Set by us on commit of a lazily mounted layer; value REMOTE_SNAPSHOT_VALUE. Marks snapshots to re-mount on restart. */
export const REMOTE_SNAPSHOT = 'containerd.io/snapshot/remote';
export const REMOTE_SNAPSHOT_VALUE = 'remote snapshot';

/** ctr-remote / stargaze rpull: the image reference the layer belongs to. */
export const STARGZ_REFERENCE = 'containerd.io/snapshot/remote/stargz.reference';
/** ctr-remote / stargaze rpull: the layer blob digest. */
export const STARGZ_DIGEST = 'containerd.io/snapshot/remote/stargz.digest';
/** ctr-remote / stargaze rpull: comma list of this and the following layers' digests. */
export const STARGZ_LAYERS = 'containerd.io/snapshot/remote/stargz.layers';
/** Prefetch size in bytes (decimal). */
export const STARGZ_PREFETCH = 'containerd.io/snapshot/remote/stargz.prefetch';
/** Present when the client allows an unverified mount (needs allow_no_verification in config). */
export const STARGZ_SKIP_VERIFY = 'containerd.io/snapshot/remote/stargz.skipverify';
/**
 * stargaze rpull: the digest of the image's platform manifest (as CRI's cri.manifest-digest), so the mount
 * can look up a prefetch profile pushed as a referrer of it (`stargaze profile push`). ctr-remote sets none.
 */
export const STARGAZE_MANIFEST_DIGEST = 'containerd.io/snapshot/remote/stargaze.manifest-digest';
/** Comma list of the descriptor's urls. */
export const REMOTE_URLS = 'containerd.io/snapshot/remote/urls';

/** containerd CRI's labels, tried before the stargz.* ones. */
export const CRI_IMAGE_REF = 'containerd.io/snapshot/cri.image-ref';
export const CRI_LAYER_DIGEST = 'containerd.io/snapshot/cri.layer-digest';
export const CRI_IMAGE_LAYERS = 'containerd.io/snapshot/cri.image-layers';
export const CRI_MANIFEST_DIGEST = 'containerd.io/snapshot/cri.manifest-digest';

/** Manifest layer annotation, copied by containerd into snapshot labels: sha256 of the uncompressed TOC JSON. */
export const TOC_DIGEST = 'containerd.io/snapshot/stargz/toc.digest';
/** Manifest layer annotation: decimal size of the decompressed layer. */
export const UNCOMPRESSED_SIZE = 'io.containers.estargz.uncompressed-size';

/** What a Prepare's labels say about the layer to mount, CRI labels first as the reference does. */
export interface LayerSourceInfo {
  /** Image reference, e.g. `127.0.0.1:5000/library/busybox:1`. */
  ref: string;
  /** Layer blob digest. */
  digest: string;
  /** The chainID the snapshot will be committed under. */
  chainId: string;
  /** Expected TOC digest, when the manifest carried one. */
  tocDigest: string | undefined;
  /** Prefetch bytes from the label, when present. */
  prefetchBytes: number | undefined;
  skipVerify: boolean;
  /** Digests of this and the following layers of the image, when the client said. */
  layers: string[];
  /** The image's platform manifest digest, when the client said (CRI's label, else ours): where referrers hang. */
  manifestDigest?: string;
}

const DIGEST = /^sha256:[0-9a-f]{64}$/;

/** Returns the layer source from Prepare labels, or undefined when they do not describe a remote layer. */
export function layerSourceFromLabels(labels: Record<string, string>): LayerSourceInfo | undefined {
  const chainId = labels[TARGET_SNAPSHOT_REF];
  const ref = labels[CRI_IMAGE_REF] ?? labels[STARGZ_REFERENCE];
  const digest = labels[CRI_LAYER_DIGEST] ?? labels[STARGZ_DIGEST];
  if (!chainId || !ref || !digest) return undefined;
  const layersLabel = labels[CRI_IMAGE_LAYERS] ?? labels[STARGZ_LAYERS] ?? '';
  const prefetch = labels[STARGZ_PREFETCH];
  const prefetchBytes = prefetch !== undefined && /^\d+$/.test(prefetch) ? Number(prefetch) : undefined;
  return {
    ref,
    digest,
    chainId,
    tocDigest: labels[TOC_DIGEST],
    prefetchBytes,
    skipVerify: labels[STARGZ_SKIP_VERIFY] !== undefined,
    layers: layersLabel.split(',').filter((d) => d.length > 0),
    manifestDigest: [labels[CRI_MANIFEST_DIGEST], labels[STARGAZE_MANIFEST_DIGEST]].find((d) => d !== undefined && DIGEST.test(d)),
  };
}
