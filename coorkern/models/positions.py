"""Positions added to the Q and K maps of an attention before they are sampled or attended.

The paper's coordinate-index reading: "coordinate-index features x^p are sampled at each
coordinate based on the coordinate information", and "Q^p and K^p ... are computed through
coordinate-index features x^p" -- the features that are sampled carry their own position,
so ``Q^p`` and ``K^p`` know where they were read.  The fused op samples the Q/K *maps*; an
embedding of the position added to the maps before sampling is read back at the sampling
coordinate, so it needs no change to the kernels:

* ``"linear"`` (:class:`GridPosition`): ``W p`` for the normalized grid position ``p``.
  Bilinear sampling (align_corners=True) reproduces a function of the form ``a + b x + c y
  + d x y`` exactly, so sampling the map ``W p + b`` at a coordinate ``c`` inside the map
  gives ``W c + b``: ``Q^p`` and ``K^p`` carry exactly a learned linear embedding of the
  coordinate they were sampled at.  (Outside the map the op's zero padding fades it out, as
  it fades the features; a map one row or column wide has no extent in that direction.)
* ``"fourier"`` (:class:`GridPosition`): a learned linear combination of the Fourier
  features ``sin/cos(w x)``, ``sin/cos(w y)`` for ``w`` in :data:`FOURIER_FREQUENCIES`.
  Sampling interpolates them bilinearly between the four grid points around ``c``: the
  result is ``~ gamma(c)``, off by at most ``(w h)^2 / 8`` of a feature's amplitude for a
  grid spacing ``h = 2 / (side - 1)`` -- for the highest frequency ``4 pi`` about 13% on
  a 26-token side (the 1/16 stage of a 512x416 image), about 3% on a 52-token side.  A
  learned MLP of the sampled coordinate would be exact, but needs the sampled coordinate
  inside the fused kernel.
* ``"sincos"`` (:func:`sincos_2d`): the standard fixed 2-D sine-cosine encoding of the
  token grid (Vaswani et al., 2-D as in MAE/DETR), added to the tokens that Q and K are
  projected from, not to V (DETR's convention): what the plain ``vanilla`` attention has
  in place of coordinates.

Every one returns ``(q_position, k_position)``, each ``(H*W, dim)`` row-major like the
tokens, to be added to the projected Q and K.  The learned projections start at zero, so
a model with a learned position starts out equal to the one without.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice
from .blocks import reference_grid

__all__ = ["FOURIER_FREQUENCIES", "GridPosition", "POSITION_KINDS", "SinCosPosition", "make_position", "sincos_2d"]

POSITION_KINDS = ("none", "linear", "fourier", "sincos")
# Angular frequencies over the normalized [-1, 1] range: periods of 2, 1 and 0.5 (the whole
# map, half of it, a quarter).  Higher ones would alias on the coarsest decoder stage.
FOURIER_FREQUENCIES = (math.pi, 2 * math.pi, 4 * math.pi)


def fourier_features(grid: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` normalized ``(x, y)`` -> ``(N, 4 * len(FOURIER_FREQUENCIES))`` sines and cosines."""
    # pi * 2**i built on the device (no host-to-device copy per step); equals FOURIER_FREQUENCIES.
    w = math.pi * torch.exp2(torch.arange(len(FOURIER_FREQUENCIES), device=grid.device, dtype=grid.dtype))
    angles = grid[:, :, None] * w  # (N, 2, F)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(1)


def sincos_2d(height: int, width: int, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The standard fixed 2-D sine-cosine position encoding of an ``height x width`` token grid: ``(H*W, dim)``.

    A quarter of the channels each: ``sin(x w_i)``, ``cos(x w_i)``, ``sin(y w_i)``,
    ``cos(y w_i)`` with ``w_i = 10000^(-i / (dim // 4))`` and ``x``, ``y`` the integer
    column and row of the token; ``dim % 4`` channels left over are zero.
    """
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    ax = xs.reshape(-1, 1) * omega
    ay = ys.reshape(-1, 1) * omega
    pe = torch.cat((ax.sin(), ax.cos(), ay.sin(), ay.cos()), dim=1)
    return F.pad(pe, (0, dim - 4 * quarter)).to(dtype)


class GridPosition(nn.Module):
    """Learned embedding of the normalized grid position ``p``, one for the Q map and one for the K map.

    ``kind="linear"``: ``W p`` (sampled exactly as ``W c``); ``kind="fourier"``: ``W
    gamma(p)`` with the Fourier features of :data:`FOURIER_FREQUENCIES` (sampled
    approximately as ``W gamma(c)``; see the module docstring).  No bias: a constant added
    to Q or K is what the Q/K projection's bias already is.
    """

    def __init__(self, dim: int, kind: str = "linear") -> None:
        super().__init__()
        self.kind = check_choice("position", kind, ("linear", "fourier"))
        features = 2 if kind == "linear" else 4 * len(FOURIER_FREQUENCIES)
        self.proj = nn.Linear(features, 2 * dim, bias=False)
        nn.init.zeros_(self.proj.weight)  # start as the model without positions

    def features(self, height: int, width: int) -> torch.Tensor:
        grid = reference_grid(height, width, device=self.proj.weight.device)
        return grid if self.kind == "linear" else fourier_features(grid)

    def forward(self, height: int, width: int, qkv_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_position, k_position = self.proj(self.features(height, width).to(self.proj.weight.dtype)).chunk(2, dim=-1)
        return q_position, k_position

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class SinCosPosition(nn.Module):
    """The fixed :func:`sincos_2d` encoding added to the tokens that Q and K are projected from.

    ``Q = W_q (x + pe) + b_q`` is ``W_q x + b_q`` plus ``W_q pe``, so it is added as
    ``W_q pe`` to the projected Q (and ``W_k pe`` to K), with the attention's own
    projection weights (``qkv_weight``, the ``(3 dim, dim)`` weight of its Q/K/V Linear).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, height: int, width: int, qkv_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pe = sincos_2d(height, width, self.dim, device=qkv_weight.device, dtype=qkv_weight.dtype)
        return F.linear(pe, qkv_weight[: self.dim]), F.linear(pe, qkv_weight[self.dim: 2 * self.dim])

    def extra_repr(self) -> str:
        return "kind='sincos'"


def make_position(kind: str, dim: int) -> Optional[nn.Module]:
    """The position module of ``kind`` (one of :data:`POSITION_KINDS`) for ``dim`` channels; ``None`` for ``"none"``."""
    check_choice("position", kind, POSITION_KINDS)
    if kind == "none":
        return None
    return SinCosPosition(dim) if kind == "sincos" else GridPosition(dim, kind)
