"""The paper's CoorTransformer-based landmark detector (Section IV, Fig. 4) on the coorkern ops.

Three building blocks and the detector:

* :class:`CoordinateModule` -- predicts where every token looks: 3x3 conv -> LayerNorm
  over channels -> GELU -> 1x1 conv to 2 channels (per coordinate group).  By default
  (the paper) the coordinates are a uniform reference grid in ``[-1, 1]`` plus learned
  offsets bounded by ``tanh`` and a range factor; ``coords="absolute"`` reproduces the
  authors' released code, where the ReLU of the conv output is used directly.
* :class:`CoorTransformerBlock` -- pre-norm transformer block whose attention is
  :func:`coorkern.coor_attention` (Q and K sampled at the coordinates, V from the
  features; ``sample="kv"`` for the released-code variant), or one of the paper's
  Table IV baselines on the same tokens: plain SDPA self-attention
  (``attention="vanilla"``), shifted-window attention (``"swin"``, Liu et al.,
  :class:`WindowAttention`) or deformable attention (``"deformable"``, Xia et al.'s
  DAT: queries are the tokens, keys and values sampled at learned points, i.e.
  ``coor_attention(sample="kv")``).  ``patch_size=2`` takes the tokens at
  half resolution through a 2x2 stride-2 patch embedding and brings them back with a
  2x2 transposed convolution, as the released code does for the high-resolution stage.
* :class:`CoorDetector` -- U-Net: conv-BN-ReLU encoder with down-sampling; decoder
  stages of up-sampling + skip + conv block + CBAM channel/spatial attention + a stage
  of CoorTransformer blocks; a final full-resolution fusion stage and a 1x1 head giving
  logits ``(B, num_landmarks, H, W)`` at the input resolution.

Nothing here materializes an ``N x N`` attention matrix: coordinate attention goes
through the fused coorkern op (Triton on CUDA, C++ on CPU) and vanilla and window
attention through ``F.scaled_dot_product_attention``.  ``python -m coorkern.models --summary`` prints the
parameter count, an activation-memory estimate and the attention tokens per stage.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_choice, check_int_sequence, check_number, check_positive_int, check_rank, check_tensor
from .ops.coor_attention import coor_attention

__all__ = [
    "CoordinateModule",
    "CoorTransformerBlock",
    "CoorDetector",
    "ModelSummary",
    "TRANSFORMER_KINDS",
    "WindowAttention",
    "reference_grid",
    "summary",
]

COORD_MODES = ("offset", "absolute")
ATTENTION_KINDS = ("coor", "deformable", "swin", "vanilla")
TRANSFORMER_KINDS = ("coor", "deformable", "swin", "vanilla", "none")


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` (row-major tokens, the order of the coords)."""
    return x.flatten(2).transpose(1, 2)


