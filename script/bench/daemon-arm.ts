/**
 * One daemon-level benchmark arm, the same for stargaze and for the peer (the reference `containerd-stargz-grpc`,
 * test/e2e/harness/peer.ts): a fresh daemon with its own root, a fresh containerd that has it as a proxy
 * snapshotter, the image pulled by the same client for both (`ctr-remote images rpull --plain-http
 * --snapshotter <name>`), and its rootfs mounted (`Containerd.mountImage`: a View of the top snapshot, mounted on a
 * tmp dir). Reads then go through the daemon's FUSE mount like a container's would.
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
  startContainerd,
  startDaemon,
  startPeer,
  type PeerDaemon,
  type Registry,
  type StargazeDaemon,
} from '../../test/e2e/harness';
import { readTail } from '../../test/e2e/harness/exec';
import { pushRawImage } from '../../test/e2e/harness/raw-image';

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

export interface DaemonArmOptions {
  kind: DaemonKind;
  /** The registry whose counting proxy serves `pullHost`; its counters are reset when the rpull starts. */
  registry: Registry;
  /** `host:port` containerd and the daemon pull from: `registry.countingHost`, or a link proxy in front of it. */
  pullHost: string;
  /** `<repo>:<tag>` of the image. */
  repoTag: string;
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
  /** process.hrtime.bigint() when the rpull started: "pull -> read done" counts from here. */
  pullStartNs: bigint;
  pullMs: number;
  /**
   * The image mount: the harness's `ctr` look-ups of the image's chain ID, the snapshot View (which checks the
   * layer: both daemons wait for prefetch there), then mount(8).
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

/** Fresh daemon of `kind` + fresh containerd, rpull, mount the image's rootfs. */
export async function startDaemonArm(opts: DaemonArmOptions): Promise<DaemonArm> {
  const scope = new CleanupStack();
  const config = opts.config ?? NO_BACKGROUND_FETCH_CONFIG;
  const snapshotter = SNAPSHOTTER_OF[opts.kind];
  let daemon: StargazeDaemon | PeerDaemon | undefined;
  try {
    const stargaze = opts.kind === 'stargaze' ? await startDaemon({ scope, logLevel: 'info', plainHttpHosts: [opts.pullHost], config }) : undefined;
    // the reference reaches registries on loopback over plain HTTP without a hosts config
    const peer = opts.kind === 'peer' ? await startPeer({ scope, config }) : undefined;
    daemon = stargaze ?? peer!;
    const containerd = await startContainerd({
      scope,
      stargazeAddress: stargaze?.address,
      stargazeRoot: stargaze?.root,
      proxyPlugins: peer ? [{ name: PEER_SNAPSHOTTER, address: peer.address, root: peer.root }] : [],
    });
    const namespace = containerd.newNamespace('bench');
    const mountpoint = path.join(await makeTmpRoot(`bench-${opts.kind}`, scope), 'rootfs');
    const ref = `${opts.pullHost}/${opts.repoTag}`;
    const counted = (): ReturnType<Registry['blobRequests']> =>
      opts.registry.blobRequests().filter((r) => opts.layerDigests === undefined || opts.layerDigests.includes(r.digest));

    opts.registry.resetCounters();
    const pullStartNs = process.hrtime.bigint();
    await containerd.ctrRemote(['images', 'rpull', '--plain-http', '--snapshotter', snapshotter, ref], { namespace, timeoutMs: STEP_TIMEOUT_MS });
    const pullMs = msSince(pullStartNs);
    const mountStart = process.hrtime.bigint();
    await containerd.mountImage(ref, mountpoint, { snapshotter, namespace, timeoutMs: STEP_TIMEOUT_MS });
    scope.after(() => containerd.unmountImage(mountpoint, { namespace }));
    const mountMs = msSince(mountStart);
    return {
      kind: opts.kind,
      mountpoint,
      daemon,
      pullStartNs,
      pullMs,
      mountMs,
      blobRequests: () => counted().length,
      bytesServed: () => counted().reduce((n, r) => n + r.bytes, 0),
      cleanup: () => scope.run(),
    };
  } catch (err) {
    const log = daemon ? await readTail(daemon.logFile) : '';
    await scope.run();
    const message = err instanceof Error ? err.message : String(err);
    throw new Error(`${opts.kind} daemon arm: ${message}${log ? `\n--- ${opts.kind} daemon log (tail) ---\n${log}` : ''}`);
  }
}
