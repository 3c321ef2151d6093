import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { InvalidArgumentError } from '../../../src/errors';
import { parseReference, registryHostFor, validateDigest } from '../../../src/remote/reference';

const D = 'sha256:' + 'a'.repeat(64);

describe('parseReference', () => {
  const good: [string, { domain: string; repository: string; tag: string | undefined; digest: string | undefined; str: string }][] = [
    ['busybox', { domain: 'docker.io', repository: 'library/busybox', tag: 'latest', digest: undefined, str: 'docker.io/library/busybox:latest' }],
    ['busybox:1.36', { domain: 'docker.io', repository: 'library/busybox', tag: '1.36', digest: undefined, str: 'docker.io/library/busybox:1.36' }],
    ['user/app', { domain: 'docker.io', repository: 'user/app', tag: 'latest', digest: undefined, str: 'docker.io/user/app:latest' }],
    ['docker.io/ubuntu', { domain: 'docker.io', repository: 'library/ubuntu', tag: 'latest', digest: undefined, str: 'docker.io/library/ubuntu:latest' }],
    ['index.docker.io/foo/bar:v1', { domain: 'docker.io', repository: 'foo/bar', tag: 'v1', digest: undefined, str: 'docker.io/foo/bar:v1' }],
    ['127.0.0.1:5000/a/b:c', { domain: '127.0.0.1:5000', repository: 'a/b', tag: 'c', digest: undefined, str: '127.0.0.1:5000/a/b:c' }],
    ['localhost/x', { domain: 'localhost', repository: 'x', tag: 'latest', digest: undefined, str: 'localhost/x:latest' }],
    ['localhost:5000/x@' + D, { domain: 'localhost:5000', repository: 'x', tag: undefined, digest: D, str: `localhost:5000/x@${D}` }],
    ['ghcr.io/o/r:t@' + D, { domain: 'ghcr.io', repository: 'o/r', tag: 't', digest: D, str: `ghcr.io/o/r:t@${D}` }],
    ['[::1]:5000/a', { domain: '[::1]:5000', repository: 'a', tag: 'latest', digest: undefined, str: '[::1]:5000/a:latest' }],
    ['reg.example.com/a-b/c__d/e.f_g', { domain: 'reg.example.com', repository: 'a-b/c__d/e.f_g', tag: 'latest', digest: undefined, str: 'reg.example.com/a-b/c__d/e.f_g:latest' }],
    ['Foo/bar', { domain: 'Foo', repository: 'bar', tag: 'latest', digest: undefined, str: 'Foo/bar:latest' }],
  ];
  for (const [input, want] of good) {
    it(`parses ${input}`, () => {
      const ref = parseReference(input);
      assert.equal(ref.domain, want.domain);
      assert.equal(ref.repository, want.repository);
      assert.equal(ref.tag, want.tag);
      assert.equal(ref.digest, want.digest);
      assert.equal(ref.toString(), want.str);
    });
  }

  const bad: [string, RegExp][] = [
    ['', /empty/],
    ['UPPER', /lowercase/],
    ['reg.io/Upper/x', /lowercase/],
    ['a b', /whitespace/],
    ['https://reg.io/x', /scheme/],
    ['reg.io/x:', /bad tag/],
    ['reg.io/x:-bad', /bad tag/],
    ['reg.io/x@sha256:abc', /bad digest/],
    ['reg.io/x@sha256:' + 'A'.repeat(64), /lowercase hex/],
    ['reg.io/', /missing repository/],
    ['reg.io/a//b', /path component/],
    ['reg.io/a_-b', /path component/],
    ['-reg.io/x', /registry host/],
    ['a'.repeat(64), /64-hex/],
    ['reg.io/' + 'a'.repeat(300), /longer than 255/],
  ];
  for (const [input, re] of bad) {
    it(`rejects ${JSON.stringify(input.slice(0, 40))}`, () => {
      assert.throws(
        () => parseReference(input),
        (err: unknown) => err instanceof InvalidArgumentError && re.test(err.message) && err.message.includes('invalid image reference'),
      );
    });
  }

  it('name and object', () => {
    const r = parseReference('127.0.0.1:5000/a/b@' + D);
    assert.equal(r.name, '127.0.0.1:5000/a/b');
    assert.equal(r.object, D);
    assert.equal(parseReference('a/b:t').object, 't');
  });
});

describe('registryHostFor / validateDigest', () => {
  it('maps docker hub to registry-1.docker.io', () => {
    assert.equal(registryHostFor('docker.io'), 'registry-1.docker.io');
    assert.equal(registryHostFor('127.0.0.1:5000'), '127.0.0.1:5000');
  });
  it('validates digests', () => {
    assert.equal(validateDigest(D), D);
    assert.throws(() => validateDigest('sha256:' + 'a'.repeat(63), 'blob digest'), /invalid blob digest/);
    assert.throws(() => validateDigest('nope'), InvalidArgumentError);
    assert.equal(validateDigest('sha512:' + 'b'.repeat(128)), 'sha512:' + 'b'.repeat(128));
  });
});
