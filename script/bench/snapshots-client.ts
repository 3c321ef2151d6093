/**
 * containerd's Snapshots service straight on a snapshotter's socket (no containerd in between), for benchmarks
 * that time the daemon itself: List (the whole stream), View and Remove. Names are the daemon's own: a remote
 * snapshot is committed under its chain ID, others as containerd's metadata snapshotter names them,
 * `<namespace>/<n>/<key>`.
 */
import * as grpc from '@grpc/grpc-js';
import { loadSnapshotsService } from '../../src/service/snapshots-service';

export interface SnapshotMount {
  type: string;
  source: string;
  options: string[];
}

interface ListedInfo {
  name: string;
  parent: string;
  kind: string;
}

type Callback<T> = (err: grpc.ServiceError | null, res?: T) => void;

interface RawClient extends grpc.Client {
  List(req: unknown, opts: grpc.CallOptions): grpc.ClientReadableStream<{ info: ListedInfo[] }>;
  View(req: unknown, opts: grpc.CallOptions, cb: Callback<{ mounts: SnapshotMount[] }>): void;
  Remove(req: unknown, opts: grpc.CallOptions, cb: Callback<unknown>): void;
}

export interface SnapshotsClient {
  /** Every snapshot, the whole stream read; `deadlineMs` bounds the call (a daemon still starting may hold it). */
  list(deadlineMs?: number): Promise<ListedInfo[]>;
  view(key: string, parent: string): Promise<SnapshotMount[]>;
  remove(key: string): Promise<void>;
  close(): void;
}

const DEFAULT_DEADLINE_MS = 120_000;

/** A client of the Snapshots service on the unix socket `address`. */
export function snapshotsClient(address: string): SnapshotsClient {
  const Ctor = grpc.makeGenericClientConstructor(loadSnapshotsService(), 'Snapshots');
  const client = new Ctor(`unix://${address}`, grpc.credentials.createInsecure()) as unknown as RawClient;
  const deadline = (ms = DEFAULT_DEADLINE_MS): grpc.CallOptions => ({ deadline: Date.now() + ms });
  const unary = <T>(call: (cb: Callback<T>) => void, what: string): Promise<T> =>
    new Promise((resolve, reject) => call((err, res) => (err ? reject(new Error(`Snapshots.${what}: ${err.message}`)) : resolve(res as T))));
  return {
    list: (deadlineMs) =>
      new Promise((resolve, reject) => {
        const out: ListedInfo[] = [];
        const stream = client.List({ snapshotter: '', filters: [] }, deadline(deadlineMs));
        stream.on('data', (batch: { info: ListedInfo[] }) => out.push(...batch.info));
        stream.on('error', (err) => reject(new Error(`Snapshots.List: ${err.message}`)));
        stream.on('end', () => resolve(out));
      }),
    view: async (key, parent) => (await unary<{ mounts: SnapshotMount[] }>((cb) => client.View({ key, parent, labels: {} }, deadline(), cb), 'View')).mounts,
    remove: async (key) => {
      await unary((cb) => client.Remove({ key }, deadline(), cb), 'Remove');
    },
    close: () => client.close(),
  };
}
