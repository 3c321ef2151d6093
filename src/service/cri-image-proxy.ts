/**
 * The CRI image-service proxy of `[cri_keychain]`: serves Kubernetes CRI `runtime.v1.ImageService`,
 * forwards every call unchanged to the real one (containerd's socket, `image_service_path`), and
 * records the credentials of each `PullImage` in the CriKeychain before forwarding it, so the layers
 * containerd asks us to mount during that pull are fetched with the pod's pull secret. `RemoveImage`
 * forgets them. Kubelet points `--image-service-endpoint` at the socket serving this.
 *
 * Requests and responses travel as raw bytes (our proto is a subset of upstream's; decoding and
 * re-encoding would drop fields we do not know). Only PullImage and RemoveImage requests are decoded,
 * for the image reference and the AuthConfig. Errors from containerd go back to kubelet as they came.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import type * as protoLoader from '@grpc/proto-loader';
import { loadProtoSet } from '../grpc/protos';
import { errorMessage } from '../errors';
import type { Logger } from '../log';
import type { CriAuthConfig, CriKeychain } from '../remote/cri-keychain';

export const CRI_IMAGE_SERVICE = 'runtime.v1.ImageService';
/** The unary RPCs of runtime.v1.ImageService kubelet calls. */
const METHODS = ['ListImages', 'ImageStatus', 'PullImage', 'RemoveImage', 'ImageFsInfo'] as const;
const SOCKET_MODE = 0o600;
const SHUTDOWN_GRACE_MS = 5000;

interface WireImageRequest {
  image?: { image?: string } | null;
  auth?: CriAuthConfig | null;
}

const passThrough = (b: Buffer): Buffer => b;

export interface CriImageProxyOptions {
  /** containerd's socket (what `[cri_keychain] image_service_path` names). */
  imageServicePath: string;
  keychain: CriKeychain;
  log: Logger;
}

export interface CriImageProxy {
  /** Add to a grpc.Server (the daemon's own, when listen_path is its socket). */
  readonly definition: grpc.ServiceDefinition;
  readonly handlers: grpc.UntypedServiceImplementation;
  /** Closes the client to the real image service. */
  close(): void;
}

/** The ImageService proxy as a service definition and handlers, forwarding to `imageServicePath`. */
export function createCriImageProxy(opts: CriImageProxyOptions): CriImageProxy {
  const loaded = loadProtoSet('cri', { longs: String, enums: String, defaults: true });
  const upstream = loaded[CRI_IMAGE_SERVICE] as protoLoader.ServiceDefinition | undefined;
  if (!upstream) throw new Error(`${CRI_IMAGE_SERVICE} not found in our protos`);
  const decode = (method: 'PullImage' | 'RemoveImage', buf: Buffer): WireImageRequest =>
    upstream[method]!.requestDeserialize(buf);

  const client = new grpc.Client(`unix://${path.resolve(opts.imageServicePath)}`, grpc.credentials.createInsecure());
  const definition: Record<string, grpc.MethodDefinition<Buffer, Buffer>> = {};
  const handlers: grpc.UntypedServiceImplementation = {};
  for (const method of METHODS) {
    const rpcPath = `/${CRI_IMAGE_SERVICE}/${method}`;
    definition[method] = {
      path: rpcPath,
      requestStream: false,
      responseStream: false,
      requestSerialize: passThrough,
      requestDeserialize: passThrough,
      responseSerialize: passThrough,
      responseDeserialize: passThrough,
    };
    const forward = (call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>): void => {
      const deadline = call.getDeadline();
      client.makeUnaryRequest(rpcPath, passThrough, passThrough, call.request, call.metadata, { deadline }, (err, res) => {
        if (err) callback(err);
        else callback(null, res);
      });
    };
    handlers[method] = (call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>): void => {
      if (method !== 'PullImage' && method !== 'RemoveImage') return forward(call, callback);
      let ref = '';
      let auth: CriAuthConfig | null | undefined;
      try {
        const req = decode(method, call.request);
        ref = req.image?.image ?? '';
        auth = req.auth;
      } catch (err) {
        opts.log.warn({ module: 'cri-keychain', method, err: errorMessage(err) }, 'cannot decode the CRI request; forwarding it as is');
      }
      const before =
        method === 'PullImage' && ref !== '' ? opts.keychain.remember(ref, auth) : Promise.resolve();
      before
        .catch((err: unknown) => opts.log.warn({ module: 'cri-keychain', image: ref, err: errorMessage(err) }, 'cannot record pull credentials'))
        .then(
          () =>
            new Promise<void>((resolve) =>
              forward(call, (err, res) => {
                callback(err, res);
                resolve();
                if (!err && method === 'RemoveImage' && ref !== '') {
                  opts.keychain.forget(ref).catch((e: unknown) => opts.log.warn({ module: 'cri-keychain', image: ref, err: errorMessage(e) }, 'cannot forget credentials'));
                }
              }),
            ),
        )
        .catch(() => undefined);
    };
  }
  return { definition, handlers, close: () => client.close() };
}

export interface CriImageProxyServer {
  readonly address: string;
  close(): Promise<void>;
}

/** Serves the proxy alone on the unix socket `listenPath` (mode 0600): for a listen_path other than the daemon's. */
export async function startCriImageProxy(opts: CriImageProxyOptions & { listenPath: string }): Promise<CriImageProxyServer> {
  const address = path.resolve(opts.listenPath);
  await fsp.mkdir(path.dirname(address), { recursive: true, mode: 0o700 });
  await fsp.rm(address, { force: true });
  const proxy = createCriImageProxy(opts);
  const server = new grpc.Server();
  server.addService(proxy.definition, proxy.handlers);
  await new Promise<void>((resolve, reject) => {
    server.bindAsync(`unix://${address}`, grpc.ServerCredentials.createInsecure(), (err) => (err ? reject(err) : resolve()));
  });
  await fsp.chmod(address, SOCKET_MODE);
  let closing: Promise<void> | undefined;
  return {
    address,
    close: () =>
      (closing ??= (async () => {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            server.forceShutdown();
            resolve();
          }, SHUTDOWN_GRACE_MS);
          server.tryShutdown(() => {
            clearTimeout(timer);
            resolve();
          });
        });
        proxy.close();
        await fsp.rm(address, { force: true });
      })()),
  };
}
