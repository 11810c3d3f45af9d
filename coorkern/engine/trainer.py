"""The training loop of ``coorkern train``: a run's setup, its epochs, checkpoints and final report.

:func:`run_training` is the whole run for parsed options (:class:`Options`); its steps are
public for other drivers: :func:`setup_run` (device, data, model, optimizer and schedule,
restored with ``--resume``; the run folder's config), :func:`train_one_epoch`,
:func:`validate`, :func:`save_checkpoints` (last/best checkpoints, metrics files, curves),
:func:`calibrate_radii` and :func:`final_report` (conformal radii on the validation split,
held-out metrics of the best checkpoint).  A :class:`Run` carries everything between the
steps.  Under ``torchrun`` the same loop trains with DistributedDataParallel (NCCL on GPUs,
gloo on CPU); only rank 0 validates and writes files.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .. import conformal, metrics
from .. import data as data_mod
from ..losses import heatmap_loss
from ..models.detector import default_position
from . import profiles
from .checkpoints import build_model, load_checkpoint, save_checkpoint, set_rng_state, update_checkpoint
from .cobb import format_cobb
from .config import plain_options, write_config
from .files import atomic_write_bytes, write_json
from .inference import autocast, device_or_error, evaluate_predictions, format_coverage, held_out_report, run_inference
from .overlays import render_overlay
from .splits import CARVED, SPLITS, carve_validation, default_splits, selection, spine_has_test
from .step import LossLog, make_train_step
from .tensorboard import TensorBoardLogger, require_tensorboard

__all__ = ["Options", "Run", "setup_run", "train_one_epoch", "validate", "save_checkpoints", "calibrate_radii",
           "final_report", "run_training", "RUN_LOCATION_OPTIONS", "READING_OPTIONS", "SPLITS"]

# Options that say where this invocation writes or continues, not what it trains: not in config.yaml.
RUN_LOCATION_OPTIONS = ("out", "resume", "stop_after", "config")
# The CoorDetector keyword options for the readings of the coordinate module (train.py's options of the same names).
READING_OPTIONS = ("coord_mode", "coord_groups", "offset_range", "offset_init_std", "coord_lr_mult", "coord_source",
                   "position", "vanilla_position")


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
    defaults = profiles.SYNTHETIC_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key in ("base_channels", "epochs", "batch_size", "train_samples", "val_samples", "test_samples"):
        if getattr(args, key) is None and not (key == "epochs" and args.train_images):
            setattr(args, key, defaults[key])
    if args.image_size is None:
        size = defaults["image_size"] if args.data == "synthetic" else None
        args.image_size = list(size or data_mod.DEFAULT_IMAGE_SIZE[args.data])
    train, val, test = default_splits(args.data, args.root, args.protocol)
    args.train_split = args.train_split or train
    args.val_split = args.val_split or val
    args.test_split = args.test_split or test
    if args.augment is None:
        args.augment = args.data != "synthetic"
    if args.position is None:  # written out, so that config.yaml keeps meaning this model
        args.position = default_position(args.transformer)


def common_spacing(dataset) -> Optional[list]:
    """The original-pixel spacing (mm) shared by every training record, else None: stored in
    the checkpoint so that ``predict`` can give mm for inputs whose files carry no spacing
    (e.g. the ISBI JPEGs of a model trained from a CSV).  None for data sets without records
    (synthetic) or with per-image spacings (hand: its wrist rule)."""
    spacings = {tuple(float(v) for v in rec.spacing) for rec in getattr(dataset, "records", None) or ()}
    return list(spacings.pop()) if len(spacings) == 1 else None


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


def _datasets(args) -> tuple:
    """``(train, validation, test, rule)`` data sets of the run; ``rule`` says how a carved validation part was
    taken (None for a named split)."""
    train_ds = _dataset(args, args.train_split, args.augment)
    rule = None
    if args.val_split == CARVED:
        train_ds, val_ds, rule = carve_validation(train_ds, args.val_fraction, args.data, args.root)
    else:
        val_ds = _dataset(args, args.val_split, False)
    test_ds = val_ds if args.test_split == args.val_split else _dataset(args, args.test_split, False)
    return train_ds, val_ds, test_ds, rule


def _split_settings(args, train_ds, val_ds, test_ds, rule) -> dict:
    """The run's splits for its config: names, image counts, the carved part's ids and what selects."""
    val = {"split": args.val_split, "images": len(val_ds)}
    if rule is not None:
        val.update({"from": args.train_split, "rule": rule, "ids": [r.id for r in val_ds.records]})
    return {"train": {"split": args.train_split, "images": len(train_ds)}, "val": val,
            "test": {"split": args.test_split, "images": len(test_ds)},
            "selection": selection(args.val_split, args.test_split, rule)}


def _model_config(args, num_landmarks: int) -> dict:
    return dict(in_channels=1, num_landmarks=num_landmarks, base_channels=args.base_channels,
                depths=list(args.depths), heads=list(args.heads), mlp_ratio=args.mlp_ratio,
                transformer=args.transformer, **{key: getattr(args, key) for key in READING_OPTIONS})


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if on != torch.are_deterministic_algorithms_enabled():  # the call imports torch._inductor (~3 s on this CPU)
        torch.use_deterministic_algorithms(on)


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
# The steps of a run


@dataclasses.dataclass
class Run:
    """Everything one training run holds between its steps."""

    args: argparse.Namespace
    dist: _Dist
    device: torch.device
    config: dict
    run_dir: Path
    train_ds: Any
    val_ds: Any
    test_ds: Any
    thresholds: tuple
    mean_shape: torch.Tensor
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model wrapped for training (DDP, torch.compile)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    sampler: DistributedSampler
    loader: DataLoader
    history: list = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    best: float = math.inf
    tensorboard: Any = None
    train_step: Any = None  # the step (engine.step / engine.cuda_graphs), made by setup_run or on first use

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def loss(self, logits: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return heatmap_loss(self.args.loss, logits, landmarks, self.args.sigma, self.args.r,
                            getattr(self.args, "pos_weight", None))

    @property
    def eval_batch_size(self) -> int:
        return max(self.args.batch_size, 8)


class Options(NamedTuple):
    """The parsed command: ``args``, its ``parser`` (for errors), the ``--resume`` checkpoint and the
    ``explicit`` options (given on the command line or in ``--config``, not defaults)."""

    args: argparse.Namespace
    parser: argparse.ArgumentParser
    resume_checkpoint: Optional[dict]
    explicit: dict


def _select_device(args, parser, dist: _Dist) -> torch.device:
    if args.device == "auto" and dist.active and torch.cuda.is_available():
        device = torch.device("cuda", dist.local_rank)
    else:
        device = device_or_error(parser, args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.active and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)
    return device


def setup_run(options: Options) -> Run:
    """Device, data, model, optimizer and schedule (restored with ``--resume``), run folder and its config."""
    args, parser, resume_ckpt = options.args, options.parser, options.resume_checkpoint
    dist = _Dist()
    device = _select_device(args, parser, dist)
    note = profiles.apply_profile(args, options.explicit, device) if resume_ckpt is None else None
    if note:
        _log(dist, note)
    _resolve(args, device)
    _set_deterministic(args.deterministic)
    _seed_everything(args.seed)
    if args.amp == "fp16" and device.type == "cpu":
        _log(dist, "note: --amp fp16 on CPU runs without a gradient scaler")
    if args.tensorboard and dist.main:
        try:
            require_tensorboard()
        except ImportError as exc:
            parser.error(str(exc))

    try:
        train_ds, val_ds, test_ds, rule = _datasets(args)
    except (ValueError, data_mod.DatasetFormatError) as exc:
        parser.error(str(exc))
    if args.test_split == args.val_split:
        _log(dist, f"note: the best epoch is selected (and the uncertainty radii calibrated) on the "
                   f"'{args.val_split}' split that is also reported as held-out (the published protocols do "
                   "this); the reported metrics and coverage are then optimistic (test_metrics.json says "
                   f"\"selection\": \"{args.val_split} (optimistic)\"). Without --val-split, real data select on "
                   "a part carved from the training split.")
    elif rule is not None:
        _log(dist, f"validation (model selection, conformal radii): {rule} of '{args.train_split}', listed in "
                   "config.json (splits.val.ids); --val-split names another split")
    if args.data == "spine":
        holdout = "" if spine_has_test(args.root) else "; no test folder under --root: the development holdout"
        _log(dist, f"spine splits: train '{args.train_split}', select on '{args.val_split}', report "
                   f"'{args.test_split}'{holdout}")
    budget = None
    if args.epochs is None:  # a budget of images seen (--train-images, the cpu profile)
        args.epochs = profiles.budget_epochs(args.train_images, len(train_ds))
        budget = {"train_images": args.train_images, "train_split_images": len(train_ds), "epochs": args.epochs}
        _log(dist, f"budget: {args.train_images} training images seen / {len(train_ds)} training images -> "
                   f"{args.epochs} epochs (ceil); --epochs overrides")
    num_landmarks = train_ds.num_landmarks
    try:
        model = build_model(_model_config(args, num_landmarks))
    except ValueError as exc:  # options the model refuses together, e.g. --coord-groups and --heads
        parser.error(str(exc))
    model_config = model.config
    # Start the heatmaps near the background level (prior probability ~1%), as detection heads do:
    # the first steps then refine peaks instead of pushing 99% of the pixels down.
    torch.nn.init.constant_(model.head.bias, args.head_bias)
    model = model.to(device)
    groups = model.param_groups(args.min_lr)  # the coordinate modules at --coord-lr-mult times the rate
    optimizer = torch.optim.Adam(groups, lr=args.min_lr, weight_decay=args.weight_decay)
    sampler = DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=data_mod.collate, drop_last=True, persistent_workers=False)
    if len(loader) == 0:
        parser.error(f"--batch-size {args.batch_size} is larger than the training images per process "
                     f"({len(train_ds)} / {dist.world})")
    half_cycle = max(1, len(loader) * args.epochs // (2 * args.lr_cycles))
    # CyclicLR sets absolute rates: each group's cycle is scaled by its lr_mult.
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=[args.min_lr * g["lr_mult"] for g in optimizer.param_groups],
        max_lr=[args.lr * g["lr_mult"] for g in optimizer.param_groups], step_size_up=half_cycle,
        mode="triangular", cycle_momentum=False,
    )
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" and device.type == "cuda" else None
    thresholds = tuple(args.thresholds or train_ds.thresholds)
    config = {
        "args": vars(args),
        "data": args.data,
        "root": str(Path(args.root).resolve()) if args.root else None,
        "image_size": list(args.image_size),
        "test_split": args.test_split,
        "splits": _split_settings(args, train_ds, val_ds, test_ds, rule),
        "budget": budget,
        "data_options": _data_options(args),
        "pixel_spacing_mm": common_spacing(train_ds),
        "model": model_config,
        "thresholds": list(thresholds),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
                        "world_size": dist.world, "threads": torch.get_num_threads()},
    }
    run_dir = Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.data}"
    run = Run(args=args, dist=dist, device=device, config=config, run_dir=run_dir, train_ds=train_ds, val_ds=val_ds,
              test_ds=test_ds, thresholds=thresholds, mean_shape=metrics.mean_shape_baseline(train_ds.all_landmarks()),
              model=model, train_model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
              sampler=sampler, loader=loader)
    if resume_ckpt is not None:
        _restore(run, resume_ckpt)
    if dist.active:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run.train_model = torch.compile(run.train_model)
    try:
        run.train_step = make_train_step(run)
    except ValueError as exc:  # --cuda-graphs on where graphs cannot run
        parser.error(str(exc))
    run.config["environment"]["cuda_graphs"] = run.train_step.setting
    if dist.main:
        _write_config(run)
        if args.tensorboard:
            run.tensorboard = TensorBoardLogger(run_dir / "tensorboard")
        n_params = sum(p.numel() for p in model.parameters())
        _log(dist, f"coorkern.train: {args.data} {tuple(args.image_size)}, {len(train_ds)} train / {len(val_ds)} "
                   f"{args.val_split} / {len(test_ds)} {args.test_split} images, {num_landmarks} landmarks; "
                   f"CoorDetector(base={args.base_channels}, transformer={args.transformer}{_readings(model)}) "
                   f"{n_params:,} params; "
                   f"{args.loss} loss, {args.epochs} epochs x {len(loader)} steps, batch {args.batch_size}"
                   f"{f' x {dist.world} processes' if dist.active else ''}, device {device}; run folder {run_dir}")
        _log(dist, f"CUDA graphs: {run.train_step.setting}")
    return run


def _readings(model) -> str:
    """The readings of ``model`` that differ from the constructor's defaults, as ``, key=value`` text."""
    import inspect

    defaults = inspect.signature(type(model)).parameters
    return "".join(f", {k}={model.config[k]}" for k in READING_OPTIONS if model.config[k] != defaults[k].default)


