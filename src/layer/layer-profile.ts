/**
 * A layer's prefetch profile (profile/profile-format.ts): found for a mount by its labels (loadProfile), turned
 * into this layer's chunks (resolveProfile), and, once a start window was recorded, merged into what is stored
 * (saveRecording).
 *
 * A profile is a hint and nothing in it is trusted: names not in the TOC, a profile of another layer or TOC
 * and an oversized one are skipped with a debug line; a malformed one costs one warning; either way the layer
 * mounts as if it had none. What it names is still fetched from the registry and verified chunk by chunk.
 */
import type { ProfileStore } from '../cache/profile-store';
import { errorMessage, ProfileError } from '../errors';
import type { Logger } from '../log';
import type { ChunkInfo, LayerTree } from '../metadata/layer-tree';
import { mergeEntries, PROFILE_FORMAT_VERSION, profileKey, type PrefetchProfile, type ProfileEntry } from '../profile/profile-format';
import type { LayerSourceInfo } from '../source/labels';

/** The profile key of a mount: its chainID with the layers above it, as its labels list them. */
export function profileKeyOf(source: Pick<LayerSourceInfo, 'chainId' | 'layers'>): string {
  return profileKey(source.chainId, source.layers);
}

/** The stored profile for a mount of `source`, or undefined: none, or none usable (logged). */
export async function loadProfile(store: ProfileStore, source: LayerSourceInfo, log: Logger): Promise<PrefetchProfile | undefined> {
  const key = profileKeyOf(source);
  try {
    return await store.load(key);
  } catch (err) {
    if (err instanceof ProfileError && err.reason !== 'malformed') log.debug({ profile: key, err: errorMessage(err) }, 'prefetch profile ignored');
    else log.warn({ profile: key, err: errorMessage(err) }, 'prefetch profile unusable; mounting without it');
    return undefined;
  }
}

/**
 * The chunks of this layer `profile` names, in its order, each once; undefined when it belongs to another
 * layer or TOC. Entries whose name or offset the TOC does not have are skipped.
 */
export function resolveProfile(profile: PrefetchProfile, tree: LayerTree, layer: { digest: string; tocDigest: string }, log: Logger): ChunkInfo[] | undefined {
  if (profile.layer !== layer.digest || profile.tocDigest !== layer.tocDigest) {
    log.debug({ profileLayer: profile.layer, profileTocDigest: profile.tocDigest, tocDigest: layer.tocDigest }, 'prefetch profile of another layer ignored');
    return undefined;
  }
  const chunks: ChunkInfo[] = [];
  const seen = new Set<ChunkInfo>();
  let unknown = 0;
  for (const e of profile.entries) {
    const node = tree.resolvePath(e.name);
    const c = node?.type === 'reg' ? chunkAt(node.chunks, e.offset) : undefined;
    if (c === undefined) unknown++;
    else if (!seen.has(c)) {
      seen.add(c);
      chunks.push(c);
    }
  }
  if (unknown > 0) log.debug({ unknown, entries: profile.entries.length }, 'prefetch profile entries not in the TOC ignored');
  return chunks;
}

/** What a recording is merged into: the mount's identity and the bound on entries. */
export interface RecordingTarget {
  store: ProfileStore;
  source: LayerSourceInfo;
  tocDigest: string;
  maxChunks: number;
  log: Logger;
}

/**
 * Stores a recorded start window as the layer's profile: appended to what is stored for the same key (the
 * union of several starts, first-seen order, at most `maxChunks`). A stored profile that is unusable is
 * replaced. Never rejects: a profile is an optimisation.
 */
export async function saveRecording(target: RecordingTarget, recorded: readonly ProfileEntry[]): Promise<void> {
  const { store, source, tocDigest, maxChunks, log } = target;
  try {
    const key = profileKeyOf(source);
    const stored = await store.load(key).catch(() => undefined);
    const before = stored !== undefined && stored.layer === source.digest && stored.tocDigest === tocDigest ? stored.entries : [];
    const entries = mergeEntries(before, recorded, maxChunks);
    if (entries.length === before.length) return log.debug({ profile: key, entries: entries.length }, 'start window read nothing new for the prefetch profile');
    const profile: PrefetchProfile = { version: PROFILE_FORMAT_VERSION, layer: source.digest, tocDigest, chainId: source.chainId, layers: source.layers, entries };
    const saved = await store.save(profile);
    if (saved) log.info({ profile: key, entries: entries.length, recorded: recorded.length }, 'prefetch profile recorded');
    else log.debug({ profile: key }, 'no room in disk_max_bytes for the prefetch profile');
  } catch (err) {
    log.warn({ err: errorMessage(err) }, 'could not store the prefetch profile');
  }
}

/** The chunk starting at file offset `offset`, if the file has one there. */
function chunkAt(chunks: readonly ChunkInfo[], offset: number): ChunkInfo | undefined {
  let lo = 0;
  let hi = chunks.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const at = chunks[mid]!.fileOffset;
    if (at === offset) return chunks[mid];
    if (at < offset) lo = mid + 1;
    else hi = mid - 1;
  }
  return undefined;
}
