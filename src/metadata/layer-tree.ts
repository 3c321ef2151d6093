import { EstargzFormatError } from '../errors';
import { baseName, parentName } from '../estargz/entry-name';
import { modtimeMs } from '../estargz/modtime';
import { NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, walkToc, type ParseTocOptions, type Toc, type TocEntry } from '../estargz/toc';
import { OPAQUE_XATTR } from '../overlay-xattr';
import { modeOf, makedev, S_IFCHR } from './file-mode';

/**
 * The inode table a FUSE mount serves, built once from a parsed TOC: stable inode numbers, full
 * st_mode, link counts, overlayfs whiteouts, and for every regular file the list of chunks with the
 * compressed range to fetch for each.
 */

/** Inode number of the layer root. */
export const ROOT_INO = 1;
/** Permission of directories that exist only because something below them does. */
const IMPLICIT_DIR_PERM = 0o755;
/** Prefix of an overlayfs/OCI whiteout: `.wh.<name>` deletes `<name>` from lower layers. */
const WHITEOUT_PREFIX = '.wh.';
/** Names with this prefix are overlay/aufs metadata, never shown. */
const WHITEOUT_META_PREFIX = '.wh..wh.';
/** `.wh..wh..opq` makes its directory opaque. */
const OPAQUE_WHITEOUT = '.wh..wh..opq';
const OPAQUE_XATTR_VALUE = Buffer.from('y');
/**
 * What the many nodes without xattrs or chunks share: a TOC of thousands of entries otherwise allocates a Map
 * and an array per node, which a fresh process (the FUSE server's first mount) pays for in young-generation
 * collections that copy the whole tree being built.
 */
const NO_XATTRS: ReadonlyMap<string, Buffer> = new Map();
const NO_CHUNKS: readonly ChunkInfo[] = Object.freeze([]);

export type NodeType = 'dir' | 'reg' | 'symlink' | 'char' | 'block' | 'fifo' | 'whiteout';

/** One chunk of a regular file and where to find it in the blob. */
export interface ChunkInfo {
  /** Offset of the chunk in the file. */
  fileOffset: number;
  /** Uncompressed size of the chunk. */
  size: number;
  /** Compressed offset of the gzip member the chunk lives in. */
  compressedOffset: number;
  /** Next member boundary after compressedOffset: [compressedOffset, compressedEnd) holds the chunk. */
  compressedEnd: number;
  /** Offset of the chunk inside the decompressed member. */
  innerOffset: number;
  /** `sha256:<hex>` of the chunk's bytes, when the TOC has one. */
  digest: string | undefined;
}

export interface LayerNode {
  ino: number;
  type: NodeType;
  /** Full st_mode: type bits + perm + setuid/setgid/sticky. */
  mode: number;
  uid: number;
  gid: number;
  /** File size; symlink: length of the target in bytes. */
  size: number;
  mtimeMs: number;
  nlink: number;
  /** Linux dev_t of a char/block device (0 otherwise). */
  rdev: number;
  linkName?: string;
  /** Most nodes have none and share one empty map: replaced, never changed in place. */
  xattrs: ReadonlyMap<string, Buffer>;
  /** Directories only: children by name, sorted. */
  children?: Map<string, LayerNode>;
  /** Regular files only: chunks sorted by fileOffset, tiling [0, size). */
  chunks: readonly ChunkInfo[];
  /** `sha256:<hex>` of the whole regular file, when the TOC has one. */
  digest?: string;
  /** Inode of the directory holding this node's first name (root: itself). */
  parentIno: number;
}

export interface LayerTreeOptions {
  /** Compressed size of the blob. */
  blobSize: number;
  /** Compressed offset of the TOC member: the last payload member ends there. Defaults to blobSize. */
  tocOffset?: number;
  /** The xattr that marks opaque directories: OPAQUE_XATTR (default), or USER_OPAQUE_XATTR for `userxattr`. */
  opaqueXattr?: string;
}

