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
vcluster_dir="$(hack/testbed.sh vcluster-dir)"

start=$SECONDS
cargo test --workspace --lib --bins --tests --examples --locked
cargo test --workspace --doc --locked
echo "[test] all tests passed in $((SECONDS - start)) s"

# Fuzz what strangers send (audit batches, proxy requests) for a bounded time.
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "[test] installing the nightly toolchain (cargo fuzz needs it)"
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "[test] installing cargo-fuzz (about 1 minute)"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
fuzz_secs="${DORMANT_FUZZ_SECONDS:-60}"
for target in audit_decode proxy_request; do
  echo "[test] fuzzing ${target} for ${fuzz_secs} s"
  mkdir -p "fuzz/corpus/${target}"
  cargo +nightly fuzz run "${target}" "fuzz/corpus/${target}" "fuzz/seeds/${target}" -- \
    -max_total_time="$fuzz_secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 5
done

# Test binaries never run the destructors of statics; their clusters must
# die with them (PR_SET_PDEATHSIG). Anything still running is a leak.
# Read from /proc (no pgrep: a fresh machine may lack procps).
sleep 1
leaked=""
for cmdline in /proc/[0-9]*/cmdline; do
  line="$(tr '\0' ' ' <"$cmdline" 2>/dev/null || true)"
  if [[ "$line" == *"$testbed_dir"* || "$line" == *"$vcluster_dir"* ]]; then leaked+="${cmdline%/cmdline}: $line"$'\n'; fi
done
if [[ -n "$leaked" ]]; then
  echo "[test] error: testbed processes outlived the tests:" >&2
  echo "$leaked" >&2
  exit 1
fi
