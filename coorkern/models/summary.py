"""What a detector costs: parameters, an activation-memory estimate and the attention tokens per stage.

``python -m coorkern.models --summary`` prints it for the paper's configuration (or the one
given on its command line).
"""

from __future__ import annotations

import argparse
import copy
import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .attention import TokenAttention, sample_mode
from .detector import TRANSFORMER_KINDS, CoorDetector

__all__ = ["ModelSummary", "summary"]

# Always printed; the other constructor arguments only where they differ from the default.
_SHOWN = ("in_channels", "num_landmarks", "base_channels", "depths", "heads", "transformer", "token_strides")


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
    return ModelSummary(
        _shown_config(model), (height, width), batch_size, sum(by_part.values()), by_part, total[0], tokens
    )


def _shown_config(model: CoorDetector) -> dict:
    """The model's config as printed: :data:`_SHOWN`, the window for swin, and whatever differs from the default."""
    defaults = {name: p.default for name, p in inspect.signature(CoorDetector).parameters.items()}
    defaults["sample"] = sample_mode(model.transformer, None)  # the kind's own
    config = {}
    for key, value in model.config.items():
        value = tuple(value) if isinstance(value, list) else value
        default = tuple(defaults[key]) if isinstance(defaults[key], (list, tuple)) else defaults[key]
        if key in _SHOWN or (key == "window_size" and model.transformer == "swin") or value != default:
            config[key] = value
    return config


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

