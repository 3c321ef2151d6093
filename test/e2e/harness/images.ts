/**
 * Test images, built offline: a busybox-static rootfs plus test content, written as an OCI image
 * layout by hand (gzip layers, config with diff_ids, manifest, index.json), pushed with skopeo;
 * and their eStargz versions made with the reference tools (`ctr-remote images convert --estargz
 * --oci`, `ctr images push --plain-http`).
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, open, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { Containerd } from './containerd';
import { STARGAZE_COMMAND, STARGAZE_COMMAND_ENV } from './daemon';
import { run } from './exec';
import { DEFAULT_MTIME_SEC, materializeEntries, packLayer, type EntrySpec, type LayerBlob, type LayerSpec } from './rootfs';
import type { CleanupScope } from './cleanup';
import { createTmpRoot, makeTmpRoot } from './tmp';
import { trickyFixture, type TrickyFixture } from './image-fixtures';

export const MEDIA_TYPE_OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
export const MEDIA_TYPE_OCI_INDEX = 'application/vnd.oci.image.index.v1+json';
export const MEDIA_TYPE_OCI_CONFIG = 'application/vnd.oci.image.config.v1+json';
export const MEDIA_TYPE_OCI_LAYER_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
export const MEDIA_TYPE_DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';
/** Layer annotation written by the eStargz converter: digest of the TOC JSON. */
export const ANNOTATION_TOC_DIGEST = 'containerd.io/snapshot/stargz/toc.digest';
/** Layer annotation written by the eStargz converter: size of the uncompressed layer. */
export const ANNOTATION_UNCOMPRESSED_SIZE = 'io.containers.estargz.uncompressed-size';

/**
 * Entries an eStargz layer carries at its root as ordinary tar members (the TOC and landmark
 * files). A plain tar.gz unpacker (containerd's overlayfs path) writes them into the rootfs; a
 * lazy-pulling snapshotter hides them. Exclude them when comparing the two.
 */
export const ESTARGZ_METADATA_FILES = ['stargz.index.json', '.prefetch.landmark', '.no.prefetch.landmark'];

/** Where Debian's busybox-static installs the binary (merged /usr: /bin is /usr/bin). */
const BUSYBOX_CANDIDATES = ['/usr/bin/busybox', '/bin/busybox'];
/** Applets linked into /bin of every test image. */
export const BUSYBOX_APPLETS = [
  'sh', 'cat', 'ls', 'sha256sum', 'md5sum', 'wc', 'echo', 'stat', 'find', 'readlink', 'head', 'tail', 'dd',
  'od', 'true', 'false', 'sleep', 'test', '[', 'grep', 'mkdir', 'rm', 'touch', 'env', 'id', 'cmp', 'diff',
  'xargs', 'sort', 'uniq', 'cut', 'tr', 'du', 'mount', 'ln', 'cp', 'mv', 'chmod', 'date', 'printf',
];

export interface ImageConfig {
  Cmd?: string[];
  Entrypoint?: string[];
  Env?: string[];
  WorkingDir?: string;
}

export interface ImageLayerInfo {
  digest: string;
  size: number;
  mediaType: string;
  annotations: Record<string, string>;
}

/** An image as it sits in the registry. */
export interface PushedImage {
  /** `<host>/<repo>:<tag>` with the registry host it was pushed to. */
  ref: string;
  host: string;
  repo: string;
  tag: string;
  manifestDigest: string;
  configDigest: string;
  layers: ImageLayerInfo[];
  /** Sum of the compressed layer sizes. */
  totalLayerBytes: number;
}

export interface BuiltImage extends PushedImage {
  /** diff_id (sha256 of the uncompressed tar) per layer, base first. */
  diffIds: string[];
  uncompressedSizes: number[];
}

export interface EstargzImage extends PushedImage {
  /** TOC digest per layer (from the toc.digest annotation). */
  tocDigests: string[];
}

export interface BuildImageOptions {
  /** Registry host to push to (`127.0.0.1:port`); use `Registry.host`, not the counting host. */
  host: string;
  repo: string;
  tag?: string;
  /** Entries added to the base layer next to busybox. */
  extraFiles?: EntrySpec[];
  /** Upper layers, bottom first, each a list of entries (whiteouts, opaque dirs allowed). */
  layers?: LayerSpec[];
  config?: ImageConfig;
}

