/**
 * `stargaze profile push IMAGE`: this node's prefetch profiles for IMAGE's layers, uploaded as one OCI artifact
 * (profile/profile-artifact.ts) whose subject is IMAGE's platform manifest, so that a pull of the image on
 * another node finds them (layer/profile-fetch.ts). Explicit only: the daemon never pushes.
 *
 * Which local profiles belong to IMAGE is worked out as the daemon keys them (profile-format.ts profileKey): each
 * layer's chainID (from the config's diff_ids) with its layers label (this and the following digests, cut to
 * the label size limit as rpull and CRI cut theirs: containerd/image.ts layersLabel). Both labels give the same
 * list, so one key serves images pulled either way; both are tried all the same.
 *
 * The artifact is pushed by digest (blobs first, the manifest last), then made findable: a registry with the
 * referrers API says so (`OCI-Subject`) and lists it itself; otherwise the referrers tag schema's index
 * (`sha256-<hex>`) is read, the artifact added, and written back. Two pushes at once may lose one listing
 * there: last writer wins, as the schema allows.
 */
import { NotFoundError, ProfileError, RegistryError, UsageError, errorMessage } from '../errors';
import type { Logger } from '../log';
import type { ProfileStore } from '../cache/profile-store';
import { chainIds, layersLabel, parseConfig } from '../containerd/image';
import { hostPlatform, parsePlatform, type Platform } from '../containerd/platforms';
import { resolveManifest } from '../containerd/resolve';
import { buildProfileArtifact, mergeReferrersIndex, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST, referrersTag, type OciDescriptor } from '../profile/profile-artifact';
import { profileKey, type PrefetchProfile } from '../profile/profile-format';
import { parseReference } from '../remote/reference';
import { RegistryClient } from '../remote/registry-client';
import { RegistryPusher } from '../remote/registry-push';
import { CRI_IMAGE_LAYERS, STARGZ_LAYERS } from '../source/labels';
import { hostsDirFor, parseUser, stderrLogger } from './convert';

/** Bound on an image config read to learn its diff_ids (containerd's manifest limit). */
const MAX_CONFIG_BYTES = 4 * 1024 * 1024;

export interface ProfilePushOptions {
  image: string;
  platform: Platform;
  store: ProfileStore;
  client: RegistryClient;
  pusher: RegistryPusher;
  /** The artifact's created annotation (tests pin it). */
  now?: Date;
  signal?: AbortSignal;
  log: Logger;
}

export interface ProfilePushResult {
  /** The image's platform manifest: the artifact's subject. */
  subject: OciDescriptor;
  artifact: OciDescriptor;
  /** Layers with a profile pushed, of `layers`. */
  profiles: number;
  layers: number;
  /** How it is findable: the registry's referrers API, or the tag schema's tag. */
  listedBy: 'referrers API' | `tag ${string}`;
}

/** The keys a layer's profile may be stored under on a node that pulled the image through rpull or CRI. */
export function layerProfileKeys(layerDigests: readonly string[], chain: readonly string[], i: number): string[] {
  const keys = [STARGZ_LAYERS, CRI_IMAGE_LAYERS].map((label) => profileKey(chain[i]!, layersLabel(label, layerDigests, i).split(',')));
  return [...new Set(keys)];
}