export interface LayerTree {
  readonly root: LayerNode;
  /** Compressed offset of `.prefetch.landmark`: prefetch [0, this) at mount. */
  readonly prefetchLandmarkOffset: number | undefined;
  /** True when the layer has `.no.prefetch.landmark`: no prefetch at all. */
  readonly noPrefetch: boolean;
  /** Number of inodes (root included). */
  readonly nodeCount: number;
  getNode(ino: number): LayerNode | undefined;
  lookup(parentIno: number, name: string): LayerNode | undefined;
  /** Resolves a `/`-separated path from the root (no symlink following); undefined if absent. */
  resolvePath(path: string): LayerNode | undefined;
  /** Every chunk of every regular file, in blob order: what prefetch walks. */
  chunksInBlobOrder(): ChunkInfo[];
}

/** Builds the inode table. Throws EstargzFormatError when entries contradict each other. */
export function buildLayerTree(toc: Toc, opts: LayerTreeOptions): LayerTree {
  const builder = new TreeBuilder(opts.tocOffset ?? opts.blobSize, opts.opaqueXattr ?? OPAQUE_XATTR);
  for (const e of toc.entries) builder.add(e);
  return builder.finish();
}

/**
 * Parses and validates TOC JSON (walkToc, with the blob's bounds from `opts`) straight into the inode table:
 * no list of parsed entries is made, so what a mount keeps is the tree alone. Throws EstargzFormatError as
 * parseToc and buildLayerTree do.
 */
export function buildLayerTreeFromJson(json: Buffer, opts: LayerTreeOptions & Pick<ParseTocOptions, 'maxEntries' | 'maxTocBytes'>): LayerTree {
  const builder = new TreeBuilder(opts.tocOffset ?? opts.blobSize, opts.opaqueXattr ?? OPAQUE_XATTR);
  walkToc(json, { blobSize: opts.blobSize, tocOffset: opts.tocOffset, maxEntries: opts.maxEntries, maxTocBytes: opts.maxTocBytes }, (e) => builder.add(e));
  return builder.finish();
}

/** Takes the entries in TOC order (add), then links, hides whiteouts and numbers the inodes (finish). */
class TreeBuilder {
  /** Nodes by cleaned path (a hardlink's extra names are only in their parent's children). */
  private readonly byName = new Map<string, LayerNode>();
  private readonly root: LayerNode;
  /** Directories that have their own TOC entry (the others were synthesised). */
  private readonly explicitDirs = new Set<LayerNode>();
  private prefetchLandmarkOffset: number | undefined;
  private noPrefetch = false;
  /** The regular file the next chunk entries continue, and its chunk list. */
  private lastFile: { node: LayerNode; chunks: ChunkInfo[] } | undefined;
  /** Hardlink entries: linked in finish(), as their targets may come later. */
  private readonly links: TocEntry[] = [];
  /**
   * Chunks of the gzip member being walked (payload offsets never go back): their compressed range ends where
   * the next member starts, known only when an entry of a later member comes, or at the end of the data.
   */
  private memberChunks: ChunkInfo[] = [];
  /** The entries walked are a landmark's (with a payload): its chunk entries are members too. */
  private inLandmark = false;
  private memberOffset = -1;

  constructor(
    /** Where the last payload member ends. */
    private readonly dataEnd: number,
    private readonly opaqueXattr: string,
  ) {
    this.root = newDir();
    this.byName.set('', this.root);
  }

  add(e: TocEntry): void {
    if (e.type === 'chunk') {
      if (this.lastFile !== undefined) this.lastFile.chunks.push(this.chunkOf(e, this.lastFile.node.size, undefined));
      else if (this.inLandmark) this.enterMember(e.offset ?? 0, e.name); // a chunked landmark's payload too
      return;
    }
    this.inLandmark = false;
    if (e.type === 'hardlink') {
      this.links.push(e);
      return;
    }
    this.lastFile = undefined;
    if (e.name === '') {
      fillFromEntry(this.root, e);
      this.explicitDirs.add(this.root);
      return;
    }
    if (this.takeLandmark(e)) {
      // Hidden, but its payload is a member all the same: the member before it ends where it starts.
      if ((e.size ?? 0) > 0) {
        this.enterMember(e.offset ?? 0, e.name);
        this.inLandmark = true;
      }
      return;
    }
    const node = this.place(e);
    if (e.type === 'reg' && (e.size ?? 0) > 0) {
      const chunks = [this.chunkOf(e, node.size, node.digest)];
      node.chunks = chunks;
      this.lastFile = { node, chunks };
    }
  }

