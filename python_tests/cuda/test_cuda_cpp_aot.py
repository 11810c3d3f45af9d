"""The C++ library's ahead-of-time CUDA kernels, as a libtorch program runs them.

A subprocess loads ``libcoorkern_ops.so`` with ``torch.ops.load_library`` and never imports
coorkern, so the ops dispatch to the C++ CUDA registrations (``csrc/cuda/``) rather than
Python's; it runs both ops forward and backward on CUDA tensors, and the results are
compared here with the float64 reference on the CPU.  Needs a CUDA device
(``COORKERN_TEST_DEVICE=cuda``) and a library built with the AOT kernels (``pip install
--no-build-isolation -e .`` with a CUDA torch, or with ``COORKERN_AOT_CUDA=1``;
``bench/gpu_check.py`` builds it in place).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from coorkern import reference
from coorkern.ops._runtime import extension as _extension

RUN_IN_LIBTORCH_ONLY = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
cases = torch.load(sys.argv[2])
ops, results = torch.ops.coorkern, []
for case in cases:
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case["args"]]
    if case["op"] == "central_loss_from_landmarks":
        loss = ops.central_loss_from_landmarks(*args)
        grad = ops.central_loss_from_landmarks_backward(torch.ones_like(loss), *args)
        results.append([loss.cpu(), grad.cpu()])
    else:
        out, lse = ops.coor_attention(*args)
        grads = ops.coor_attention_backward(case["grad_out"].cuda(), *args[:4], out, lse, *args[4:])
        results.append([out.cpu(), *(g.cpu() for g in grads)])
torch.save(results, sys.argv[3])
"""

ATTENTION_TOLS = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _attention_case(dtype, d, sample, per_head, align, gen):
    b, heads, h, w, n = 2, 2, 6, 7, 37
    fmap = lambda: torch.randn(b, heads, h, w, d, generator=gen).to(dtype)  # noqa: E731
    tokens = lambda: torch.randn(b, heads, n, d, generator=gen).to(dtype)  # noqa: E731
    q, k, v = (fmap(), fmap(), tokens()) if sample == "qk" else (tokens(), fmap(), fmap())
    coords = torch.rand((b, heads, n, 2) if per_head else (b, n, 2), generator=gen) * 2.2 - 1.1  # some outside
    coords = coords.to(torch.float64 if dtype == torch.float64 else torch.float32)  # dcoords come in its dtype
    return {"op": "coor_attention", "args": [q, k, v, coords, sample, d ** -0.5, align], "grad_out": tokens()}


def test_cpp_cuda_kernels_match_the_reference(cuda_device, tmp_path):
    if re.search(r"cuda_aot=(?!none\b)", _extension.build_info()) is None:
        pytest.skip(f"the C++ library is not built with the AOT CUDA kernels ({_extension.build_info() or 'not loaded'}); "
                    "COORKERN_AOT_CUDA=1 pip install --no-build-isolation -e . builds them")
    gen = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logits = torch.randn(2, 3, 17, 19, generator=gen).to(dtype)
        landmarks = (torch.rand(2, 3, 2, generator=gen) * 18).to(dtype)
        cases.append({"op": "central_loss_from_landmarks", "args": [logits, landmarks, 2.0, 2.0, "mean", None]})
        for d, sample, per_head, align in ((8, "qk", False, True), (64, "kv", True, False), (32, "qk", True, False)):
            cases.append(_attention_case(dtype, d, sample, per_head, align, gen))
    torch.save(cases, tmp_path / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", RUN_IN_LIBTORCH_ONLY, _extension.library_path(),
                           str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for case, got in zip(cases, torch.load(tmp_path / "out.pt")):
        args = [a.double() if isinstance(a, torch.Tensor) else a for a in case["args"]]
        dtype = case["args"][0].dtype
        if case["op"] == "central_loss_from_landmarks":
            x = args[0].requires_grad_(True)
            loss = reference.central_loss_from_landmarks(x, args[1], sigma=2.0, r=2.0, reduction="mean")
            want = [loss, torch.autograd.grad(loss, x)[0]]
            tol = 1e-9 if dtype == torch.float64 else 2e-2
        else:
            inputs = [t.requires_grad_(True) for t in args[:4]]
            out = reference.coor_attention(*inputs, sample=args[4], scale=args[5], align_corners=args[6])
            want = [out, *torch.autograd.grad(out, inputs, case["grad_out"].double())]
            tol = ATTENTION_TOLS[dtype]
        for name, g, w in zip(("out", "d1", "d2", "d3", "d4"), got, want):
            err = (g.double() - w.detach()).abs().max().item() / max(w.abs().max().item(), 1e-6)
            assert err <= tol, (case["op"], dtype, case["args"][4:] if len(case["args"]) > 4 else "", name, err)