def _restore(run: Run, ckpt: dict) -> None:
    """Model, optimizer, schedule, scaler, RNG, history and best score of a checkpoint (``--resume``)."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and "scaler" in ckpt:
        run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    run.start_epoch = ckpt["epoch"] + 1
    run.history = json.loads(ckpt["history"])
    run.best = float(ckpt["best"])


def _write_config(run: Run) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.run_dir / "config.json", run.config)
    write_config(run.run_dir / "config.yaml", plain_options(vars(run.args), exclude=RUN_LOCATION_OPTIONS),
                 header="coorkern train options of this run, resolved (defaults filled in for this machine).\n"
                        "Rerun it with: coorkern train --config <this file> --out <new folder>")


def train_one_epoch(run: Run, epoch: int) -> dict:
    """One pass over the training data (``epoch`` counts from 0); returns the epoch's metrics row."""
    args, dist = run.args, run.dist
    run.sampler.set_epoch(epoch)
    if hasattr(run.train_ds, "set_epoch"):
        run.train_ds.set_epoch(epoch)
    run.train_model.train()
    steps = run.steps_per_epoch
    # disable=None: tqdm draws only on a terminal, so redirected logs stay free of bar redraws.
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", dynamic_ncols=True,
               mininterval=0.5, disable=None if args.progress and dist.main else True)
    t0 = time.time()
    step_fn = training_step(run)
    # The steps never wait for the device: their losses stay there until the log is read, once per
    # LOSS_READ_EVERY steps and at the end (engine.step).
    log = LossLog(run.device)
    lr = run.optimizer.param_groups[0]["lr"]
    for batch in run.loader:
        step_fn(batch, log)
        bar.update(1)
        if log.due:
            lr = _report_losses(run, log, epoch * steps, bar, t0)
    if log.pending:
        lr = _report_losses(run, log, epoch * steps, bar, t0)
    bar.close()
    loss_sum = log.epoch_total()
    if dist.active:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= dist.world
        # Parameters agree after every step; BatchNorm statistics are per process: average
        # them so every rank holds the same model (and the checkpoint sees every rank's data).
        for buffer in run.model.buffers():
            if buffer.is_floating_point():
                torch.distributed.all_reduce(buffer)
                buffer /= dist.world
    train_time = time.time() - t0
    return {"epoch": epoch + 1, "train_loss": float(loss_sum) / steps, "lr": lr,
            "images_per_s": steps * args.batch_size * dist.world / train_time, "epoch_time_s": train_time}