  finish(): LayerTree {
    this.endMember(this.dataEnd);
    this.linkAll(this.links);
    this.applyWhiteouts(this.root);
    const nodes = assignInodes(this.root);
    return new Tree(nodes, this.prefetchLandmarkOffset, this.noPrefetch);
  }

  /** A chunk of a reg/chunk entry with a payload; its compressedEnd is set when its member's end is known. */
  private chunkOf(e: TocEntry, fileSize: number, fileDigest: string | undefined): ChunkInfo {
    const fileOffset = e.chunkOffset ?? 0;
    const size = e.chunkSize !== undefined && e.chunkSize > 0 ? e.chunkSize : fileSize - fileOffset;
    const compressedOffset = e.offset ?? 0;
    this.enterMember(compressedOffset, e.name);
    // A file of one chunk has the same digest twice: the tree keeps one string of it (tens of thousands of files).
    const digest = e.chunkDigest !== undefined && e.chunkDigest === fileDigest ? fileDigest : e.chunkDigest;
    const chunk: ChunkInfo = { fileOffset, size, compressedOffset, compressedEnd: 0, innerOffset: e.innerOffset ?? 0, digest };
    this.memberChunks.push(chunk);
    return chunk;
  }

  /** A payload of the member at `offset` comes next: the member before it, if another, ends there. */
  private enterMember(offset: number, name: string): void {
    // Later members start after this one (parseToc checks that offsets never go back), so only the last
    // member can be left without a compressed range: when it starts at the end of the data.
    if (!(this.dataEnd > offset)) {
      throw new EstargzFormatError(`chunk of ${JSON.stringify(name)} at ${offset} has no compressed range`);
    }
    if (offset === this.memberOffset) return;
    if (offset < this.memberOffset) {
      throw new EstargzFormatError(`chunk of ${JSON.stringify(name)} at ${offset} goes back before ${this.memberOffset}`);
    }
    this.endMember(offset);
    this.memberOffset = offset;
  }

  /** The member being walked ends at `end`. */
  private endMember(end: number): void {
    for (const c of this.memberChunks) c.compressedEnd = end;
    this.memberChunks = [];
  }

  /** Landmarks are root-level files that steer prefetch; they are recorded here and hidden. */
  private takeLandmark(e: TocEntry): boolean {
    if (e.type !== 'reg') return false;
    if (e.name === PREFETCH_LANDMARK) {
      this.prefetchLandmarkOffset = e.offset ?? 0;
      return true;
    }
    if (e.name === NO_PREFETCH_LANDMARK) {
      this.noPrefetch = true;
      return true;
    }
    return false;
  }

  /** Creates the node for a non-hardlink entry under its (maybe implicit) parent. */
  private place(e: TocEntry): LayerNode {
    const existing = this.byName.get(e.name);
    if (existing !== undefined) {
      // Only an implicit dir can already be there (parseToc rejects duplicates): the entry now describes it.
      if (this.explicitDirs.has(existing) || e.type !== 'dir') {
        throw new EstargzFormatError(`${JSON.stringify(e.name)} is both a directory and a ${e.type}`);
      }
      fillFromEntry(existing, e);
      this.explicitDirs.add(existing);
      return existing;
    }
    const parent = this.dirFor(parentName(e.name), e.name);
    const node = e.type === 'dir' ? newDir() : newNode(e);
    if (e.type === 'dir') {
      fillFromEntry(node, e);
      this.explicitDirs.add(node);
    }
    parent.children?.set(baseName(e.name), node);
    this.byName.set(e.name, node);
    return node;
  }

  /** The directory node at `name`, synthesising it (and its parents) when the TOC has no entry. */
  private dirFor(name: string, child: string): LayerNode {
    const existing = this.byName.get(name);
    if (existing !== undefined) {
      if (existing.children === undefined) {
        throw new EstargzFormatError(`${JSON.stringify(child)} is under ${JSON.stringify(name)}, which is not a directory`);
      }
      return existing;
    }
    const parent = this.dirFor(parentName(name), name);
    const dir = newDir();
    parent.children?.set(baseName(name), dir);
    this.byName.set(name, dir);
    return dir;
  }

