"""Eager PyTorch oracles for every coorkern op.

These are the semantics: the kernels are tested against them.  They favour
clarity and numerical care over speed (half inputs are computed in float32,
float64 stays float64) and autograd differentiates them directly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["central_loss", "gaussian_heatmaps", "central_loss_from_landmarks", "coor_attention"]


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def central_loss(logits: torch.Tensor, target: torch.Tensor, r: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Central loss ``-(t|t-p|^r log p + (1-t)|t-p|^r log(1-p))`` with ``p = sigmoid(logits)``.

    ``log p`` and ``log(1-p)`` come from ``logsigmoid`` of the logits.  ``|t-p|^0`` is 1
    (so ``r = 0`` is binary cross-entropy); the derivative of ``|t-p|^r`` at ``t == p``
    is taken as 0, which ``torch.where`` on the gradient path below guarantees.
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute)
    t = target.to(device=logits.device, dtype=compute)
    log_p = F.logsigmoid(x)
    log_1mp = F.logsigmoid(-x)
    diff = (t - torch.sigmoid(x)).abs()
    if r == 0:
        weight = torch.ones_like(diff)
    else:
        # |d|^r through a where so that the d == 0 branch has zero gradient (no 0 * inf).
        safe = torch.where(diff > 0, diff, torch.ones_like(diff))
        weight = torch.where(diff > 0, safe.pow(r), torch.zeros_like(diff))
    loss = -(t * weight * log_p + (1 - t) * weight * log_1mp)
    return _reduce(loss, reduction).to(logits.dtype)


def gaussian_heatmaps(
    landmarks: torch.Tensor, height: int, width: int, sigma: float, radius: Optional[float] = None
) -> torch.Tensor:
    """Gaussian targets ``exp(-((col-x)^2 + (row-y)^2) / (2 sigma^2))`` with peak 1.

    ``landmarks``: ``(*, 2)`` pixel coordinates (x = column, y = row).  Returns
    ``(*, height, width)``.  Pixels farther than ``radius`` are 0; a landmark with a
    NaN coordinate (missing) gives an all-zero map.
    """
    compute = torch.float64 if landmarks.dtype == torch.float64 else torch.float32
    lm = landmarks.to(compute)
    cols = torch.arange(width, device=lm.device, dtype=compute)
    rows = torch.arange(height, device=lm.device, dtype=compute)
    dx2 = (cols - lm[..., 0:1]) ** 2  # (*, W)
    dy2 = (rows - lm[..., 1:2]) ** 2  # (*, H)
    dist2 = dy2.unsqueeze(-1) + dx2.unsqueeze(-2)  # (*, H, W)
    heat = torch.exp(-dist2 / (2.0 * sigma * sigma))
    if radius is not None:
        heat = torch.where(dist2 > radius * radius, torch.zeros_like(heat), heat)
    missing = torch.isnan(lm).any(dim=-1)[..., None, None]
    return torch.where(missing, torch.zeros_like(heat), heat)


def central_loss_from_landmarks(
    logits: torch.Tensor, landmarks: torch.Tensor, sigma: float = 3.0, r: float = 2.0, reduction: str = "mean",
    radius: Optional[float] = None,
) -> torch.Tensor:
    """``central_loss(logits, gaussian_heatmaps(landmarks, H, W, sigma, radius))``."""
    target = gaussian_heatmaps(landmarks.to(logits.device), logits.shape[-2], logits.shape[-1], sigma, radius)
    if logits.dtype == torch.float64:
        target = target.double()
    return central_loss(logits, target, r=r, reduction=reduction)


def coor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    coords: torch.Tensor,
    *,
    sample: str = "qk",
    scale: Optional[float] = None,
    align_corners: bool = True,
) -> torch.Tensor:
    """Coordinate-indexed attention: ``F.grid_sample`` per sampled tensor, then SDPA.

    Maps are ``(B, heads, H, W, d)`` (channels-last per head), tokens ``(B, heads, N, d)``,
    ``coords`` is ``(B, N, 2)`` (shared by the heads) or ``(B, heads, N, 2)``, normalized
    (x, y) in the ``grid_sample`` convention; bilinear, zero padding.  ``sample="qk"``:
    ``q`` and ``k`` are maps sampled at ``coords``, ``v`` is tokens; ``sample="kv"``: ``q``
    is tokens ``(B, heads, Nq, d)``, ``k`` and ``v`` are maps sampled at ``coords``.
    Returns ``softmax(Qs Ks^T * scale) Vs`` of shape ``(B, heads, Nq, d)`` in ``q``'s dtype;
    half inputs are computed in float32, float64 with SDPA's math backend.
    """
    return grid_sample_sdpa(q, k, v, coords, sample=sample, scale=scale, align_corners=align_corners)


def grid_sample_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor, *, sample: str = "qk",
                     scale: Optional[float] = None, align_corners: bool = True,
                     attention_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`coor_attention` as ATen's ``grid_sample`` + SDPA, the attention in ``attention_dtype``.

    Sampling always runs in float32 (float64 for float64 inputs): ``grid_sample`` takes the
    grid in the map's dtype, and a bf16 grid would move the sampling points by up to half a
    pixel on a 128-wide map.  ``attention_dtype`` (default: that same compute dtype, the
    oracle) is the dtype the sampled tokens are cast to for SDPA -- the inputs' half dtype
    lets SDPA take its flash kernel, which ``auto`` does on CUDA (``coorkern.ops.coor_attention``).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if sample not in ("qk", "kv"):
        raise ValueError(f"sample must be one of ('qk', 'kv'), got {sample!r}")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    attention_dtype = attention_dtype or compute
    batch, heads = q.shape[0], q.shape[1]
    grid = coords.to(compute)
    if grid.dim() == 3:  # shared by the heads
        grid = grid.unsqueeze(1).expand(batch, heads, grid.shape[1], 2)
    grid = grid.reshape(batch * heads, 1, grid.shape[2], 2)

    def sampled(fmap: torch.Tensor) -> torch.Tensor:
        b, h, hh, ww, d = fmap.shape
        x = fmap.to(compute).permute(0, 1, 4, 2, 3).reshape(b * h, d, hh, ww)
        s = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
        # (B, heads, N, d); contiguous so that SDPA can take its fused (O(N) memory) kernels
        return s.reshape(b, h, d, -1).transpose(-1, -2).to(attention_dtype).contiguous()

    if sample == "qk":
        qs, ks, vs = sampled(q), sampled(k), v.to(attention_dtype)
    else:
        qs, ks, vs = q.to(attention_dtype), sampled(k), sampled(v)
    if attention_dtype == torch.float64:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
    return out.to(q.dtype)
