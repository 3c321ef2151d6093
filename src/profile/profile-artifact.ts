/**
 * Prefetch profiles as an OCI artifact (`stargaze profile push`, layer/profile-fetch.ts): a plain OCI image
 * manifest, as the OCI 1.1 image spec's artifact guidance has it, so any registry stores it and any tool shows it:
 *
 *   artifactType  ARTIFACT_TYPE
 *   config        the empty descriptor (`{}`, application/vnd.oci.empty.v1+json)
 *   layers        one blob per image layer that has a profile (PROFILE_MEDIA_TYPE, profile-format.ts JSON),
 *                 annotated with that layer's digest and TOC digest, so a mount downloads only its own
 *   subject       the image's platform manifest
 *
 * A blob per layer rather than one holding the set: a mount needs only its layer's profile, and a layer's blob
 * is the same bytes across pushes of images that share it, so the registry stores it once.
 *
 * Findable through the referrers API, or through the referrers tag schema: the tag `sha256-<hex of the
 * subject>` names an OCI index listing the referrers. Updating that tag is a read, merge and write with no
 * lock: two pushers at once may lose one listing (last writer wins), which the spec allows.
 *
 * Nothing read here is trusted: parsing checks types, digests and bounds, and each profile is checked again as
 * a local one (profile-format.ts parseProfile) before it is used.
 */
import { createHash } from 'node:crypto';
import { ProfileError } from '../errors';
import { MAX_PROFILE_FILE_BYTES, serializeProfile, type PrefetchProfile } from './profile-format';

/** The artifact's `artifactType`: what referrers lookups filter on. */
export const ARTIFACT_TYPE = 'application/vnd.stargaze.prefetch-profile.v1+json';
/** Media type of each profile blob (one layer's profile, profile-format.ts). */
export const PROFILE_MEDIA_TYPE = 'application/vnd.stargaze.prefetch-profile.layer.v1+json';
/** Annotation of a profile blob: the image layer it is the profile of. */
export const LAYER_ANNOTATION = 'dev.stargaze.prefetch-profile.layer';
/** Annotation of a profile blob: that layer's TOC digest. */
export const TOC_DIGEST_ANNOTATION = 'dev.stargaze.prefetch-profile.toc-digest';
/** When the artifact was pushed: the newest of several referrers is used. */
export const CREATED_ANNOTATION = 'org.opencontainers.image.created';

export const MEDIA_TYPE_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_TYPE_OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
/** OCI 1.1's empty descriptor: the config of an artifact that has none. */
export const EMPTY_CONFIG_BYTES = Buffer.from('{}');
export const EMPTY_DESCRIPTOR = {
  mediaType: 'application/vnd.oci.empty.v1+json',
  digest: 'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a',
  size: 2,
  data: 'e30=',
} as const;

/** Profile blobs one artifact may list: more layers than any image has (containerd's overlay limit is 128). */
export const MAX_ARTIFACT_LAYERS = 256;
/** Referrers one index may list before the rest are ignored (a tag-schema index grows with every push). */
export const MAX_REFERRERS = 1024;

const DIGEST = /^sha256:[0-9a-f]{64}$/;

export interface OciDescriptor {
  mediaType: string;
  digest: string;
  size: number;
  artifactType?: string;
  annotations?: Record<string, string>;
}

export interface ProfileArtifact {
  /** The manifest's bytes, to PUT by digest. */
  manifest: Buffer;
  /** Its descriptor, with artifactType and annotations, as a referrers index lists it. */
  descriptor: OciDescriptor;
  /** The blobs to push before it: the empty config, then the profiles. */
  blobs: Array<{ descriptor: OciDescriptor; bytes: Buffer }>;
}

/** One profile blob of an artifact: which layer and TOC it says it is for, and where it is. */
export interface ArtifactProfileBlob {
  layer: string;
  tocDigest: string | undefined;
  descriptor: OciDescriptor;
}