  /**
   * Adds each hardlink's name to its parent dir, sharing the target's node. A target may itself be a
   * hardlink listed later, so passes repeat until nothing changes; what is left points nowhere.
   */
  private linkAll(links: TocEntry[]): void {
    let pending = links;
    while (pending.length > 0) {
      const unresolved: TocEntry[] = [];
      for (const e of pending) {
        const target = this.byName.get(e.linkName ?? '');
        if (target === undefined) {
          unresolved.push(e);
          continue;
        }
        if (target.children !== undefined) {
          throw new EstargzFormatError(`hardlink ${JSON.stringify(e.name)} points at a directory`);
        }
        if (this.byName.has(e.name)) throw new EstargzFormatError(`hardlink ${JSON.stringify(e.name)} duplicates a name`);
        const parent = this.dirFor(parentName(e.name), e.name);
        parent.children?.set(baseName(e.name), target);
        this.byName.set(e.name, target);
        target.nlink++;
      }
      if (unresolved.length === pending.length) {
        const e = unresolved[0];
        throw new EstargzFormatError(`hardlink ${JSON.stringify(e.name)} points at missing ${JSON.stringify(e.linkName)}`);
      }
      pending = unresolved;
    }
  }

  /** Hides `.wh.*` names: whiteouts become 0/0 char devices, `.wh..wh..opq` marks the dir opaque. */
  private applyWhiteouts(dir: LayerNode): void {
    const children = dir.children;
    if (children === undefined) return;
    const whiteouts: string[] = [];
    for (const [name, child] of children) {
      if (name.startsWith(WHITEOUT_PREFIX)) whiteouts.push(name);
      else if (child.children !== undefined) this.applyWhiteouts(child);
    }
    for (const name of whiteouts) {
      const hidden = children.get(name);
      children.delete(name);
      if (hidden !== undefined && hidden.type !== 'dir' && hidden.nlink > 1) hidden.nlink--;
      if (name === OPAQUE_WHITEOUT) {
        dir.xattrs = new Map([...dir.xattrs, [this.opaqueXattr, OPAQUE_XATTR_VALUE]]);
        continue;
      }
      if (name.startsWith(WHITEOUT_META_PREFIX)) continue;
      const target = name.slice(WHITEOUT_PREFIX.length);
      if (target === '' || children.has(target)) continue; // a real entry wins over its whiteout
      children.set(target, newWhiteout());
    }
  }
}

function newDir(): LayerNode {
  return {
    ino: 0,
    type: 'dir',
    mode: modeOf('dir', IMPLICIT_DIR_PERM),
    uid: 0,
    gid: 0,
    size: 0,
    mtimeMs: 0,
    nlink: 2,
    rdev: 0,
    xattrs: NO_XATTRS,
    children: new Map(),
    chunks: NO_CHUNKS,
    parentIno: 0,
  };
}

function newNode(e: TocEntry): LayerNode {
  const type = e.type as Exclude<NodeType, 'dir' | 'whiteout'>;
  const node: LayerNode = {
    ino: 0,
    type,
    mode: 0,
    uid: 0,
    gid: 0,
    size: 0,
    mtimeMs: 0,
    nlink: 1,
    rdev: 0,
    xattrs: NO_XATTRS,
    chunks: NO_CHUNKS,
    parentIno: 0,
  };
  fillFromEntry(node, e);
  if (type === 'reg') {
    node.size = e.size ?? 0;
    if (e.digest !== undefined) node.digest = e.digest;
  } else if (type === 'symlink') {
    node.linkName = e.linkName ?? '';
    node.size = Buffer.byteLength(node.linkName, 'utf8');
  } else if (type === 'char' || type === 'block') {
    node.rdev = makedev(e.devMajor ?? 0, e.devMinor ?? 0);
  }
  return node;
}

