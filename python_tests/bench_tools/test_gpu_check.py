"""bench/gpu_check.py on a machine without CUDA, and its report plumbing (CPU only)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from support.paths import REPO_ROOT

ROOT = str(REPO_ROOT)
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exits_2_without_cuda(tmp_path):
    results_md = os.path.join(ROOT, "bench", "RESULTS.md")
    before = open(results_md).read()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, SCRIPT, "--json", str(tmp_path / "out.json")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no CUDA device" in out.stdout and "nothing ran" in out.stdout
    assert not (tmp_path / "out.json").exists()
    assert open(results_md).read() == before


def test_stage_runner_streams_output_and_stops_at_the_time_box(gpu_check, capsys):
    done = gpu_check.run_stage("quick", [sys.executable, "-c", "print('| a | b |\\n|---|---|\\n| 1 | 2 |')"], 60)
    assert done["status"] == "ok" and "| 1 | 2 |" in done["output"]
    failed = gpu_check.run_stage("failing", [sys.executable, "-c", "raise SystemExit(3)"], 60)
    assert failed["status"] == "failed (exit 3)"
    slow = gpu_check.run_stage("slow", [sys.executable, "-c", "import time; print('started', flush=True); "
                                                              "time.sleep(60)"], 2)
    assert slow["status"] == "stopped" and slow["seconds"] < 30 and "started" in slow["output"]
    assert "stopped at slow" in capsys.readouterr().out


def test_a_benchmark_stopped_midway_keeps_its_rows(gpu_check):
    """The benchmarks print the header first and each row as measured (_common.start_table /
    add_row): the rows before a cut-off (or a crash) make a table the report still picks up."""
    code = ("import sys; sys.path.insert(0, 'bench'); import _common; rows = []; "
            "_common.start_table(['impl', 'ms']); _common.add_row(rows, ['coorkern', '1.5']); raise SystemExit(3)")
    stage = gpu_check.run_stage("cut", [sys.executable, "-c", code], 120)
    assert stage["status"] == "failed (exit 3)"
    tables = gpu_check.markdown_tables(stage["output"])
    assert [gpu_check.table_rows(t) for t in tables] == [[{"impl": "coorkern", "ms": "1.5"}]]


def test_stages_import_coorkern_from_the_checkout_without_the_interpreter(gpu_check, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    env = gpu_check.stage_env()
    assert "TRITON_INTERPRET" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [ROOT, "/somewhere/else"]


def test_targets_and_results_section(gpu_check, tmp_path):
    loss_table = ("| shape | dtype | variant | impl | fwd+bwd ms | peak extra MiB | vs eager | vs compile | GB/s |\n"
                  "|---|---|---|---|---|---|---|---|---|\n"
                  "| 2x19x512x416 | fp32 | target | eager | 9.0 | 100 | 1.00x | 0.50x | 300 |\n"
                  "| 2x19x512x416 | fp32 | target | coorkern | 1.0 | 0 | 9.00x | 1.20x | 2900 |\n"
                  "| 2x19x512x416 | fp32 | landmarks | coorkern | 1.0 | 0 | 6.00x | 2.00x | 2500 |")
    assert gpu_check.markdown_tables("noise\n" + loss_table + "\nmore noise\n") == [loss_table]
    results = {"copy_gbps": 3000.0, "central_loss_tables": [loss_table]}
    checks = {name: (measured, verdict) for name, measured, verdict in gpu_check.check_targets(results)}
    assert checks["central loss >= 5x eager"] == ("6.00 (worst of 2)", "met")
    assert checks["central loss >= 1.3x torch.compile"][1] == "NOT met"  # 1.20x in the first row
    assert checks["central loss fwd+bwd >= 80% of copy bandwidth"][1] == "met"  # 2500 / 3000
    assert checks["training step >= 1.5x eager reference ops"] == ("not measured", "-")

    results.update(device="Some GPU", date="today", torch="t", triton="tr", cuda="c", budget_s=1200, elapsed_s=3,
                   stages=[{"name": "cuda tests", "status": "ok", "seconds": 1, "summary": "3 passed"}],
                   stopped_at=None, targets=gpu_check.check_targets(results))
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## CPU\n\ntable\n")
    gpu_check.write_results_md(gpu_check.results_markdown(results), str(path))
    first = path.read_text()
    assert first.startswith("# Benchmark results\n\n## CPU\n\ntable\n") and "## GPU: Some GPU" in first
    assert "| central loss >= 5x eager | 6.00 (worst of 2) | met |" in first
    results["device"] = "Other GPU"
    gpu_check.write_results_md(gpu_check.results_markdown(results), str(path))
    second = path.read_text()  # the section is replaced, not appended
    assert "Some GPU" not in second and second.count(gpu_check.MARK_START) == 1 and "## CPU" in second


def test_tables_survive_warnings_between_their_rows(gpu_check):
    """The second H200 run printed warnings (stderr, merged) between a table's header and its
    rows: every target read "not measured" although the rows were there."""
    text = ("| impl | ms |\n|---|---|\n/x/profiler.py:224: UserWarning: Profiler clears events\n  _warn_once(\n"
            "| eager | 2.0 |\nanother warning\n| coorkern | 1.0 |\n\ndevice: X\n| a | b |\n| --- | :-: |\n| 1 | 2 |\n")
    tables = [gpu_check.table_rows(t) for t in gpu_check.markdown_tables(text)]
    assert tables == [[{"impl": "eager", "ms": "2.0"}, {"impl": "coorkern", "ms": "1.0"}], [{"a": "1", "b": "2"}]]


def test_main_on_a_pretend_gpu_runs_every_stage_and_judges_the_targets(gpu_check, tmp_path, monkeypatch):
    """main() past the CUDA check, with the stages' commands replaced by canned output: the
    second H200 run died here (a loop variable shadowed ``stage_env``) after the first had
    been fixed elsewhere; no CPU test reached this code."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_check, "copy_bandwidth_gbps", lambda: 1000.0)
    warning = "/x.py:1: UserWarning: noise\n  warn()\n"
    canned = {
        "cuda tests": "python_tests/test_cuda_x.py::test_a PASSED\n=== 3 passed, 1 skipped in 9.0s ===\n",
        "training-step benchmark": ("| impl | step ms | vs eager reference ops |\n|---|---|---|\n" + warning
                                    + "| eager reference ops | 30 | 1.00x |\n| coorkern | 15 | 2.00x |\n"),
        "central loss benchmark": ("| shape | impl | vs eager | vs compile | GB/s |\n|---|---|---|---|---|\n" + warning
                                   + "| 8x19x512x416 | coorkern | 6.00x | 1.50x | 900 |\n"),
        "attention benchmark, bf16": (
            "| heads x d x N | dtype | impl | fwd TFLOP/s | bwd TFLOP/s | vs grid+sdpa |\n|---|---|---|---|---|---|\n"
            + warning + "| 1x64x16384 | bf16 | coorkern-triton | 260 | 140 | 1.10x |\n"),
        "traces": ("| case | launches |\n|---|---|\n| loss | 3 |\n\n| case | layer |\n|---|---|\n| loss | x |\n"
                   "\n| case | launches |\n|---|---|\n| step | 900 |\n"),
    }
    seen = []

    def fake_stage(name, cmd, seconds, env=None):
        seen.append((name, seconds, env))
        return {"name": name, "command": " ".join(cmd), "status": "ok", "seconds": 1.0,
                "output": canned.get(name, "nothing to report\n")}

    monkeypatch.setattr(gpu_check, "run_stage", fake_stage)
    results_md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(gpu_check, "RESULTS_MD", str(results_md))
    monkeypatch.setattr(gpu_check, "write_results_md",
                        lambda section, path=None: results_md.write_text(section))
    out = tmp_path / "out.json"
    assert gpu_check.main(["--json", str(out)]) == 0
    assert [name for name, _, _ in seen] == list(gpu_check.STAGE_CAPS)
    assert all(seconds <= gpu_check.STAGE_CAPS[name] for name, seconds, _ in seen)
    assert seen[0][2]["COORKERN_TEST_DEVICE"] == "cuda" and all("TRITON_INTERPRET" not in env for _, _, env in seen)
    verdicts = {name: verdict for name, _, verdict in json.loads(out.read_text())["targets"]}
    assert verdicts == {
        "central loss fwd+bwd >= 80% of copy bandwidth": "met",
        "central loss >= 1.3x torch.compile": "met",
        "central loss >= 5x eager": "met",
        "attention bf16 d=64 N=16384 forward >= 250 TFLOP/s": "met",
        "attention bf16 d=64 N=16384 backward >= 150 TFLOP/s": "NOT met",
        "attention bf16 d=64 N=16384 fwd+bwd >= 1.0x grid+sdpa": "met",
        "training step >= 1.5x eager reference ops": "met",
        "graphed detector step >= 4x eager reference ops": "-",  # no graphed rows in the canned table
        "coorkern graphed >= 1.2x reference ops graphed": "-",
        "Triton attention >= 1.0x grid_sample+SDPA in the graphed step": "-",
        "central loss fwd+bwd 8x19x512x416 <= 0.35 ms": "-",
    }
    section = results_md.read_text()
    assert "## GPU: Pretend GPU" in section and "cuda tests: ok in 1 s -- 3 passed, 1 skipped in 9.0s" in section
    assert section.count("### Profiler traces") == 3 and "| step | 900 |" in section  # every trace table kept

    seen.clear()  # a second call for what the first did not reach
    assert gpu_check.main(["--json", str(out), "--stages", "attention benchmark, fp32", "--no-results-md"]) == 0
    assert [name for name, _, _ in seen] == ["attention benchmark, fp32"]


