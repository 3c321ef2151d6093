/**
 * The parts both composition roots build the same way: the process that serves layer mounts (the FUSE server,
 * or the daemon itself with `[fuse_manager] enable = false`) gets its registry client, caches, scheduler and
 * file system from here, so the two cannot drift apart.
 */
import type http from 'node:http';
import { openDiskCaches } from '../cache/disk-caches';
import type { Config } from '../config/config';
import { fileSystemOptionsFromConfig, StargazeFileSystem } from '../fs/stargz-fs';
import type { Logger } from '../log';
import { serveMetrics } from '../metrics/fs-metrics';
import type { CredentialProvider } from '../remote/credentials';
import { RegistryClient } from '../remote/registry-client';
import { registryOptionsFromConfig } from '../remote/registry-config';
import { Scheduler, schedulerLimits } from '../task/scheduler';
import { opaqueXattrHere } from '../user-namespace';

export interface LayerServiceSetup {
  config: Config;
  /** containerd's hosts.toml directory. */
  hostsDir: string;
  /** The disk chunk cache's directory. */
  cacheDir: string;
  /** The daemon root, whose files count toward `disk_max_bytes` with the caches' (absent: the caches only). */
  root?: string;
  /** Registry credentials tried after docker's config.json: the CRI and kubeconfig keychains. */
  credentials?: CredentialProvider;
  log: Logger;
}

export interface LayerService {
  filesystem: StargazeFileSystem;
  /** Unmounts every layer, then closes what was opened for them (the credentials are the caller's). */
  close(): Promise<void>;
}

/** Opens the file system that serves layer mounts, with the process's one Scheduler, and its metrics endpoint. */
export async function openLayerService(setup: LayerServiceSetup): Promise<LayerService> {
  const { config, log } = setup;
  const scheduler = new Scheduler(schedulerLimits(config));
  const registry = new RegistryClient({
    hostsDir: setup.hostsDir,
    ...registryOptionsFromConfig(config),
    credentialsAfterDockerConfig: setup.credentials,
    log: log.child({ module: 'remote' }),
  });
  const caches = await openDiskCaches({ cacheDir: setup.cacheDir, root: setup.root, maxBytes: config.cache.diskMaxBytes, log: log.child({ module: 'cache' }) });
  const { diskCache, tocCache, profiles } = caches;
  // The snapshotter mounts overlayfs with `userxattr` in a user namespace: opaque dirs must say so in user.*.
  const opaqueXattr = await opaqueXattrHere();
  const filesystem = new StargazeFileSystem({
    registry,
    ...fileSystemOptionsFromConfig(config),
    scheduler,
    diskCache,
    tocCache,
    profiles,
    profileRegistry: registry,
    opaqueXattr,
    log: log.child({ module: 'fs' }),
  });
  // The layers' metrics live where the layers are served (in the FUSE server they survive daemon restarts too).
  const metricsServer: http.Server | undefined = config.metricsAddress
    ? await serveMetrics(filesystem.metrics, config.metricsAddress, log.child({ module: 'metrics' }))
    : undefined;
  return {
    filesystem,
    close: async () => {
      metricsServer?.close();
      await filesystem.close();
      caches.close();
      await registry.close();
    },
  };
}
