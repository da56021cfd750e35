#!/usr/bin/env bash
# The app-traffic benchmark, side by side with KEDA's HTTP add-on: builds its
# interceptor (pinned in hack/versions.env) from the Go module proxy into a
# cache folder if missing, with its HTTPScaledObject CRD, installs wrk if
# missing, then runs `cargo bench --bench app_traffic`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=versions.env
source hack/versions.env
hack/testbed.sh install

dir="${XDG_CACHE_HOME:-$HOME/.cache}/dormant/tools/keda-http-add-on-${KEDA_HTTP_ADDON_VERSION}"
if [[ ! -x "$dir/interceptor" || ! -s "$dir/httpscaledobjects.yaml" ]]; then
  if ! command -v go >/dev/null 2>&1; then
    echo "[bench] error: Go is not installed; the interceptor is built from the Go module proxy. Install Go >= 1.26." >&2
    exit 1
  fi
  echo "[bench] building KEDA's HTTP add-on interceptor v${KEDA_HTTP_ADDON_VERSION} (~2 min, once)"
  mkdir -p "$dir"
  module="github.com/kedacore/http-add-on"
  src="$(cd "$(mktemp -d)" && GOFLAGS=-mod=mod go mod download -json "$module@v${KEDA_HTTP_ADDON_VERSION}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  # Its go.mod pins k8s.io with replace directives, which only apply in the
  # main module: a wrapper module that requires it carries the same block.
  work="$(mktemp -d)"
  {
    echo "module dormant.dev/bench/keda-http-add-on"
    echo
    echo "go 1.26.0"
    echo
    echo "require $module v${KEDA_HTTP_ADDON_VERSION}"
    echo
    sed -n '/^replace (/,/^)/p' "$src/go.mod"
  } >"$work/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s/interceptor"\n' "$module" >"$work/tools.go"
  (cd "$work" && GOFLAGS=-mod=mod go mod tidy \
    && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dir/interceptor" "$module/interceptor")
  rm -rf "$work"
  cp "$src/config/crd/bases/http.keda.sh_httpscaledobjects.yaml" "$dir/httpscaledobjects.yaml"
  chmod u+w "$dir/httpscaledobjects.yaml"
fi
if ! command -v wrk >/dev/null 2>&1; then
  echo "[bench] installing wrk from Debian's packages"
  sudo_cmd=""; [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq wrk
fi
KEDA_HTTP_ADDON_DIR="$dir" cargo bench --bench app_traffic
