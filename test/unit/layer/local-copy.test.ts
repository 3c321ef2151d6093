/**
 * The local copy of a fully fetched layer: what overlayfs needs from a lower dir survives the copy
 * (whiteout devices, opaque xattrs, hardlinks, owners, setuid, symlinks, times), a name `local` only ever
 * means a complete copy, and a failed or aborted copy leaves nothing behind.
 *
 * The source here is a plain directory standing in for the FUSE mount (tar reads either the same way);
 * the e2e tests copy real mounts. Root is needed for device nodes, owners and trusted.* xattrs.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, it } from 'node:test';
import { LocalCopyError } from '../../../src/errors';
import { copyLayerToLocal, hasLocalCopy, localCopyPath } from '../../../src/layer/local-copy';

const run = promisify(execFile);
const notRoot = process.getuid?.() !== 0;

let dir: string;
let mountpoint: string;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'stargaze-local-copy-'));
  mountpoint = path.join(dir, 'fs');
  fs.mkdirSync(mountpoint);
});

afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

async function xattrs(p: string): Promise<string> {
  const { stdout } = await run('getfattr', ['--absolute-names', '-d', '-m', '-', '-e', 'hex', p]);
  return stdout.split('\n').filter((l) => l !== '' && !l.startsWith('#')).sort().join('\n');
}

describe('local copy of a fetched layer', { skip: notRoot && 'needs root (device nodes, owners, trusted.* xattrs)' }, () => {
  it('keeps everything overlayfs reads from a lower dir', async () => {
    const at = (p: string) => path.join(mountpoint, p);
    fs.mkdirSync(at('opaque'));
    fs.writeFileSync(at('opaque/kept'), 'kept\n');
    await run('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', at('opaque')]);
    await run('setfattr', ['-n', 'user.note', '-v', 'hello', at('opaque/kept')]);
    await run('mknod', [at('deleted'), 'c', '0', '0']);
    fs.writeFileSync(at('tool'), '#!/bin/sh\n');
    fs.chownSync(at('tool'), 1234, 5678);
    fs.chmodSync(at('tool'), 0o4755); // after chown, which clears setuid
    fs.linkSync(at('tool'), at('tool-link'));
    fs.symlinkSync('/etc/passwd', at('abs-link'));
    fs.mkdirSync(at('sticky'), { mode: 0o755 });
    fs.chmodSync(at('sticky'), 0o1777);
    fs.utimesSync(at('opaque/kept'), 642_902_400, 642_902_400);
    fs.writeFileSync(at('future'), '');
    fs.utimesSync(at('future'), 4_102_444_800, 4_102_444_800); // 2100: tar warns, and that is no failure
    fs.chmodSync(mountpoint, 0o751);

    await copyLayerToLocal(mountpoint);
    const local = localCopyPath(mountpoint);
    assert.equal(local, path.join(dir, 'local'));
    assert.ok(await hasLocalCopy(mountpoint));
    assert.ok(!fs.existsSync(`${local}.tmp`));
    const got = (p: string) => fs.lstatSync(path.join(local, p));
    assert.equal(got('').mode & 0o7777, 0o751, "the layer root's own mode");
    assert.ok(got('deleted').isCharacterDevice());
    assert.equal(got('deleted').rdev, 0, 'a 0/0 whiteout');
    assert.equal(await xattrs(path.join(local, 'opaque')), await xattrs(at('opaque')));
    assert.match(await xattrs(path.join(local, 'opaque')), /trusted\.overlay\.opaque=0x79/);
    assert.match(await xattrs(path.join(local, 'opaque/kept')), /user\.note=/);
    assert.equal(got('tool').mode & 0o7777, 0o4755);
    assert.deepEqual([got('tool').uid, got('tool').gid], [1234, 5678]);
    assert.equal(got('tool').ino, got('tool-link').ino, 'hardlinks share an inode');
    assert.equal(fs.readlinkSync(path.join(local, 'abs-link')), '/etc/passwd');
    assert.equal(got('sticky').mode & 0o7777, 0o1777);
    assert.equal(got('opaque/kept').mtimeMs, 642_902_400_000);
    assert.equal(got('future').mtimeMs, 4_102_444_800_000);
    assert.equal(fs.readFileSync(path.join(local, 'opaque/kept'), 'utf8'), 'kept\n');
  });

  it('replaces what a crashed copy left, and a failed copy leaves no `local`', async () => {
    const local = localCopyPath(mountpoint);
    fs.mkdirSync(`${local}.tmp`);
    fs.writeFileSync(`${local}.tmp/stale`, 'from a crash');
    fs.writeFileSync(path.join(mountpoint, 'file'), 'x');
    await copyLayerToLocal(mountpoint);
    assert.deepEqual(fs.readdirSync(local), ['file']);

    const gone = path.join(dir, 'gone', 'fs');
    await assert.rejects(copyLayerToLocal(gone), (err: unknown) => err instanceof LocalCopyError);
    assert.ok(!fs.existsSync(path.join(dir, 'gone')), 'nothing made for a mount that is not there');
  });

  it('a copy whose root is not what the layer holds is not named a copy', async () => {
    fs.writeFileSync(path.join(mountpoint, 'a'), 'a');
    // What a mount that vanished under tar leaves: fewer names than the layer's.
    await assert.rejects(copyLayerToLocal(mountpoint, { expectRootNames: ['a', 'b'] }), (err: unknown) => err instanceof LocalCopyError && /missing: b/.test(err.message));
    assert.ok(!(await hasLocalCopy(mountpoint)));
    assert.ok(!fs.existsSync(`${localCopyPath(mountpoint)}.tmp`));
    await copyLayerToLocal(mountpoint, { expectRootNames: ['a'] });
    assert.ok(await hasLocalCopy(mountpoint));
  });

  it('an xattr tar cannot set fails the copy, though tar exits 0', async () => {
    // The copy lands on a ramfs (no xattrs at all); the layer is a bind mount of a directory that has them.
    const ram = path.join(dir, 'ram');
    const layer = path.join(ram, 'fs');
    fs.mkdirSync(ram);
    await run('mount', ['-t', 'ramfs', 'ramfs', ram]);
    try {
      fs.mkdirSync(layer);
      await run('mount', ['--bind', mountpoint, layer]);
      try {
        fs.mkdirSync(path.join(mountpoint, 'opaque'));
        await run('setfattr', ['-n', 'trusted.overlay.opaque', '-v', 'y', path.join(mountpoint, 'opaque')]);
        await assert.rejects(copyLayerToLocal(layer, { expectRootNames: ['opaque'] }), (err: unknown) => err instanceof LocalCopyError && /warned/.test(err.message));
        assert.ok(!(await hasLocalCopy(layer)), 'a copy without its opaque marker is not a copy');
      } finally {
        await run('umount', [layer]);
      }
    } finally {
      await run('umount', [ram]);
    }
  });

  it('an abort kills the copy and removes its temp directory', async () => {
    // A sparse file big enough that tar is still reading it when the abort comes.
    const fd = fs.openSync(path.join(mountpoint, 'big'), 'w');
    fs.ftruncateSync(fd, 2 * 1024 * 1024 * 1024);
    fs.closeSync(fd);
    const abort = new AbortController();
    const copy = copyLayerToLocal(mountpoint, { signal: abort.signal });
    setTimeout(() => abort.abort(), 200);
    await assert.rejects(copy, (err: unknown) => err instanceof LocalCopyError && /aborted/.test(err.message));
    assert.ok(!(await hasLocalCopy(mountpoint)));
    assert.ok(!fs.existsSync(`${localCopyPath(mountpoint)}.tmp`));
  });
});
