/**
 * One daemon-level benchmark arm, the same for stargaze and for the peer (the reference `containerd-stargz-grpc`,
 * test/e2e/harness/peer.ts): a fresh daemon with its own root, a fresh containerd that has it as a proxy
 * snapshotter (`startDaemonWithContainerd`, which layer-memory.ts uses too), the image pulled by the same client
 * for both (`ctr-remote images rpull --plain-http --snapshotter <name>`), checked to be mounted lazily
 * (`expectLazyMounts`: one FUSE mount per layer under the daemon's root), and its rootfs mounted
 * (`Containerd.mountImage`: a View of the top snapshot, mounted on a tmp dir). Reads then go through the daemon's
 * FUSE mount like a container's would.
 *
 * Everything is registered on the arm's own CleanupStack: `cleanup()` unmounts the image, stops containerd and the
 * daemon and removes their tmp dirs, and so does a failure part-way through `startDaemonArm`.
 *
 * Also here: `pushEstargzImage`, a one-layer OCI image of an eStargz blob pushed straight to the registry.
 */
import path from 'node:path';

import {
  ANNOTATION_TOC_DIGEST,
  ANNOTATION_UNCOMPRESSED_SIZE,
  CleanupStack,
  PEER_SNAPSHOTTER,
  STARGZ_SNAPSHOTTER,
  makeTmpRoot,
  peerProxyPlugin,
  startContainerd,
  startDaemon,
  startPeer,
  type Containerd,
  type PeerDaemon,
  type Registry,
  type StargazeDaemon,
} from '../../test/e2e/harness';
import { readTail } from '../../test/e2e/harness/exec';
import { pushRawImage } from '../../test/e2e/harness/raw-image';

/** The two lazy-pulling snapshotters the benchmarks compare. */
export type DaemonKind = 'stargaze' | 'peer';

/** What `--snapshotter` takes for each daemon in the arm's containerd. */
export const SNAPSHOTTER_OF: Record<DaemonKind, string> = { stargaze: STARGZ_SNAPSHOTTER, peer: PEER_SNAPSHOTTER };

/** Both daemons read this key: background fetch neither helps nor competes with the reads measured. */
export const NO_BACKGROUND_FETCH_CONFIG = 'no_background_fetch = true\n';

/** Limit for the rpull and the image mount (a cold 256 MiB layer is read later, not here). */
const STEP_TIMEOUT_MS = 300_000;

/** An eStargz layer as src/estargz/writer.ts returns it, with its bytes. */
export interface EstargzLayer {
  blob: Buffer;
  tocDigest: string;
  diffId: string;
  uncompressedSize: number;
}

export interface PushedLayerImage {
  /** `<repo>:<tag>`: prefix the host to pull from. */
  repoTag: string;
  layerDigest: string;
}

/** Pushes `layer` as a one-layer OCI image (config with its diff_id, eStargz annotations) to `host`. */
export async function pushEstargzImage(host: string, repo: string, tag: string, layer: EstargzLayer): Promise<PushedLayerImage> {
  const annotations = {
    [ANNOTATION_TOC_DIGEST]: layer.tocDigest,
    [ANNOTATION_UNCOMPRESSED_SIZE]: String(layer.uncompressedSize),
  };
  const image = await pushRawImage({ host, repo, tag, layers: [{ blob: layer.blob, diffId: layer.diffId, annotations }] });
  return { repoTag: `${repo}:${tag}`, layerDigest: image.layers[0]!.digest };
}

/** A daemon of one kind and a containerd that has it as a proxy snapshotter, both on the caller's scope. */
export interface DaemonWithContainerd {
  kind: DaemonKind;
  /** The daemon: pid, root, logFile (stargaze's FUSE server is a separate process, see its root). */
  daemon: StargazeDaemon | PeerDaemon;
  containerd: Containerd;
  /** What `--snapshotter` takes for it: SNAPSHOTTER_OF[kind]. */
  snapshotter: string;
  /** A fresh namespace of that containerd. */
  namespace: string;
}

/**
 * Starts a fresh daemon of `kind` (its config.toml: `config`; stargaze gets a plain-HTTP hosts entry for `pullHost`,
 * the reference reaches registries on loopback over plain HTTP without one) and a fresh containerd with it as a proxy
 * snapshotter. Both are registered on `scope`, so running it stops them, also after a failure here.
 */
export async function startDaemonWithContainerd(opts: {
  kind: DaemonKind;
  scope: CleanupStack;
  pullHost: string;
  config: string;
}): Promise<DaemonWithContainerd> {
  const { kind, scope, config } = opts;
  const stargaze = kind === 'stargaze' ? await startDaemon({ scope, logLevel: 'info', plainHttpHosts: [opts.pullHost], config }) : undefined;
  const peer = kind === 'peer' ? await startPeer({ scope, config }) : undefined;
  const daemon = stargaze ?? peer!;
  try {
    const containerd = await startContainerd({
      scope,
      stargazeAddress: stargaze?.address,
      stargazeRoot: stargaze?.root,
      proxyPlugins: peer ? [peerProxyPlugin(peer)] : [],
    });
    return { kind, daemon, containerd, snapshotter: SNAPSHOTTER_OF[kind], namespace: containerd.newNamespace('bench') };
  } catch (err) {
    throw await withDaemonLog(kind, daemon, err);
  }
}

