"""Evaluate a trained detector: ``python -m coorkern.evaluate --checkpoint PATH [--data NAME --root PATH]``.

Prints an MRE/SDR table per landmark (with the mean-shape baseline stored in the
checkpoint side by side), writes ``metrics.json`` (+ per-image predictions) and overlay
PNGs of predicted (red) vs true (green) landmarks to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from . import data as data_mod
from . import metrics
from ._runs import HelpFormatter, description, load_checkpoint, model_from_checkpoint, save_overlay, write_json

__all__ = ["run_inference", "evaluate_predictions", "write_overlays", "resolve_device", "main"]


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


def write_overlays(folder, dataset, inference: dict, count: int) -> list:
    """Overlay PNGs for the first ``count`` items; returns the paths."""
    folder = Path(folder)
    paths = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        err = metrics.radial_errors(inference["pred"][i:i + 1], item["landmarks"][None], item["spacing"][None])
        unit = "px" if bool(torch.isnan(item["spacing"]).any()) else "mm"
        scale = max(1, 512 // max(item["image"].shape[-2:]))
        label = f"{item['id']}  MRE {float(torch.nanmean(err)):.2f} {unit}"
        paths.append(save_overlay(folder / f"{item['id']}.png", item["image"], item["landmarks"],
                                  inference["pred"][i], label=label, scale=scale))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coorkern.evaluate", description=description(__doc__),
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run folder (uses checkpoint_best.pt)")
    p.add_argument("--data", choices=data_mod.DATASETS, help="dataset (default: the one the model was trained on)")
    p.add_argument("--root", help="dataset folder (default: the training run's)")
    p.add_argument("--split", help="split to evaluate (default: the training run's test split)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="network input size (default: the training size)")
    p.add_argument("--thresholds", type=float, nargs="+",
                   help="SDR radii in mm (px without spacing); default per dataset")
    p.add_argument("--batch-size", type=int, default=8)
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
    if args.checkpoint and Path(args.checkpoint).is_dir() and (Path(args.checkpoint) / "checkpoint_best.pt").is_file():
        args.checkpoint = str(Path(args.checkpoint) / "checkpoint_best.pt")
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
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
    inference = run_inference(model, dataset, args.batch_size, device, args.amp)
    mean_shape = ckpt.get("mean_shape") if same_data and tuple(cfg["image_size"]) == image_size else None
    results, baseline, errors = evaluate_predictions(inference, thresholds, mean_shape)
    out = Path(args.out) if args.out else Path(ckpt["path"]).parent / f"eval_{split}"
    print(f"{name} / {split}: {len(dataset)} images, checkpoint {ckpt['path']} (epoch {ckpt['epoch'] + 1})")
    print(metrics.format_table(results, baseline, per_landmark=args.per_landmark))
    report = {
        "checkpoint": ckpt["path"],
        "data": name,
        "split": split,
        "image_size": list(image_size),
        "metrics": results,
        "baseline": baseline,
        "predictions": [
            {"id": i, "landmarks": p.tolist(), "truth": t.tolist(), "confidence": c.tolist(), "errors": e.tolist()}
            for i, p, t, c, e in zip(inference["ids"], inference["pred"], inference["truth"],
                                     inference["confidence"], errors)
        ],
    }
    write_json(out / "metrics.json", report)
    write_overlays(out / "overlays", dataset, inference, args.overlays)
    print(f"wrote {out / 'metrics.json'} and {min(args.overlays, len(dataset))} overlays in {out / 'overlays'}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
