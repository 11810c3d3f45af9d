"""Train the CoorTransformer landmark detector: ``python -m coorkern.train [options]``.

With no arguments: trains a CPU-sized detector (a larger one on a GPU) on the built-in
synthetic radiographs with the central loss, evaluates on a held-out synthetic split and
prints MRE/SDR next to the naive baseline (the training set's mean landmark
positions).  Every run writes a folder (``--out``, default ``runs/<time>-<data>``)::

    config.json            all options, resolved defaults and the environment
    metrics.json / .csv    per epoch: train loss, validation loss/MRE/SDR, lr, throughput
    checkpoint_last.pt     model/optimizer/scheduler/epoch/RNG state (--resume from it)
    checkpoint_best.pt     the best epoch on the validation split (--select)
    test_metrics.json      final held-out metrics of the best checkpoint and the baseline
    overlays/*.png         predicted (red) vs true (green) landmarks on held-out images

Checkpoints are written atomically (temporary file + ``os.replace``) and load with
``torch.load(path, weights_only=True)``.  Under ``torchrun`` the same command trains
with DistributedDataParallel (NCCL on GPUs, gloo on CPU); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from . import data as data_mod
from . import metrics, profiles
from ._runs import (HelpFormatter, atomic_write_bytes, build_model, description, load_checkpoint,
                    save_checkpoint, set_rng_state, write_json)
from .evaluate import autocast, device_or_error, evaluate_predictions, run_inference, write_overlays
from .models import TRANSFORMER_KINDS
from .ops.central_loss import central_loss_from_landmarks
from .reference import gaussian_heatmaps

__all__ = ["build_parser", "main", "compute_loss", "LOSSES"]

LOSSES = ("central", "bce", "focal", "wbce")
# Defaults that depend on the hardware: a small, quick configuration on CPU.
PROFILES = {
    "cpu": dict(image_size=(128, 128), base_channels=8, epochs=10, batch_size=8, train_samples=600,
                val_samples=64, test_samples=200),
    "cuda": dict(image_size=None, base_channels=64, epochs=40, batch_size=4, train_samples=800,
                 val_samples=100, test_samples=200),
}
SPLITS = {  # (train, validation for model selection, final test) per dataset
    "synthetic": ("train", "val", "test"),
    "isbi2015": ("train", "test", "test"),
    "hand": ("train", "test", "test"),
    "chest": ("train", "test", "test"),
    "csv": ("train", "test", "test"),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    kw = {"argument_default": argparse.SUPPRESS} if suppress_defaults else {}
    p = argparse.ArgumentParser(prog="python -m coorkern.train", description=description(__doc__),
                                formatter_class=HelpFormatter, **kw)
    g = p

    def add(*names, default=None, **options):
        if not suppress_defaults:
            options["default"] = default
        g.add_argument(*names, **options)

    g = p.add_argument_group("data")
    add("--data", default="synthetic", choices=data_mod.DATASETS, help="dataset format")
    add("--root", help="dataset folder (csv: the .csv/.json file or its folder); not needed for synthetic")
    add("--image-size", type=_positive_int, nargs=2, metavar=("H", "W"),
        help="network input size; default 128x128 synthetic on CPU, 256x256 on GPU, the paper's sizes for real data")
    add("--protocol", choices=("paper", "challenge"), help="isbi2015 split: paper 150/250, challenge 150/150/100")
    add("--train-split", help="split to train on (default per dataset: train)")
    add("--val-split", help="split for model selection (default: val for synthetic, test otherwise)")
    add("--test-split", help="held-out split for the final report (default: test; challenge: test2)")
    add("--train-samples", type=_positive_int, help="synthetic: training images (default 600 on CPU)")
    add("--val-samples", type=_positive_int, help="synthetic: validation images")
    add("--test-samples", type=_positive_int, help="synthetic: test images")
    add("--difficulty", type=float, default=1.0, help="synthetic: scale of pose/deformation randomness")
    add("--augment", action=argparse.BooleanOptionalAction, default=None,
        help="random rotation/scale/translation/intensity (default: on for real data, off for synthetic)")
    add("--thresholds", type=_positive_float, nargs="+", help="SDR radii (mm, px without spacing); default per dataset")
    add("--data-option", type=_key_value, action="append", metavar="KEY=VALUE",
        help="extra load_dataset option, repeatable; VALUE is JSON or a string, e.g. annotator=senior "
             "(isbi2015), cv_fold=1, wrist_indices=[1,5] or landmark_indices=[0,4,8] (hand), strict=true, "
             "train_fraction=0.9, file=my.json (csv)")
    add("--workers", type=int, default=0, help="DataLoader worker processes")

    g = p.add_argument_group("model")
    add("--transformer", choices=TRANSFORMER_KINDS, default="coor",
        help="attention in the decoder: the paper's coor, or a Table IV baseline")
    add("--base-channels", type=_positive_int, help="width of the first level (paper 64; default 8 on CPU)")
    add("--depths", type=int, nargs=4, default=[1, 1, 1, 1], help="transformer blocks per decoder stage")
    add("--heads", type=_positive_int, nargs=4, default=[8, 4, 2, 1], help="attention heads per decoder stage")
    add("--mlp-ratio", type=_positive_float, default=4.0, help="transformer MLP expansion")
    add("--head-bias", type=float, default=-4.0, help="initial bias of the heatmap logits (prior ~ sigmoid(bias))")

    g = p.add_argument_group("optimization")
    add("--profile", choices=profiles.PROFILE_CHOICES, default="auto",
        help="defaults for the options not given (coorkern.profiles): paper = the paper's configuration, cpu = "
             "~30 min per real-data run on 2 cores; auto = paper on CUDA, cpu without, for real data")
    add("--epochs", type=_positive_int, help="epochs (default 10 on CPU, 40 on GPU)")
    add("--batch-size", type=_positive_int,
        help="images per step and process (default 8 on CPU, 4 on GPU; the paper: 2)")
    add("--lr", type=_positive_float, default=1e-3, help="peak learning rate of the cyclic schedule (Adam)")
    add("--min-lr", type=_positive_float, default=1e-4, help="lowest learning rate of the cyclic schedule")
    add("--lr-cycles", type=_positive_int, default=1,
        help="triangular cycles min-lr -> lr -> min-lr over the whole run")
    add("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    add("--loss", choices=LOSSES, default="central", help="heatmap loss")
    add("--r", type=float, default=2.0, help="central loss exponent r (0 = BCE)")
    add("--sigma", type=_positive_float, default=2.0, help="Gaussian target sigma in pixels of the input")
    add("--select", choices=("mre", "loss"), default="mre", help="best checkpoint by validation MRE or loss")

    g = p.add_argument_group("runtime")
    add("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'")
    add("--threads", type=int, default=0,
        help="CPU threads for torch (0: torch's default, but 1 on machines with <= 2 cores, where a second "
             "thread was measured to slow training down 2-3x when the cores are shared)")
    add("--amp", choices=("bf16", "fp16"), help="mixed precision (autocast) dtype")
    add("--compile", action="store_true", default=False, help="torch.compile the model")
    add("--seed", type=int, default=0, help="seed of the model init, data order, augmentation and synthetic data")
    add("--deterministic", action="store_true", default=False,
        help="deterministic algorithms only (bitwise reproducible runs and resumes)")
    add("--out", help="run folder (default: runs/<time>-<data>; with --resume: the checkpoint's folder)")
    add("--resume", help="checkpoint file or run folder to continue from (its options are reused)")
    add("--stop-after", type=_positive_int,
        help="stop after this many epochs in this invocation (for time-limited jobs; continue with --resume)")
    add("--overlays", type=int, default=8, help="overlay PNGs of held-out images to write")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    return p


# ---------------------------------------------------------------------------
# Losses


def compute_loss(kind: str, logits: torch.Tensor, landmarks: torch.Tensor, sigma: float, r: float = 2.0):
    """Mean loss of ``(B, L, H, W)`` logits against Gaussian targets at ``landmarks (B, L, 2)``.

    ``central``: the fused central loss with targets built in-kernel; ``bce``, ``focal``
    (gamma 2) and ``wbce`` (positives weighted by the background/peak area ratio) build
    the target heatmaps explicitly (baselines of the paper's Table II).
    """
    logits = logits.float()
    if kind == "central":
        return central_loss_from_landmarks(logits, landmarks, sigma=sigma, r=r)
    h, w = logits.shape[-2:]
    target = gaussian_heatmaps(landmarks, h, w, sigma).to(logits.dtype)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "wbce":
        ratio = h * w / (2 * math.pi * sigma * sigma)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=logits.new_tensor(ratio))
    if kind == "focal":
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        return (ce * (1 - p_t) ** 2).mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


# ---------------------------------------------------------------------------
# Setup


class _Dist:
    """torchrun environment: rank/world size; ``active`` when WORLD_SIZE > 1."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def _resolve(args, device: torch.device) -> None:
    """Fill the hardware- and dataset-dependent defaults in place."""
    profile = PROFILES["cuda" if device.type == "cuda" else "cpu"]
    for key in ("base_channels", "epochs", "batch_size", "train_samples", "val_samples", "test_samples"):
        if getattr(args, key) is None:
            setattr(args, key, profile[key])
    if args.image_size is None:
        size = profile["image_size"] if args.data == "synthetic" else None
        args.image_size = list(size or data_mod.DEFAULT_IMAGE_SIZE[args.data])
    train, val, test = SPLITS[args.data]
    if args.data == "isbi2015" and args.protocol == "challenge":
        val, test = "test1", "test2"
    args.train_split = args.train_split or train
    args.val_split = args.val_split or val
    args.test_split = args.test_split or test
    if args.augment is None:
        args.augment = args.data != "synthetic"


def _data_options(args) -> dict:
    """The dataset options of this run (everything but split, size, augmentation, sample count)."""
    options = {"seed": args.seed}
    if args.data == "synthetic":
        options["difficulty"] = args.difficulty
    if args.data == "isbi2015" and args.protocol:
        options["protocol"] = args.protocol
    if args.thresholds:
        options["thresholds"] = args.thresholds
    options.update(dict(args.data_option or []))
    return options


def _dataset(args, split: str, augment: bool):
    options = {**_data_options(args), "augment": augment}
    if args.data == "synthetic":
        options["num_samples"] = {"train": args.train_samples, "val": args.val_samples,
                                  "test": args.test_samples}.get(split)
    try:
        return data_mod.load_dataset(args.data, args.root, split, tuple(args.image_size), **options)
    except TypeError as exc:  # an unknown --data-option
        raise ValueError(f"--data-option: {exc}") from None


def _key_value(text: str) -> tuple:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is (numbers, lists, true/false), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _model_config(args, num_landmarks: int) -> dict:
    return dict(in_channels=1, num_landmarks=num_landmarks, base_channels=args.base_channels,
                depths=list(args.depths), heads=list(args.heads), mlp_ratio=args.mlp_ratio,
                transformer=args.transformer)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(on)


class _Progress:
    """tqdm when installed, else a one-line text bar on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self.bar = None
        self.postfix = ""
        self._last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, mininterval=0.5)
            except ImportError:
                pass

    def update(self, **stats) -> None:
        self.n += 1
        text = ", ".join(f"{k}={v}" for k, v in stats.items())
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        now = time.time()
        # Redraw in place on a terminal; into a log file (not a TTY) write only the final line.
        tty = sys.stderr.isatty()
        if (tty and now - self._last > 0.5) or self.n == self.total:
            self._last = now
            width = 24
            done = int(width * self.n / max(self.total, 1))
            bar = "#" * done + "." * (width - done)
            sys.stderr.write(("\r" if tty else "") + f"{self.desc} [{bar}] {self.n}/{self.total} {text}")
            if self.n == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _history_csv(history: list) -> bytes:
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    return buf.getvalue().encode()


def _log(dist: _Dist, *parts) -> None:
    if dist.main:
        print(*parts, flush=True)


# ---------------------------------------------------------------------------
# Main


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run training; returns a dict with ``run_dir``, ``history``, ``test``/``baseline`` metrics and ``model``.

    Process-wide settings it changes (torch threads, deterministic algorithms) are restored
    on return, so it can be called in-process (tests, notebooks).
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _main(argv: list) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    resume_ckpt = None
    if args.resume:
        try:
            resume_ckpt = load_checkpoint(args.resume)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(str(exc))
        saved = dict(resume_ckpt["config"]["args"])
        # The saved options, except those given again on this command line.
        for key in ("resume", "out", "stop_after", "progress", "workers", "device", "threads", "overlays"):
            saved.pop(key, None)
        saved.update({k: v for k, v in explicit.items()})
        args = argparse.Namespace(**{**vars(args), **saved})
        if args.out is None:
            args.out = str(Path(resume_ckpt["path"]).parent)
    if args.min_lr > args.lr:
        parser.error(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.data != "synthetic" and not args.root:
        parser.error(f"--data {args.data} needs --root (the folder with the data set's files)")

    dist = _Dist()
    if args.device == "auto" and dist.active and torch.cuda.is_available():
        device = torch.device("cuda", dist.local_rank)
    else:
        device = device_or_error(parser, args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.active and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    note = profiles.apply_profile(args, explicit, device) if resume_ckpt is None else None
    if note:
        _log(dist, note)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)
    _resolve(args, device)
    _set_deterministic(args.deterministic)
    _seed_everything(args.seed)
    if args.amp == "fp16" and device.type == "cpu":
        _log(dist, "note: --amp fp16 on CPU runs without a gradient scaler")

    try:
        train_ds = _dataset(args, args.train_split, args.augment)
        val_ds = _dataset(args, args.val_split, False)
        test_ds = val_ds if args.test_split == args.val_split else _dataset(args, args.test_split, False)
    except (ValueError, data_mod.DatasetFormatError) as exc:
        parser.error(str(exc))
    if args.test_split == args.val_split:
        _log(dist, f"note: the best epoch is selected on the '{args.val_split}' split that is also reported as "
                   "held-out (the published protocols do this); the reported metrics are then optimistic. "
                   "Pass --val-split to select on a separate split.")
    num_landmarks = train_ds.num_landmarks
    mean_shape = metrics.mean_shape_baseline(train_ds.all_landmarks())
    thresholds = tuple(args.thresholds or train_ds.thresholds)

    model_config = _model_config(args, num_landmarks)
    model = build_model(model_config)
    # Start the heatmaps near the background level (prior probability ~1%), as detection heads do:
    # the first steps then refine peaks instead of pushing 99% of the pixels down.
    torch.nn.init.constant_(model.head.bias, args.head_bias)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.min_lr, weight_decay=args.weight_decay)
    sampler = DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=data_mod.collate, drop_last=True, persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        parser.error(f"--batch-size {args.batch_size} is larger than the training images per process "
                     f"({len(train_ds)} / {dist.world})")
    total_steps = steps_per_epoch * args.epochs
    half_cycle = max(1, total_steps // (2 * args.lr_cycles))
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=args.min_lr, max_lr=args.lr, step_size_up=half_cycle, mode="triangular",
        cycle_momentum=False,
    )
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" and device.type == "cuda" else None

    config = {
        "args": vars(args),
        "data": args.data,
        "root": str(Path(args.root).resolve()) if args.root else None,
        "image_size": list(args.image_size),
        "test_split": args.test_split,
        "data_options": _data_options(args),
        "model": model_config,
        "thresholds": list(thresholds),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                        "world_size": dist.world, "threads": torch.get_num_threads()},
    }
    history: list = []
    start_epoch = 0
    best = math.inf
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        if scaler is not None and "scaler" in resume_ckpt:
            scaler.load_state_dict(resume_ckpt["scaler"])
        set_rng_state(resume_ckpt["rng"])
        start_epoch = resume_ckpt["epoch"] + 1
        history = json.loads(resume_ckpt["history"])
        best = float(resume_ckpt["best"])

    train_model = model
    if dist.active:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    run_dir = Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.data}"
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", config)
        n_params = sum(p.numel() for p in model.parameters())
        _log(dist, f"coorkern.train: {args.data} {tuple(args.image_size)}, {len(train_ds)} train / {len(val_ds)} "
                   f"{args.val_split} / {len(test_ds)} {args.test_split} images, {num_landmarks} landmarks; "
                   f"CoorDetector(base={args.base_channels}, transformer={args.transformer}) {n_params:,} params; "
                   f"{args.loss} loss, {args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch_size}"
                   f"{f' x {dist.world} processes' if dist.active else ''}, device {device}; run folder {run_dir}")

    def loss_fn(logits, landmarks):
        return compute_loss(args.loss, logits, landmarks, args.sigma, args.r)

    t_start = time.time()
    stop_at = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, stop_at):
        sampler.set_epoch(epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        train_model.train()
        bar = _Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", args.progress and dist.main)
        t0 = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for step, batch in enumerate(loader):
            images = batch["image"].to(device, non_blocking=True)
            landmarks = batch["landmarks"].to(device, non_blocking=True)
            with autocast(device, args.amp):
                logits = train_model(images)
            loss = loss_fn(logits, landmarks)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            loss_sum += loss.detach().double().cpu()
            rate = (step + 1) * args.batch_size * dist.world / max(time.time() - t0, 1e-9)
            bar.update(loss=f"{float(loss.detach()):.5f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        bar.close()
        if dist.active:
            torch.distributed.all_reduce(loss_sum)
            loss_sum /= dist.world
            # Parameters agree after every step; BatchNorm statistics are per process: average
            # them so every rank holds the same model (and the checkpoint sees every rank's data).
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    torch.distributed.all_reduce(buffer)
                    buffer /= dist.world
        train_time = time.time() - t0
        row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / steps_per_epoch, "lr": lr,
               "images_per_s": steps_per_epoch * args.batch_size * dist.world / train_time,
               "epoch_time_s": train_time}
        if dist.main:
            inference = run_inference(model, val_ds, max(args.batch_size, 8), device, args.amp, loss_fn)
            val_metrics, _, _ = evaluate_predictions(inference, thresholds)
            row["val_loss"] = inference["loss"]
            row[f"val_mre_{val_metrics['unit']}"] = val_metrics["overall"]["mre"]
            for key, value in val_metrics["overall"]["sdr"].items():
                row[f"val_sdr_{key}{val_metrics['unit']}"] = value
            history.append(row)
            score = inference["loss"] if args.select == "loss" else val_metrics["overall"]["mre"]
            improved = score < best
            best = min(best, score)
            extra = {"history": json.dumps(history), "best": best, "mean_shape": mean_shape}
            ckpt_args = dict(model=model, config=config, epoch=epoch, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler, extra=extra)
            save_checkpoint(run_dir / "checkpoint_last.pt", **ckpt_args)
            if improved:
                save_checkpoint(run_dir / "checkpoint_best.pt", **ckpt_args)
            write_json(run_dir / "metrics.json", history)
            atomic_write_bytes(run_dir / "metrics.csv", _history_csv(history))
            _log(dist, f"epoch {epoch + 1}: train loss {row['train_loss']:.5f}, val loss {row['val_loss']:.5f}, "
                       f"val MRE {val_metrics['overall']['mre']:.3f} {val_metrics['unit']}, "
                       f"{row['images_per_s']:.1f} img/s{' (best)' if improved else ''}")
        dist.barrier()

    result = {"run_dir": run_dir, "history": history, "model": model, "config": config, "test": None,
              "baseline": None, "time_s": time.time() - t_start}
    if dist.main and stop_at == args.epochs and (run_dir / "checkpoint_best.pt").is_file():
        best_ckpt = load_checkpoint(run_dir / "checkpoint_best.pt")
        eval_model = build_model(model_config).to(device)
        eval_model.load_state_dict(best_ckpt["model"])
        inference = run_inference(eval_model, test_ds, max(args.batch_size, 8), device, args.amp)
        test_metrics, baseline, _ = evaluate_predictions(inference, thresholds, mean_shape)
        write_json(run_dir / "test_metrics.json", {"split": args.test_split, "images": len(test_ds),
                                                    "best_epoch": best_ckpt["epoch"] + 1,
                                                    "model": test_metrics, "baseline": baseline})
        if args.overlays > 0:
            write_overlays(run_dir / "overlays", test_ds, inference, args.overlays)
        minutes = (time.time() - t_start) / 60
        _log(dist, f"\nheld-out {args.test_split} ({len(test_ds)} images), best epoch {best_ckpt['epoch'] + 1}, "
                   f"trained in {minutes:.1f} min:")
        _log(dist, metrics.format_table(test_metrics, baseline))
        _log(dist, f"run folder: {run_dir}")
        result.update(test=test_metrics, baseline=baseline)
    elif dist.main and stop_at < args.epochs:
        _log(dist, f"stopped after epoch {stop_at}; continue with --resume {run_dir / 'checkpoint_last.pt'}")
    dist.barrier()
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
