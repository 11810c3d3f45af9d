"""Inputs and oracle comparisons shared by the coor_attention tests (CPU and CUDA)."""

from __future__ import annotations

import torch

import coorkern
from coorkern import reference


def _normalized(pix: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    """Pixel-space source index -> grid_sample's normalized coordinate."""
    if align_corners:
        return pix * 2.0 / max(size - 1, 1) - 1.0
    return (2.0 * pix + 1.0) / size - 1.0


def make_coords(batch, heads, n, height, width, *, per_head=False, where="inside", align_corners=True,
                dtype=torch.float64):
    """Coordinates whose bilinear stencils avoid pixel-center kinks (frac in [0.15, 0.85]).

    ``inside``: stencils anywhere from one pixel left of/above the map to its last pixel
    (so border stencils with corners outside are included); ``outside``: far outside the
    map (+-3 to +-1e4 in normalized units), which samples zeros.
    """
    shape = (batch, heads, n) if per_head else (batch, n)
    if where == "outside":
        mag = torch.tensor([3.0, 40.0, 1e4])[torch.randint(0, 3, shape + (2,))]
        sign = torch.where(torch.rand(shape + (2,)) < 0.5, -1.0, 1.0)
        return (mag * sign).to(dtype)
    frac = 0.15 + 0.7 * torch.rand(shape + (2,), dtype=torch.float64)
    px = torch.randint(-1, width, shape, dtype=torch.float64) + frac[..., 0]
    py = torch.randint(-1, height, shape, dtype=torch.float64) + frac[..., 1]
    x = _normalized(px, width, align_corners)
    y = _normalized(py, height, align_corners)
    return torch.stack([x, y], -1).to(dtype)


def make_inputs(sample, *, batch=1, heads=2, n=7, nq=5, d=16, hw=(4, 5), dtype=torch.float64, per_head=False,
                where="inside", align_corners=True):
    height, width = hw
    fmap = lambda: torch.randn(batch, heads, height, width, d, dtype=dtype)  # noqa: E731
    if sample == "qk":
        q, k, v = fmap(), fmap(), torch.randn(batch, heads, n, d, dtype=dtype)
    else:
        q, k, v = torch.randn(batch, heads, nq, d, dtype=dtype), fmap(), fmap()
    coords = make_coords(batch, heads, n, height, width, per_head=per_head, where=where,
                         align_corners=align_corners, dtype=dtype)
    return q, k, v, coords


def run(impl, q, k, v, coords, grad_out=None, **kw):
    """Output and gradients (q, k, v, coords) through backend ``impl``."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, coords)]
    if impl == "oracle":
        out = reference.coor_attention(*inputs, **kw)
    else:
        with coorkern.backend(impl):
            out = coorkern.coor_attention(*inputs, **kw)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads, grad_out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def assert_close_to_oracle(out, grads, ref_out, ref_grads, inputs, tol):
    """Output and gradients against the float64 oracle, each relative to its own largest
    value -- except gradients whose true value is (near) 0, e.g. dq, dk, dcoords at N = 1
    (softmax over one key): the kernel's are rounding noise of dP - delta (~4e-5 of the
    problem's scale in fp32, d = 64), compared absolutely at max(tol, 1e-3) / 10 of it."""
    assert out.shape == ref_out.shape and out.dtype == inputs[0].dtype
    assert rel_err(out, ref_out) < tol, ("out", rel_err(out, ref_out))
    scale = max(t.abs().max().item() for t in (ref_out, *ref_grads))
    for name, g, r, t in zip("q k v coords".split(), grads, ref_grads, inputs):
        assert g.shape == r.shape and g.dtype == t.dtype, name
        assert torch.isfinite(g).all(), name
        if r.abs().max() < 1e-2 * scale:
            err = (g.double() - r).abs().max().item() / scale
            assert err < max(tol, 1e-3) / 10, (name, "near-zero gradient", err)
        else:
            assert rel_err(g, r) < tol, (name, rel_err(g, r))


def assert_matches(impl, q, k, v, coords, tol, **kw):
    """``impl`` against the oracle evaluated in float64 on the same (rounded) inputs."""
    inputs = (q, k, v, coords)
    go = torch.randn(reference.coor_attention(q, k, v, coords, **kw).shape, dtype=torch.float64).to(q.dtype)
    ref_out, ref_grads, _ = run("oracle", *(t.double() for t in inputs), grad_out=go.double(), **kw)
    out, grads, _ = run(impl, *inputs, grad_out=go, **kw)
    assert_close_to_oracle(out, grads, ref_out, ref_grads, inputs, tol)


def gradcheck_backend(backend, sample, per_head, align_corners, **sizes):
    """float64 gradcheck (fast mode) of ``backend``'s op on q, k, v and coords, scale 0.7."""
    q, k, v, coords = make_inputs(sample, heads=2, n=5, nq=3, hw=(3, 4), per_head=per_head,
                                  align_corners=align_corners, **sizes)
    inputs = [t.requires_grad_(True) for t in (q, k, v, coords)]

    def fn(q, k, v, coords):
        with coorkern.backend(backend):
            return coorkern.coor_attention(q, k, v, coords, sample=sample, align_corners=align_corners, scale=0.7)

    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def opcheck_forward_and_backward(q, k, v, coords, sample, align_corners):
    """``torch.library.opcheck`` of ``coor_attention`` and of its backward op (scale 0.25)."""
    args = (q, k, v, coords, sample, 0.25, align_corners)
    torch.library.opcheck(torch.ops.coorkern.coor_attention.default, args)
    out, lse = torch.ops.coorkern.coor_attention(*args)
    bwd = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), coords.detach(), out.detach(),
           lse.detach(), sample, 0.25, align_corners)
    torch.library.opcheck(torch.ops.coorkern.coor_attention_backward.default, bwd)
