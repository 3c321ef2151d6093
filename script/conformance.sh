#!/usr/bin/env bash
# Conformance check: containerd's own snapshotter test suite (snapshots/testsuite, containerd 1.6 from
# Debian) driven through containerd's proxy snapshotter client against stargaze's gRPC service.
#
#   script/conformance.sh            one daemon per test case (the suite's isolation model), then one
#                                    shared daemon for all cases (a long-lived daemon, concurrent clients)
#   MODE=per-case|shared script/conformance.sh   only one of the two
#
# Needs root (the suite mounts overlayfs) and Debian's Go packages; installs them when missing.
# Builds the Go test in GOPATH mode (GO111MODULE=off) against /usr/share/gocode: no module downloads.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="${MODE:-both}"
gocode=/usr/share/gocode
# Upper bound for one suite run; the suite takes ~10 s on a 2-core machine.
suite_timeout=600s

if [[ "$(id -u)" != 0 ]]; then
  echo "conformance: needs root (overlay mounts)" >&2
  exit 1
fi

need_pkgs=()
command -v go >/dev/null 2>&1 || need_pkgs+=(golang-go)
[[ -d "$gocode/src/github.com/containerd/containerd/snapshots/testsuite" ]] || need_pkgs+=(golang-github-containerd-containerd-dev)
# Test-only imports of the suite that containerd-dev does not pull in everywhere.
[[ -d "$gocode/src/github.com/google/go-cmp" ]] || need_pkgs+=(golang-github-google-go-cmp-dev)
[[ -d "$gocode/src/gotest.tools" ]] || need_pkgs+=(golang-github-gotestyourself-gotest.tools-dev)
if ((${#need_pkgs[@]} > 0)); then
  echo "conformance: installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if [[ ! -f "$repo/dist/test/conformance/serve.js" || "${SKIP_BUILD:-0}" != 1 ]]; then
  (cd "$repo" && npx tsc -p tsconfig.json) || {
    # Other folders may be mid-edit; our files still compile when dist/ has them.
    [[ -f "$repo/dist/test/conformance/serve.js" ]] || exit 1
    echo "conformance: tsc reported errors (see above); using the emitted dist/" >&2
  }
fi

work="$(mktemp -d /tmp/stargaze-conformance-XXXXXX)"
daemon_pid=""
cleanup() {
  if [[ -n "$daemon_pid" ]] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -INT "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  # The suite unmounts what it mounts; anything left below our dir is detached before removal.
  local mp
  for mp in $(awk -v w="$work" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
    umount -l "$mp" || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# GOPATH mode needs the package under a GOPATH src/ tree.
pkg="$work/gopath/src/stargaze/conformance"
mkdir -p "$pkg"
cp "$repo/test/conformance/main_test.go" "$pkg/"
echo "conformance: building the suite (GOPATH mode, Debian Go packages)"
(cd "$pkg" && GO111MODULE=off GOPATH="$work/gopath:$gocode" GOFLAGS= GOCACHE="$work/gocache" \
  go test -c -o "$work/conformance.test" .)

serve="node $repo/dist/test/conformance/serve.js"
status=0

run_suite() {
  local label="$1"
  shift
  echo "conformance: running containerd snapshotter suite ($label)"
  if env "$@" "$work/conformance.test" -test.v -test.timeout "$suite_timeout" >"$work/$label.log" 2>&1; then
    echo "conformance ($label): PASS"
  else
    echo "conformance ($label): FAIL" >&2
    status=1
  fi
  grep -E '^\s*--- (PASS|FAIL|SKIP)' "$work/$label.log" | sed "s/^/  [$label] /"
  local pass fail skip
  pass=$(grep -cE '^\s+--- PASS' "$work/$label.log" || true)
  fail=$(grep -cE '^\s+--- FAIL' "$work/$label.log" || true)
  skip=$(grep -cE '^\s+--- SKIP' "$work/$label.log" || true)
  if [[ "$fail" != 0 ]]; then
    grep -E '^\s+(testsuite|issues|helpers|main_test)\.go:[0-9]+:' "$work/$label.log" | grep -v 'unmount ' | head -40 >&2 || true
  fi
  echo "conformance ($label): $pass passed, $fail failed, $skip skipped"
}

if [[ "$mode" == both || "$mode" == per-case ]]; then
  run_suite per-case STARGAZE_SERVE="$serve"
fi

if [[ "$mode" == both || "$mode" == shared ]]; then
  sock="$work/shared/stargaze.sock"
  $serve --root "$work/shared/root" --address "$sock" >"$work/shared-daemon.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 1 100); do [[ -S "$sock" ]] && break; sleep 0.1; done
  [[ -S "$sock" ]] || { echo "conformance: shared daemon did not start" >&2; cat "$work/shared-daemon.log" >&2; exit 1; }
  run_suite shared STARGAZE_SOCKET="$sock"
  kill -INT "$daemon_pid"
  wait "$daemon_pid" || { echo "conformance: shared daemon exited non-zero" >&2; status=1; }
  daemon_pid=""
fi

exit "$status"
