"""Evaluate a trained detector: ``python -m coorkern.evaluate --checkpoint PATH [--data NAME --root PATH]``.

Prints an MRE/SDR table per landmark (with the mean-shape baseline stored in the
checkpoint side by side) and the empirical coverage of the checkpoint's conformal
uncertainty radii; writes ``metrics.json`` (+ per-image predictions), ``per_landmark.png``
and overlay PNGs of predicted (red, with the radius circle) vs true (green) landmarks to
``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from . import conformal, metrics
from . import data as data_mod
from ._runs import (HelpFormatter, best_checkpoint_or_error, description, model_from_checkpoint, positive_int,
                    prog, save_overlay, write_json)

__all__ = ["run_inference", "evaluate_predictions", "conformal_coverage", "held_out_report", "write_overlays",
           "resolve_device", "build_parser", "main"]


@torch.no_grad()
def run_inference(model, dataset, batch_size: int = 8, device="cpu", amp: Optional[str] = None,
                  loss_fn=None) -> dict:
    """Predict every item of ``dataset``; returns stacked ``pred``, ``truth``, ``spacing``,
    ``confidence``, ``ids`` and, with ``loss_fn(logits, landmarks)``, the mean ``loss``."""
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
    return result


def autocast(device, amp: Optional[str]):
    """``torch.autocast`` for ``amp in (None, "bf16", "fp16")``."""
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)


def evaluate_predictions(inference: dict, thresholds: Sequence[float], mean_shape: Optional[torch.Tensor] = None):
    """Metrics of the model (and of the mean-shape baseline when given)."""
    unit = metrics.unit_of(inference["spacing"])
    errors = metrics.radial_errors(inference["pred"], inference["truth"], inference["spacing"])
    model_metrics = metrics.landmark_metrics(errors, thresholds, unit)
    baseline = None
    if mean_shape is not None:
        base_pred = mean_shape.expand_as(inference["truth"])
        baseline = metrics.landmark_metrics(
            metrics.radial_errors(base_pred, inference["truth"], inference["spacing"]), thresholds, unit
        )
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
    ``inference``, ``metrics``, ``baseline``, ``errors`` and ``conformal`` (None without
    ``calibration``).  Shared by ``coorkern.train``'s final report and ``coorkern.evaluate``.
    """
    from .plots import plot_per_landmark

    inference = run_inference(model, dataset, batch_size, device, amp)
    model_metrics, baseline, errors = evaluate_predictions(inference, thresholds, mean_shape)
    coverage = conformal_coverage(calibration, inference) if calibration else None
    if out is not None:
        out = Path(out)
        plot_per_landmark(errors, out / "per_landmark.png", model_metrics["unit"])
        radius = conformal.radii(calibration, inference["confidence"]) if calibration else None
        if overlays > 0:
            write_overlays(out / "overlays", dataset, inference, overlays, radius)
    return {"inference": inference, "metrics": model_metrics, "baseline": baseline, "errors": errors,
            "conformal": coverage}


def write_overlays(folder, dataset, inference: dict, count: int, radii: Optional[torch.Tensor] = None) -> list:
    """Overlay PNGs for the first ``count`` items (with ``radii (N, L)`` circles); returns the paths."""
    folder = Path(folder)
    paths = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        err = metrics.radial_errors(inference["pred"][i:i + 1], item["landmarks"][None], item["spacing"][None])
        unit = "px" if bool(torch.isnan(item["spacing"]).any()) else "mm"
        scale = max(1, 512 // max(item["image"].shape[-2:]))
        label = f"{item['id']}  MRE {float(torch.nanmean(err)):.2f} {unit}"
        paths.append(save_overlay(folder / f"{item['id']}.png", item["image"], item["landmarks"],
                                  inference["pred"][i], label=label, scale=scale,
                                  radii=None if radii is None else radii[i]))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("evaluate"), description=description(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (uses checkpoint_best.pt)")
    p.add_argument("--data", choices=data_mod.DATASETS, help="dataset (default: the one the model was trained on)")
    p.add_argument("--root", help="dataset folder (default: the training run's)")
    p.add_argument("--split", help="split to evaluate (default: the training run's test split)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="network input size (default: the training size)")
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="SDR radii in mm (px without spacing); default per dataset")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per inference batch")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype for inference")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/eval_<split>)")
    p.add_argument("--overlays", type=int, default=8, help="number of overlay PNGs to write")
    p.add_argument("--per-landmark", action=argparse.BooleanOptionalAction, default=True,
                   help="print the per-landmark table")
    return p


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
    try:
        return resolve_device(name)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt = best_checkpoint_or_error(parser, args.checkpoint)
    cfg = ckpt["config"]
    name = args.data or cfg["data"]
    same_data = name == cfg["data"]
    root = args.root or (cfg.get("root") if same_data else None)
    split = args.split or (cfg.get("test_split") if same_data else None) or "test"
    image_size = tuple(args.image_size or cfg["image_size"])
    options = dict(cfg.get("data_options", {})) if same_data else {}
    options.pop("augment", None)
    if name == "synthetic" and same_data:
        options.setdefault("num_samples", cfg["args"].get(f"{split}_samples"))
    try:
        dataset = data_mod.load_dataset(name, root, split, image_size, **options)
    except (ValueError, data_mod.DatasetFormatError) as exc:
        parser.error(str(exc))
    device = device_or_error(parser, args.device)
    model = model_from_checkpoint(ckpt, device)
    thresholds = args.thresholds or dataset.thresholds
    same_size = tuple(cfg["image_size"]) == image_size
    mean_shape = ckpt.get("mean_shape") if same_data and same_size else None
    calibration = ckpt.get("conformal") if same_size else None
    out = Path(args.out) if args.out else Path(ckpt["path"]).parent / f"eval_{split}"
    held_out = held_out_report(model, dataset, thresholds, device=device, batch_size=args.batch_size, amp=args.amp,
                               mean_shape=mean_shape, calibration=calibration, out=out, overlays=args.overlays)
    inference, errors = held_out["inference"], held_out["errors"]
    print(f"{name} / {split}: {len(dataset)} images, checkpoint {ckpt['path']} (epoch {ckpt['epoch'] + 1})")
    print(metrics.format_table(held_out["metrics"], held_out["baseline"], per_landmark=args.per_landmark))
    if held_out["conformal"] is not None:
        print(format_coverage(held_out["conformal"]))
    elif "conformal" in ckpt:
        print("conformal radii not evaluated: --image-size differs from the training size they were calibrated at")
    report = {
        "checkpoint": ckpt["path"],
        "data": name,
        "split": split,
        "image_size": list(image_size),
        "metrics": held_out["metrics"],
        "baseline": held_out["baseline"],
        "conformal": held_out["conformal"],
        "predictions": [
            {"id": i, "landmarks": p.tolist(), "truth": t.tolist(), "confidence": c.tolist(), "errors": e.tolist()}
            for i, p, t, c, e in zip(inference["ids"], inference["pred"], inference["truth"],
                                     inference["confidence"], errors)
        ],
    }
    write_json(out / "metrics.json", report)
    print(f"wrote {out / 'metrics.json'}, {out / 'per_landmark.png'} and {min(args.overlays, len(dataset))} "
          f"overlays in {out / 'overlays'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
