"""Looking inside a detector's attention: the tensors each block attends with, and its attention rows.

The attention modules never materialize an ``N x N`` attention matrix (the fused op and
SDPA do not need one).  To measure where a trained model looks, :func:`capture_attention`
runs the detector with every :meth:`TokenAttention.attend <coorkern.models.attention.TokenAttention.attend>`
wrapped, keeping what it was given (the Q/K/V maps after their positions, the coordinates)
and what it returned.  :class:`AttentionRows` then computes the attention probabilities of
one image from those tensors, eagerly and a chunk of queries at a time, with the same
conventions as the op:

* ``"coor"`` -- Q and K maps sampled at the coordinates (bilinear, ``align_corners=True``,
  zero padding), V tokens: ``softmax(scale Qs Ks^T)``; key ``j`` sits at coordinate ``p_j``;
* ``"deformable"`` -- Q tokens, K and V maps sampled at the coordinates; key ``j`` at ``p_j``;
* ``"vanilla"`` -- plain softmax attention of the tokens; keys at the token centres;
* ``"swin"`` -- the within-window softmax with the module's relative position bias and
  mask (:meth:`WindowAttention.attention_bias`), spread onto all ``N`` keys (zero outside
  the query's window); keys at the token centres.

``probabilities @ values`` reproduces the captured output (:meth:`AttentionRows.output_error`),
so what is measured is the attention the model computes.  Positions are in token cells of
the block's token grid: ``(x, y)`` with token ``(row, col)`` centred at ``(col, row)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import TokenAttention, WindowAttention

__all__ = ["AttentionBlock", "AttentionCapture", "AttentionRows", "attention_blocks", "capture_attention",
           "coords_to_cells", "pixels_to_cells", "token_centres"]


@dataclass
class AttentionBlock:
    """A transformer block of a :class:`~coorkern.models.CoorDetector` decoder and where its tokens sit."""

    stage: int  # decoder stage, 0 (1/16 of the input) ... 3 (1/2)
    index: int  # block within the stage
    attention: TokenAttention
    token_stride: int  # input pixels per token cell

    @property
    def name(self) -> str:
        return f"decoder{self.stage}.block{self.index}"


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """The attention of every decoder transformer block of ``model``, coarse to fine (none for ``"none"``)."""
    blocks = []
    for stage, decoder_stage in enumerate(model.decoder):
        transformer = decoder_stage.transformer
        for index, block in enumerate(transformer if isinstance(transformer, nn.Sequential) else ()):
            stride = 2 ** (model.num_downsamplings - 1 - stage) * block.token_stride
            blocks.append(AttentionBlock(stage, index, block.attn, stride))
    return blocks


@dataclass
class AttentionCapture:
    """What one :meth:`TokenAttention.attend` call was given and returned (batched, detached)."""

    block: AttentionBlock
    q: torch.Tensor  # (B, heads, H, W, d) map, position added
    k: torch.Tensor  # (B, heads, H, W, d) map, position added
    v: torch.Tensor  # (B, heads, H, W, d) map
    coords: Optional[torch.Tensor]  # (B, N, 2) or (B, heads, N, 2) normalized (x, y); None without coordinates
    output: torch.Tensor  # (B, heads, N, d)

    @property
    def kind(self) -> str:
        return self.block.attention.kind

    @property
    def grid(self) -> tuple[int, int]:
        return self.q.shape[2], self.q.shape[3]

    def head_coords(self, item: int) -> Optional[torch.Tensor]:
        """Image ``item``'s coordinates per head, ``(heads, N, 2)`` normalized; None without coordinates."""
        if self.coords is None:
            return None
        coords = self.coords[item]
        return coords.expand(self.q.shape[1], *coords.shape) if coords.dim() == 2 else coords


@torch.no_grad()
def capture_attention(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[AttentionCapture]]:
    """Run ``model(images)``; returns the logits and one :class:`AttentionCapture` per attention call.

    The model is unchanged afterwards (the wrappers are instance attributes, removed again).
    """
    captures: list[AttentionCapture] = []

    def wrapped(block: AttentionBlock):
        attend = block.attention.attend

        def attend_and_keep(q, k, v, coords):
            out = attend(q, k, v, coords)
            captures.append(AttentionCapture(block, q.detach(), k.detach(), v.detach(),
                                             None if coords is None else coords.detach(), out.detach()))
            return out

        return attend_and_keep

    blocks = attention_blocks(model)
    try:
        for block in blocks:
            block.attention.attend = wrapped(block)
        logits = model(images)
    finally:
        for block in blocks:
            block.attention.__dict__.pop("attend", None)
    return logits, captures


def token_centres(height: int, width: int, *, device=None) -> torch.Tensor:
    """``(H*W, 2)`` token centres ``(x, y)`` in token cells, row-major like the tokens."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack((xs, ys), dim=-1).reshape(-1, 2)


def coords_to_cells(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalized ``(x, y)`` (``align_corners=True``: -1 and +1 are the first and last token centres) -> token cells.

    A side of one token has no extent: its reference coordinate is 0 (:func:`reference_grid`),
    the cell 0.
    """
    size = coords.new_tensor([max(width - 1, 0), max(height - 1, 0)])
    return (coords.float() + 1.0) * 0.5 * size


