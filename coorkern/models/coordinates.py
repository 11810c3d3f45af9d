"""The coordinate module: where every token of a coordinate-indexed attention looks.

The paper (Section IV.A): "These focused locations are determined by sampling points
which are learned from the queries by a coordinate module. Formally, given the input
feature map x, the uniform grid of points p are computed as the coordination information
through the coordinate module. The values of coordinate points are linearly spaced 2D
coordinates and are normalized to the range [-1, +1]."  Its options are readings of that
text; docs/design/detector.md discusses them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_number, check_positive_int
from .blocks import LayerNorm2d, reference_grid

__all__ = ["COORD_MODES", "COORD_SOURCES", "CoordinateModule"]

COORD_MODES = ("offset", "absolute")
COORD_SOURCES = ("features", "queries")
GEOMETRY_CACHE_SIZE = 16  # token grids whose geometry a module keeps (a model sees a few)


class CoordinateModule(nn.Module):
    """Predicts the sampling coordinates of a coordinate-indexed attention from a map.

    3x3 conv -> LayerNorm over channels -> GELU -> 1x1 conv to 2 channels per coordinate
    group (Fig. 3(b)).  ``forward(x)`` with ``x`` of shape ``(B, dim, H, W)`` returns
    normalized ``(x, y)`` coordinates, one per token (row-major), in the layout
    :func:`coorkern.coor_attention` takes: ``(B, H*W, 2)`` when ``groups == 1`` (shared by
    all heads), else ``(B, heads, H*W, 2)`` (``heads / groups`` consecutive heads share one
    group's coordinates).  Coordinates are computed in float32 even under autocast: a bf16
    coordinate is off by up to a few percent of a cell on a 100-wide grid.

    Args:
        dim: channels of the map it reads.
        heads: heads of the attention it serves.
        groups: coordinate groups; must divide ``heads``.  The paper is silent on heads;
            ``groups > 1`` gives groups of heads their own sampling points, as DAT's offset
            groups do (the op takes per-head coordinates as they are).
        coord_mode: ``"offset"`` reads "the uniform grid of points p ... linearly spaced 2D
            coordinates ... normalized to the range [-1, +1]" as that grid plus a learned
            offset ``tanh(raw) * offset_range`` cells of the token grid, so a token looks
            at most ``offset_range`` cells away from itself.  ``"absolute"`` is the authors'
            released code: ``relu(raw)`` used directly as coordinates.
        offset_range: the largest offset in token cells (``coord_mode="offset"``); 0 pins
            the coordinates to the grid.  "sampling points which are learned": how far they
            may move.
        offset_init_std: standard deviation of the initial weights of the last 1x1 conv,
            i.e. how far from the grid the points start.  Not exactly 0 by default: a zero
            weight would also zero the gradient of every layer before it.
        source: what the attention feeds this module (read by
            :class:`~coorkern.models.attention.TokenAttention`): ``"features"`` the
            normalized input tokens ("given the input feature map x", the default), or
            ``"queries"`` the projected queries ("sampling points which are learned from
            the queries", as deformable attention predicts its offsets).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 1,
        groups: int = 1,
        coord_mode: str = "offset",
        offset_range: float = 4.0,
        *,
        offset_init_std: float = 1e-2,
        source: str = "features",
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.heads, self.groups = check_positive_int("heads", heads), check_positive_int("groups", groups)
        if heads % groups:
            raise ValueError(f"groups ({groups}) must divide heads ({heads})")
        self.coord_mode = check_choice("coord_mode", coord_mode, COORD_MODES)
        self.offset_range = check_number("offset_range", offset_range, minimum=0.0)
        self.offset_init_std = check_number("offset_init_std", offset_init_std, minimum=0.0)
        self.source = check_choice("source", source, COORD_SOURCES)
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.norm = LayerNorm2d(dim)
        self.act = nn.GELU()
        self.to_coords = nn.Conv2d(dim, 2 * groups, kernel_size=1)
        nn.init.normal_(self.to_coords.weight, std=self.offset_init_std)
        nn.init.zeros_(self.to_coords.bias)
        # (reference grid, offset scale) per token grid and device: built once, not in every
        # step (a linspace/meshgrid/stack and a host-to-device copy of the scale otherwise).
        # A plain dict, not buffers: state dicts and checkpoints stay as they are.
        self._geometry_cache: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        raw = self.to_coords(self.act(self.norm(self.conv(x)))).float()
        raw = raw.reshape(batch, self.groups, 2, height * width).transpose(-1, -2)  # (B, G, N, 2)
        if self.coord_mode == "absolute":
            coords = F.relu(raw)
        else:
            grid, scale = self._geometry(height, width, x.device)
            coords = grid + torch.tanh(raw) * scale
        if self.groups == 1:
            return coords[:, 0]
        return coords.repeat_interleave(self.heads // self.groups, dim=1)

    def _geometry(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(H*W, 2)`` reference grid and the ``(2,)`` offset scale (``offset_range`` cells,
        x then y) of an ``height x width`` token grid on ``device``, made without host data.

        Kept for the next call except while traced, compiled or under a dispatch mode (fake
        tensors, export: constants there, which the compiler folds), during a CUDA-graph
        capture (memory of the graph's pool) and past :data:`GEOMETRY_CACHE_SIZE` grids;
        tensors made under inference mode are kept apart (autograd cannot save them)."""
        if torch.compiler.is_compiling():  # first: the cache lookup itself would break the graph
            return self._make_geometry(height, width, device)
        key = (height, width, device, self.offset_range, torch.is_inference_mode_enabled())
        cached = self._geometry_cache.get(key)
        if cached is not None:
            return cached
        geometry = self._make_geometry(height, width, device)
        keep = not (torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
                    or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()))
        if keep and len(self._geometry_cache) < GEOMETRY_CACHE_SIZE:
            self._geometry_cache[key] = geometry
        return geometry

    def _make_geometry(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # One cell of an align_corners=True grid spans 2 / (size - 1) normalized units.
        cell = torch.full((2,), 2.0 / max(width - 1, 1), device=device)
        cell[1].fill_(2.0 / max(height - 1, 1))
        return reference_grid(height, width, device=device), self.offset_range * cell

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, groups={self.groups}, coord_mode={self.coord_mode!r}, "
                f"offset_range={self.offset_range}, source={self.source!r}")
