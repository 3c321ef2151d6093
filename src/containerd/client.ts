/**
 * A small typed client for the containerd services `stargaze rpull` needs: namespaces, leases, content, images,
 * diff and snapshots, over containerd's gRPC socket. Protos are our copies under proto/ (same package, message
 * and field names and numbers as containerd's), loaded at runtime with proto-loader.
 *
 * Every call carries the namespace in gRPC metadata `containerd-namespace` and, on a client made with
 * withLease(), the lease in `containerd-lease`, exactly as containerd's Go client does
 * (namespaces.WithNamespace, leases.WithLease): objects created under a lease are kept from the garbage
 * collector until the lease is deleted or expires.
 *
 * Errors come back as ContainerdError carrying the gRPC code (errors.ts), so callers can tell NotFound and
 * AlreadyExists apart the way containerd's own clients do.
 */
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadProtoSet } from '../grpc/protos';
import { InvalidArgumentError, errorCode } from '../errors';
import { ContainerdError, ContainerdUnreachableError, fromGrpc, isNotFound } from './errors';
import { writeContent, type ContentSource, type WriteContentOptions, type WriteContentResult } from './content-writer';
import type { ContentInfo, Descriptor, ImageRecord, Lease, Mount, SnapshotInfo, SnapshotKind } from './types';

/** gRPC metadata key containerd reads the namespace from (namespaces.GRPCHeader). */
export const NAMESPACE_METADATA_KEY = 'containerd-namespace';
/** gRPC metadata key containerd reads the lease from (leases.GRPCHeader). */
export const LEASE_METADATA_KEY = 'containerd-lease';
/** containerd's client and server message limit (defaults.DefaultMaxRecvMsgSize / DefaultMaxSendMsgSize). */
export const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;
/** How long connect() waits for containerd's socket to accept the gRPC connection. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
/** containerd's identifiers.Validate: namespace names (and other ids) at most this long. */
const MAX_IDENTIFIER_CHARS = 76;
const IDENTIFIER_RE = /^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$/;

const SERVICE_NAMES = {
  content: 'containerd.services.content.v1.Content',
  images: 'containerd.services.images.v1.Images',
  leases: 'containerd.services.leases.v1.Leases',
  diff: 'containerd.services.diff.v1.Diff',
  namespaces: 'containerd.services.namespaces.v1.Namespaces',
  snapshots: 'containerd.services.snapshots.v1.Snapshots',
} as const;

type ServiceKey = keyof typeof SERVICE_NAMES;
type RawClients = Record<ServiceKey, grpc.Client>;

// --- wire shapes, as proto-loader hands them over (keepCase, longs: String, enums: String, defaults) ---------

interface WireDescriptor {
  media_type: string;
  digest: string;
  size: string | number;
  annotations: Record<string, string>;
}

interface WireSnapshotInfo {
  name: string;
  parent: string;
  kind: SnapshotKind;
  labels: Record<string, string>;
}

interface WireContentInfo {
  digest: string;
  size: string | number;
  labels: Record<string, string>;
}

interface WireImage {
  name: string;
  labels: Record<string, string>;
  target: WireDescriptor | null;
}

interface WireLease {
  id: string;
  labels: Record<string, string>;
}

type UnaryCallback = (err: grpc.ServiceError | null, res?: unknown) => void;
type UnaryMethod = (req: object, md: grpc.Metadata, opts: grpc.CallOptions, cb: UnaryCallback) => grpc.ClientUnaryCall;
type ServerStreamMethod = (req: object, md: grpc.Metadata, opts: grpc.CallOptions) => grpc.ClientReadableStream<unknown>;
type DuplexMethod = (md: grpc.Metadata, opts: grpc.CallOptions) => grpc.ClientDuplexStream<object, unknown>;

// --- proto loading --------------------------------------------------------------------------------------------

let loaded: grpc.GrpcObject | undefined;

/** Loads the protobuf definitions now rather than on the first connect (a long-lived process's idle time). */
export function preloadProtos(): void {
  loadProtos();
}

