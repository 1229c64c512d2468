"""Build deltafleet's images from images/*/Dockerfile.

    python3 images/build.py [operator|ml ...] [--builder auto|docker|podman|buildah] [--tag TAG]
        `make images`: build with whatever builder the machine has, tagged from the one
        table (operator/images.py); then push with that builder.
    python3 images/build.py --unpack [operator|ml ...]
        what the tests use: no daemon and no registry. The base is bootstrapped from Debian
        packages (mmdebstrap) and passed through the BASE_IMAGE build argument, the Dockerfile
        is built by buildah (vfs storage, chroot isolation), and the image's root filesystem
        and config are unpacked (umoci) into ~/.cache/deltafleet/images/<image>-<input hash>/,
        where the test node imports them from by reference (index.json). A second run with the
        same inputs only looks the folder up.

Both ways first stage build/images/<image>/ (the build context's only content, see
.dockerignore): requirements.txt exported from uv.lock with its hashes, those wheels
(downloaded on the host: registries' certificates are not trusted inside a build) and the
deltafleet wheel. Stdlib only: it runs before the project's venv has anything.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table():
    """operator/images.py, the one table, loaded by path: no venv or package needed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deltafleet_image_table", ROOT / "operator" / "images.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_TABLE = _table()
IMAGES, VERSION = _TABLE.IMAGES, _TABLE.VERSION

CACHE = Path(os.environ.get("DELTAFLEET_IMAGE_CACHE", Path.home() / ".cache" / "deltafleet" / "images"))
INDEX = CACHE / "index.json"  # image reference -> unpacked folder, read by tests/cluster/node_images.py
UV = ROOT / ".uv" / "bin" / "uv"
PIP = [str(ROOT / ".uv" / "bin" / "python"), "-m", "pip"]
# The package folders that go into the deltafleet wheel (pyproject's package-dir).
PACKAGE_DIRS = ("deltafleet", "kernels", "compress", "serving", "operator")
DEBIAN_SUITE, DEBIAN_MIRROR = "bookworm", "http://deb.debian.org/debian"
# What each test base holds: python3 + venv (Debian bookworm's 3.11, the lock's minor) and,
# for the ML image, what its Dockerfile would otherwise fetch with apt (the tests' builds
# have no network) and the headers Triton compiles its launchers against.
BASE_PACKAGES = {
    "operator": ["python3", "python3-venv"],
    "ml": ["python3", "python3-venv", "python3-dev", "bash", "procps", "wget", "grep", "ca-certificates",
           "gcc", "libc6-dev", "passwd"],
}
TOOLS = {"buildah": "buildah", "mmdebstrap": "mmdebstrap", "umoci": "umoci"}  # command -> Debian package


class BuildError(Exception):
    pass


def log(msg: str) -> None:
    print(f"images: {msg}", file=sys.stderr, flush=True)


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    if argv[0] == "buildah":  # its multi-GB temporary blobs: under the cache, removed after each build
        (CACHE / "tmp").mkdir(parents=True, exist_ok=True)
        kw.setdefault("env", {**os.environ, "TMPDIR": str(CACHE / "tmp")})
    try:
        return subprocess.run([str(a) for a in argv], check=True, text=True, **kw)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} not found") from None
    except subprocess.CalledProcessError as e:
        out = (e.stderr or e.stdout or "").strip().splitlines()[-15:]
        raise BuildError(f"{' '.join(map(str, argv[:4]))} ... failed (exit {e.returncode})\n" + "\n".join(out)) from None


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = " ".join(TOOLS.get(t, t) for t in missing)
        raise BuildError(f"{', '.join(missing)} not found: apt-get install {pkgs} (`make test` does it)")


def revision() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


