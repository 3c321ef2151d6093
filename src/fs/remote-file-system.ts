/**
 * The seam between snapshot semantics (snapshot/) and lazily mounted layers (fs/): it lives in fs/, so
 * snapshot/ imports fs/ and fs/ needs nothing from snapshot/.
 * Kept to three verbs, as the reference's FileSystem is.
 */
export interface RemoteFileSystem {
  /**
   * Mounts the layer that `labels` describe (containerd.io/snapshot.ref, the remote stargz.* or cri.* labels,
   * the toc.digest label) read-only at `mountpoint`, an existing empty directory. Rejects when the layer
   * cannot be mounted lazily; the caller then falls back to a normal snapshot. `parent` is the parent
   * snapshot's name (its chainID), so the fully fetched layer can be checked against the chainID.
   */
  mount(mountpoint: string, labels: Record<string, string>, parent?: string): Promise<void>;
  /** Resolves when the layer mounted at `mountpoint` is usable; rejects with UnavailableError otherwise. */
  check(mountpoint: string, labels: Record<string, string>): Promise<void>;
  /** Unmounts `mountpoint` if it is mounted; resolves also when it was not. */
  unmount(mountpoint: string): Promise<void>;
}