/** `ref` with its registry host replaced, e.g. to pull through the counting proxy. */
export function withHost(ref: string, host: string): string {
  const slash = ref.indexOf('/');
  return host + ref.slice(slash);
}

function sha256(data: Buffer | string): string {
  return 'sha256:' + createHash('sha256').update(data).digest('hex');
}

function goArch(): string {
  const map: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  return map[process.arch] ?? process.arch;
}

/** The static busybox binary on this machine; throws if only a dynamically linked one exists. */
export async function findStaticBusybox(): Promise<string> {
  const bin = BUSYBOX_CANDIDATES.find((p) => existsSync(p));
  if (!bin) throw new Error('busybox not found: apt-get install busybox-static');
  // a dynamically linked ELF names its interpreter (ld-linux...) near the start of the file
  const fh = await open(bin, 'r');
  try {
    const head = Buffer.alloc(4096);
    await fh.read(head, 0, head.length, 0);
    if (head.includes('ld-linux') || head.includes('ld-musl')) {
      throw new Error(`${bin} is dynamically linked: apt-get install busybox-static`);
    }
  } finally {
    await fh.close();
  }
  return bin;
}

/** The base rootfs: /bin/busybox, applet symlinks, /etc/passwd and group, /tmp, mountpoints. */
export async function busyboxEntries(): Promise<EntrySpec[]> {
  const busybox = await findStaticBusybox();
  return [
    { path: '/bin/busybox', content: { fromFile: busybox }, mode: 0o755 },
    ...BUSYBOX_APPLETS.map((a): EntrySpec => ({ type: 'symlink', path: `/bin/${a}`, target: 'busybox' })),
    { path: '/etc/passwd', content: 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' },
    { path: '/etc/group', content: 'root:x:0:\nnogroup:x:65534:\n' },
    { type: 'dir', path: '/root', mode: 0o700 },
    { type: 'dir', path: '/tmp', mode: 0o1777 },
    { type: 'dir', path: '/dev' },
    { type: 'dir', path: '/proc' },
    { type: 'dir', path: '/sys' },
  ];
}

async function writeBlob(layoutDir: string, digest: string, data: Buffer | string): Promise<void> {
  await writeFile(path.join(layoutDir, 'blobs', 'sha256', digest.slice('sha256:'.length)), data);
}

/** Reads a manifest from the registry; returns it with its digest. */
export async function fetchManifest(
  host: string,
  repo: string,
  reference: string,
): Promise<{ digest: string; mediaType: string; manifest: { config: ImageLayerInfo; layers: ImageLayerInfo[] } }> {
  const res = await fetch(`http://${host}/v2/${repo}/manifests/${reference}`, {
    headers: { accept: [MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST].join(', ') },
    signal: AbortSignal.timeout(30_000),
  });
  const body = Buffer.from(await res.arrayBuffer());
  if (res.status !== 200) throw new Error(`GET manifest ${host}/${repo}:${reference}: HTTP ${res.status}: ${body.toString('utf8')}`);
  const manifest = JSON.parse(body.toString('utf8')) as { config: ImageLayerInfo; layers: ImageLayerInfo[] };
  return { digest: sha256(body), mediaType: res.headers.get('content-type') ?? '', manifest };
}

async function describePushed(host: string, repo: string, tag: string): Promise<PushedImage> {
  const { digest, manifest } = await fetchManifest(host, repo, tag);
  const layers = manifest.layers.map((l) => ({
    digest: l.digest,
    size: l.size,
    mediaType: l.mediaType,
    annotations: l.annotations ?? {},
  }));
  return {
    ref: `${host}/${repo}:${tag}`,
    host,
    repo,
    tag,
    manifestDigest: digest,
    configDigest: manifest.config.digest,
    layers,
    totalLayerBytes: layers.reduce((n, l) => n + l.size, 0),
  };
}

/**
 * Builds a busybox image (base layer: busybox + `extraFiles`; then `layers`), writes it as an OCI
 * layout in a tmp dir, pushes it with skopeo to `<host>/<repo>:<tag>`, and removes the tmp dir.
 */
export async function buildBusyboxImage(opts: BuildImageOptions): Promise<BuiltImage> {
  const tag = opts.tag ?? 'latest';
  const tmp = await createTmpRoot('image');
  try {
    const layoutDir = path.join(tmp.dir, 'oci');
    await mkdir(path.join(layoutDir, 'blobs', 'sha256'), { recursive: true });
    const specs: LayerSpec[] = [[...(await busyboxEntries()), ...(opts.extraFiles ?? [])], ...(opts.layers ?? [])];
    const blobs: LayerBlob[] = [];
    for (const [i, spec] of specs.entries()) {
      const rootfs = path.join(tmp.dir, `layer${i}`);
      await materializeEntries(rootfs, spec);
      const blob = await packLayer(rootfs, path.join(tmp.dir, `layer${i}`));
      await rm(rootfs, { recursive: true, force: true });
      await copyFile(blob.file, path.join(layoutDir, 'blobs', 'sha256', blob.digest.slice('sha256:'.length)));
      await rm(blob.file);
      blobs.push(blob);
    }
    const created = new Date(DEFAULT_MTIME_SEC * 1000).toISOString();
    const config = JSON.stringify({
      created,
      architecture: goArch(),
      os: 'linux',
      config: {
        Env: ['PATH=/bin'],
        Cmd: ['/bin/sh'],
        WorkingDir: '/',
        ...opts.config,
      },
      rootfs: { type: 'layers', diff_ids: blobs.map((b) => b.diffId) },
      history: blobs.map((_, i) => ({ created, created_by: `stargaze e2e harness: layer ${i}` })),
    });
    const configDigest = sha256(config);
    await writeBlob(layoutDir, configDigest, config);
    const manifest = JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPE_OCI_MANIFEST,
      config: { mediaType: MEDIA_TYPE_OCI_CONFIG, digest: configDigest, size: Buffer.byteLength(config) },
      layers: blobs.map((b) => ({ mediaType: MEDIA_TYPE_OCI_LAYER_GZIP, digest: b.digest, size: b.size })),
    });
    const manifestDigest = sha256(manifest);
    await writeBlob(layoutDir, manifestDigest, manifest);
    await writeFile(path.join(layoutDir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
    await writeFile(
      path.join(layoutDir, 'index.json'),
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA_TYPE_OCI_INDEX,
        manifests: [
          {
            mediaType: MEDIA_TYPE_OCI_MANIFEST,
            digest: manifestDigest,
            size: Buffer.byteLength(manifest),
            annotations: { 'org.opencontainers.image.ref.name': tag },
          },
        ],
      }),
    );
    await run('skopeo', [
      '--insecure-policy',
      'copy',
      '--quiet',
      '--preserve-digests',
      '--dest-tls-verify=false',
      `oci:${layoutDir}:${tag}`,
      `docker://${opts.host}/${opts.repo}:${tag}`,
    ]);
    const pushed = await describePushed(opts.host, opts.repo, tag);
    if (pushed.manifestDigest !== manifestDigest) {
      throw new Error(`registry has manifest ${pushed.manifestDigest}, expected ${manifestDigest}`);
    }
    return { ...pushed, diffIds: blobs.map((b) => b.diffId), uncompressedSizes: blobs.map((b) => b.uncompressedSize) };
  } finally {
    await tmp.remove();
  }
}

