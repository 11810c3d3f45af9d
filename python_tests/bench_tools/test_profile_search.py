"""bench/profile_search.py (the cpu profile's accuracy search): its table and p-values from
finished candidates, and the refusal without the profile's own run (no training here)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from scipy import stats
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("profile_search", os.path.join(ROOT, "bench", "profile_search.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(per_image: dict, seeds=(0,)) -> dict:
    errors = np.array(list(per_image.values()))
    stat = {"mean": float(errors.mean()), "std": None, "n": len(seeds)}
    return {"seeds": list(seeds), "per_image_mre": per_image, "thresholds": [2.0, 4.0], "mre": stat,
            "sdr": {"2.0": {"mean": 80.0, "std": None}, "4.0": {"mean": 95.5, "std": None}},
            "wall_s": {"mean": 600.0, "std": None}}


def test_table_compares_every_candidate_with_the_profile(search):
    rng = np.random.default_rng(0)
    ids = [f"{i:03d}" for i in range(101, 151)]
    profile = dict(zip(ids, rng.uniform(1, 3, len(ids))))
    better = {i: e - 0.4 + rng.normal(0, 0.05) for i, e in profile.items()}
    rows = [{"candidate": list(search.CANDIDATES[0]), "result": _result(profile), "coor_cpu_min": 21.3},
            {"candidate": [320, 256, 8, 45], "result": _result(better)}]
    text = search.table(rows, "none")
    lines = text.strip().splitlines()
    assert lines[0].startswith("| candidate") and len(lines) == 4
    assert "(profile)" in lines[2] and "| 21.3 |" in lines[2] and "—" in lines[2]
    expected = stats.ttest_rel([better[i] for i in ids], [profile[i] for i in ids]).pvalue
    assert rows[1]["p_value"] == pytest.approx(expected) and rows[0]["p_value"] is None
    assert lines[3].startswith("| 320x256, 8, 45 |") and "n/a" in lines[3] and "(**)" in lines[3]
    assert f"{np.mean(list(better.values())):.2f}" in lines[3] and "| 10.0 |" in lines[3]


def test_folder_names_are_unique_and_the_profile_comes_first(search):
    from coorkern.engine import profiles

    cpu = profiles.PROFILES["cpu"]
    assert search.CANDIDATES[0] == (*cpu.image_size["isbi2015"], cpu.base_channels, cpu.epochs["isbi2015"])
    names = [search.folder_name(*c) for c in search.CANDIDATES]
    assert len(set(names)) == len(names) and names[0] == "256x208_b8_60ep"


def test_main_tabulates_finished_candidates_and_refuses_without_the_profile(search, tmp_path, monkeypatch):
    calls, finished = [], {}

    def fake_run(candidate, args):
        calls.append((tuple(candidate), args.report_only))
        return finished.get(tuple(candidate), {"seeds": []})

    monkeypatch.setattr(search, "run_candidate", fake_run)
    with pytest.raises(SystemExit, match="first candidate"):
        search.main(["--root", str(tmp_path), "--out", str(tmp_path), "--report-only"])
    assert calls == [(tuple(c), True) for c in search.CANDIDATES]
    assert not (tmp_path / "search.md").exists()
    ids = [f"{i:03d}" for i in range(101, 111)]
    finished[search.CANDIDATES[0]] = _result(dict(zip(ids, np.linspace(1, 2, 10))))
    finished[search.CANDIDATES[2]] = _result(dict(zip(ids, np.random.default_rng(1).uniform(1, 3, 10))))
    search.main(["--root", str(tmp_path), "--out", str(tmp_path), "--report-only"])
    rows = json.loads((tmp_path / "search.json").read_text())
    assert [r["folder"] for r in rows] == [search.folder_name(*search.CANDIDATES[i]) for i in (0, 2)]
    text = (tmp_path / "search.md").read_text()
    assert text.count("\n| ") == 3 and "(profile)" in text  # header row, the two candidates
