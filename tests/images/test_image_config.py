"""What the built images declare: OCI labels, a numeric non-root user, the entrypoint, and for
the operator image no torch and a small size."""

from __future__ import annotations

import re

from deltafleet.operator.images import VERSION

LABELS = ("org.opencontainers.image.source", "org.opencontainers.image.version", "org.opencontainers.image.revision")


def test_operator_image_config(operator_image):
    config = operator_image["config"]
    labels = config["Labels"]
    assert all(labels.get(k) for k in LABELS) and labels["org.opencontainers.image.version"] == VERSION
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", labels["org.opencontainers.image.revision"])  # the git commit
    assert config["User"] == "65532:65532"
    assert (config["Entrypoint"], config["Cmd"]) == (["deltafleet"], ["operator"])


def test_operator_image_is_small_and_torch_free(operator_image):
    site = next((operator_image["rootfs"] / "opt" / "deltafleet" / "lib").glob("python3*/site-packages"))
    assert (site / "kopf").is_dir() and (site / "deltafleet").is_dir()
    assert not any((site / m).exists() for m in ("torch", "triton", "transformers", "ray", "pip"))
    assert operator_image["rootfs_bytes"] < 450e6, operator_image["rootfs_bytes"]


def test_ml_image_config(ml_image):
    config = ml_image["config"]
    assert all(config["Labels"].get(k) for k in LABELS)
    assert config["User"] == "1000:1000" and "HF_HOME=/var/cache/huggingface" in config["Env"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert "/usr/local/nvidia/lib64" in env["LD_LIBRARY_PATH"].split(":")  # where GKE mounts the driver
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility" and env["NVIDIA_VISIBLE_DEVICES"] == "all"
    bins = ml_image["rootfs"] / "usr" / "bin"
    assert all((bins / b).exists() for b in ("bash", "wget", "grep", "ps", "gcc"))  # KubeRay probes, Triton
