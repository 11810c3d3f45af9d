"""The report of a study (:mod:`coorkern.engine.studies`): held-out metrics, paired t-tests, convergence and
attention focus of every variant, as ``report.md``/``report.json`` and PNGs.

For every finished run, the best checkpoint is evaluated once on the held-out split
(``RUN/eval/metrics.json``) and, for runs with attention, its attention-focus numbers are
measured once on the first :data:`FOCUS_IMAGES` images of its *validation* split
(``RUN/eval/attention.json``, :mod:`coorkern.engine.attention_focus`).  Per variant, over
its seeds:

* held-out MRE / SDR (mean ± std over seeds) and the paired t-test
  (``scipy.stats.ttest_rel``) of the per-image MRE, averaged over seeds, against the
  study's reference and its ``compare`` variants where the report includes them (the
  transformer study: against ``none`` and ``vanilla`` as well as ``coor``; the loss study:
  against ``central+lr0.01`` as well as ``central``);
* convergence, from the validation split only (Fig. 9's claim): validation MRE at the
  epochs of :data:`CONVERGENCE_EPOCHS`, the best validation MRE of the seed-mean curve and
  its epoch, the validation MRE of the selected checkpoints (what variants are chosen by),
  and the first epoch at which the variant's seed-mean curve reaches the best validation
  MRE of each compared variant;
* attention focus per decoder stage: attention mass near the landmarks over the area share
  of those keys (1 = no focus), entropy over ``log N``, coordinate displacement in cells.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import data as data_mod
from .attention_focus import measure_checkpoint
from .checkpoints import load_checkpoint, model_from_checkpoint
from .files import atomic_write_bytes, write_json
from .inference import evaluate_checkpoint, evaluation_data, resolve_device
from .studies import STUDIES, StudyRun, run_name

__all__ = ["CONVERGENCE_EPOCHS", "FOCUS_IMAGES", "summarize", "format_p", "format_mean_std", "study_table",
           "convergence_table", "focus_table", "plot_study", "write_report"]

CONVERGENCE_EPOCHS = (10, 20, 30)  # validation MRE reported at these epochs (the paper's Fig. 9 axis)
FOCUS_IMAGES = 4  # validation images the attention-focus numbers average over


# ---------------------------------------------------------------------------
# One run


def _evaluate(run: StudyRun) -> Optional[dict]:
    """Per-image errors of the run's best checkpoint (``eval/metrics.json``, written once)."""
    path = run.folder / "eval" / "metrics.json"
    if not path.is_file():
        try:
            ckpt = load_checkpoint(run.folder / "checkpoint_best.pt")
            evaluate_checkpoint(ckpt, evaluation_data(ckpt), path.parent, device=resolve_device("auto"))
        except (FileNotFoundError, ValueError, data_mod.DatasetFormatError) as exc:
            print(f"evaluation of {run.folder} failed: {exc}", file=sys.stderr)
            return None
    return json.loads(path.read_text())


def _attention(run: StudyRun) -> Optional[dict]:
    """Attention-focus numbers of the run's best checkpoint on its validation split (``eval/attention.json``,
    written once); ``None`` without a transformer or when they cannot be measured."""
    if run.settings.get("transformer", "none") == "none":
        return None
    path = run.folder / "eval" / "attention.json"
    if not path.is_file():
        try:
            ckpt = load_checkpoint(run.folder / "checkpoint_best.pt")
            split = ckpt["config"].get("splits", {}).get("val", {}).get("split")
            target = evaluation_data(ckpt, split=split)
            device = resolve_device("auto")
            focus = measure_checkpoint(model_from_checkpoint(ckpt, device), target.dataset, FOCUS_IMAGES,
                                       device=device)
        except (FileNotFoundError, ValueError, data_mod.DatasetFormatError) as exc:
            print(f"attention of {run.folder} could not be measured: {exc}", file=sys.stderr)
            return None
        write_json(path, {"split": target.split, "radius_cells": 2.0, **focus})
    return json.loads(path.read_text())


