import assert from 'node:assert/strict';
import { test } from 'node:test';
import { gunzipSync, gzipSync } from 'node:zlib';

import { EstargzFormatError } from '../../../src/errors';
import { FOOTER_SIZE_BYTES, LEGACY_FOOTER_SIZE_BYTES, encodeFooter, parseFooter } from '../../../src/estargz/footer';

/** The legacy (CRFS) footer: XLEN = 22 and the extra bytes are the payload itself. */
function legacyFooter(tocOffset: number): Buffer {
  return Buffer.concat([
    Buffer.from([0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 22, 0]),
    Buffer.from(tocOffset.toString(16).padStart(16, '0') + 'STARGZ', 'latin1'),
    Buffer.from([0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]),
  ]);
}

test('encodeFooter writes the 51 bytes the spec lays out', () => {
  const f = encodeFooter(0x1234abcd);
  assert.equal(f.length, FOOTER_SIZE_BYTES);
  const expected = Buffer.concat([
    Buffer.from('1f8b08040000000000ff', 'hex'), // gzip header: FLG=FEXTRA, MTIME=0, XFL=0, OS=255
    Buffer.from('1a00', 'hex'), // XLEN = 26
    Buffer.from('SG', 'latin1'),
    Buffer.from('1600', 'hex'), // LEN = 22
    Buffer.from('000000001234abcdSTARGZ', 'latin1'),
    Buffer.from('010000ffff', 'hex'), // empty final stored block
    Buffer.alloc(8), // CRC32 = 0, ISIZE = 0
  ]);
  assert.deepEqual(f, expected);
  assert.equal(gunzipSync(f).length, 0, 'the footer is a valid, empty gzip member');
});

test('parseFooter round-trips eStargz footers', () => {
  for (const off of [0, 1, 0xfffff, 2 ** 40 + 7, Number.MAX_SAFE_INTEGER]) {
    assert.deepEqual(parseFooter(encodeFooter(off)), { tocOffset: off, footerSize: FOOTER_SIZE_BYTES });
  }
});

test('parseFooter finds an eStargz footer at the end of a longer tail', () => {
  const tail = Buffer.concat([Buffer.from('garbage'), encodeFooter(99)]);
  assert.deepEqual(parseFooter(tail.subarray(tail.length - FOOTER_SIZE_BYTES)), { tocOffset: 99, footerSize: 51 });
});

test('parseFooter falls back to the 47-byte legacy footer', () => {
  const legacy = legacyFooter(0xbeef);
  assert.equal(legacy.length, LEGACY_FOOTER_SIZE_BYTES);
  assert.equal(gunzipSync(legacy).length, 0);
  // The reader fetches the last 51 bytes: 4 bytes of the previous member come first.
  const tail = Buffer.concat([Buffer.from([1, 2, 3, 4]), legacy]);
  assert.deepEqual(parseFooter(tail), { tocOffset: 0xbeef, footerSize: LEGACY_FOOTER_SIZE_BYTES });
  // A 47-byte blob tail (shorter than 51) still parses as legacy.
  assert.deepEqual(parseFooter(legacy), { tocOffset: 0xbeef, footerSize: LEGACY_FOOTER_SIZE_BYTES });
});

test('a plain gzip layer is rejected with a clear message', () => {
  const plain = gzipSync(Buffer.alloc(100_000, 'a'));
  assert.throws(
    () => parseFooter(plain.subarray(plain.length - FOOTER_SIZE_BYTES)),
    (err: unknown) => err instanceof EstargzFormatError && /not an eStargz layer/.test(err.message),
  );
});

test('malformed footers are rejected', () => {
  const cases: Array<[string, (f: Buffer) => void]> = [
    ['bad magic string', (f) => f.write('STARGY', 32, 'latin1')],
    ['bad subfield id', (f) => f.write('XG', 12, 'latin1')],
    ['bad subfield length', (f) => f.writeUInt16LE(21, 14)],
    ['bad XLEN', (f) => f.writeUInt16LE(25, 10)],
    ['non-hex offset', (f) => f.write('zz', 16, 'latin1')],
    ['offset beyond 2^53', (f) => f.write('ffffffffffffffff', 16, 'latin1')],
    ['non-empty member', (f) => f.writeUInt32LE(5, 47)],
    ['FNAME flag', (f) => (f[3] = 0x0c)],
    ['not gzip', (f) => (f[0] = 0)],
  ];
  for (const [what, mutate] of cases) {
    const f = encodeFooter(1234);
    mutate(f);
    assert.throws(() => parseFooter(f), EstargzFormatError, what);
  }
});

test('too short a tail is rejected', () => {
  assert.throws(() => parseFooter(Buffer.alloc(10)), EstargzFormatError);
});

test('encodeFooter refuses bad offsets', () => {
  assert.throws(() => encodeFooter(-1), RangeError);
  assert.throws(() => encodeFooter(1.5), RangeError);
});
