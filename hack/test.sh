#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (the real
# testbed, built once into ~/.cache/dormant), then runs every test, then
# checks that no testbed process outlived the tests.
#
#   hack/test.sh            (or: make test)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

hack/testbed.sh install
testbed_dir="$(hack/testbed.sh dir)"

start=$SECONDS
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
echo "[test] all tests passed in $((SECONDS - start)) s"

# Test binaries never run the destructors of statics; their clusters must
# die with them (PR_SET_PDEATHSIG). Anything still running is a leak.
sleep 1
if leaked="$(pgrep -af "$testbed_dir" || true)" && [[ -n "$leaked" ]]; then
  echo "[test] error: testbed processes outlived the tests:" >&2
  echo "$leaked" >&2
  exit 1
fi
