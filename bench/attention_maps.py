"""Where a trained detector's attention looks: per transformer block, coordinates, entropy and mass near the landmarks.

    python bench/attention_maps.py --checkpoint RUN [--data NAME] [--root DIR] [--split SPLIT]
                                   [--image-size H W] [--images N] [--radius R] [--radius-unit cells|pixels]
                                   [--stage S] [--device auto] --out DIR

``RUN`` is a checkpoint file or a run folder (its ``checkpoint_best.pt``); the data set
defaults to the run's own (root, test split, training size), as ``coorkern evaluate``.
For the first ``N`` images of the split the detector runs once with every attention call
captured (:mod:`coorkern.models.attention_probe`; the numbers:
:mod:`coorkern.engine.attention_focus`), and each block's attention
probabilities are computed eagerly from the tensors it attended with -- the sampled Q/K for
``coor``, the sampled K/V for ``deformable``, the tokens for ``vanilla``, the
within-window softmax with its bias and mask for ``swin`` -- a chunk of queries at a time
(no ``N x N`` matrix is held).  ``probabilities @ values`` is compared with the output the
model computed (``output_max_abs_error``), so the numbers describe the attention the model
really runs.

Writes ``DIR/attention.json``::

    {"checkpoint", "data", "split", "image_size": [H, W], "images": n, "image_ids": [...],
     "transformer": kind, "message": str (only when there is no attention),
     "radius": {"value": R, "unit": "cells" | "pixels"},
     "figure_block": name | null, "figures": [png paths],
     "stages": [{                          # one per transformer block, coarse (1/16) to fine (1/2)
        "name": "decoder3.block0", "stage": 3, "block": 0, "kind": "coor", "heads": h,
        "coord_groups": g | null,          # coordinate groups (per-head coordinates when > 1)
        "token_grid": [th, tw], "tokens": N, "token_stride_px": s,
        "radius_cells": r, "radius_px": r * s,
        "displacement_cells": {"mean", "p95", "max"} | null,   # coordinate kinds only
        "entropy": mean over heads and queries of -sum p log p (nats),
        "uniform_entropy": log N,          # entropy of uniform attention over all tokens
        "window_tokens": T,                # swin only: its uniform attention has entropy log T
        "landmark_mass": mean share of a query's attention on keys near a landmark,
        "landmark_area_share": share of the keys near a landmark (what uniform attention gives),
        "landmark_mass_ratio": landmark_mass / landmark_area_share,
        "output_max_abs_error": max |P V - model output|}]}

Radius: a key is *near a landmark* when its position lies within ``r`` token cells of the
block's grid of any ground-truth landmark.  ``--radius-unit cells`` (default, ``--radius 2``):
``r = R`` cells at every block, i.e. ``R * s`` input pixels for a block whose token cell
spans ``s`` input pixels (16 at 1/16 ... 4 at the 1/2 stage's 2x2 patches) -- the same
neighbourhood of tokens around a landmark at every scale.  ``--radius-unit pixels``: ``r =
R / s`` cells, the same image region at every block (a radius under half a coarse cell can
hold no token centre).  Key positions: the sampled coordinates for ``coor`` (K sampled at
``p``) and ``deformable`` (K/V sampled at ``p``), the token centres for ``vanilla`` and
``swin``; landmarks are mapped from input pixels to cells with token ``j`` centred on pixel
``j s + (s - 1) / 2``.  ``displacement_cells`` is the distance of the coordinates from the
reference grid (each token's own centre), in cells, over tokens, heads and images.

One PNG per image (``DIR/attention_<id>.png``): for one block (``--stage S``: the last
block of decoder stage S; default the finest stage with attention), the attention of the
query tokens nearest three ground-truth landmarks, averaged over heads, over the image,
with the landmark (green circle), the query token (cyan star), the query's own sampling
coordinates (orange x) and the positions of its most attended keys (white dots) marked.
``transformer="none"`` has no attention: the tool says so and writes the JSON with no stages.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from coorkern.engine.checkpoints import model_from_checkpoint
from coorkern.engine.cli_args import HelpFormatter, positive_float, positive_int
from coorkern.engine.files import write_json
from coorkern.engine.inference import add_evaluation_options, evaluation_setup_or_error
from coorkern.engine.attention_focus import BlockStatistics, measure_checkpoint
from coorkern.models.attention_probe import AttentionRows, attention_blocks, pixels_to_cells, token_centres

__all__ = ["build_parser", "draw_figure", "main"]

FIGURE_QUERIES = 3  # landmarks whose query tokens a figure shows
TOP_KEYS = 8  # most attended keys marked per head in a figure


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/attention_maps.py", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_evaluation_options(p)  # --checkpoint, --data, --root, --split, --image-size, --device
    p.add_argument("--images", type=positive_int, default=4, help="images of the split to average over")
    p.add_argument("--radius", type=positive_float, default=2.0, help="radius around each landmark")
    p.add_argument("--radius-unit", choices=("cells", "pixels"), default="cells",
                   help="radius in token cells of each block, or in input pixels")
    p.add_argument("--stage", type=int, choices=range(4), help="decoder stage of the figures "
                   "(0 = 1/16 ... 3 = 1/2; its last block); default: the finest with attention")
    p.add_argument("--out", required=True, help="output folder")
    return p


def figure_block_name(model, stage: Optional[int]) -> Optional[str]:
    """The block a figure shows: the last block of ``stage`` (default: the finest stage with attention)."""
    blocks = attention_blocks(model)
    if stage is not None:
        blocks = [b for b in blocks if b.stage == stage]
        if not blocks:
            raise ValueError(f"--stage {stage}: decoder stage {stage} has no transformer block "
                             f"(depths={list(model.depths)})")
    return blocks[-1].name if blocks else None


def _safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def figure_queries(landmarks_px: torch.Tensor, stride: int, grid: tuple[int, int]) -> list[tuple[int, int]]:
    """``(landmark, query token)`` for up to three known landmarks spread over the list."""
    known = torch.nonzero(~torch.isnan(landmarks_px).any(-1)).flatten()
    if known.numel() == 0:
        return []
    picks = torch.linspace(0, known.numel() - 1, min(FIGURE_QUERIES, known.numel())).round().long()
    height, width = grid
    chosen = []
    for landmark in known[picks].unique().tolist():
        x, y = pixels_to_cells(landmarks_px[landmark], stride).round().long().tolist()
        chosen.append((landmark, min(max(y, 0), height - 1) * width + min(max(x, 0), width - 1)))
    return chosen


def splat(key_cells: torch.Tensor, weights: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Sum ``(heads, N)`` weights of keys at ``(heads, N, 2)`` cells onto the nearest cell of the grid ``(H, W)``."""
    height, width = grid
    cells = key_cells.round().long()
    inside = (cells[..., 0] >= 0) & (cells[..., 0] < width) & (cells[..., 1] >= 0) & (cells[..., 1] < height)
    heat = torch.zeros(height * width, dtype=weights.dtype, device=weights.device)
    heat.index_add_(0, (cells[..., 1] * width + cells[..., 0])[inside], weights[inside])
    return heat.reshape(height, width)


