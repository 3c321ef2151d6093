/**
 * containerd.services.snapshots.v1.Snapshots over gRPC: the proxy-snapshotter API containerd calls on our
 * unix socket. Each RPC validates its request, calls the Snapshotter and maps errors to status codes
 * (grpc-status.ts). Protos are our copies under proto/, loaded at runtime with proto-loader; List and Stat
 * answers are encoded with protobufjs's types of the same files (infoAnswerSerializers).
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { loadProtoRoot, loadProtoSet } from '../grpc/protos';
import { errorCode, errorMessage, InvalidArgumentError, UnavailableError } from '../errors';
import { log as rootLog, type Logger } from '../log';
import type { Snapshotter } from '../snapshot/snapshotter';
import type { Mount, SnapshotInfo, SnapshotKind, TimestampNs } from '../snapshot/snapshot-info';
import { toServiceError } from './grpc-status';

/** Infos per ListSnapshotsResponse, as containerd's snapshot service batches them. */
export const LIST_BATCH_SIZE = 100;
/** containerd's limit on one label: key plus value bytes (labels.Validate). */
export const MAX_LABEL_BYTES = 4096;
/** How long close() lets in-flight calls finish before cutting them off. */
const SHUTDOWN_GRACE_MS = 5000;
/**
 * How long a call that comes before the daemon serves (restored snapshots mounted again) waits for it. The
 * daemon listens first, so containerd's first dial after a restart connects at once; its calls wait here.
 */
const STARTUP_WAIT_MS = 60_000;
/** How long a connect probe of an existing socket may take before we call it live. */
const LIVE_SOCKET_PROBE_MS = 1000;
const SOCKET_MODE = 0o600;
const SOCKET_DIR_MODE = 0o700;
const SERVICE_NAME = 'containerd.services.snapshots.v1.Snapshots';
const NS_PER_S = 1_000_000_000n;

// --- wire shapes, as proto-loader hands them over (keepCase, longs: String, enums: String, defaults) ---

type WireKind = 'UNKNOWN' | 'VIEW' | 'ACTIVE' | 'COMMITTED';

interface WireTimestamp {
  /** A number on the way out: protobufjs encodes it without parsing a decimal string (seconds stay far below 2^53). */
  seconds: string | number;
  nanos: number;
}

interface WireInfo {
  name: string;
  parent: string;
  kind: WireKind;
  created_at: WireTimestamp | null;
  updated_at: WireTimestamp | null;
  labels: Record<string, string>;
}

interface WireMount {
  type: string;
  source: string;
  target: string;
  options: string[];
}

interface CreateRequest {
  snapshotter: string;
  key: string;
  parent: string;
  labels: Record<string, string>;
}

interface KeyRequest {
  snapshotter: string;
  key: string;
}

interface CommitRequest {
  snapshotter: string;
  name: string;
  key: string;
  labels: Record<string, string>;
}

interface UpdateRequest {
  snapshotter: string;
  info: WireInfo | null;
  update_mask: { paths: string[] } | null;
}

interface ListRequest {
  snapshotter: string;
  filters: string[];
}

type Empty = Record<string, never>;

const KIND_TO_WIRE: Record<SnapshotKind, WireKind> = { view: 'VIEW', active: 'ACTIVE', committed: 'COMMITTED' };

/** Seconds and nanos of a Timestamp (nanos in [0, 1e9), as protobuf requires). */
function toWireTimestamp(ns: TimestampNs): { seconds: number; nanos: number } {
  let seconds = ns / NS_PER_S;
  let nanos = ns % NS_PER_S;
  if (nanos < 0n) {
    seconds -= 1n;
    nanos += NS_PER_S;
  }
  return { seconds: Number(seconds), nanos: Number(nanos) };
}

function toWireInfo(info: SnapshotInfo): WireInfo {
  return {
    name: info.name,
    parent: info.parent,
    kind: KIND_TO_WIRE[info.kind],
    created_at: toWireTimestamp(info.createdAt),
    updated_at: toWireTimestamp(info.updatedAt),
    labels: info.labels,
  };
}

function toWireMounts(mounts: Mount[]): WireMount[] {
  return mounts.map((m) => ({ type: m.type, source: m.source, target: '', options: m.options }));
}

function requireField(what: string, value: string | undefined): string {
  if (value === undefined || value === '') throw new InvalidArgumentError(`${what} must not be empty`);
  return value;
}

function validateLabels(labels: Record<string, string> | undefined): Record<string, string> {
  const out = labels ?? {};
  for (const [k, v] of Object.entries(out)) {
    if (Buffer.byteLength(k) + Buffer.byteLength(v) > MAX_LABEL_BYTES) {
      throw new InvalidArgumentError(`label key and value greater than maximum size (${MAX_LABEL_BYTES} bytes), key: ${k.slice(0, 64)}`);
    }
  }
  return out;
}

