/**
 * Hand-made images for hostile-input tests: eStargz layers built in memory with the project's writer,
 * blob surgery (replace the TOC, rewrite the footer), and a push of arbitrary layer blobs with
 * arbitrary annotations straight through the registry's HTTP API (no skopeo, no content checks), so a
 * test can put a truncated or lying layer in front of containerd and the daemon.
 *
 * Not exported from the harness index: import it directly.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { Readable, Writable } from 'node:stream';
import { gunzipSync, gzipSync } from 'node:zlib';

import tarStream from 'tar-stream';

import { encodeFooter } from '../../../src/estargz/footer';
import { TAR_EOF_BYTES, TYPEFLAG, encodeTarHeader, tarPaddingBytes } from '../../../src/estargz/tar-header';
import { readToc } from '../../../src/estargz/toc';
import { writeEstargz } from '../../../src/estargz/writer';
import { ANNOTATION_TOC_DIGEST, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_MANIFEST } from './images';
import { DEFAULT_MTIME_SEC } from './rootfs';

export function sha256(data: Buffer | string): string {
  return 'sha256:' + createHash('sha256').update(data).digest('hex');
}

/** containerd's chain IDs (identity.ChainIDs): the snapshot name of each layer, base first. */
export function chainIds(diffIds: readonly string[]): string[] {
  const out: string[] = [];
  for (const d of diffIds) out.push(out.length === 0 ? d : sha256(`${out[out.length - 1]!} ${d}`));
  return out;
}

/** One tar entry of a hand-made layer. Directories end in `/`. */
export interface RawEntry {
  name: string;
  type?: 'file' | 'directory' | 'symlink';
  content?: string | Buffer;
  linkname?: string;
  mode?: number;
}

/** An eStargz blob with what its manifest descriptor and image config need. */
export interface EstargzBlob {
  blob: Buffer;
  /** sha256 of the TOC JSON: the `containerd.io/snapshot/stargz/toc.digest` annotation. */
  tocDigest: string;
  diffId: string;
  tocOffset: number;
}

async function collect(write: (sink: Writable) => Promise<unknown>): Promise<Buffer> {
  const parts: Buffer[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb): void {
      parts.push(chunk);
      cb();
    },
  });
  await write(sink);
  return Buffer.concat(parts);
}

/** Packs entries into an uncompressed tar with tar-stream (root owner, the harness's fixed mtime). */
export async function makeTar(entries: readonly RawEntry[]): Promise<Buffer> {
  const pack = tarStream.pack();
  const collected = (async (): Promise<Buffer> => {
    const parts: Buffer[] = [];
    for await (const chunk of pack as AsyncIterable<Uint8Array>) parts.push(Buffer.from(chunk));
    return Buffer.concat(parts);
  })();
  for (const e of entries) {
    const type = e.type ?? (e.name.endsWith('/') ? 'directory' : 'file');
    const header = {
      name: e.name,
      type,
      linkname: e.linkname,
      mode: e.mode ?? (type === 'directory' ? 0o755 : 0o644),
      uid: 0,
      gid: 0,
      mtime: new Date(DEFAULT_MTIME_SEC * 1000),
    };
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null): void => (err ? reject(err) : resolve());
      if (type === 'file') pack.entry(header, typeof e.content === 'string' ? Buffer.from(e.content) : (e.content ?? Buffer.alloc(0)), cb);
      else pack.entry(header, cb);
    });
  }
  pack.finalize();
  return collected;
}

/** An eStargz layer (the project's writer) from in-memory entries. */
export async function estargzLayer(entries: readonly RawEntry[]): Promise<EstargzBlob> {
  const tar = await makeTar(entries);
  return estargzFromStream(Readable.from([tar]));
}

/** An eStargz layer (the project's writer) from a tar or tar.gz file. */
export async function estargzFromFile(file: string): Promise<EstargzBlob> {
  return estargzFromStream(createReadStream(file));
}

async function estargzFromStream(input: Readable): Promise<EstargzBlob> {
  let result: Awaited<ReturnType<typeof writeEstargz>> | undefined;
  const blob = await collect(async (sink) => {
    result = await writeEstargz(input, sink);
  });
  return { blob, tocDigest: result!.tocDigest, diffId: result!.diffId, tocOffset: result!.tocOffset };
}

/** The stored TOC JSON and the offset of its gzip member. */
export async function tocOf(blob: Buffer): Promise<{ json: Buffer; tocOffset: number }> {
  const { tocJson, tocOffset } = await readToc({
    size: blob.length,
    readRange: (offset, length) => Promise.resolve(blob.subarray(offset, offset + length)),
  });
  return { json: Buffer.from(tocJson), tocOffset };
}

/** The gzip member holding the TOC tar entry (header, JSON, padding, tar EOF), as writers make it. */
export function tocMember(json: Buffer | string): Buffer {
  const bytes = typeof json === 'string' ? Buffer.from(json) : json;
  return gzipSync(
    Buffer.concat([
      encodeTarHeader({
        name: 'stargz.index.json',
        typeflag: TYPEFLAG.reg,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size: bytes.length,
        mtimeSec: 0,
        linkname: '',
        uname: '',
        gname: '',
        devmajor: 0,
        devminor: 0,
      }),
      bytes,
      Buffer.alloc(tarPaddingBytes(bytes.length) + TAR_EOF_BYTES),
    ]),
  );
}

/**
 * The same payload members with a different TOC: `blob[0, tocOffset)` + a new TOC member + a footer
 * pointing at it. Still a valid tar.gz whose last entry is the new JSON.
 */
