/**
 * Reads the kernel's mount table, so Cleanup never recursively deletes through a live mount (a lazily
 * mounted layer, or a bind someone left behind): rm -r would walk into it.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';

const MOUNTINFO_FILE = '/proc/self/mountinfo';
/** Separates a mountinfo line's optional fields from the filesystem type, which the mount source follows. */
const MOUNTINFO_SEPARATOR = '-';
/** Field index of the mount point in a mountinfo line (proc(5)). */
const MOUNTINFO_MOUNTPOINT_FIELD = 4;

/** mountinfo escapes space, tab, newline and backslash as \ooo octal (exported for tests). */
export function unescapeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** The mount points in the text of a mountinfo file, unescaped (exported for tests). */
export function mountPointsOf(mountinfo: string): string[] {
  const out: string[] = [];
  for (const line of mountinfo.split('\n')) {
    // The escapes keep spaces out of the fields, so a space always separates two.
    const fields = line.split(' ');
    const mp = fields[MOUNTINFO_MOUNTPOINT_FIELD];
    if (mp !== undefined) out.push(unescapeMountPath(mp));
  }
  return out;
}

/** All current mount points. */
export async function listMountPoints(): Promise<string[]> {
  return mountPointsOf(await fsp.readFile(MOUNTINFO_FILE, 'utf8'));
}

/** Mount points equal to `dir` or below it. */
export async function mountsUnder(dir: string): Promise<string[]> {
  const abs = path.resolve(dir);
  const prefix = abs.endsWith('/') ? abs : `${abs}/`;
  return (await listMountPoints()).filter((mp) => mp === abs || mp.startsWith(prefix));
}

/** A mount in the table: where it is and its source. */
export interface MountInfo {
  mountpoint: string;
  source: string;
}

/** Each mount in the text of a mountinfo file: its mount point and its source (exported for tests). */
export function mountsOf(mountinfo: string): MountInfo[] {
  const out: { mountpoint: string; source: string }[] = [];
  for (const line of mountinfo.split('\n')) {
    const fields = line.split(' ');
    const mp = fields[MOUNTINFO_MOUNTPOINT_FIELD];
    // The optional fields vary in number: the source is the second field after the separator.
    const separator = fields.indexOf(MOUNTINFO_SEPARATOR, MOUNTINFO_MOUNTPOINT_FIELD + 1);
    const source = separator < 0 ? undefined : fields[separator + 2];
    if (mp !== undefined && source !== undefined) out.push({ mountpoint: unescapeMountPath(mp), source: unescapeMountPath(source) });
  }
  return out;
}

/** All current mounts with their sources. */
export async function listMounts(): Promise<MountInfo[]> {
  return mountsOf(await fsp.readFile(MOUNTINFO_FILE, 'utf8'));
}
