"""Inference and measurement on a data set: predictions, MRE/SDR, conformal coverage, reports.

What the training run's validation and final report, ``coorkern evaluate`` and the
studies of ``coorkern experiments`` share: :func:`run_inference` predicts a data set
(under :func:`autocast`), :func:`evaluate_predictions` measures it against the mean-shape
baseline, :func:`conformal_coverage` checks the calibrated radii, :func:`held_out_report`
does all three and writes the plots and overlays, and :func:`evaluate_checkpoint` runs it
for a checkpoint on the data its config names (or another split/size/data set).  Spine data
are measured in their original images' pixels and get their Cobb angles' SMAPE
(:mod:`coorkern.engine.cobb`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from .. import conformal, metrics
from .. import data as data_mod
from .checkpoints import best_checkpoint_or_error, model_from_checkpoint
from .cobb import CobbResult, angle_fields, cobb_report, main_curve, original_pixel_scale, to_original
from .files import write_json
from .overlays import save_overlay
from .splits import CARVED, carve_validation

__all__ = ["autocast", "resolve_device", "device_or_error", "run_inference", "evaluate_predictions",
           "conformal_coverage", "format_coverage", "held_out_report", "write_overlays", "EvaluationData",
           "evaluation_data", "add_evaluation_options", "evaluation_setup_or_error", "evaluate_checkpoint"]


def autocast(device, amp: Optional[str]):
    """``torch.autocast`` for ``amp in (None, "bf16", "fp16")``."""
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ValueError for an unknown or unavailable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return device


def device_or_error(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """:func:`resolve_device`, its errors reported through ``parser.error`` (exit code 2)."""
    try:
        return resolve_device(name)
    except ValueError as exc:
        parser.error(str(exc))


@torch.no_grad()
def run_inference(model, dataset, batch_size: int = 8, device="cpu", amp: Optional[str] = None,
                  loss_fn=None) -> dict:
    """Predict every item of ``dataset``; returns stacked ``pred``, ``truth``, ``spacing``,
    ``confidence``, ``ids``, with ``loss_fn(logits, landmarks)`` the mean ``loss``, and for data
    sets that know their images' original sizes (spine) ``to_original``: ``(N, 2)`` original
    pixels per input pixel."""
    model.eval()
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=data_mod.collate)
    out = {"pred": [], "truth": [], "spacing": [], "confidence": [], "ids": []}
    loss_sum, count = 0.0, 0
    for batch in loader:
        images = batch["image"].to(device)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, batch["landmarks"].to(device))) * images.shape[0]
            count += images.shape[0]
        coords, conf = metrics.decode_heatmaps(logits)
        out["pred"].append(coords.cpu())
        out["confidence"].append(conf.cpu())
        out["truth"].append(batch["landmarks"])
        out["spacing"].append(batch["spacing"])
        out["ids"].extend(batch["id"])
    result = {k: (torch.cat(v) if k != "ids" else v) for k, v in out.items()}
    if loss_fn is not None:
        result["loss"] = loss_sum / max(count, 1)
    scale = original_pixel_scale(dataset)
    if scale is not None:
        result["to_original"] = scale
    return result


def evaluate_predictions(inference: dict, thresholds: Sequence[float], mean_shape: Optional[torch.Tensor] = None):
    """Metrics of the model (and of the mean-shape baseline when given).

    Without a pixel spacing, errors are in the input's pixels, or in the original images'
    where ``inference`` has ``to_original`` (the spine; the metrics then say
    ``"pixels": "original image"``).
    """
    unit = metrics.unit_of(inference["spacing"])
    original = unit == "px" and "to_original" in inference

    def errors_of(pred):
        if original:
            scale = inference["to_original"]
            return metrics.radial_errors(to_original(pred, scale), to_original(inference["truth"], scale))
        return metrics.radial_errors(pred, inference["truth"], inference["spacing"])

    errors = errors_of(inference["pred"])
    model_metrics = metrics.landmark_metrics(errors, thresholds, unit)
    baseline = None
    if mean_shape is not None:
        baseline = metrics.landmark_metrics(errors_of(mean_shape.expand_as(inference["truth"])), thresholds, unit)
    if original:
        for result in (model_metrics, baseline):
            if result is not None:
                result["pixels"] = "original image"
    return model_metrics, baseline, errors


def conformal_coverage(calibration: dict, inference: dict) -> dict:
    """Empirical coverage of the conformal radii of ``calibration`` on the predictions of ``inference``.

    Errors and radii are in pixels of the model input (``inference`` of the training size).
    """
    errors = metrics.radial_errors(inference["pred"], inference["truth"])
    radius = conformal.radii(calibration, inference["confidence"])
    return {"target": calibration["coverage"], "score": calibration["score"],
            **conformal.empirical_coverage(errors, radius), "unit": calibration["unit"]}


def format_coverage(coverage: dict) -> str:
    per = coverage["per_landmark"]
    text = (f"conformal radii ({coverage['target']:.0%} target, score {coverage['score']}): empirical coverage "
            f"{coverage['overall']:.1%} (per landmark {min(per):.0%}-{max(per):.0%}), mean radius "
            f"{coverage['mean_radius']:.2f} {coverage['unit']}")
    if coverage["mean_radius"] == float("inf"):
        need = conformal.min_calibration_size(coverage["target"])
        text += f" (infinite radii: {coverage['target']:.0%} coverage needs >= {need} calibration images)"
    return text


def held_out_report(model, dataset, thresholds: Sequence[float], *, device="cpu", batch_size: int = 8,
                    amp: Optional[str] = None, mean_shape: Optional[torch.Tensor] = None,
                    calibration: Optional[dict] = None, out=None, overlays: int = 0) -> dict:
    """Predict ``dataset`` and measure: MRE/SDR (and the mean-shape baseline), conformal coverage.

    With ``out``: writes ``per_landmark.png`` and ``overlays`` overlay PNGs there.  Returns
    ``inference``, ``metrics``, ``baseline``, ``errors``, ``conformal`` (None without
    ``calibration``) and ``cobb`` (a :class:`~coorkern.engine.cobb.CobbResult` for spine data,
    else None).  Shared by the training run's final report and :func:`evaluate_checkpoint`.
    """
    from ..plots import plot_per_landmark

    inference = run_inference(model, dataset, batch_size, device, amp)
    model_metrics, baseline, errors = evaluate_predictions(inference, thresholds, mean_shape)
    coverage = conformal_coverage(calibration, inference) if calibration else None
    cobb = cobb_report(inference, dataset)
    if out is not None:
        out = Path(out)
        unit = model_metrics["unit"] + (" of the original images" if "pixels" in model_metrics else "")
        plot_per_landmark(errors, out / "per_landmark.png", unit)
        radius = conformal.radii(calibration, inference["confidence"]) if calibration else None
        if overlays > 0:
            write_overlays(out / "overlays", dataset, inference, overlays, radius, cobb)
    return {"inference": inference, "metrics": model_metrics, "baseline": baseline, "errors": errors,
            "conformal": coverage, "cobb": cobb}


def write_overlays(folder, dataset, inference: dict, count: int, radii: Optional[torch.Tensor] = None,
                   cobb: Optional[CobbResult] = None) -> list:
    """Overlay PNGs for the first ``count`` items (with ``radii (N, L)`` circles); returns the paths.

    With ``cobb`` (spine data): vertebrae as quadrilaterals, the main angle's two mid-lines
    and the predicted vs true angle.
    """
    folder = Path(folder)
    paths = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        pred = inference["pred"][i]
        if "to_original" in inference:  # errors in the original image's pixels, as the report's
            scale_i = inference["to_original"][i:i + 1]
            err = metrics.radial_errors(to_original(pred[None], scale_i),
                                        to_original(item["landmarks"][None], scale_i))
        else:
            err = metrics.radial_errors(pred[None], item["landmarks"][None], item["spacing"][None])
        unit = "px" if bool(torch.isnan(item["spacing"]).any()) else "mm"
        label = f"{item['id']}  MRE {float(torch.nanmean(err)):.2f} {unit}"
        curve = None
        if cobb is not None:
            pair = main_curve(to_original(pred[None], inference["to_original"][i:i + 1])[0])
            angles = angle_fields(cobb.pred[i])
            truth = angle_fields(cobb.truth[i])
            label += f"\nmain Cobb {angles['main']} deg (true {truth['main']})"
            curve = None if pair is None or angles["main"] is None else (pair[0], pair[1], angles["main"])
        scale = max(1, (1024 if cobb is not None else 512) // max(item["image"].shape[-2:]))
        paths.append(save_overlay(folder / f"{item['id']}.png", item["image"], item["landmarks"], pred,
                                  label=label, scale=scale, radii=None if radii is None else radii[i],
                                  vertebrae=cobb is not None, cobb=curve))
    return paths


# ---------------------------------------------------------------------------
# A checkpoint on a data split


@dataclass
class EvaluationData:
    """The data set a checkpoint is evaluated on, and how it relates to the training run's."""

    name: str
    split: str
    image_size: tuple
    dataset: Any
    same_data: bool  # the training run's data set (its mean-shape baseline applies)
    training_size: tuple  # the model's input size in training (its conformal radii are in those pixels)

    @property
    def same_size(self) -> bool:
        return tuple(self.training_size) == tuple(self.image_size)