def training_step(run: Run):
    """The run's training step, ``step(batch, log)`` (made on first use for runs built by hand)."""
    if run.train_step is None:
        run.train_step = make_train_step(run)
    return run.train_step


def _report_losses(run: Run, log: LossLog, first_step: int, bar, t0: float) -> float:
    """Read the log's pending losses (one device-to-host copy): TensorBoard gets every step's loss
    and learning rate, the progress bar their mean; returns the last step's learning rate."""
    first = first_step + log.steps - log.pending  # global index of the first step not read yet
    values = log.read()
    if run.tensorboard is not None:
        for i, (loss, lr) in enumerate(values):
            run.tensorboard.step(first + i, loss, lr)
    rate = log.steps * run.args.batch_size * run.dist.world / max(time.time() - t0, 1e-9)
    mean = sum(loss for loss, _ in values) / len(values)
    bar.set_postfix_str(f"loss={mean:.5f}, lr={values[-1][1]:.2e}, img_s={rate:.1f}", refresh=False)
    return values[-1][1]


def validate(run: Run, row: dict) -> tuple[float, dict]:
    """Validation loss/MRE/SDR of the current model added to ``row``; returns ``(selection score, metrics)``."""
    inference = run_inference(run.model, run.val_ds, run.eval_batch_size, run.device, run.args.amp, run.loss)
    val_metrics, _, _ = evaluate_predictions(inference, run.thresholds)
    row["val_loss"] = inference["loss"]
    row[f"val_mre_{val_metrics['unit']}"] = val_metrics["overall"]["mre"]
    for key, value in val_metrics["overall"]["sdr"].items():
        row[f"val_sdr_{key}{val_metrics['unit']}"] = value
    score = inference["loss"] if run.args.select == "loss" else val_metrics["overall"]["mre"]
    return score, val_metrics