def _run_summary(run: StudyRun) -> Optional[dict]:
    """Metrics, per-image MRE, validation curves, attention focus and timings of a finished run."""
    if not run.finished:
        return None
    evaluation = _evaluate(run)
    if evaluation is None:
        return None
    history = json.loads((run.folder / "metrics.json").read_text())
    record_path = run.folder / "experiment.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    # The epoch of the checkpoint the run kept, as the trainer recorded it (its --select rule).
    selected_epoch = json.loads((run.folder / "test_metrics.json").read_text()).get("best_epoch") or len(history)
    per_image = {p["id"]: float(np.nanmean(np.asarray(p["errors"], dtype=float))) for p in evaluation["predictions"]}
    overall = evaluation["metrics"]["overall"]
    unit = evaluation["metrics"]["unit"]
    val_mre = [row.get(f"val_mre_{unit}") for row in history]
    return {
        "folder": str(run.folder),
        "mre": overall["mre"],
        "sdr": overall["sdr"],
        "unit": unit,
        "thresholds": evaluation["metrics"]["thresholds"],
        "smape": (evaluation.get("cobb") or {}).get("smape"),  # spine: Cobb-angle SMAPE (%)
        # spine: share of the predicted corners on their own vertebra
        "own_vertebra": ((evaluation.get("cobb") or {}).get("vertebra_level") or {}).get("own"),
        "per_image_mre": per_image,
        "val_loss": [row.get("val_loss") for row in history],
        "val_mre": val_mre,
        "selected_epoch": selected_epoch,
        "attention": _attention(run),
        "epochs": len(history),
        "wall_s": record.get("wall_s"),
        "train_time_s": sum(row["epoch_time_s"] for row in history),
        "images_per_s": float(np.mean([row["images_per_s"] for row in history])),
    }


# ---------------------------------------------------------------------------
# Over seeds and variants


