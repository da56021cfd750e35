#!/usr/bin/env bash
# The schedule benchmark, side by side with kube-green: builds kube-green
# (pinned in hack/versions.env) from the Go module proxy into a cache folder
# if missing, with its SleepInfo CRD, then runs `cargo bench --bench schedule`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=versions.env
source hack/versions.env
hack/testbed.sh install

dir="${XDG_CACHE_HOME:-$HOME/.cache}/dormant/tools/kube-green-${KUBE_GREEN_VERSION}"
if [[ ! -x "$dir/kube-green" || ! -s "$dir/sleepinfos.yaml" ]]; then
  if ! command -v go >/dev/null 2>&1; then
    echo "[bench] error: Go is not installed; kube-green is built from the Go module proxy. Install Go >= 1.26." >&2
    exit 1
  fi
  echo "[bench] building kube-green v${KUBE_GREEN_VERSION} (~3 min, once)"
  mkdir -p "$dir"
  src="$(cd "$(mktemp -d)" && GOFLAGS=-mod=mod go mod download -json "github.com/kube-green/kube-green@v${KUBE_GREEN_VERSION}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  # Built inside a copy of its module (`go install …@v` asks the proxy for the
  # module's version list, which it refuses for this module).
  work="$(mktemp -d)"
  cp -r "$src/." "$work/"
  chmod -R u+w "$work"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dir/kube-green" ./cmd)
  rm -rf "$work"
  cp "$src/config/crd/bases/kube-green.com_sleepinfos.yaml" "$dir/sleepinfos.yaml"
  chmod u+w "$dir/sleepinfos.yaml"
fi
KUBE_GREEN_DIR="$dir" cargo bench --bench schedule
