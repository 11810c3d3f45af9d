"""Test configuration: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any module defining a ``@triton.jit`` kernel is
imported, so it is set here, before pytest imports coorkern.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; keeps its default

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_restore_backend(monkeypatch):
    monkeypatch.delenv("COORKERN_BACKEND", raising=False)
    torch.manual_seed(0)
    yield