def _mean_std(values: Sequence[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def _mean_curve(curves: list) -> list:
    """Epoch-wise mean of the seeds' curves, as long as the shortest (``None`` where a seed has no value)."""
    length = min(len(c) for c in curves)
    return [None if any(c[e] is None for c in curves) else float(np.mean([c[e] for c in curves]))
            for e in range(length)]


def _focus(done: dict) -> Optional[list]:
    """Per decoder block, the seed means of the attention-focus numbers (``None`` without attention)."""
    reports = [d["attention"] for d in done.values() if d.get("attention") and d["attention"].get("stages")]
    if not reports:
        return None
    rows = []
    for position, first in enumerate(reports[0]["stages"]):
        blocks = [r["stages"][position] for r in reports if len(r["stages"]) > position]

        def mean(get):
            values = [get(b) for b in blocks]
            return float(np.mean(values)) if values and all(v is not None for v in values) else None

        rows.append({"name": first["name"], "token_grid": first["token_grid"],
                     "landmark_mass_ratio": mean(lambda b: b["landmark_mass_ratio"]),
                     "landmark_mass": mean(lambda b: b["landmark_mass"]),
                     "landmark_area_share": mean(lambda b: b["landmark_area_share"]),
                     "entropy_ratio": mean(lambda b: b["entropy"] / b["uniform_entropy"]),
                     "displacement_mean": mean(lambda b: (b["displacement_cells"] or {}).get("mean")),
                     "displacement_max": mean(lambda b: (b["displacement_cells"] or {}).get("max"))})
    return rows


def _variant_row(name: str, settings: dict, done: dict, seeds: list) -> dict:
    first = next(iter(done.values()))
    ids = sorted(set.intersection(*(set(d["per_image_mre"]) for d in done.values())))
    val_mre = _mean_curve([d["val_mre"] for d in done.values()])
    finite = [(v, e) for e, v in enumerate(val_mre, 1) if v is not None]
    best_val = min(finite) if finite else (None, None)
    return {
        "run": name,
        "settings": settings,
        "seeds": sorted(done),
        "missing": [s for s in seeds if s not in done],
        "unit": first["unit"],
        "thresholds": first["thresholds"],
        "mre": _mean_std([d["mre"] for d in done.values()]),
        "sdr": {t: _mean_std([d["sdr"][t] for d in done.values()]) for t in first["sdr"]},
        "smape": _mean_std([d.get("smape") for d in done.values()]),
        "own_vertebra": _mean_std([d.get("own_vertebra") for d in done.values()]),
        "wall_s": _mean_std([d["wall_s"] for d in done.values()]),
        "images_per_s": _mean_std([d["images_per_s"] for d in done.values()]),
        "per_image_mre": {i: float(np.mean([d["per_image_mre"][i] for d in done.values()])) for i in ids},
        "val_loss": _mean_curve([d["val_loss"] for d in done.values()]),
        "val_mre": val_mre,
        "val_mre_at": {e: _mean_std([d["val_mre"][e - 1] if len(d["val_mre"]) >= e else None
                                     for d in done.values()]) for e in CONVERGENCE_EPOCHS},
        "best_val_mre": {"value": best_val[0], "epoch": best_val[1]},
        "selected_val_mre": _mean_std([d["val_mre"][d["selected_epoch"] - 1] for d in done.values()]),
        "attention": _focus(done),
        "folders": [d["folder"] for d in done.values()],
    }


def _paired_p(a: dict, b: dict) -> Optional[float]:
    from scipy import stats

    ids = sorted(set(a) & set(b))
    x, y = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
    if len(ids) < 2 or not np.any(x != y):
        return None
    return float(stats.ttest_rel(x, y).pvalue)


def _epochs_to_reach(curve: list, target: Optional[float]) -> Optional[int]:
    """The first (1-based) epoch at which ``curve`` is at or below ``target``; ``None`` if never."""
    if target is None:
        return None
    return next((e for e, v in enumerate(curve, 1) if v is not None and v <= target), None)


def summarize(variants: dict, runs: list) -> dict:
    """``{study: {"reference", "compare", "title", "variants": {name: stats}}}`` from the finished runs."""
    by_key = {(r.name, r.seed): r for r in runs}
    cache: dict = {}
    report = {}
    for study, per_study in variants.items():
        rows = {}
        for variant, settings in per_study.items():
            name = run_name(settings)
            seeds = sorted(s for (n, s) in by_key if n == name)
            done = {}
            for seed in seeds:
                if (name, seed) not in cache:
                    cache[(name, seed)] = _run_summary(by_key[(name, seed)])
                if cache[(name, seed)] is not None:
                    done[seed] = cache[(name, seed)]
            rows[variant] = _variant_row(name, settings, done, seeds) if done else {"run": name, "seeds": [],
                                                                                    "missing": seeds}
        reference = STUDIES[study]["reference"]
        # The study's other compared variants where this report includes them.
        compare = [reference] + [v for v in STUDIES[study].get("compare", ()) if v != reference and v in rows]
        for variant, row in rows.items():
            if not row.get("per_image_mre"):
                continue
            row["p_values"] = {other: (None if other == variant or not rows.get(other, {}).get("per_image_mre")
                                       else _paired_p(row["per_image_mre"], rows[other]["per_image_mre"]))
                               for other in compare}
            row["p_value"] = row["p_values"][reference]
            row["epochs_to_reach"] = {other: _epochs_to_reach(row["val_mre"], rows[other]["best_val_mre"]["value"])
                                      for other in compare if other != variant and rows.get(other, {}).get("seeds")}
            if row.get("p_value") is not None:
                row["paired_images"] = len(set(row["per_image_mre"]) & set(rows[reference]["per_image_mre"]))
        report[study] = {"title": STUDIES[study]["title"], "reference": reference, "compare": compare,
                         "variants": rows}
    return report


# ---------------------------------------------------------------------------
# Tables and plots


def format_p(p: Optional[float]) -> str:
    """A p-value the way the paper marks it: ** below 5e-5, * below 0.05."""
    if p is None or not math.isfinite(p):
        return "n/a"
    mark = " (**)" if p < 5e-5 else (" (*)" if p < 0.05 else "")
    return f"{p:.2g}{mark}"


def format_mean_std(stat: dict, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of a summary statistic (times ``scale``); ``n/a`` where no run gave a value."""
    if stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text + (f" ± {stat['std'] * scale:.{digits}f}" if stat.get("std") is not None else "")


def _finished(study: dict) -> list:
    return [(v, r) for v, r in study["variants"].items() if r.get("seeds")]


def _compare(study: dict) -> list:
    return study.get("compare") or [study["reference"]]


def study_table(study: dict) -> str:
    """Held-out MRE, SDR (, Cobb SMAPE), p-values against the compared variants, time per run."""
    rows = _finished(study)
    if not rows:
        return "_no finished runs yet_\n"
    unit, thresholds = rows[0][1]["unit"], rows[0][1]["thresholds"]
    sdr_keys = list(rows[0][1]["sdr"])
    smape = any((r.get("smape") or {}).get("mean") is not None for _, r in rows)
    own = any((r.get("own_vertebra") or {}).get("mean") is not None for _, r in rows)
    compare = _compare(study)
    head = (["variant", "seeds", f"MRE ({unit})"] + [f"SDR {t:g} {unit} (%)" for t in thresholds]
            + (["Cobb SMAPE (%)"] if smape else []) + (["corners on own vertebra (%)"] if own else [])
            + [f"p vs {c}" for c in compare]
            + ["wall time / run (min)", "train img/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, r in rows:
        p_values = r.get("p_values") or {study["reference"]: r.get("p_value")}
        cells = [variant + (" (ref.)" if variant == study["reference"] else ""), str(len(r["seeds"])),
                 format_mean_std(r["mre"])]
        cells += [format_mean_std(r["sdr"][k]) for k in sdr_keys]
        cells += [format_mean_std(r.get("smape") or {})] if smape else []
        cells += [format_mean_std(r.get("own_vertebra") or {}, 100, 1)] if own else []
        cells += ["—" if variant == c else format_p(p_values.get(c)) for c in compare]
        cells += [format_mean_std(r["wall_s"], 1 / 60, 1), format_mean_std(r["images_per_s"], 1.0, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [f"{v} (seeds {r['missing']})" for v, r in study["variants"].items() if r.get("missing")]
    if missing:
        lines.append(f"\nnot finished: {', '.join(missing)}")
    return "\n".join(lines) + "\n"


def convergence_table(study: dict) -> str:
    """Validation-split convergence per variant: MRE at :data:`CONVERGENCE_EPOCHS`, best, selected, epochs to reach."""
    rows = [(v, r) for v, r in _finished(study) if "val_mre_at" in r]
    if not rows:
        return "_no finished runs yet_\n"
    unit = rows[0][1]["unit"]
    compare = [c for c in _compare(study) if study["variants"].get(c, {}).get("seeds")]
    head = (["variant"] + [f"val MRE ep {e} ({unit})" for e in CONVERGENCE_EPOCHS]
            + ["best val MRE (epoch)", "val MRE, selected ckpt"]
            + [f"epochs to {c}'s best val MRE" for c in compare])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, r in rows:
        best = r["best_val_mre"]
        cells = [variant] + [format_mean_std(r["val_mre_at"][e]) for e in CONVERGENCE_EPOCHS]
        cells.append(f"{best['value']:.2f} ({best['epoch']})" if best["value"] is not None else "n/a")
        cells.append(format_mean_std(r["selected_val_mre"]))
        for c in compare:
            reached = r.get("epochs_to_reach", {}).get(c)
            cells.append("—" if c == variant else ("never" if reached is None else str(reached)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def focus_table(study: dict) -> Optional[str]:
    """Attention focus per variant and decoder block (seed means); ``None`` when no variant has attention."""
    rows = [(v, r) for v, r in _finished(study) if r.get("attention")]
    if not rows:
        return None
    lines = ["| variant | block (tokens) | landmark mass / area share | entropy / log N | "
             "displacement mean / max (cells) |", "|---|---|---|---|---|"]
    for variant, r in rows:
        for block in r["attention"]:
            ratio = block["landmark_mass_ratio"]
            disp = ("-" if block["displacement_mean"] is None
                    else f"{block['displacement_mean']:.2f} / {block['displacement_max']:.2f}")
            grid = "x".join(map(str, block["token_grid"]))
            lines.append(f"| {variant} | {block['name']} ({grid}) | "
                         f"{'n/a' if ratio is None else f'{ratio:.2f}'} "
                         f"({block['landmark_mass']:.3f} / {block['landmark_area_share']:.3f}) | "
                         f"{block['entropy_ratio']:.3f} | {disp} |")
    return "\n".join(lines) + "\n"


def plot_study(name: str, study: dict, out: Path) -> dict:
    """Box plot of per-image MRE per variant, mean validation-loss and validation-MRE curves; the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _finished(study)
    if not rows:
        return {}
    unit = rows[0][1]["unit"]
    paths = {}
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    ax.boxplot([list(r["per_image_mre"].values()) for _, r in rows], showmeans=True)
    ax.set_xticks(range(1, len(rows) + 1), [v for v, _ in rows], rotation=20, fontsize=8)
    ax.set_ylabel(f"per-image MRE ({unit}), mean over seeds")
    ax.set_title(study["title"], fontsize=9)
    for i, (v, r) in enumerate(rows, 1):
        if r.get("p_value") is not None:
            ax.annotate(format_p(r["p_value"]), (i, 1.0), xycoords=("data", "axes fraction"), ha="center",
                        va="bottom", fontsize=7)
    fig.tight_layout()
    paths["box"] = out / f"{name}_mre_boxplot.png"
    fig.savefig(paths["box"], dpi=110)
    plt.close(fig)

    for key, label in (("val_loss", "validation loss"), ("val_mre", f"validation MRE ({unit})")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for v, r in rows:
            curve = r.get(key) or []
            if curve and all(x is not None for x in curve):
                ax.plot(range(1, len(curve) + 1), curve, marker=".", markersize=3, label=v)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{label} (mean over seeds)")
        ax.set_yscale("log")
        note = "\n(different losses: levels not comparable)" if name == "loss" and key == "val_loss" else ""
        ax.set_title(study["title"] + note, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths[key] = out / f"{name}_{key}.png"
        fig.savefig(paths[key], dpi=110)
        plt.close(fig)
    return paths


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def write_report(args, variants: dict, runs: list, common: Sequence[str]) -> dict:
    """``report.md``, ``report.json`` and the PNGs in ``args.out`` for the study options ``args``."""
    out = Path(args.out)
    report = summarize(variants, runs)
    plots = {name: {k: str(p) for k, p in plot_study(name, study, out).items()} for name, study in report.items()}
    protocol = {
        "command": "python -m coorkern.experiments " + shlex.join(args.argv),
        "data": args.data,
        "root": args.root,
        "profile": args.profile,
        "seeds": args.seeds,
        "train_args_common": list(common),
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if args.data == "isbi2015" and args.isbi_protocol == "holdout":
        protocol["split"] = {"train": "ISBI 2015 training images 001-085",
                             "val": "086-100 (best epoch, conformal radii)", "test": "101-150 (held out)"}
    elif args.data == "spine":
        protocol["split"] = {"train": "spine holdout_train (361 images)",
                             "val": "holdout_val (40; best epoch, conformal radii)",
                             "test": "holdout_test (80, held out)"}
    lines = [f"# coorkern experiments: {', '.join(report)}", ""]
    lines += [f"- {k}: {v}" for k, v in protocol.items()]
    lines += ["", "Held-out metrics of the checkpoint with the best validation score (the profile's `--select`); "
                  "mean ± std over seeds. p: paired t-test (scipy.stats.ttest_rel) of the per-image MRE, averaged "
                  "over seeds, against the variant named; (**) p < 5e-5, (*) p < 0.05, as in the paper. "
                  "Convergence and attention focus come from the validation split only.", ""]
    for name, study in report.items():
        lines += [f"## {name}: {study['title']}", "", study_table(study), "### Convergence (validation split)", "",
                  convergence_table(study)]
        focus = focus_table(study)
        if focus:
            lines += [f"### Attention focus (validation split, first {FOCUS_IMAGES} images, radius 2 token cells)",
                      "", focus]
        for kind, path in plots.get(name, {}).items():
            lines.append(f"![{name} {kind}]({Path(path).name})")
        lines.append("")
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    payload = {"protocol": protocol, "studies": report, "plots": plots}
    write_json(out / "report.json", payload)
    return payload
