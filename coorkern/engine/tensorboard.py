"""TensorBoard logging of a training run (``--tensorboard``), through ``torch.utils.tensorboard``.

Tags: ``train/loss`` and ``train/lr`` per step; per epoch ``train/loss_epoch``,
``val/loss``, ``val/mre``, ``val/sdr_<radius>``, ``perf/images_per_s``, and the images
``val/overlays`` (predicted red vs true green landmarks) and ``val/heatmaps`` (the
maximum over landmarks of the predicted probabilities) for a few validation images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["TensorBoardLogger", "require_tensorboard", "MISSING_MESSAGE"]

MISSING_MESSAGE = ("--tensorboard needs the tensorboard package: pip install 'coorkern[tensorboard]' "
                   "(or pip install tensorboard)")


def require_tensorboard() -> None:
    """ImportError with install advice when ``torch.utils.tensorboard`` cannot be used."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports tensorboard)
    except ImportError as exc:
        raise ImportError(MISSING_MESSAGE) from exc


class TensorBoardLogger:
    """Writes one event file under ``folder``; ImportError with install advice when tensorboard is missing."""

    def __init__(self, folder) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(log_dir=str(self.folder))

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, epoch: int, row: dict) -> None:
        """Scalars of one ``metrics.json`` row (``epoch`` counts from 1)."""
        names = {"train_loss": "train/loss_epoch", "val_loss": "val/loss", "images_per_s": "perf/images_per_s",
                 "lr": "train/lr_epoch"}
        for key, value in row.items():
            if key in names:
                self.writer.add_scalar(names[key], value, epoch)
            elif key.startswith("val_mre_"):
                self.writer.add_scalar("val/mre", value, epoch)
            elif key.startswith("val_sdr_"):
                self.writer.add_scalar(f"val/sdr_{key[len('val_sdr_'):]}", value, epoch)

    def images(self, epoch: int, overlays: list, heatmaps: torch.Tensor) -> None:
        """``overlays``: RGB PIL images; ``heatmaps`` ``(N, 1, H, W)`` in [0, 1]."""
        if overlays:
            size = overlays[0].size
            stack = np.stack([np.asarray(im.resize(size)) for im in overlays])  # (N, H, W, 3)
            self.writer.add_images("val/overlays", stack, epoch, dataformats="NHWC")
        if heatmaps is not None and heatmaps.numel():
            self.writer.add_images("val/heatmaps", heatmaps.float().clamp(0, 1).cpu(), epoch, dataformats="NCHW")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