/** Loads the Snapshots service definition from our protos (google/protobuf types come with protobufjs). */
export function loadSnapshotsService(): grpc.ServiceDefinition {
  const definition = loadProtoSet('snapshots', {
    longs: String, // int64 sizes and timestamp seconds without precision loss
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const service = definition[SERVICE_NAME];
  // A service definition is a map of method definitions; a message type would carry `format`.
  if (service === undefined || 'format' in service) throw new Error(`${SERVICE_NAME} not found in our protos`);
  return service;
}

// --- List and Stat answers: protobufjs's Type.encode over objects shaped like the messages ---

/**
 * A Timestamp as Type.encode takes it. A field at its proto3 default is left undefined, so it is not written (as
 * Go leaves it out); seconds as a number, which protobufjs writes as int64 without parsing a decimal string.
 */
interface TimestampMessage {
  seconds: number | undefined;
  nanos: number | undefined;
}

/** An Info as Type.encode takes it: the enum as its number, an empty parent left out. */
interface InfoMessage {
  name: string;
  parent: string | undefined;
  kind: number;
  created_at: TimestampMessage;
  updated_at: TimestampMessage;
  labels: Record<string, string>;
}

function toTimestampMessage(ns: TimestampNs): TimestampMessage {
  const { seconds, nanos } = toWireTimestamp(ns);
  return { seconds: seconds === 0 ? undefined : seconds, nanos: nanos === 0 ? undefined : nanos };
}

/** Type.encode's writer gives a Buffer on Node; anything else is viewed as one, not copied. */
function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/**
 * The serializers of the List and Stat answers, from SnapshotInfo. proto-loader's serializer would run
 * Type.fromObject first, building a second message object per info (a Timestamp and a Long per time) from the
 * loader-shaped one; here the info's message object is the one encoded.
 */
function infoAnswerSerializers(): { list: (infos: SnapshotInfo[]) => Buffer; stat: (info: SnapshotInfo) => Buffer } {
  const root = loadProtoRoot('snapshots');
  const listType = root.lookupType('containerd.services.snapshots.v1.ListSnapshotsResponse');
  const statType = root.lookupType('containerd.services.snapshots.v1.StatSnapshotResponse');
  const kinds = root.lookupEnum('containerd.services.snapshots.v1.Kind').values;
  const kindNumber = (kind: SnapshotKind): number => {
    const n = kinds[KIND_TO_WIRE[kind]];
    if (n === undefined) throw new Error(`snapshot kind ${kind} is not in our protos`);
    return n;
  };
  const kindNumbers: Record<SnapshotKind, number> = {
    view: kindNumber('view'),
    active: kindNumber('active'),
    committed: kindNumber('committed'),
  };
  const toInfoMessage = (info: SnapshotInfo): InfoMessage => ({
    name: info.name,
    parent: info.parent === '' ? undefined : info.parent,
    kind: kindNumbers[info.kind],
    created_at: toTimestampMessage(info.createdAt),
    updated_at: toTimestampMessage(info.updatedAt),
    labels: info.labels,
  });
  return {
    list: (infos) => asBuffer(listType.encode({ info: infos.map(toInfoMessage) }).finish()),
    stat: (info) => asBuffer(statType.encode({ info: toInfoMessage(info) }).finish()),
  };
}

/**
 * The service definition the server answers with: List and Stat answers are encoded from SnapshotInfo
 * (infoAnswerSerializers), so their handlers hand over infos, not wire objects. Clients use loadSnapshotsService().
 */
export function snapshotsServerDefinition(): grpc.ServiceDefinition {
  const definition = loadSnapshotsService();
  const list = definition.List;
  const stat = definition.Stat;
  if (list === undefined || stat === undefined) throw new Error(`${SERVICE_NAME} lacks List or Stat in our protos`);
  const serializers = infoAnswerSerializers();
  return {
    ...definition,
    List: { ...list, responseSerialize: serializers.list },
    Stat: { ...stat, responseSerialize: serializers.stat },
  };
}

/** Runs `fn` and answers the unary call with its result or its error's status. */
function unary<Req, Res>(
  logger: Logger,
  method: string,
  fn: (req: Req) => Promise<Res>,
): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    fn(call.request).then(
      (res) => callback(null, res),
      (err: unknown) => {
        const serviceError = toServiceError(err);
        // AlreadyExists on a remote Prepare and NotFound on Stat are routine answers, not failures.
        const level = errorCode(err)?.startsWith('ERR_SNAP_') ? 'debug' : 'warn';
        logger[level]({ method, code: serviceError.code, err: serviceError.details }, 'snapshot call failed');
        callback(serviceError, null);
      },
    );
  };
}

