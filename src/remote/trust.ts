/**
 * What our TLS clients trust: Node's bundled roots plus the certificates of NODE_EXTRA_CA_CERTS, plus a host's
 * own CAs (hosts.toml `ca`, a kubeconfig's certificate-authority), which add to that as they do in containerd.
 *
 * Why not leave it to Node: Node 20 parses the NODE_EXTRA_CA_CERTS file as it starts, before any of our code
 * runs, in every process: about 60 ms of CPU for Debian's bundle, more than a `stargaze rpull` that joins
 * another one costs in all (twenty of them at once spend over a CPU-second on it). So the `stargaze` launcher
 * (script/stargaze) hands the file over as STARGAZE_EXTRA_CA_CERTS, and it is read here on the first TLS
 * connection, by the processes that make one. The certificates trusted are the same.
 *
 * A client given `ca` parses it again on every connection unless it shares one SecureContext: the contexts
 * built here are made once per set of settings by the caller and passed as `secureContext`.
 */
import { readFile } from 'node:fs/promises';
import { createSecureContext, rootCertificates, type SecureContext } from 'node:tls';

/** Set by the launcher instead of NODE_EXTRA_CA_CERTS (see the file comment). */
export const DEFERRED_EXTRA_CA_ENV = 'STARGAZE_EXTRA_CA_CERTS';

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

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

export interface TrustOptions {
  /** The process environment (default process.env). */
  env?: NodeJS.ProcessEnv;
}

/**
 * The `ca` list for a TLS client with these host CAs, or undefined when Node's default store is exactly
 * right (no host CAs, and Node loaded NODE_EXTRA_CA_CERTS itself).
 */
export async function trustedCas(hostCas: readonly (string | Buffer)[], options: TrustOptions = {}): Promise<(string | Buffer)[] | undefined> {
  const env = options.env ?? process.env;
  const deferred = env[DEFERRED_EXTRA_CA_ENV] || undefined;
  if (deferred === undefined && hostCas.length === 0) return undefined;
  // With host CAs Node's store would be replaced, not added to: its extra certificates come along by hand.
  const extraFile = deferred ?? (env.NODE_EXTRA_CA_CERTS || undefined);
  const extra = extraFile === undefined ? [] : await certificatesOf(extraFile);
  return [...rootCertificates, ...extra, ...hostCas];
}

/**
 * One SecureContext for a client: trusted CAs as trustedCas() says, and a client certificate. Undefined when
 * Node's defaults do (no CAs to add, no client certificate): Node then shares its own default context.
 */
export async function secureContextFor(
  settings: { hostCas: readonly (string | Buffer)[]; cert?: string | Buffer; key?: string | Buffer },
  options: TrustOptions = {},
): Promise<SecureContext | undefined> {
  const plain = settings.hostCas.length === 0 && settings.cert === undefined;
  const deferred = (options.env ?? process.env)[DEFERRED_EXTRA_CA_ENV] || undefined;
  // The common case, default trust with the deferred file, is one context for the whole process.
  if (plain && deferred !== undefined) {
    let shared = defaultContexts.get(deferred);
    if (shared === undefined) {
      shared = trustedCas([], options).then((ca) => createSecureContext({ ca }));
      defaultContexts.set(deferred, shared);
    }
    return shared;
  }
  const ca = await trustedCas(settings.hostCas, options);
  if (ca === undefined && settings.cert === undefined) return undefined;
  return createSecureContext({ ...(ca !== undefined ? { ca } : {}), ...(settings.cert !== undefined ? { cert: settings.cert, key: settings.key } : {}) });
}

/** Default-trust contexts by deferred file (see secureContextFor). */
const defaultContexts = new Map<string, Promise<SecureContext>>();
