"""Training defaults: the profiles of ``coorkern train --profile {auto,cpu,paper}`` and the synthetic defaults.

:data:`PROFILES`, for real data:

* ``paper`` -- the paper's configuration (Section V.A): its input sizes (ceph 512x416,
  hand 512x384, chest 512x512), base width 64, depths ``(1, 1, 1, 1)``, heads
  ``(8, 4, 2, 1)``, batch 2, Adam with a cyclic learning rate 1e-3 <-> 1e-4, the central
  loss with r = 2 and the checkpoint of minimum validation loss.  The paper gives no
  epoch count; 100 is ours.  The spine (which the paper does not train) gets 1024x512,
  untested until a GPU runs it.  The default for real data on a CUDA machine.
* ``cpu`` -- what trains one real-data run in about half an hour on a 2-core CPU for
  every transformer kind: half the paper's input size, base width 8, batch 4, resized
  images cached in memory, and a budget of :data:`CPU_TRAIN_IMAGES` (6,000) training
  images seen: the epochs are ``ceil(6000 / training images)``, derived once the training
  split is loaded (71 of the 85 ISBI 2015 images of ``coorkern.experiments``' protocol,
  11 of hand's 548, 30 of chest's 206 after the validation part is carved off); the rest
  as in ``paper``.  Measured per kind with ``bench/train_profile.py`` (at 60 epochs of 100
  images, the same 6,000 images; :attr:`Profile.epochs` keeps those reference counts for
  the bench tools); against 320x256 / 192x160 / base 16 / 80-epoch alternatives of about
  the same cost (``bench/profile_search.py``) none was significantly more accurate on ISBI
  2015 (tables in ``bench/EXPERIMENTS.md``).  The spine has its own budget,
  :data:`CPU_SPINE_TRAIN_IMAGES` (9,000: 25 epochs of its 361 ``holdout_train`` images),
  and input, 320x128: 6,000 images left 68 landmarks unconverged, and 9,000 at 320x128 is
  what keeps a run of the default detector within 35 minutes of one core (timings in
  docs/experiments.md, spine).  The default for real data without CUDA.
* ``auto`` -- ``paper`` on CUDA, ``cpu`` otherwise, for real data; synthetic data keeps
  :data:`SYNTHETIC_DEFAULTS`.

A profile only fills the options that the command line does not give: ``--profile
cpu --epochs 5`` trains 5 epochs (``--epochs`` wins over the budget), ``--train-images
3000`` halves the budget.

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
           "apply_profile", "budget_epochs", "CPU_TRAIN_IMAGES", "CPU_SPINE_TRAIN_IMAGES"]

PROFILE_CHOICES = ("auto", "cpu", "paper")
REAL_DATASETS = ("isbi2015", "hand", "chest", "spine", "csv")
CPU_TRAIN_IMAGES = 6000  # the cpu profile's budget: training images seen per run
# The spine's budget: 68 landmarks had not converged after 6,000 images (val MRE still falling every
# epoch); 9,000 keeps a run of the default detector within 35 minutes of one core (docs/experiments.md).
CPU_SPINE_TRAIN_IMAGES = 9000
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
    """Training defaults; ``image_size`` ``(H, W)`` and ``epochs`` per dataset, ``data_options`` extra dataset options.

    With ``train_images`` (a budget of training images seen; ``dataset_train_images``
    overrides it per dataset), the epochs of a run are derived from its training split
    (:func:`budget_epochs`) and ``epochs`` only records the counts the budget gave where
    the profile was measured.
    """

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
    train_images: Optional[int] = None
    dataset_train_images: dict = field(default_factory=dict)

    def budget(self, data: str) -> Optional[int]:
        """Training images seen per run on dataset ``data`` (``None``: the profile counts epochs)."""
        return self.dataset_train_images.get(data, self.train_images) if self.train_images else None

    def options(self, data: str) -> dict:
        """The training options (``argparse`` destinations) this profile sets for dataset ``data``."""
        return {
            "image_size": list(self.image_size.get(data, self.image_size["csv"])),
            "base_channels": self.base_channels,
            "batch_size": self.batch_size,
            "epochs": None if self.train_images else self.epochs.get(data, self.epochs["csv"]),
            "train_images": self.budget(data),
            "depths": list(self.depths),
            "heads": list(self.heads),
            "lr": self.lr,
            "min_lr": self.min_lr,
            "loss": self.loss,
            "r": self.r,
            "select": self.select,
        }


def budget_epochs(train_images: int, train_count: int) -> int:
    """Epochs that show at least ``train_images`` training images: ``ceil(train_images / train_count)``."""
    if train_images < 1 or train_count < 1:
        raise ValueError(f"train_images and train_count must be >= 1, got {train_images} and {train_count}")
    return -(-train_images // train_count)


PROFILES = {
    "paper": Profile(
        "paper",
        image_size={"isbi2015": (512, 416), "hand": (512, 384), "chest": (512, 512), "spine": (1024, 512),
                    "csv": (512, 512), "synthetic": (256, 256)},
        base_channels=64, batch_size=2,
        epochs=dict.fromkeys(("isbi2015", "hand", "chest", "spine", "csv", "synthetic"), 100),
    ),
    "cpu": Profile(
        "cpu",
        image_size={"isbi2015": (256, 208), "hand": (256, 192), "chest": (256, 256), "spine": (320, 128),
                    "csv": (256, 256), "synthetic": (128, 128)},
        base_channels=8, batch_size=4, data_options={"cache": True}, train_images=CPU_TRAIN_IMAGES,
        dataset_train_images={"spine": CPU_SPINE_TRAIN_IMAGES},
        # What the budget came to where the profile was measured (ISBI 2015: 100 training images).
        epochs={"isbi2015": 60, "hand": 10, "chest": 26, "spine": 25, "csv": 60, "synthetic": 10},
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
    if "train_images" in explicit and "epochs" not in explicit:
        args.epochs = None  # an explicit budget beats the profile's epoch count
    given = {key for key, _ in (args.data_option or [])}
    args.data_option = list(args.data_option or []) + [
        (key, value) for key, value in profile.data_options.items() if key not in given
    ]
    h, w = args.image_size
    length = (f"{args.epochs} epochs" if args.epochs is not None else
              f"{args.train_images} training images seen (epochs from the training split's size)")
    note = (f"profile {name}: {h}x{w}, base {args.base_channels}, batch {args.batch_size}, {length}, "
            f"{args.loss} loss, best checkpoint by validation {args.select}")
    if requested == "auto":
        why = "a CUDA device" if name == "paper" else "no CUDA device"
        other = "cpu" if name == "paper" else "paper"
        note += f" (chosen for {args.data} with {why}; --profile {other} gives the {other} profile)"
    return note
