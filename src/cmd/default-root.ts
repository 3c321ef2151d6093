/** The daemon's state directory unless `--root` says otherwise; `stargaze profile` works on the same one. */
export const DEFAULT_ROOT = '/var/lib/stargaze';
/** containerd's usual config_path for hosts.toml files: convert's, profile push's and the daemon's default. */
export const DEFAULT_HOSTS_DIR = '/etc/containerd/certs.d';
