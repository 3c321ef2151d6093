/**
 * The prefetch profile format: which chunks of one layer a container read as it started, in first-read order,
 * learned by the FUSE server (layer/profile-recorder.ts) and replayed as that layer's prefetch the next time it
 * is mounted. A profile is a hint, never trusted for content: every chunk it names is still fetched from the
 * registry and verified against the TOC.
 *
 * One JSON object, versioned, naming entries by TOC name and chunk offset in the file (never an inode, which is
 * only this process's numbering), holding no file contents, bounded in entries and in bytes. It belongs to one
 * layer blob and TOC (`layer`, `tocDigest`): a profile of another layer is ignored, whatever its file name.
 */
import { createHash } from 'node:crypto';
import { ProfileError } from '../errors';

export const PROFILE_FORMAT_VERSION = 1;
/** Entries a profile may hold at most; more is refused as oversized (the recorder keeps within `max_chunks`). */
export const MAX_PROFILE_ENTRIES = 65_536;
/** Bytes a profile file may take at most: read whole into memory, and it counts in the disk budget. */
export const MAX_PROFILE_FILE_BYTES = 8 * 1024 * 1024;
/** The longest TOC name an entry may carry (PATH_MAX). */
const MAX_NAME_BYTES = 4096;
const DIGEST = /^sha256:[0-9a-f]{64}$/;
/** A profile's key: hex of sha256 (profileKey). */
export const PROFILE_KEY = /^[0-9a-f]{64}$/;

/** One chunk: the regular file's TOC name and the offset of the chunk in that file (the TOC's `chunkOffset`). */
export interface ProfileEntry {
  readonly name: string;
  readonly offset: number;
}

export interface PrefetchProfile {
  readonly version: typeof PROFILE_FORMAT_VERSION;
  /** `sha256:` of the layer blob it was recorded on. */
  readonly layer: string;
  /** `sha256:` of that layer's TOC JSON: entry names and offsets mean something only in that TOC. */
  readonly tocDigest: string;
  /** The chainID the layer was committed under (`containerd.io/snapshot.ref`). */
  readonly chainId: string;
  /** This and the following layers of the image, as the pull's labels listed them (possibly cut short). */
  readonly layers: readonly string[];
  /** Chunks in first-read order, each once. */
  readonly entries: readonly ProfileEntry[];
}

/**
 * The key a layer's profile is stored under: its chainID (which fixes every layer below it) with the layers
 * above it, as one pull's labels name them. Images that differ only in their config share it.
 */
export function profileKey(chainId: string, layers: readonly string[]): string {
  return createHash('sha256').update(`${chainId}\n${layers.join(',')}`).digest('hex');
}

/** The key of a parsed profile. */
export function keyOf(profile: Pick<PrefetchProfile, 'chainId' | 'layers'>): string {
  return profileKey(profile.chainId, profile.layers);
}

/**
 * `before` then what `added` has that `before` lacks, in order, at most `max` entries: the union of what
 * several starts read, first-seen order kept.
 */
export function mergeEntries(before: readonly ProfileEntry[], added: readonly ProfileEntry[], max: number): ProfileEntry[] {
  const seen = new Set<string>();
  const out: ProfileEntry[] = [];
  for (const e of [...before, ...added]) {
    if (out.length >= max) break;
    const id = `${e.offset}\0${e.name}`;
    if (seen.has(id)) continue;
    seen.add(id);
    out.push(e);
  }
  return out;
}

/**
 * The files `profiles` name, as a prioritized-files list (`stargaze convert --prefetch-profile`): absolute
 * paths, each once, in the profiles' first-read order (the first profile's files first).
 */
export function profileFiles(profiles: readonly PrefetchProfile[]): string[] {
  const seen = new Set<string>();
  for (const p of profiles) for (const e of p.entries) seen.add(`/${e.name}`);
  return [...seen];
}

export function serializeProfile(profile: PrefetchProfile): Buffer {
  const { version, layer, tocDigest, chainId, layers, entries } = profile;
  // One entry per line: `stargaze profile show` and a diff of two profiles stay readable.
  const head = JSON.stringify({ version, layer, tocDigest, chainId, layers });
  const lines = entries.map((e) => JSON.stringify({ name: e.name, offset: e.offset }));
  return Buffer.from(`${head.slice(0, -1)},"entries":[${lines.length === 0 ? '' : `\n${lines.join(',\n')}\n`}]}\n`);
}

/**
 * A profile as read from a file or an import, checked field by field. Throws ProfileError: `tooLarge` when it
 * is past MAX_PROFILE_FILE_BYTES or MAX_PROFILE_ENTRIES, else malformed.
 */
export function parseProfile(bytes: Buffer | string): PrefetchProfile {
  const size = typeof bytes === 'string' ? Buffer.byteLength(bytes) : bytes.length;
  if (size > MAX_PROFILE_FILE_BYTES) throw new ProfileError(`profile of ${size} bytes is larger than ${MAX_PROFILE_FILE_BYTES}`, 'oversized');
  let doc: unknown;
  try {
    doc = JSON.parse(typeof bytes === 'string' ? bytes : bytes.toString('utf8'));
  } catch (err) {
    throw new ProfileError(`profile is not JSON: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw new ProfileError('profile must be a JSON object');
  const { version, layer, tocDigest, chainId, layers, entries } = doc as Record<string, unknown>;
  if (version !== PROFILE_FORMAT_VERSION) throw new ProfileError(`profile version ${JSON.stringify(version) ?? 'undefined'} is not ${PROFILE_FORMAT_VERSION}`);
  const digest = (what: string, v: unknown): string => {
    if (typeof v !== 'string' || !DIGEST.test(v)) throw new ProfileError(`profile ${what} must be a sha256:<hex> digest`);
    return v;
  };
  if (!Array.isArray(layers)) throw new ProfileError('profile layers must be a list of digests');
  if (!Array.isArray(entries)) throw new ProfileError('profile entries must be a list');
  if (entries.length > MAX_PROFILE_ENTRIES) throw new ProfileError(`profile of ${entries.length} entries has more than ${MAX_PROFILE_ENTRIES}`, 'oversized');
  const parsed: ProfileEntry[] = entries.map((e: unknown, i) => {
    const { name, offset } = (typeof e === 'object' && e !== null ? e : {}) as Record<string, unknown>;
    if (typeof name !== 'string' || name === '' || Buffer.byteLength(name) > MAX_NAME_BYTES) throw new ProfileError(`profile entry ${i} needs a name`);
    if (!Number.isSafeInteger(offset) || (offset as number) < 0) throw new ProfileError(`profile entry ${i} needs an offset, a non-negative integer`);
    return { name, offset: offset as number };
  });
  return {
    version: PROFILE_FORMAT_VERSION,
    layer: digest('layer', layer),
    tocDigest: digest('tocDigest', tocDigest),
    chainId: digest('chainId', chainId),
    layers: layers.map((l: unknown) => digest('layers entry', l)),
    entries: parsed,
  };
}