def evaluation_data(ckpt: dict, data: Optional[str] = None, root=None, split: Optional[str] = None,
                    image_size: Optional[Sequence[int]] = None) -> EvaluationData:
    """The data set to evaluate ``ckpt`` on: by default its training run's data, root, test split and size.

    ``split="carved"``: the validation part the run carved from its training split (the
    images that selected the checkpoint and calibrated its radii), carved again by the run's
    rule.  Raises ValueError or DatasetFormatError for data that cannot be loaded.
    """
    cfg = ckpt["config"]
    name = data or cfg["data"]
    same_data = name == cfg["data"]
    root = root or (cfg.get("root") if same_data else None)
    split = split or (cfg.get("test_split") if same_data else None) or "test"
    size = tuple(image_size or cfg["image_size"])
    options = dict(cfg.get("data_options", {})) if same_data else {}
    options.pop("augment", None)
    if name == "synthetic" and same_data:
        options.setdefault("num_samples", cfg["args"].get(f"{split}_samples"))
    if split == CARVED:
        if not same_data or cfg["args"].get("val_split") != CARVED:
            raise ValueError(f"split {CARVED!r} is the validation part a run carved from its training split; "
                             "this checkpoint's run has none on this data")
        train = data_mod.load_dataset(name, root, cfg["args"]["train_split"], size, **options)
        _, dataset, _ = carve_validation(train, cfg["args"]["val_fraction"], name, root)
    else:
        dataset = data_mod.load_dataset(name, root, split, size, **options)
    return EvaluationData(name, split, size, dataset, same_data, tuple(cfg["image_size"]))


