"""The training step on a GPU: sync-free, graphed (``--cuda-graphs``), and the ops' capture guards.

Run with ``COORKERN_TEST_DEVICE=cuda python -m pytest python_tests/cuda/test_cuda_graphs.py`` (or
``python bench/gpu_check.py``).  Without a CUDA device every test reports "skipped: no CUDA
device" (the ``cuda_device`` fixture).  The CPU side of the same code --
python_tests/engine/test_sync_free_step.py -- counts host reads with a dispatch mode; here
``torch.cuda.set_sync_debug_mode("error")`` makes any synchronizing CUDA call in a step raise.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import coorkern
from coorkern import train as train_cmd
from coorkern.engine import cuda_graphs, trainer
from coorkern.engine import step as engine_step
from coorkern.ops._runtime import host as _host
from coorkern.ops.central_loss import launch as cl_launch

KINDS = ("coor", "vanilla", "swin", "deformable", "none")


def tiny_run(tmp_path, name, *extra):
    argv = ["--data", "synthetic", "--train-samples", "8", "--val-samples", "2", "--test-samples", "2",
            "--image-size", "64", "64", "--base-channels", "8", "--batch-size", "2", "--epochs", "2",
            "--device", "cuda", "--no-progress", "--out", str(tmp_path / name), *extra]
    run = trainer.setup_run(train_cmd.parse_args(argv))
    batches = list(run.loader)
    run.loader = batches
    return run, batches


@contextlib.contextmanager
def sync_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_an_eager_detector_step_never_synchronizes(cuda_device, tmp_path, kind, amp):
    run, batches = tiny_run(tmp_path, kind, "--transformer", kind, "--cuda-graphs", "off",
                            *(["--amp", amp] if amp else []))
    step = trainer.training_step(run)
    log = engine_step.LossLog(run.device)
    for batch in batches:  # the first steps compile and autotune (timing synchronizes)
        step(batch, log)
    log.read()
    with sync_errors():
        for batch in batches:
            step(batch, log)
    assert log.pending == len(batches) and all(v == v for v, _ in log.read())


def test_a_graphed_step_never_synchronizes(cuda_device, tmp_path):
    run, batches = tiny_run(tmp_path, "graphed", "--cuda-graphs", "on", "--amp", "bf16")
    step = trainer.training_step(run)
    assert isinstance(step, cuda_graphs.GraphedStep) and step.setting.startswith("on (on)")
    log = engine_step.LossLog(run.device)
    step(batches[0], log)  # warm-up and capture
    with sync_errors():
        for batch in batches:
            step(batch, log)
    assert step.graph is not None and step.eager_batches == 0


def _train(run, batches, steps):
    log = engine_step.LossLog(run.device)
    step = trainer.training_step(run)
    for i in range(steps):
        step(batches[i % len(batches)], log)
    return [p.detach().clone() for p in run.model.parameters()], [b.detach().clone() for b in run.model.buffers()], \
        log.read()


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_graphed_run_trains_as_the_eager_one(cuda_device, tmp_path, deterministic):
    """N graphed steps against the same steps without the graph (same capturable Adam, device rates):
    bitwise under --deterministic, else to float rounding; against the plain eager step (its own
    Adam arithmetic) to float tolerance.  The warm-up before the capture leaves no trace."""
    extra = ["--amp", "bf16", *(["--deterministic"] if deterministic else [])]
    steps = 6
    graphed, batches = tiny_run(tmp_path, "graphed", "--cuda-graphs", "on", *extra)
    results = {"graphed": _train(graphed, batches, steps)}
    twin, batches = tiny_run(tmp_path, "twin", "--cuda-graphs", "on", *extra)
    twin.train_step = cuda_graphs.GraphedStep(twin, "on (test twin)", capture=False)
    results["twin"] = _train(twin, batches, steps)
    eager, batches = tiny_run(tmp_path, "eager", "--cuda-graphs", "off", *extra)
    results["eager"] = _train(eager, batches, steps)
    (gp, gb, gl), (tp, tb, tl), (ep, _, el) = results["graphed"], results["twin"], results["eager"]
    tol = dict(rtol=0, atol=0) if deterministic else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(gp + gb, tp + tb):
        torch.testing.assert_close(a, b, **tol)
    assert [lr for _, lr in gl] == [lr for _, lr in tl] == [lr for _, lr in el]
    assert [v for v, _ in gl] == pytest.approx([v for v, _ in el], rel=2e-2)
    for a, b in zip(gp, ep):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
    assert int(graphed.optimizer.state[next(graphed.model.parameters())]["step"]) == steps  # not steps + warm-up


def test_graphed_runs_checkpoint_and_resume_either_way(cuda_device, tmp_path):
    common = ["--data", "synthetic", "--train-samples", "8", "--val-samples", "4", "--test-samples", "4",
              "--image-size", "64", "64", "--base-channels", "8", "--batch-size", "2", "--epochs", "3",
              "--device", "cuda", "--no-progress", "--overlays", "0"]
    first = train_cmd.main(common + ["--out", str(tmp_path / "run"), "--cuda-graphs", "on", "--stop-after", "1"])
    assert first["config"]["environment"]["cuda_graphs"].startswith("on (on)")
    checkpoint = str(tmp_path / "run" / "checkpoint_last.pt")
    eager = train_cmd.main(["--resume", checkpoint, "--cuda-graphs", "off", "--stop-after", "1",
                            "--out", str(tmp_path / "eager")])
    graphed = train_cmd.main(["--resume", checkpoint, "--cuda-graphs", "on", "--stop-after", "1",
                              "--out", str(tmp_path / "graphed")])
    assert eager["config"]["environment"]["cuda_graphs"].startswith("off")
    assert [row["epoch"] for row in eager["history"]] == [row["epoch"] for row in graphed["history"]] == [1, 2]
    assert eager["history"][-1]["train_loss"] == pytest.approx(graphed["history"][-1]["train_loss"], rel=5e-2)


def test_fp16_is_refused_and_compile_is_captured_on_request(cuda_device, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny_run(tmp_path, "fp16", "--cuda-graphs", "on", "--amp", "fp16")
    assert "--cuda-graphs on: --amp fp16" in capsys.readouterr().err
    run, _ = tiny_run(tmp_path, "auto-fp16", "--amp", "fp16")
    assert run.train_step.setting.startswith("off (auto: --amp fp16")
    run, _ = tiny_run(tmp_path, "auto-compile", "--compile")
    assert run.train_step.setting.startswith("off (auto: --compile")
    run, batches = tiny_run(tmp_path, "on-compile", "--compile", "--cuda-graphs", "on", "--amp", "bf16")
    params, _, losses = _train(run, batches, 3)
    assert run.train_step.graph is not None and all(v == v for v, _ in losses)


def test_the_ops_can_be_captured_before_any_autotuning(cuda_device, monkeypatch):
    """A key first seen inside a capture launches its hand-picked config (timing would synchronize);
    the replay equals an eager call.  Both autotuners: fresh ones, whose first real call would time."""
    from coorkern.ops.coor_attention import launch as ca_launch

    monkeypatch.setattr(cl_launch, "_tuned_keys", set())
    monkeypatch.setattr(cl_launch, "_tuned_kernel", None)
    monkeypatch.setattr(ca_launch, "_cache", {})
    logits = torch.randn(3, 5, 37, 41, device=cuda_device, requires_grad=True)
    landmarks = torch.rand(3, 5, 2, device=cuda_device) * 36
    q, k = (torch.randn(2, 2, 6, 7, 16, device=cuda_device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    v = torch.randn(2, 2, 42, 16, device=cuda_device, dtype=torch.bfloat16, requires_grad=True)
    coords = (torch.rand(2, 42, 2, device=cuda_device) * 2 - 1).requires_grad_(True)

    def calls():
        loss = coorkern.central_loss_from_landmarks(logits, landmarks, sigma=2.0)
        (loss_grad,) = torch.autograd.grad(loss, logits)
        out = coorkern.coor_attention(q, k, v, coords)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v, coords))
        return loss, loss_grad, out, grads

    # Compile the hand-picked configs first (compiling is not what this is about): as if capturing.
    with monkeypatch.context() as m, coorkern.backend("triton"):
        m.setattr(cl_launch, "capturing", lambda device: True)
        m.setattr(ca_launch, "capturing", lambda device: True)
        calls()
    torch.cuda.synchronize()
    assert cl_launch._tuned_keys == set() and ca_launch._cache == {}
    graph = torch.cuda.CUDAGraph()
    with coorkern.backend("triton"), torch.cuda.graph(graph):
        loss, loss_grad, out, grads = calls()
    graph.replay()
    with coorkern.backend("triton"):
        expected, expected_grad, expected_out, _ = calls()  # eager: tunes now
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss_grad, expected_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out, expected_out, rtol=2e-2, atol=2e-2)
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)
    assert cl_launch._tuned_keys  # timed at the first call outside the capture


def test_scratch_buffers_are_reused_eagerly_and_not_in_a_capture(cuda_device):
    """The ops' temporaries: the same buffer for the same shape on one stream, a fresh one on
    another stream, none kept from a capture (the graph's pool holds those)."""
    with _host.direct_launches():
        first = _host.scratch("test", (4, 8), torch.float32, cuda_device)
        assert _host.scratch("test", (4, 8), torch.float32, cuda_device) is first
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            assert _host.scratch("test", (4, 8), torch.float32, cuda_device).data_ptr() != first.data_ptr()
        graph = torch.cuda.CUDAGraph()
        kept = dict(_host._scratch.buffers)
        with torch.cuda.graph(graph):
            inside = _host.scratch("test", (4, 8), torch.float32, cuda_device)
        assert inside is not first and _host._scratch.buffers == kept
    _host.release_scratch()
