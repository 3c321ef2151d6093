/**
 * Image references: `[host[:port]/]repo[:tag][@digest]`, normalised the way containerd normalises them
 * (distribution/reference ParseNormalizedNamed + TagNameOnly):
 *   `busybox`                 -> docker.io/library/busybox:latest
 *   `index.docker.io/foo/bar` -> docker.io/foo/bar:latest
 *   `127.0.0.1:5000/a/b@sha256:...` stays as it is (no tag is added when a digest is given).
 *
 * `domain` is the registry *name* ("docker.io"): it is what hosts.toml directories and docker config keys
 * are looked up by. The host actually dialled for Docker Hub is `registry-1.docker.io`; see registryHostFor().
 */
import { InvalidArgumentError } from '../errors';

/** Canonical name of Docker Hub, the domain of short names like `busybox`. */
export const DOCKER_HUB_DOMAIN = 'docker.io';
/** Legacy spelling of Docker Hub accepted in references (normalised to DOCKER_HUB_DOMAIN). */
export const DOCKER_HUB_LEGACY_DOMAIN = 'index.docker.io';
/** The host Docker Hub's registry API is actually served from. */
export const DOCKER_HUB_REGISTRY_HOST = 'registry-1.docker.io';
/** Namespace that single-component Docker Hub names live in (`busybox` -> `library/busybox`). */
export const DOCKER_HUB_OFFICIAL_NAMESPACE = 'library';
/** Tag assumed when a reference names neither a tag nor a digest. */
export const DEFAULT_TAG = 'latest';
/** distribution/reference NameTotalLengthMax: `domain/path` may not be longer than this. */
export const NAME_MAX_CHARS = 255;

// Grammar from distribution/reference (regexp.go), anchored.
const DOMAIN_COMPONENT = '(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])';
const DOMAIN_RE = new RegExp(
  `^(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[a-fA-F0-9:]+\\])(?::[0-9]+)?$`,
);
const PATH_COMPONENT_RE = /^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$/;
const TAG_RE = /^[\w][\w.-]{0,127}$/;
const DIGEST_RE = /^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$/;
const HEX64_RE = /^[a-f0-9]{64}$/;
/** Hex lengths of the digest algorithms we know; others are accepted if they match DIGEST_RE. */
const DIGEST_HEX_CHARS: Readonly<Record<string, number>> = { sha256: 64, sha384: 96, sha512: 128 };

export class ImageReference {
  constructor(
    /** Registry name, `host[:port]`; Docker Hub is `docker.io`. */
    readonly domain: string,
    /** Repository path inside the registry, e.g. `library/busybox`. */
    readonly repository: string,
    /** Tag, or undefined when the reference is by digest only. */
    readonly tag: string | undefined,
    /** `algo:hex`, when the reference pins a manifest digest. */
    readonly digest: string | undefined,
  ) {}

  /** `domain/repository`, the name without tag or digest. */
  get name(): string {
    return `${this.domain}/${this.repository}`;
  }

  /** What to ask the registry's manifests endpoint for: the digest when pinned, else the tag. */
  get object(): string {
    return this.digest ?? this.tag ?? DEFAULT_TAG;
  }

  toString(): string {
    return this.name + (this.tag !== undefined ? `:${this.tag}` : '') + (this.digest !== undefined ? `@${this.digest}` : '');
  }
}

function invalid(input: string, why: string): InvalidArgumentError {
  return new InvalidArgumentError(`invalid image reference ${JSON.stringify(input)}: ${why}`);
}

/**
 * Checks an `algo:hex` digest. Throws InvalidArgumentError naming `what` (e.g. "blob digest") when malformed.
 * Returns the digest unchanged so it can be used inline.
 */
export function validateDigest(digest: string, what = 'digest'): string {
  if (!DIGEST_RE.test(digest)) {
    throw new InvalidArgumentError(`invalid ${what} ${JSON.stringify(digest)}: want algorithm:hex, e.g. sha256:<64 hex chars>`);
  }
  const colon = digest.indexOf(':');
  const algo = digest.slice(0, colon);
  const hex = digest.slice(colon + 1);
  const want = DIGEST_HEX_CHARS[algo];
  if (want !== undefined && (hex.length !== want || hex !== hex.toLowerCase())) {
    throw new InvalidArgumentError(`invalid ${what} ${JSON.stringify(digest)}: ${algo} needs ${want} lowercase hex chars`);
  }
  return digest;
}