/** A Snapshotter, or one still starting: calls wait for it (STARTUP_WAIT_MS at most). */
export type SnapshotterSource = Snapshotter | Promise<Snapshotter>;

/** The snapshotter a call runs on; UnavailableError when it is not there within STARTUP_WAIT_MS or failed to start. */
function whenStarted(source: Promise<Snapshotter>): Promise<Snapshotter> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new UnavailableError(`stargaze is still starting after ${STARTUP_WAIT_MS / 1000} s`)), STARTUP_WAIT_MS);
  });
  const started = source.catch((err: unknown) => {
    throw new UnavailableError(`stargaze did not start: ${errorMessage(err)}`, { cause: err });
  });
  return Promise.race([started, timeout]).finally(() => clearTimeout(timer));
}

/** The handlers' way to their snapshotter: at once when started, else through whenStarted. */
function startedSnapshotter(source: SnapshotterSource): () => Snapshotter | Promise<Snapshotter> {
  if (!(source instanceof Promise)) return () => source;
  // Once started, no call pays for the race and its timer again.
  let started: Snapshotter | undefined;
  source.then(
    (s) => (started = s),
    () => undefined, // each waiting call answers with the failure
  );
  return () => started ?? whenStarted(source);
}

/**
 * Builds the ten handlers over a Snapshotter (or one still starting: see SnapshotterSource), for the definition
 * snapshotsServerDefinition() returns.
 */
export function createSnapshotsHandlers(source: SnapshotterSource, logger: Logger = rootLog.child({ module: 'service' })): grpc.UntypedServiceImplementation {
  const empty: Empty = {};
  const snapshotter = startedSnapshotter(source);
  return {
    Prepare: unary<CreateRequest, { mounts: WireMount[] }>(logger, 'Prepare', async (req) => {
      const mounts = await (await snapshotter()).prepare(requireField('key', req.key), req.parent ?? '', validateLabels(req.labels));
      return { mounts: toWireMounts(mounts) };
    }),
    View: unary<CreateRequest, { mounts: WireMount[] }>(logger, 'View', async (req) => {
      const mounts = await (await snapshotter()).view(requireField('key', req.key), req.parent ?? '', validateLabels(req.labels));
      return { mounts: toWireMounts(mounts) };
    }),
    Mounts: unary<KeyRequest, { mounts: WireMount[] }>(logger, 'Mounts', async (req) => {
      return { mounts: toWireMounts(await (await snapshotter()).mounts(requireField('key', req.key))) };
    }),
    Commit: unary<CommitRequest, Empty>(logger, 'Commit', async (req) => {
      await (await snapshotter()).commit(requireField('name', req.name), requireField('key', req.key), validateLabels(req.labels));
      return empty;
    }),
    Remove: unary<KeyRequest, Empty>(logger, 'Remove', async (req) => {
      await (await snapshotter()).remove(requireField('key', req.key));
      return empty;
    }),
    Stat: unary<KeyRequest, SnapshotInfo>(logger, 'Stat', async (req) => {
      return (await snapshotter()).stat(requireField('key', req.key));
    }),
    Update: unary<UpdateRequest, { info: WireInfo }>(logger, 'Update', async (req) => {
      if (req.info === null || req.info === undefined) throw new InvalidArgumentError('info must be set');
      const name = requireField('info.name', req.info.name);
      const updated = await (await snapshotter()).update(
        { name, labels: validateLabels(req.info.labels) },
        req.update_mask?.paths ?? [],
      );
      return { info: toWireInfo(updated) };
    }),
    List: ((call: grpc.ServerWritableStream<ListRequest, SnapshotInfo[]>) => {
      void streamList(snapshotter, call, logger);
    }) as grpc.handleServerStreamingCall<ListRequest, SnapshotInfo[]>,
    Usage: unary<KeyRequest, { size: string; inodes: string }>(logger, 'Usage', async (req) => {
      const usage = await (await snapshotter()).usage(requireField('key', req.key));
      return { size: String(usage.size), inodes: String(usage.inodes) };
    }),
    Cleanup: unary<{ snapshotter: string }, Empty>(logger, 'Cleanup', async () => {
      await (await snapshotter()).cleanup();
      return empty;
    }),
  };
}

/**
 * Streams the walk in batches of LIST_BATCH_SIZE, honouring backpressure and client cancellation: the walk reads
 * its next page only once the last batch was taken, so a slow client holds up the walk, not memory.
 */
