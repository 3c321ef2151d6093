/**
 * Resolving an image at its registry: the manifest for a platform, through the index when the reference names
 * one (containerd's resolver and its platform matcher). Apart from pull.ts, and without gRPC, so that rpull can
 * start these round trips before it has loaded the containerd client.
 */
import { RegistryAuthError, RegistryError, StargazeError } from '../errors';
import { parseReference } from '../remote/reference';
import type { RegistryClient } from '../remote/registry-client';
import {
  MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_MANIFEST,
  isIndexType,
  isManifestType,
  parseIndex,
  parseManifest,
  type ImageIndex,
  type ImageManifest,
} from './image';
import { formatPlatform, platformRank, type Platform } from './platforms';
import type { Descriptor } from './types';

/** A manifest with the bytes it came as. */
export interface Fetched<T> {
  desc: Descriptor;
  body: Buffer;
  doc: T;
}

/** An image that is not what a pull can handle (schema 1, no layers matching diff_ids...). */
export class UnsupportedImageError extends StargazeError {
  constructor(message: string) {
    super('ERR_SNAP_INVALID_ARGUMENT', message);
  }
}

/** The registry does not know the image (manifest 404). */
export class ImageNotFoundError extends RegistryError {
  constructor(name: string, cause: RegistryError) {
    super(`image ${name} not found: ${cause.message}`, cause.status);
  }
}

/** The registry refused our credentials (or wanted some we do not have). */
export class ImageAuthError extends RegistryAuthError {
  constructor(name: string, cause: RegistryError | RegistryAuthError) {
    super(`not authorized to pull ${name}: ${cause.message} (pass --user USER:PASS, or log in with docker login)`);
  }
}

/** The manifest (and index) of an image at the registry, for the wanted platform. */
export interface ResolvedManifest {
  target: Fetched<unknown>;
  index: Fetched<ImageIndex> | undefined;
  manifest: Fetched<ImageManifest>;
  platform: string | undefined;
}

/** The manifest's media type: the Content-Type if it is a known one, else the document's own mediaType field. */
function manifestMediaType(contentType: string, body: Buffer): string {
  if (isIndexType(contentType) || isManifestType(contentType) || contentType === MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST) return contentType;
  try {
    const j = JSON.parse(body.toString('utf8')) as { mediaType?: unknown; manifests?: unknown; schemaVersion?: unknown; config?: unknown };
    if (typeof j.mediaType === 'string' && j.mediaType !== '') return j.mediaType;
    if (j.schemaVersion === 1) return MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST;
    if (Array.isArray(j.manifests)) return MEDIA_TYPE_OCI_INDEX;
    if (j.config !== undefined) return MEDIA_TYPE_OCI_MANIFEST;
  } catch {
    // not JSON: reported below by the type check
  }
  return contentType;
}

/** Resolves `ref` at the registry: the manifest for `wanted`, through the index when the reference names one. */
export async function resolveManifest(registry: RegistryClient, ref: string, wanted: Platform, signal?: AbortSignal): Promise<ResolvedManifest> {
  const reference = parseReference(ref);
  const name = reference.toString();
  let top;
  try {
    top = await registry.fetchManifest(name, undefined, signal);
  } catch (err) {
    if (err instanceof RegistryAuthError || (err instanceof RegistryError && (err.status === 401 || err.status === 403))) throw new ImageAuthError(name, err);
    if (err instanceof RegistryError && err.status === 404) throw new ImageNotFoundError(name, err);
    throw err;
  }
  const topType = manifestMediaType(top.mediaType, top.body);
  const topDesc: Descriptor = { mediaType: topType, digest: top.digest, size: top.body.length };
  if (topType === MEDIA_TYPE_DOCKER_SCHEMA1_MANIFEST) {
    throw new UnsupportedImageError(`${name} is a Docker schema 1 image, which is not supported (push it again with a current client)`);
  }
  if (isManifestType(topType)) {
    const doc = parseManifest(top.body, `manifest ${top.digest} of ${name}`);
    const manifest = { desc: topDesc, body: top.body, doc };
    return { target: manifest, index: undefined, manifest, platform: undefined };
  }
  if (!isIndexType(topType)) throw new UnsupportedImageError(`${name}: the registry answered with media type "${topType}", not an image manifest or index`);

  const index = { desc: topDesc, body: top.body, doc: parseIndex(top.body, `index ${top.digest} of ${name}`) };
  let best: { desc: Descriptor; rank: number } | undefined;
  for (const m of index.doc.manifests) {
    if (!isManifestType(m.mediaType) || m.platform === undefined) continue;
    const rank = platformRank(wanted, m.platform);
    if (rank !== undefined && (best === undefined || rank < best.rank)) best = { desc: m, rank };
  }
  if (best === undefined) {
    const available = index.doc.manifests.flatMap((m) => (m.platform ? [formatPlatform(m.platform)] : [])).join(', ');
    throw new UnsupportedImageError(`${name} has no image for platform ${formatPlatform(wanted)} (it has: ${available || 'none'}); see --platform`);
  }
  const chosen = best.desc;
  const fetched = await registry.fetchManifest(`${reference.name}@${chosen.digest}`, undefined, signal);
  if (fetched.body.length !== chosen.size) {
    throw new RegistryError(`manifest ${chosen.digest} of ${name}: got ${fetched.body.length} bytes, the index says ${chosen.size}`);
  }
  const doc = parseManifest(fetched.body, `manifest ${chosen.digest} of ${name}`);
  const platform = 'platform' in chosen && chosen.platform ? formatPlatform(chosen.platform as Platform) : undefined;
  return {
    target: index,
    index,
    manifest: { desc: { mediaType: chosen.mediaType, digest: chosen.digest, size: chosen.size }, body: fetched.body, doc },
    platform,
  };
}