def pixels_to_cells(points: torch.Tensor, token_stride: int) -> torch.Tensor:
    """Input-pixel ``(x, y)`` (pixel centres at integers) -> token cells of a grid ``token_stride`` pixels a cell.

    Token ``j`` covers pixels ``j s ... (j + 1) s - 1`` (the detector pads at the bottom/right
    only), so its centre is pixel ``j s + (s - 1) / 2``.
    """
    return (points.float() - (token_stride - 1) / 2) / token_stride


def _sample(fmap: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``(heads, H, W, d)`` map read at ``(heads, N, 2)`` coordinates -> ``(heads, N, d)`` (the op's sampling)."""
    channels_first = fmap.float().permute(0, 3, 1, 2)
    read = F.grid_sample(channels_first, coords.float()[:, None], mode="bilinear", padding_mode="zeros",
                         align_corners=True)
    return read[:, :, 0].transpose(1, 2)


class AttentionRows:
    """The attention probabilities of image ``item`` of a capture, computed eagerly a chunk of queries at a time.

    ``queries``, ``keys``, ``values``: ``(heads, N, d)`` as the attention uses them;
    ``key_cells``: ``(heads, N, 2)`` where every key sits, in token cells.
    """

    def __init__(self, capture: AttentionCapture, item: int = 0) -> None:
        self.capture, self.item = capture, item
        height, width = capture.grid
        heads, d = capture.q.shape[1], capture.q.shape[-1]
        self.tokens = height * width
        self.scale = d ** -0.5

        def tokens(m: torch.Tensor) -> torch.Tensor:
            return m[item].float().reshape(heads, self.tokens, d)

        coords = capture.head_coords(item)
        kind = capture.kind
        if kind == "coor":
            self.queries, self.keys, self.values = _sample(capture.q[item], coords), _sample(capture.k[item], coords), \
                tokens(capture.v)
        elif kind == "deformable":
            self.queries, self.keys, self.values = tokens(capture.q), _sample(capture.k[item], coords), \
                _sample(capture.v[item], coords)
        else:
            self.queries, self.keys, self.values = tokens(capture.q), tokens(capture.k), tokens(capture.v)
        if coords is not None:
            self.key_cells = coords_to_cells(coords, height, width)
        else:
            self.key_cells = token_centres(height, width, device=capture.q.device).expand(heads, -1, -1)
        self.window = _WindowBias(capture.block.attention, height, width) \
            if isinstance(capture.block.attention, WindowAttention) else None

    def probabilities(self, queries: torch.Tensor) -> torch.Tensor:
        """``(heads, len(queries), N)`` attention of the query tokens ``queries`` (a 1-D index tensor)."""
        logits = self.scale * self.queries[:, queries] @ self.keys.transpose(1, 2)
        if self.window is not None:
            logits = logits + self.window.rows(queries)
        return torch.softmax(logits, dim=-1)

    def chunks(self, size: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(query indices, probabilities)`` for all queries, ``size`` queries at a time."""
        for start in range(0, self.tokens, size):
            queries = torch.arange(start, min(start + size, self.tokens), device=self.queries.device)
            yield queries, self.probabilities(queries)

    def output_error(self, queries: torch.Tensor, probabilities: torch.Tensor) -> float:
        """Largest ``|probabilities @ values - captured output|`` over these queries: 0 up to rounding."""
        output = self.capture.output[self.item][:, queries].float()
        return float((probabilities @ self.values - output).abs().max())


class _WindowBias:
    """A :class:`WindowAttention`'s additive mask spread onto all keys: ``-inf`` outside the query's window.

    ``attention_bias`` is per window slot ``(windows, heads, T, T)``; this maps the slots of
    the padded, rolled window partition (the one :meth:`WindowAttention.attend` uses) back to
    token indices, padding slots to a dummy column ``N``.
    """

    def __init__(self, attention: WindowAttention, height: int, width: int) -> None:
        wh, ww, sh, sw = attention.layout(height, width)
        ph, pw = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww
        self.bias = attention.attention_bias(height, width).detach().float()  # (windows, heads, T, T)
        device = self.bias.device
        rows = (torch.arange(ph, device=device) + sh) % ph
        cols = (torch.arange(pw, device=device) + sw) % pw
        oy, ox = torch.meshgrid(rows, cols, indexing="ij")
        # (windows, T): the token at every slot of every window, N for a padding slot.
        by_window = [t.reshape(ph // wh, wh, pw // ww, ww).transpose(1, 2).reshape(-1, wh * ww) for t in (oy, ox)]
        real = (by_window[0] < height) & (by_window[1] < width)
        self.n = height * width
        self.slot_token = torch.where(real, by_window[0] * width + by_window[1], self.n)
        windows, slots = torch.nonzero(real, as_tuple=True)
        self.window_of = torch.empty(self.n, dtype=torch.long, device=device)
        self.slot_of = torch.empty(self.n, dtype=torch.long, device=device)
        tokens = self.slot_token[windows, slots]
        self.window_of[tokens], self.slot_of[tokens] = windows, slots
        self.window_tokens = wh * ww

    def rows(self, queries: torch.Tensor) -> torch.Tensor:
        """``(heads, len(queries), N)`` additive bias of the query tokens ``queries`` over all keys."""
        windows = self.window_of[queries]
        bias = self.bias[windows, :, self.slot_of[queries]].transpose(0, 1)  # (heads, c, T)
        heads, count, _ = bias.shape
        rows = bias.new_full((heads, count, self.n + 1), float("-inf"))
        rows.scatter_(2, self.slot_token[windows].expand(heads, -1, -1), bias)
        return rows[..., : self.n]
