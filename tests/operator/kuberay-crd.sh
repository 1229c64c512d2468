#!/usr/bin/env bash
# Prints the path of KubeRay's real RayService CRD (ray-operator v1.5.1), fetched once through
# the Go module proxy (`go mod download`) and cached under ~/.cache/deltafleet (or $DELTAFLEET_CACHE).
set -euo pipefail
version="${KUBERAY_VERSION:-v1.5.1}"
cache_root="${DELTAFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deltafleet}"
out="$cache_root/kuberay-$version/ray.io_rayservices.yaml"
if [[ -s "$out" ]]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "kuberay-crd.sh: 'go' not found on PATH" >&2; exit 1; }
dir="$(GOFLAGS=-mod=mod go mod download -json "github.com/ray-project/kuberay/ray-operator@$version" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
src="$dir/config/crd/bases/ray.io_rayservices.yaml"
[[ -s "$src" ]] || { echo "kuberay-crd.sh: $src missing in the module" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
cp "$src" "$out.tmp" && chmod 644 "$out.tmp" && mv "$out.tmp" "$out"
echo "$out"
