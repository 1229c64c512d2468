"""The one table of deltafleet's container images: where they are pushed, their tags, and the
Dockerfile and `uv.lock` extra each is built from.

Everything that names an image reads it from here: the operator's settings defaults, `make
images` (through `python3 operator/images.py`), and the chart's values.yaml and docs/images.md,
which tests/images/test_image_table.py checks against it. Stdlib only (the operator image has
no torch, and make runs this file before any venv exists).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

REGISTRY = "ghcr.io/deltafleet"
# The release the images carry: the package version in pyproject.toml and the chart's appVersion.
VERSION = "0.1.0"
# The Ray inside the ML image (uv.lock pins it; a test checks both agree): a KubeRay
# RayService must name it (the chart's pool.rayVersion).
RAY_VERSION = "2.60.0"


@dataclass(frozen=True)
class Image:
    name: str  # repository under REGISTRY
    dockerfile: str  # relative to the repository root (the build context)
    extra: str  # the optional-dependencies extra of pyproject.toml installed from uv.lock
    purpose: str

    @property
    def repository(self) -> str:
        return f"{REGISTRY}/{self.name}"

    def ref(self, tag: str = VERSION) -> str:
        return f"{self.repository}:{tag}"


IMAGES: dict[str, Image] = {
    "operator": Image("deltafleet", "images/operator/Dockerfile", "operator",
                      "the operator (`deltafleet operator`, kopf); no torch"),
    "ml": Image("deltafleet-ml", "images/ml/Dockerfile", "serve",
                "compression Jobs (`deltafleet compress`) and Ray Serve replicas (head and workers)"),
}

OPERATOR_IMAGE = IMAGES["operator"].ref()
ML_IMAGE = IMAGES["ml"].ref()


def main(argv: list[str]) -> int:
    """`python3 operator/images.py`: the table as JSON; `... ref KIND`: one image reference."""
    if argv[:1] == ["ref"] and len(argv) == 2 and argv[1] in IMAGES:
        print(IMAGES[argv[1]].ref())
        return 0
    if argv:
        print(f"usage: images.py [ref {'|'.join(IMAGES)}]", file=sys.stderr)
        return 2
    table = {k: {**asdict(v), "repository": v.repository, "ref": v.ref()} for k, v in IMAGES.items()}
    print(json.dumps({"registry": REGISTRY, "version": VERSION, "ray_version": RAY_VERSION, "images": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
