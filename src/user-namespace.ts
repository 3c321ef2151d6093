/**
 * Whether this process runs inside a user namespace (rootless containerd, a rootless KinD node). There
 * overlayfs is mounted with `userxattr` and reads `user.overlay.*` instead of `trusted.overlay.*`, which an
 * unprivileged namespace cannot set: the snapshotter adds the option (containerd's NeedsUserXAttr), and the
 * layer filesystem marks opaque directories with the xattr that overlayfs will read.
 */
import { readFile } from 'node:fs/promises';

import { OPAQUE_XATTR, USER_OPAQUE_XATTR } from './overlay-xattr';

/** The kernel's full identity uid map: not inside a user namespace. */
const INIT_USERNS_UID_MAP = /^\s*0\s+0\s+4294967295\s*$/;

export async function inUserNamespace(): Promise<boolean> {
  try {
    return !INIT_USERNS_UID_MAP.test(await readFile('/proc/self/uid_map', 'utf8'));
  } catch {
    return false;
  }
}

/** The xattr that marks opaque directories for the overlayfs the snapshotter mounts here. */
export async function opaqueXattrHere(): Promise<string> {
  return (await inUserNamespace()) ? USER_OPAQUE_XATTR : OPAQUE_XATTR;
}
