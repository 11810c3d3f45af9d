"""Accuracy search for the ``cpu`` training profile on ISBI 2015: which input size, width and
epoch count gives the best held-out MRE within the profile's time budget.

    python bench/profile_search.py --root ../shared/realdata/isbi2015 --out DIR
    python bench/profile_search.py --root ... --out DIR --time      # also time coor per candidate

Every candidate spends about the same CPU time on the slowest transformer kind (coor,
~21-29 min per ISBI run on one core of the 2-core VM, measured with
``bench/train_profile.py``): a larger input or a wider network buys fewer epochs, a
smaller input more.  Each candidate is one ``coorkern.experiments --study transformer``
run of ``--kind`` (default ``none``: the cheapest kind, and the least noisy between seeds)
in its own folder ``DIR/<H>x<W>_b<base>_<epochs>ep`` -- resumable like any study -- on the
holdout protocol (ISBI images 001-100 train, 101-150 held out).  The table compares the
held-out MRE / SDR with a paired t-test (scipy) of the per-image MRE against the first
candidate, the profile as it stands; it is printed and written to ``DIR/search.md`` and
``DIR/search.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coorkern import experiments  # noqa: E402
from coorkern.engine import profiles  # noqa: E402
from coorkern.engine.study_report import format_mean_std, format_p  # noqa: E402

_CPU = profiles.PROFILES["cpu"]
# (H, W, base channels, epochs); the first is the profile itself.  Epochs chosen so that a
# coor run stays within ~30 min of one core (train_profile.py CPU time, 2026-11-26):
# 320x256 b8 0.64 min/epoch, 256x208 b16 0.62, 192x160 b8 0.18, 256x208 b8 0.35.
CANDIDATES = [
    (*_CPU.image_size["isbi2015"], _CPU.base_channels, _CPU.epochs["isbi2015"]),
    (320, 256, 8, 45),
    (256, 208, 8, 80),
    (192, 160, 8, 150),
    (256, 208, 16, 45),
]


def folder_name(h: int, w: int, base: int, epochs: int) -> str:
    return f"{h}x{w}_b{base}_{epochs}ep"


def run_candidate(candidate, args) -> dict:
    """Train (or resume, or skip when finished) one candidate; its ``report.json`` row of ``--kind``."""
    h, w, base, epochs = candidate
    out = Path(args.out) / folder_name(*candidate)
    argv = ["--study", "transformer", "--variants", args.kind, "--seeds", args.seeds, "--data", "isbi2015",
            "--root", args.root, "--profile", "cpu", "--jobs", str(args.jobs), "--threads", str(args.threads),
            "--image-size", str(h), str(w), "--epochs", str(epochs), "--train-args", f"--base-channels {base}",
            "--out", str(out)]
    if args.report_only:
        argv.append("--report-only")
    experiments.main(argv)
    report = json.loads((out / "report.json").read_text())
    return report["studies"]["transformer"]["variants"][args.kind]


def coor_minutes(candidate, train_images: int = 100, val_images: int = 50) -> float:
    """CPU minutes of one coor run of ``candidate`` (``train_profile.time_kind``, 1 thread)."""
    from train_profile import time_kind

    h, w, base, epochs = candidate
    torch.set_num_threads(1)  # as a training run on <= 2 cores; process time would add up the threads
    step_s, infer_s = time_kind("coor", (h, w), base, _CPU.batch_size, steps=2, repeats=2)["cpu"]
    epoch_s = train_images // _CPU.batch_size * step_s + val_images * infer_s
    return (epochs * epoch_s + val_images * infer_s) / 60


def table(rows: list, kind: str) -> str:
    from scipy import stats

    ref = rows[0]["result"]["per_image_mre"]
    thresholds = rows[0]["result"]["thresholds"]
    head = ["candidate (HxW, base, epochs)", "coor CPU min / run", f"{kind}: seeds", "MRE (mm)"]
    head += [f"SDR {t:g} mm (%)" for t in thresholds] + ["p vs profile", f"{kind} wall min / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows):
        r = row["result"]
        ids = sorted(set(ref) & set(r["per_image_mre"]))
        a = np.array([r["per_image_mre"][k] for k in ids])
        b = np.array([ref[k] for k in ids])
        p = float(stats.ttest_rel(a, b).pvalue) if i and len(ids) > 1 and np.any(a != b) else None
        row["p_value"] = p
        h, w, base, epochs = row["candidate"]
        cells = [f"{h}x{w}, {base}, {epochs}" + (" (profile)" if i == 0 else ""),
                 f"{row['coor_cpu_min']:.1f}" if row.get("coor_cpu_min") else "n/a",
                 str(len(r["seeds"])), format_mean_std(r["mre"])]
        cells += [format_mean_std(r["sdr"][k]) for k in r["sdr"]]
        cells += ["—" if i == 0 else format_p(p), format_mean_std(r["wall_s"], 1 / 60, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="ISBI 2015 folder (e.g. ../shared/realdata/isbi2015)")
    p.add_argument("--out", required=True, help="folder of the candidates' studies and search.md")
    p.add_argument("--kind", default="none", choices=["none", "vanilla", "swin", "deformable", "coor"])
    p.add_argument("--seeds", default="1", help="as coorkern.experiments --seeds (default: seed 0 only)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", help="comma-separated candidate folders (e.g. 320x256_b8_45ep) to train now")
    p.add_argument("--time", action="store_true", help="also time a coor training step per candidate")
    p.add_argument("--report-only", action="store_true", help="train nothing; tabulate the finished candidates")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for candidate in CANDIDATES:
        name = folder_name(*candidate)
        if only is not None and name not in only and not (Path(args.out) / name / "report.json").is_file():
            continue
        saved_report_only = args.report_only
        args.report_only = saved_report_only or (only is not None and name not in only)
        row = {"candidate": list(candidate), "folder": name, "result": run_candidate(candidate, args)}
        args.report_only = saved_report_only
        if args.time:
            row["coor_cpu_min"] = coor_minutes(candidate)
        if row["result"].get("seeds"):
            rows.append(row)
    if not rows or rows[0]["candidate"] != list(CANDIDATES[0]):
        raise SystemExit("the first candidate (the profile as it stands) has no finished run yet")
    text = table(rows, args.kind)
    print(text)
    out = Path(args.out)
    (out / "search.md").write_text(f"# cpu profile accuracy search ({args.kind}, seeds {args.seeds})\n\n{text}")
    (out / "search.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
