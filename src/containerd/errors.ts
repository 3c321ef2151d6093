/**
 * containerd's answers as errors. containerd turns its errdefs into gRPC status codes (errdefs.ToGRPC) and its
 * clients turn them back by code (errdefs.FromGRPC); ContainerdError keeps that code so callers can ask
 * `isNotFound(err)` the way Go code asks `errdefs.IsNotFound(err)`.
 *
 * The user-facing failures of `stargaze rpull` that concern containerd are classes of their own, each with one
 * clear message: containerd not reachable, snapshotter not configured, snapshotter configured but not answering.
 */
import { status as GrpcStatus } from '@grpc/grpc-js';
import {
  ConfigError,
  StargazeError,
  UnavailableError,
  errorMessage,
  type ErrorCode,
} from '../errors';

/** Our code for each gRPC status containerd sends (errdefs.FromGRPC); anything else is internal. */
const STATUS_TO_CODE: Partial<Record<GrpcStatus, ErrorCode>> = {
  [GrpcStatus.NOT_FOUND]: 'ERR_SNAP_NOT_FOUND',
  [GrpcStatus.ALREADY_EXISTS]: 'ERR_SNAP_ALREADY_EXISTS',
  [GrpcStatus.FAILED_PRECONDITION]: 'ERR_SNAP_FAILED_PRECONDITION',
  [GrpcStatus.INVALID_ARGUMENT]: 'ERR_SNAP_INVALID_ARGUMENT',
  [GrpcStatus.UNAVAILABLE]: 'ERR_SNAP_UNAVAILABLE',
};

/** A call to containerd failed; `grpcCode` is the status containerd (or the transport) answered with. */
export class ContainerdError extends StargazeError {
  readonly grpcCode: GrpcStatus;
  /** containerd's own message (the status details), without our context prefix. */
  readonly details: string;
  constructor(grpcCode: GrpcStatus, what: string, details: string) {
    super(STATUS_TO_CODE[grpcCode] ?? 'ERR_INTERNAL', `${what}: ${details}`);
    this.grpcCode = grpcCode;
    this.details = details;
  }
}

/** containerd cannot be reached at all: no socket, connection refused, permission denied. */
export class ContainerdUnreachableError extends UnavailableError {
  constructor(address: string, why: string) {
    super(`cannot connect to containerd at ${address}: ${why} (is containerd running? see --address)`);
  }
}

/** containerd has no snapshotter of that name (no `[proxy_plugins.<name>]` in its config). */
export class SnapshotterNotConfiguredError extends ConfigError {
  constructor(snapshotter: string, address: string, details: string) {
    super(
      `snapshotter "${snapshotter}" is not configured in containerd at ${address} (${details}); ` +
        `add [proxy_plugins.${snapshotter}] type = "snapshot" with the stargaze daemon's socket to containerd's config, ` +
        `or pick another one with --snapshotter`,
    );
  }
}

/** The snapshotter is configured in containerd but its proxy socket does not answer. */
export class SnapshotterUnavailableError extends UnavailableError {
  constructor(snapshotter: string, details: string) {
    super(`snapshotter "${snapshotter}" is configured in containerd but does not answer (is \`stargaze daemon\` running?): ${details}`);
  }
}

function grpcCodeOf(err: unknown): GrpcStatus | undefined {
  if (err instanceof ContainerdError) return err.grpcCode;
  return undefined;
}

export function isNotFound(err: unknown): boolean {
  return grpcCodeOf(err) === GrpcStatus.NOT_FOUND;
}

export function isAlreadyExists(err: unknown): boolean {
  return grpcCodeOf(err) === GrpcStatus.ALREADY_EXISTS;
}

export function isUnavailable(err: unknown): boolean {
  return grpcCodeOf(err) === GrpcStatus.UNAVAILABLE;
}

/** A gRPC ServiceError (or anything thrown by grpc-js) as a ContainerdError about `what`. */
export function fromGrpc(err: unknown, what: string): ContainerdError {
  if (err instanceof ContainerdError) return err;
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'number') {
    const e = err as { code: number; details?: unknown };
    const details = typeof e.details === 'string' && e.details !== '' ? e.details : errorMessage(err);
    return new ContainerdError(e.code, what, details);
  }
  return new ContainerdError(GrpcStatus.UNKNOWN, what, errorMessage(err));
}