@pytest.mark.parametrize("options", [[], ["--stub-launches"]])
def test_host_overhead_dry_run_on_cpu(options):
    """bench/host_overhead.py (the host-profile stage's first table) on CPU tensors under the
    interpreter, with and without its launches stubbed: every row runs and gets a number --
    without the stubs the numbers themselves mean nothing here."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "host_overhead.py"), "--device", "cpu",
                          "--iters", "1", *options], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    spec = importlib.util.spec_from_file_location("gpu_check_for_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (table,) = module.markdown_tables(out.stdout)
    rows = module.table_rows(table)
    assert len(rows) == 14 and any("_direct_backward" in r["layer"] for r in rows)
    assert all(module.number(r["host us per call"]) > 0 for r in rows), rows


def test_host_overhead_reports_the_reason_of_a_failure():
    """A failed row names the reason, which a Triton CompilationError gives on its last line
    (the first H100 run printed only the kernel's source line)."""
    spec = importlib.util.spec_from_file_location("host_overhead", os.path.join(ROOT, "bench", "host_overhead.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exc = RuntimeError("at 2:34:\ndef empty_kernel(p0, p1, p2):\n                                  ^\n"
                       "unsupported | pointer type\n")
    assert module._reason(exc) == "RuntimeError: unsupported / pointer type"
    assert module._reason(ValueError("")) == "ValueError: "


def test_host_overhead_empty_kernel_compiles_for_sm90(monkeypatch):
    """The empty-kernel rows' kernel compiles for a GPU (sm_90, no GPU needed): defined inside a
    function it did not (the first H100 run: CompilationError at its ``tl.constexpr``)."""
    from coorkern.ops._aot.compiler import compile_for_gpu

    bench = os.path.join(ROOT, "bench")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([bench, ROOT, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(bench)
    import host_overhead

    signature = {**{f"p{i}": "*fp32" for i in range(5)}, **{f"a{i}": "i32" for i in range(19)}}
    report = compile_for_gpu(host_overhead.empty_kernel, signature, {"BLOCK": 16}, arch=90)
    assert report.local_bytes == 0 and 0 < report.registers <= 32


def test_step_anatomy_counts_the_ops_of_a_training_step(gpu_check, capsys):
    """bench/step_anatomy.py: every part of a step dispatches ops, coorkern's ops replace the
    reference's many ops by few, and the FLOPs are counted (meta tensors, a tiny size)."""
    spec = importlib.util.spec_from_file_location("step_anatomy", os.path.join(ROOT, "bench", "step_anatomy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--size", "32", "32", "--base", "4"]) == 0
    out = capsys.readouterr().out
    (table,) = gpu_check.markdown_tables(out)
    rows = {r["ops"]: r for r in gpu_check.table_rows(table)}
    ref, ours = rows["eager reference ops"], rows["coorkern (auto)"]
    for row in (ref, ours):
        parts = [int(row[k]) for k in ("forward", "backward", "optimizer")]
        assert min(parts) > 0 and sum(parts) == int(row["step"])
        assert 0 < int(row["forward, inside coorkern's ops"]) < int(row["forward"])
    assert int(ours["forward, inside coorkern's ops"]) < int(ref["forward, inside coorkern's ops"])
    assert int(ours["step"]) < int(ref["step"]) and ref["optimizer"] == ours["optimizer"]
    assert int(ref["+ optimizer CPU scalar reads"]) > 0
    flops = out.split("FLOPs of one forward + backward at 32x32, base 4: ")[1].split(" GFLOP")[0]
    assert float(flops) > 0, out


def test_host_profile_stage_dry_run_on_cpu():
    """gpu_check's host-profile stage on a CPU (no interpreter: the Triton rows say "needs
    CUDA"): both host_overhead tables, real and stubbed launches, then every op's profile."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, SCRIPT, "--stage", "host-profile", "--device", "cpu", "--reps", "1"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    headers = [line for line in out.stdout.splitlines() if line.startswith("device:")]
    assert len(headers) == 2 and "stubbed" not in headers[0] and "launches stubbed" in headers[1], headers
    profiled = [line for line in out.stdout.splitlines() if line.startswith("--- ")]
    assert len(profiled) == 3 and all(" ms per fwd+bwd" in line for line in profiled), profiled


def test_launch_overhead_runs_without_a_gpu(gpu_check):
    """bench/launch_overhead.py: Triton's launch path timed with a stand-in sm_90 driver (no
    GPU, no interpreter) -- every row gets a number; under the interpreter it refuses."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    script = os.path.join(ROOT, "bench", "launch_overhead.py")
    out = subprocess.run([sys.executable, script, "--iters", "5"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (table,) = gpu_check.markdown_tables(out.stdout)
    rows = gpu_check.table_rows(table)
    assert len(rows) == 4 and all(gpu_check.number(r["host us per call"]) > 0 for r in rows), rows
    refused = subprocess.run([sys.executable, script], env=dict(env, TRITON_INTERPRET="1"), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "unset TRITON_INTERPRET" in refused.stderr


def test_targets_of_the_graphed_step_and_the_loss_time(gpu_check):
    steps = ("| impl | step ms | vs eager reference ops |\n|---|---|---|\n"
             "| eager reference ops | 40.0 | 1.00x |\n| eager reference ops, graphed | 12.0 | 3.33x |\n"
             "| coorkern | 20.0 | 2.00x |\n| coorkern, graphed | 8.0 | 5.00x |\n"
             "| coorkern, all Triton | 22.0 | 1.82x |\n| coorkern, all Triton, graphed | 9.0 | 4.44x |\n")
    loss = ("| shape | dtype | variant | impl | fwd+bwd ms |\n|---|---|---|---|---|\n"
            "| 8x19x512x416 | fp32 | landmarks | coorkern | 0.30 |\n| 8x19x512x416 | bf16 | landmarks | coorkern | 0.20 |\n"
            "| 8x19x512x416 | fp32 | target | coorkern | 0.90 |\n| 2x19x512x416 | fp32 | landmarks | coorkern | 0.10 |\n")
    checks = {name: (measured, verdict) for name, measured, verdict in
              gpu_check.check_targets({"train_step_tables": [steps], "central_loss_tables": [loss]})}
    assert checks["graphed detector step >= 4x eager reference ops"] == ("5.00 (worst of 1)", "met")
    assert checks["coorkern graphed >= 1.2x reference ops graphed"] == ("1.50 (worst of 1)", "met")
    assert checks["Triton attention >= 1.0x grid_sample+SDPA in the graphed step"] == ("0.89 (worst of 1)", "NOT met")
    # the training loss (landmarks) at the target's shape, worst dtype; lower is better
    assert checks["central loss fwd+bwd 8x19x512x416 <= 0.35 ms"] == ("0.30 (worst of 2)", "met")


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def test_profile_trace_reduces_a_cuda_step(tmp_path):
    """bench/profile_trace.py on a hand-made chrome trace with CUDA activity: exclusive host time per
    layer, the launches inside the step window and their kernels by correlation, the launch -> kernel
    gap, and the synchronizing / allocating calls inside the step (not those outside)."""
    import gzip

    spec = importlib.util.spec_from_file_location("profile_trace", os.path.join(ROOT, "bench", "profile_trace.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    events = [
        _x("user_annotation", "step", 100, 1000),
        _x("python_function", "coorkern/ops/central_loss/op.py(300): central_loss_from_landmarks", 100, 400),
        _x("python_function", "coorkern/ops/central_loss/launch.py(90): _triton_pass", 150, 300),
        _x("python_function", "triton/runtime/jit.py(600): run", 200, 200),
        _x("cuda_driver", "cuLaunchKernel", 300, 50, correlation=7),
        _x("cpu_op", "aten::empty", 160, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 600, 20, correlation=8),
        _x("cuda_runtime", "cudaStreamSynchronize", 700, 100),
        _x("cuda_runtime", "cudaMalloc", 850, 30),
        _x("cuda_runtime", "cudaMalloc", 2000, 30),  # after the step: not counted
        _x("kernel", "_central_loss_kernel", 380, 40, tid=7, correlation=7),
        _x("kernel", "_finish_sum_kernel", 640, 10, tid=7, correlation=8),
        _x("kernel", "unrelated", 5000, 10, tid=7, correlation=99),
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "x"}},
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = module.reduce_trace(module.load_events(str(path)))
    assert summary["step_us"] == 1000 and summary["launches"] == 2 and summary["kernels"] == 2
    assert summary["kernel_us"] == 50 and summary["gpu_span_us"] == 270
    assert summary["gap_median_us"] == 60 and summary["gap_max_us"] == 80  # 380 - 300, 640 - 600
    assert summary["syncs"] == {"cudaStreamSynchronize": (1, 100.0), "cudaMalloc": (1, 30.0)}
    layers = summary["layers"]
    assert layers["coorkern op entry (checks, routing, autograd.Function)"] == 100  # 400 - the launch's 300
    assert layers["coorkern launch (buffers, configs, autotuner)"] == 300 - 200 - 10  # minus Triton and aten::empty
    assert layers["Triton launcher"] == 150 and layers["ATen / torch ops (C++)"] == 10
    assert layers["CUDA runtime + driver calls"] == 50 + 20 + 100 + 30
    assert summary["host_us"] == 400 + 150  # everything but the gaps between host events
    text = module.markdown("loss", summary, 0.9)
    tables = text.split("\n\n")
    assert len(tables) == 2 and "cudaMalloc x1 (30 us), cudaStreamSynchronize x1 (100 us)" in tables[0]
    assert "| loss | 0.900 | 1.000 | 0.550 | 2 | 2 | 0.050 | 19% | 60 / 80 |" in tables[0]


def test_trace_stage_dry_run_on_cpu(gpu_check, tmp_path):
    """The trace stage on a CPU (no CUDA activity, the C++ kernels): every case in its own process,
    timed and traced, its gzipped chrome trace and its tables under --trace-dir, the tables on
    stdout for the report."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, SCRIPT, "--stage", "trace", "--device", "cpu", "--size", "64", "64",
                          "--base", "4", "--reps", "1", "--trace-dir", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    tables = [gpu_check.table_rows(t) for t in gpu_check.markdown_tables(out.stdout)]
    cases = ["central-loss", "attention", "detector-step"]  # the graphed step needs CUDA
    assert len(tables) == 2 * len(cases)
    for case, summary, layers in zip(cases, tables[0::2], tables[1::2]):
        (row,) = summary
        assert gpu_check.number(row["wall ms"]) > 0 and gpu_check.number(row["host ms"]) > 0, row
        assert row["launches"] == "0" and row["syncs, copies, allocs in the step"] == "none"  # CPU: no CUDA calls
        assert layers and all(r["case"] == row["case"] for r in layers)
        assert sum(gpu_check.number(r["host ms (exclusive)"]) for r in layers) == pytest.approx(
            gpu_check.number(row["host ms"]), abs=0.01 * len(layers))
        assert (tmp_path / f"trace_{case}.json.gz").stat().st_size > 0 and (tmp_path / f"trace_{case}.md").is_file()
    layers = {r["layer"] for r in tables[5]}
    assert {"coorkern model (Python)", "coorkern engine (the training step)", "torch.optim"} <= layers


def test_traces_go_under_out_where_the_device_tool_runs(gpu_check, monkeypatch):
    monkeypatch.setenv("OUT", "/device/out")
    assert gpu_check.default_trace_dir() == "/device/out/traces"
    commands = {name: cmd for name, cmd, _ in gpu_check.stage_commands("py", "5", {}, "/device/out/traces")}
    assert commands["traces"][-2:] == ["--trace-dir", "/device/out/traces"]
    monkeypatch.delenv("OUT")
    assert gpu_check.default_trace_dir().endswith("coorkern-gpu-check-traces")
