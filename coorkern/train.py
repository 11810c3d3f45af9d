"""Train the CoorTransformer landmark detector: ``coorkern train [options]`` (or ``python -m coorkern.train``).

With no arguments: trains a CPU-sized detector (a larger one on a GPU) on the built-in
synthetic radiographs with the central loss, evaluates on a held-out synthetic split and
prints MRE/SDR next to the naive baseline (the training set's mean landmark
positions).  Options may come from ``--config FILE`` (YAML/JSON; the command line
overrides it).  Every run writes a folder (``--out``, default ``runs/<time>-<data>``)::

    config.yaml            every resolved option: --config it (with a new --out) to rerun
    config.json            the same plus the dataset/model details and the environment
    metrics.json / .csv    per epoch: train loss, validation loss/MRE/SDR, lr, throughput
    curves.png             train/validation loss and validation MRE per epoch
    checkpoint_last.pt     model/optimizer/scheduler/epoch/RNG state (--resume from it)
    checkpoint_best.pt     the best epoch on the validation split (--select), with the
                           conformal uncertainty radii calibrated on that split
    test_metrics.json      final held-out metrics of the best checkpoint and the baseline,
                           the empirical coverage of the conformal radii, what selected the
                           checkpoint ("selection"; "test (optimistic)" with --val-split
                           test) and, for spine data, the Cobb angles' SMAPE ("cobb")
    per_landmark.png       held-out error per landmark
    overlays/*.png         predicted (red) vs true (green) landmarks on held-out images
    tensorboard/           with --tensorboard: scalars per step/epoch, validation images

Real data select the checkpoint on a validation part carved from the training split
(the last --val-fraction of it, listed in config.json; the spine: its case-disjoint
holdout_val rows) unless --val-split names a split (coorkern.engine.splits).  The
readings of the coordinate module (--coord-mode, --position, ...) are stored in the
config and the checkpoint's model config, so --config and --resume rebuild the model.

Checkpoints are written atomically (temporary file + ``os.replace``) and load with
``torch.load(path, weights_only=True)``.  Under ``torchrun`` the same command trains
with DistributedDataParallel (NCCL on GPUs, gloo on CPU); only rank 0 writes files.
This module parses the options; the run itself, step by step, is
:mod:`coorkern.engine.trainer`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import conformal
from . import data as data_mod
from .engine import profiles
from .engine.checkpoints import load_checkpoint
from .engine.cli_args import HelpFormatter, description, fraction, key_value, positive_float, positive_int, prog
from .engine.config import add_config_option, parse_with_config
from .engine.trainer import Options, run_training
from .losses import LOSSES, heatmap_loss
from .models import COORD_MODES, COORD_SOURCES, POSITIONS, TRANSFORMER_KINDS, VANILLA_POSITIONS

__all__ = ["build_parser", "parse_args", "main", "Options", "compute_loss", "LOSSES"]

compute_loss = heatmap_loss  # kept for callers of coorkern.train.compute_loss; the losses live in coorkern.losses
# Saved options of a --resume'd run that this invocation decides anew (where it writes, how it runs).
RESUME_OVERRIDES = ("resume", "out", "stop_after", "progress", "workers", "device", "threads", "overlays",
                    "cuda_graphs")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    kw = {"argument_default": argparse.SUPPRESS} if suppress_defaults else {}
    p = argparse.ArgumentParser(prog=prog("train"), description=description(__doc__),
                                formatter_class=HelpFormatter, **kw)
    add_config_option(p)
    g = p

    def add(*names, default=None, **options):
        if not suppress_defaults:
            options["default"] = default
        g.add_argument(*names, **options)

    g = p.add_argument_group("data")
    add("--data", default="synthetic", choices=data_mod.DATASETS, help="dataset format")
    add("--root", help="dataset folder (csv: the .csv/.json file or its folder); not needed for synthetic")
    add("--image-size", type=positive_int, nargs=2, metavar=("H", "W"),
        help="network input size; default 128x128 synthetic on CPU, 256x256 on GPU, the paper's sizes for real data")
    add("--protocol", choices=("paper", "challenge"), help="isbi2015 split: paper 150/250, challenge 150/150/100")
    add("--train-split", help="split to train on (default per dataset: train)")
    add("--val-split",
        help="split for model selection and the conformal calibration: default 'val' for synthetic, 'carved' "
             "for real data (a validation part carved from the training split: --val-fraction; spine: the "
             "case-disjoint holdout_val rows); the challenge protocol: test1; 'test' selects on the reported "
             "split, as the published protocols do (optimistic, and named so in test_metrics.json)")
    add("--val-fraction", type=fraction, default=0.1,
        help="with --val-split carved: the last fraction of the training split's images (in the data set's "
             "order) that validates instead of training")
    add("--test-split", help="held-out split for the final report (default: test; challenge: test2)")
    add("--train-samples", type=positive_int, help="synthetic: training images (default 600 on CPU)")
    add("--val-samples", type=positive_int, help="synthetic: validation images")
    add("--test-samples", type=positive_int, help="synthetic: test images")
    add("--difficulty", type=float, default=1.0, help="synthetic: scale of pose/deformation randomness")
    add("--augment", action=argparse.BooleanOptionalAction, default=None,
        help="random rotation/scale/translation/intensity (default: on for real data, off for synthetic)")
    add("--thresholds", type=positive_float, nargs="+", help="SDR radii (mm, px without spacing); default per dataset")
    add("--data-option", type=key_value, action="append", metavar="KEY=VALUE",
        help="extra load_dataset option, repeatable; VALUE is JSON or a string, e.g. annotator=senior "
             "(isbi2015), cv_fold=1, wrist_indices=[1,5] or landmark_indices=[0,4,8] (hand), strict=true, "
             "train_fraction=0.9, file=my.json (csv)")
    add("--workers", type=int, default=0, help="DataLoader worker processes")

    g = p.add_argument_group("model")
    add("--transformer", choices=TRANSFORMER_KINDS, default="coor",
        help="attention in the decoder: the paper's coor, or a Table IV baseline")
    add("--base-channels", type=positive_int, help="width of the first level (paper 64; default 8 on CPU)")
    add("--depths", type=int, nargs=4, default=[1, 1, 1, 1], help="transformer blocks per decoder stage")
    add("--heads", type=positive_int, nargs=4, default=[8, 4, 2, 1], help="attention heads per decoder stage")
    add("--mlp-ratio", type=positive_float, default=4.0, help="transformer MLP expansion")
    add("--head-bias", type=float, default=-4.0, help="initial bias of the heatmap logits (prior ~ sigmoid(bias))")

    g = p.add_argument_group("readings of the coordinate module (coor and deformable; docs/design/detector.md)")
    add("--coord-mode", choices=COORD_MODES, default="offset",
        help="offset: reference grid + bounded learned offset; absolute: the released code's ReLU coordinates")
    add("--coord-groups", type=positive_int, default=1, help="groups of heads sharing one set of coordinates")
    add("--offset-range", type=non_negative_float, default=4.0, help="largest offset, in token cells")
    add("--offset-init-std", type=non_negative_float, default=1e-2, help="initial spread of the offsets")
    add("--coord-lr-mult", type=non_negative_float, default=1.0,
        help="learning-rate multiplier of the coordinate modules (their own optimizer group)")
    add("--coord-source", choices=COORD_SOURCES, default="features",
        help="what the coordinates are predicted from: the block's features or its queries")
    add("--position", choices=POSITIONS,
        help="position added to Q/K before sampling (coordinate-index features); default: fourier for coor, "
             "none for deformable")
    add("--vanilla-position", choices=VANILLA_POSITIONS, default="none",
        help="transformer vanilla: the 2-D sine-cosine position encoding, or none")

    g = p.add_argument_group("optimization")
    add("--profile", choices=profiles.PROFILE_CHOICES, default="auto",
        help="defaults for the options not given (coorkern.engine.profiles): paper = the paper's configuration, cpu = "
             "~30 min per real-data run on 2 cores; auto = paper on CUDA, cpu without, for real data")
    add("--epochs", type=positive_int,
        help="epochs (default 10 on CPU, 40 on GPU for synthetic data; wins over --train-images)")
    add("--train-images", type=positive_int,
        help="budget of training images seen: epochs = ceil(budget / training images) (the cpu profile: "
             f"{profiles.CPU_TRAIN_IMAGES}, spine {profiles.CPU_SPINE_TRAIN_IMAGES})")
    add("--batch-size", type=positive_int,
        help="images per step and process (default 8 on CPU, 4 on GPU; the paper: 2)")
    add("--lr", type=positive_float, default=1e-3, help="peak learning rate of the cyclic schedule (Adam)")
    add("--min-lr", type=positive_float, default=1e-4, help="lowest learning rate of the cyclic schedule")
    add("--lr-cycles", type=positive_int, default=1,
        help="triangular cycles min-lr -> lr -> min-lr over the whole run")
    add("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    add("--loss", choices=LOSSES, default="central", help="heatmap loss")
    add("--r", type=float, default=2.0, help="central loss exponent r (0 = BCE)")
    add("--pos-weight", type=positive_float,
        help="--loss wbce: weight of the positive (target) term; default the map's area over the Gaussian's, "
             "H*W / (2 pi sigma^2)")
    add("--sigma", type=positive_float, default=2.0, help="Gaussian target sigma in pixels of the input")
    add("--select", choices=("mre", "loss"), default="mre", help="best checkpoint by validation MRE or loss")

    g = p.add_argument_group("runtime")
    add("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'")
    add("--threads", type=int, default=0,
        help="CPU threads for torch (0: torch's default, but 1 on machines with <= 2 cores, where a second "
             "thread was measured to slow training down 2-3x when the cores are shared)")
    add("--amp", choices=("bf16", "fp16"), help="mixed precision (autocast) dtype")
    add("--compile", action="store_true", default=False, help="torch.compile the model")
    add("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
        help="replay each training step (forward, loss, backward, Adam) from one CUDA graph "
             "(coorkern.engine.cuda_graphs): auto = on for one CUDA process without --amp fp16 and --compile, off "
             "on CPU and under DDP; on also captures a --compile'd model; the run's first lines say which")
    add("--seed", type=int, default=0, help="seed of the model init, data order, augmentation and synthetic data")
    add("--deterministic", action="store_true", default=False,
        help="deterministic algorithms only (bitwise reproducible runs and resumes)")
    add("--out", help="run folder (default: runs/<time>-<data>; with --resume: the checkpoint's folder)")
    add("--resume", help="checkpoint file or run folder to continue from (its options are reused)")
    add("--stop-after", type=positive_int,
        help="stop after this many epochs in this invocation (for time-limited jobs; continue with --resume)")
    add("--overlays", type=int, default=8, help="overlay PNGs of held-out images to write")
    add("--progress", action=argparse.BooleanOptionalAction, default=True,
        help="show a progress bar (on a terminal only: logs stay clean when stderr is redirected)")
    add("--tensorboard", action="store_true", default=False,
        help="write TensorBoard logs to <run>/tensorboard (needs pip install 'coorkern[tensorboard]')")

    g = p.add_argument_group("uncertainty")
    add("--coverage", type=fraction, default=0.9,
        help="coverage of the per-landmark conformal radii calibrated on the validation split after training")
    add("--conformal-score", choices=conformal.SCORES, default="none",
        help="scale of the radius per prediction: none (one radius per landmark) or peak (1 / heatmap peak)")
    return p


def parse_args(argv: Sequence[str]) -> Options:
    """Options from the command line over ``--config`` over (with ``--resume``) the checkpoint's.

    Bad options exit through ``parser.error``.
    """
    argv = list(argv)
    parser = build_parser()
    args, from_file = parse_with_config(parser, argv)
    explicit = {**from_file, **vars(build_parser(suppress_defaults=True).parse_args(argv))}
    resume_ckpt = None
    if args.resume:
        try:
            resume_ckpt = load_checkpoint(args.resume)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(str(exc))
        saved = dict(resume_ckpt["config"]["args"])
        # The saved options, except those given again on this command line (or its --config).
        for key in RESUME_OVERRIDES:
            saved.pop(key, None)
        saved.update(explicit)
        args = argparse.Namespace(**{**vars(args), **saved})
        if args.out is None:
            args.out = str(Path(resume_ckpt["path"]).parent)
    if args.min_lr > args.lr:
        parser.error(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    if args.pos_weight is not None and args.loss != "wbce":
        parser.error(f"--pos-weight is the weight of --loss wbce, not of --loss {args.loss}")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.data != "synthetic" and not args.root:
        parser.error(f"--data {args.data} needs --root (the folder with the data set's files)")
    return Options(args, parser, resume_ckpt, explicit)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run training; returns a dict with ``run_dir``, ``history``, ``test``/``baseline`` metrics and ``model``.

    Process-wide settings it changes (torch threads, deterministic algorithms) are restored
    on return, so it can be called in-process (tests, notebooks).
    """
    return run_training(parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