export async function replaceToc(blob: Buffer, json: Buffer | string): Promise<EstargzBlob> {
  const { tocOffset } = await tocOf(blob);
  const out = Buffer.concat([blob.subarray(0, tocOffset), tocMember(json), encodeFooter(tocOffset)]);
  return { blob: out, tocDigest: sha256(json), diffId: diffIdOf(out), tocOffset };
}

/** Parses the TOC, lets `edit` change the object, writes it back (TAB-indented like the reference). */
export async function editToc(blob: Buffer, edit: (toc: { version: number; entries: Array<Record<string, unknown>> }) => void): Promise<EstargzBlob> {
  const toc = JSON.parse((await tocOf(blob)).json.toString('utf8')) as { version: number; entries: Array<Record<string, unknown>> };
  edit(toc);
  return replaceToc(blob, JSON.stringify(toc, null, '\t'));
}

/** sha256 of the decompressed stream (the config's diff_id); throws when the blob is not valid gzip. */
export function diffIdOf(blob: Buffer): string {
  return sha256(gunzipSync(blob, { maxOutputLength: 1 << 30 }));
}

/** One layer to push: any bytes, with the diff_id the config should claim and layer annotations. */
export interface RawLayer {
  blob: Buffer;
  diffId: string;
  annotations?: Record<string, string>;
  mediaType?: string;
}

export interface RawImage {
  ref: string;
  manifestDigest: string;
  layers: Array<{ digest: string; size: number; diffId: string; chainId: string; annotations: Record<string, string> }>;
}

/** Descriptor annotations of a well-formed eStargz layer. */
export function estargzAnnotations(b: EstargzBlob): Record<string, string> {
  return { [ANNOTATION_TOC_DIGEST]: b.tocDigest };
}

async function pushBlob(host: string, repo: string, data: Buffer): Promise<string> {
  const digest = sha256(data);
  const head = await fetch(`http://${host}/v2/${repo}/blobs/${digest}`, { method: 'HEAD', signal: AbortSignal.timeout(30_000) });
  if (head.status === 200) return digest;
  const start = await fetch(`http://${host}/v2/${repo}/blobs/uploads/`, { method: 'POST', signal: AbortSignal.timeout(30_000) });
  await start.arrayBuffer();
  const location = start.headers.get('location');
  if (start.status !== 202 || !location) throw new Error(`start blob upload to ${host}/${repo}: HTTP ${start.status}`);
  const url = new URL(location, `http://${host}`);
  url.searchParams.set('digest', digest);
  const put = await fetch(url, {
    method: 'PUT',
    // fetch sets content-length from the Buffer; a second one of ours makes npm undici (which installs itself as
    // fetch's dispatcher once src/remote is loaded in the same process) refuse the request
    headers: { 'content-type': 'application/octet-stream' },
    body: data,
    signal: AbortSignal.timeout(60_000),
  });
  const body = await put.text();
  if (put.status !== 201) throw new Error(`upload ${digest} to ${host}/${repo}: HTTP ${put.status}: ${body}`);
  return digest;
}

function goArch(): string {
  const map: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  return map[process.arch] ?? process.arch;
}

/** Pushes an OCI image (config + manifest) whose layers are exactly the given bytes. */
export async function pushRawImage(opts: { host: string; repo: string; tag: string; layers: readonly RawLayer[] }): Promise<RawImage> {
  const { host, repo, tag } = opts;
  const created = new Date(DEFAULT_MTIME_SEC * 1000).toISOString();
  const diffIds = opts.layers.map((l) => l.diffId);
  const config = JSON.stringify({
    created,
    architecture: goArch(),
    os: 'linux',
    config: { Env: ['PATH=/bin'], Cmd: ['/bin/sh'], WorkingDir: '/' },
    rootfs: { type: 'layers', diff_ids: diffIds },
    history: diffIds.map(() => ({ created, created_by: 'stargaze e2e raw image' })),
  });
  const configDigest = await pushBlob(host, repo, Buffer.from(config));
  const layers = [];
  for (const l of opts.layers) {
    const digest = await pushBlob(host, repo, l.blob);
    layers.push({ mediaType: l.mediaType ?? MEDIA_TYPE_OCI_LAYER_GZIP, digest, size: l.blob.length, ...(l.annotations ? { annotations: l.annotations } : {}) });
  }
  const manifest = JSON.stringify({
    schemaVersion: 2,
    mediaType: MEDIA_TYPE_OCI_MANIFEST,
    config: { mediaType: MEDIA_TYPE_OCI_CONFIG, digest: configDigest, size: Buffer.byteLength(config) },
    layers,
  });
  const res = await fetch(`http://${host}/v2/${repo}/manifests/${tag}`, {
    method: 'PUT',
    headers: { 'content-type': MEDIA_TYPE_OCI_MANIFEST },
    body: manifest,
    signal: AbortSignal.timeout(30_000),
  });
  const body = await res.text();
  if (res.status !== 201) throw new Error(`put manifest ${host}/${repo}:${tag}: HTTP ${res.status}: ${body}`);
  const chains = chainIds(diffIds);
  return {
    ref: `${host}/${repo}:${tag}`,
    manifestDigest: sha256(manifest),
    layers: layers.map((l, i) => ({ digest: l.digest, size: l.size, diffId: diffIds[i]!, chainId: chains[i]!, annotations: opts.layers[i]!.annotations ?? {} })),
  };
}