function loadProtos(): grpc.GrpcObject {
  loaded ??= grpc.loadPackageDefinition(
    loadProtoSet('containerd', {
      longs: String, // int64 sizes without precision loss
      enums: String,
      defaults: true,
      oneofs: true,
    }),
  );
  return loaded;
}

function serviceConstructor(fullName: string): grpc.ServiceClientConstructor {
  let node: unknown = loadProtos();
  for (const part of fullName.split('.')) node = (node as Record<string, unknown> | undefined)?.[part];
  if (typeof node !== 'function') throw new Error(`service ${fullName} not found in our protos`);
  return node as grpc.ServiceClientConstructor;
}

// --- conversions ---------------------------------------------------------------------------------------------

function toNumber(v: string | number): number {
  const n = typeof v === 'number' ? v : Number(v);
  if (!Number.isSafeInteger(n)) throw new RangeError(`size ${v} is not a safe integer`);
  return n;
}

export function descriptorToWire(d: Descriptor): WireDescriptor {
  return { media_type: d.mediaType, digest: d.digest, size: d.size, annotations: d.annotations ?? {} };
}

function descriptorFromWire(d: WireDescriptor | null | undefined): Descriptor {
  if (!d) return { mediaType: '', digest: '', size: 0, annotations: {} };
  return { mediaType: d.media_type, digest: d.digest, size: toNumber(d.size), annotations: d.annotations ?? {} };
}

function imageFromWire(i: WireImage): ImageRecord {
  return { name: i.name, labels: i.labels ?? {}, target: descriptorFromWire(i.target) };
}

/** containerd's identifiers.Validate, for namespace names. */
export function validateIdentifier(id: string, what: string): string {
  if (id.length === 0) throw new InvalidArgumentError(`${what} must not be empty`);
  if (id.length > MAX_IDENTIFIER_CHARS) throw new InvalidArgumentError(`${what} "${id}" is longer than ${MAX_IDENTIFIER_CHARS} characters`);
  if (!IDENTIFIER_RE.test(id)) {
    throw new InvalidArgumentError(`${what} "${id}" must be letters and digits, separated by single '.', '_' or '-'`);
  }
  return id;
}

/** Why a unix socket does not accept connections, in words (ENOENT, ECONNREFUSED, EACCES...). */
async function probeSocket(address: string): Promise<string | undefined> {
  try {
    const st = await fsp.stat(address);
    if (!st.isSocket()) return 'not a unix socket';
  } catch (err) {
    const code = errorCode(err);
    if (code === 'ENOENT') return 'no such socket';
    if (code === 'EACCES') return 'permission denied (run as root?)';
    return code ?? 'cannot stat the socket';
  }
  return new Promise((resolve) => {
    const sock = net.connect({ path: address });
    const done = (why: string | undefined): void => {
      sock.destroy();
      resolve(why);
    };
    sock.once('connect', () => done(undefined));
    sock.once('error', (err) => {
      const code = errorCode(err);
      done(code === 'ECONNREFUSED' ? 'connection refused (stale socket: containerd is not running)' : code === 'EACCES' ? 'permission denied (run as root?)' : (code ?? err.message));
    });
  });
}

// --- the client ----------------------------------------------------------------------------------------------

export interface ConnectOptions {
  /** containerd's gRPC unix socket, e.g. /run/containerd/containerd.sock. */
  address: string;
  namespace: string;
  connectTimeoutMs?: number;
}

export class ContainerdClient {
  readonly content: ContentService;
  readonly images: ImagesService;
  readonly leases: LeasesService;
  readonly diff: DiffService;
  readonly namespaces: NamespacesService;

