/**
 * The xattrs overlayfs reads to treat a directory as opaque. A leaf module: metadata/ marks opaque directories
 * with one of them, and user-namespace.ts picks which one the overlayfs mounted here reads.
 */

/** The xattr overlayfs reads to treat a directory as opaque. */
export const OPAQUE_XATTR = 'trusted.overlay.opaque';
/** The same, for overlayfs mounted with `userxattr` (inside a user namespace). */
export const USER_OPAQUE_XATTR = 'user.overlay.opaque';
