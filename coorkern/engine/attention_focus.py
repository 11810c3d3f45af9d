"""Attention-focus numbers of a trained detector: how far its coordinates move, how spread its attention is,
and how much of it falls near the landmarks.

The paper claims that the CoorTransformer's attention is "more focused on the sparse
landmarks" (Section III.B).  :func:`measure` turns that into numbers per transformer block,
over the first images of a data set: the detector runs once per image with every attention
call captured (:mod:`coorkern.models.attention_probe`), the attention probabilities are
computed eagerly from what each block attended with, a chunk of queries at a time (no
``N x N`` matrix is held), and accumulated in a :class:`BlockStatistics`:

* ``displacement_cells`` -- distance of the sampling coordinates from each token's own
  centre, in token cells (mean, p95, max; coordinate kinds only);
* ``entropy`` -- mean over heads and queries of ``-sum p log p`` (nats), next to
  ``log N`` (uniform attention over every token);
* ``landmark_mass`` -- the mean share of a query's attention on keys within the radius of
  any ground-truth landmark, next to ``landmark_area_share`` (the share such keys hold, what
  uniform attention would give) and their ratio.

``bench/attention_maps.py`` (one checkpoint, with figures) and the transformer study's report
(:mod:`coorkern.engine.study_report`, every run) use it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ..models.attention_probe import (AttentionCapture, AttentionRows, attention_blocks, capture_attention,
                                      pixels_to_cells, token_centres)

__all__ = ["BlockStatistics", "QUERY_CHUNK", "measure", "measure_checkpoint"]

QUERY_CHUNK = 1024  # queries whose attention rows are held at once


class BlockStatistics:
    """Running sums of one block's measurements over images; ``radius`` in token cells or input pixels (``unit``)."""

    def __init__(self, capture: AttentionCapture, radius: float, unit: str) -> None:
        block = capture.block
        self.block, self.kind = block, capture.kind
        self.grid = capture.grid
        self.radius_cells = radius if unit == "cells" else radius / block.token_stride
        self.entropy = self.mass = self.share = 0.0
        self.rows = self.share_rows = 0
        self.error = 0.0
        self.displacements: list[np.ndarray] = []

    def add(self, rows: AttentionRows, landmarks_px: torch.Tensor) -> None:
        """Accumulate image ``rows.item`` with its ``(L, 2)`` landmarks in input pixels (NaN: missing)."""
        near = self.near_landmarks(rows.key_cells, landmarks_px)  # (heads, N)
        for queries, probabilities in rows.chunks(QUERY_CHUNK):
            self.entropy -= float(torch.special.xlogy(probabilities, probabilities).sum())
            self.mass += float((probabilities @ near.float()[..., None]).sum())
            self.rows += probabilities.shape[0] * probabilities.shape[1]
            self.error = max(self.error, rows.output_error(queries, probabilities))
        self.share += float(near.float().mean(-1).sum())
        self.share_rows += near.shape[0]
        if rows.capture.coords is not None:
            reference = token_centres(*self.grid, device=rows.key_cells.device)
            self.displacements.append((rows.key_cells - reference).norm(dim=-1).flatten().cpu().numpy())

    def near_landmarks(self, key_cells: torch.Tensor, landmarks_px: torch.Tensor) -> torch.Tensor:
        """``(heads, N)``: whether each key lies within the radius of a (known) landmark."""
        known = landmarks_px[~torch.isnan(landmarks_px).any(-1)]
        cells = pixels_to_cells(known.to(key_cells.device), self.block.token_stride)
        if cells.shape[0] == 0:
            return torch.zeros(key_cells.shape[:2], dtype=torch.bool, device=key_cells.device)
        distances = torch.cdist(key_cells, cells.expand(key_cells.shape[0], -1, -1))
        return (distances <= self.radius_cells).any(-1)

    def report(self) -> dict:
        attention = self.block.attention
        height, width = self.grid
        tokens = height * width
        mass, share = self.mass / self.rows, self.share / self.share_rows
        row = {
            "name": self.block.name, "stage": self.block.stage, "block": self.block.index, "kind": self.kind,
            "heads": attention.heads,
            "coord_groups": attention.coordinates.groups if attention.coordinates is not None else None,
            "token_grid": [height, width], "tokens": tokens, "token_stride_px": self.block.token_stride,
            "radius_cells": self.radius_cells, "radius_px": self.radius_cells * self.block.token_stride,
            "displacement_cells": None,
            "entropy": self.entropy / self.rows, "uniform_entropy": math.log(tokens),
            "landmark_mass": mass, "landmark_area_share": share,
            "landmark_mass_ratio": mass / share if share > 0 else None,
            "output_max_abs_error": self.error,
        }
        if self.kind == "swin":
            wh, ww, _, _ = attention.layout(height, width)
            row["window_tokens"] = wh * ww
        if self.displacements:
            values = np.concatenate(self.displacements)
            row["displacement_cells"] = {"mean": float(values.mean()), "p95": float(np.percentile(values, 95)),
                                         "max": float(values.max())}
        return row


Visitor = Callable[[dict, AttentionRows, BlockStatistics], None]


@torch.no_grad()
def measure(model, dataset, count: int, *, radius: float = 2.0, unit: str = "cells", device="cpu",
            visit: Optional[Visitor] = None) -> tuple[list[dict], list[str]]:
    """Statistics of every attention block of ``model`` over the first ``count`` images of ``dataset``.

    Returns the per-block rows (:meth:`BlockStatistics.report`, coarse to fine) and the image
    ids.  ``visit(item, rows, statistics)`` is called for every block of every image (the
    figures of ``bench/attention_maps.py``).
    """
    statistics: dict[str, BlockStatistics] = {}
    ids = []
    for index in range(min(count, len(dataset))):
        item = dataset[index]
        ids.append(str(item["id"]))
        _, captures = capture_attention(model, item["image"][None].to(device))
        for capture in captures:
            stats = statistics.setdefault(capture.block.name, BlockStatistics(capture, radius, unit))
            rows = AttentionRows(capture, 0)
            stats.add(rows, item["landmarks"])
            if visit is not None:
                visit(item, rows, stats)
    return [s.report() for s in statistics.values()], ids


def measure_checkpoint(model, dataset, count: int, **options) -> dict:
    """``{"images", "image_ids", "stages"}`` of :func:`measure`; no stages for a model without attention."""
    if not attention_blocks(model):
        return {"images": 0, "image_ids": [], "stages": []}
    stages, ids = measure(model, dataset, count, **options)
    return {"images": len(ids), "image_ids": ids, "stages": stages}
