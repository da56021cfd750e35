#!/usr/bin/env bash
# The proxy benchmark, side by side with nginx and haproxy: installs them
# (and wrk and h2load) from Debian's packages if missing, then runs the benchmark.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
hack/testbed.sh install
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if ((${#missing[@]})); then
  echo "[bench] installing ${missing[*]} from Debian's packages"
  sudo_cmd=""; [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
cargo bench --bench proxy