export async function pushProfiles(opts: ProfilePushOptions): Promise<ProfilePushResult> {
  const { client, pusher, store, signal, log } = opts;
  const reference = parseReference(opts.image);
  const resolved = await resolveManifest(client, reference.toString(), opts.platform, signal);
  const manifest = resolved.manifest;
  const configBytes = await client.fetchSmallBlob(reference.name, manifest.doc.config.digest, MAX_CONFIG_BYTES, signal);
  const diffIds = parseConfig(configBytes, `config ${manifest.doc.config.digest} of ${reference.toString()}`).rootfs.diff_ids;
  const digests = manifest.doc.layers.map((l) => l.digest);
  if (digests.length !== diffIds.length) throw new ProfileError(`${reference.toString()}: manifest has ${digests.length} layers but the config lists ${diffIds.length} diff_ids`);
  const chain = chainIds(diffIds);

  const profiles: PrefetchProfile[] = [];
  for (let i = 0; i < digests.length; i++) {
    for (const key of layerProfileKeys(digests, chain, i)) {
      let profile: PrefetchProfile | undefined;
      try {
        profile = await store.load(key);
      } catch (err) {
        log.warn({ layer: digests[i], profile: key, err: errorMessage(err) }, 'local prefetch profile unusable; not pushed');
        continue;
      }
      if (profile === undefined) continue;
      if (profile.layer !== digests[i]) {
        log.warn({ layer: digests[i], profile: key, profileLayer: profile.layer }, 'local prefetch profile is of another layer; not pushed');
        continue;
      }
      profiles.push(profile);
      break;
    }
  }
  if (profiles.length === 0) {
    throw new NotFoundError(`no prefetch profile under ${store.dir} for any of the ${digests.length} layers of ${reference.toString()} (manifest ${manifest.desc.digest}): start a container of it first`);
  }

  const subject: OciDescriptor = { mediaType: manifest.desc.mediaType, digest: manifest.desc.digest, size: manifest.desc.size };
  const artifact = buildProfileArtifact(subject, profiles, opts.now ?? new Date());
  for (const b of artifact.blobs) await pusher.pushBlob(b.descriptor.digest, b.descriptor.size, () => b.bytes, { signal });
  const { indexed } = await pusher.pushReferrer(MEDIA_TYPE_OCI_MANIFEST, artifact.manifest, signal);
  let listedBy: ProfilePushResult['listedBy'] = 'referrers API';
  if (!indexed) {
    const tag = referrersTag(subject.digest);
    const existing = await client.fetchManifest(`${reference.name}:${tag}`, [MEDIA_TYPE_OCI_INDEX], signal).then(
      (m) => m.body,
      (err: unknown) => {
        if (err instanceof RegistryError && err.status === 404) return undefined;
        throw err;
      },
    );
    const merged = mergeReferrersIndex(existing, artifact.descriptor);
    if (merged.replacedUnreadable) log.warn({ tag }, 'the referrers tag named something that is not an index; replaced');
    await pusher.pushManifest(tag, MEDIA_TYPE_OCI_INDEX, merged.body, signal);
    listedBy = `tag ${tag}`;
  }
  return { subject, artifact: artifact.descriptor, profiles: profiles.length, layers: digests.length, listedBy };
}

/** `stargaze profile push`'s flags, parsed by profile.ts. */
export interface PushFlags {
  plainHttp: boolean;
  hostsDir: string;
  /** `--user USER:PASS`, else docker's config.json. */
  user: string | undefined;
  platform: string | undefined;
}

/** The command: registry clients as `stargaze convert` makes them for its DST, the artifact's digest on stdout. */
export async function pushCommand(store: ProfileStore, image: string, flags: PushFlags): Promise<number> {
  const reference = parseReference(image);
  const user = flags.user === undefined ? undefined : parseUser(flags.user, '--user');
  let platform: Platform;
  try {
    platform = flags.platform === undefined ? hostPlatform() : parsePlatform(flags.platform);
  } catch (err) {
    throw new UsageError(`--platform: ${errorMessage(err)}`);
  }
  const logger = stderrLogger();
  const cleanups: Array<() => Promise<void>> = [];
  try {
    const hostsDir = await hostsDirFor(reference.domain, flags.hostsDir, flags.plainHttp, cleanups);
    const client = new RegistryClient({ hostsDir, credentials: user === undefined ? undefined : () => user, log: logger.child({ module: 'remote' }) });
    cleanups.push(() => client.close());
    const pusher = new RegistryPusher(reference, { client, hostsDir, log: logger.child({ module: 'push' }) });
    cleanups.push(() => pusher.close());
    const r = await pushProfiles({ image, platform, store, client, pusher, log: logger });
    process.stderr.write(
      `pushed the prefetch profiles of ${r.profiles} of ${r.layers} layers of ${reference.toString()} (manifest ${r.subject.digest}) as ${r.artifact.digest}, listed by the ${r.listedBy}\n`,
    );
    process.stdout.write(`${r.artifact.digest}\n`);
    return 0;
  } finally {
    for (const c of cleanups.reverse()) await c().catch(() => undefined);
  }
}