# -- the build context -----------------------------------------------------------------------
def requirements(kind: str) -> str:
    """The extra's exact set from uv.lock, with hashes (pip checks every wheel against them)."""
    if not UV.exists():
        raise BuildError(f"{UV} missing: run `make install` first")
    out = run([UV, "export", "--locked", "--no-emit-project", "--format", "requirements-txt",
               "--extra", IMAGES[kind].extra, "--no-header"], cwd=ROOT, capture_output=True,
              env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"}).stdout
    return out


def source_files() -> list[Path]:
    files = [ROOT / "pyproject.toml", ROOT / "uv.lock", ROOT / ".dockerignore", Path(__file__)]
    for d in PACKAGE_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def input_hash(kind: str, base: str, build_args: dict[str, str]) -> str:
    """Everything the image is made of: its Dockerfile, the base, the build arguments that are
    not labels, the locked set and the project's sources (revision is a label: not hashed)."""
    h = hashlib.sha256()
    h.update(f"{kind}\n{base}\n{sorted(build_args.items())}\n".encode())
    for p in [ROOT / IMAGES[kind].dockerfile, *source_files()]:
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stage(kind: str) -> Path:
    """build/images/<kind>/: requirements.txt, its wheels, dist/deltafleet-*.whl."""
    reqs = requirements(kind)
    out = ROOT / "build" / "images" / kind
    shutil.rmtree(out, ignore_errors=True)
    (out / "dist").mkdir(parents=True)
    (out / "requirements.txt").write_text(reqs)
    # One wheelhouse per locked set, shared by later builds (the ML set is several GB).
    house = CACHE / "wheelhouse" / hashlib.sha256(reqs.encode()).hexdigest()[:16]
    if not (house / ".complete").exists():
        log(f"downloading the {kind} wheels of uv.lock into {house}")
        house.mkdir(parents=True, exist_ok=True)
        run([*PIP, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--require-hashes",
             "--python-version", "3.11",
             "-r", out / "requirements.txt", "-d", house])
        (house / ".complete").touch()
    for whl in house.glob("*.whl"):
        try:
            os.link(whl, out / whl.name)  # same filesystem: no copy of the GBs of CUDA wheels
        except OSError:
            shutil.copy2(whl, out)
    run([UV, "build", "--wheel", "--quiet", "--out-dir", out / "dist", ROOT], cwd=ROOT,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"}, capture_output=True)
    return out


# -- make images: any builder ----------------------------------------------------------------
def pick_builder(wanted: str) -> list[str]:
    candidates = ["docker", "podman", "buildah"] if wanted == "auto" else [wanted]
    for name in candidates:
        if shutil.which(name) is None:
            continue
        if name == "docker" and subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
            continue  # a docker CLI without a daemon
        if name == "buildah":  # chroot isolation works without an OCI runtime's cgroups (CI, containers)
            return ["buildah", "bud", "--isolation", os.environ.get("BUILDAH_ISOLATION", "chroot")]
        return [name, "build"]
    raise BuildError(f"no image builder: install one of {', '.join(candidates)} (Debian: apt-get install buildah)")


def build_args(base: str | None) -> dict[str, str]:
    args = {"VERSION": VERSION, "REVISION": revision()}
    if base:
        args["BASE_IMAGE"] = base
    return args


def build(kind: str, builder: list[str], tag: str, base: str | None, extra: list[str] = ()) -> str:
    stage(kind)
    ref = IMAGES[kind].ref(tag)
    argv = [*builder, *extra, "-f", ROOT / IMAGES[kind].dockerfile, "-t", ref]
    for k, v in build_args(base).items():
        argv += ["--build-arg", f"{k}={v}"]
    log(f"building {ref} with {builder[0]}")
    run([*argv, ROOT])
    return ref


# -- the tests: daemonless, unpacked ---------------------------------------------------------
def buildah(*args) -> list[str]:
    # Our own storage under the cache: vfs works on any filesystem and needs no fuse.
    return ["buildah", "--root", CACHE / "storage", "--runroot", CACHE / "run", "--storage-driver", "vfs", *args]


def debian_base(kind: str) -> str:
    """A Debian base image bootstrapped from packages, in buildah's storage; returns it pinned
    by digest (what the Dockerfile's BASE_IMAGE expects)."""
    recipe = f"{DEBIAN_SUITE} {DEBIAN_MIRROR} minbase {' '.join(BASE_PACKAGES[kind])}"
    name = f"localhost/deltafleet-base-{kind}:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    found = subprocess.run(buildah("images", "--digests", "--format", "{{.Digest}}", name), capture_output=True, text=True)
    if found.returncode != 0 or not found.stdout.strip():
        log(f"bootstrapping {name} with mmdebstrap ({recipe})")
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tar = Path(tmp) / "base.tar"
            run(["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES[kind])}",
                 DEBIAN_SUITE, tar, DEBIAN_MIRROR], capture_output=True)
            ctr = run(buildah("from", "scratch"), capture_output=True).stdout.strip()
            try:
                run(buildah("add", ctr, tar, "/"), capture_output=True)
                run(buildah("commit", "--quiet", ctr, name), capture_output=True)
            finally:
                subprocess.run(buildah("rm", ctr), capture_output=True)
        found = run(buildah("images", "--digests", "--format", "{{.Digest}}", name), capture_output=True)
    return f"{name.rsplit(':', 1)[0]}@{found.stdout.split()[0]}"


@contextlib.contextmanager
def locked():
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one build at a time (make and pytest may both ask)
        yield


def unpacked(kind: str) -> Path:
    """The image built from its Dockerfile and unpacked: <dir>/rootfs and <dir>/image.json
    (OCI config: Entrypoint, Cmd, Env, User, WorkingDir, Labels), plus build.json (timings)."""
    require("buildah", "mmdebstrap", "umoci")
    with locked():
        base = debian_base(kind)
        args = build_args(base)
        key = input_hash(kind, base, {k: v for k, v in args.items() if k != "REVISION"})
        out = CACHE / f"{kind}-{key}"
        if not (out / "build.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            _build_unpacked(kind, base, out)
            for old in CACHE.glob(f"{kind}-*"):  # earlier inputs' builds (the ML one is ~7 GB)
                if old != out:
                    shutil.rmtree(old, ignore_errors=True)
        digest = json.loads((out / "image.json").read_text())["digest"]
        _register({IMAGES[kind].ref(): out, f"{IMAGES[kind].repository}@{digest}": out})
        return out


# Peak disk use of one build (vfs keeps a full copy per stage and per commit), measured.
NEEDS_FREE_GB = {"operator": 3, "ml": 16}


def _build_unpacked(kind: str, base: str, out: Path) -> None:
    free = shutil.disk_usage(CACHE).free / 1e9
    if free < NEEDS_FREE_GB[kind]:
        raise BuildError(f"building the {kind} image needs ~{NEEDS_FREE_GB[kind]} GB free under {CACHE}; {free:.0f} GB are")
    shutil.rmtree(CACHE / "tmp", ignore_errors=True)  # a killed build's leftovers (GBs)
    t0 = time.monotonic()
    stage(kind)
    t_stage = time.monotonic() - t0
    ref = f"localhost/deltafleet-test/{IMAGES[kind].name}:{out.name}"
    argv = buildah("bud", "--quiet", "--isolation", "chroot", "--pull-never", "--layers=false", "--force-rm",
                   "-f", ROOT / IMAGES[kind].dockerfile, "-t", ref)
    for k, v in build_args(base).items():
        argv += ["--build-arg", f"{k}={v}"]
    log(f"building {IMAGES[kind].ref()} from {IMAGES[kind].dockerfile} (buildah, vfs, chroot; base {base})")
    run([*argv, ROOT], capture_output=True)
    t_build = time.monotonic() - t0 - t_stage
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{out.name}-"))
    try:
        config = json.loads(run(buildah("inspect", "--type", "image", ref), capture_output=True).stdout)
        # Uncompressed: nothing is pushed anywhere, and gzip would cost minutes on the ML image.
        run(buildah("push", "--quiet", "--disable-compression", ref, f"oci:{tmp / 'oci'}:image"), capture_output=True)
        subprocess.run(buildah("rmi", ref), capture_output=True)  # before unpacking: one copy less on disk
        run(["umoci", "unpack", "--image", f"{tmp / 'oci'}:image", tmp / "bundle"], capture_output=True)
        (tmp / "bundle" / "rootfs").rename(tmp / "rootfs")
        manifest = json.loads((tmp / "oci" / "index.json").read_text())["manifests"][0]["digest"]
        (tmp / "image.json").write_text(json.dumps({"ref": IMAGES[kind].ref(), "digest": manifest, "base": base,
                                                    "config": config["OCIv1"]["config"]}, indent=2))
        size = sum(p.lstat().st_size for p in (tmp / "rootfs").rglob("*") if p.is_file() and not p.is_symlink())
        shutil.rmtree(tmp / "oci")
        shutil.rmtree(tmp / "bundle")
        (tmp / "build.json").write_text(json.dumps({
            "stage_s": round(t_stage, 1), "build_s": round(t_build, 1),
            "unpack_s": round(time.monotonic() - t0 - t_stage - t_build, 1),
            "rootfs_bytes": size, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2))
        tmp.chmod(0o755)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(buildah("rmi", ref), capture_output=True)  # the unpacked copy is what is kept
        shutil.rmtree(CACHE / "tmp", ignore_errors=True)  # what a failed or killed build left there


def _register(refs: dict[str, Path]) -> None:
    """The image under its tag and its digest (the chart's image.digest), for the test node."""
    index = json.loads(INDEX.read_text()) if INDEX.exists() else {}
    index = {ref: folder for ref, folder in index.items() if Path(folder).exists()}  # pruned builds
    index.update({ref: str(folder) for ref, folder in refs.items()})
    tmp = INDEX.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True))
    tmp.rename(INDEX)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kinds", nargs="*", metavar="IMAGE", help=f"which images ({', '.join(IMAGES)}; default all)")
    ap.add_argument("--builder", default="auto", choices=["auto", "docker", "podman", "buildah"])
    ap.add_argument("--tag", default=VERSION, help="image tag (default: the table's version)")
    ap.add_argument("--base", help="BASE_IMAGE build argument (default: the Dockerfile's digest-pinned one)")
    ap.add_argument("--unpack", action="store_true",
                    help="the tests' daemonless build: Debian base, buildah vfs, unpacked into the cache")
    a = ap.parse_args(argv)
    unknown = set(a.kinds) - set(IMAGES)
    if unknown:
        ap.error(f"unknown image {', '.join(sorted(unknown))}: one of {', '.join(IMAGES)}")
    try:
        for kind in a.kinds or list(IMAGES):
            if a.unpack:
                folder = unpacked(kind)
                print(f"{IMAGES[kind].ref()} {folder}")
            else:
                print(build(kind, pick_builder(a.builder), a.tag, a.base))
    except BuildError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
