"""The test node's own namespaces: one process (our `pause` binary, which reaps orphans) is
pid 1 of a fresh pid, mount and network namespace, and every node component is started inside
them with `nsenter`. So what the node does stays in the run:

- network: its bridge, pod veths, iptables rules (kubelet's, kube-proxy's) and net.* sysctls
  live in its network namespace; one veth pair joins it to the host (the API server and the
  tests reach the node, the pods and the Service IPs through it, by routes that vanish with it).
  Nothing routes further: the node has no default route.
- mounts: /run, /var/lib and /var/log are tmpfs inside the node (containerd's and runc's fixed
  paths under /run, the CNI cache under /var/lib/cni, the kubelet's device-plugin folder and
  /var/log/containers); container rootfs and volume mounts happen there too.
- processes: killing pid 1 kills every process of the node, containers included.

What cannot be confined (cgroup v1 folders, and the kernel.* / vm.* sysctls the kubelet sets)
is recorded before and restored by `Namespaces.stop`."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

# The kubelet sets these at start (pkg/kubelet/cm: setupKernelTunables); they are not per
# namespace, so they are put back at the end.
GLOBAL_SYSCTLS = ("kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory", "kernel/keys/root_maxkeys",
                  "kernel/keys/root_maxbytes")
TMPFS = ("/run", "/var/lib", "/var/log")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


class Namespaces:
    """host_ip/node_ip: the two ends of the veth pair (a /30); routes: CIDRs the host reaches
    through the node (its pod and Service ranges)."""

    def __init__(self, pause: Path, link: str, host_ip: str, node_ip: str, routes: list[str]):
        self.pause, self.link, self.host_ip, self.node_ip, self.routes = pause, link, host_ip, node_ip, routes
        self.holder: subprocess.Popen | None = None
        self.pid1 = 0
        self._sysctls = {k: Path("/proc/sys", k).read_text() for k in GLOBAL_SYSCTLS if Path("/proc/sys", k).exists()}

    def start(self) -> None:
        # --kill-child and PDEATHSIG: if the test process dies without stopping the node,
        # unshare dies with it and takes pid 1, so the whole node, with it.
        self.holder = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc", "--mount", "--propagation",
             "private", "--net", "--", str(self.pause)],
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.pid1 = self._child_of(self.holder.pid)
        for path in TMPFS:
            self.run("mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", path)
        # A sysfs of the node's own network namespace (the bridge plugin and the kubelet read
        # /sys/class/net), with the host's cgroup hierarchies moved back under it.
        self.run("sh", "-ec", "mkdir /run/cgroup; mount --rbind /sys/fs/cgroup /run/cgroup; "
                 "mount -t sysfs sysfs /sys; mount --move /run/cgroup /sys/fs/cgroup; rmdir /run/cgroup")
        self.run("ip", "link", "set", "lo", "up")
        _sh("ip", "link", "add", self.link, "type", "veth", "peer", "name", "eth0", "netns", str(self.pid1))
        _sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.link)
        _sh("ip", "link", "set", self.link, "up")
        self.run("ip", "addr", "add", f"{self.node_ip}/30", "dev", "eth0")
        self.run("ip", "link", "set", "eth0", "up")
        for cidr in self.routes:
            _sh("ip", "route", "add", cidr, "via", self.node_ip)
        # The node routes for its pods (kube-proxy DNATs Service IPs to them); per namespace.
        self.run("sysctl", "-qw", "net.ipv4.ip_forward=1")

    @staticmethod
    def _child_of(pid: int, timeout_s: float = 10) -> int:
        deadline = time.monotonic() + timeout_s
        children = Path(f"/proc/{pid}/task/{pid}/children")
        while time.monotonic() < deadline:
            found = children.read_text().split() if children.exists() else []
            if found:
                return int(found[0])
            time.sleep(0.02)
        raise RuntimeError("unshare started no child: the node's namespaces were not created")

    def enter(self) -> list[str]:
        """The argv prefix that runs a command inside the node."""
        return ["nsenter", f"--target={self.pid1}", "--pid", "--mount", "--net", "--"]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _sh(*self.enter(), *argv, check=check)

    def stop(self) -> None:
        if self.holder is not None:
            # pid 1 gone: the kernel kills every process of the namespace, containers included.
            for pid in (self.pid1, self.holder.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.holder.wait()
            self._wait_gone(self.pid1)
            self.holder = None
        _sh("ip", "link", "del", self.link, check=False)  # gone with the namespace; not if start failed midway
        for key, value in self._sysctls.items():
            path = Path("/proc/sys", key)
            if path.read_text() != value:
                path.write_text(value)

    @staticmethod
    def _wait_gone(pid: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def remove_cgroups(name: str) -> None:
    """The node's cgroup tree (kubelet --cgroup-root, containerd's shims) in every v1 hierarchy
    (and the unified one), deepest first; the node's processes are gone by now."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / name
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, top]:
            for _ in range(50):  # a dying process can hold a cgroup for a moment
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
