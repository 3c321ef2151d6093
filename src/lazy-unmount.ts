/**
 * A lazy unmount by child process, apart from fuse/layer-fuse.ts and outside fuse/, so the daemon can detach its
 * FUSE server's mounts (fs/fuse-server-client.ts) without loading fuse-native or the layer stack.
 */
import { spawn } from 'node:child_process';

/**
 * fuse-native unmounts with `fusermount -uz`, which only Debian's `fuse` package ships (it conflicts with
 * fuse3). We run as root, so a lazy umount(8) does the same job; fusermount3 is the fallback.
 */
export function lazyUnmountCallback(mnt: string, cb: (err: Error | null) => void): void {
  runQuiet('umount', ['-l', mnt], (err) => {
    if (!err) return cb(null);
    runQuiet('fusermount3', ['-uz', mnt], cb);
  });
}

/** Detaches whatever is mounted at `mnt` (also a dead FUSE mount whose server is gone). */
export function lazyUnmount(mnt: string): Promise<void> {
  return new Promise((resolve, reject) => lazyUnmountCallback(mnt, (err) => (err ? reject(err) : resolve())));
}

function runQuiet(cmd: string, args: string[], cb: (err: Error | null) => void): void {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.on('error', (err) => cb(err));
  child.on('close', (code) => cb(code === 0 ? null : new Error(`${cmd} ${args.join(' ')}: ${stderr.trim() || `exit ${code}`}`)));
}