def add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    """The options :func:`evaluation_setup_or_error` reads: ``--checkpoint``, ``--data``, ``--root``,
    ``--split``, ``--image-size`` and ``--device``, for commands that run a checkpoint on a data split."""
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file, or a run folder (uses checkpoint_best.pt)")
    parser.add_argument("--data", choices=data_mod.DATASETS,
                        help="dataset (default: the one the model was trained on)")
    parser.add_argument("--root", help="dataset folder (default: the training run's)")
    parser.add_argument("--split", help="split (default: the training run's test split; 'carved': the validation "
                                         "part the run carved from its training split)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="network input size (default: the training size)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")


def evaluation_setup_or_error(parser: argparse.ArgumentParser, args) -> tuple[dict, EvaluationData, torch.device]:
    """``(checkpoint, data, device)`` from the options of :func:`add_evaluation_options` (the data by
    :func:`evaluation_data`); bad ones exit through ``parser.error``."""
    ckpt = best_checkpoint_or_error(parser, args.checkpoint)
    try:
        target = evaluation_data(ckpt, args.data, args.root, args.split, args.image_size)
    except (ValueError, data_mod.DatasetFormatError) as exc:
        parser.error(str(exc))
    return ckpt, target, device_or_error(parser, args.device)


def evaluate_checkpoint(ckpt: dict, target: EvaluationData, out, *, thresholds: Optional[Sequence[float]] = None,
                        device="cpu", batch_size: int = 8, amp: Optional[str] = None, overlays: int = 0) -> dict:
    """Held-out report of ``ckpt`` on ``target``; writes ``out/metrics.json`` (with per-image predictions),
    ``per_landmark.png`` and ``overlays`` overlay PNGs, and returns the report.

    The mean-shape baseline needs the training data at the training size, the conformal
    radii the training size (they are in the model's input pixels).
    """
    out = Path(out)
    model = model_from_checkpoint(ckpt, device)
    held_out = held_out_report(model, target.dataset, thresholds or target.dataset.thresholds, device=device,
                               batch_size=batch_size, amp=amp,
                               mean_shape=ckpt.get("mean_shape") if target.same_data and target.same_size else None,
                               calibration=ckpt.get("conformal") if target.same_size else None, out=out,
                               overlays=overlays)
    inference = held_out["inference"]
    report = {
        "checkpoint": ckpt["path"],
        "data": target.name,
        "split": target.split,
        "image_size": list(target.image_size),
        "metrics": held_out["metrics"],
        "baseline": held_out["baseline"],
        "conformal": held_out["conformal"],
        "selection": ckpt["config"].get("splits", {}).get("selection"),
        "predictions": [
            {"id": i, "landmarks": p.tolist(), "truth": t.tolist(), "confidence": c.tolist(), "errors": e.tolist()}
            for i, p, t, c, e in zip(inference["ids"], inference["pred"], inference["truth"],
                                     inference["confidence"], held_out["errors"])
        ],
    }
    cobb = held_out["cobb"]
    if cobb is not None:
        report["cobb"] = cobb.summary
        for entry, pred, truth in zip(report["predictions"], cobb.pred, cobb.truth):
            entry["cobb_angles"], entry["cobb_truth"] = angle_fields(pred), angle_fields(truth)
    write_json(out / "metrics.json", report)
    return report
