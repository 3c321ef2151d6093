/**
 * The daemon's keychains beyond docker's config.json, chained in the reference's order: docker's
 * config.json (the RegistryClient's own), then the CRI keychain (the credentials kubelet sent with each
 * CRI PullImage, read from the file the image-service proxy writes), then the kubeconfig keychain (the
 * cluster's `kubernetes.io/dockerconfigjson` pull secrets). Used by whichever process resolves layer
 * blobs: the FUSE server (given the paths on its command line) or the daemon itself.
 */
import { chmod } from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from '../log';
import { chainCredentials, type CredentialProvider } from './credentials';
import { CriKeychain } from './cri-keychain';
import { KubeconfigKeychain } from './kubeconfig-keychain';

/** Under the daemon's root: the CRI keychain's directory (0700; its file is 0600). */
export const CRI_KEYCHAIN_DIR = 'cri-keychain';

export interface KeychainPaths {
  /** Directory of the CRI keychain file; unset: no CRI keychain. */
  criKeychainDir?: string;
  /** The kubeconfig to read pull secrets with; unset: no kubeconfig keychain. */
  kubeconfigPath?: string;
}

export interface Keychains {
  /** For RegistryClient's `credentialsAfterDockerConfig`; undefined when no keychain is on. */
  readonly provider: CredentialProvider | undefined;
  readonly cri: CriKeychain | undefined;
  readonly kube: KubeconfigKeychain | undefined;
  close(): void;
}

/** Opens the CRI keychain directory, made 0700 even when it already existed. */
export async function openCriKeychain(dir: string, log: Logger): Promise<CriKeychain> {
  const keychain = await CriKeychain.open(dir, log);
  await chmod(dir, 0o700);
  return keychain;
}

export async function openKeychains(paths: KeychainPaths, log: Logger): Promise<Keychains> {
  const cri = paths.criKeychainDir ? await openCriKeychain(path.resolve(paths.criKeychainDir), log.child({ module: 'cri-keychain' })) : undefined;
  const kube = paths.kubeconfigPath
    ? new KubeconfigKeychain({ kubeconfigPath: paths.kubeconfigPath, log: log.child({ module: 'kubeconfig-keychain' }) })
    : undefined;
  const providers = [cri?.provider, kube?.provider].filter((p): p is CredentialProvider => p !== undefined);
  return {
    provider: providers.length === 0 ? undefined : chainCredentials(...providers),
    cri,
    kube,
    close: () => kube?.close(),
  };
}