/** Copies the attributes every entry type has. */
function fillFromEntry(node: LayerNode, e: TocEntry): void {
  node.mode = modeOf(node.type, e.mode ?? 0);
  node.uid = e.uid ?? 0;
  node.gid = e.gid ?? 0;
  // parseToc checked the string through the same cache, so this is a lookup rather than a second Date.parse.
  node.mtimeMs = e.modtime === undefined ? 0 : modtimeMs(e.modtime);
  if (e.xattrs === undefined) {
    node.xattrs = NO_XATTRS;
    return;
  }
  const xattrs = new Map<string, Buffer>();
  for (const [k, v] of Object.entries(e.xattrs)) xattrs.set(k, Buffer.from(v, 'base64'));
  node.xattrs = xattrs;
}

/** The overlayfs whiteout format: a 0/0 char device, no permission bits, owned by root. */
function newWhiteout(): LayerNode {
  return {
    ino: 0,
    type: 'whiteout',
    mode: S_IFCHR,
    uid: 0,
    gid: 0,
    size: 0,
    mtimeMs: 0,
    nlink: 1,
    rdev: 0,
    xattrs: NO_XATTRS,
    chunks: NO_CHUNKS,
    parentIno: 0,
  };
}

/**
 * Sorts every directory's children by name, counts directory links (2 + child dirs), then numbers
 * nodes by a depth-first pre-order walk: root = 1, a hardlinked node keeps the number of the first
 * name reached. Returns the nodes indexed by ino - 1.
 */
function assignInodes(root: LayerNode): LayerNode[] {
  const nodes: LayerNode[] = [];
  // Iterative walks: deep trees must not overflow the JS stack.
  const stack: Array<[LayerNode, number]> = [[root, ROOT_INO]];
  while (stack.length > 0) {
    const [node, parentIno] = stack.pop() as [LayerNode, number];
    if (node.ino !== 0) continue; // a second name of a hardlinked node
    node.ino = nodes.length + 1;
    node.parentIno = parentIno;
    nodes.push(node);
    if (node.children === undefined) continue;
    // Writers mostly emit a directory's entries in order already: then the map is kept as it is. Otherwise
    // the default sort orders by UTF-16 code units, as `<` does, without a comparator call per pair.
    const children = node.children;
    let names = [...children.keys()];
    let inOrder = true;
    for (let i = 1; i < names.length && inOrder; i++) inOrder = (names[i - 1] as string) < (names[i] as string);
    if (!inOrder) {
      names = names.sort();
      const sorted = new Map<string, LayerNode>();
      for (const name of names) sorted.set(name, children.get(name) as LayerNode);
      node.children = sorted;
    }
    const nodesInOrder = [...node.children.values()];
    let childDirs = 0;
    for (let i = nodesInOrder.length - 1; i >= 0; i--) {
      const child = nodesInOrder[i] as LayerNode;
      if (child.children !== undefined) childDirs++;
      if (child.ino === 0) stack.push([child, node.ino]);
    }
    node.nlink = 2 + childDirs;
  }
  return nodes;
}

class Tree implements LayerTree {
  readonly root: LayerNode;
  readonly nodeCount: number;

  constructor(
    /** Node with ino N at index N-1. */
    private readonly nodes: LayerNode[],
    readonly prefetchLandmarkOffset: number | undefined,
    readonly noPrefetch: boolean,
  ) {
    this.root = nodes[0];
    this.nodeCount = nodes.length;
  }

  getNode(ino: number): LayerNode | undefined {
    return this.nodes[ino - 1];
  }

  lookup(parentIno: number, name: string): LayerNode | undefined {
    return this.getNode(parentIno)?.children?.get(name);
  }

  resolvePath(path: string): LayerNode | undefined {
    let node: LayerNode | undefined = this.root;
    for (const part of path.split('/')) {
      if (part === '' || part === '.') continue;
      if (part === '..') return undefined;
      node = node.children?.get(part);
      if (node === undefined) return undefined;
    }
    return node;
  }

  chunksInBlobOrder(): ChunkInfo[] {
    const out: ChunkInfo[] = [];
    const seen = new Set<LayerNode>();
    for (const node of this.nodes) {
      if (node.chunks.length === 0 || seen.has(node)) continue;
      seen.add(node);
      out.push(...node.chunks);
    }
    return out.sort((a, b) => a.compressedOffset - b.compressedOffset || a.innerOffset - b.innerOffset);
  }
}
