#!/usr/bin/env bash
# The demo: lazy pulling end to end on this machine, loopback only, everything in tmp dirs that are
# removed afterwards (also on Ctrl-C). Sets the machine up first (script/setup.sh: packages,
# /dev/fuse, npm ci, build), then runs script/demo.ts (compiled to dist/script/demo.js):
# registry + counting proxy, stargaze daemon, containerd with the stargz proxy plugin, a busybox
# eStargz image with a big unread file (`stargaze convert`), `stargaze rpull` and `ctr run --snapshotter stargz`,
# and a report of pull time, run time and bytes fetched, next to a plain overlayfs pull.
#
#   bash script/demo.sh [--size-mib N] [--no-baseline] [--baseline-only] [--keep]
#
# Needs root. STARGAZE_DEMO_SKIP_SETUP=1 skips script/setup.sh.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "demo: needs root (containerd, runc, mounts, FUSE); try: sudo bash script/demo.sh" >&2
  exit 1
fi

if [[ ${STARGAZE_DEMO_SKIP_SETUP:-0} != 1 ]]; then
  bash script/setup.sh
fi

# exec: node gets Ctrl-C and the other signals directly and cleans up before it exits
exec node dist/script/demo.js "$@"
