/**
 * The mount table as Cleanup reads it: /proc/self/mountinfo lines, whose mount point field escapes space, tab,
 * newline and backslash as \ooo octal (proc(5)). A mount point read wrong is one Cleanup's rm -r walks into.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { mountPointsOf, mountsOf, mountsUnder, unescapeMountPath } from '../../../src/fs/mount-table';

const run = promisify(execFile);
const isRoot = process.getuid?.() === 0;

test('octal escapes become the characters they stand for; nothing else changes', () => {
  const cases: [string, string][] = [
    ['/plain/path', '/plain/path'],
    ['/a\\040b', '/a b'],
    ['/tab\\011here', '/tab\there'],
    ['/new\\012line', '/new\nline'],
    ['/back\\134slash', '/back\\slash'],
    // An escaped backslash followed by digits: the digits are the name's, not another escape.
    ['/x\\134123', '/x\\123'],
    ['/\\040\\040lead', '/  lead'],
    // Not an escape: fewer than three octal digits, or digits 8 and 9.
    ['/a\\04', '/a\\04'],
    ['/a\\089', '/a\\089'],
    ['/caf\u00e9', '/caf\u00e9'],
  ];
  for (const [field, expected] of cases) assert.equal(unescapeMountPath(field), expected, field);
});

test('the mount point is the fifth field of each line, whatever the optional fields', () => {
  const mountinfo = [
    '22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw',
    '23 22 0:22 / /with\\040space rw,nosuid shared:2 master:3 - tmpfs tmpfs rw',
    '24 22 0:23 /sub /var/lib/a\\134b\\011c rw - overlay overlay rw,lowerdir=/l',
    '25 22 0:24 / /no/optional/fields ro - fuse.stargaze stargaze ro',
    '',
  ].join('\n');
  assert.deepEqual(mountPointsOf(mountinfo), ['/', '/with space', '/var/lib/a\\b\tc', '/no/optional/fields']);
  assert.deepEqual(mountPointsOf(''), []);
});

test('each mount comes with its source, the second field after the separator, whatever the optional fields', () => {
  const mountinfo = [
    '22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw',
    '23 22 0:22 / /with\\040space rw,nosuid shared:2 master:3 - tmpfs my\\040tmpfs rw',
    '25 22 0:24 / /layer ro - fuse.stargaze stargaze:1234.7 ro',
    '',
  ].join('\n');
  assert.deepEqual(mountsOf(mountinfo), [
    { mountpoint: '/', source: '/dev/vda' },
    { mountpoint: '/with space', source: 'my tmpfs' },
    { mountpoint: '/layer', source: 'stargaze:1234.7' },
  ]);
});

test('mounts under a directory whose name needs escaping are found as the kernel lists them', { skip: !isRoot && 'needs root to mount' }, async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-mounts-'));
  const odd = path.join(dir, 'a b\tc\nd\\e\u00e9');
  const plain = path.join(dir, 'plain');
  await mkdir(odd);
  await mkdir(plain);
  await mkdir(path.join(dir, 'plainer')); // a sibling whose name starts like one, not under it
  await run('mount', ['-t', 'tmpfs', 'stargaze-test', odd]);
  t.after(async () => {
    await run('umount', [odd]).catch(() => undefined);
    await run('umount', [plain]).catch(() => undefined);
    await run('umount', [path.join(dir, 'plainer')]).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
  });
  await run('mount', ['-t', 'tmpfs', 'stargaze-test', plain]);
  await run('mount', ['-t', 'tmpfs', 'stargaze-test', path.join(dir, 'plainer')]);
  assert.deepEqual((await mountsUnder(dir)).sort(), [odd, plain, path.join(dir, 'plainer')].sort());
  assert.deepEqual(await mountsUnder(odd), [odd]);
  assert.deepEqual(await mountsUnder(`${plain}/`), [plain]);
  assert.deepEqual(await mountsUnder(plain), [plain], 'a sibling sharing its prefix is not under it');
});