export interface ConvertOptions {
  /** `--estargz-chunk-size` (0 or unset: the converter's 4 MiB default). */
  chunkSizeBytes?: number;
  /** Extra `ctr-remote images convert` flags. */
  extraArgs?: string[];
}

/**
 * Converts `src` (in the registry) to eStargz with the reference converter and pushes it as `dst`:
 * `ctr content fetch` into a scratch namespace, `ctr-remote images convert --estargz --oci`,
 * `ctr images push --plain-http`, then `ctr images rm --sync` so nothing stays in containerd's
 * content store (a later pull really goes to the registry).
 */
export async function convertToEstargz(
  containerd: Containerd,
  src: string,
  dst: string,
  opts: ConvertOptions = {},
): Promise<EstargzImage> {
  const namespace = containerd.newNamespace('convert');
  const flags = [
    ...(opts.chunkSizeBytes ? ['--estargz-chunk-size', String(opts.chunkSizeBytes)] : []),
    ...(opts.extraArgs ?? []),
  ];
  await containerd.fetch(src, { namespace });
  try {
    await containerd.ctrRemote(['images', 'convert', '--estargz', '--oci', ...flags, src, dst], { namespace });
    await containerd.ctr(['images', 'push', '--plain-http', dst], { namespace });
  } finally {
    await containerd.ctr(['images', 'rm', '--sync', src, dst], { namespace, allowFailure: true });
  }
  return describeEstargz(dst);
}

