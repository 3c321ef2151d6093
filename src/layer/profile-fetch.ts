/**
 * Prefetch profiles pushed to the registry (`stargaze profile push`, profile/profile-artifact.ts), fetched by a
 * mount whose layer has none in the local store and whose labels name the image's manifest digest
 * (`stargaze rpull`'s label or CRI's `cri.manifest-digest`; ctr-remote names none, so its pulls use local
 * profiles only).
 *
 * The referrers of an image are looked up once for all its layers (the referrers API first, then the
 * referrers tag schema), and the newest profile artifact's manifest is read once; each layer then downloads
 * only its own profile blob. A mount waits for all this at most `fetch_timeout_msec`: past that, or on any
 * failure, it mounts without a profile. A lookup that outlives its mount's wait goes on (bounded by
 * LOOKUP_DEADLINE_MS) and stores what it finds, for the next mount.
 *
 * Nothing fetched is trusted: sizes are bounded before anything is read, the artifact type and subject are
 * checked, and each profile is parsed and checked as a local one; a profile of another layer, TOC or chainID
 * is ignored with a debug line, an unusable one costs one warning. A usable one is stored under this mount's
 * own key (its chainID and the layers its labels list), so the local store and recording take it from there.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { LRUCache } from 'lru-cache';
import type { ProfileStore } from '../cache/profile-store';
import { errorMessage, ProfileError, RegistryError } from '../errors';
import type { Logger } from '../log';
import {
  ARTIFACT_TYPE,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_MANIFEST,
  parseProfileArtifact,
  profileReferrers,
  referrersTag,
  type ArtifactProfileBlob,
} from '../profile/profile-artifact';
import { MAX_PROFILE_FILE_BYTES, parseProfile, type PrefetchProfile } from '../profile/profile-format';
import { parseReference } from '../remote/reference';
import type { LayerSourceInfo } from '../source/labels';

/** Bound on one image's whole lookup, artifact manifest included, whoever still waits for it. */
const LOOKUP_DEADLINE_MS = 30_000;
/** Bound on one layer's profile blob download after the lookup. */
const BLOB_DEADLINE_MS = 30_000;
/** An image's lookup answers its later mounts for this long: a pull mounts its layers within seconds. */
const LOOKUP_TTL_MS = 5 * 60_000;
/** Images whose lookup is kept. */
const MAX_LOOKUPS = 64;

/** What the fetch needs of the registry client (RegistryClient has all three). */
export interface ProfileRegistry {
  fetchReferrers(ref: string, digest: string, artifactType: string, signal?: AbortSignal): Promise<Buffer | undefined>;
  fetchManifest(ref: string, accept: string | readonly string[], signal?: AbortSignal): Promise<{ body: Buffer; digest: string }>;
  fetchSmallBlob(ref: string, digest: string, limit: number, signal?: AbortSignal): Promise<Buffer>;
}

/** One image's profile blobs by layer digest; undefined: it has none (or none could be read). */
type ImageProfiles = Map<string, ArtifactProfileBlob> | undefined;

export class ProfileFetcher {
  /** Lookups by repository and manifest digest, in flight or settled. */
  private readonly lookups = new LRUCache<string, Promise<ImageProfiles>>({ max: MAX_LOOKUPS, ttl: LOOKUP_TTL_MS });

  /** `timeoutMs`: `fetch_timeout_msec`, the longest a mount waits. */
  constructor(
    private readonly registry: ProfileRegistry,
    private readonly store: ProfileStore,
    private readonly timeoutMs: number,
  ) {}

  /**
   * The profile pushed for `source`'s layer in its image, stored locally; undefined when the labels name no
   * manifest, there is none, it is unusable, or it did not come within the bound. Never rejects.
   */
  async fetch(source: LayerSourceInfo, log: Logger): Promise<PrefetchProfile | undefined> {
    if (source.manifestDigest === undefined) return undefined;
    const started = Date.now();
    const wait = new AbortController();
    const timedOut = Symbol('timeout');
    try {
      const fetching = this.fetchFor(source, source.manifestDigest, log).catch((err: unknown) => {
        log.debug({ err: errorMessage(err) }, 'prefetch profile fetch failed; mounting without one');
        return undefined;
      });
      const got = await Promise.race([fetching, sleep(this.timeoutMs, timedOut, { signal: wait.signal })]);
      if (got === timedOut) {
        log.debug({ ms: Date.now() - started, fetchTimeoutMs: this.timeoutMs }, 'no prefetch profile from the registry within fetch_timeout_msec; mounting without one');
        return undefined;
      }
      return got;
    } finally {
      wait.abort();
    }
  }

