"""Multi-head attention on the tokens of a map: the coordinate kinds, plain SDPA and Swin's windows.

:class:`TokenAttention` is the attention of every kind but Swin: with a
:class:`~coorkern.models.coordinates.CoordinateModule` it is the fused
:func:`coorkern.coor_attention` at the coordinates the module predicts (``"coor"``: Q and K
maps sampled; ``"deformable"``: K and V sampled, DAT), without one plain softmax attention
(``"vanilla"``, the paper's Table IV baseline): ``F.scaled_dot_product_attention``, except
on CPU with the C++ kernels, where it is the fused op with every Q/K token read at its own
centre (:func:`dense_on_fused_kernel`).
:class:`WindowAttention` is Swin's (shifted) window attention.  None of them materializes
an ``N x N`` attention matrix.  ``coor_attention`` is looked up in this module at call
time, so tests and benchmarks can replace it here (``coorkern.models.attention``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_positive_int
from ..ops._runtime import backend as _backend
from ..ops._runtime.extension import cpp_available
from ..ops.coor_attention import coor_attention
from .blocks import reference_grid, tokens_to_map
from .positions import make_position

__all__ = ["ATTENTION_KINDS", "TokenAttention", "WindowAttention", "dense_on_fused_kernel", "sample_mode"]

ATTENTION_KINDS = ("coor", "deformable", "swin", "vanilla")


def sample_mode(attention: str, sample: Optional[str]) -> str:
    """The ``coor_attention`` sampling mode of an attention kind (``None``: the kind's own)."""
    if attention == "deformable":
        if sample not in (None, "kv"):
            raise ValueError(
                f"attention 'deformable' samples keys and values (sample='kv'), got sample={sample!r}; "
                "the Q/K-sampled attention is attention='coor'"
            )
        return "kv"
    return check_choice("sample", "qk" if sample is None else sample, ("qk", "kv"))


def dense_on_fused_kernel(device: torch.device) -> bool:
    """Whether plain attention on ``device`` runs through the C++ kernel of ``coor_attention``.

    Bilinear sampling at a token's own centre returns the token, so ``coor_attention`` at the
    reference grid is plain softmax attention (outputs agree with SDPA to ~1e-5 in fp32, the
    summation order).  On CPU it is the faster of the two: at the ``cpu`` profile's finest
    attention (2 x 3,584 tokens of head width 8, batch 4, one thread) torch 2.13's SDPA took
    0.23 s forward + 0.68 s backward, the C++ kernel 0.09 + 0.25 s (docs/experiments.md).
    Only where the C++ kernels run (backend ``auto``/``cpp`` and the extension built); on CUDA,
    SDPA's flash kernels.
    """
    return device.type == "cpu" and _backend.requested_backend() in ("auto", "cpp") and cpp_available()


class TokenAttention(nn.Module):
    """Multi-head attention on the tokens of a map: 1x1 Q/K/V projections, attention, output projection.

    With a ``coordinates`` module (a :class:`CoordinateModule`), the attention is
    :func:`coorkern.coor_attention` at the coordinates it predicts (``sample="qk"``: Q
    and K maps sampled, V tokens -- ``kind == "coor"``; ``sample="kv"``: Q tokens, K
    and V maps sampled -- DAT's deformable attention, ``kind == "deformable"``), from the
    normalized tokens or from the queries (the module's ``source``).
    Without one it is plain SDPA self-attention on the same tokens (``kind ==
    "vanilla"``, the paper's Table IV baseline).  ``position`` (one of
    :data:`~coorkern.models.positions.POSITION_KINDS`) adds a position to the Q and K maps
    before they are sampled or attended (:mod:`coorkern.models.positions`).  Subclasses
    change :meth:`attend`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        sample: str = "qk",
        coordinates: Optional[nn.Module] = None,
        qkv_bias: bool = True,
        *,
        position: str = "none",
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.sample = check_choice("sample", sample, ("qk", "kv"))
        # A 1x1 convolution on a map is a Linear on its tokens; the tokens are what we hold.
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.coordinates = coordinates
        self.position = make_position(position, dim)

    @property
    def kind(self) -> str:
        if self.coordinates is None:
            return "vanilla"
        return "coor" if self.sample == "qk" else "deformable"

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, n, dim = tokens.shape
        # (B, N, 3C) -> (3, B, heads, H, W, d): channels-last maps per head, the op's layout.
        qkv = self.qkv(tokens).reshape(batch, height, width, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)
        coords = self.predict_coords(q, tokens, height, width)
        if self.position is not None:
            q, k = self.add_position(q, k, height, width)
        out = self.attend(q, k, v, coords)
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim))

    def predict_coords(self, q: torch.Tensor, tokens: torch.Tensor, height: int, width: int) -> Optional[torch.Tensor]:
        """The coordinate module's coordinates, from the tokens or the ``(B, heads, H, W, d)`` queries; ``None`` without one."""
        if self.coordinates is None:
            return None
        if self.coordinates.source == "queries":
            return self.coordinates(q.permute(0, 1, 4, 2, 3).reshape(q.shape[0], -1, height, width))
        return self.coordinates(tokens_to_map(tokens, height, width))

    def add_position(self, q: torch.Tensor, k: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``q``, ``k`` (maps ``(B, heads, H, W, d)``) plus their position terms (cast to their dtype)."""
        q_position, k_position = self.position(height, width, self.qkv.weight)

        def per_head(position: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return position.reshape(height, width, self.heads, self.head_dim).permute(2, 0, 1, 3).to(like.dtype)

        return q + per_head(q_position, q), k + per_head(k_position, k)

    def attend(self, q, k, v, coords: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention of the ``(B, heads, H, W, d)`` maps q, k, v at ``coords`` -> ``(B, heads, H*W, d)``."""
        batch, heads, height, width, d = q.shape
        n = height * width
        if coords is None:
            if dense_on_fused_kernel(q.device):
                # fp64 maps get fp64 centres (an fp32 grid reads them ~1e-7 of a cell off); else fp32, never bf16.
                grid_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
                grid = reference_grid(height, width, device=q.device, dtype=grid_dtype)[None].expand(batch, -1, -1)
                return coor_attention(q, k, v.reshape(batch, heads, n, d), grid, sample="qk")
            return F.scaled_dot_product_attention(*(t.reshape(batch, heads, n, d) for t in (q, k, v)))
        if self.sample == "qk":
            v = v.reshape(batch, heads, n, d)
        else:
            q = q.reshape(batch, heads, n, d)
        return coor_attention(q, k, v, coords, sample=self.sample)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, heads={self.heads}, head_dim={self.head_dim}, sample={self.sample!r}"


class WindowAttention(TokenAttention):
    """Swin's (shifted) window attention (Liu et al., 2021) on the tokens of a map.

    Tokens attend only to the tokens of their ``window_size x window_size`` window.  A
    map whose side is not a multiple of the window is zero-padded at the bottom/right,
    and the padded tokens are masked out as keys (a map smaller than the window has one
    window of the map's size).  ``shifted=True`` moves the window grid by half a window
    (a cyclic roll of the map, as Swin does, with the pairs that the roll brings together
    from opposite edges masked out), so consecutive blocks exchange information across
    window borders.  Every head adds a learned relative position bias, one value per
    offset ``(dy, dx)`` inside a window.  The attention itself is
    ``F.scaled_dot_product_attention`` over the windows, with the bias and the mask as
    its additive ``attn_mask``.
    """

    def __init__(self, dim: int, heads: int, window_size: int = 8, shifted: bool = False, qkv_bias: bool = True) -> None:
        super().__init__(dim, heads, "qk", None, qkv_bias)
        self.window_size = check_positive_int("window_size", window_size)
        self.shifted = bool(shifted)
        span = 2 * self.window_size - 1
        self.relative_position_bias = nn.Parameter(torch.zeros(span * span, heads))
        nn.init.trunc_normal_(self.relative_position_bias, std=0.02)

    @property
    def kind(self) -> str:
        return "swin"

    def layout(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Window height/width and shift along y/x for a ``height x width`` token map."""
        wh, ww = min(self.window_size, height), min(self.window_size, width)
        # No shift where one window covers the side: rolling it would only split it.
        sh = wh // 2 if self.shifted and height > wh else 0
        sw = ww // 2 if self.shifted and width > ww else 0
        return wh, ww, sh, sw

    def attention_bias(self, height: int, width: int) -> torch.Tensor:
        """Additive ``(windows, heads, T, T)`` mask: relative position bias, ``-inf`` where not allowed.

        Windows in the order of :meth:`attend`'s partition of the padded, rolled map;
        ``T`` = tokens per window.
        """
        wh, ww, sh, sw = self.layout(height, width)
        ph, pw = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww
        device = self.relative_position_bias.device
        # Original position of every cell of the rolled, padded map, partitioned into windows.
        rows = (torch.arange(ph, device=device) + sh) % ph
        cols = (torch.arange(pw, device=device) + sw) % pw
        oy, ox = (t.reshape(ph // wh, wh, pw // ww, ww).transpose(1, 2).reshape(-1, wh * ww)
                  for t in torch.meshgrid(rows, cols, indexing="ij"))
        dy = oy[:, :, None] - oy[:, None, :]
        dx = ox[:, :, None] - ox[:, None, :]
        real_key = ((oy < height) & (ox < width))[:, None, :]
        # A pair the roll brought together from opposite edges is more than a window apart.
        allowed = (dy.abs() < wh) & (dx.abs() < ww) & (real_key | torch.eye(wh * ww, dtype=torch.bool, device=device))
        span = 2 * self.window_size - 1
        index = (dy.clamp(-(wh - 1), wh - 1) + self.window_size - 1) * span + dx.clamp(-(ww - 1), ww - 1) + (
            self.window_size - 1)
        bias = self.relative_position_bias[index].permute(0, 3, 1, 2)  # (windows, heads, T, T)
        return bias.masked_fill(~allowed[:, None], float("-inf"))

    def attend(self, q, k, v, coords: Optional[torch.Tensor]) -> torch.Tensor:
        batch, heads, height, width, d = q.shape
        wh, ww, sh, sw = self.layout(height, width)
        ph, pw = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww
        nh, nw = ph // wh, pw // ww

        def windows(m):  # (B, heads, H, W, d) -> (B * windows, heads, T, d)
            if ph != height or pw != width:
                m = F.pad(m, (0, 0, 0, pw - width, 0, ph - height))
            if sh or sw:
                m = torch.roll(m, shifts=(-sh, -sw), dims=(2, 3))
            m = m.reshape(batch, heads, nh, wh, nw, ww, d).permute(0, 2, 4, 1, 3, 5, 6)
            return m.reshape(batch * nh * nw, heads, wh * ww, d)

        bias = self.attention_bias(height, width).to(q.dtype).repeat(batch, 1, 1, 1)
        out = F.scaled_dot_product_attention(windows(q), windows(k), windows(v), attn_mask=bias)
        out = out.reshape(batch, nh, nw, heads, wh, ww, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(batch, heads, ph, pw, d)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(2, 3))
        return out[:, :, :height, :width].reshape(batch, heads, height * width, d)

    def extra_repr(self) -> str:
        return f"kind='swin', heads={self.heads}, head_dim={self.head_dim}, window_size={self.window_size}, " \
               f"shifted={self.shifted}"
