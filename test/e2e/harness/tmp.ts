/**
 * Tmp roots and mounts under them. Every harness resource lives below a tmp root made here; tearing
 * a root down lazily unmounts whatever is still mounted below it (FUSE, overlay, bind) before it
 * removes the tree, and refuses to remove a tree that still has mounts in it.
 */
import { spawnSync } from 'node:child_process';
import { rmSync, readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { addExitGuard, type CleanupScope } from './cleanup';
import { run } from './exec';

/** Set to 1 to keep tmp roots (logs, configs) after the tests; mounts and processes still go. */
export const KEEP_TMP_ENV = 'STARGAZE_E2E_KEEP';

export interface MountInfo {
  source: string;
  mountpoint: string;
  fstype: string;
  options: string;
}

/** Undoes the octal escapes /proc/mounts uses for space, tab, newline and backslash. */
function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

function parseMounts(text: string): MountInfo[] {
  const mounts: MountInfo[] = [];
  for (const line of text.split('\n')) {
    const [source, mountpoint, fstype, options] = line.split(' ');
    if (!source || !mountpoint || !fstype) continue;
    mounts.push({
      source: unescapeMountField(source),
      mountpoint: unescapeMountField(mountpoint),
      fstype,
      options: options ?? '',
    });
  }
  return mounts;
}

function isUnder(p: string, root: string): boolean {
  const r = root.endsWith('/') ? root : root + '/';
  return p === root || p.startsWith(r);
}

/** Mounts whose mountpoint is `root` or below it, deepest first (the order to unmount them in). */
export async function mountsUnder(root: string): Promise<MountInfo[]> {
  const text = await readFile('/proc/self/mounts', 'utf8');
  return sortDeepestFirst(parseMounts(text).filter((m) => isUnder(m.mountpoint, root)));
}

function mountsUnderSync(root: string): MountInfo[] {
  return sortDeepestFirst(parseMounts(readFileSync('/proc/self/mounts', 'utf8')).filter((m) => isUnder(m.mountpoint, root)));
}

function sortDeepestFirst(mounts: MountInfo[]): MountInfo[] {
  // later mounts can stack on earlier ones: reverse the table order, then sort by depth
  return mounts.reverse().sort((a, b) => b.mountpoint.length - a.mountpoint.length);
}

/**
 * Lazily unmounts everything mounted at or below `root` (`umount -l`, falling back to
 * `fusermount3 -uz` for FUSE). Returns the mounts that are still there afterwards.
 */
export async function unmountUnder(root: string): Promise<MountInfo[]> {
  for (let pass = 0; pass < 3; pass++) {
    const mounts = await mountsUnder(root);
    if (mounts.length === 0) return [];
    for (const m of mounts) {
      const r = await run('umount', ['-l', m.mountpoint], { allowFailure: true, timeoutMs: 30_000 });
      if (r.code !== 0 && m.fstype.startsWith('fuse')) {
        await run('fusermount3', ['-uz', m.mountpoint], { allowFailure: true, timeoutMs: 30_000 });
      }
    }
  }
  return mountsUnder(root);
}

/** Synchronous `unmountUnder` for exit guards. */
export function unmountUnderSync(root: string): MountInfo[] {
  for (let pass = 0; pass < 3; pass++) {
    const mounts = mountsUnderSync(root);
    if (mounts.length === 0) return [];
    for (const m of mounts) {
      const r = spawnSync('umount', ['-l', m.mountpoint], { stdio: 'ignore', timeout: 30_000 });
      if (r.status !== 0 && m.fstype.startsWith('fuse')) {
        spawnSync('fusermount3', ['-uz', m.mountpoint], { stdio: 'ignore', timeout: 30_000 });
      }
    }
  }
  return mountsUnderSync(root);
}

/**
 * Unmounts everything below `dir`, then removes it, unless mounts survived (removing through a
 * live mount would delete the mounted data) or STARGAZE_E2E_KEEP=1.
 */
export async function removeTree(dir: string): Promise<void> {
  const left = await unmountUnder(dir);
  if (left.length > 0) {
    throw new Error(`not removing ${dir}: still mounted: ${left.map((m) => m.mountpoint).join(', ')}`);
  }
  if (process.env[KEEP_TMP_ENV] === '1') {
    process.stderr.write(`harness: keeping ${dir} (${KEEP_TMP_ENV}=1)\n`);
    return;
  }
  await rm(dir, { recursive: true, force: true, maxRetries: 3 });
}

export interface TmpRoot {
  readonly dir: string;
  /** `removeTree(dir)`, once; also drops the exit guard. */
  remove(): Promise<void>;
}

/**
 * Creates `/tmp/stargaze-e2e-<label>-XXXXXX` with a synchronous exit guard that unmounts and
 * removes it should the process exit before `remove()` ran.
 */
export async function createTmpRoot(label: string): Promise<TmpRoot> {
  const dir = await mkdtemp(path.join(tmpdir(), `stargaze-e2e-${label.replace(/[^\w.-]/g, '_')}-`));
  const unguard = addExitGuard(() => {
    if (unmountUnderSync(dir).length === 0 && process.env[KEEP_TMP_ENV] !== '1') {
      rmSync(dir, { recursive: true, force: true });
    }
  });
  let removed: Promise<void> | undefined;
  return {
    dir,
    remove: () =>
      (removed ??= removeTree(dir).then(() => {
        unguard();
      })),
  };
}

/** `createTmpRoot` whose removal is registered on `scope`; returns the dir. */
export async function makeTmpRoot(label: string, scope: CleanupScope): Promise<string> {
  const root = await createTmpRoot(label);
  scope.after(() => root.remove());
  return root.dir;
}
