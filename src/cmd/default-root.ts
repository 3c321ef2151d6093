/** The daemon's state directory unless `--root` says otherwise; `stargaze profile` works on the same one. */
export const DEFAULT_ROOT = '/var/lib/stargaze';