/** An error whose message already ends in the daemon's log tail. */
class DaemonLogError extends Error {}

/** `err` as a DaemonLogError (unchanged if it is one already): its message, then the tail of the daemon's log. */
async function withDaemonLog(kind: DaemonKind, daemon: StargazeDaemon | PeerDaemon, err: unknown): Promise<Error> {
  if (err instanceof DaemonLogError) return err;
  const message = err instanceof Error ? err.message : String(err);
  const tail = await readTail(daemon.logFile);
  return new DaemonLogError(`${kind} daemon: ${message}${tail ? `\n--- ${kind} daemon log ${daemon.logFile} (tail) ---\n${tail}` : ''}`);
}

/**
 * Throws (with the tail of the daemon's log) unless the daemon has exactly `layers` FUSE mounts under its root, as
 * a lazy rpull of a `layers`-layer image leaves: containerd falls back to a full download when a snapshotter can't
 * mount a layer remotely, and a benchmark would then measure that instead without noticing.
 */
export async function expectLazyMounts(kind: DaemonKind, daemon: StargazeDaemon | PeerDaemon, layers: number): Promise<void> {
  const fuse = (await daemon.mounts()).filter((m) => m.fstype.startsWith('fuse')).length;
  if (fuse !== layers) {
    throw await withDaemonLog(kind, daemon, new Error(`${fuse} FUSE mounts under ${daemon.root} after the rpull of ${layers} layer(s): not a lazy pull`));
  }
}

export interface DaemonArmOptions {
  kind: DaemonKind;
  /** The registry whose counting proxy serves `pullHost`; its counters are reset when the rpull starts. */
  registry: Registry;
  /** `host:port` containerd and the daemon pull from: `registry.countingHost`, or a link proxy in front of it. */
  pullHost: string;
  /** `<repo>:<tag>` of the image. */
  repoTag: string;
  /** The image's layer count: after the rpull the daemon must have this many FUSE mounts (expectLazyMounts). */
  layers: number;
  /** Blobs the counters below count (default: all, the image config's GET included). */
  layerDigests?: readonly string[];
  /** The daemon's config.toml (both take TOML). Default: NO_BACKGROUND_FETCH_CONFIG. */
  config?: string;
}

export interface DaemonArm {
  kind: DaemonKind;
  /** The image's rootfs, served by the daemon. */
  mountpoint: string;
  /** The daemon: pid, root, logFile (stargaze's FUSE server is a separate process, see its root). */
  daemon: StargazeDaemon | PeerDaemon;
  /** Of `ctr-remote images rpull`. */
  pullMs: number;
  /**
   * The image mount: the harness's `ctr` look-ups of the image's chain ID, the snapshot View (which checks the
   * layer: both daemons wait for prefetch there), then mount(8). The lazy-mount check between the rpull and this
   * is in neither number.
   */
  mountMs: number;
  /** Blob GETs the registry answered for `layerDigests` since the rpull started. */
  blobRequests(): number;
  /** Body bytes it sent for them. */
  bytesServed(): number;
  /** Unmounts and stops everything the arm started; idempotent. */
  cleanup(): Promise<void>;
}

const msSince = (t0: bigint): number => Number(process.hrtime.bigint() - t0) / 1e6;

/** Fresh daemon of `kind` + fresh containerd, rpull, check the layers are mounted lazily, mount the image's rootfs. */
export async function startDaemonArm(opts: DaemonArmOptions): Promise<DaemonArm> {
  const scope = new CleanupStack();
  let daemon: StargazeDaemon | PeerDaemon | undefined;
  try {
    const started = await startDaemonWithContainerd({ kind: opts.kind, scope, pullHost: opts.pullHost, config: opts.config ?? NO_BACKGROUND_FETCH_CONFIG });
    const { containerd, snapshotter, namespace } = started;
    daemon = started.daemon;
    const mountpoint = path.join(await makeTmpRoot(`bench-${opts.kind}`, scope), 'rootfs');
    const ref = `${opts.pullHost}/${opts.repoTag}`;
    const counted = (): ReturnType<Registry['blobRequests']> =>
      opts.registry.blobRequests().filter((r) => opts.layerDigests === undefined || opts.layerDigests.includes(r.digest));

    opts.registry.resetCounters();
    const pullStart = process.hrtime.bigint();
    await containerd.rpull(ref, { snapshotter, namespace, timeoutMs: STEP_TIMEOUT_MS });
    const pullMs = msSince(pullStart);
    await expectLazyMounts(opts.kind, daemon, opts.layers);
    const mountStart = process.hrtime.bigint();
    await containerd.mountImage(ref, mountpoint, { snapshotter, namespace, timeoutMs: STEP_TIMEOUT_MS });
    scope.after(() => containerd.unmountImage(mountpoint, { namespace }));
    const mountMs = msSince(mountStart);
    return {
      kind: opts.kind,
      mountpoint,
      daemon,
      pullMs,
      mountMs,
      blobRequests: () => counted().length,
      bytesServed: () => counted().reduce((n, r) => n + r.bytes, 0),
      cleanup: () => scope.run(),
    };
  } catch (err) {
    const failure = daemon ? await withDaemonLog(opts.kind, daemon, err) : err;
    await scope.run();
    const message = failure instanceof Error ? failure.message : String(failure);
    throw new Error(`${opts.kind} daemon arm: ${message}`, { cause: err });
  }
}