  private constructor(
    /** One grpc-js client per service; they share one connection through grpc-js's subchannel pool. */
    private readonly raw: RawClients,
    readonly address: string,
    readonly namespace: string,
    /** Lease sent with every call, if any. */
    readonly lease: string | undefined,
  ) {
    this.content = new ContentService(this, raw.content);
    this.images = new ImagesService(this, raw.images);
    this.leases = new LeasesService(this, raw.leases);
    this.diff = new DiffService(this, raw.diff);
    this.namespaces = new NamespacesService(this, raw.namespaces);
  }

  /**
   * Connects to containerd. Fails with ContainerdUnreachableError, saying why, when the socket is missing,
   * refuses connections or does not speak gRPC within the timeout.
   */
  static async connect(opts: ConnectOptions): Promise<ContainerdClient> {
    validateIdentifier(opts.namespace, 'namespace');
    const address = path.resolve(opts.address);
    const why = await probeSocket(address);
    if (why !== undefined) throw new ContainerdUnreachableError(address, why);
    const channelOptions: grpc.ChannelOptions = {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    };
    const target = `unix:${address}`;
    const credentials = grpc.credentials.createInsecure();
    const raw = {} as RawClients;
    for (const key of Object.keys(SERVICE_NAMES) as ServiceKey[]) {
      const Ctor = serviceConstructor(SERVICE_NAMES[key]);
      raw[key] = new Ctor(target, credentials, channelOptions);
    }
    const client = new ContainerdClient(raw, address, opts.namespace, undefined);
    const deadline = Date.now() + (opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
    try {
      await new Promise<void>((resolve, reject) => raw.namespaces.waitForReady(deadline, (err) => (err ? reject(err) : resolve())));
    } catch (err) {
      client.close();
      const reason = (await probeSocket(address)) ?? (err instanceof Error ? err.message : String(err));
      throw new ContainerdUnreachableError(address, reason);
    }
    return client;
  }

  /** The same connection, with every call made under `leaseId`. */
  withLease(leaseId: string): ContainerdClient {
    return new ContainerdClient(this.raw, this.address, this.namespace, leaseId);
  }

  /** The Snapshots service of one snapshotter (`overlayfs`, `stargz`...). */
  snapshots(snapshotter: string): SnapshotsService {
    return new SnapshotsService(this, this.raw.snapshots, snapshotter);
  }

  /** Closes the connection; clients made with withLease() share it. */
  close(): void {
    for (const c of Object.values(this.raw)) c.close();
  }

  /** @internal metadata for one call. */
  metadata(): grpc.Metadata {
    const md = new grpc.Metadata();
    md.set(NAMESPACE_METADATA_KEY, this.namespace);
    if (this.lease !== undefined) md.set(LEASE_METADATA_KEY, this.lease);
    return md;
  }

  /** @internal one unary call; gRPC errors become ContainerdError about `what`. */
  unary<Res>(client: grpc.Client, method: string, req: object, what: string, signal?: AbortSignal): Promise<Res> {
    return new Promise<Res>((resolve, reject) => {
      const fn = (client as unknown as Record<string, UnaryMethod | undefined>)[method];
      if (typeof fn !== 'function') {
        reject(new Error(`no method ${method} on the containerd client`));
        return;
      }
      if (signal?.aborted === true) {
        reject(signal.reason);
        return;
      }
      const onAbort = (): void => call.cancel();
      const call = fn.call(client, req, this.metadata(), {}, (err, res) => {
        signal?.removeEventListener('abort', onAbort);
        if (err) reject(signal?.aborted === true ? signal.reason : fromGrpc(err, what));
        else resolve(res as Res);
      });
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** @internal a server-streaming call, as an async iterable of its messages; errors become ContainerdError. */
  async *serverStream<Res>(client: grpc.Client, method: string, req: object, what: string): AsyncGenerator<Res> {
    const fn = (client as unknown as Record<string, ServerStreamMethod | undefined>)[method];
    if (typeof fn !== 'function') throw new Error(`no method ${method} on the containerd client`);
    const call = fn.call(client, req, this.metadata(), {});
    try {
      for await (const msg of call as AsyncIterable<Res>) yield msg;
    } catch (err) {
      throw fromGrpc(err, what);
    } finally {
      call.cancel();
    }
  }

  /** @internal opens a bidirectional stream. */
  duplex(client: grpc.Client, method: string): grpc.ClientDuplexStream<object, unknown> {
    const fn = (client as unknown as Record<string, DuplexMethod | undefined>)[method];
    if (typeof fn !== 'function') throw new Error(`no method ${method} on the containerd client`);
    return fn.call(client, this.metadata(), {});
  }
}

// --- services ------------------------------------------------------------------------------------------------

export class NamespacesService {
  constructor(
    private readonly c: ContainerdClient,
    private readonly raw: grpc.Client,
  ) {}

  /** The namespace's labels, or undefined when it does not exist. */
  async get(name: string): Promise<Record<string, string> | undefined> {
    try {
      const res = await this.c.unary<{ namespace: { labels: Record<string, string> } | null }>(this.raw, 'Get', { name }, `get namespace ${name}`);
      return res.namespace?.labels ?? {};
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async create(name: string, labels: Record<string, string> = {}): Promise<void> {
    await this.c.unary(this.raw, 'Create', { namespace: { name, labels } }, `create namespace ${name}`);
  }
}

export class LeasesService {
  constructor(
    private readonly c: ContainerdClient,
    private readonly raw: grpc.Client,
  ) {}

  async create(id: string, labels: Record<string, string>): Promise<Lease> {
    const res = await this.c.unary<{ lease: WireLease | null }>(this.raw, 'Create', { id, labels }, `create lease ${id}`);
    return { id: res.lease?.id ?? id, labels: res.lease?.labels ?? labels };
  }

  /** Deletes the lease; with `sync`, containerd garbage collects before answering. */
  async delete(id: string, sync = false): Promise<void> {
    await this.c.unary(this.raw, 'Delete', { id, sync }, `delete lease ${id}`);
  }
}

export class ContentService {
  constructor(
    private readonly c: ContainerdClient,
    private readonly raw: grpc.Client,
  ) {}

  /** Info of a blob, or undefined when the namespace does not have it. */
  async info(digest: string): Promise<ContentInfo | undefined> {
    try {
      const res = await this.c.unary<{ info: WireContentInfo | null }>(this.raw, 'Info', { digest }, `content info ${digest}`);
      const i = res.info;
      return i ? { digest: i.digest, size: toNumber(i.size), labels: i.labels ?? {} } : undefined;
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  /** Sets (or, with an empty value, removes) the given labels of a blob, leaving the others alone. */
  async updateLabels(digest: string, labels: Record<string, string>): Promise<void> {
    const paths = Object.keys(labels).map((k) => `labels.${k}`);
    if (paths.length === 0) return;
    const set: Record<string, string> = {};
    for (const [k, v] of Object.entries(labels)) if (v !== '') set[k] = v;
    await this.c.unary(this.raw, 'Update', { info: { digest, labels: set }, update_mask: { paths } }, `update labels of ${digest}`);
  }

  /** Reads a whole blob, refusing one larger than `maxBytes`. */
  async read(digest: string, maxBytes: number): Promise<Buffer> {
    const chunks: Buffer[] = [];
    let total = 0;
    const what = `read ${digest} from the content store`;
    for await (const msg of this.c.serverStream<{ offset: string | number; data: Buffer }>(this.raw, 'Read', { digest, offset: 0, size: 0 }, what)) {
      total += msg.data.length;
      if (total > maxBytes) throw new ContainerdError(grpc.status.OUT_OF_RANGE, what, `more than ${maxBytes} bytes`);
      chunks.push(msg.data);
    }
    return chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, total);
  }

  async abort(ref: string): Promise<void> {
    await this.c.unary(this.raw, 'Abort', { ref }, `abort content write ${ref}`);
  }

  /**
   * Writes a blob into the content store under ingest ref `ref` (content.OpenWriter + content.Copy): see
   * content-writer.ts. `open` is called only if the store does not have the blob yet.
   */
  write(ref: string, desc: Descriptor, open: ContentSource, opts: WriteContentOptions = {}): Promise<WriteContentResult> {
    return writeContent(() => this.c.duplex(this.raw, 'Write'), (r) => this.abort(r), ref, desc, open, opts);
  }
}

export class ImagesService {
  constructor(
    private readonly c: ContainerdClient,
    private readonly raw: grpc.Client,
  ) {}

  async get(name: string): Promise<ImageRecord | undefined> {
    try {
      const res = await this.c.unary<{ image: WireImage | null }>(this.raw, 'Get', { name }, `get image ${name}`);
      return res.image ? imageFromWire(res.image) : undefined;
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  async create(image: ImageRecord): Promise<ImageRecord> {
    const res = await this.c.unary<{ image: WireImage }>(
      this.raw,
      'Create',
      { image: { name: image.name, labels: image.labels, target: descriptorToWire(image.target) } },
      `create image ${image.name}`,
    );
    return imageFromWire(res.image);
  }

  /** Replaces the record (all fields when `fieldPaths` is empty, as containerd's image store does). */
  async update(image: ImageRecord, fieldPaths: string[] = []): Promise<ImageRecord> {
    const res = await this.c.unary<{ image: WireImage }>(
      this.raw,
      'Update',
      {
        image: { name: image.name, labels: image.labels, target: descriptorToWire(image.target) },
        update_mask: fieldPaths.length > 0 ? { paths: fieldPaths } : null,
      },
      `update image ${image.name}`,
    );
    return imageFromWire(res.image);
  }
}

export class DiffService {
  constructor(
    private readonly c: ContainerdClient,
    private readonly raw: grpc.Client,
  ) {}

  /**
   * Applies the layer blob `desc` (already in the content store) onto `mounts`; returns the descriptor of
   * what was applied: the uncompressed tar, whose digest is the layer's diffID.
   */
  async apply(desc: Descriptor, mounts: Mount[], signal?: AbortSignal): Promise<Descriptor> {
    const res = await this.c.unary<{ applied: WireDescriptor | null }>(
      this.raw,
      'Apply',
      { diff: descriptorToWire(desc), mounts, payloads: {} },
      `apply layer ${desc.digest}`,
      signal,
    );
    return descriptorFromWire(res.applied);
  }
}

export class SnapshotsService {
  constructor(
    private readonly c: ContainerdClient,
    private readonly raw: grpc.Client,
    readonly snapshotter: string,
  ) {}

  async prepare(key: string, parent: string, labels: Record<string, string>): Promise<Mount[]> {
    const res = await this.c.unary<{ mounts: Mount[] }>(
      this.raw,
      'Prepare',
      { snapshotter: this.snapshotter, key, parent, labels },
      `prepare snapshot "${key}" on ${this.snapshotter}`,
    );
    return res.mounts ?? [];
  }

  async commit(name: string, key: string, labels: Record<string, string>): Promise<void> {
    await this.c.unary(this.raw, 'Commit', { snapshotter: this.snapshotter, name, key, labels }, `commit snapshot ${name} on ${this.snapshotter}`);
  }

  async remove(key: string): Promise<void> {
    await this.c.unary(this.raw, 'Remove', { snapshotter: this.snapshotter, key }, `remove snapshot "${key}" on ${this.snapshotter}`);
  }

  /** Info of a snapshot, or undefined when it does not exist. Other errors (snapshotter not loaded) throw. */
  async stat(key: string): Promise<SnapshotInfo | undefined> {
    try {
      const res = await this.c.unary<{ info: WireSnapshotInfo | null }>(
        this.raw,
        'Stat',
        { snapshotter: this.snapshotter, key },
        `stat snapshot ${key} on ${this.snapshotter}`,
      );
      const i = res.info;
      return i ? { name: i.name, parent: i.parent, kind: i.kind, labels: i.labels ?? {} } : undefined;
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }
}
