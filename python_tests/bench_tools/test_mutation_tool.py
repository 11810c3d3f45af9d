"""bench/mutation.py's plumbing without running mutmut: the tool check and the score table."""

from __future__ import annotations

import importlib.util
import os

import pytest
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)


@pytest.fixture
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_tool", os.path.join(ROOT, "bench", "mutation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _versions(monkeypatch, **found):
    from importlib import metadata

    def version(name):
        if name not in found:
            raise metadata.PackageNotFoundError(name)
        return found[name]

    monkeypatch.setattr(metadata, "version", version)


@pytest.mark.parametrize("found,ok", [({"mutmut": "3.8.0", "pytest": "8.4.2"}, True),
                                      ({"mutmut": "3.8.0", "pytest": "9.2.0"}, False),
                                      ({"mutmut": "2.5.1", "pytest": "8.4.2"}, False),
                                      ({"pytest": "8.4.2"}, False)])
def test_check_tools_names_what_is_missing(mutation, monkeypatch, found, ok):
    _versions(monkeypatch, **found)
    if ok:
        mutation.check_tools()
        return
    with pytest.raises(SystemExit, match=r"needs mutmut.*\[mutation\]") as error:
        mutation.check_tools()
    if "mutmut" in found:
        assert f"pytest {found['pytest']}" in str(error.value) and f"mutmut {found['mutmut']}" in str(error.value)


def test_the_configured_modules_name_existing_files(mutation):
    for name, spec in mutation.modules().items():
        assert any(os.path.isfile(os.path.join(ROOT, p)) for p in spec["paths"]), name
        assert spec["tests"] and all(os.path.isfile(os.path.join(ROOT, t)) for t in spec["tests"]), name


def test_report_replaces_the_rows_of_the_modules_run_and_keeps_the_rest(mutation, tmp_path, monkeypatch):
    report = tmp_path / "MUTATION.md"
    monkeypatch.setattr(mutation, "REPORT", report)

    def row(module, killed, survived, tested=None):
        return {"module": module, "path": f"coorkern/{module}.py", "tests": [f"python_tests/test_{module}.py"],
                "counts": {"killed": killed, "survived": survived}, "tested": killed + survived if tested is None
                else tested, "score": 100.0 * killed / max(killed + survived, 1), "minutes": 1.25}

    mutation.write_report([row("metrics", 9, 1), row("losses", 3, 1)])
    report.write_text(report.read_text() + "\n## Judged survivors\nkept text\n")
    mutation.write_report([row("losses", 4, 0), row("train", 0, 0)])  # train tested nothing: no row
    text = report.read_text()
    assert "| metrics | `coorkern/metrics.py` | test_metrics.py | 10 | 9 (+0) | 1 | 0 | 90.0% | 1.2 |" in text
    assert "| losses | `coorkern/losses.py` | test_losses.py | 4 | 4 (+0) | 0 | 0 | 100.0% | 1.2 |" in text
    assert "train" not in text and text.count("| losses |") == 1 and text.endswith("kept text\n")