def draw_figure(path: Path, item: dict, rows: AttentionRows, stats: BlockStatistics) -> Path:
    """The attention of the query tokens nearest three landmarks of ``item`` over its image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stride, grid = stats.block.token_stride, stats.grid
    image = item["image"][0].float().cpu().numpy()
    landmarks = item["landmarks"].float()
    queries = figure_queries(landmarks, stride, grid)
    fig = Figure(figsize=(4.2 * max(len(queries), 1), 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(queries), 1), squeeze=False)[0]
    centres = token_centres(*grid)
    coords = rows.capture.head_coords(rows.item)

    def to_px(cells: torch.Tensor) -> np.ndarray:
        return (cells.float().cpu() * stride + (stride - 1) / 2).numpy()

    probabilities = rows.probabilities(torch.tensor([q for _, q in queries], dtype=torch.long,
                                                    device=rows.queries.device)).cpu() if queries else None
    key_cells = rows.key_cells.cpu()
    for column, (ax, (landmark, query)) in enumerate(zip(axes, queries)):
        p = probabilities[:, column]  # (heads, N)
        heat = splat(key_cells, p / p.shape[0], grid).numpy()
        ax.imshow(image, cmap="gray")
        # Cells no key falls on stay transparent: the image shows where the attention is not.
        ax.imshow(np.ma.masked_less_equal(heat, 0.0), cmap="inferno", alpha=0.6, vmin=0.0,
                  vmax=max(float(heat.max()), 1e-12),
                  extent=(-0.5, grid[1] * stride - 0.5, grid[0] * stride - 0.5, -0.5))
        for head in range(p.shape[0]):
            top = torch.topk(p[head], min(TOP_KEYS, p.shape[1])).indices
            xy = to_px(key_cells[head, top])
            ax.scatter(xy[:, 0], xy[:, 1], s=8 + 60 * (p[head, top] / p[head].max()).numpy(), c="white",
                       edgecolors="black", linewidths=0.4)
        qx, qy = to_px(centres[query])
        if coords is not None:
            own = to_px(key_cells[:, query])
            for ox, oy in own:
                ax.plot([qx, ox], [qy, oy], color="orange", linewidth=0.8)
            ax.scatter(own[:, 0], own[:, 1], marker="x", c="orange", s=40)
        ax.scatter([qx], [qy], marker="*", c="cyan", s=120, edgecolors="black", linewidths=0.5)
        lx, ly = landmarks[landmark].tolist()
        ax.scatter([lx], [ly], s=160, facecolors="none", edgecolors="lime", linewidths=1.5)
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(image.shape[0] - 0.5, -0.5)
        ax.set_title(f"landmark {landmark}: query token ({query // grid[1]}, {query % grid[1]})", fontsize=9)
        ax.set_axis_off()
    if not queries:
        axes[0].imshow(image, cmap="gray")
        axes[0].set_title("no known landmark in this image", fontsize=9)
        axes[0].set_axis_off()
    fig.suptitle(f"{item['id']}: {stats.block.name} ({stats.kind}, {grid[0]}x{grid[1]} tokens of {stride} px)",
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Measure, write ``attention.json`` and the figures, print a table; returns the JSON's content."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt, target, device = evaluation_setup_or_error(parser, args)
    model = model_from_checkpoint(ckpt, device)
    try:
        figure_block = figure_block_name(model, args.stage)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    report = {"checkpoint": ckpt["path"], "data": target.name, "split": target.split,
              "image_size": list(target.image_size), "transformer": model.transformer,
              "radius": {"value": args.radius, "unit": args.radius_unit}, "figure_block": figure_block}
    figures = []

    def draw(item: dict, rows: AttentionRows, stats: BlockStatistics) -> None:
        if stats.block.name == figure_block:
            figures.append(draw_figure(out / f"attention_{_safe(item['id'])}.png", item, rows, stats))

    report.update(measure_checkpoint(model, target.dataset, args.images, radius=args.radius, unit=args.radius_unit,
                                     device=device, visit=draw))
    report["figures"] = [str(f) for f in figures]
    if report["stages"]:
        print(format_table(report))
    else:
        report["message"] = (f"transformer {model.transformer!r} with depths {list(model.depths)} has no attention "
                             "block: nothing to measure")
        print(report["message"])
    write_json(out / "attention.json", report)
    print(f"wrote {out / 'attention.json'} and {len(report['figures'])} figure(s)")
    return report


def format_table(report: dict) -> str:
    radius = report["radius"]
    lines = [f"{report['data']} / {report['split']}: {report['images']} image(s), transformer "
             f"{report['transformer']!r}, radius {radius['value']:g} {radius['unit']}",
             f"{'block':<16} {'grid':>7} {'disp mean/p95/max (cells)':>26} {'entropy/logN':>13} "
             f"{'mass':>6} {'area':>6} {'ratio':>6} {'err':>8}"]
    for s in report["stages"]:
        d = s["displacement_cells"]
        disp = f"{d['mean']:.2f}/{d['p95']:.2f}/{d['max']:.2f}" if d else "-"
        ratio = f"{s['landmark_mass_ratio']:.2f}" if s["landmark_mass_ratio"] is not None else "-"
        lines.append(f"{s['name']:<16} {s['token_grid'][0]:>3}x{s['token_grid'][1]:<3} {disp:>26} "
                     f"{s['entropy']:>6.2f}/{s['uniform_entropy']:<6.2f} {s['landmark_mass']:>6.3f} "
                     f"{s['landmark_area_share']:>6.3f} {ratio:>6} {s['output_max_abs_error']:>8.1e}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