def _tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, H*W, C)`` -> ``(B, C, H, W)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def reference_grid(height: int, width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform ``(H*W, 2)`` grid of normalized ``(x, y)`` in ``[-1, 1]`` (align_corners=True).

    Row-major like the tokens; ``(-1, -1)`` is the centre of the top-left pixel and
    ``(+1, +1)`` the centre of the bottom-right one, the ``F.grid_sample`` convention.
    """
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    if height == 1:  # linspace(-1, 1, 1) is [-1]: a single row/column sits in the middle
        ys = torch.zeros_like(ys)
    if width == 1:
        xs = torch.zeros_like(xs)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).reshape(height * width, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (each pixel normalized on its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CoordinateModule(nn.Module):
    """Predicts the sampling coordinates of a coordinate-indexed attention from the features.

    ``forward(x)`` with ``x`` of shape ``(B, dim, H, W)`` returns normalized ``(x, y)``
    coordinates, one per token (row-major), in the layout :func:`coorkern.coor_attention`
    takes: ``(B, H*W, 2)`` when ``groups == 1`` (shared by all heads), else
    ``(B, heads, H*W, 2)`` (``heads / groups`` consecutive heads share one group's
    coordinates).

    ``coords="offset"`` (the paper): reference grid + ``tanh(raw) * offset_range`` cells
    of the token grid, so a token looks at most ``offset_range`` cells away from itself.
    ``coords="absolute"`` (released code): ``relu(raw)`` used directly as coordinates.
    Coordinates are computed in float32 even under autocast: a bf16 coordinate is off by
    up to a few percent of a cell on a 100-wide grid.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        groups: int = 1,
        coords: str = "offset",
        offset_range: float = 4.0,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.heads, self.groups = check_positive_int("heads", heads), check_positive_int("groups", groups)
        if heads % groups:
            raise ValueError(f"groups ({groups}) must divide heads ({heads})")
        self.coords = check_choice("coords", coords, COORD_MODES)
        self.offset_range = check_number("offset_range", offset_range, minimum=0.0)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.norm = LayerNorm2d(dim)
        self.act = nn.GELU()
        self.to_coords = nn.Conv2d(dim, 2 * groups, kernel_size=1)
        # Start near the reference grid (small offsets), but not exactly on it: a zero
        # weight would also zero the gradient of every layer before it.
        nn.init.normal_(self.to_coords.weight, std=1e-2)
        nn.init.zeros_(self.to_coords.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        raw = self.to_coords(self.act(self.norm(self.conv(x)))).float()
        raw = raw.reshape(batch, self.groups, 2, height * width).transpose(-1, -2)  # (B, G, N, 2)
        if self.coords == "absolute":
            coords = F.relu(raw)
        else:
            # One cell of an align_corners=True grid spans 2 / (size - 1) normalized units.
            cell = raw.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
            grid = reference_grid(height, width, device=x.device)
            coords = grid + torch.tanh(raw) * (self.offset_range * cell)
        if self.groups == 1:
            return coords[:, 0]
        return coords.repeat_interleave(self.heads // self.groups, dim=1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, groups={self.groups}, coords={self.coords!r}, offset_range={self.offset_range}"


def _sample_mode(attention: str, sample: Optional[str]) -> str:
    """The ``coor_attention`` sampling mode of an attention kind (``None``: the kind's own)."""
    if attention == "deformable":
        if sample not in (None, "kv"):
            raise ValueError(
                f"attention 'deformable' samples keys and values (sample='kv'), got sample={sample!r}; "
                "the Q/K-sampled attention is attention='coor'"
            )
        return "kv"
    return check_choice("sample", "qk" if sample is None else sample, ("qk", "kv"))


class TokenAttention(nn.Module):
    """Multi-head attention on the tokens of a map: 1x1 Q/K/V projections, attention, output projection.

    With a ``coordinates`` module (a :class:`CoordinateModule`), the attention is
    :func:`coorkern.coor_attention` at the coordinates it predicts (``sample="qk"``: Q
    and K maps sampled, V tokens -- ``kind == "coor"``; ``sample="kv"``: Q tokens, K
    and V maps sampled -- DAT's deformable attention, ``kind == "deformable"``).
    Without one it is plain SDPA self-attention on the same tokens (``kind ==
    "vanilla"``, the paper's Table IV baseline).  Subclasses change :meth:`attend`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        sample: str = "qk",
        coordinates: Optional[nn.Module] = None,
        qkv_bias: bool = True,
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
        out = self.attend(q, k, v, tokens, height, width)
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim))

    def attend(self, q, k, v, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Attention of the ``(B, heads, H, W, d)`` maps q, k, v -> ``(B, heads, H*W, d)``."""
        batch, n = tokens.shape[:2]
        if self.coordinates is None:
            return F.scaled_dot_product_attention(*(t.reshape(batch, self.heads, n, self.head_dim) for t in (q, k, v)))
        coords = self.coordinates(_tokens_to_map(tokens, height, width))
        if self.sample == "qk":
            v = v.reshape(batch, self.heads, n, self.head_dim)
        else:
            q = q.reshape(batch, self.heads, n, self.head_dim)
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

    def attend(self, q, k, v, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, heads, _, _, d = q.shape
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
        coords: str = "offset",
        coord_groups: int = 1,
        offset_range: float = 4.0,
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
        sample = _sample_mode(attention, sample)
        self.norm1 = nn.LayerNorm(dim)
        if attention == "swin":
            self.attn = WindowAttention(dim, heads, window_size, shifted, qkv_bias)
        else:
            coordinates = (CoordinateModule(dim, heads, coord_groups, coords, offset_range)
                           if attention in ("coor", "deformable") else None)
            self.attn = TokenAttention(dim, heads, sample, coordinates, qkv_bias)
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
        tokens = _map_to_tokens(tokens_map)
        tokens = tokens + self.attn(self.norm1(tokens), height, width)
        tokens = tokens + self.mlp(self.norm2(tokens))
        out = _tokens_to_map(tokens, height, width)
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


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias: BN follows) -> BatchNorm -> ReLU; ``stride=2`` down-samples."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class CBAM(nn.Module):
    """Channel then spatial attention (Woo et al., CBAM) used to fuse skip and up-sampled features."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat((x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)), dim=0)
        avg_gate, max_gate = self.channel_mlp(pooled).chunk(2, dim=0)  # one MLP call for both poolings
        x = x * torch.sigmoid(avg_gate + max_gate)
        spatial = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), dim=1)
        return x * torch.sigmoid(self.spatial(spatial))


class DecoderStage(nn.Module):
    """Up-sample (2x2 transposed conv) -> concatenate the skip -> two conv blocks -> CBAM -> transformer blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, transformer: nn.Module) -> None:
        super().__init__()
        # A learned 2x2 transposed conv rather than bilinear interpolation: the backward of
        # bilinear interpolation on CUDA has no deterministic implementation.
        self.up = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.fuse = nn.Sequential(ConvBNReLU(in_channels + skip_channels, out_channels), ConvBNReLU(out_channels, out_channels))
        self.cbam = CBAM(out_channels)
        self.transformer = transformer

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.up(x), skip), dim=1)
        return self.transformer(self.cbam(self.fuse(x)))


