#!/usr/bin/env bash
# Idempotent machine setup for stargaze on Debian 12 (bookworm) or 13 (trixie), as root:
#   - the system packages the daemon, the e2e tests and the demo use (apt only when one is missing);
#   - /dev/fuse;
#   - node_modules (npm ci when missing or older than package-lock.json) and the build (npm run build).
# Safe to run again and again. Never installs the `fuse` package: it conflicts with fuse3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get, /dev/fuse, containerd need it)"
[[ -r /etc/debian_version ]] || die "not a Debian system (/etc/debian_version missing)"

debian_version=$(cat /etc/debian_version)
case "$debian_version" in
  12.* | 12 | bookworm*) libfuse2=libfuse2 apt_node=no ;;
  13.* | 13 | trixie* | forky* | sid*) libfuse2=libfuse2t64 apt_node=yes ;;  # t64 transition renamed it
  *)
    log "untested Debian version '$debian_version'; guessing package names"
    if apt-cache show libfuse2t64 >/dev/null 2>&1; then libfuse2=libfuse2t64 apt_node=yes; else libfuse2=libfuse2 apt_node=no; fi
    ;;
esac

packages=(
  containerd runc docker-registry skopeo stargz-snapshotter
  "$libfuse2" fuse3 busybox-static jq attr
  ca-certificates
  python3 make g++  # better-sqlite3 / fuse-native native builds
)
# `--test`: what only the test suite needs: htpasswd for the registry auth tests, Go and containerd's
# Go sources for its snapshotter conformance suite.
if [[ ${1:-} == --test ]]; then
  packages+=(
    apache2-utils
    golang-go golang-github-containerd-containerd-dev
    golang-github-google-go-cmp-dev golang-github-gotestyourself-gotest.tools-dev
    buildah pigz systemd  # Dockerfile build test (offline stand-in bases), systemd-analyze for the unit
  )
fi

installed() {
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

# Node 20+ and npm: Debian 13 ships both; Debian 12's nodejs is 18, too old, so it must come from
# elsewhere (e.g. NodeSource) and we only check for it.
node_major=0
if command -v node >/dev/null 2>&1; then node_major=$(node -p 'process.versions.node.split(".")[0]'); fi
if (( node_major < 20 )) || ! command -v npm >/dev/null 2>&1; then
  if [[ $apt_node == yes ]]; then
    packages+=(nodejs npm)
  else
    die "Node.js >= 20 with npm is required (found: $(node --version 2>/dev/null || echo none)); Debian 12's nodejs is too old, install Node 20 (e.g. from NodeSource) first"
  fi
fi

missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
if (( ${#missing[@]} > 0 )); then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  # --no-install-recommends keeps `fuse` (and other heavy recommends) out
  apt-get install -y --no-install-recommends "${missing[@]}"
else
  log "system packages already installed"
fi
if installed fuse; then
  log "warning: the 'fuse' package is installed; it conflicts with fuse3 (apt-get remove fuse)"
fi

# The Debian containerd package starts a system containerd; the tests and the demo run their own
# private instances, so it may stay (it uses other sockets), but it is not needed.

# /dev/fuse
if [[ ! -c /dev/fuse ]] && command -v modprobe >/dev/null 2>&1; then
  modprobe fuse || true
fi
if [[ ! -c /dev/fuse ]]; then
  log "creating /dev/fuse"
  mknod -m 0666 /dev/fuse c 10 229 || die "/dev/fuse is missing and could not be created (is the fuse module available?)"
fi
grep -qw fuse /proc/filesystems || die "the kernel has no FUSE support (fuse missing from /proc/filesystems)"
grep -qw overlay /proc/filesystems || { command -v modprobe >/dev/null 2>&1 && modprobe overlay; } || true

# Native modules are built from source when no prebuilt binary can be downloaded; point node-gyp at
# the installed headers so that works offline too.
if [[ -z ${npm_config_nodedir:-} ]]; then
  node_prefix=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
  if [[ -f $node_prefix/include/node/node_version.h ]]; then export npm_config_nodedir=$node_prefix; fi
fi

# node_modules is current when it was installed from this very package-lock.json: either our stamp
# (sha256 of the lock file) matches, or npm's hidden lockfile is newer than the lock file.
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
stamp=node_modules/.stargaze-setup-lock-sha256
if [[ -f $stamp && $(cat "$stamp") == "$lock_hash" ]] ||
   [[ -f node_modules/.package-lock.json && ! package-lock.json -nt node_modules/.package-lock.json ]]; then
  log "node_modules up to date"
else
  log "npm ci"
  npm ci --no-audit --no-fund
fi
echo "$lock_hash" >"$stamp"

log "npm run build"
npm run build

log "done"
