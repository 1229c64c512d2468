"""What a real node could leave behind on the host, as comparable text: network links,
addresses and routes, the firewall, mounts, cgroup folders, the sysctls the kubelet and the
bridge plugin touch, the fixed paths containerd, CNI and the kubelet write, and processes of
the node's binaries. tests/cluster/test_node.py compares it before and after a cluster."""

from __future__ import annotations

import subprocess
from pathlib import Path

FIXED_PATHS = ("/run/containerd", "/run/netns", "/var/lib/cni", "/var/lib/kubelet", "/var/log/containers",
               "/var/log/pods", "/opt/containerd", "/etc/cni", "/opt/cni")
SYSCTLS = ("net/ipv4/ip_forward", "kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/bridge/bridge-nf-call-iptables")
NODE_PROCESSES = ("containerd", "containerd-shim", "kubelet", "kube-proxy", "kube-scheduler", "coredns",
                  "ray-operator", "pause", "runc")


def _out(*argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else f"<{argv[0]} failed: {r.stderr.strip()}>"


def snapshot() -> dict[str, str]:
    cgroups = sorted(str(p) for h in Path("/sys/fs/cgroup").iterdir() if h.is_dir()
                     for p in h.iterdir() if p.is_dir() and not p.name.startswith(("system.slice", "user.slice")))
    processes = sorted({Path(p, "comm").read_text().strip() for p in Path("/proc").glob("[0-9]*")
                        if _readable(p / "comm")} & set(NODE_PROCESSES))
    return {
        "links": _out("ip", "-o", "link", "show"),
        "addresses": _out("ip", "-o", "addr", "show"),
        "routes": _out("ip", "route", "show", "table", "all"),
        "firewall": _out("nft", "list", "ruleset"),
        "mounts": "\n".join(sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())),
        "cgroups": "\n".join(cgroups),
        "sysctls": "\n".join(f"{k}={Path('/proc/sys', k).read_text().strip()}" for k in SYSCTLS
                             if Path("/proc/sys", k).exists()),
        "paths": "\n".join(p for p in FIXED_PATHS if Path(p).exists()),
        "processes": "\n".join(processes),
    }


def _readable(p: Path) -> bool:
    try:
        p.read_text()
        return True
    except OSError:
        return False


def differences(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {k: (before[k], after[k]) for k in before if before[k] != after[k]}
