/**
 * Error -> gRPC status. containerd converts statuses back into its errdefs by code (errdefs.FromGRPC), so
 * the code is the contract: a remote Prepare's AlreadyExists in particular must arrive as ALREADY_EXISTS.
 */
import { status as Status, type ServiceError, Metadata } from '@grpc/grpc-js';
import { errorCode, errorMessage } from '../errors';

const CODE_TO_STATUS: Record<string, Status> = {
  ERR_SNAP_NOT_FOUND: Status.NOT_FOUND,
  ERR_SNAP_ALREADY_EXISTS: Status.ALREADY_EXISTS,
  ERR_SNAP_FAILED_PRECONDITION: Status.FAILED_PRECONDITION,
  ERR_SNAP_INVALID_ARGUMENT: Status.INVALID_ARGUMENT,
  ERR_SNAP_UNAVAILABLE: Status.UNAVAILABLE,
  ERR_INTERNAL: Status.INTERNAL,
};

/** The gRPC status code for a thrown value: by our ERR_* code, else UNKNOWN (as containerd's ToGRPC). */
export function grpcStatusOf(err: unknown): Status {
  const code = errorCode(err);
  return (code !== undefined ? CODE_TO_STATUS[code] : undefined) ?? Status.UNKNOWN;
}

/** A ServiceError for grpc-js callbacks and stream.destroy(): status code plus the error's message chain. */
export function toServiceError(err: unknown): Partial<ServiceError> & { code: Status; details: string } {
  const code = grpcStatusOf(err);
  const details = errorMessage(err);
  const out = new Error(details) as Error & { code: Status; details: string; metadata: Metadata };
  out.code = code;
  out.details = details;
  out.metadata = new Metadata();
  return out;
}
