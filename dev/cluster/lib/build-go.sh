#!/usr/bin/env bash
# Build all Go binaries into $CACHE_DIR/bin-<pins>/ from the Go module proxy.
# Usage: build-go.sh   (env from ./cluster: CACHE_DIR, pins from versions.env)
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../versions.env
. "$HERE/versions.env"
CACHE_DIR=${CRUCIBLE_CLUSTER_CACHE:-/var/cache/crucible-cluster}
export PATH=/usr/local/go/bin:$PATH
export GOMODCACHE=$CACHE_DIR/gomodcache GOCACHE=$CACHE_DIR/gocache
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
export GOMAXPROCS=${GOMAXPROCS:-$(nproc)}
BIN=$CACHE_DIR/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION-kr-$KUBE_ROUTER_VERSION-crictl-$CRICTL_VERSION
LDFLAGS="-s -w"
# Version stamping, as Kubernetes' own hack/lib/version.sh does (otherwise the
# binaries report v0.0.0-master and version-gated clients such as helm break).
k8s_minor=$(echo "$K8S_VERSION" | cut -d. -f2)
K8S_LDFLAGS="$LDFLAGS"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LDFLAGS="$K8S_LDFLAGS -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$BIN" "$CACHE_DIR/src"

log() { echo "[build-go $(date +%T)] $*" >&2; }

# CoreDNS and local-path-provisioner go into images (`cluster` packs each binary
# alone), not onto the host: own directories, so that a new pin of either leaves the
# Kubernetes binaries where they are.
COREDNS_BIN=$CACHE_DIR/bin/coredns-$COREDNS_VERSION
LOCAL_PATH_BIN=$CACHE_DIR/bin/local-path-provisioner-$LOCAL_PATH_VERSION

need=0
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl helm kube-router crictl; do
  [ -x "$BIN/$b" ] || need=1
done
[ -x "$COREDNS_BIN/coredns" ] || need=1
[ -x "$LOCAL_PATH_BIN/local-path-provisioner" ] || need=1
if [ $need = 0 ]; then echo "$BIN"; exit 0; fi

# --- wrapper module for k8s.io/kubernetes (+ etcd server, helm) -------------
W=$CACHE_DIR/src/k8s-wrapper-$K8S_VERSION
mkdir -p "$W"
cd "$W"
minor=${K8S_VERSION#v1.}   # e.g. 34.4
staging_ver=v0.$minor
if [ ! -f go.mod ] || ! grep -q "k8s.io/kubernetes $K8S_VERSION" go.mod || ! grep -q "helm.sh/helm/v3 $HELM_VERSION" go.mod; then
  log "generating wrapper go.mod for k8s.io/kubernetes@$K8S_VERSION"
  rm -f go.mod go.sum
  modfile=$(cd /tmp && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  [ -f "$modfile" ] || { log "cannot download k8s.io/kubernetes@$K8S_VERSION"; exit 1; }
  # Staging modules: every "k8s.io/X v0.0.0" requirement of the tag's go.mod.
  staging=$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$modfile" | sort -u)
  [ -n "$staging" ] || { log "no staging modules found in $modfile"; exit 1; }
  {
    echo "module crucible.local/k8s-wrapper"
    echo
    echo "go $(awk '$1=="go"{print $2; exit}' "$modfile")"
    echo
    echo "require ("
    echo "	k8s.io/kubernetes $K8S_VERSION"
    echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    echo "	helm.sh/helm/v3 $HELM_VERSION"
    echo ")"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $staging_ver"; done
    echo ")"
  } > go.mod
  echo "package wrapper" > wrapper.go
  log "$(echo "$staging" | wc -l) staging modules pinned to $staging_ver"
fi

build() { # build <out> <pkg> [ldflags]
  local out=$1 pkg=$2 ldflags=${3:-$LDFLAGS}
  [ -x "$BIN/$out" ] && return 0
  log "go build $pkg"
  go build -trimpath -ldflags="$ldflags" -o "$BIN/$out.tmp" "$pkg"
  mv "$BIN/$out.tmp" "$BIN/$out"
}
for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  build "$c" "k8s.io/kubernetes/cmd/$c" "$K8S_LDFLAGS"
done
build etcd go.etcd.io/etcd/server/v3
build helm helm.sh/helm/v3/cmd/helm "$LDFLAGS -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"

# --- kube-router (own module, own dependency versions) ----------------------
KR=$CACHE_DIR/src/kube-router-$KUBE_ROUTER_VERSION
if [ ! -x "$BIN/kube-router" ]; then
  mkdir -p "$KR"; cd "$KR"
  if [ ! -f go.mod ]; then
    printf 'module crucible.local/kube-router-wrapper\n\ngo 1.22\n\nrequire github.com/cloudnativelabs/kube-router/v2 %s\n' "$KUBE_ROUTER_VERSION" > go.mod
    echo "package wrapper" > wrapper.go
  fi
  build kube-router github.com/cloudnativelabs/kube-router/v2/cmd/kube-router \
    "$LDFLAGS -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION"
fi

# --- crictl (own module: keeps the wrapper's dependency graph unchanged) -----
CR=$CACHE_DIR/src/cri-tools-$CRICTL_VERSION
if [ ! -x "$BIN/crictl" ]; then
  mkdir -p "$CR"; cd "$CR"
  if [ ! -f go.mod ]; then
    printf 'module crucible.local/cri-tools-wrapper\n\ngo 1.24\n\nrequire sigs.k8s.io/cri-tools %s\n' "$CRICTL_VERSION" > go.mod
    echo "package wrapper" > wrapper.go
  fi
  build crictl sigs.k8s.io/cri-tools/cmd/crictl "$LDFLAGS -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"
fi
# --- CoreDNS (own module; a main package with only the plugins a cluster's DNS
# uses, instead of upstream's plugin.cfg with every cloud provider's SDK; forward
# and loop are there for an upstream, which addons/coredns.yaml does not set) ----
CD=$CACHE_DIR/src/coredns-$COREDNS_VERSION
if [ ! -x "$COREDNS_BIN/coredns" ]; then
  mkdir -p "$CD" "$COREDNS_BIN"; cd "$CD"
  if [ ! -f go.mod ]; then
    printf 'module crucible.local/coredns-wrapper\n\ngo 1.24\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" > go.mod
    cat > main.go <<'GO'
// CoreDNS with the plugins of a Kubernetes cluster's DNS (see dev/cluster/README.md).
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func main() { coremain.Run() }
GO
  fi
  BIN=$COREDNS_BIN build coredns .
fi

# --- local-path-provisioner (own module; also goes into an image) -------------
LP=$CACHE_DIR/src/local-path-provisioner-$LOCAL_PATH_VERSION
if [ ! -x "$LOCAL_PATH_BIN/local-path-provisioner" ]; then
  mkdir -p "$LP" "$LOCAL_PATH_BIN"; cd "$LP"
  if [ ! -f go.mod ]; then
    printf 'module crucible.local/local-path-wrapper\n\ngo 1.23\n\nrequire github.com/rancher/local-path-provisioner %s\n' "$LOCAL_PATH_VERSION" > go.mod
    echo "package wrapper" > wrapper.go
  fi
  BIN=$LOCAL_PATH_BIN build local-path-provisioner github.com/rancher/local-path-provisioner
fi
echo "$BIN"