class CoorDetector(nn.Module):
    """CoorTransformer-based landmark detector (paper Fig. 4): images -> heatmap logits.

    ``forward(images)`` takes ``(B, in_channels, H, W)`` and returns logits
    ``(B, num_landmarks, H, W)`` (apply a sigmoid for heatmaps; train with
    :func:`coorkern.central_loss`).

    Levels: the stem works at full resolution with ``base_channels`` channels; encoder
    level ``i`` (``i = 1..5``) halves the resolution with ``base_channels * 2**(i-1)``
    channels.  The four decoder stages work at 1/16, 1/8, 1/4 and 1/2 of the input with
    ``depths[s]`` transformer blocks of ``heads[s]`` heads (the paper: depths
    ``(1, 1, 1, 1)``, heads ``(8, 4, 2, 1)``, so every head has ``base_channels`` dims);
    the 1/2 stage takes its tokens at 1/4 through a patch embedding
    (``token_strides=(1, 1, 1, 2)``) to keep attention affordable.  A last fusion stage
    (no transformer) returns to full resolution before the 1x1 head.

    Inputs of any size from 32x32 on are accepted: the image is zero-padded at the
    bottom/right to a multiple of 32 (five halvings) and the logits are cropped back, so
    e.g. 512x416 and 512x368 work.

    ``transformer="coor"`` (default) uses coordinate attention, and the baselines of
    Table IV: ``"vanilla"`` plain SDPA self-attention on the same tokens, ``"swin"``
    shifted-window attention (``window_size`` tokens square; the window grid is
    shifted in every second transformer block of the decoder, counted across the
    stages, so with the paper's depths ``(1, 1, 1, 1)`` stages 2 and 4 are shifted),
    ``"deformable"`` DAT-style deformable attention (the same as ``"coor"`` with
    ``sample="kv"``) and ``"none"`` no transformer.
    """

    num_downsamplings = 5

    def __init__(
        self,
        in_channels: int = 1,
        num_landmarks: int = 19,
        base_channels: int = 64,
        depths: Sequence[int] = (1, 1, 1, 1),
        heads: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        transformer: str = "coor",
        *,
        sample: Optional[str] = None,
        coords: str = "offset",
        coord_groups: int = 1,
        offset_range: float = 4.0,
        token_strides: Sequence[int] = (1, 1, 1, 2),
        window_size: int = 8,
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_landmarks = check_positive_int("num_landmarks", num_landmarks)
        self.base_channels = check_positive_int("base_channels", base_channels)
        self.depths = check_int_sequence("depths", depths, 4, minimum=0)
        self.heads = check_int_sequence("heads", heads, 4, minimum=1)
        self.token_strides = check_int_sequence("token_strides", token_strides, 4, minimum=1)
        self.transformer = check_choice("transformer", transformer, TRANSFORMER_KINDS)
        self.sample = _sample_mode(transformer, sample)
        self.window_size = check_positive_int("window_size", window_size)

        c = base_channels
        channels = [c] + [c * 2 ** (i - 1) for i in range(1, self.num_downsamplings + 1)]  # per level 0..5
        self.level_channels = tuple(channels)
        self.stem = nn.Sequential(ConvBNReLU(in_channels, c), ConvBNReLU(c, c))
        self.encoder = nn.ModuleList(
            nn.Sequential(ConvBNReLU(channels[i - 1], channels[i], stride=2), ConvBNReLU(channels[i], channels[i]))
            for i in range(1, self.num_downsamplings + 1)
        )
        # Decoder stage s ends at level 4 - s (1/16 ... 1/2).
        self.decoder = nn.ModuleList()
        block_index = 0
        for stage in range(4):
            level = 4 - stage
            dim = channels[level]
            blocks = []
            for _ in range(self.depths[stage] if transformer != "none" else 0):
                blocks.append(CoorTransformerBlock(
                    dim,
                    self.heads[stage],
                    mlp_ratio,
                    self.sample,
                    attention=transformer,
                    patch_size=self.token_strides[stage],
                    coords=coords,
                    coord_groups=coord_groups,
                    offset_range=offset_range,
                    window_size=window_size,
                    shifted=block_index % 2 == 1,
                ))
                block_index += 1
            self.decoder.append(DecoderStage(channels[level + 1], channels[level], dim, nn.Sequential(*blocks)))
        self.final = DecoderStage(channels[1], channels[0], c, nn.Identity())
        self.head = nn.Conv2d(c, num_landmarks, 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** self.num_downsamplings

    def check_input(self, images: object) -> torch.Tensor:
        """Raise a clear TypeError/ValueError for anything the detector cannot take."""
        images = check_tensor("images", images)
        check_rank("images", images, 4, "(B, in_channels, H, W)")
        if images.shape[1] != self.in_channels:
            raise ValueError(
                f"images must have {self.in_channels} channel(s) (in_channels), got shape {tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height < self.size_multiple or width < self.size_multiple:
            raise ValueError(
                f"images must be at least {self.size_multiple}x{self.size_multiple} for "
                f"{self.num_downsamplings} down-samplings, got {height}x{width}"
            )
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.check_input(images)
        height, width = images.shape[-2:]
        pad_h = -height % self.size_multiple
        pad_w = -width % self.size_multiple
        x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        skips = [self.stem(x)]
        for down in self.encoder:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for stage in self.decoder:
            x = stage(x, skips.pop())
        logits = self.head(self.final(x, skips.pop()))
        return logits[..., :height, :width]

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.size_multiple
        return math.ceil(height / m) * m, math.ceil(width / m) * m

    def attention_tokens(self, height: int, width: int) -> list[tuple[str, int, int, int]]:
        """Per decoder stage: (name, token-grid height, width, tokens) for an ``height x width`` input."""
        ph, pw = self.padded_size(height, width)
        rows = []
        for stage in range(4):
            stride = 2 ** (4 - stage)
            th, tw = ph // (stride * self.token_strides[stage]), pw // (stride * self.token_strides[stage])
            name = f"decoder{stage} (1/{stride})"
            if self.token_strides[stage] > 1:
                name += f", patch {self.token_strides[stage]}"
            rows.append((name, th, tw, th * tw))
        return rows


@dataclass
class ModelSummary:
    """What :func:`summary` measures; ``str()`` gives the printed report."""

    config: dict
    image_size: tuple[int, int]
    batch_size: int
    parameters: int
    parameters_by_part: dict
    activation_bytes: int
    tokens_per_stage: list

    def __str__(self) -> str:
        lines = [f"CoorDetector({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"]
        lines.append(f"input: {self.batch_size} x {self.config['in_channels']} x {self.image_size[0]} x {self.image_size[1]}")
        lines.append(f"parameters: {self.parameters:,} ({self.parameters * 4 / 2**20:.1f} MiB in float32)")
        for part, count in self.parameters_by_part.items():
            lines.append(f"  {part:<22} {count:>12,}")
        lines.append(
            f"activations (float32, outputs of every layer, ~ what training keeps for backward): "
            f"{self.activation_bytes / 2**20:,.1f} MiB"
        )
        if self.config["transformer"] == "swin":
            lines.append(f"swin: {self.config['window_size']} x {self.config['window_size']} token windows "
                         "(each token attends to at most that many), shifted in every second block")
        lines.append("attention tokens per stage (attention memory is O(N) with the fused ops, never N x N):")
        for name, th, tw, n, heads, depth in self.tokens_per_stage:
            lines.append(f"  {name:<26} grid {th:>4} x {tw:<4} N = {n:>7,}  heads {heads}  blocks {depth}")
        return "\n".join(lines)


def summary(model: CoorDetector, image_size: tuple[int, int] = (512, 416), batch_size: int = 1) -> ModelSummary:
    """Parameters, an activation-memory estimate and the attention tokens per stage.

    The activations are measured by running the model on the ``meta`` device (shapes
    only, no compute or memory) and adding up the output size of every leaf module and
    attention; the model passed in is not touched.
    """
    import copy

    height, width = image_size
    by_part: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = "coordinate modules" if ".coordinates." in name else (
            "transformer blocks" if ".transformer." in name else name.split(".", 1)[0]
        )
        by_part[part] = by_part.get(part, 0) + p.numel()

    meta_model = copy.deepcopy(model).to("meta")
    total = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * 4

    hooks = [
        m.register_forward_hook(count)
        for m in meta_model.modules()
        if not list(m.children()) or isinstance(m, TokenAttention)
    ]
    try:
        with torch.no_grad():
            meta_model(torch.empty(batch_size, model.in_channels, height, width, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    tokens = [
        (name, th, tw, n, model.heads[s], model.depths[s] if model.transformer != "none" else 0)
        for s, (name, th, tw, n) in enumerate(model.attention_tokens(height, width))
    ]
    config = dict(
        in_channels=model.in_channels,
        num_landmarks=model.num_landmarks,
        base_channels=model.base_channels,
        depths=model.depths,
        heads=model.heads,
        transformer=model.transformer,
        token_strides=model.token_strides,
    )
    if model.transformer == "swin":
        config["window_size"] = model.window_size
    return ModelSummary(
        config, (height, width), batch_size, sum(by_part.values()), by_part, total[0], tokens
    )


def _main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coorkern.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", action="store_true", help="print parameters, activation memory and tokens per stage")
    parser.add_argument("--image-size", type=int, nargs=2, default=(512, 416), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=2, help="the paper trains with batch size 2")
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-landmarks", type=int, default=19)
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--transformer", choices=TRANSFORMER_KINDS, default="coor")
    parser.add_argument("--window-size", type=int, default=8, help="swin: window side in tokens")
    args = parser.parse_args(argv)
    if not args.summary:
        parser.error("nothing to do: pass --summary")
    model = CoorDetector(args.in_channels, args.num_landmarks, args.base_channels, transformer=args.transformer,
                         window_size=args.window_size)
    print(summary(model, tuple(args.image_size), args.batch_size))


if __name__ == "__main__":
    _main()
