/**
 * The e2e harness: real processes (registry, containerd, the stargaze daemon), offline test images
 * and tree comparison. Everything started here registers its teardown on a `CleanupScope`
 * (node:test `t` / `{ after }`, or a `CleanupStack` in scripts).
 */
export { CleanupStack, addExitGuard, bestEffort, suiteScope, type CleanupScope } from './cleanup';
export {
  CommandError,
  freePort,
  run,
  spawnGroup,
  waitFor,
  type ExitStatus,
  type ProcessGroup,
  type RunOptions,
  type RunResult,
} from './exec';
export { KEEP_TMP_ENV, createTmpRoot, makeTmpRoot, mountsUnder, removeTree, unmountUnder, type MountInfo, type TmpRoot } from './tmp';
export { rangeOf, startRegistry, unionOf, type BlobRequest, type ByteRange, type Registry, type RegistryOptions } from './registry';
export {
  STARGZ_SNAPSHOTTER,
  startContainerd,
  type Containerd,
  type ContainerdOptions,
  type CtrOptions,
  type MountImageOptions,
  type ProxyPlugin,
  type PullOptions,
  type RunContainerOptions,
} from './containerd';
export { PEER_BIN_ENV, PEER_MISSING_NOTE, PEER_SNAPSHOTTER, peerBinary, peerProxyPlugin, startPeer, type PeerDaemon, type PeerOptions } from './peer';
export {
  DEFAULT_CLI_PATH,
  STARGAZE_COMMAND,
  STARGAZE_COMMAND_ENV,
  REPO_ROOT,
  SERVING_LOG_MSG,
  fuseServerPid,
  processAlive,
  startDaemon,
  stopFuseServer,
  stopProcess,
  writePlainHttpHostConfig,
  type DaemonOptions,
  type LogEntry,
  type StargazeDaemon,
  type StartedWhen,
} from './daemon';
export { DEFAULT_MTIME_SEC, hashingTap, materializeEntries, packLayer, type EntrySpec, type FileContent, type LayerBlob, type LayerSpec } from './rootfs';
export {
  ANNOTATION_TOC_DIGEST,
  ANNOTATION_UNCOMPRESSED_SIZE,
  BUSYBOX_APPLETS,
  ESTARGZ_METADATA_FILES,
  buildBusyboxImage,
  buildEstargzImage,
  busyboxEntries,
  convertToEstargz,
  convertWithStargaze,
  fetchManifest,
  mountSideBySide,
  publishTrickyImages,
  withHost,
  type BuildImageOptions,
  type BuiltImage,
  type ConvertOptions,
  type EstargzImage,
  type ImageConfig,
  type ImageLayerInfo,
  type PushedImage,
} from './images';
export { bigFileFixture, trickyFixture, type BigFileFixture, type TrickyFixture } from './image-fixtures';
export {
  compareTrees,
  diffSnapshots,
  formatDifferences,
  snapshotTree,
  type CompareOptions,
  type DiffField,
  type EntryType,
  type FsDifference,
  type FsEntry,
  type SnapshotOptions,
} from './fs-compare';
