"""coorkern.coor_attention's argument errors, message by message (the whole text, not a part):
the user learns which argument is wrong and what was expected in each sample mode."""
from __future__ import annotations

import re

import pytest
import torch

import coorkern

from support.coor_attention_cases import make_inputs, run


def _call(sample, **changes):
    q, k, v, coords = make_inputs(sample, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, coords=coords, sample=sample, scale=None, align_corners=True)
    args.update(changes)
    return coorkern.coor_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("coords"), **args)


MAP, TOKENS = "(B, heads, H, W, d)", "(B, heads, N, d)"
QK_MAP, KV_TOKENS = torch.randn(1, 2, 4, 5, 16), torch.randn(1, 2, 5, 16)

CASES = [
    # (sample, changes, exception, the whole message)
    ("qk", dict(q=QK_MAP[0]), ValueError,
     f"q must have shape {MAP} (a map sampled at coords when sample='qk') (5-D), got (2, 4, 5, 16)"),
    ("qk", dict(k=QK_MAP[0]), ValueError, f"k must have shape {MAP} (a map sampled at coords) (5-D), got (2, 4, 5, 16)"),
    ("qk", dict(v=KV_TOKENS[0]), ValueError, f"v must have shape {TOKENS} (tokens when sample='qk') (4-D), got (2, 5, 16)"),
    ("kv", dict(q=QK_MAP), ValueError,
     "q must have shape (B, heads, Nq, d) (tokens when sample='kv') (4-D), got (1, 2, 4, 5, 16)"),
    ("kv", dict(k=QK_MAP[0]), ValueError, f"k must have shape {MAP} (a map sampled at coords) (5-D), got (2, 4, 5, 16)"),
    ("kv", dict(v=QK_MAP[0]), ValueError,
     f"v must have shape {MAP} (a map sampled at coords when sample='kv') (5-D), got (2, 4, 5, 16)"),
    ("qk", dict(q=QK_MAP.to("meta")), ValueError,
     "all tensors must be on the same device, got q on meta, k on cpu, v on cpu, coords on cpu"),
    ("qk", dict(k=QK_MAP.to("meta")), ValueError,
     "all tensors must be on the same device, got q on cpu, k on meta, v on cpu, coords on cpu"),
    ("kv", dict(v=QK_MAP.to("meta")), ValueError,
     "all tensors must be on the same device, got q on cpu, k on cpu, v on meta, coords on cpu"),
    ("qk", dict(coords=torch.rand(2, 7, 2)), ValueError,
     "coords must have shape (B=1, N, 2) or (B=1, heads=2, N, 2), got (2, 7, 2)"),
    ("qk", dict(coords=torch.rand(1, 0, 2)), ValueError,
     "coords must hold at least one coordinate (N >= 1), got (1, 0, 2)"),
    ("kv", dict(q=torch.randn(1, 2, 0, 16)), ValueError,
     "q must hold at least one query token (B, heads, Nq >= 1, d), got (1, 2, 0, 16)"),
    # An empty map in "qk" mode is an empty q, not a missing query token.
    ("qk", dict(q=torch.randn(1, 2, 0, 5, 16)), ValueError, "q must not be empty, got shape (1, 2, 0, 5, 16)"),
    ("kv", dict(k=torch.randn(1, 2, 0, 5, 16)), ValueError, "k must not be empty, got shape (1, 2, 0, 5, 16)"),
    ("kv", dict(v=torch.randn(1, 2, 4, 0, 16)), ValueError, "v must not be empty, got shape (1, 2, 4, 0, 16)"),
    ("qk", dict(align_corners=1), TypeError, "align_corners must be a bool, got int"),
    ("qk", dict(v=[1.0]), TypeError, "v must be a torch.Tensor, got list"),
    ("kv", dict(k=[1.0]), TypeError, "k must be a torch.Tensor, got list"),
    ("kv", dict(scale="0.5"), TypeError, "scale must be a real number, got str"),
]


@pytest.mark.parametrize("sample,changes,exc,message", CASES, ids=[c[3][:40] for c in CASES])
def test_argument_errors_name_the_argument_and_the_expected_shape(sample, changes, exc, message):
    with pytest.raises(exc) as info:
        _call(sample, **changes)
    assert re.fullmatch(re.escape(message), str(info.value)), str(info.value)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_a_single_query_token_is_accepted(impl):
    """The smallest valid "kv" call (Nq = 1) runs and matches the float64 oracle."""
    q, k, v, coords = make_inputs("kv", nq=1)
    out, grads, grad_out = run(impl, q, k, v, coords, sample="kv")
    ref_out, ref_grads, _ = run("oracle", q, k, v, coords, grad_out, sample="kv")
    assert out.shape == (1, 2, 1, 16)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_one_element_maps_are_accepted(impl):
    """A 1 x 1 map with one head and d = 1 (one element each) is valid input, not "empty"."""
    q, k, v, coords = make_inputs("qk", heads=1, n=3, d=1, hw=(1, 1))
    assert q.numel() == k.numel() == 1
    out, grads, grad_out = run(impl, q, k, v, coords, sample="qk")
    ref_out, ref_grads, _ = run("oracle", q, k, v, coords, grad_out, sample="qk")
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
