/**
 * The errno a FUSE reply carries for a failure: the numbers themselves (Linux's, negated, as libfuse wants
 * them) and the mapping from our error codes. Whatever is not a known "not found" must be EIO: the reader of
 * a file gets an I/O error, never a misleading ENOENT for a file it can see.
 */
import assert from 'node:assert/strict';
import { constants } from 'node:os';
import { test } from 'node:test';
import {
  AlreadyExistsError,
  ConfigError,
  EstargzFormatError,
  FailedPreconditionError,
  InvalidArgumentError,
  LocalCopyError,
  NotFoundError,
  ProtocolError,
  RegistryAuthError,
  RegistryError,
  StargazeError,
  UnavailableError,
  UsageError,
  VerificationError,
} from '../../../src/errors';
import { ERRNO, fuseErrno } from '../../../src/fuse/errno';

test('each ERRNO is the negated Linux errno of its name', () => {
  for (const [name, value] of Object.entries(ERRNO)) {
    const linux = (constants.errno as Record<string, number | undefined>)[name];
    assert.ok(linux !== undefined, `${name} is an errno name`);
    assert.equal(value, -linux, name);
  }
});

test('not found is ENOENT, from our class or from any error carrying its code (an answer of the FUSE server)', () => {
  assert.equal(fuseErrno(new NotFoundError('no such chunk')), ERRNO.ENOENT);
  assert.equal(fuseErrno(new StargazeError('ERR_SNAP_NOT_FOUND', 'relayed')), ERRNO.ENOENT);
  assert.equal(fuseErrno({ code: 'ERR_SNAP_NOT_FOUND' }), ERRNO.ENOENT);
});

test('every other failure of ours is EIO', () => {
  const errors: Error[] = [
    new AlreadyExistsError('x'),
    new FailedPreconditionError('x'),
    new InvalidArgumentError('x'),
    new UnavailableError('registry down'),
    new EstargzFormatError('bad footer'),
    new VerificationError('chunk digest mismatch'),
    new RegistryError('503', 503),
    new RegistryAuthError('denied'),
    new ConfigError('x'),
    new UsageError('x'),
    new LocalCopyError('x'),
    new ProtocolError('x'),
    new StargazeError('ERR_INTERNAL', 'x'),
  ];
  for (const err of errors) assert.equal(fuseErrno(err), ERRNO.EIO, err.name);
});

test("what is not ours is EIO too, even a system error's own ENOENT (a cache file gone is not the file gone)", () => {
  const enoent = Object.assign(new Error("ENOENT: no such file or directory, open '/cache/chunk'"), { code: 'ENOENT', errno: -2 });
  const values: unknown[] = [
    enoent,
    Object.assign(new Error('timed out'), { code: 'ETIMEDOUT' }),
    new DOMException('The operation was aborted due to timeout', 'TimeoutError'),
    new DOMException('This operation was aborted', 'AbortError'),
    new TypeError('x is undefined'),
    new Error('plain'),
    'a string',
    42,
    undefined,
    null,
    { code: 7 },
  ];
  for (const v of values) assert.equal(fuseErrno(v), ERRNO.EIO, String(v));
});

test('what fuseErrno returns is always one of ERRNO, negative', () => {
  const known = new Set<number>(Object.values(ERRNO));
  for (const v of [new NotFoundError('x'), new Error('x'), undefined]) {
    const errno = fuseErrno(v);
    assert.ok(known.has(errno) && errno < 0, String(errno));
  }
});
