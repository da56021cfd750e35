#!/usr/bin/env bash
# Soak: SIGKILL the agent at random moments of sleep and wake, many times,
# and check after each kill that no workload lost its replica count, no
# GitOps mark or KEDA pause lost its record, and the vcluster slept and
# woken in the same rounds has its control plane at 1 or at 0 recorded.
#   hack/soak-sigkill.sh [ROUNDS]   (default 500)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
hack/testbed.sh install
DORMANT_SIGKILL_ROUNDS="${1:-500}" cargo test --test engine sigkill -- --nocapture