  private async fetchFor(source: LayerSourceInfo, manifestDigest: string, log: Logger): Promise<PrefetchProfile | undefined> {
    const repo = parseReference(source.ref).name;
    const key = `${repo}@${manifestDigest}`;
    let lookup = this.lookups.get(key);
    if (lookup === undefined) {
      lookup = this.lookup(repo, manifestDigest, log);
      this.lookups.set(key, lookup);
    }
    const blobs = await lookup;
    if (blobs === undefined) return undefined;
    const blob = blobs.get(source.digest);
    if (blob === undefined) {
      log.debug({ manifest: manifestDigest }, 'the prefetch profile at the registry has none for this layer');
      return undefined;
    }
    if (blob.tocDigest !== undefined && source.tocDigest !== undefined && blob.tocDigest !== source.tocDigest) {
      log.debug({ profileTocDigest: blob.tocDigest, tocDigest: source.tocDigest }, 'prefetch profile at the registry is of another TOC; ignored');
      return undefined;
    }
    let profile: PrefetchProfile;
    try {
      const bytes = await this.registry.fetchSmallBlob(repo, blob.descriptor.digest, Math.min(blob.descriptor.size, MAX_PROFILE_FILE_BYTES), AbortSignal.timeout(BLOB_DEADLINE_MS));
      profile = parseProfile(bytes);
    } catch (err) {
      if (err instanceof ProfileError && err.reason === 'malformed') log.warn({ blob: blob.descriptor.digest, err: errorMessage(err) }, 'prefetch profile from the registry unusable; mounting without it');
      else log.debug({ blob: blob.descriptor.digest, err: errorMessage(err) }, 'prefetch profile from the registry not read; mounting without it');
      return undefined;
    }
    if (profile.layer !== source.digest || (source.tocDigest !== undefined && profile.tocDigest !== source.tocDigest) || profile.chainId !== source.chainId) {
      log.debug({ profileLayer: profile.layer, profileTocDigest: profile.tocDigest, profileChainId: profile.chainId }, 'prefetch profile of another layer ignored');
      return undefined;
    }
    // Stored under this mount's own key: the same as the pusher's for the same image (the layers labels of
    // rpull and CRI list the same digests), and the one recording merges into.
    const own: PrefetchProfile = { ...profile, layers: source.layers };
    try {
      if (!(await this.store.save(own))) log.debug('no room in disk_max_bytes for the fetched prefetch profile; used for this mount only');
    } catch (err) {
      log.debug({ err: errorMessage(err) }, 'could not store the fetched prefetch profile; used for this mount only');
    }
    log.info({ entries: own.entries.length, blob: blob.descriptor.digest }, 'prefetch profile fetched from the registry');
    return own;
  }

  /**
   * The profile blobs of the image's newest profile artifact, by layer: the referrers API, else the tag
   * schema's index, then the artifact manifest. Logs once per image; never rejects.
   */
  private async lookup(repo: string, manifestDigest: string, log: Logger): Promise<ImageProfiles> {
    const signal = AbortSignal.timeout(LOOKUP_DEADLINE_MS);
    const started = Date.now();
    let index: Buffer | undefined;
    let via: 'referrers API' | 'tag schema';
    try {
      index = await this.registry.fetchReferrers(repo, manifestDigest, ARTIFACT_TYPE, signal);
      via = 'referrers API';
      if (index === undefined) {
        via = 'tag schema';
        index = await this.registry.fetchManifest(`${repo}:${referrersTag(manifestDigest)}`, [MEDIA_TYPE_OCI_INDEX], signal).then(
          (m) => m.body,
          (err: unknown) => {
            if (err instanceof RegistryError && err.status === 404) return undefined;
            throw err;
          },
        );
      }
    } catch (err) {
      log.debug({ manifest: manifestDigest, err: errorMessage(err) }, 'prefetch profile lookup at the registry failed');
      return undefined;
    }
    let artifact;
    try {
      const newest = index === undefined ? undefined : profileReferrers(index)[0];
      if (newest === undefined) {
        log.debug({ manifest: manifestDigest, via, ms: Date.now() - started }, 'no prefetch profile at the registry');
        return undefined;
      }
      if (newest.size > MAX_PROFILE_FILE_BYTES) throw new ProfileError(`profile artifact ${newest.digest} is ${newest.size} bytes`, 'oversized');
      artifact = newest.digest;
      const m = await this.registry.fetchManifest(`${repo}@${newest.digest}`, [MEDIA_TYPE_OCI_MANIFEST], signal);
      const blobs = parseProfileArtifact(m.body, manifestDigest);
      log.debug({ manifest: manifestDigest, artifact, via, layers: blobs.length, ms: Date.now() - started }, 'prefetch profile artifact found at the registry');
      return new Map(blobs.map((b) => [b.layer, b]));
    } catch (err) {
      if (err instanceof ProfileError && err.reason === 'malformed') log.warn({ manifest: manifestDigest, artifact, err: errorMessage(err) }, 'prefetch profile artifact at the registry unusable; mounting without it');
      else log.debug({ manifest: manifestDigest, artifact, err: errorMessage(err) }, 'prefetch profile artifact at the registry not read');
      return undefined;
    }
  }
}
