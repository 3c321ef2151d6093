/**
 * What the containerd client hands out and takes: plain TS shapes with camelCase fields and numbers for sizes.
 * The wire shapes (snake_case, int64 as strings) stay inside client.ts.
 */

/** An OCI descriptor (containerd.types.Descriptor). */
export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  /** Only in OCI JSON (manifests, indexes); containerd's Descriptor message has no urls. */
  urls?: string[];
}

/** containerd.types.Mount: what a snapshotter returns for an active snapshot. */
export interface Mount {
  type: string;
  source: string;
  target: string;
  options: string[];
}

export type SnapshotKind = 'UNKNOWN' | 'VIEW' | 'ACTIVE' | 'COMMITTED';

export interface SnapshotInfo {
  name: string;
  parent: string;
  kind: SnapshotKind;
  labels: Record<string, string>;
}

export interface ContentInfo {
  digest: string;
  size: number;
  labels: Record<string, string>;
}

export interface ImageRecord {
  name: string;
  labels: Record<string, string>;
  target: Descriptor;
}

export interface Lease {
  id: string;
  labels: Record<string, string>;
}
