"""The paper's studies as sets of training runs: the variants, planning and running them.

A study (:data:`STUDIES`: the losses of Table II, the central loss exponent r of
Table III, the decoder transformers of Table IV) is a set of variants, each trained with
several seeds.  :func:`plan_runs` turns the chosen variants into distinct runs (settings
two studies share are trained once), :func:`run_all` trains the unfinished ones as
``python -m coorkern.train`` subprocesses (resuming interrupted ones), and
:mod:`coorkern.engine.study_report` evaluates every finished run's best checkpoint and
writes the report.  ``coorkern experiments`` is the command over both.

Besides the paper's variants, the transformer study has extra ones that only run when
``--variants`` names them (:data:`READING_VARIANTS`): the coordinate attention with one
reading of the coordinate module changed (``coor+linear``, ``coor+range8``, ...) and
``vanilla+sincos`` (docs/design/detector.md explains the readings), and ``none``, ``vanilla`` and
``coor`` at the learning rate the loss study validated best (``coor+lr0.01``, :data:`RATE_VARIANTS`).  The loss study's extra
variants (:data:`LOSS_VARIANTS`) give a loss its own learning rate (``focal+lr0.01``), weighted
BCE another positive weight (``wbce+w10``) and BCE the prior initial bias (``bce+prior``): the
screen that makes the Table II baselines fair.

Splits, fixed and listed (checkpoint selection never on the reported images):

* ISBI 2015, holdout protocol (:data:`ISBI_HOLDOUT`): the challenge's 150 training images,
  train 001-085, validation 086-100 (best epoch, conformal radii), test 101-150;
* spine: the development holdout of the 481 training images, ``holdout_train`` (361) /
  ``holdout_val`` (40) / ``holdout_test`` (80), case-disjoint
  (:data:`coorkern.data.SPINE_HOLDOUT_ROWS`);
* other data: ``coorkern train``'s default splits (:mod:`coorkern.engine.splits`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import data as data_mod
from .files import atomic_write_bytes, write_json
from .profiles import PROFILES
from .trainer import READING_OPTIONS

__all__ = ["STUDIES", "READING_VARIANTS", "LOSS_VARIANTS", "RATE_VARIANTS", "ISBI_HOLDOUT", "StudyRun", "run_name", "studies_of", "selected_variants",
           "plan_runs", "train_command", "common_train_args", "check_same_options", "run_all"]

# The folder that holds the coorkern package: the training subprocesses import this checkout's coorkern.
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]

STUDIES = {
    "loss": {
        "title": "Losses on the U-Net without transformer (Table II, Fig. 5)",
        "reference": "central",
        "variants": {
            "bce": dict(transformer="none", loss="bce"),
            "wbce": dict(transformer="none", loss="wbce"),
            "focal": dict(transformer="none", loss="focal"),
            "central": dict(transformer="none", loss="central", r=2.0),
        },
    },
    "r": {
        "title": "Central loss exponent r on the U-Net without transformer (Table III, Fig. 7)",
        "reference": "r2",
        "variants": {f"r{r}": dict(transformer="none", loss="central", r=float(r)) for r in range(4)},
    },
    "transformer": {
        "title": "Transformers in the decoder, central loss r = 2 (Table IV, Fig. 9)",
        "reference": "coor",
        # coor spells its position out: the folder name says which model ran, whatever the default.
        "variants": {t: dict(transformer=t, loss="central", r=2.0, **({"position": "fourier"} if t == "coor" else {}))
                     for t in ("none", "vanilla", "swin", "deformable", "coor")},
        # The target of the coordinate readings: better than no transformer and than plain attention.
        "compare": ["none", "vanilla"],
    },
}

def _reading(kind: str, **options) -> dict:
    return dict(transformer=kind, loss="central", r=2.0, **options)


# Extra variants of the transformer study: one reading of the coordinate module (or the vanilla
# kind's position encoding) changed from the default coor (which has the Fourier position); the
# options of ``coorkern train`` of the same names.  ``coor+offset`` is coor without a position
# (the default until the readings study), ``coor+offset+lr10`` the learning-rate reading screened on it.
READING_VARIANTS = {
    "coor+offset": _reading("coor", position="none"),
    "coor+linear": _reading("coor", position="linear"),
    "coor+absolute": _reading("coor", coord_mode="absolute", position="fourier"),
    "coor+range8": _reading("coor", offset_range=8.0, position="fourier"),
    "coor+init0.1": _reading("coor", offset_init_std=0.1, position="fourier"),
    "coor+lr10": _reading("coor", coord_lr_mult=10.0, position="fourier"),
    "coor+offset+lr10": _reading("coor", coord_lr_mult=10.0, position="none"),
    "coor+queries": _reading("coor", coord_source="queries", position="fourier"),
    "coor+perhead": _reading("coor", coord_groups=8, position="fourier"),
    "deformable+linear": _reading("deformable", position="linear"),
    "vanilla+sincos": _reading("vanilla", vanilla_position="sincos"),
}
STUDIES["transformer"]["extra_variants"] = READING_VARIANTS

# The training options a loss study variant may set besides its loss (``coorkern train`` options of
# the same names): its own learning rate (the cyclic schedule's peak and floor, kept 10:1 as in the
# profiles), weighted BCE's positive weight and the heatmap head's initial bias.  A loss that does
# not train at the shared settings is no baseline, so each loss gets the rate (and wBCE the weight)
# that validates best (issue 30, item 5; docs/experiments.md).
LOSS_OPTIONS = ("lr", "min_lr", "pos_weight", "head_bias")
SCREEN_LRS = (3e-3, 1e-2)  # besides the profiles' 1e-3
SCREEN_POS_WEIGHTS = (10.0, 100.0)  # besides the area ratio (about 2,100 at the cpu profile's ISBI maps)
# BCE's "prior" initial bias: the logit of a Gaussian target's mean over the cpu profile's ISBI map,
# log(2 pi sigma^2 / (H W - 2 pi sigma^2)) at 256x208 and sigma 2 (RetinaNet's prior initialisation).
# With the default -4, BCE's trained maps peak at the bias itself (pixels with no feature response)
# and the landmarks never rise above it (measured: docs/experiments.md).
BCE_PRIOR_BIAS = -7.7


def _with_rate(settings: dict, lr: float) -> dict:
    """``settings`` trained at peak rate ``lr`` and floor ``lr / 10`` (the profiles' 10:1)."""
    return {**settings, "lr": lr, "min_lr": float(f"{lr / 10:g}")}  # 3e-4, not 3.0000000000000003e-4


def _at_rate(name: str, lr: float) -> str:
    """The name of variant ``name`` trained at peak rate ``lr`` (:func:`_with_rate`), e.g. ``none+lr0.01``."""
    return f"{name}+lr{lr:g}"


def _loss_variant(loss: str, lr: Optional[float] = None, pos_weight: Optional[float] = None,
                  head_bias: Optional[float] = None) -> dict:
    settings = dict(transformer="none", loss=loss, **({"r": 2.0} if loss == "central" else {}))
    if lr is not None:
        settings = _with_rate(settings, lr)
    if pos_weight is not None:
        settings["pos_weight"] = pos_weight
    if head_bias is not None:
        settings["head_bias"] = head_bias
    return settings


def _loss_variant_name(loss: str, lr: Optional[float], pos_weight: Optional[float],
                       head_bias: Optional[float]) -> str:
    name = loss + (f"+w{pos_weight:g}" if pos_weight is not None else "") + ("+prior" if head_bias is not None else "")
    return _at_rate(name, lr) if lr is not None else name


# Extra variants of the loss study: ``bce+lr0.003``, ``wbce+w100``, ``bce+prior+lr0.01``, ...
LOSS_VARIANTS = {
    _loss_variant_name(loss, lr, w, b): _loss_variant(loss, lr, w, b)
    for loss in ("central", "bce", "wbce", "focal")
    for w in ((None, *SCREEN_POS_WEIGHTS) if loss == "wbce" else (None,))
    for b in ((None, BCE_PRIOR_BIAS) if loss == "bce" else (None,))
    for lr in (None, *SCREEN_LRS)
    if lr is not None or w is not None or b is not None
}
STUDIES["loss"]["extra_variants"] = LOSS_VARIANTS
# The fair reference of the tuned baselines: the central loss at the rate it validated best at
# (compared when the report includes it, besides the paper's central at the profile's rate).
STUDIES["loss"]["compare"] = [_at_rate("central", 1e-2)]
# Table IV again at the rate every loss validated best at (1e-2, the loss study's screen on the
# validation split), the same for the three models the target compares: ``none+lr0.01``,
# ``vanilla+lr0.01``, ``coor+lr0.01`` (none's runs are the loss study's ``central+lr0.01``).
# Not to be confused with ``coor+lr10``, the coordinate head's rate multiplier.
TRANSFORMER_RATE = 1e-2
RATE_VARIANTS = {_at_rate(name, TRANSFORMER_RATE): _with_rate(STUDIES["transformer"]["variants"][name], TRANSFORMER_RATE)
                 for name in ("none", "vanilla", "coor")}
STUDIES["transformer"]["extra_variants"] = {**READING_VARIANTS, **RATE_VARIANTS}
# The rate-tuned baselines every row is also compared against (the Table IV target's pair).
STUDIES["transformer"]["compare"] += [_at_rate("none", TRANSFORMER_RATE), _at_rate("vanilla", TRANSFORMER_RATE)]
# Every option a variant may set, in the order its folder name spells them.
VARIANT_OPTIONS = READING_OPTIONS + LOSS_OPTIONS
# ISBI 2015 holdout protocol: image ids of each part (validation: best epoch and conformal radii).
ISBI_HOLDOUT = {"train": list(range(1, 86)), "val": list(range(86, 101)), "test": list(range(101, 151))}
SPINE_HOLDOUT = ("holdout_train", "holdout_val", "holdout_test")


@dataclass
class StudyRun:
    """One training run of a study: variant settings + seed -> a folder."""

    name: str  # shared by variants with the same settings, e.g. "none-central-r2"
    settings: dict
    seed: int
    folder: Path

    @property
    def finished(self) -> bool:
        return (self.folder / "test_metrics.json").is_file()

    @property
    def started(self) -> bool:
        return (self.folder / "checkpoint_last.pt").is_file()


def _option_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(settings: dict) -> str:
    """The folder name of a variant's runs, e.g. ``none-central-r2`` or ``coor-central-r2+position-fourier``."""
    name = f"{settings['transformer']}-{settings['loss']}"
    name += f"-r{settings['r']:g}" if settings["loss"] == "central" else ""
    return name + "".join(f"+{key}-{_option_text(settings[key])}" for key in VARIANT_OPTIONS if key in settings)


# ---------------------------------------------------------------------------
# Planning and running


def studies_of(study: str) -> list:
    return list(STUDIES) if study == "all" else [study]


def selected_variants(study_names: Sequence[str], subset: Optional[str]) -> dict:
    """``{study: {variant: settings}}``: every paper variant of the studies, or the ``subset`` named (which may
    name extra variants, :data:`READING_VARIANTS`); ValueError naming the unknown variants."""
    chosen = {s: dict(STUDIES[s]["variants"]) for s in study_names}
    if subset:
        wanted = [v.strip() for v in subset.split(",") if v.strip()]
        chosen = {s: {**vs, **STUDIES[s].get("extra_variants", {})} for s, vs in chosen.items()}
        known = {v for s in chosen.values() for v in s}
        unknown = [v for v in wanted if v not in known]
        if unknown or not wanted:
            raise ValueError(f"--variants: unknown {unknown or subset!r} for --study "
                             f"{'/'.join(study_names)}; choose from {sorted(known)}")
        chosen = {s: {v: cfg for v, cfg in vs.items() if v in wanted} for s, vs in chosen.items()}
        chosen = {s: vs for s, vs in chosen.items() if vs}
    return chosen


def plan_runs(variants: dict, seeds: Sequence[int], out: Path) -> list:
    """The distinct runs (shared settings trained once) for ``{study: {variant: settings}}``."""
    runs = {}
    for per_study in variants.values():
        for settings in per_study.values():
            name = run_name(settings)
            for seed in seeds:
                runs.setdefault((name, seed), StudyRun(name, settings, seed, out / "runs" / name / f"seed{seed}"))
    return list(runs.values())


def train_command(run: StudyRun, common: Sequence[str], threads: int) -> list:
    """The training command of ``run``: resume when it has a checkpoint, else start."""
    runtime = ["--no-progress", "--threads", str(threads)]
    if run.started:
        return [sys.executable, "-m", "coorkern.train", "--resume", str(run.folder / "checkpoint_last.pt"), *runtime]
    s = run.settings
    variant = ["--transformer", s["transformer"], "--loss", s["loss"]] + (["--r", f"{s['r']:g}"] if "r" in s else [])
    for key in VARIANT_OPTIONS:
        if key in s:
            variant += ["--" + key.replace("_", "-"), _option_text(s[key])]
    return [sys.executable, "-m", "coorkern.train", *common, *variant, "--seed", str(run.seed),
            "--out", str(run.folder), "--overlays", "0", *runtime]


def _execute(run: StudyRun, common: Sequence[str], threads: int) -> dict:
    """Train (or resume) one run in a subprocess; append to its ``experiment.json`` log."""
    command = train_command(run, common, threads)
    kind = "resume" if run.started else "train"
    run.folder.mkdir(parents=True, exist_ok=True)
    record_path = run.folder / "experiment.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"invocations": []}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_PARENT), env.get("PYTHONPATH")]))
    t0 = time.time()
    with open(run.folder / "train.log", "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t0
    record["invocations"].append({"kind": kind, "command": command, "wall_s": wall, "returncode": code,
                                  "threads": threads})
    record["wall_s"] = sum(i["wall_s"] for i in record["invocations"])
    write_json(record_path, record)
    return {"run": run, "kind": kind, "returncode": code, "wall_s": wall}


def common_train_args(args) -> list:
    """The training options every run of the study shares, from the study's parsed options ``args``."""
    common = ["--profile", args.profile]
    if args.data == "isbi2015" and args.isbi_protocol == "holdout":
        common += ["--data", "csv", "--root", str(_isbi_holdout_table(args.root, Path(args.out)))]
        size = args.image_size or _profile_size(args.profile, "isbi2015")
        if size:
            common += ["--image-size", *map(str, size)]
        common += ["--val-split", "val"]
    elif args.data == "spine":
        train, val, test = SPINE_HOLDOUT
        common += ["--data", "spine", "--root", args.root, "--train-split", train, "--val-split", val,
                   "--test-split", test]
        if args.image_size:
            common += ["--image-size", *map(str, args.image_size)]
    else:
        common += ["--data", args.data] + (["--root", args.root] if args.root else [])
        if args.image_size:
            common += ["--image-size", *map(str, args.image_size)]
    if args.data == "synthetic":
        # The seed varies the model init and data order; the images stay the same across seeds.
        common += ["--data-option", "seed=0"]
    if args.epochs:
        common += ["--epochs", str(args.epochs)]
    return common + shlex.split(args.train_args)


def _profile_size(profile: str, data: str) -> Optional[list]:
    if profile == "auto":
        import torch

        profile = "paper" if torch.cuda.is_available() else "cpu"
    return list(PROFILES[profile].image_size[data])


def _isbi_holdout_table(root, out: Path) -> Path:
    """A CSV of the ISBI 2015 training images 1-150 with a split column (:data:`ISBI_HOLDOUT`: 1-85 train,
    86-100 val, 101-150 test).

    The annotations come from the isbi2015 loader (the paper's mean of both doctors when
    both are present); the images stay where they are (absolute paths).
    """
    if not root:
        raise ValueError("--data isbi2015 needs --root (the folder with the data set's files)")
    rows, header = [], None
    for split, ids in ISBI_HOLDOUT.items():
        records = data_mod.load_dataset("isbi2015", root, "train", (64, 64), ids=ids).records
        for rec in records:
            if header is None:
                header = ["image", *(f"{a}{j}" for j in range(len(rec.landmarks)) for a in "xy"),
                          "spacing_x", "spacing_y", "split"]
            coords = [f"{v:.3f}" for v in np.asarray(rec.landmarks, dtype=float).reshape(-1)]
            rows.append([str(Path(rec.image_path).resolve()), *coords, *map(str, rec.spacing), split])
    text = "\n".join(",".join(r) for r in [header, *rows]) + "\n"
    path = out / "isbi2015_holdout.csv"
    if not path.is_file() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
    return path


def check_same_options(out: Path, common: Sequence[str]) -> None:
    """A study folder keeps one set of training options: its finished runs are reused, so a
    different ``--epochs``/``--profile``/... must go to another ``--out``."""
    path = out / "study.json"
    if path.is_file():
        saved = json.loads(path.read_text()).get("train_args_common")
        if saved != list(common):
            raise ValueError(f"--out {out} holds runs trained with {shlex.join(saved or [])!r}, not "
                             f"{shlex.join(common)!r}; its finished runs would be mixed in: use another --out")
    else:
        write_json(path, {"train_args_common": list(common)})


def run_all(runs: list, common: Sequence[str], jobs: int, threads: int) -> list:
    """Train every unfinished run, ``jobs`` at a time; returns the results of those launched."""
    todo = [r for r in runs if not r.finished]
    skipped = len(runs) - len(todo)
    print(f"{len(runs)} runs: {skipped} finished (skipped), {sum(r.started for r in todo)} to resume, "
          f"{sum(not r.started for r in todo)} to start; {jobs} at a time with {threads} thread(s) each", flush=True)
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(lambda r: _execute(r, common, threads), todo):
            run = result["run"]
            status = "done" if result["returncode"] == 0 and run.finished else f"FAILED (exit {result['returncode']})"
            print(f"  {run.name} seed {run.seed}: {result['kind']} {status} in {result['wall_s'] / 60:.1f} min; "
                  f"log {run.folder / 'train.log'}", flush=True)
            results.append(result)
    return results
