/** The multipart/byteranges stream parser, the range planner and the retry policy: tables of cases. */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { RegistryError } from '../../../src/errors';
import { boundaryOf, ByteRangesParser, MAX_PART_HEADER_BYTES } from '../../../src/remote/multipart-byteranges';
import { planRanges, RangeFiller, resultsOf } from '../../../src/remote/range-plan';
import { backoffMs, isRetryableStatus, parseRetryAfter, retryPolicy } from '../../../src/remote/retry';

const BLOB = randomBytes(10_000);

function multipart(parts: [number, number][], opts: { boundary?: string; eol?: string; preamble?: string; close?: boolean; type?: boolean } = {}): Buffer {
  const b = opts.boundary ?? 'THIS_STRING_SEPARATES';
  const eol = opts.eol ?? '\r\n';
  const out: Buffer[] = [Buffer.from(opts.preamble ?? '')];
  for (const [s, e] of parts) {
    const headers = (opts.type ?? true ? `Content-Type: application/octet-stream${eol}` : '') + `Content-Range: bytes ${s}-${e}/${BLOB.length}${eol}`;
    out.push(Buffer.from(`${eol}--${b}${eol}${headers}${eol}`), BLOB.subarray(s, e + 1));
  }
  if (opts.close ?? true) out.push(Buffer.from(`${eol}--${b}--${eol}`));
  return Buffer.concat(out);
}

/** Feeds `body` split every `step` bytes; returns what arrived as a map offset -> bytes joined. */
function parse(body: Buffer, boundary: string | undefined, step: number): { got: Buffer; filled: number; parts: number } {
  const got = Buffer.alloc(BLOB.length);
  let filled = 0;
  const p = new ByteRangesParser(boundary, (off, data) => {
    data.copy(got, off);
    filled += data.length;
  }, BLOB.length, 'test');
  for (let i = 0; i < body.length; i += step) p.write(body.subarray(i, i + step));
  p.end();
  return { got, filled, parts: p.parts };
}

describe('multipart/byteranges parser', () => {
  const parts: [number, number][] = [
    [0, 99],
    [500, 500],
    [1000, 4999],
    [9990, 9999],
  ];
  const want = parts.reduce((n, [s, e]) => n + e - s + 1, 0);
  const cases: [string, Buffer, string | undefined][] = [
    ['CRLF, boundary known', multipart(parts), 'THIS_STRING_SEPARATES'],
    ['boundary unknown (no Content-Type)', multipart(parts), undefined],
    ['LF only', multipart(parts, { eol: '\n' }), 'THIS_STRING_SEPARATES'],
    ['preamble and no closing delimiter', multipart(parts, { preamble: 'ignore me\r\n', close: false }), 'THIS_STRING_SEPARATES'],
    ['parts without Content-Type', multipart(parts, { type: false }), 'THIS_STRING_SEPARATES'],
    ['boundary that looks like data', multipart(parts, { boundary: '3d6b6a416f9b5' }), '3d6b6a416f9b5'],
  ];
  for (const [name, body, boundary] of cases) {
    it(name, () => {
      for (const step of [1, 2, 7, 64, 1000, body.length]) {
        const r = parse(body, boundary, step);
        assert.equal(r.parts, parts.length, `step ${step}`);
        assert.equal(r.filled, want, `step ${step}`);
        for (const [s, e] of parts) assert.ok(r.got.subarray(s, e + 1).equals(BLOB.subarray(s, e + 1)), `step ${step} part ${s}-${e}`);
      }
    });
  }

  it('body cut inside a part is an error', () => {
    const body = multipart(parts);
    assert.throws(() => parse(body.subarray(0, 300), 'THIS_STRING_SEPARATES', 50), /ended inside part/);
  });

  it('rejects a part outside the blob, a part without Content-Range, endless headers', () => {
    const bad = Buffer.from(`--b\r\nContent-Range: bytes 0-20000/10000\r\n\r\n`);
    assert.throws(() => parse(bad, 'b', 10), RegistryError);
    const noRange = Buffer.from(`--b\r\nContent-Type: x\r\n\r\nabc\r\n--b--\r\n`);
    assert.throws(() => parse(noRange, 'b', 10), /without a Content-Range/);
    const endless = Buffer.concat([Buffer.from('--b\r\nX: '), Buffer.alloc(MAX_PART_HEADER_BYTES + 10, 0x61)]);
    assert.throws(() => parse(endless, 'b', 1000), /more than/);
  });

  it('boundaryOf reads quoted and bare parameters', () => {
    assert.equal(boundaryOf('multipart/byteranges; boundary=abc'), 'abc');
    assert.equal(boundaryOf('multipart/byteranges; charset=x; boundary="a b"'), 'a b');
    assert.equal(boundaryOf('application/octet-stream'), undefined);
    assert.equal(boundaryOf(undefined), undefined);
  });
});

