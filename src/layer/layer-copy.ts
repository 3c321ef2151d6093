/**
 * The last step of a layer's life before close: a fully fetched layer that passed its chainID check is copied
 * out of its mount (local-copy.ts), so containers created from then on read it from local disk. Only when it
 * is worth it and safe: every chunk still local (else the copy would download them again) and room left.
 */
import { statfs } from 'node:fs/promises';
import path from 'node:path';
import { errorMessage } from '../errors';
import type { Logger } from '../log';
import type { LayerTree } from '../metadata/layer-tree';
import type { FsMetrics } from '../metrics/fs-metrics';
import type { LayerReader } from '../reader/chunk-reader';
import { copyLayerToLocal, hasLocalCopy } from './local-copy';

/**
 * Free space a local copy must leave: kubelet's default eviction threshold for the image filesystem
 * (imagefs.available < 15%), so a copy never makes the node evict pods.
 */
const COPY_MIN_FREE_FRACTION = 0.15;
/** Per entry on disk beyond its data (inode, directory entry), a rough bound. */
const COPY_BYTES_PER_ENTRY = 4096;

export interface CopyJob {
  digest: string;
  mountpoint: string;
  tree: LayerTree;
  reader: LayerReader;
  metrics: FsMetrics;
  signal: AbortSignal;
  log: Logger;
}

/** Bytes a copy of the tree takes on disk, roughly: file data plus a block per inode (hardlinks are one). */
function treeBytes(tree: LayerTree): number {
  let bytes = 0;
  for (let ino = 1; ino <= tree.nodeCount; ino++) {
    const node = tree.getNode(ino);
    bytes += COPY_BYTES_PER_ENTRY + (node?.type === 'reg' ? node.size : 0);
  }
  return bytes;
}

async function roomFor(dir: string, bytes: number): Promise<{ ok: boolean; neededBytes: number; availableBytes: number }> {
  const st = await statfs(dir);
  const availableBytes = st.bavail * st.bsize;
  const neededBytes = bytes + Math.ceil(st.blocks * st.bsize * COPY_MIN_FREE_FRACTION);
  return { ok: availableBytes >= neededBytes, neededBytes, availableBytes };
}

/** Copies the layer when it is worth it; never rejects: a failure (disk full, ...) leaves it served through FUSE. */
export async function copyFetchedLayer(job: CopyJob): Promise<void> {
  const { mountpoint, signal, log } = job;
  try {
    if (await hasLocalCopy(mountpoint)) return;
    // The copy reads the mount: with chunks evicted already (a cap smaller than the layer) it would download
    // them again. Such a layer stays served through FUSE.
    if (!job.tree.chunksInBlobOrder().every((c) => job.reader.isLocal(c))) {
      log.info('not copied to local disk: some of its chunks are no longer cached');
      return;
    }
    const room = await roomFor(path.dirname(mountpoint), treeBytes(job.tree));
    if (!room.ok) {
      log.warn({ neededBytes: room.neededBytes, availableBytes: room.availableBytes }, 'not copied to local disk: it would leave the filesystem too full');
      return;
    }
    const started = Date.now();
    await copyLayerToLocal(mountpoint, { signal, expectRootNames: [...(job.tree.root.children?.keys() ?? [])] });
    const elapsedMs = Date.now() - started;
    job.metrics.observe('local_copy', job.digest, elapsedMs);
    log.info({ metrics: 'latency', operation: 'local_copy', elapsedMs }, 'layer copied to local disk; new containers read it from there');
  } catch (err) {
    if (!signal.aborted) log.warn({ err: errorMessage(err) }, 'local copy of the fetched layer failed; it stays served through FUSE');
  }
}
