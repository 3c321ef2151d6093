/**
 * The transport layer over the pools: one attempt at a request, and the choice among several hosts.toml client
 * certificates (client-certs.ts says how). Raw failures leave it as coded RegistryErrors naming the host,
 * TransientRegistryError when they are worth another try.
 *
 * Bound: one request to the pools, or, for an endpoint with several client certificates, at most one per
 * certificate (and after an origin accepted one, a new one is tried only on a TLS certificate alert).
 */
import type { Dispatcher } from 'undici';
import { RegistryError, StargazeError } from '../errors';
import type { Logger } from '../log';
import { ClientCertChoice, certVerdictOfError, certVerdictOfStatus } from './client-certs';
import { isAborted } from './deadline';
import { discard } from './http-response';
import { describeNetworkError, transportError } from './registry-errors';
import { tlsOf, type HttpRequest, type Send } from './transport-interface';
import { tlsKey, type TransportPools } from './transport-pool';

export function clientCertSend(pools: TransportPools, log: Logger): Send {
  /** Of several client certificates, the one each origin accepted. */
  const choice = new ClientCertChoice();

  const classify = (err: unknown, req: HttpRequest, note = ''): unknown => {
    if (isAborted(req.signal) || err instanceof StargazeError) return err;
    const prefix = `${req.what}: request to ${req.url.host} failed`;
    // A client closed under a request: its failure is final.
    if (pools.closed) return new RegistryError(`${prefix}: ${describeNetworkError(err)}${note}`);
    return transportError(err, prefix, note);
  };

  const withCertificates = async (req: HttpRequest, certs: number): Promise<Dispatcher.ResponseData> => {
    const tls = tlsOf(req);
    const key = tlsKey(req.url, tls);
    const order = choice.order(key, certs);
    for (let n = 0; ; n++) {
      const index = order[n] as number;
      const last = n === order.length - 1;
      let res: Dispatcher.ResponseData;
      try {
        res = await pools.request(req, index);
      } catch (err) {
        if (last || isAborted(req.signal) || !choice.shouldTryNext(key, certVerdictOfError(err))) throw err;
        log.debug({ host: req.url.host, cert: tls.clientCerts[index]?.certFile, err: describeNetworkError(err) }, 'client certificate not accepted; trying the next one');
        continue;
      }
      const verdict = certVerdictOfStatus(res.statusCode);
      if (!last && choice.shouldTryNext(key, verdict)) {
        await discard(res);
        log.debug({ host: req.url.host, cert: tls.clientCerts[index]?.certFile, status: res.statusCode }, 'client certificate maybe not accepted; trying the next one');
        continue;
      }
      if (verdict === 'accepted' && !choice.hasAccepted(key)) log.debug({ host: req.url.host, cert: tls.clientCerts[index]?.certFile }, 'client certificate accepted');
      if (verdict === 'accepted') choice.accept(key, index);
      return res;
    }
  };

  return async (req) => {
    const certs = req.url.protocol === 'https:' ? tlsOf(req).clientCerts.length : 0;
    try {
      return certs <= 1 ? await pools.request(req, 0) : await withCertificates(req, certs);
    } catch (err) {
      throw classify(err, req, certs <= 1 ? '' : ` (tried ${certs} client certificates)`);
    }
  };
}
