"""Run one container from its unpacked image, as a kubelet + runtime would: the pod runner
starts `python sandbox.py SPEC.json` as root; this process

1. enters a private mount namespace and mounts a tmpfs on STAGE (only this process and its
   children see it; the host keeps an empty folder);
2. mounts the image's rootfs there as the lower layer of an overlay whose upper layer is that
   tmpfs: the cached rootfs is never written, a writable root's writes vanish with the
   container, and mount points the image lacks are created in the upper layer;
3. bind-mounts every volume source under STAGE, so the container's user reaches it whatever
   the permissions of the folders above it (the runner's workdir is root's);
4. drops to the container's uid, gid and supplementary groups and executes bwrap, which, as
   that unprivileged user, binds the staged root (read-only when readOnlyRootFilesystem says
   so) and the volumes at their mount paths, with fresh pid/ipc/uts namespaces, /proc and
   /dev, and only the container's environment. The host network is shared (the API server
   is on loopback).

SPEC: {"rootfs", "read_only", "uid", "gid", "groups", "hostname", "cwd", "argv", "env",
       "mounts": [{"source", "target", "read_only"}]}.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

STAGE = Path("/run/deltafleet-pods")
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: Path, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(str(target)), enc(fstype), flags, enc(data)), f"mount {source} on {target}")


def mount_point(path: Path, is_file: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_file:
        path.touch(exist_ok=True)
    else:
        path.mkdir(exist_ok=True)


def inside(root: Path, target: str) -> Path:
    """target (absolute in the container) under root, its symlinks resolved inside root
    (/var/run -> /run, as in Debian), so a mount point is made where the container sees it."""
    here = root
    parts = [p for p in target.split("/") if p]
    hops = 0
    while parts:
        nxt = here / parts.pop(0)
        if nxt.is_symlink() and hops < 40:
            hops += 1
            link = os.readlink(nxt)
            parts = [p for p in link.split("/") if p] + parts
            here = root if link.startswith("/") else here
            continue
        here = nxt
    return here


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, Path("/"), None, MS_REC | MS_PRIVATE)
    STAGE.mkdir(mode=0o755, exist_ok=True)
    mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for d in ("upper", "work", "root", "volumes"):
        (STAGE / d).mkdir(mode=0o755)
    mount("overlay", STAGE / "root", "overlay", 0,
          f"lowerdir={spec['rootfs']},upperdir={STAGE / 'upper'},workdir={STAGE / 'work'}")
    inner = ["bwrap", "--unshare-user", "--uid", str(spec["uid"]), "--gid", str(spec["gid"]),
             "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", spec["hostname"],
             "--die-with-parent", "--ro-bind" if spec["read_only"] else "--bind", str(STAGE / "root"), "/",
             "--proc", "/proc", "--dev", "/dev"]
    # Parents before children: a volume mounted inside another one's path comes after it.
    for i, m in enumerate(sorted(spec["mounts"], key=lambda m: m["target"].rstrip("/").count("/"))):
        src = Path(m["source"])
        staged = STAGE / "volumes" / str(i)
        mount_point(staged, src.is_file())
        mount(str(src), staged, None, MS_BIND | MS_REC)
        target = m["target"]
        if not target.startswith("/dev/"):  # bwrap's own /dev is a tmpfs it can write
            # Made as root in the overlay's upper layer, at the path the container sees after
            # its symlinks (bwrap, unprivileged, can neither create it nor follow /var/run).
            point = inside(STAGE / "root", target)
            mount_point(point, src.is_file())
            target = "/" + str(point.relative_to(STAGE / "root"))
        inner += ["--ro-bind" if m["read_only"] else "--bind", str(staged), target]
    inner += ["--clearenv"]
    for k, v in spec["env"].items():
        inner += ["--setenv", k, v]
    inner += ["--chdir", spec["cwd"], "--", *spec["argv"]]
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])  # from here on nothing is root: bwrap runs unprivileged
    os.execvp("bwrap", inner)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except OSError as e:
        print(f"pod runner sandbox: {e}", file=sys.stderr)
        sys.exit(128)
