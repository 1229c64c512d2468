#!/usr/bin/env bash
# Builds the test cluster from the pinned Go modules in tests/cluster/tools/ into a cache
# outside the repo, only when that cache is missing: the control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler), kubectl and helm, and the node (kubelet, kube-proxy,
# the CNI plugins, a pause binary, CoreDNS) and the KubeRay operator. The cache key is the Kubernetes release plus a hash of the
# go.mod/go.sum files, so changing a pin builds a new set and never reuses a stale one.
#
#   bash tests/cluster/build-tools.sh            build if missing, print the bin dir last
#   bash tests/cluster/build-tools.sh --bin-dir  only print where the binaries belong
#   --skew (first argument)                      the same for the skew check's older minor
#                                                (tools/k8s-skew: no helm, the current one serves)
#
# DELTAFLEET_CACHE overrides the cache root (default ${XDG_CACHE_HOME:-~/.cache}/deltafleet).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="$here/tools"
k8s_dir="$tools/k8s"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy helm
          bridge host-local loopback portmap pause coredns ray-operator)
if [[ "${1:-}" == "--skew" ]]; then
  shift
  k8s_dir="$tools/k8s-skew"
  binaries=(etcd kube-apiserver kube-controller-manager kubectl)
fi

# The version go.mod requires of a module (inside a require block or on a require line).
required() { awk -v m="$1" '$1 == m {print $2; exit} $1 == "require" && $2 == m {print $3; exit}' "$2"; }
k8s_version="$(required k8s.io/kubernetes "$k8s_dir/go.mod")"
helm_version="$(required helm.sh/helm/v4 "$tools/helm/go.mod")"
[[ -n "$k8s_version" && -n "$helm_version" ]] || { echo "build-tools.sh: cannot read the pinned versions from $tools/*/go.mod" >&2; exit 1; }
# This script is part of the key: its build flags (versions stamped in) shape the binaries.
node_pins=()
[[ "$k8s_dir" == "$tools/k8s" ]] && node_pins=("$tools"/{cni,coredns,kuberay}/go.{mod,sum} "$tools"/coredns/main.go "$tools"/cni/pause/main.go)
pins_hash="$(cat "$k8s_dir"/go.mod "$k8s_dir"/go.sum "$k8s_dir"/etcd/main.go \
  "$tools"/helm/go.mod "$tools"/helm/go.sum "${node_pins[@]}" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-10)"
cache_root="${DELTAFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deltafleet}"
bin_dir="$cache_root/k8s-$k8s_version-$pins_hash/bin"

if [[ "${1:-}" == "--bin-dir" ]]; then
  echo "$bin_dir"
  exit 0
fi

missing=()
for b in "${binaries[@]}"; do [[ -x "$bin_dir/$b" ]] || missing+=("$b"); done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "cluster tools: cached in $bin_dir"
  echo "$bin_dir"
  exit 0
fi

command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"  # the official tarball's place
command -v go >/dev/null || { echo "build-tools.sh: 'go' not found on PATH or in /usr/local/go/bin (need Go >= 1.26)" >&2; exit 1; }
echo "cluster tools: building ${missing[*]} ($(go version | cut -d' ' -f3), Kubernetes $k8s_version) into $bin_dir"
echo "cluster tools: a cold build compiles ~2,500 packages; on 2 cores expect tens of minutes"

# Static, path-free, stripped binaries; the same flags every time so the Go build cache is reused.
export CGO_ENABLED=0 GOFLAGS="-trimpath"
start=$SECONDS
mkdir -p "$cache_root"
stage="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

# `go build -v` names each package as it compiles it: count them as progress.
progress() {
  local n=0 line
  while IFS= read -r line; do
    case "$line" in
      *.go:*|go:*|\#*) echo "$line" ;;  # compiler errors and go command messages pass through
      *) n=$((n + 1)); (( n % 100 == 0 )) && echo "  $1: $n packages compiled ($((SECONDS - start))s)" ;;
    esac
  done
  return 0
}

build() {  # build <label> <module dir> <ldflags> <packages...>
  local label="$1" dir="$2" ldflags="$3"; shift 3
  echo "cluster tools: [$label] go build $*"
  (cd "$dir" && go build -v -ldflags="-s -w $ldflags" -o "$stage/" "$@") 2>&1 | progress "$label"
  return "${PIPESTATUS[0]}"
}

# Stamp the release versions the way the upstream Makefiles do: the API server reports its
# version to clients (helm checks charts' kubeVersion against it), kubectl and helm print theirs.
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
# Helm 4 reads the Kubernetes version it lints and renders against from client-go's module
# version in the build info; only its own version needs stamping.
helm_ldflags="-X helm.sh/helm/v4/internal/version.version=$helm_version -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

# One go build per module so the binaries of one Kubernetes version share one compile of their
# packages (the skew set is the control plane only: it runs no node).
k8s_cmds=(kube-apiserver kube-controller-manager kubectl)
[[ " ${binaries[*]} " == *" kubelet "* ]] && k8s_cmds+=(kube-scheduler kubelet kube-proxy)
build k8s "$k8s_dir" "$k8s_ldflags" ./etcd "${k8s_cmds[@]/#/k8s.io/kubernetes/cmd/}"
if [[ " ${binaries[*]} " == *" helm "* ]]; then
  build helm "$tools/helm" "$helm_ldflags" helm.sh/helm/v4/cmd/helm
  cni=github.com/containernetworking/plugins/plugins
  build cni "$tools/cni" "" ./pause $cni/main/bridge $cni/ipam/host-local $cni/main/loopback $cni/meta/portmap
  build coredns "$tools/coredns" "" .
  build kuberay "$tools/kuberay" "" github.com/ray-project/kuberay/ray-operator
  # KubeRay's CRDs and RBAC from the same module, installed by the tests as its chart would.
  kuberay_src="$(cd "$tools/kuberay" && go list -m -f '{{.Dir}}' github.com/ray-project/kuberay/ray-operator)"
  mkdir -p "$stage/kuberay-config"
  cp -r "$kuberay_src/config/crd/bases" "$kuberay_src/config/rbac" "$stage/kuberay-config/"
  chmod -R u+w "$stage/kuberay-config"
fi

for b in "${binaries[@]}"; do
  [[ -x "$stage/$b" ]] || { echo "build-tools.sh: $b was not built (see output above)" >&2; exit 1; }
done
mkdir -p "$bin_dir"
for b in "${binaries[@]}"; do mv -f "$stage/$b" "$bin_dir/$b"; done
[[ -d "$stage/kuberay-config" ]] && rm -rf "$bin_dir/kuberay-config" && mv "$stage/kuberay-config" "$bin_dir/"
echo "cluster tools: built in $((SECONDS - start))s"
"$bin_dir/kube-apiserver" --version
"$bin_dir/kubectl" version --client
[[ -x "$bin_dir/helm" ]] && "$bin_dir/helm" version --short
echo "$bin_dir"
