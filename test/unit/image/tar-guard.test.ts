import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Writable } from 'node:stream';
import { describe, test } from 'node:test';
import { MAX_LONG_HEADER_BYTES, TarEntryError, TarGuard } from '../../../src/image/tar-guard';
import { makeTar, paxBody, rawHeader, rawTar, sha256 } from './helpers';

async function guard(tar: Buffer, pieceBytes = 100): Promise<TarGuard> {
  const g = new TarGuard();
  const pieces: Buffer[] = [];
  for (let i = 0; i < tar.length; i += pieceBytes) pieces.push(tar.subarray(i, i + pieceBytes));
  await pipeline(Readable.from(pieces), g, new Writable({ write: (_c, _e, cb) => cb() }));
  return g;
}

async function refused(tar: Buffer, pattern: RegExp): Promise<void> {
  await assert.rejects(guard(tar), (err: unknown) => {
    assert.ok(err instanceof TarEntryError, `TarEntryError, got ${String(err)}`);
    assert.match(err.message, pattern);
    return true;
  });
}

describe('TarGuard', () => {
  test('passes an ordinary tar through unchanged and hashes it', async () => {
    const tar = await makeTar([
      { name: 'dir', type: 'directory' },
      { name: 'dir/file', content: 'x'.repeat(1000) },
      { name: 'dir/link', type: 'link', linkname: 'dir/file' },
      { name: 'dir/sym', type: 'symlink', linkname: '/etc/../passwd' },
      { name: 'a/'.repeat(80) + 'long-name', content: 'long' },
    ]);
    for (const piece of [1, 7, 512, 100_000]) {
      const g = await guard(tar, piece);
      assert.equal(g.digest(), sha256(tar));
      assert.equal(g.entries, 5);
    }
  });

  test("refuses a '..' component, naming the entry", async () => {
    await refused(await makeTar([{ name: 'ok', content: 'a' }, { name: 'x/../../etc/passwd', content: 'root' }]), /"x\/\.\.\/\.\.\/etc\/passwd".*'\.\.'/);
  });

  test('refuses an absolute name', async () => {
    await refused(rawTar([{ header: rawHeader('/etc/shadow', { size: 1 }), payload: Buffer.from('x') }]), /"\/etc\/shadow".*absolute/);
  });

  test("refuses '..' hidden in a PAX path", async () => {
    const pax = paxBody({ path: '../escape' });
    const tar = rawTar([
      { header: rawHeader('PaxHeaders/x', { typeflag: 'x', size: pax.length }), payload: pax },
      { header: rawHeader('harmless', { size: 1 }), payload: Buffer.from('x') },
    ]);
    await refused(tar, /"\.\.\/escape"/);
  });

  test('refuses a name that is not UTF-8', async () => {
    const name = Buffer.concat([Buffer.from('bad-'), Buffer.from([0xff, 0xfe]), Buffer.from('.txt')]);
    await refused(rawTar([{ header: rawHeader(name, { size: 0 }) }]), /not valid UTF-8/);
  });

  test('refuses a huge PAX header before reading it', async () => {
    const size = MAX_LONG_HEADER_BYTES + 1;
    const tar = Buffer.concat([rawHeader('PaxHeaders/x', { typeflag: 'x', size }), Buffer.alloc(4096)]);
    await refused(tar, /PAX header of 1048577 bytes.*limit/);
  });

  test('refuses a hardlink to a missing target', async () => {
    await refused(rawTar([{ header: rawHeader('hl', { typeflag: '1', linkname: 'nowhere' }) }]), /"hl": hardlink to "nowhere"/);
  });

  test('refuses a tar that ends inside an entry', async () => {
    const tar = await makeTar([{ name: 'big', content: Buffer.alloc(5000, 1) }]);
    await refused(tar.subarray(0, 2048), /"big".*truncated/);
  });

  test('refuses a corrupt header, saying after which entry', async () => {
    const tar = await makeTar([{ name: 'first', content: 'a' }, { name: 'second', content: 'b' }]);
    tar[1024 + 10] = 0x41; // inside the second header's name: checksum no longer matches
    await refused(tar, /corrupt tar header after entry "first"/);
  });
});
