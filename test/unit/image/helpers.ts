/**
 * Fixtures for the image tests: tars (including hand-made hostile headers), and OCI layouts holding an
 * image built from them.
 */
import { createHash } from 'node:crypto';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { OciLayout } from '../../../src/image/oci-layout';
import {
  MEDIA_TYPE_OCI_CONFIG,
  MEDIA_TYPE_OCI_INDEX,
  MEDIA_TYPE_OCI_LAYER_GZIP,
  MEDIA_TYPE_OCI_MANIFEST,
  type Descriptor,
} from '../../../src/image/media-types';

export { makeTar } from '../estargz/fixture';

export function sha256(data: Buffer | string): string {
  return 'sha256:' + createHash('sha256').update(data).digest('hex');
}

export async function tmpDir(label: string): Promise<string> {
  return mkdtemp(path.join(tmpdir(), `stargaze-unit-${label}-`));
}

/** One 512-byte ustar header with raw name bytes (anything, even non-UTF-8) and a valid checksum. */
export function rawHeader(name: Buffer | string, opts: { typeflag?: string; size?: number; linkname?: string } = {}): Buffer {
  const h = Buffer.alloc(512);
  const nameBytes = typeof name === 'string' ? Buffer.from(name) : name;
  nameBytes.copy(h, 0, 0, Math.min(100, nameBytes.length));
  h.write('0000644\0', 100, 'latin1');
  h.write('0000000\0', 108, 'latin1');
  h.write('0000000\0', 116, 'latin1');
  h.write((opts.size ?? 0).toString(8).padStart(11, '0') + '\0', 124, 'latin1');
  h.write('00000000000\0', 136, 'latin1');
  h.write(opts.typeflag ?? '0', 156, 'latin1');
  if (opts.linkname !== undefined) h.write(opts.linkname, 157, 'utf8');
  h.write('ustar\0', 257, 'latin1');
  h.write('00', 263, 'latin1');
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 32 : (h[i] as number);
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
  return h;
}

/** A whole tar from raw entries: header, payload padded to 512, then the end-of-archive blocks. */
export function rawTar(entries: Array<{ header: Buffer; payload?: Buffer }>): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    parts.push(e.header);
    if (e.payload !== undefined && e.payload.length > 0) {
      parts.push(e.payload, Buffer.alloc((512 - (e.payload.length % 512)) % 512));
    }
  }
  parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

/** A PAX 'x' record body. */
export function paxBody(records: Record<string, string>): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of Object.entries(records)) {
    const rest = ` ${k}=${v}\n`;
    let len = Buffer.byteLength(rest) + 1;
    while (String(len).length + Buffer.byteLength(rest) !== len) len++;
    parts.push(Buffer.from(`${len}${rest}`));
  }
  return Buffer.concat(parts);
}

export interface LayoutImage {
  dir: string;
  layout: OciLayout;
  manifestDigest: string;
  layers: Descriptor[];
  diffIds: string[];
}

/**
 * Writes an image (gzip layers from `tars`) into a new OCI layout under `tag`. `layerMediaType` and
 * `manifestMediaType` allow Docker types; `corrupt` replaces a layer's blob bytes after the digest was taken.
 */
export async function layoutImage(
  dir: string,
  tars: Buffer[],
  opts: { tag?: string; layerMediaType?: string; manifestMediaType?: string; configMediaType?: string; blobs?: (i: number, gz: Buffer) => Buffer } = {},
): Promise<LayoutImage> {
  const layout = await OciLayout.create(dir);
  const layers: Descriptor[] = [];
  const diffIds: string[] = [];
  for (const [i, tar] of tars.entries()) {
    const gz = gzipSync(tar);
    const stored = opts.blobs?.(i, gz) ?? gz;
    const digest = sha256(stored);
    await layout.putBlob(digest, stored);
    layers.push({ mediaType: opts.layerMediaType ?? MEDIA_TYPE_OCI_LAYER_GZIP, digest, size: stored.length });
    diffIds.push(sha256(tar));
  }
  const config = Buffer.from(
    JSON.stringify({ architecture: 'amd64', os: 'linux', config: { Cmd: ['/bin/sh'] }, rootfs: { type: 'layers', diff_ids: diffIds }, history: [] }),
  );
  const configDigest = sha256(config);
  await layout.putBlob(configDigest, config);
  const manifestMediaType = opts.manifestMediaType ?? MEDIA_TYPE_OCI_MANIFEST;
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: manifestMediaType,
      config: { mediaType: opts.configMediaType ?? MEDIA_TYPE_OCI_CONFIG, digest: configDigest, size: config.length },
      layers,
    }),
  );
  const manifestDigest = sha256(manifest);
  await layout.putBlob(manifestDigest, manifest);
  await layout.setTag(opts.tag ?? 'v1', { mediaType: manifestMediaType, digest: manifestDigest, size: manifest.length });
  return { dir, layout, manifestDigest, layers, diffIds };
}

/** Adds an index (tagged `tag`) over manifests already in the layout. */
export async function layoutIndex(layout: OciLayout, tag: string, manifests: Descriptor[]): Promise<string> {
  const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPE_OCI_INDEX, manifests }));
  const digest = sha256(body);
  await layout.putBlob(digest, body);
  await layout.setTag(tag, { mediaType: MEDIA_TYPE_OCI_INDEX, digest, size: body.length });
  return digest;
}
