"""Kernel tests run the real Triton code: compiled on a GPU, under the interpreter on CPU.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels, i.e. before
deltafleet.kernels.triton_* is first imported; the package imports them lazily, and
test_triton.py asserts the kernels really are interpreted on a CPU-only machine."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