async function streamList(
  snapshotter: () => Snapshotter | Promise<Snapshotter>,
  call: grpc.ServerWritableStream<ListRequest, SnapshotInfo[]>,
  logger: Logger,
): Promise<void> {
  const send = async (batch: SnapshotInfo[]): Promise<void> => {
    if (!call.write(batch)) {
      await new Promise<void>((resolve) => {
        const done = (): void => {
          call.off('drain', done);
          call.off('cancelled', done);
          resolve();
        };
        call.on('drain', done);
        call.on('cancelled', done);
      });
    }
  };
  try {
    let batch: SnapshotInfo[] = [];
    for await (const page of (await snapshotter()).walkPages(call.request.filters ?? [])) {
      if (call.cancelled) return;
      // A page of exactly a batch goes out as it is.
      if (batch.length === 0 && page.length === LIST_BATCH_SIZE) {
        await send(page);
        continue;
      }
      for (const info of page) {
        batch.push(info);
        if (batch.length >= LIST_BATCH_SIZE) {
          await send(batch);
          batch = [];
        }
      }
    }
    if (batch.length > 0 && !call.cancelled) await send(batch);
    call.end();
  } catch (err) {
    const serviceError = toServiceError(err);
    logger.debug({ method: 'List', code: serviceError.code, err: serviceError.details }, 'snapshot call failed');
    call.emit('error', serviceError);
  }
}

export interface SnapshotServer {
  /** The socket path served. */
  readonly address: string;
  /** Stops accepting calls, lets in-flight ones finish (bounded), removes the socket. */
  close(): Promise<void>;
}

/** True when something accepts connections on the unix socket `address`. */
function socketIsLive(address: string): Promise<boolean> {
  return new Promise((resolve) => {
    const conn = net.connect(address);
    const done = (live: boolean): void => {
      conn.destroy();
      resolve(live);
    };
    conn.setTimeout(LIVE_SOCKET_PROBE_MS, () => done(true)); // accepted but silent: treat as live
    conn.once('connect', () => done(true));
    conn.once('error', () => done(false));
  });
}

/**
 * Removes a leftover socket from an earlier run. Refuses to touch anything that is not a socket, and a
 * socket another server still answers on.
 */
export async function removeStaleSocket(address: string, options: { probe: boolean }): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fsp.lstat(address);
  } catch (err) {
    if (errorCode(err) === 'ENOENT') return;
    throw err;
  }
  if (!st.isSocket()) throw new Error(`${address} exists and is not a socket; refusing to replace it`);
  if (options.probe && (await socketIsLive(address))) {
    throw new Error(`${address} is in use by a running server`);
  }
  await fsp.unlink(address);
}

/**
 * Serves the Snapshots service for `snapshotter` on the unix socket `address` (mode 0600). Given a promise,
 * it listens at once and calls wait for the snapshotter (see STARTUP_WAIT_MS).
 */
export async function startSnapshotServer(options: {
  snapshotter: SnapshotterSource;
  address: string;
  log?: Logger;
  /** More services on the same socket (the CRI image-service proxy when its listen_path is this socket). */
  extraServices?: { definition: grpc.ServiceDefinition; handlers: grpc.UntypedServiceImplementation }[];
}): Promise<SnapshotServer> {
  const logger = options.log ?? rootLog.child({ module: 'service' });
  // A start that fails while the socket is being set up is answered to each call, not an unhandled rejection.
  if (options.snapshotter instanceof Promise) options.snapshotter.catch(() => undefined);
  const address = path.resolve(options.address);
  await fsp.mkdir(path.dirname(address), { recursive: true, mode: SOCKET_DIR_MODE });
  await removeStaleSocket(address, { probe: true });

  // Channelz keeps per-call counters for a debug service we do not serve: off, a little less work per call.
  const server = new grpc.Server({ 'grpc.enable_channelz': 0 });
  server.addService(snapshotsServerDefinition(), createSnapshotsHandlers(options.snapshotter, logger));
  for (const extra of options.extraServices ?? []) server.addService(extra.definition, extra.handlers);
  await new Promise<void>((resolve, reject) => {
    server.bindAsync(`unix://${address}`, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve()));
  });
  // Anyone who can reach the socket can mount and delete snapshots: root only.
  await fsp.chmod(address, SOCKET_MODE);

  let closing: Promise<void> | undefined;
  return {
    address,
    close(): Promise<void> {
      closing ??= (async () => {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            server.forceShutdown();
            resolve();
          }, SHUTDOWN_GRACE_MS);
          server.tryShutdown(() => {
            clearTimeout(timer);
            resolve();
          });
        });
        await removeStaleSocket(address, { probe: false }).catch((err: unknown) => {
          logger.warn({ address, err: String(err) }, 'failed to remove socket');
        });
      })();
      return closing;
    },
  };
}
