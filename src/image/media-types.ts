/**
 * The OCI image model convert needs: media types, descriptors, manifests, indexes, configs, and the
 * Docker schema2 -> OCI mapping. Parsing checks the shape we rely on and nothing more; unknown fields are
 * kept (config, annotations) so a converted image loses nothing the source carried.
 */
import { InvalidArgumentError } from '../errors';

export const MEDIA_TYPE_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_TYPE_OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const MEDIA_TYPE_OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
export const MEDIA_TYPE_OCI_LAYER = 'application/vnd.oci.image.layer.v1.tar';
export const MEDIA_TYPE_OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
export const MEDIA_TYPE_OCI_LAYER_ZSTD = 'application/vnd.oci.image.layer.v1.tar+zstd';
export const MEDIA_TYPE_OCI_LAYER_NONDIST_GZIP = 'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip';

export const MEDIA_TYPE_DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
export const MEDIA_TYPE_DOCKER_MANIFEST_LIST = 'application/vnd.docker.distribution.manifest.list.v2+json';
export const MEDIA_TYPE_DOCKER_CONFIG = 'application/vnd.docker.container.image.v1+json';
export const MEDIA_TYPE_DOCKER_LAYER_GZIP = 'application/vnd.docker.image.rootfs.diff.tar.gzip';
export const MEDIA_TYPE_DOCKER_LAYER = 'application/vnd.docker.image.rootfs.diff.tar';
export const MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP = 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip';

/** Layer annotation: sha256 of the uncompressed TOC JSON (reference §1.8); containerd passes it to the snapshotter. */
export const ANNOTATION_TOC_DIGEST = 'containerd.io/snapshot/stargz/toc.digest';
/** Layer annotation: decimal byte length of the decompressed layer (Stargz Store reads it). */
export const ANNOTATION_UNCOMPRESSED_SIZE = 'io.containers.estargz.uncompressed-size';
/** zstd:chunked layer annotations, dropped from a re-converted layer. */
export const ANNOTATION_ZSTD_CHUNKED_MANIFEST_CHECKSUM = 'io.containers.zstd-chunked.manifest-checksum';
export const ANNOTATION_ZSTD_CHUNKED_MANIFEST_POSITION = 'io.containers.zstd-chunked.manifest-position';
/** Tag of a manifest in an OCI layout's index.json. */
export const ANNOTATION_REF_NAME = 'org.opencontainers.image.ref.name';
/** BuildKit marks attestation manifests in an index with this annotation. */
export const ANNOTATION_DOCKER_REFERENCE_TYPE = 'vnd.docker.reference.type';

/** Annotations a converted layer must not inherit: they describe the old blob. */
const STALE_LAYER_ANNOTATIONS = new Set([
  ANNOTATION_TOC_DIGEST,
  ANNOTATION_UNCOMPRESSED_SIZE,
  ANNOTATION_ZSTD_CHUNKED_MANIFEST_CHECKSUM,
  ANNOTATION_ZSTD_CHUNKED_MANIFEST_POSITION,
]);

export interface Platform {
  architecture: string;
  os: string;
  variant?: string;
  'os.version'?: string;
  'os.features'?: string[];
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: Platform;
  urls?: string[];
}

export interface ImageManifest {
  schemaVersion: 2;
  mediaType?: string;
  config: Descriptor;
  layers: Descriptor[];
  annotations?: Record<string, string>;
  /** Other fields (artifactType, subject...), kept as they were. */
  [key: string]: unknown;
}

export interface ImageIndex {
  schemaVersion: 2;
  mediaType?: string;
  manifests: Descriptor[];
  annotations?: Record<string, string>;
  [key: string]: unknown;
}

/** The parts of an image config convert reads or rewrites; everything else is kept verbatim. */
export interface ImageConfig {
  architecture?: string;
  os?: string;
  variant?: string;
  rootfs: { type: string; diff_ids: string[] };
  [key: string]: unknown;
}

export type ParsedManifest = { kind: 'manifest'; manifest: ImageManifest } | { kind: 'index'; index: ImageIndex };

export function isIndexMediaType(mediaType: string): boolean {
  return mediaType === MEDIA_TYPE_OCI_INDEX || mediaType === MEDIA_TYPE_DOCKER_MANIFEST_LIST;
}

export function isManifestMediaType(mediaType: string): boolean {
  return mediaType === MEDIA_TYPE_OCI_MANIFEST || mediaType === MEDIA_TYPE_DOCKER_MANIFEST;
}

/** The OCI media type for a Docker one; OCI and unknown types come back unchanged. */
export function toOciMediaType(mediaType: string): string {
  switch (mediaType) {
    case MEDIA_TYPE_DOCKER_MANIFEST:
      return MEDIA_TYPE_OCI_MANIFEST;
    case MEDIA_TYPE_DOCKER_MANIFEST_LIST:
      return MEDIA_TYPE_OCI_INDEX;
    case MEDIA_TYPE_DOCKER_CONFIG:
      return MEDIA_TYPE_OCI_CONFIG;
    case MEDIA_TYPE_DOCKER_LAYER_GZIP:
      return MEDIA_TYPE_OCI_LAYER_GZIP;
    case MEDIA_TYPE_DOCKER_LAYER:
      return MEDIA_TYPE_OCI_LAYER;
    case MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP:
      return MEDIA_TYPE_OCI_LAYER_NONDIST_GZIP;
    default:
      return mediaType;
  }
}