/** True for the names Docker Hub goes by, in references and in registry host names. */
export function isDockerHub(host: string): boolean {
  return host === DOCKER_HUB_DOMAIN || host === DOCKER_HUB_LEGACY_DOMAIN || host === DOCKER_HUB_REGISTRY_HOST;
}

/** The host that serves the registry API for a reference's domain (Docker Hub's is registry-1.docker.io). */
export function registryHostFor(domain: string): string {
  return domain === DOCKER_HUB_DOMAIN ? DOCKER_HUB_REGISTRY_HOST : domain;
}

/** Parses and normalises an image reference; throws InvalidArgumentError saying what is wrong. */
export function parseReference(input: string): ImageReference {
  if (input.length === 0) throw invalid(input, 'empty');
  if (/\s/.test(input)) throw invalid(input, 'contains whitespace');
  if (input.includes('://')) throw invalid(input, 'a reference has no scheme (drop "http://" / "https://")');
  if (HEX64_RE.test(input)) throw invalid(input, 'cannot be a bare 64-hex string (it looks like an image ID)');

  let rest = input;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST_RE.test(digest)) throw invalid(input, `bad digest ${JSON.stringify(digest)}`);
    const hexChars = DIGEST_HEX_CHARS[digest.slice(0, digest.indexOf(':'))];
    const hex = digest.slice(digest.indexOf(':') + 1);
    if (hexChars !== undefined && (hex.length !== hexChars || hex !== hex.toLowerCase())) {
      throw invalid(input, `bad digest ${JSON.stringify(digest)}: needs ${hexChars} lowercase hex chars`);
    }
  }

  let tag: string | undefined;
  const lastColon = rest.lastIndexOf(':');
  // A colon after the last slash starts the tag; one before it is a registry port.
  if (lastColon > rest.lastIndexOf('/')) {
    tag = rest.slice(lastColon + 1);
    rest = rest.slice(0, lastColon);
    if (!TAG_RE.test(tag)) {
      throw invalid(input, `bad tag ${JSON.stringify(tag)} (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')`);
    }
  }
  if (rest.length === 0) throw invalid(input, 'missing repository name');

  let domain: string;
  let repository: string;
  const slash = rest.indexOf('/');
  const first = slash < 0 ? rest : rest.slice(0, slash);
  // Like distribution: the first component is a registry only if it looks like a host (has '.' or ':',
  // is "localhost", or has upper case, which a repository path may not).
  const isDomain = slash >= 0 && (first.includes('.') || first.includes(':') || first === 'localhost' || first !== first.toLowerCase());
  if (isDomain) {
    domain = first;
    repository = rest.slice(slash + 1);
    if (!DOMAIN_RE.test(domain)) throw invalid(input, `bad registry host ${JSON.stringify(domain)}`);
  } else {
    domain = DOCKER_HUB_DOMAIN;
    repository = rest;
  }
  if (domain === DOCKER_HUB_LEGACY_DOMAIN) domain = DOCKER_HUB_DOMAIN;
  if (domain === DOCKER_HUB_DOMAIN && !repository.includes('/')) repository = `${DOCKER_HUB_OFFICIAL_NAMESPACE}/${repository}`;

  if (repository.length === 0) throw invalid(input, 'missing repository name after the registry host');
  if (repository !== repository.toLowerCase()) throw invalid(input, 'repository name must be lowercase');
  for (const component of repository.split('/')) {
    if (!PATH_COMPONENT_RE.test(component)) {
      throw invalid(
        input,
        `bad repository path component ${JSON.stringify(component)} (lowercase letters and digits, separated by '.', '_', '__' or '-')`,
      );
    }
  }
  if (domain.length + 1 + repository.length > NAME_MAX_CHARS) throw invalid(input, `name longer than ${NAME_MAX_CHARS} characters`);

  if (tag === undefined && digest === undefined) tag = DEFAULT_TAG;
  return new ImageReference(domain, repository, tag, digest);
}
