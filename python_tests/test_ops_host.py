"""The ops' host helpers (coorkern/ops/_host.py): integer helpers against Triton's own, and
the kernel launches of both ops going through wrap_triton on CUDA only."""

from __future__ import annotations

import pytest
import torch
import triton

from coorkern.ops import central_loss, coor_attention
from coorkern.ops._host import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_agree_with_triton():
    for a in list(range(0, 600)) + [2**31 - 1, 2**31, 2**40 + 3]:
        for b in (1, 2, 3, 16, 64, 1000, 2**20):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in list(range(1, 3000)) + [2**31 - 1, 2**31, 2**31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


@pytest.mark.parametrize("module,launcher", [(central_loss, "_launch"), (coor_attention, "_launch_triton")])
def test_cuda_launches_go_through_wrap_triton(monkeypatch, module, launcher):
    """On CUDA every launch is wrapped by torch.library.wrap_triton (torch.compile then sees the
    kernels inside the triton_op); the interpreter's CPU launches are not."""
    wrapped, launched = [], []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(grid)

    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: wrapped.append(kernel) or kernel)
    monkeypatch.setattr(module, "HAS_TRITON_OP", True)
    launch, kernel = getattr(module, launcher), Kernel()
    cuda_tensor = type("CudaTensor", (), {"device": torch.device("cuda", 0)})()
    launch(kernel, (3,), cuda_tensor, 1.0, BLOCK=8)
    assert wrapped == [kernel] and launched == [(3,)]
    launch(kernel, (5,), torch.zeros(1), 1.0, BLOCK=8)
    assert wrapped == [kernel] and launched == [(3,), (5,)]
    monkeypatch.setattr(module, "HAS_TRITON_OP", False)  # torch 2.4/2.5: nothing to wrap with
    launch(kernel, (7,), cuda_tensor, 1.0, BLOCK=8)
    assert wrapped == [kernel] and launched == [(3,), (5,), (7,)]
