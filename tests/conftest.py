"""Shared pytest setup. Fixtures that need servers live next to what they start
(tests/cluster/ for the control plane); the toy models come from deltafleet/toymodels.py and
each folder's conftest.py holds its own model fixtures."""

import os

import pytest

pytest_plugins = ["cluster.fixtures"]

# Deterministic, quiet CPU runs.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (not a pass: run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
