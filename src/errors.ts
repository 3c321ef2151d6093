/**
 * Error classes with stable codes. Every failure the daemon can report is one of these:
 * service/ maps the code to a gRPC status, fuse/ maps it to an errno.
 */

export type ErrorCode =
  | 'ERR_SNAP_NOT_FOUND'
  | 'ERR_SNAP_ALREADY_EXISTS'
  | 'ERR_SNAP_FAILED_PRECONDITION'
  | 'ERR_SNAP_INVALID_ARGUMENT'
  | 'ERR_SNAP_UNAVAILABLE'
  | 'ERR_ESTARGZ_FORMAT'
  | 'ERR_ESTARGZ_VERIFY'
  | 'ERR_REGISTRY'
  | 'ERR_REGISTRY_AUTH'
  | 'ERR_CONFIG'
  | 'ERR_USAGE'
  | 'ERR_LOCAL_COPY'
  | 'ERR_PROTOCOL'
  | 'ERR_PULL'
  | 'ERR_PROFILE'
  | 'ERR_INTERNAL';

export class StargazeError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

export class NotFoundError extends StargazeError {
  constructor(message: string) {
    super('ERR_SNAP_NOT_FOUND', message);
  }
}

export class AlreadyExistsError extends StargazeError {
  constructor(message: string) {
    super('ERR_SNAP_ALREADY_EXISTS', message);
  }
}

export class FailedPreconditionError extends StargazeError {
  constructor(message: string) {
    super('ERR_SNAP_FAILED_PRECONDITION', message);
  }
}

export class InvalidArgumentError extends StargazeError {
  constructor(message: string) {
    super('ERR_SNAP_INVALID_ARGUMENT', message);
  }
}

export class UnavailableError extends StargazeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_SNAP_UNAVAILABLE', message, options);
  }
}

/** The layer blob or its TOC is malformed (bad footer, bad JSON, hostile entry names...). */
export class EstargzFormatError extends StargazeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_ESTARGZ_FORMAT', message, options);
  }
}

/** A digest did not match: TOC digest at mount, chunk digest at read. */
export class VerificationError extends StargazeError {
  constructor(message: string) {
    super('ERR_ESTARGZ_VERIFY', message);
  }
}

export class RegistryError extends StargazeError {
  /** HTTP status, when the registry answered at all. */
  readonly status: number | undefined;
  constructor(message: string, status?: number, options?: { cause?: unknown }) {
    super('ERR_REGISTRY', message, options);
    this.status = status;
  }
}

export class RegistryAuthError extends StargazeError {
  constructor(message: string) {
    super('ERR_REGISTRY_AUTH', message);
  }
}

export class ConfigError extends StargazeError {
  constructor(message: string) {
    super('ERR_CONFIG', message);
  }
}

export class UsageError extends StargazeError {
  constructor(message: string) {
    super('ERR_USAGE', message);
  }
}

/** A fully fetched layer could not be copied to local disk; it stays served through FUSE. */
export class LocalCopyError extends StargazeError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('ERR_LOCAL_COPY', message, options);
  }
}

/** A peer broke one of our own wire protocols (the daemon <-> FUSE server lines): bad JSON, too long, wrong shape. */
export class ProtocolError extends StargazeError {
  constructor(message: string) {
    super('ERR_PROTOCOL', message);
  }
}

/**
 * A prefetch profile we cannot use: malformed (not JSON, not our format or version), oversized (past its
 * bounds), or foreign (stored under a key that is not its own). Profiles are hints: the layer then mounts as
 * if it had none.
 */
export class ProfileError extends StargazeError {
  constructor(
    message: string,
    readonly reason: 'malformed' | 'oversized' | 'foreign' = 'malformed',
  ) {
    super('ERR_PROFILE', message);
  }
}

/** Reads a message from any thrown value without trusting its shape. */
export function errorMessage(err: unknown): string {
  if (err instanceof Error) {
    const cause = err.cause;
    return cause !== undefined && cause !== null ? `${err.message}: ${errorMessage(cause)}` : err.message;
  }
  return String(err);
}

export function errorCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err) {
    const code = err.code;
    return typeof code === 'string' ? code : undefined;
  }
  return undefined;
}
