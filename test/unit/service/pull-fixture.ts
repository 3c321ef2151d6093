/** A pull request as `stargaze rpull` sends one: what the pull service and shared-pull tests hand around. */
import type { PullRequest } from '../../../src/containerd/pull-request';

export const request: PullRequest = {
  ref: 'registry.example/app:v1',
  address: '/run/containerd/containerd.sock',
  namespace: 'default',
  snapshotter: 'stargz',
  platform: { os: 'linux', architecture: 'amd64' },
  prefetchBytes: 10,
  hostsDir: '/etc/containerd/certs.d',
  plainHttp: false,
  user: { username: 'u', password: 'p' },
  dockerConfigDir: '/root/.docker',
};
