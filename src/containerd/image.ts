/**
 * The image side of a pull, after containerd's images package: media types, parsing indexes, manifests and
 * configs, chain IDs, and the labels containerd puts on content and snapshots so that its garbage collector
 * keeps an image's parts alive (images.ChildGCLabels, the unpacker's gc.ref.snapshot label,
 * docker.AppendDistributionSourceLabel).
 */
import { createHash } from 'node:crypto';
import { RegistryError } from '../errors';
import { validateDigest } from '../remote/reference';
import type { Descriptor } from './types';

export const MEDIA_TYPE_OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const MEDIA_TYPE_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_TYPE_OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
export const MEDIA_TYPE_DOCKER_MANIFEST_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';
export const MEDIA_TYPE_DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
export const MEDIA_TYPE_DOCKER_CONFIG = 'application/vnd.docker.container.image.v1+json';
export const MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST = 'application/vnd.docker.distribution.manifest.v1+prettyjws';
const DOCKER_LAYER_TYPES = new Set([
  'application/vnd.docker.image.rootfs.diff.tar',
  'application/vnd.docker.image.rootfs.diff.tar.gzip',
  'application/vnd.docker.image.rootfs.foreign.diff.tar',
  'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
]);

// --- GC and distribution labels (containerd's garbage collector contract) ---

/** On a manifest: its config blob. */
export const GC_REF_CONTENT_CONFIG = 'containerd.io/gc.ref.content.config';
/** On an index: `<prefix><i>` for its i-th manifest. */
export const GC_REF_CONTENT_MANIFEST_PREFIX = 'containerd.io/gc.ref.content.m.';
/** On a manifest: `<prefix><i>` for its i-th layer (a lazily pulled layer is simply absent from the store). */
export const GC_REF_CONTENT_LAYER_PREFIX = 'containerd.io/gc.ref.content.l.';
/** Any other child: `<prefix><i>`. */
export const GC_REF_CONTENT_PREFIX = 'containerd.io/gc.ref.content.';
/** On a config: `<prefix><snapshotter>` = chainID of the top layer, keeping the unpacked snapshots alive. */
export const GC_REF_SNAPSHOT_PREFIX = 'containerd.io/gc.ref.snapshot.';
/** On a lease: RFC 3339 time after which the lease is garbage collected. */
export const GC_EXPIRE = 'containerd.io/gc.expire';
/** On a blob: `<prefix><registry hostname>` = comma list of repositories it came from. */
export const DISTRIBUTION_SOURCE_PREFIX = 'containerd.io/distribution.source.';
/** On a layer blob, after it was applied: its diffID (uncompressed digest). */
export const UNCOMPRESSED = 'containerd.io/uncompressed';
/** Annotations with this prefix are passed to the snapshotter as labels (snapshots.FilterInheritedLabels). */
export const INHERITED_SNAPSHOT_LABEL_PREFIX = 'containerd.io/snapshot/';
/** containerd's labels.Validate limit: key plus value bytes. */
export const MAX_LABEL_BYTES = 4096;

export interface ImageIndex {
  mediaType?: string;
  manifests: (Descriptor & { platform?: { os: string; architecture: string; variant?: string } })[];
}

export interface ImageManifest {
  mediaType?: string;
  config: Descriptor;
  layers: Descriptor[];
}

export interface ImageConfig {
  os?: string;
  architecture?: string;
  rootfs: { type: string; diff_ids: string[] };
}

export function isIndexType(mt: string): boolean {
  return mt === MEDIA_TYPE_OCI_INDEX || mt === MEDIA_TYPE_DOCKER_MANIFEST_LIST;
}

export function isManifestType(mt: string): boolean {
  return mt === MEDIA_TYPE_OCI_MANIFEST || mt === MEDIA_TYPE_DOCKER_MANIFEST;
}

export function isConfigType(mt: string): boolean {
  return mt === MEDIA_TYPE_OCI_CONFIG || mt === MEDIA_TYPE_DOCKER_CONFIG;
}

/** images.IsLayerType: OCI layer types (any compression, +encrypted...) and Docker's rootfs diffs. */
export function isLayerType(mt: string): boolean {
  if (mt.startsWith('application/vnd.oci.image.layer.')) return true;
  return DOCKER_LAYER_TYPES.has(mt.split('+')[0] as string);
}

/** images.ChildGCLabels: the label key prefix (or key) a parent uses to reference a child of this type. */
export function childGcLabel(mediaType: string): string {
  if (isConfigType(mediaType)) return GC_REF_CONTENT_CONFIG;
  if (isManifestType(mediaType)) return GC_REF_CONTENT_MANIFEST_PREFIX;
  if (isLayerType(mediaType)) return GC_REF_CONTENT_LAYER_PREFIX;
  return GC_REF_CONTENT_PREFIX;
}

/**
 * images.SetChildrenMappedLabels: one label per child. Keys ending in '.' get the child's index among
 * children with the same key; others get an index only from the second on.
 */
export function childrenGcLabels(children: readonly Descriptor[]): Record<string, string> {
  const labels: Record<string, string> = {};
  const seen = new Map<string, number>();
  for (const child of children) {
    const key = childGcLabel(child.mediaType);
    const idx = seen.get(key) ?? 0;
    seen.set(key, idx + 1);
    labels[idx > 0 || key.endsWith('.') ? `${key}${idx}` : key] = child.digest;
  }
  return labels;
}

/** docker.AppendDistributionSourceLabel's key: the registry's host name without port (url.Hostname()). */
export function distributionSourceKey(registryHost: string): string {
  return `${DISTRIBUTION_SOURCE_PREFIX}${new URL(`dummy://${registryHost}`).hostname.replace(/^\[|\]$/g, '')}`;
}

