#!/usr/bin/env bash
# The README's test command: sets the machine up (system packages, /dev/fuse, npm deps, build), then runs
# every test: unit tests, then the end-to-end tests against real containerd, runc, registry and FUSE.
# Needs root. Works on a fresh clone of a fresh Debian 12 or 13 machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash script/setup.sh --test </dev/null
npm test </dev/null
