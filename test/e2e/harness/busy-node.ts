/**
 * A busy node's images: many images of distinct small eStargz layers (the project's writer), each over one shared
 * eStargz busybox base so a container can run in it, pushed straight to a registry (raw-image.ts). Each distinct
 * layer carries a probe file whose sha256 is known from the build, so a workload that reads one file per layer
 * (`probeCommand`) can be checked byte for byte (`checkProbeSums`). Used by the busy-node, restart-at-size and soak
 * benchmarks (script/bench/) and their small version in the e2e suite.
 *
 * Not exported from the harness index: import it directly.
 */
import { createHash, randomBytes } from 'node:crypto';
import path from 'node:path';

import { ANNOTATION_UNCOMPRESSED_SIZE, busyboxEntries } from './images';
import { chainIds, estargzAnnotations, estargzFromFile, estargzLayer, pushRawImage, type RawEntry, type RawLayer } from './raw-image';
import { materializeEntries, packLayer } from './rootfs';

/** One distinct layer's probe: the file a workload reads, and the sha256 (hex) of its bytes. */
export interface LayerProbe {
  /** Absolute path inside the image's rootfs. */
  path: string;
  sha256: string;
}

export interface BusyImage {
  /** `<host>/<repo>:<tag>`. */
  ref: string;
  /** Layers in the image: the shared base plus the distinct ones. */
  layers: number;
  /** Chain ID of the top layer: the committed snapshot an image's rootfs stacks on. */
  topChainId: string;
  /** One per distinct layer, base first. */
  probes: LayerProbe[];
  /** Sum of the blob sizes of the distinct layers. */
  distinctBytes: number;
}

export interface BusyImagesOptions {
  /** Where to push (`host:port`); refs name it. */
  host: string;
  /** Repository prefix: image i goes to `<repo>-<i>:v1`. */
  repo: string;
  images: number;
  /** Distinct layers per image (the shared base comes on top of these). */
  layersPerImage: number;
  /** Files per distinct layer; the first one is the probe. */
  filesPerLayer: number;
  /** Size of the probe file (random bytes: incompressible); the others are a few hundred bytes of text. */
  probeBytes: number;
  /** A tmp dir for the base layer's tree and tar.gz. */
  workDir: string;
}

/** The shared base: busybox and its applets, /etc/passwd, /tmp. */
export async function busyboxBaseLayer(workDir: string): Promise<RawLayer> {
  const rootfs = path.join(workDir, 'base-rootfs');
  await materializeEntries(rootfs, await busyboxEntries());
  const gz = await packLayer(rootfs, path.join(workDir, 'base'));
  const esgz = await estargzFromFile(gz.file);
  return { blob: esgz.blob, diffId: esgz.diffId, annotations: { ...estargzAnnotations(esgz), [ANNOTATION_UNCOMPRESSED_SIZE]: String(gz.uncompressedSize) } };
}

const hex = (data: Buffer | string): string => createHash('sha256').update(data).digest('hex');

/** Distinct layer `layer` of image `image`: `/busy/i<image>/l<layer>/f<k>`, f0 the probe. */
async function distinctLayer(image: number, layer: number, opts: BusyImagesOptions): Promise<{ layer: RawLayer; probe: LayerProbe }> {
  const dir = `busy/i${image}/l${layer}`;
  const probe = randomBytes(opts.probeBytes);
  const entries: RawEntry[] = [
    { name: 'busy/' },
    { name: `busy/i${image}/` },
    { name: `${dir}/` },
    { name: `${dir}/f0`, content: probe },
    ...Array.from({ length: Math.max(0, opts.filesPerLayer - 1) }, (_, k): RawEntry => ({
      name: `${dir}/f${k + 1}`,
      content: `image ${image} layer ${layer} file ${k + 1}\n`.repeat(16),
    })),
  ];
  const esgz = await estargzLayer(entries);
  return { layer: { blob: esgz.blob, diffId: esgz.diffId, annotations: estargzAnnotations(esgz) }, probe: { path: `/${dir}/f0`, sha256: hex(probe) } };
}

/** Builds and pushes `images` images of `layersPerImage` distinct layers each over the busybox base. */
export async function pushBusyImages(opts: BusyImagesOptions): Promise<BusyImage[]> {
  const base = await busyboxBaseLayer(opts.workDir);
  const out: BusyImage[] = [];
  for (let i = 0; i < opts.images; i++) {
    const layers: RawLayer[] = [base];
    const probes: LayerProbe[] = [];
    for (let l = 0; l < opts.layersPerImage; l++) {
      const d = await distinctLayer(i, l, opts);
      layers.push(d.layer);
      probes.push(d.probe);
    }
    const pushed = await pushRawImage({ host: opts.host, repo: `${opts.repo}-${i}`, tag: 'v1', layers });
    out.push({
      ref: pushed.ref,
      layers: layers.length,
      topChainId: chainIds(layers.map((l) => l.diffId)).at(-1)!,
      probes,
      distinctBytes: layers.slice(1).reduce((n, l) => n + l.blob.length, 0),
    });
  }
  return out;
}

/** The workload: `sha256sum` of each probe (busybox's applet), one line per probe. */
export function probeCommand(probes: readonly LayerProbe[], root = ''): string[] {
  return ['/bin/sha256sum', ...probes.map((p) => root + p.path)];
}

/** A probe read back with other bytes than it was built with, or not at all. */
export class ProbeMismatchError extends Error {
  readonly code = 'PROBE_MISMATCH';
}

/**
 * Checks `sha256sum` output (`<hex>  <path>` lines, paths under `root`) against the probes: every probe listed once
 * with its sum. Throws ProbeMismatchError naming the first probe that is missing or differs.
 */
export function checkProbeSums(stdout: string, probes: readonly LayerProbe[], root = ''): void {
  const got = new Map<string, string>();
  for (const line of stdout.split('\n')) {
    const m = /^([0-9a-f]{64}) {2}(.+)$/.exec(line.trim());
    if (m) got.set(m[2]!, m[1]!);
  }
  for (const p of probes) {
    const sum = got.get(root + p.path);
    if (sum !== p.sha256) throw new ProbeMismatchError(`${p.path}: sha256 ${sum ?? '(not read)'}, built as ${p.sha256}`);
  }
}
