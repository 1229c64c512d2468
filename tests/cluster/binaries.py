"""Where `make tools` (tests/cluster/build-tools.sh) caches the test cluster's binaries (control
plane, kubectl, helm, the node's, KubeRay's operator), and a clear error when they are not there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-tools.sh"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")  # the skew set
BINARIES = (*CONTROL_PLANE, "helm", "kube-scheduler", "kubelet", "kube-proxy", "bridge", "host-local", "loopback",
            "portmap", "pause", "coredns", "ray-operator")


class ToolsMissing(RuntimeError):
    pass


def bin_dir(skew: bool = False) -> Path:
    """The cache folder for the pinned versions (the script is the one place that computes it);
    skew: the older minor of the skew check (tools/k8s-skew). DELTAFLEET_TOOLS_BIN (and
    DELTAFLEET_SKEW_TOOLS_BIN) point at folders built some other way."""
    override = os.environ.get("DELTAFLEET_SKEW_TOOLS_BIN" if skew else "DELTAFLEET_TOOLS_BIN")
    if override:
        return Path(override)
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), *(["--skew"] if skew else []), "--bin-dir"], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def require_binaries(skew: bool = False) -> Path:
    d = bin_dir(skew)
    missing = [b for b in (CONTROL_PLANE if skew else BINARIES) if not os.access(d / b, os.X_OK)]
    if missing:
        raise ToolsMissing(
            f"test cluster binaries missing in {d}: {', '.join(missing)} — run `make tools` "
            "(builds them from the pinned Go modules in tests/cluster/tools/; the first build "
            "takes tens of minutes, later runs reuse the cache)"
        )
    return d


def kube_version(skew: bool = False) -> str:
    """The pinned Kubernetes release of the test cluster, e.g. "1.37.2" (k8s/go.mod is the one place)."""
    go_mod = BUILD_SCRIPT.parent / "tools" / ("k8s-skew" if skew else "k8s") / "go.mod"
    for line in go_mod.read_text().splitlines():
        words = line.split()
        if words[:1] == ["require"]:  # a one-line require
            words = words[1:]
        if len(words) >= 2 and words[0] == "k8s.io/kubernetes":
            return words[1].lstrip("v")
    raise RuntimeError(f"{go_mod} pins no k8s.io/kubernetes version")


def kube_minor_schema() -> str:
    """The test cluster's minor as kubernetes-validate and `helm template --kube-version` take it ("1.37.0")."""
    major, minor = kube_version().split(".")[:2]
    return f"{major}.{minor}.0"