def save_checkpoints(run: Run, epoch: int, improved: bool) -> None:
    """``checkpoint_last.pt`` (and ``checkpoint_best.pt`` when ``improved``), metrics files and ``curves.png``."""
    from ..plots import plot_curves

    extra = {"history": json.dumps(run.history), "best": run.best, "mean_shape": run.mean_shape}
    ckpt_args = dict(model=run.model, config=run.config, epoch=epoch, optimizer=run.optimizer,
                     scheduler=run.scheduler, scaler=run.scaler, extra=extra)
    save_checkpoint(run.run_dir / "checkpoint_last.pt", **ckpt_args)
    if improved:
        save_checkpoint(run.run_dir / "checkpoint_best.pt", **ckpt_args)
    write_json(run.run_dir / "metrics.json", run.history)
    atomic_write_bytes(run.run_dir / "metrics.csv", _history_csv(run.history))
    plot_curves(run.history, run.run_dir / "curves.png")


@torch.no_grad()
def _log_validation_images(run: Run, epoch: int, count: int = 4) -> None:
    """A few validation overlays and predicted heatmaps (max over landmarks) to TensorBoard."""
    items = [run.val_ds[i] for i in range(min(count, len(run.val_ds)))]
    images = torch.stack([item["image"] for item in items]).to(run.device)
    run.model.eval()
    with autocast(run.device, run.args.amp):
        logits = run.model(images).float()
    coords, _ = metrics.decode_heatmaps(logits)
    spine = run.args.data == "spine"  # vertebrae as quadrilaterals, on a larger canvas for 68 landmarks
    overlays = [render_overlay(item["image"], item["landmarks"], coords[i].cpu(),
                               scale=max(1, (512 if spine else 256) // max(item["image"].shape[-2:])),
                               vertebrae=spine) for i, item in enumerate(items)]
    run.tensorboard.images(epoch + 1, overlays, torch.sigmoid(logits).amax(1, keepdim=True))


def calibrate_radii(run: Run, model: torch.nn.Module) -> dict:
    """Split-conformal radii per landmark from ``model``'s errors on the validation split (model-input px)."""
    inference = run_inference(model, run.val_ds, run.eval_batch_size, run.device, run.args.amp)
    errors = metrics.radial_errors(inference["pred"], inference["truth"])
    calibration = conformal.calibrate(errors, run.args.coverage, inference["confidence"],
                                      run.args.conformal_score)
    calibration["split"] = run.args.val_split
    return calibration


def final_report(run: Run, t_start: float) -> dict:
    """Calibrate the radii on the validation split, store them in the best checkpoint, report the test split."""
    args, dist = run.args, run.dist
    best_path = run.run_dir / "checkpoint_best.pt"
    best_ckpt = load_checkpoint(best_path)
    model = build_model(run.config["model"]).to(run.device)
    model.load_state_dict(best_ckpt["model"])
    calibration = calibrate_radii(run, model)
    update_checkpoint(best_path, conformal=calibration)
    held_out = held_out_report(model, run.test_ds, run.thresholds, device=run.device,
                               batch_size=run.eval_batch_size, amp=args.amp, mean_shape=run.mean_shape,
                               calibration=calibration, out=run.run_dir, overlays=args.overlays)
    chosen_on = run.config.get("splits", {}).get("selection") or selection(args.val_split, args.test_split)
    report = {"split": args.test_split, "images": len(run.test_ds), "best_epoch": best_ckpt["epoch"] + 1,
              "selection": chosen_on, "model": held_out["metrics"], "baseline": held_out["baseline"],
              "conformal": held_out["conformal"]}
    if held_out["cobb"] is not None:
        report["cobb"] = held_out["cobb"].summary
    write_json(run.run_dir / "test_metrics.json", report)
    minutes = (time.time() - t_start) / 60
    pixels = " (pixels of the original images)" if "pixels" in held_out["metrics"] else ""
    _log(dist, f"\nheld-out {args.test_split} ({len(run.test_ds)} images), best epoch {best_ckpt['epoch'] + 1} "
               f"selected on {report['selection']}, trained in {minutes:.1f} min{pixels}:")
    _log(dist, metrics.format_table(held_out["metrics"], held_out["baseline"]))
    if held_out["cobb"] is not None:
        _log(dist, format_cobb(report["cobb"]))
    _log(dist, format_coverage(held_out["conformal"]) + f" (calibrated on '{args.val_split}')")
    _log(dist, f"run folder: {run.run_dir}")
    return {"test": held_out["metrics"], "baseline": held_out["baseline"], "conformal": held_out["conformal"],
            "cobb": report.get("cobb"), "selection": report["selection"]}


# ---------------------------------------------------------------------------
# The whole run


def run_training(options: Options) -> dict:
    """Set up the run, train its epochs, report the held-out split; returns a dict with ``run_dir``,
    ``history``, ``model``, ``config``, ``test``/``baseline``/``conformal`` metrics and ``time_s``.

    Process-wide settings it changes (torch threads, deterministic algorithms) are restored
    on return, so it can be called in-process (tests, notebooks).
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return _train(setup_run(options))
    finally:
        torch.set_num_threads(threads)
        if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call imports torch._inductor (~3 s)
            torch.use_deterministic_algorithms(deterministic)


def _train(run: Run) -> dict:
    args, dist = run.args, run.dist
    t_start = time.time()
    stop_at = args.epochs if args.stop_after is None else min(args.epochs, run.start_epoch + args.stop_after)
    try:
        for epoch in range(run.start_epoch, stop_at):
            row = train_one_epoch(run, epoch)
            if dist.main:
                score, val_metrics = validate(run, row)
                run.history.append(row)
                improved = score < run.best
                run.best = min(run.best, score)
                save_checkpoints(run, epoch, improved)
                if run.tensorboard is not None:
                    run.tensorboard.epoch(epoch + 1, row)
                    _log_validation_images(run, epoch)
                _log(dist, f"epoch {epoch + 1}: train loss {row['train_loss']:.5f}, val loss {row['val_loss']:.5f}, "
                           f"val MRE {val_metrics['overall']['mre']:.3f} {val_metrics['unit']}, "
                           f"{row['images_per_s']:.1f} img/s{' (best)' if improved else ''}")
            dist.barrier()
        result = {"run_dir": run.run_dir, "history": run.history, "model": run.model, "config": run.config,
                  "test": None, "baseline": None, "conformal": None, "time_s": time.time() - t_start}
        if dist.main and stop_at == args.epochs and (run.run_dir / "checkpoint_best.pt").is_file():
            result.update(final_report(run, t_start))
        elif dist.main and stop_at < args.epochs:
            _log(dist, f"stopped after epoch {stop_at}; continue with --resume {run.run_dir / 'checkpoint_last.pt'}")
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()
    dist.barrier()
    return result
