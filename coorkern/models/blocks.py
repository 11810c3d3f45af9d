"""The detector's plain building blocks: token <-> map reshapes, the reference grid, and the convolutional blocks.

Everything here is ordinary PyTorch; the attention (and what it samples) lives in
:mod:`.coordinates`, :mod:`.positions` and :mod:`.attention`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` (row-major tokens, the order of the coords)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
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
