"""The CoorTransformer block: a pre-norm transformer block on a map, whatever its attention kind."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_number, check_positive_int
from .attention import ATTENTION_KINDS, TokenAttention, WindowAttention, sample_mode
from .blocks import map_to_tokens, tokens_to_map
from .coordinates import COORD_SOURCES, CoordinateModule

__all__ = ["CoorTransformerBlock"]

COORDINATE_KINDS = ("coor", "deformable")


class CoorTransformerBlock(nn.Module):
    """Pre-norm transformer block on a ``(B, dim, H, W)`` map, returning the same shape.

    ``x + proj(attention(norm(x)))`` then ``x + MLP(norm(x))`` with expansion
    ``mlp_ratio`` (the paper: 4), whatever the ``attention`` kind (one of
    ``ATTENTION_KINDS``; ``window_size``/``shifted`` configure ``"swin"``, ``sample``
    the coordinate kinds: default ``"qk"`` for ``"coor"``, always ``"kv"`` for
    ``"deformable"``).  ``patch_size=2`` runs both on tokens at half
    resolution (2x2 stride-2 patch embedding) and adds the result, brought back by a 2x2
    transposed convolution, to the input -- attention over 4x fewer tokens, while the
    residual keeps the full-resolution detail.

    The coordinate kinds build a :class:`CoordinateModule` from ``coord_mode``,
    ``coord_groups``, ``offset_range``, ``offset_init_std`` and ``coord_source`` (see
    there); ``position`` (:mod:`coorkern.models.positions`) adds a position to Q and K
    (not for ``"swin"``, which has its relative position bias).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        sample: Optional[str] = None,
        *,
        attention: str = "coor",
        patch_size: int = 1,
        coord_mode: str = "offset",
        coord_groups: int = 1,
        offset_range: float = 4.0,
        offset_init_std: float = 1e-2,
        coord_source: str = "features",
        position: str = "none",
        qkv_bias: bool = True,
        window_size: int = 8,
        shifted: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        check_number("mlp_ratio", mlp_ratio, minimum=0.0, strict=True)
        if patch_size not in (1, 2):
            raise ValueError(f"patch_size must be 1 (tokens at full resolution) or 2 (half), got {patch_size!r}")
        self.patch_size = patch_size
        self.embed = nn.Conv2d(dim, dim, 2, stride=2) if patch_size == 2 else None
        self.unembed = nn.ConvTranspose2d(dim, dim, 2, stride=2) if patch_size == 2 else None
        check_choice("attention", attention, ATTENTION_KINDS)
        sample = sample_mode(attention, sample)
        self.norm1 = nn.LayerNorm(dim)
        if attention == "swin":
            if position != "none":
                raise ValueError(f"position must be 'none' for attention 'swin' (it has a relative position bias), "
                                 f"got {position!r}")
            self.attn = WindowAttention(dim, heads, window_size, shifted, qkv_bias)
        else:
            coordinates = None
            if attention in COORDINATE_KINDS:
                check_positive_int("coord_groups", coord_groups)
                if heads % coord_groups:
                    raise ValueError(f"coord_groups ({coord_groups}) must divide heads ({heads})")
                check_choice("coord_source", coord_source, COORD_SOURCES)
                coordinates = CoordinateModule(dim, heads, coord_groups, coord_mode, offset_range,
                                               offset_init_std=offset_init_std, source=coord_source)
            self.attn = TokenAttention(dim, heads, sample, coordinates, qkv_bias, position=position)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            if x.shape[-2] < 2 or x.shape[-1] < 2:
                raise ValueError(f"patch_size=2 needs a map of at least 2x2, got {tuple(x.shape[-2:])}")
            tokens_map = self.embed(x)
        else:
            tokens_map = x
        height, width = tokens_map.shape[-2:]
        tokens = map_to_tokens(tokens_map)
        tokens = tokens + self.attn(self.norm1(tokens), height, width)
        tokens = tokens + self.mlp(self.norm2(tokens))
        out = tokens_to_map(tokens, height, width)
        if self.unembed is None:
            return out
        up = self.unembed(out)
        # An odd side loses its last row/column to the stride-2 embedding: repeat the edge back.
        pad_h, pad_w = x.shape[-2] - up.shape[-2], x.shape[-1] - up.shape[-1]
        if pad_h or pad_w:
            up = F.pad(up, (0, pad_w, 0, pad_h), mode="replicate")
        return x + up

    @property
    def token_stride(self) -> int:
        return self.patch_size
