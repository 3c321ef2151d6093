/**
 * st_mode and dev_t as Linux encodes them. The file type always comes from the TOC `type`; from the
 * TOC `mode` (a tar header mode, which may carry type bits too) only perm + setuid/setgid/sticky count.
 */

export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFCHR = 0o020000;
export const S_IFBLK = 0o060000;
export const S_IFIFO = 0o010000;
/** rwx for all three classes plus setuid, setgid and sticky. */
const PERM_AND_SPECIAL_BITS = 0o7777;

const TYPE_BITS: Readonly<Record<string, number>> = {
  dir: S_IFDIR,
  reg: S_IFREG,
  symlink: S_IFLNK,
  char: S_IFCHR,
  block: S_IFBLK,
  fifo: S_IFIFO,
  whiteout: S_IFCHR,
};

/** Full st_mode for a node of `type` whose TOC mode is `tocMode`. */
export function modeOf(type: string, tocMode: number): number {
  return (TYPE_BITS[type] ?? S_IFREG) | (tocMode & PERM_AND_SPECIAL_BITS);
}

/**
 * glibc's makedev: minor low 8 bits, major 12 bits, then the high bits of each further up. Done with
 * arithmetic rather than shifts because the result can exceed 32 bits.
 */
export function makedev(major: number, minor: number): number {
  const low = (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & 0xfff00) << 12);
  const high = Math.floor(major / 0x1000) * 2 ** 44 + Math.floor(minor / 0x100000) * 2 ** 32;
  // `low` can have bit 31 set, which JS bitwise ops make negative.
  return (low >>> 0) + high;
}
