"""Central loss values and gradients with the target a few ulps from sigmoid(logits).

There |t - p|^(r - 1) (r < 1) amplifies the rounding of p: the kernels and the float64 oracle
each round p by an ulp or two, so their |t - p| = k ulps differ by a relative ~c / k, and the
gradient by (1 - r) c / k.  The values are compared within that bound (c = 3), the signs exactly.
"""

import pytest
import torch

import coorkern
from coorkern import reference

ULPS = (-16, -8, 8, 16)


def loss_and_grad(fn, logits, target, r):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, r=r, reduction="none")
    loss.sum().backward()
    return loss.detach().double(), x.grad.double()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_a_few_ulps_from_the_target(backend, dtype):
    # Up to 12: beyond, p(1 + 16 eps) > 1 in float32 (the target would be clamped to 1 = p).
    logits = torch.linspace(-20, 12, 33, dtype=dtype)
    eps = torch.finfo(dtype).eps
    for k in ULPS:
        target = (torch.sigmoid(logits) * (1 + k * eps)).clamp(0, 1)
        for r in (0.25, 0.5, 0.9):
            with coorkern.backend(backend):
                loss, grad = loss_and_grad(coorkern.central_loss, logits, target, r)
            ref_loss, ref_grad = loss_and_grad(reference.central_loss, logits.double(), target.double(), r)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            spread = 3 / abs(k)
            assert torch.all((loss - ref_loss).abs() <= r * spread * ref_loss.abs() + 1e-30), (k, r)
            assert torch.all((grad - ref_grad).abs() <= (1 - r) * spread * ref_grad.abs() + 1e-30), (k, r)
            assert (ref_grad != 0).all() and torch.equal(grad.sign(), ref_grad.sign()), (k, r)
