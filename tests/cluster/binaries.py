"""Where `make tools` (tests/cluster/build-tools.sh) caches etcd, kube-apiserver,
kube-controller-manager, kubectl and helm, and a clear error when they are not there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parent / "build-tools.sh"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")


class ToolsMissing(RuntimeError):
    pass


def bin_dir() -> Path:
    """The cache folder for the pinned versions (the script is the one place that computes it).
    DELTAFLEET_TOOLS_BIN points at a folder built some other way."""
    if os.environ.get("DELTAFLEET_TOOLS_BIN"):
        return Path(os.environ["DELTAFLEET_TOOLS_BIN"])
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--bin-dir"], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def require_binaries() -> Path:
    d = bin_dir()
    missing = [b for b in BINARIES if not os.access(d / b, os.X_OK)]
    if missing:
        raise ToolsMissing(
            f"test cluster binaries missing in {d}: {', '.join(missing)} — run `make tools` "
            "(builds them from the pinned Go modules in tests/cluster/tools/; the first build "
            "takes tens of minutes, later runs reuse the cache)"
        )
    return d
