"""Reproduce the paper's studies: ``python -m coorkern.experiments --study {loss,r,transformer,all}``.

Studies (the paper's tables and figures):

* ``loss`` -- BCE, weighted BCE, focal (gamma 2) and the central loss (r = 2) on the
  U-Net without transformer (Table II, Fig. 5);
* ``r`` -- the central loss with r = 0, 1, 2, 3 (Table III, Fig. 7);
* ``transformer`` -- none, vanilla, swin, deformable and coor attention, all with the
  central loss (Table IV, Fig. 9); with ``--variants``, also the readings of the
  coordinate module: ``coor+offset`` (``--position none``: the first default,
  without the Fourier positions of today's ``coor``), ``coor+linear`` (``--position linear``),
  ``coor+absolute`` (``--coord-mode absolute``), ``coor+range8`` (``--offset-range 8``),
  ``coor+init0.1`` (``--offset-init-std 0.1``), ``coor+lr10`` (``--coord-lr-mult 10``; ``coor+offset+lr10`` without positions),
  ``coor+queries`` (``--coord-source queries``), ``coor+perhead`` (``--coord-groups 8``),
  ``deformable+linear`` and ``vanilla+sincos`` (``--vanilla-position sincos``); and
  ``none+lr0.01``, ``vanilla+lr0.01``, ``coor+lr0.01`` (``--lr 0.01 --min-lr 0.001``, the rate
  the loss study validated best).  Any other reading goes to every run through
  ``--train-args "--offset-range 2"``.

Every run is an ordinary ``python -m coorkern.train`` process with its own folder
``OUT/runs/<variant>/seed<k>`` (``--jobs`` at a time, the CPU threads split between
them); the seed varies the model init, data order and augmentation, never the
evaluation images.  Runs that two studies share (central r = 2 without transformer is
in all three) are trained once.  A finished run is skipped, an interrupted one resumed
from its ``checkpoint_last.pt`` with the training command's ``--resume``, so the same
command line continues a study.  After training, the best checkpoint of every run is
evaluated as ``coorkern evaluate`` does (per-image errors) and ``OUT/report.md`` +
``report.json`` give, per variant, MRE and SDR as mean +- std over seeds, wall time and
training images/s per run, paired t-tests (``scipy.stats.ttest_rel``) of the per-image
MRE (averaged over seeds) against the paper's choice, and PNGs: box plots of the
per-image MRE per variant and validation-loss curves per epoch.

``--data isbi2015`` uses the 150 training images of the challenge: train on ids 001-085,
select the checkpoint (and calibrate the radii) on 086-100, report 101-150 -- the 250 test
images are not needed -- unless ``--isbi-protocol paper`` (train on 1-150 less the
validation part ``coorkern train`` carves from it, 136-150; evaluate on 151-400).
``--data spine`` uses the spine's development holdout: ``holdout_train`` / ``holdout_val``
/ ``holdout_test`` (361 / 40 / 80 images, case-disjoint), and the report adds the Cobb
angles' SMAPE.  The planning and running is :mod:`coorkern.engine.studies`, the report
:mod:`coorkern.engine.study_report`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import data as data_mod
from .engine.cli_args import HelpFormatter, description, positive_int, prog
from .engine.config import add_config_option, parse_with_config, plain_options, write_config
from .engine.profiles import PROFILE_CHOICES
from .engine.studies import (STUDIES, check_same_options, common_train_args, plan_runs, run_all,
                             selected_variants, studies_of)
from .engine.study_report import write_report

__all__ = ["build_parser", "main"]


def _seeds(text: str) -> list:
    try:
        if "," in text or not text.isdigit():
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count K (seeds 0..K-1) or a list like 0,1,2, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative ints, at least one, got {text!r}")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("experiments"), description=description(__doc__),
                                formatter_class=HelpFormatter)
    add_config_option(p)
    p.add_argument("--study", choices=(*STUDIES, "all"),
                   help="which table/figure to reproduce (required, here or in --config)")
    p.add_argument("--data", default="synthetic", choices=data_mod.DATASETS, help="dataset format")
    p.add_argument("--root", help="dataset folder (not needed for synthetic)")
    p.add_argument("--profile", default="auto", choices=PROFILE_CHOICES,
                   help="training profile of every run (coorkern.engine.profiles)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="K (seeds 0..K-1) or a list 0,3,7")
    p.add_argument("--jobs", type=positive_int, default=1, help="runs trained at the same time")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads in all (split between the jobs); default: the machine's cores")
    p.add_argument("--out", default="experiments", help="folder of the runs and the report")
    p.add_argument("--epochs", type=positive_int, help="override the profile's epochs")
    p.add_argument("--image-size", type=positive_int, nargs=2, metavar=("H", "W"), help="override the input size")
    p.add_argument("--variants", help="comma-separated subset, e.g. bce,central or coor,swin "
                                      f"(names: {', '.join(v for s in STUDIES.values() for v in s['variants'])}; "
                                      f"transformer study extras: {', '.join(STUDIES['transformer']['extra_variants'])}; "
                                      f"loss study extras: {', '.join(STUDIES['loss']['extra_variants'])})")
    p.add_argument("--isbi-protocol", default="holdout", choices=("holdout", "paper"),
                   help="isbi2015: holdout = images 1-85 train / 86-100 validation / 101-150 held out; "
                        "paper = 1-150 (136-150 validation) / 151-400")
    p.add_argument("--train-args", default="", help="extra options for every training run, e.g. "
                                                    "\"--base-channels 16 --amp bf16\" or \"--position linear\"")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    return p


def _config_of(args) -> dict:
    """The study's options as ``--config`` reads them back (seeds as the list form "0,1,2")."""
    options = plain_options(vars(args), exclude=("argv", "report_only"))
    seeds = [str(s) for s in args.seeds]
    options["seeds"] = ",".join(seeds) + ("," if len(seeds) == 1 else "")
    return options


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the studies; returns ``{"report", "launched", "failed"}``.

    When a run failed, the report is still written and ``SystemExit(1)`` is raised, so the
    exit status is 1 from ``python -m coorkern.experiments`` and ``coorkern experiments`` alike.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, _ = parse_with_config(parser, argv)
    if args.study is None:
        parser.error("--study is required (on the command line or in --config)")
    args.argv = argv
    if args.data != "synthetic" and not args.root:
        parser.error(f"--data {args.data} needs --root (the folder with the data set's files)")
    try:
        variants = selected_variants(studies_of(args.study), args.variants)
        shlex.split(args.train_args)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out / "config.yaml", _config_of(args),
                 header="coorkern experiments options; `coorkern experiments --config <this file>` reruns them")
    try:
        common = common_train_args(args)
    except (ValueError, data_mod.DatasetFormatError) as exc:
        parser.error(str(exc))
    try:
        check_same_options(out, common)
    except ValueError as exc:
        parser.error(str(exc))
    runs = plan_runs(variants, args.seeds, out)
    total = args.threads or os.cpu_count() or 1
    jobs = min(args.jobs, max(1, len([r for r in runs if not r.finished])))
    results = [] if args.report_only else run_all(runs, common, jobs, max(1, total // jobs))
    failed = [r for r in results if r["returncode"] != 0 or not r["run"].finished]
    report = write_report(args, variants, runs, common)
    print(f"report: {out / 'report.md'} (+ report.json, PNGs)")
    if failed:
        print(f"{len(failed)} run(s) failed; see their train.log", file=sys.stderr)
        raise SystemExit(1)
    return {"report": report, "launched": results, "failed": failed}


if __name__ == "__main__":
    main()
