#!/usr/bin/env bash
# Installs dormant's real testbed: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok and helm, built with this machine's Go from the
# Go module proxy into a cache folder outside the repository.
#
#   hack/testbed.sh install      build whatever is missing (idempotent)
#   hack/testbed.sh dir          print the folder the binaries live in
#   hack/testbed.sh check        exit 1 and list what is missing
#   hack/testbed.sh promtool     print the path of promtool (installed by install)
#   hack/testbed.sh keda-crd     print the folder of KEDA's ScaledObject and ScaledJob CRDs (installed by install)
#   hack/testbed.sh install-vcluster  build only the real vcluster, kine and its chart
#   hack/testbed.sh vcluster-dir print the folder of the real vcluster: vcluster, kine, chart/ (installed by install)
#
# The folder is $DORMANT_TESTBED_DIR, or ~/.cache/dormant/testbed/<versions>.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

stamp="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"
dir="${DORMANT_TESTBED_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dormant/testbed/$stamp}"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)
# Tools beside the cluster, versioned on their own (tests parse dashboard
# PromQL with the real parser).
tools_dir="${DORMANT_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dormant/tools/prometheus-${PROMETHEUS_VERSION}}"
keda_crds="${XDG_CACHE_HOME:-$HOME/.cache}/dormant/tools/keda-${KEDA_VERSION}/crds"
keda_kinds=(scaledobjects scaledjobs)
# The real loft-sh/vcluster (docs/real-vcluster.md): its binary, kine (its
# embedded sqlite store) and its Helm chart, from the module.
vcluster_dir="${DORMANT_VCLUSTER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dormant/tools/vcluster-${VCLUSTER_VERSION}_kine-${KINE_VERSION}}"

log() { printf '[testbed] %s\n' "$*" >&2; }

missing() {
  local b out=()
  for b in "${bins[@]}"; do [[ -x "$dir/$b" ]] || out+=("$b"); done
  echo "${out[@]:-}"
}

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    log "error: Go is not installed (or not on PATH). The testbed is built from the Go module proxy;"
    log "       install Go >= 1.26 from https://go.dev/dl/ and run: hack/testbed.sh install"
    exit 1
  fi
}

# k8s.io/kubernetes is not meant to be required as a module: its go.mod replaces
# the k8s.io/* staging modules with local folders. A throw-away module that
# requires it and replaces each staging module with its published v0.X.Y twin
# builds its commands from the module proxy.
build_kubernetes() {
  local work minor staging m pkgs ld
  work="$(mktemp -d)"
  minor="${KUBERNETES_VERSION#*.}"; minor="${minor%%.*}"
  staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
    cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
    cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
    kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
    mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller streaming)
  {
    echo "module dormant.dev/testbed-k8s"
    echo
    echo "go 1.26.0"
    echo
    echo "godebug default=go1.26"
    echo
    echo "require k8s.io/kubernetes v${KUBERNETES_VERSION}"
    echo
    for m in "${staging[@]}"; do echo "replace k8s.io/$m => k8s.io/$m v0.${KUBERNETES_VERSION#*.}"; done
  } >"$work/go.mod"
  cat >"$work/tools.go" <<GO
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  log "resolving k8s.io/kubernetes v${KUBERNETES_VERSION} modules (go mod tidy)"
  (cd "$work" && GOFLAGS=-mod=mod go mod tidy)
  ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=v${KUBERNETES_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
  done
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    if [[ -x "$dir/$b" ]]; then continue; fi
    log "building $b v${KUBERNETES_VERSION} (cold: the apiserver takes ~4 min on 2 cores, the rest ~1.5 min together)"
    (cd "$work" && CGO_ENABLED=0 go build -trimpath -tags selinux,notest -ldflags "$ld" \
      -o "$dir/$b.tmp" "k8s.io/kubernetes/cmd/$b")
    mv "$dir/$b.tmp" "$dir/$b"
  done
  rm -rf "$work"
}