/** docker.AppendDistributionSourceLabel's value: `repository` merged into the comma list, sorted, no duplicates. */
export function appendDistributionSource(existing: string | undefined, repository: string): string {
  const repos = new Set((existing ?? '').split(',').filter((r) => r !== ''));
  repos.add(repository);
  return [...repos].sort().join(',');
}

export function labelFits(key: string, value: string): boolean {
  return Buffer.byteLength(key) + Buffer.byteLength(value) <= MAX_LABEL_BYTES;
}

/**
 * A layers label's value for layer `i` (stargz's `stargz.layers`, CRI's `cri.image-layers`): this and the
 * following digests, comma-joined, as many as fit the label size limit with `key`, as both clients cut it.
 * The two keys allow the same number of sha256 digests (56), so an image's layers labels are equal under
 * either, and so are the profile keys made from them (profile-format.ts profileKey).
 */
export function layersLabel(key: string, digests: readonly string[], i: number): string {
  let list = '';
  for (const d of digests.slice(i)) {
    const next = list === '' ? d : `${list},${d}`;
    if (!labelFits(key, next)) break;
    list = next;
  }
  return list;
}

/** identity.ChainID step: the chain ID of `diffId` on top of `parent` (the base layer's is its diffID). */
export function chainIdOf(parent: string | undefined, diffId: string): string {
  if (parent === undefined || parent === '') return diffId;
  return `sha256:${createHash('sha256').update(`${parent} ${diffId}`).digest('hex')}`;
}

/** Chain IDs of every prefix of `diffIds`, base first. */
export function chainIds(diffIds: readonly string[]): string[] {
  const out: string[] = [];
  for (const d of diffIds) out.push(chainIdOf(out[out.length - 1], d));
  return out;
}

function bad(what: string, why: string): RegistryError {
  return new RegistryError(`${what} is not a valid image document: ${why}`);
}

function parseJson(body: Buffer, what: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw bad(what, err instanceof Error ? err.message : String(err));
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw bad(what, 'not a JSON object');
  return v as Record<string, unknown>;
}

function stringMap(v: unknown): Record<string, string> | undefined {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return undefined;
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(v)) if (typeof val === 'string') out[k] = val;
  return out;
}

function parseDescriptor(v: unknown, what: string): Descriptor {
  if (typeof v !== 'object' || v === null) throw bad(what, 'descriptor is not an object');
  const d = v as Record<string, unknown>;
  if (typeof d.digest !== 'string') throw bad(what, 'descriptor without digest');
  try {
    validateDigest(d.digest, 'descriptor digest');
  } catch (err) {
    throw bad(what, err instanceof Error ? err.message : String(err));
  }
  if (typeof d.size !== 'number' || !Number.isSafeInteger(d.size) || d.size < 0) throw bad(what, `descriptor ${d.digest} without a valid size`);
  const annotations = stringMap(d.annotations);
  const urls = Array.isArray(d.urls) ? d.urls.filter((u): u is string => typeof u === 'string') : undefined;
  return {
    mediaType: typeof d.mediaType === 'string' ? d.mediaType : '',
    digest: d.digest,
    size: d.size,
    ...(annotations !== undefined ? { annotations } : {}),
    ...(urls !== undefined && urls.length > 0 ? { urls } : {}),
  };
}

export function parseIndex(body: Buffer, what: string): ImageIndex {
  const j = parseJson(body, what);
  if (!Array.isArray(j.manifests)) throw bad(what, 'no manifests array');
  return {
    mediaType: typeof j.mediaType === 'string' ? j.mediaType : undefined,
    manifests: j.manifests.map((m: unknown) => {
      const d = parseDescriptor(m, what);
      const p = (m as { platform?: unknown }).platform;
      if (typeof p === 'object' && p !== null) {
        const pp = p as Record<string, unknown>;
        if (typeof pp.os === 'string' && typeof pp.architecture === 'string') {
          return { ...d, platform: { os: pp.os, architecture: pp.architecture, ...(typeof pp.variant === 'string' ? { variant: pp.variant } : {}) } };
        }
      }
      return d;
    }),
  };
}

export function parseManifest(body: Buffer, what: string): ImageManifest {
  const j = parseJson(body, what);
  if (j.schemaVersion === 1) throw bad(what, 'Docker schema 1 manifests are not supported');
  if (!Array.isArray(j.layers)) throw bad(what, 'no layers array');
  return {
    mediaType: typeof j.mediaType === 'string' ? j.mediaType : undefined,
    config: parseDescriptor(j.config, what),
    layers: j.layers.map((l: unknown) => parseDescriptor(l, what)),
  };
}

export function parseConfig(body: Buffer, what: string): ImageConfig {
  const j = parseJson(body, what);
  const rootfs = j.rootfs as { type?: unknown; diff_ids?: unknown } | undefined;
  if (typeof rootfs !== 'object' || rootfs === null || !Array.isArray(rootfs.diff_ids)) throw bad(what, 'no rootfs.diff_ids');
  const diffIds = rootfs.diff_ids.map((d: unknown) => {
    if (typeof d !== 'string') throw bad(what, 'a diff_id is not a string');
    try {
      return validateDigest(d, 'diff_id');
    } catch (err) {
      throw bad(what, err instanceof Error ? err.message : String(err));
    }
  });
  return {
    os: typeof j.os === 'string' ? j.os : undefined,
    architecture: typeof j.architecture === 'string' ? j.architecture : undefined,
    rootfs: { type: typeof rootfs.type === 'string' ? rootfs.type : '', diff_ids: diffIds },
  };
}