/** How a layer blob is compressed, from its media type; undefined when it is not a tar layer at all. */
export function layerCompression(mediaType: string): 'gzip' | 'zstd' | 'none' | undefined {
  switch (mediaType) {
    case MEDIA_TYPE_OCI_LAYER_GZIP:
    case MEDIA_TYPE_DOCKER_LAYER_GZIP:
    case MEDIA_TYPE_OCI_LAYER_NONDIST_GZIP:
    case MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP:
      return 'gzip';
    case MEDIA_TYPE_OCI_LAYER_ZSTD:
      return 'zstd';
    case MEDIA_TYPE_OCI_LAYER:
    case MEDIA_TYPE_DOCKER_LAYER:
      return 'none';
    default:
      return undefined;
  }
}

/** Non-distributable (foreign) layers must not be pushed elsewhere; convert leaves them as they are. */
export function isNonDistributable(mediaType: string): boolean {
  return mediaType === MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP || mediaType.startsWith('application/vnd.oci.image.layer.nondistributable.');
}

/** A layer's annotations without the ones that described the source blob. */
export function carriedLayerAnnotations(annotations: Record<string, string> | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(annotations ?? {})) if (!STALE_LAYER_ANNOTATIONS.has(k)) out[k] = v;
  return out;
}

function bad(what: string, why: string): InvalidArgumentError {
  return new InvalidArgumentError(`${what}: ${why}`);
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;

export function checkDescriptor(v: unknown, what: string): Descriptor {
  if (!isRecord(v)) throw bad(what, 'descriptor is not an object');
  if (typeof v.mediaType !== 'string' || v.mediaType === '') throw bad(what, 'descriptor has no mediaType');
  if (typeof v.digest !== 'string' || !DIGEST_RE.test(v.digest)) throw bad(what, `descriptor digest ${JSON.stringify(v.digest)} is not sha256:<64 hex>`);
  if (typeof v.size !== 'number' || !Number.isSafeInteger(v.size) || v.size < 0) throw bad(what, `descriptor ${v.digest} has a bad size`);
  if (v.annotations !== undefined && !isStringMap(v.annotations)) throw bad(what, `descriptor ${v.digest} has bad annotations`);
  return v as unknown as Descriptor;
}

function isStringMap(v: unknown): v is Record<string, string> {
  return isRecord(v) && Object.values(v).every((x) => typeof x === 'string');
}

/**
 * Parses a manifest or index body. `mediaType` is what the registry or the parent descriptor said; the
 * body's own mediaType field wins when present, and a body with `manifests` is an index either way.
 */
export function parseManifest(body: Buffer, mediaType: string, what: string): ParsedManifest {
  let doc: unknown;
  try {
    doc = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw bad(what, `not JSON (${err instanceof Error ? err.message : String(err)})`);
  }
  if (!isRecord(doc)) throw bad(what, 'not a JSON object');
  if (doc.schemaVersion !== 2) throw bad(what, `schemaVersion ${JSON.stringify(doc.schemaVersion)} is not supported (want 2)`);
  const type = typeof doc.mediaType === 'string' && doc.mediaType !== '' ? doc.mediaType : mediaType;
  if (isIndexMediaType(type) || (Array.isArray(doc.manifests) && !Array.isArray(doc.layers))) {
    if (!Array.isArray(doc.manifests)) throw bad(what, 'index has no manifests list');
    doc.manifests.forEach((m, i) => checkDescriptor(m, `${what} manifests[${i}]`));
    return { kind: 'index', index: doc as unknown as ImageIndex };
  }
  if (!Array.isArray(doc.layers)) throw bad(what, `media type ${JSON.stringify(type)} is neither an image manifest nor an index`);
  checkDescriptor(doc.config, `${what} config`);
  doc.layers.forEach((l, i) => checkDescriptor(l, `${what} layers[${i}]`));
  return { kind: 'manifest', manifest: doc as unknown as ImageManifest };
}

export function parseConfig(body: Buffer, what: string): ImageConfig {
  let doc: unknown;
  try {
    doc = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw bad(what, `not JSON (${err instanceof Error ? err.message : String(err)})`);
  }
  if (!isRecord(doc)) throw bad(what, 'not a JSON object');
  const rootfs = doc.rootfs;
  if (!isRecord(rootfs) || !Array.isArray(rootfs.diff_ids) || !rootfs.diff_ids.every((d) => typeof d === 'string')) {
    throw bad(what, 'has no rootfs.diff_ids');
  }
  return doc as unknown as ImageConfig;
}