export function sha256Digest(bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

/** The referrers tag schema's tag for `digest`: `<alg>-<hex>`. */
export function referrersTag(digest: string): string {
  if (!DIGEST.test(digest)) throw new ProfileError(`${JSON.stringify(digest)} is not a sha256 digest`);
  return digest.replace(':', '-');
}

/** The artifact holding `profiles` (at most one per layer) for the image whose platform manifest is `subject`. */
export function buildProfileArtifact(subject: OciDescriptor, profiles: readonly PrefetchProfile[], created: Date): ProfileArtifact {
  if (profiles.length === 0) throw new ProfileError('an artifact needs at least one profile');
  if (profiles.length > MAX_ARTIFACT_LAYERS) throw new ProfileError(`${profiles.length} profiles are more than an artifact holds (${MAX_ARTIFACT_LAYERS})`, 'oversized');
  const blobs: ProfileArtifact['blobs'] = [];
  const layers: OciDescriptor[] = [];
  for (const p of profiles) {
    const bytes = serializeProfile(p);
    const descriptor: OciDescriptor = {
      mediaType: PROFILE_MEDIA_TYPE,
      digest: sha256Digest(bytes),
      size: bytes.length,
      annotations: { [LAYER_ANNOTATION]: p.layer, [TOC_DIGEST_ANNOTATION]: p.tocDigest },
    };
    layers.push(descriptor);
    blobs.push({ descriptor, bytes });
  }
  const createdText = created.toISOString();
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPE_OCI_MANIFEST,
      artifactType: ARTIFACT_TYPE,
      config: EMPTY_DESCRIPTOR,
      layers,
      subject: { mediaType: subject.mediaType, digest: subject.digest, size: subject.size },
      annotations: { [CREATED_ANNOTATION]: createdText },
    }),
  );
  return {
    manifest,
    descriptor: {
      mediaType: MEDIA_TYPE_OCI_MANIFEST,
      digest: sha256Digest(manifest),
      size: manifest.length,
      artifactType: ARTIFACT_TYPE,
      annotations: { [CREATED_ANNOTATION]: createdText },
    },
    blobs: [{ descriptor: { mediaType: EMPTY_DESCRIPTOR.mediaType, digest: EMPTY_DESCRIPTOR.digest, size: EMPTY_DESCRIPTOR.size }, bytes: EMPTY_CONFIG_BYTES }, ...blobs],
  };
}

/**
 * The profile blobs an artifact manifest lists, checked: an OCI manifest of ARTIFACT_TYPE whose subject is
 * `subjectDigest`, each blob of PROFILE_MEDIA_TYPE, a sha256 digest and at most MAX_PROFILE_FILE_BYTES, naming
 * its layer. Throws ProfileError when the manifest is not such an artifact.
 */
export function parseProfileArtifact(body: Buffer, subjectDigest: string): ArtifactProfileBlob[] {
  const doc = parseJsonObject(body, 'profile artifact');
  if (doc.mediaType !== undefined && doc.mediaType !== MEDIA_TYPE_OCI_MANIFEST) throw new ProfileError(`profile artifact has media type ${JSON.stringify(doc.mediaType)}`);
  if (doc.artifactType !== ARTIFACT_TYPE) throw new ProfileError(`artifact type ${JSON.stringify(doc.artifactType) ?? 'undefined'} is not ${ARTIFACT_TYPE}`, 'foreign');
  const subject = doc.subject;
  if (!isRecord(subject) || subject.digest !== subjectDigest) throw new ProfileError(`profile artifact is not about manifest ${subjectDigest}`, 'foreign');
  if (!Array.isArray(doc.layers)) throw new ProfileError('profile artifact has no layers list');
  if (doc.layers.length > MAX_ARTIFACT_LAYERS) throw new ProfileError(`profile artifact lists ${doc.layers.length} blobs, more than ${MAX_ARTIFACT_LAYERS}`, 'oversized');
  return doc.layers.map((l: unknown, i): ArtifactProfileBlob => {
    const d = descriptorOf(l, `profile artifact layer ${i}`);
    if (d.mediaType !== PROFILE_MEDIA_TYPE) throw new ProfileError(`profile artifact layer ${i} has media type ${d.mediaType}, not ${PROFILE_MEDIA_TYPE}`);
    if (d.size > MAX_PROFILE_FILE_BYTES) throw new ProfileError(`profile artifact layer ${i} is ${d.size} bytes, more than ${MAX_PROFILE_FILE_BYTES}`, 'oversized');
    const layer = d.annotations?.[LAYER_ANNOTATION];
    if (layer === undefined || !DIGEST.test(layer)) throw new ProfileError(`profile artifact layer ${i} names no layer digest`);
    const toc = d.annotations?.[TOC_DIGEST_ANNOTATION];
    return { layer, tocDigest: toc !== undefined && DIGEST.test(toc) ? toc : undefined, descriptor: d };
  });
}