/** `stargaze convert --plain-http SRC DST` (registry to registry), the command users run. */
export async function convertWithStargaze(src: string, dst: string): Promise<EstargzImage> {
  await run(STARGAZE_COMMAND, ['convert', '--plain-http', '--quiet', src, dst], { env: STARGAZE_COMMAND_ENV, timeoutMs: 300_000 });
  return describeEstargz(dst);
}

/** The pushed eStargz image `host/repo:tag`, checked to carry a TOC digest on every layer. */
async function describeEstargz(dst: string): Promise<EstargzImage> {
  const m = /^([^/]+)\/(.+):([^:/]+)$/.exec(dst);
  if (!m) throw new Error(`cannot parse image reference ${dst} (want host/repo:tag)`);
  const pushed = await describePushed(m[1]!, m[2]!, m[3]!);
  const tocDigests = pushed.layers.map((l) => l.annotations[ANNOTATION_TOC_DIGEST] ?? '');
  if (tocDigests.some((d) => d === '')) throw new Error(`${dst}: a layer has no ${ANNOTATION_TOC_DIGEST} annotation`);
  return { ...pushed, tocDigests };
}

/** `buildBusyboxImage` as `<repo>:<tag>` then `convertToEstargz` as `<repo>:<tag>-esgz`. */
export async function buildEstargzImage(
  containerd: Containerd,
  opts: BuildImageOptions & ConvertOptions,
): Promise<{ original: BuiltImage; estargz: EstargzImage }> {
  const original = await buildBusyboxImage(opts);
  const estargz = await convertToEstargz(containerd, original.ref, `${original.ref}-esgz`, opts);
  return { original, estargz };
}

/**
 * The tricky image (image-fixtures.ts: every tar/overlay corner) pushed to `host` as `<repo>:v1`, and its
 * eStargz conversion by the reference converter as `<repo>:v1-esgz`.
 */
export async function publishTrickyImages(
  containerd: Containerd,
  host: string,
  repo: string,
): Promise<{ fixture: TrickyFixture; original: BuiltImage; esgz: EstargzImage }> {
  const fixture = trickyFixture();
  const original = await buildBusyboxImage({ host, repo, tag: 'v1', extraFiles: fixture.extraFiles, layers: fixture.layers });
  const esgz = await convertToEstargz(containerd, original.ref, `${host}/${repo}:v1-esgz`);
  return { fixture, original, esgz };
}

/**
 * `original` mounted as containerd's overlayfs snapshotter unpacks it and `esgz` as the stargz snapshotter
 * serves it, side by side under a temp dir, both unmounted when `scope` ends: what a tree comparison needs.
 */
export async function mountSideBySide(
  containerd: Containerd,
  scope: CleanupScope,
  opts: { original: string; esgz: string; namespace: string; label: string },
): Promise<{ unpacked: string; lazy: string }> {
  const dir = await makeTmpRoot(opts.label, scope);
  const unpacked = path.join(dir, 'overlayfs');
  const lazy = path.join(dir, 'stargz');
  await containerd.mountImage(opts.original, unpacked, { namespace: opts.namespace });
  scope.after(() => containerd.unmountImage(unpacked, { namespace: opts.namespace }));
  await containerd.mountImage(opts.esgz, lazy, { namespace: opts.namespace, snapshotter: 'stargz' });
  scope.after(() => containerd.unmountImage(lazy, { namespace: opts.namespace }));
  return { unpacked, lazy };
}
