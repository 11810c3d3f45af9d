"""The CoorTransformer-based landmark detector (paper Section IV.B, Fig. 4): images -> heatmap logits.

A U-Net: conv-BN-ReLU encoder with down-sampling; decoder stages of up-sampling + skip +
conv blocks + CBAM + a stage of :class:`CoorTransformerBlock`; a final full-resolution
fusion stage and a 1x1 head.  The attention kind (coordinate attention or one of the
paper's Table IV baselines) and the readings of the coordinate module are constructor
options, all of them kept in :attr:`CoorDetector.config` so a checkpoint rebuilds the same
model (docs/design/detector.md).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_int_sequence, check_number, check_positive_int, check_rank, check_tensor
from .attention import sample_mode
from .blocks import ConvBNReLU, DecoderStage
from .coordinates import COORD_MODES, COORD_SOURCES, CoordinateModule
from .transformer import COORDINATE_KINDS, CoorTransformerBlock

__all__ = ["CoorDetector", "DEFAULT_POSITIONS", "default_position", "POSITIONS", "TRANSFORMER_KINDS", "VANILLA_POSITIONS"]

TRANSFORMER_KINDS = ("coor", "deformable", "swin", "vanilla", "none")
POSITIONS = ("none", "linear", "fourier")  # what the coordinate kinds add to Q/K before sampling
# The position of each kind when none is given: the Fourier coordinate-index features for the
# paper's coordinate attention (the reading that measured best, bench/EXPERIMENTS.md), none for
# the others (DAT's deformable attention has no such features).
DEFAULT_POSITIONS = {"coor": "fourier"}


def default_position(transformer: str) -> str:
    """The ``position`` a detector of kind ``transformer`` gets when none is given."""
    return DEFAULT_POSITIONS.get(transformer, "none")
VANILLA_POSITIONS = ("none", "sincos")  # what the vanilla kind adds to Q/K


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

    Readings of the coordinate module (``"coor"`` and ``"deformable"``; the other kinds
    accept and ignore them, so one set of options serves a sweep over the kinds, but bad
    values are refused whatever the kind).  The defaults: bounded offsets around the
    reference grid, one coordinate group, no learning-rate multiplier, and for ``"coor"``
    the Fourier coordinate-index features:

    * ``coord_mode`` -- ``"offset"`` (reference grid + bounded learned offset) or
      ``"absolute"`` (the released code's ReLU coordinates); see :class:`CoordinateModule`.
    * ``position`` -- ``"none"``, ``"linear"`` or ``"fourier"``: "coordinate-index features
      x^p are sampled at each coordinate", so ``Q^p`` and ``K^p`` carry the position they
      were sampled at (:mod:`coorkern.models.positions`).  ``None`` (default): the kind's
      own, :data:`DEFAULT_POSITIONS` -- ``"fourier"`` for ``"coor"`` (it beat ``"none"``
      and ``"linear"`` on the ISBI validation images), ``"none"`` for ``"deformable"``.
    * offsets that can move ("sampling points which are learned from the queries by a
      coordinate module"): ``offset_range`` (largest offset, token cells),
      ``offset_init_std`` (initial spread), ``coord_lr_mult`` (learning-rate multiplier of
      the coordinate modules, applied by :meth:`param_groups`), ``coord_source``
      (``"features"`` or ``"queries"``: what the coordinates are predicted from) and
      ``coord_groups`` (coordinate groups of heads; a stage with fewer heads than
      ``coord_groups`` gives each head its own coordinates, so with the paper's heads
      ``(8, 4, 2, 1)`` any power of two works).
    * ``vanilla_position`` -- ``"none"`` or ``"sincos"``: the standard 2-D sine-cosine
      position encoding for ``transformer="vanilla"``.
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
        coord_mode: str = "offset",
        coord_groups: int = 1,
        offset_range: float = 4.0,
        offset_init_std: float = 1e-2,
        coord_lr_mult: float = 1.0,
        coord_source: str = "features",
        position: Optional[str] = None,
        vanilla_position: str = "none",
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
        self.sample = sample_mode(transformer, sample)
        self.window_size = check_positive_int("window_size", window_size)
        self.mlp_ratio = check_number("mlp_ratio", mlp_ratio, minimum=0.0, strict=True)
        self.coord_mode = check_choice("coord_mode", coord_mode, COORD_MODES)
        self.coord_groups = check_positive_int("coord_groups", coord_groups)
        self.offset_range = check_number("offset_range", offset_range, minimum=0.0)
        self.offset_init_std = check_number("offset_init_std", offset_init_std, minimum=0.0)
        self.coord_lr_mult = check_number("coord_lr_mult", coord_lr_mult, minimum=0.0)
        self.coord_source = check_choice("coord_source", coord_source, COORD_SOURCES)
        self.position = check_choice(
            "position", default_position(self.transformer) if position is None else position, POSITIONS)
        self.vanilla_position = check_choice("vanilla_position", vanilla_position, VANILLA_POSITIONS)

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
                    window_size=window_size,
                    shifted=block_index % 2 == 1,
                    **self._block_options(self.heads[stage]),
                ))
                block_index += 1
            self.decoder.append(DecoderStage(channels[level + 1], channels[level], dim, nn.Sequential(*blocks)))
        self.final = DecoderStage(channels[1], channels[0], c, nn.Identity())
        self.head = nn.Conv2d(c, num_landmarks, 1)

    def _block_options(self, heads: int) -> dict:
        """The kind-specific options of a decoder block with ``heads`` heads."""
        if self.transformer == "vanilla":
            return dict(position=self.vanilla_position)
        if self.transformer not in COORDINATE_KINDS:
            return {}
        groups = min(self.coord_groups, heads)
        if heads % groups:
            raise ValueError(f"coord_groups ({self.coord_groups}) must divide the heads of every decoder stage "
                             f"with more heads than it, got a stage with {heads} heads (heads={self.heads})")
        return dict(coord_mode=self.coord_mode, coord_groups=groups, offset_range=self.offset_range,
                    offset_init_std=self.offset_init_std, coord_source=self.coord_source, position=self.position)

    @property
    def config(self) -> dict:
        """The constructor arguments that rebuild this model: ``CoorDetector(**model.config)``.

        JSON-friendly (sequences as lists), as the runs store it in their config and
        checkpoints (``model_config``).  A stored config lacking a key gets its default.
        """
        return dict(
            in_channels=self.in_channels, num_landmarks=self.num_landmarks, base_channels=self.base_channels,
            depths=list(self.depths), heads=list(self.heads), mlp_ratio=self.mlp_ratio, transformer=self.transformer,
            sample=self.sample, coord_mode=self.coord_mode, coord_groups=self.coord_groups,
            offset_range=self.offset_range, offset_init_std=self.offset_init_std, coord_lr_mult=self.coord_lr_mult,
            coord_source=self.coord_source, position=self.position, vanilla_position=self.vanilla_position,
            token_strides=list(self.token_strides), window_size=self.window_size,
        )

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups: the coordinate modules at ``lr * coord_lr_mult``, the rest at ``lr``.

        As deformable attention trains its offset network (DAT, Deformable DETR).  One
        group of all parameters (the order of :meth:`parameters`) when ``coord_lr_mult``
        is 1 or there is no coordinate module, so an optimizer state saved from
        ``model.parameters()`` still loads.  Every group carries ``"name"`` and
        ``"lr_mult"`` (optimizers keep extra keys): a scheduler that sets absolute rates
        (``CyclicLR``, ``OneCycleLR``) needs its per-group rates multiplied by ``lr_mult``.
        """
        lr = check_number("lr", lr, minimum=0.0)
        coordinate = [p for m in self.modules() if isinstance(m, CoordinateModule) for p in m.parameters()]
        if not coordinate or self.coord_lr_mult == 1.0:
            return [dict(name="model", params=list(self.parameters()), lr=lr, lr_mult=1.0)]
        ids = {id(p) for p in coordinate}
        return [
            dict(name="model", params=[p for p in self.parameters() if id(p) not in ids], lr=lr, lr_mult=1.0),
            dict(name="coordinates", params=coordinate, lr=lr * self.coord_lr_mult, lr_mult=self.coord_lr_mult),
        ]

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