/**
 * The profile artifacts a referrers index (the API's answer or the tag schema's index) lists, newest first: by
 * their created annotation, then later in the list before earlier (a tag-schema push appends). Entries of
 * other artifact types are skipped, as a registry need not filter; a malformed index throws ProfileError.
 */
export function profileReferrers(index: Buffer): OciDescriptor[] {
  const doc = parseJsonObject(index, 'referrers index');
  if (!Array.isArray(doc.manifests)) throw new ProfileError('referrers index has no manifests list');
  const found: Array<{ d: OciDescriptor; at: number; i: number }> = [];
  doc.manifests.slice(0, MAX_REFERRERS).forEach((m: unknown, i) => {
    if (!isRecord(m) || m.artifactType !== ARTIFACT_TYPE) return;
    let d: OciDescriptor;
    try {
      d = descriptorOf(m, `referrer ${i}`);
    } catch {
      return; // one bad entry does not hide the others
    }
    if (d.mediaType !== MEDIA_TYPE_OCI_MANIFEST) return;
    const at = Date.parse(d.annotations?.[CREATED_ANNOTATION] ?? '');
    found.push({ d, at: Number.isNaN(at) ? 0 : at, i });
  });
  return found.sort((a, b) => b.at - a.at || b.i - a.i).map((f) => f.d);
}

/**
 * The tag schema's index for a subject once `added` is pushed: what `existing` listed (every artifact type,
 * kept as it was), `added` appended, an earlier listing of the same digest dropped. An unreadable `existing`
 * is replaced: the tag is ours to fix, and what it listed is still in the registry.
 */
export function mergeReferrersIndex(existing: Buffer | undefined, added: OciDescriptor): { body: Buffer; kept: number; replacedUnreadable: boolean } {
  let manifests: unknown[] = [];
  let replacedUnreadable = false;
  if (existing !== undefined) {
    try {
      const doc = parseJsonObject(existing, 'referrers index');
      if (!Array.isArray(doc.manifests)) throw new ProfileError('referrers index has no manifests list');
      manifests = doc.manifests.filter((m) => !(isRecord(m) && m.digest === added.digest));
    } catch {
      replacedUnreadable = true;
    }
  }
  const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_INDEX, manifests: [...manifests, added] }));
  return { body, kept: manifests.length, replacedUnreadable };
}

function descriptorOf(x: unknown, what: string): OciDescriptor {
  if (!isRecord(x)) throw new ProfileError(`${what} is not a descriptor`);
  const { mediaType, digest, size, artifactType, annotations } = x;
  if (typeof mediaType !== 'string') throw new ProfileError(`${what} has no media type`);
  if (typeof digest !== 'string' || !DIGEST.test(digest)) throw new ProfileError(`${what} has no sha256 digest`);
  if (!Number.isSafeInteger(size) || (size as number) < 0) throw new ProfileError(`${what} has no size`);
  const d: OciDescriptor = { mediaType, digest, size: size as number };
  if (typeof artifactType === 'string') d.artifactType = artifactType;
  if (isRecord(annotations)) d.annotations = Object.fromEntries(Object.entries(annotations).filter((e): e is [string, string] => typeof e[1] === 'string'));
  return d;
}

function parseJsonObject(body: Buffer, what: string): Record<string, unknown> {
  let doc: unknown;
  try {
    doc = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new ProfileError(`${what} is not JSON: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (!isRecord(doc)) throw new ProfileError(`${what} must be a JSON object`);
  return doc;
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}