describe('range planning', () => {
  it('merges overlapping and adjacent ranges and hands back views in the caller order', () => {
    const ranges = [
      { offset: 100, length: 10 },
      { offset: 0, length: 10 },
      { offset: 10, length: 5 },
      { offset: 105, length: 20 },
      { offset: 500, length: 0 },
      { offset: 300, length: 1 },
    ];
    const plan = planRanges(ranges);
    assert.deepEqual(
      plan.merged.map((m) => [m.offset, m.length]),
      [
        [0, 15],
        [100, 25],
        [300, 1],
      ],
    );
    const filler = new RangeFiller(plan.merged);
    filler.add(0, BLOB.subarray(0, 200)); // covers the first two
    assert.deepEqual(filler.missing(), [{ index: 2, offset: 300, length: 1 }]);
    filler.fill(2, 300, BLOB.subarray(300, 301));
    assert.deepEqual(filler.missing(), []);
    const out = resultsOf(plan, ranges);
    ranges.forEach((r, i) => assert.ok(out[i]?.equals(BLOB.subarray(r.offset, r.offset + r.length)), `range ${i}`));
  });
});

describe('retry policy', () => {
  it('retries 429 and 5xx except 501', () => {
    for (const s of [429, 500, 502, 503, 504, 599]) assert.ok(isRetryableStatus(s), String(s));
    for (const s of [200, 206, 400, 401, 403, 404, 416, 501]) assert.ok(!isRetryableStatus(s), String(s));
  });
  it('backs off exponentially with jitter in [d, 2d), capped, honouring Retry-After', () => {
    const p = retryPolicy({ maxRetries: 5, minWaitMs: 30, maxWaitMs: 1000 });
    assert.equal(backoffMs(p, 0, undefined, () => 0), 30);
    assert.equal(backoffMs(p, 3, undefined, () => 0), 240);
    assert.equal(backoffMs(p, 3, undefined, () => 0.999), 479);
    assert.equal(backoffMs(p, 10, undefined, () => 0), 1000);
    assert.equal(backoffMs(p, 0, 2000, () => 0), 1000, 'Retry-After is capped');
    assert.equal(backoffMs(p, 0, 500, () => 0), 500);
  });
  it('parses Retry-After seconds and dates', () => {
    assert.equal(parseRetryAfter('3'), 3000);
    assert.equal(parseRetryAfter(new Date(10_000 + 5_000).toUTCString(), 10_000), 5000);
    assert.equal(parseRetryAfter('yesterday'), undefined);
    assert.equal(parseRetryAfter(undefined), undefined);
  });
  it('config zero means the reference default', () => {
    assert.deepEqual(retryPolicy({ maxRetries: 0, minWaitMs: 0, maxWaitMs: 0 }), { maxRetries: 0, minWaitMs: 30, maxWaitMs: 300_000 });
    assert.deepEqual(retryPolicy(undefined), { maxRetries: 5, minWaitMs: 30, maxWaitMs: 300_000 });
  });
});
