/**
 * Stargaze error codes → negative errno for FUSE replies. Anything unexpected is EIO: the reader of a file
 * gets an I/O error, never a hang and never wrong bytes.
 */
import { errorCode } from '../errors';

export const ERRNO = {
  EPERM: -1,
  ENOENT: -2,
  EIO: -5,
  EACCES: -13,
  ENOTDIR: -20,
  EISDIR: -21,
  EINVAL: -22,
  EROFS: -30,
  ENODATA: -61,
  ETIMEDOUT: -110,
} as const;

export function fuseErrno(err: unknown): number {
  switch (errorCode(err)) {
    case 'ERR_SNAP_NOT_FOUND':
      return ERRNO.ENOENT;
    default:
      return ERRNO.EIO;
  }
}
