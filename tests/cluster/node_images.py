"""Images for the test node's containerd, never from a registry: each is written as an OCI
image archive (one uncompressed layer) and streamed into `ctr images import`.

- the project's images: the root filesystem and OCI config images/build.py unpacked (its
  index.json maps each reference, tag and digest, to that folder); the layer is GNU tar's
  deterministic archive of the folder, hashed in a first pass;
- the node's own: `pause` (the sandbox image the containerd config names), CoreDNS and the
  KubeRay operator, each one static binary from build-tools.sh.

containerd's root (content and unpacked snapshots) is kept across runs under the cache, so an
image is imported once per build; `imported.json` there records which build each name holds."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

PAUSE_REF = "registry.k8s.io/pause:3.10"
COREDNS_REF = "deltafleet.test/coredns:node"
KUBERAY_REF = "deltafleet.test/kuberay-operator:node"
IMAGE_INDEX = Path(os.environ.get("DELTAFLEET_IMAGE_CACHE", Path.home() / ".cache" / "deltafleet" / "images")) / "index.json"
_TAR = ["tar", "--format=gnu", "--sort=name", "--numeric-owner", "--one-file-system", "-cf", "-", "."]


class Layer:
    """One uncompressed layer: its digest and size, and its bytes again (as chunks)."""

    def __init__(self, digest: str, size: int, chunks: Callable[[], Iterator[bytes]]):
        self.digest, self.size, self.chunks = digest, size, chunks


class _Reader:
    """A file-like view of chunks: read(n) returns exactly n bytes until the end (tarfile's
    copy expects that)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks, self._buf = chunks, bytearray()

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def layer_from_dir(rootfs: Path) -> Layer:
    def stream() -> Iterator[bytes]:
        p = subprocess.Popen(_TAR, cwd=rootfs, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while chunk := p.stdout.read(1 << 20):
            yield chunk
        if p.wait() != 0:
            raise RuntimeError(f"tar of {rootfs} failed: {p.stderr.read().decode(errors='replace')[-500:]}")

    h, size = hashlib.sha256(), 0
    for chunk in stream():  # first pass: the digest the manifest must name before the bytes
        h.update(chunk)
        size += len(chunk)

    return Layer(f"sha256:{h.hexdigest()}", size, stream)


def layer_from_files(files: dict[str, Path]) -> Layer:
    """A layer holding each source file at its path in the image (mode 0755, owned by root)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, src in sorted(files.items()):
            data = src.read_bytes()
            parts = name.strip("/").split("/")
            for i in range(1, len(parts)):
                d = tarfile.TarInfo("/".join(parts[:i]))
                d.type, d.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(d)
            info = tarfile.TarInfo(name.strip("/"))
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return Layer(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), lambda: iter([data]))


def _blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    info = tarfile.TarInfo(f"blobs/sha256/{digest[7:]}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return digest, len(data)


def write_archive(out, layer: Layer, config: dict, names: list[str]) -> None:
    """An OCI image layout as a tar stream on `out`: the layer, the image config, its manifest,
    and index.json naming the manifest once per reference (ctr import tags each)."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(f"blobs/sha256/{layer.digest[7:]}")
        info.size = layer.size
        tar.addfile(info, _Reader(layer.chunks()))  # a changed folder ends short: tarfile raises
        image_config = {
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        }
        cfg_digest, cfg_size = _blob(tar, json.dumps(image_config).encode())
        manifest = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.digest, "size": layer.size}],
        }
        m_digest, m_size = _blob(tar, json.dumps(manifest).encode())
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m_digest, "size": m_size,
             "annotations": {"io.containerd.image.name": name}} for name in names]}
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", json.dumps(index).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def wanted(bin_dir: Path, project: bool = True) -> dict[str, tuple[str, Callable[[], Layer], dict]]:
    """build key -> (names, layer maker, OCI config) for every image the node should hold
    (project: also the images images/build.py built)."""
    out: dict = {}
    out[f"pause-{_stamp(bin_dir / 'pause')}"] = ([PAUSE_REF], lambda: layer_from_files({"/pause": bin_dir / "pause"}),
                                                {"Entrypoint": ["/pause"], "User": "65535:65535"})
    out[f"coredns-{_stamp(bin_dir / 'coredns')}"] = (
        [COREDNS_REF], lambda: layer_from_files({"/coredns": bin_dir / "coredns"}),
        {"Entrypoint": ["/coredns"], "User": "65532:65532"})
    out[f"kuberay-{_stamp(bin_dir / 'ray-operator')}"] = (
        [KUBERAY_REF], lambda: layer_from_files({"/manager": bin_dir / "ray-operator"}),
        {"Entrypoint": ["/manager"], "User": "65532:65532"})
    by_folder: dict[str, list[str]] = {}
    index = json.loads(IMAGE_INDEX.read_text()) if IMAGE_INDEX.exists() and project else {}
    for ref, folder in index.items():
        if (Path(folder) / "image.json").exists():
            by_folder.setdefault(folder, []).append(ref)
    for folder, refs in by_folder.items():
        config = json.loads((Path(folder) / "image.json").read_text())["config"]
        out[Path(folder).name] = (sorted(refs), lambda f=folder: layer_from_dir(Path(f) / "rootfs"), config)
    return out


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{int(st.st_mtime)}"


def import_all(ctr: list[str], root: Path, bin_dir: Path, log: Callable[[str], None],
               project: bool = True) -> dict[str, float]:
    """Imports every wanted image the cached containerd root does not hold yet; returns the
    seconds each import took."""
    record = root / "imported.json"
    held = json.loads(record.read_text()) if record.exists() else {}
    took = {}
    for key, (names, make_layer, config) in wanted(bin_dir, project).items():
        if all(held.get(n) == key for n in names):
            continue
        t0 = time.monotonic()
        log(f"importing {', '.join(names)} into the node's containerd (once per build)")
        # The earlier build under these names first, waiting for containerd's garbage collection:
        # an ML image is 6.7 GB of content plus as much unpacked, per build.
        subprocess.run([*ctr, "images", "delete", "--sync", *names], capture_output=True)
        layer = make_layer()
        p = subprocess.Popen([*ctr, "images", "import", "-"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            write_archive(p.stdin, layer, config, names)
        finally:
            p.stdin.close()
        said = p.stdout.read().decode(errors="replace")
        if p.wait() != 0:
            raise RuntimeError(f"ctr images import {names[0]} failed: {said.strip()[-1000:]}")
        held.update({n: key for n in names})
        record.write_text(json.dumps(held, indent=2, sort_keys=True))
        took[names[0]] = round(time.monotonic() - t0, 1)
    return took
