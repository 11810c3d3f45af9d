"""Training defaults: the profiles of ``coorkern train --profile {auto,cpu,paper}`` and the synthetic defaults.

:data:`PROFILES`, for real data:

* ``paper`` -- the paper's configuration (Section V.A): its input sizes (ceph 512x416,
  hand 512x384, chest 512x512), base width 64, depths ``(1, 1, 1, 1)``, heads
  ``(8, 4, 2, 1)``, batch 2, Adam with a cyclic learning rate 1e-3 <-> 1e-4, the central
  loss with r = 2 and the checkpoint of minimum validation loss.  The paper gives no
  epoch count; 100 is ours.  The default for real data on a CUDA machine.
* ``cpu`` -- what trains one real-data run in about half an hour on a 2-core CPU for
  every transformer kind: half the paper's input size, base width 8, batch 4, resized
  images cached in memory, and about 6,000 training images seen (60 epochs of ISBI
  2015's 100 training images in ``coorkern.experiments``' protocol; 26 of chest's 229, 10
  of hand's 609); the rest as in ``paper``.  Measured per kind with ``bench/train_profile.py``;
  against 320x256 / 192x160 / base 16 / 80-epoch alternatives of about the same cost
  (``bench/profile_search.py``) none was significantly more accurate on ISBI 2015 (tables in
  ``bench/EXPERIMENTS.md``).  The default for real data without CUDA.
* ``auto`` -- ``paper`` on CUDA, ``cpu`` otherwise, for real data; synthetic data keeps
  :data:`SYNTHETIC_DEFAULTS`.

A profile only fills the options that the command line does not give: ``--profile
cpu --epochs 5`` trains 5 epochs.

:data:`SYNTHETIC_DEFAULTS`, by device type (``cpu``/``cuda``): what a training run on the
built-in synthetic radiographs uses for the options neither the command line nor a
profile set -- a small detector and a few minutes of training on a CPU, the paper's
width and a longer run on a GPU.  They make ``coorkern train`` without arguments a quick
demonstration on either machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["Profile", "PROFILES", "PROFILE_CHOICES", "REAL_DATASETS", "SYNTHETIC_DEFAULTS", "resolve_profile",
           "apply_profile"]

PROFILE_CHOICES = ("auto", "cpu", "paper")
REAL_DATASETS = ("isbi2015", "hand", "chest", "csv")
# Hardware-dependent defaults of the options no profile set (synthetic data; the sample counts
# apply to synthetic data only).  image_size None: the dataset's own default size.
SYNTHETIC_DEFAULTS = {
    "cpu": dict(image_size=(128, 128), base_channels=8, epochs=10, batch_size=8, train_samples=600,
                val_samples=64, test_samples=200),
    "cuda": dict(image_size=None, base_channels=64, epochs=40, batch_size=4, train_samples=800,
                 val_samples=100, test_samples=200),
}


@dataclass(frozen=True)
class Profile:
    """Training defaults; ``image_size`` ``(H, W)`` and ``epochs`` per dataset, ``data_options`` extra dataset options."""

    name: str
    image_size: dict
    base_channels: int
    batch_size: int
    epochs: dict
    depths: tuple = (1, 1, 1, 1)
    heads: tuple = (8, 4, 2, 1)
    lr: float = 1e-3
    min_lr: float = 1e-4
    loss: str = "central"
    r: float = 2.0
    select: str = "loss"
    data_options: dict = field(default_factory=dict)

    def options(self, data: str) -> dict:
        """The training options (``argparse`` destinations) this profile sets for dataset ``data``."""
        return {
            "image_size": list(self.image_size.get(data, self.image_size["csv"])),
            "base_channels": self.base_channels,
            "batch_size": self.batch_size,
            "epochs": self.epochs.get(data, self.epochs["csv"]),
            "depths": list(self.depths),
            "heads": list(self.heads),
            "lr": self.lr,
            "min_lr": self.min_lr,
            "loss": self.loss,
            "r": self.r,
            "select": self.select,
        }


PROFILES = {
    "paper": Profile(
        "paper",
        image_size={"isbi2015": (512, 416), "hand": (512, 384), "chest": (512, 512), "csv": (512, 512),
                    "synthetic": (256, 256)},
        base_channels=64, batch_size=2, epochs=dict.fromkeys(("isbi2015", "hand", "chest", "csv", "synthetic"), 100),
    ),
    "cpu": Profile(
        "cpu",
        image_size={"isbi2015": (256, 208), "hand": (256, 192), "chest": (256, 256), "csv": (256, 256),
                    "synthetic": (128, 128)},
        base_channels=8, batch_size=4, data_options={"cache": True},
        epochs={"isbi2015": 60, "hand": 10, "chest": 26, "csv": 60, "synthetic": 10},
    ),
}


def resolve_profile(requested: str, data: str, device) -> Optional[str]:
    """The profile ``auto`` stands for (``None``: synthetic data keeps the command's own defaults)."""
    if requested not in PROFILE_CHOICES:
        raise ValueError(f"profile must be one of {PROFILE_CHOICES}, got {requested!r}")
    if requested != "auto":
        return requested
    if data not in REAL_DATASETS:
        return None
    return "paper" if torch.device(device).type == "cuda" else "cpu"


def apply_profile(args, explicit: dict, device) -> Optional[str]:
    """Fill the options of ``args`` that are not in ``explicit`` (the command line's) from the profile.

    Sets ``args.profile`` to the profile used (left as it is where none applies) and
    returns a line saying what was applied, or ``None``.
    """
    requested = args.profile
    name = resolve_profile(requested, args.data, device)
    if name is None:
        return None
    args.profile = name
    profile = PROFILES[name]
    for key, value in profile.options(args.data).items():
        if key not in explicit:
            setattr(args, key, value)
    given = {key for key, _ in (args.data_option or [])}
    args.data_option = list(args.data_option or []) + [
        (key, value) for key, value in profile.data_options.items() if key not in given
    ]
    h, w = args.image_size
    note = (f"profile {name}: {h}x{w}, base {args.base_channels}, batch {args.batch_size}, {args.epochs} epochs, "
            f"{args.loss} loss, best checkpoint by validation {args.select}")
    if requested == "auto":
        why = "a CUDA device" if name == "paper" else "no CUDA device"
        other = "cpu" if name == "paper" else "paper"
        note += f" (chosen for {args.data} with {why}; --profile {other} gives the {other} profile)"
    return note
