"""The operator image has no torch, transformers, Ray or Triton: every operator module, and the
contract modules it shares with the ML side (serving/config.py, compress/result.py,
compress/files.py), imports without them."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import deltafleet.operator as op
for m in pkgutil.iter_modules(op.__path__):
    importlib.import_module(f"deltafleet.operator.{m.name}")
for m in ("deltafleet.serving.config", "deltafleet.compress.result", "deltafleet.compress.files"):
    importlib.import_module(m)
print(sorted(m for m in ("torch", "transformers", "ray", "triton", "safetensors") if m in sys.modules))
"""


def test_the_operator_and_its_contract_modules_import_without_the_ml_stack():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
