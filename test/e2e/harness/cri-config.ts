/**
 * containerd's CRI plugin configured as a KinD node's, offline: the stargz snapshotter with snapshot
 * annotations, a locally built sandbox image, runc state in the test's tmp dir.
 */
export function criConfig(opts: { sandboxImage: string; hostsDir: string; cniConfDir: string; runcRoot: string }): string {
  const q = (s: string): string => JSON.stringify(s);
  return [
    '[plugins."io.containerd.grpc.v1.cri"]',
    `  sandbox_image = ${q(opts.sandboxImage)}`,
    '  stream_server_address = "127.0.0.1"',
    '  stream_server_port = "0"',
    '  enable_selinux = false',
    // the pod sandbox asks for oom_score_adj -998, which this machine does not let a container lower
    // to; clamp it to containerd's own, as KinD's nested nodes do
    '  restrict_oom_score_adj = true',
    '[plugins."io.containerd.grpc.v1.cri".containerd]',
    '  snapshotter = "stargz"',
    '  disable_snapshot_annotations = false',
    '  default_runtime_name = "runc"',
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
    '  runtime_type = "io.containerd.runc.v2"',
    '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
    // runc state of CRI containers stays in this test's tmp dir, not in the machine-wide k8s.io dir
    `  Root = ${q(opts.runcRoot)}`,
    '[plugins."io.containerd.grpc.v1.cri".cni]',
    '  bin_dir = "/usr/lib/cni"',
    `  conf_dir = ${q(opts.cniConfDir)}`,
    '[plugins."io.containerd.grpc.v1.cri".registry]',
    `  config_path = ${q(opts.hostsDir)}`,
  ].join('\n');
}
