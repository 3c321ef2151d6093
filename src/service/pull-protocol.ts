/**
 * The wire between `stargaze rpull` and the daemon that pulls for it (pull-service.ts): JSON lines over a
 * root-only unix socket. The client sends one request; the daemon says it took it (`accepted`), answers with
 * the pull's events as they happen, then one `done` or `error` line. An error marked `unsupported` means the
 * daemon cannot carry the pull out (a version it does not speak, or it is stopping): the client pulls itself. Closing the connection cancels the pull. Both ends check what they
 * read rather than cast it: a line the daemon cannot act on costs that connection an error, never the daemon.
 */
import { ProtocolError } from '../errors';
import { isRecord } from '../json-lines';
import type { PullRequest, PullSummary } from '../containerd/pull-request';
import type { PullEvent } from '../containerd/pull';

export const PULL_PROTOCOL = 'pull protocol';
export const PULL_PROTOCOL_VERSION = 1;
/** Bound on one line: a request is a few hundred bytes, an event or a summary a few KiB per layer at most. */
export const PULL_MAX_LINE_BYTES = 1024 * 1024;
/** Bound on the text fields of a request: references and paths, never documents. */
const MAX_FIELD_CHARS = 4096;

export interface PullCall {
  v: number;
  pull: PullRequest;
}

export type PullReply =
  | { accepted: true }
  | { event: PullEvent }
  | { done: PullSummary }
  | { error: { code: string | undefined; message: string; unsupported?: boolean } };

function bad(message: string): ProtocolError {
  return new ProtocolError(`${PULL_PROTOCOL}: ${message}`);
}

function text(x: unknown, field: string, opts: { absolute?: boolean } = {}): string {
  if (typeof x !== 'string' || x === '' || x.length > MAX_FIELD_CHARS || x.includes('\0')) throw bad(`${field} must be a non-empty string of at most ${MAX_FIELD_CHARS} characters`);
  if (opts.absolute === true && !x.startsWith('/')) throw bad(`${field} must be an absolute path`);
  return x;
}

/** The request's version, when it has one: a daemon answers a version it does not speak with `unsupported`. */
export function callVersion(message: unknown): number | undefined {
  return isRecord(message) && Number.isSafeInteger(message.v) ? (message.v as number) : undefined;
}

/** What a client asked for, field by field; a ProtocolError says what is wrong. */
export function parsePullCall(message: unknown): PullCall {
  if (!isRecord(message) || !isRecord(message.pull)) throw bad('a request is an object { v, pull }');
  const p = message.pull;
  const platform = p.platform;
  if (!isRecord(platform)) throw bad('platform must be an object { os, architecture, variant? }');
  const user = p.user;
  if (user !== undefined && !(isRecord(user) && typeof user.username === 'string' && typeof user.password === 'string')) {
    throw bad('user must be { username, password }');
  }
  const prefetchBytes = p.prefetchBytes;
  if (typeof prefetchBytes !== 'number' || !Number.isSafeInteger(prefetchBytes) || prefetchBytes < 0) throw bad('prefetchBytes must be a non-negative integer');
  if (typeof p.plainHttp !== 'boolean') throw bad('plainHttp must be a boolean');
  return {
    v: callVersion(message) ?? 0,
    pull: {
      ref: text(p.ref, 'ref'),
      address: text(p.address, 'address', { absolute: true }),
      namespace: text(p.namespace, 'namespace'),
      snapshotter: text(p.snapshotter, 'snapshotter'),
      platform: {
        os: text(platform.os, 'platform.os'),
        architecture: text(platform.architecture, 'platform.architecture'),
        ...(platform.variant !== undefined ? { variant: text(platform.variant, 'platform.variant') } : {}),
      },
      prefetchBytes,
      hostsDir: text(p.hostsDir, 'hostsDir', { absolute: true }),
      plainHttp: p.plainHttp,
      user: user === undefined ? undefined : { username: user.username as string, password: user.password as string },
      dockerConfigDir: text(p.dockerConfigDir, 'dockerConfigDir', { absolute: true }),
    },
  };
}

const EVENT_TYPES = new Set(['resolved', 'layer-start', 'layer-progress', 'layer-done']);
const OUTCOMES = new Set(['lazy', 'fetched', 'present']);

/** What the daemon sent: checked enough that printing it cannot throw. */
export function parsePullReply(message: unknown): PullReply {
  if (!isRecord(message)) throw bad('a reply must be an object');
  if (message.accepted === true) return { accepted: true };
  if (isRecord(message.event)) {
    const e = message.event;
    if (typeof e.type !== 'string' || !EVENT_TYPES.has(e.type)) throw bad('an event needs a known type');
    if (e.type === 'resolved') {
      if (typeof e.name !== 'string' || !isRecord(e.manifest) || typeof e.manifest.digest !== 'string' || typeof e.layers !== 'number') throw bad('a resolved event needs name, manifest and layers');
    } else if (typeof e.digest !== 'string' || (e.type === 'layer-done' && (typeof e.outcome !== 'string' || !OUTCOMES.has(e.outcome)))) {
      throw bad(`a ${e.type} event needs a digest${e.type === 'layer-done' ? ' and an outcome' : ''}`);
    }
    return { event: e as unknown as PullEvent };
  }
  if (isRecord(message.done)) {
    const d = message.done;
    const layersOk = Array.isArray(d.layers) && d.layers.every((l) => isRecord(l) && typeof l.digest === 'string' && typeof l.outcome === 'string' && OUTCOMES.has(l.outcome) && typeof l.bytes === 'number');
    if (typeof d.name !== 'string' || typeof d.manifestDigest !== 'string' || !layersOk || typeof d.ms !== 'number') throw bad('done needs name, manifestDigest, layers and ms');
    return { done: d as unknown as PullSummary };
  }
  if (isRecord(message.error)) {
    const { code, message: text, unsupported } = message.error;
    if (typeof text !== 'string' || (code !== undefined && typeof code !== 'string')) throw bad('an error needs a message');
    return { error: { code, message: text, ...(unsupported === true ? { unsupported: true } : {}) } };
  }
  throw bad('a reply is accepted, an event, done or error');
}
