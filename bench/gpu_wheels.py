"""`make gpu-wheels`: the wheels the GPU machine lacks, into `.whl/`, for an offline `gpu_check`.

The GPU machine lent to this project has no network. Its `python3` (3.12) already holds torch,
Triton, transformers 5.17, safetensors, tokenizers, numpy, huggingface_hub, pytest,
pytest-timeout, typer, httpx, prometheus-client, pyyaml (../shared/…/KINDS.md lists them). What
the check imports beyond that: pydantic (and its own dependencies) and transformers 5.24 (the
`cache=` keyword; 5.17 fails in compress) with the regex it needs. Versions come from uv.lock,
so the GPU run uses the code's tested versions; the platform is cp312 manylinux x86_64.

    .venv/bin/python bench/gpu_wheels.py [--python-version 3.12] [--out .whl]

Writes `.whl/*.whl` and `.whl/MANIFEST.json` (name, version, file, bytes, sha256), and fails if
the wheelhouse passes MAX_WHEELHOUSE or the tree plus the wheelhouse passes MAX_TRAVEL (what the
device tool carries is 64 MiB in all). `.whl` is git-ignored: pass it to the device tool with
`carry: [".whl"]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine's image lacks, or holds at another version than uv.lock (KINDS.md).
CARRIED = ["transformers", "regex", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
           "typing-extensions"]
# The GPU machine's own versions of what the check imports (KINDS.md, read 2026-11): the rehearsal
# in make test installs these (on a Python 3.12; numpy 2.5 needs it: a rehearsal on 3.11 takes the lock's).
GPU_MACHINE = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "safetensors": "0.8.0",
               "tokenizers": "0.23.2", "huggingface-hub": "1.33.0", "numpy": "2.5.2"}
GPU_MACHINE_UNPINNED = ["pyyaml", "httpx", "prometheus-client", "pytest", "pytest-timeout", "typer", "tqdm", "packaging",
                        "pip"]
GPU_MACHINE_ABSENT = ["pydantic", "pydantic-core"]  # not in its image, whatever else pulls them in
MAX_WHEELHOUSE = 24 << 20
MAX_TRAVEL = 48 << 20


def locked_versions(lock: Path = ROOT / "uv.lock") -> dict[str, str]:
    data = tomllib.loads(lock.read_text())
    return {p["name"]: p["version"] for p in data["package"] if "version" in p}


def download(pins: dict[str, str], out: Path, python_version: str) -> None:
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
           "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(out),
           *[f"{name}=={version}" for name, version in pins.items()]]
    subprocess.run(cmd, check=True)


def tree_bytes() -> int:
    """Bytes of what the device tool copies besides .whl: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def manifest(out: Path, pins: dict[str, str]) -> dict:
    wheels = sorted(out.glob("*.whl"))
    rows = []
    for w in wheels:
        name = w.name.split("-")[0].replace("_", "-").lower()
        rows.append({"name": name, "version": pins.get(name), "file": w.name, "bytes": w.stat().st_size,
                     "sha256": hashlib.sha256(w.read_bytes()).hexdigest()})
    missing = sorted(set(pins) - {r["name"] for r in rows})
    if missing:
        raise SystemExit(f"gpu-wheels: no wheel downloaded for {', '.join(missing)}")
    return {"wheels": rows, "bytes": sum(r["bytes"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    ap.add_argument("--out", default=str(ROOT / ".whl"))
    args = ap.parse_args(argv)
    versions = locked_versions()
    pins = {name: versions[name] for name in CARRIED}
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    download(pins, out, args.python_version)
    info = manifest(out, pins)
    info["python_version"] = args.python_version
    (out / "MANIFEST.json").write_text(json.dumps(info, indent=1) + "\n")
    travel = tree_bytes() + info["bytes"]
    print(f"gpu-wheels: {len(info['wheels'])} wheels, {info['bytes'] / 2**20:.1f} MiB in {out}; "
          f"tree + wheels {travel / 2**20:.1f} MiB")
    if info["bytes"] > MAX_WHEELHOUSE:
        print(f"gpu-wheels: the wheelhouse passes {MAX_WHEELHOUSE >> 20} MiB", file=sys.stderr)
        return 1
    if travel > MAX_TRAVEL:
        print(f"gpu-wheels: tree + wheels pass {MAX_TRAVEL >> 20} MiB (the device tool carries 64 MiB in all)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
