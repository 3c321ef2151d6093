/**
 * What our TLS clients trust: Node's default store (its bundled roots, or the system's under
 * `--use-openssl-ca`), the certificates of NODE_EXTRA_CA_CERTS, and a host's own CAs (hosts.toml `ca`), which add
 * to the default as they do in containerd.
 *
 * Why not leave NODE_EXTRA_CA_CERTS to Node: Node 20 parses that file as it starts, before any of our code runs,
 * in every process: about 60 ms of CPU for Debian's bundle, more than a `stargaze rpull` that joins another one
 * costs in all (twenty of them at once spend over a CPU-second on it). So the `stargaze` launcher (script/stargaze)
 * hands the file over as STARGAZE_EXTRA_CA_CERTS, and it is read here when the first TLS context is built, by the
 * processes that make one. The certificates trusted are the same.
 *
 * Contexts start from Node's own default context and have certificates added to it (what Node does for `ca`
 * itself, one certificate at a time), so whatever Node's default store is stays trusted. A client given a `ca`
 * list instead would parse it again on every connection: contexts are built once and passed as `secureContext`.
 */
import { readFile } from 'node:fs/promises';
import { createSecureContext, type SecureContext } from 'node:tls';

/** Set by the launcher instead of NODE_EXTRA_CA_CERTS (see the file comment). */
export const DEFERRED_EXTRA_CA_ENV = 'STARGAZE_EXTRA_CA_CERTS';

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

export interface TrustOptions {
  /** The process environment (default process.env). */
  env?: NodeJS.ProcessEnv;
}

/** The file the launcher deferred, if any. */
export function deferredExtraCaFile(options: TrustOptions = {}): string | undefined {
  return (options.env ?? process.env)[DEFERRED_EXTRA_CA_ENV] || undefined;
}

/**
 * The environment for a child process that is not stargaze (a docker credential helper, say): the deferred file
 * back under its own name, so a Node-based child trusts what it would have trusted.
 */
export function childEnv(options: TrustOptions = {}): NodeJS.ProcessEnv {
  const env = options.env ?? process.env;
  const deferred = deferredExtraCaFile(options);
  if (deferred === undefined) return env;
  const { [DEFERRED_EXTRA_CA_ENV]: _handedOver, ...rest } = env;
  return { ...rest, NODE_EXTRA_CA_CERTS: deferred };
}

const loaded = new Map<string, Promise<string[]>>();

/** The PEM certificates of `file`; none (with one warning, as Node does) when it cannot be read. */
function certificatesOf(file: string): Promise<string[]> {
  let certs = loaded.get(file);
  if (certs === undefined) {
    certs = readFile(file, 'utf8').then(
      (pem) => pem.match(PEM_CERTIFICATE) ?? [],
      (err: Error) => {
        process.emitWarning(`Ignoring extra certs from \`${file}\`, load failed: ${err.message}`);
        return [];
      },
    );
    loaded.set(file, certs);
  }
  return certs;
}

/** The native context's own method: what `createSecureContext({ ca })` calls for each certificate. */
interface NativeContext {
  addCACert(cert: string | Buffer): void;
}

/**
 * Node's default context with `cas` added. An added certificate goes into a store of this context's own
 * (Node copies the shared root store first), so no other context trusts it.
 */
function defaultPlus(cas: readonly (string | Buffer)[], cert?: string | Buffer, key?: string | Buffer): SecureContext {
  const context = createSecureContext(cert !== undefined ? { cert, key } : {});
  const native = context.context as NativeContext;
  // A block that does not parse is skipped by OpenSSL without an error; the others still count.
  for (const ca of cas) native.addCACert(ca);
  return context;
}

/** Default-trust contexts by deferred file: one per process. */
const defaultContexts = new Map<string, Promise<SecureContext>>();

/**
 * One SecureContext for a client: Node's default store, the deferred extra CAs, `hostCas`, and a client
 * certificate. Undefined when Node's own default context is exactly that (nothing deferred, no host CAs, no
 * client certificate): Node then shares its own.
 */
export async function secureContextFor(
  settings: { hostCas: readonly (string | Buffer)[]; cert?: string | Buffer; key?: string | Buffer },
  options: TrustOptions = {},
): Promise<SecureContext | undefined> {
  const deferred = deferredExtraCaFile(options);
  const plain = settings.hostCas.length === 0 && settings.cert === undefined;
  if (plain && deferred === undefined) return undefined;
  if (plain && deferred !== undefined) {
    let shared = defaultContexts.get(deferred);
    if (shared === undefined) {
      shared = certificatesOf(deferred).then((extra) => defaultPlus(extra));
      defaultContexts.set(deferred, shared);
    }
    return shared;
  }
  // Node put NODE_EXTRA_CA_CERTS into its default store itself unless the launcher deferred it.
  const extra = deferred === undefined ? [] : await certificatesOf(deferred);
  return defaultPlus([...extra, ...settings.hostCas], settings.cert, settings.key);
}

/**
 * Builds the default-trust context now, so the first TLS connection of a long-running process (a mount, a
 * first read) does not wait for it. Does nothing when nothing was deferred.
 */
export function warmDefaultTrust(options: TrustOptions = {}): void {
  if (deferredExtraCaFile(options) !== undefined) void secureContextFor({ hostCas: [] }, options);
}
