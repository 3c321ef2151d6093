/**
 * The transport layer that speaks for a registry endpoint: its hosts.toml headers and registry auth (auth.ts)
 * go on every request to the endpoint's own origin, never to another one (a storage redirect, a token server).
 *
 * Bound: on a 401 it authenticates and sends once more; a second 401 is a RegistryAuthError.
 */
import { RegistryAuthError } from '../errors';
import { pullScope, type RegistryAuthorizer } from './auth';
import { discard } from './http-response';
import type { HttpRequest, Send } from './transport-interface';

export function authorizedSend(inner: Send, authorizer: RegistryAuthorizer): Send {
  return async (req) => {
    const endpoint = req.endpoint;
    if (endpoint === undefined || req.repository === undefined) return inner(req);
    const scope = pullScope(req.repository);
    const host = endpoint.host;
    const base: Record<string, string | string[]> = {};
    for (const [k, v] of Object.entries(endpoint.headers)) base[k] = [...v];
    Object.assign(base, req.headers);
    let authorization = authorizer.cached(host, scope);
    const withAuth = (a: string | undefined): HttpRequest => ({ ...req, headers: a === undefined ? base : { ...base, authorization: a } });

    const first = await inner(withAuth(authorization));
    if (first.statusCode !== 401) return first;
    const challenge = first.headers['www-authenticate'];
    await discard(first);
    try {
      authorization = await authorizer.authorize(host, scope, challenge, authorization, req.signal);
    } catch (err) {
      if (err instanceof RegistryAuthError) throw new RegistryAuthError(`${req.what}: ${err.message}`);
      throw err;
    }
    const second = await inner(withAuth(authorization));
    if (second.statusCode === 401) {
      await discard(second);
      throw new RegistryAuthError(`${req.what}: registry ${host} still answered 401 after authenticating for ${scope}`);
    }
    return second;
  };
}