build_etcd() {
  local work
  work="$(mktemp -d)"
  printf 'module dormant.dev/testbed-etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_VERSION" >"$work/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$work/tools.go"
  log "building etcd v${ETCD_VERSION} (~1 min)"
  (cd "$work" && GOFLAGS=-mod=mod go mod tidy && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" \
    -o "$dir/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$dir/etcd.tmp" "$dir/etcd"
  rm -rf "$work"
}

go_install() { # name module version note
  local gobin
  gobin="$(mktemp -d)"
  log "building $1 v$3 ($4)"
  GOBIN="$gobin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$2@v$3"
  mv "$gobin/$1" "$dir/$1"
  rm -rf "$gobin"
}

install_tools() {
  if [[ -x "$tools_dir/promtool" ]]; then return 0; fi
  need_go
  mkdir -p "$tools_dir"
  local gobin
  gobin="$(mktemp -d)"
  log "building promtool v${PROMETHEUS_VERSION} (~3.5 min, once)"
  GOBIN="$gobin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@v${PROMETHEUS_VERSION}"
  mv "$gobin/promtool" "$tools_dir/promtool"
  rm -rf "$gobin"
}

# KEDA's ScaledObject and ScaledJob CRDs exactly as KEDA ships them (from its
# Go module; seconds).
keda_crds_present() {
  local k
  for k in "${keda_kinds[@]}"; do [[ -s "$keda_crds/keda.sh_$k.yaml" ]] || return 1; done
}

install_keda_crd() {
  if keda_crds_present; then return 0; fi
  need_go
  local src k
  log "fetching KEDA v${KEDA_VERSION}'s ScaledObject and ScaledJob CRDs from the Go module proxy"
  src="$(cd "$(mktemp -d)" && GOFLAGS=-mod=mod go mod download -json "github.com/kedacore/keda/v2@v${KEDA_VERSION}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  mkdir -p "$keda_crds"
  for k in "${keda_kinds[@]}"; do
    if [[ ! -f "$src/config/crd/bases/keda.sh_$k.yaml" ]]; then
      log "error: github.com/kedacore/keda/v2@v${KEDA_VERSION} has no config/crd/bases/keda.sh_$k.yaml"
      exit 1
    fi
    cp "$src/config/crd/bases/keda.sh_$k.yaml" "$keda_crds/keda.sh_$k.yaml.tmp"
    chmod u+w "$keda_crds/keda.sh_$k.yaml.tmp"
    mv "$keda_crds/keda.sh_$k.yaml.tmp" "$keda_crds/keda.sh_$k.yaml"
  done
}

vcluster_present() {
  [[ -x "$vcluster_dir/vcluster" && -x "$vcluster_dir/kine" && -s "$vcluster_dir/chart/Chart.yaml" ]]
}

# loft-sh/vcluster's go.mod has no replace directives, but `go install
# module@version` refuses a module whose dependencies need resolving against
# a newer Go; a throw-away module that imports cmd/vcluster resolves them
# (go mod tidy) and builds it. Its chart/ comes from the same module.
# kine needs CGO for sqlite (mattn/go-sqlite3).
install_vcluster() {
  if vcluster_present; then return 0; fi
  need_go
  local work start src
  mkdir -p "$vcluster_dir"
  work="$(mktemp -d)"
  printf 'module dormant.dev/testbed-vcluster\n\ngo 1.26.0\n\nrequire github.com/loft-sh/vcluster v%s\n' "$VCLUSTER_VERSION" >"$work/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/loft-sh/vcluster/cmd/vcluster"\n' >"$work/tools.go"
  if [[ ! -x "$vcluster_dir/vcluster" ]]; then
    start=$SECONDS
    log "building the real vcluster: github.com/loft-sh/vcluster/cmd/vcluster v${VCLUSTER_VERSION} (cold: 5-15 min on 2 cores, a 110 MB binary; once)"
    (cd "$work" && GOFLAGS=-mod=mod go mod tidy && CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/loft-sh/vcluster/pkg/telemetry.SyncerVersion=${VCLUSTER_VERSION}" \
      -o "$vcluster_dir/vcluster.tmp" github.com/loft-sh/vcluster/cmd/vcluster)
    mv "$vcluster_dir/vcluster.tmp" "$vcluster_dir/vcluster"
    log "built vcluster in $((SECONDS - start)) s"
  fi
  if [[ ! -x "$vcluster_dir/kine" ]]; then
    start=$SECONDS
    log "building kine v${KINE_VERSION} (vcluster's embedded sqlite store; CGO, 1.5-4 min; once)"
    local gobin
    gobin="$(mktemp -d)"
    GOBIN="$gobin" CGO_ENABLED=1 go install -trimpath -ldflags "-s -w" "github.com/k3s-io/kine@v${KINE_VERSION}"
    mv "$gobin/kine" "$vcluster_dir/kine"
    rm -rf "$gobin"
    log "built kine in $((SECONDS - start)) s"
  fi
  if [[ ! -s "$vcluster_dir/chart/Chart.yaml" ]]; then
    log "copying vcluster v${VCLUSTER_VERSION}'s Helm chart from its module"
    src="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "github.com/loft-sh/vcluster@v${VCLUSTER_VERSION}" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    rm -rf "$vcluster_dir/chart.tmp"
    cp -r "$src/chart" "$vcluster_dir/chart.tmp"
    chmod -R u+w "$vcluster_dir/chart.tmp"
    # The release pipeline stamps the chart's version (the module says
    # 0.0.1); the image tag and the chart label come from it.
    sed -i "s/^version: .*/version: ${VCLUSTER_VERSION}/" "$vcluster_dir/chart.tmp/Chart.yaml"
    rm -rf "$vcluster_dir/chart"
    mv "$vcluster_dir/chart.tmp" "$vcluster_dir/chart"
  fi
  rm -rf "$work"
}

# kwok's stage files ship in its module; the fixture reads them from here.
# Copied into a temporary folder and moved in whole, so that a failed copy
# leaves nothing that looks installed.
stages_present() { [[ -n "$(ls -A "$dir/kwok-stages" 2>/dev/null)" ]]; }

install_kwok_stages() {
  if stages_present; then return 0; fi
  need_go
  local kwok_src tmp
  kwok_src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@v${KWOK_VERSION}"
  if [[ ! -d "$kwok_src" ]]; then (cd "$(mktemp -d)" && GOFLAGS=-mod=mod go mod download -x "sigs.k8s.io/kwok@v${KWOK_VERSION}" >/dev/null 2>&1 || true); fi
  mkdir -p "$dir"
  tmp="$(mktemp -d "$dir/.kwok-stages.XXXXXX")"
  cp -r "$kwok_src/kustomize/stage/." "$tmp/"
  chmod -R u+w "$tmp"
  rm -rf "$dir/kwok-stages"
  mv "$tmp" "$dir/kwok-stages"
}

install() {
  local todo start
  install_tools
  install_keda_crd
  install_vcluster
  todo="$(missing)"
  if [[ -z "$todo" ]]; then
    install_kwok_stages
    log "all testbed binaries present in $dir"
    return 0
  fi
  need_go
  mkdir -p "$dir"
  start=$SECONDS
  log "installing into $dir: $todo"
  log "cold install takes about 9 minutes on 2 cores (the real vcluster another 5-15); later runs reuse the binaries"
  case " $todo " in *" kube-apiserver "*|*" kube-controller-manager "*|*" kube-scheduler "*|*" kubectl "*) build_kubernetes ;; esac
  [[ -x "$dir/etcd" ]] || build_etcd
  [[ -x "$dir/kwok" ]] || go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION" "~1.5 min"
  [[ -x "$dir/helm" ]] || go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "~1 min"
  install_kwok_stages
  log "done in $((SECONDS - start)) s"
  todo="$(missing)"
  if [[ -n "$todo" ]]; then log "error: still missing: $todo"; exit 1; fi
}

case "${1:-install}" in
  install) install ;;
  dir) echo "$dir" ;;
  promtool)
    [[ -x "$tools_dir/promtool" ]] || { log "promtool missing in $tools_dir (run: hack/testbed.sh install)"; exit 1; }
    echo "$tools_dir/promtool"
    ;;
  keda-crd)
    keda_crds_present || { log "KEDA's CRDs missing in $keda_crds (run: hack/testbed.sh install)"; exit 1; }
    echo "$keda_crds"
    ;;
  install-vcluster) install_vcluster ;;
  vcluster-dir)
    vcluster_present || { log "the real vcluster is missing in $vcluster_dir (run: hack/testbed.sh install)"; exit 1; }
    echo "$vcluster_dir"
    ;;
  check)
    todo="$(missing)"
    if [[ -n "$todo" ]]; then log "missing in $dir: $todo (run: hack/testbed.sh install)"; exit 1; fi
    stages_present || { log "missing kwok stage files (run: hack/testbed.sh install)"; exit 1; }
    ;;
  *) echo "usage: $0 install|install-vcluster|dir|check|promtool|keda-crd|vcluster-dir" >&2; exit 2 ;;
esac
