"""A training step never waits for the device (``coorkern.engine.step``), and what decides on graphs.

A TorchDispatchMode counts, over the real engine's steps (``trainer.training_step`` /
``trainer.train_one_epoch`` of a run that ``setup_run`` built: tiny detector, synthetic data),
everything that would make the host wait for a GPU or copy host values to it: scalar reads
(``aten::_local_scalar_dense``: ``.item()``, ``float()``, ``bool()`` of a tensor), tensors made from
host data (``aten::lift_fresh``: ``torch.tensor``, ``new_tensor``), ops whose output size
depends on values (``nonzero``, boolean indexing, ...), and -- spied on, since a CPU tensor's
``.cpu()``/``.tolist()``/``.numpy()`` dispatch nothing -- those three calls.  On the CPU every
tensor is a host tensor, so the counts stand for what the same code does on a GPU; Adam's own
step counters are excluded (CPU scalars by design on CUDA too).  The CUDA counterpart
(``torch.cuda.set_sync_debug_mode("error")``) is python_tests/cuda/test_cuda_graphs.py.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from coorkern import train as train_cmd
from coorkern.engine import cuda_graphs, trainer
from coorkern.engine import step as engine_step

KINDS = ("coor", "vanilla", "swin", "deformable", "none")
SYNC_OPS = {"aten::nonzero", "aten::masked_select", "aten::unique_dim", "aten::_unique", "aten::_unique2",
            "aten::unique_consecutive", "aten::argwhere"}


class HostReads(TorchDispatchMode):
    """Counts (by name) what would wait for the device or copy host data to it."""

    def __init__(self, optimizer=None):
        super().__init__()
        self.optimizer = optimizer
        self.seen: dict = {}

    def _count(self, name):
        self.seen[name] = self.seen.get(name, 0) + 1

    def _optimizer_step_count(self, tensor) -> bool:
        states = self.optimizer.state.values() if self.optimizer is not None else ()
        return any(state.get("step") is tensor for state in states)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name == "aten::_local_scalar_dense" and not self._optimizer_step_count(args[0]):
            self._count(name)
        elif name in ("aten::lift_fresh", "aten::lift_fresh_copy") or name in SYNC_OPS:
            self._count(name)
        elif name == "aten::index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self._count("aten::index (boolean mask)")
        elif name == "aten::repeat_interleave" and isinstance(args[0], torch.Tensor) and \
                kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None):
            self._count("aten::repeat_interleave (no output_size)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting(optimizer=None):
    """HostReads plus spies on ``Tensor.cpu``/``tolist``/``numpy`` (invisible to dispatch on a CPU tensor)."""
    mode = HostReads(optimizer)
    originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist", "numpy")}

    def spy(name):
        def call(self, *args, **kwargs):
            mode._count(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)
        return call

    for name in originals:
        setattr(torch.Tensor, name, spy(name))
    try:
        with mode:
            yield mode.seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def tiny_run(tmp_path, kind="coor", *extra):
    argv = ["--data", "synthetic", "--train-samples", "8", "--val-samples", "2", "--test-samples", "2",
            "--image-size", "32", "32", "--base-channels", "8", "--batch-size", "2", "--epochs", "2",
            "--threads", "1", "--no-progress", "--transformer", kind, "--out", str(tmp_path / kind), *extra]
    run = trainer.setup_run(train_cmd.parse_args(argv))
    batches = list(run.loader)  # made before counting: the counted epochs hold no data loading
    run.loader = batches
    return run, batches


@pytest.mark.parametrize("kind", KINDS)
def test_a_training_step_never_waits_for_the_device(tmp_path, kind):
    """The real step (loss accumulation included) of every transformer kind: zero host reads and
    zero host-to-device tensors per step; an epoch's only reads are its end's, however many steps."""
    run, batches = tiny_run(tmp_path, kind)
    step = trainer.training_step(run)
    assert isinstance(step, engine_step.EagerStep) and step.setting.startswith("off (auto: the device is cpu")
    trainer.train_one_epoch(run, 0)  # first steps: the optimizer's state and the models' cached grids
    log = engine_step.LossLog(run.device)
    before = [p.detach().clone() for p in run.model.parameters()]
    with counting(run.optimizer) as seen:
        for batch in batches:
            step(batch, log)
    assert seen == {}, f"{kind}: {seen}"
    assert log.pending == len(batches) and any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    epochs = {}
    for steps in (2, 4):
        run.loader = (batches * 2)[:steps]
        with counting(run.optimizer) as seen:
            row = trainer.train_one_epoch(run, 1)
        epochs[steps] = dict(seen)
        assert row["train_loss"] == row["train_loss"] and row["train_loss"] > 0  # a number, read at the end
    assert epochs[2] == epochs[4], epochs  # nothing per step
    assert sum(epochs[2].values()) <= 2, epochs  # the end of the epoch: the log's one copy and its total


def test_a_host_read_in_the_step_is_seen(tmp_path, monkeypatch):
    """The counter fails the test above when a step reads a loss on the host (``.item()``,
    ``float()``) or builds a tensor from host values."""
    run, batches = tiny_run(tmp_path)
    step = trainer.training_step(run)
    trainer.train_one_epoch(run, 0)
    log = engine_step.LossLog(run.device)
    real_loss = run.loss

    monkeypatch.setattr(run, "loss", lambda logits, landmarks: (lambda loss: (loss.item(), loss)[1])(
        real_loss(logits, landmarks)))
    with counting(run.optimizer) as seen:
        step(batches[0], log)
    assert seen == {"aten::_local_scalar_dense": 1}
    monkeypatch.setattr(run, "loss", lambda logits, landmarks: real_loss(logits, landmarks) * torch.tensor(1.0))
    with counting(run.optimizer) as seen:
        step(batches[0], log)
    assert seen == {"aten::lift_fresh": 1}


@pytest.mark.parametrize("extra", [
    ["--amp", "bf16"], ["--loss", "bce"], ["--loss", "focal"], ["--coord-groups", "2"], ["--position", "linear"],
    ["--transformer", "vanilla", "--vanilla-position", "sincos"],
    ["--loss", "wbce"], ["--position", "fourier"],
])
def test_options_keep_the_step_sync_free(tmp_path, extra):
    run, batches = tiny_run(tmp_path, "coor", *extra)
    step = trainer.training_step(run)
    trainer.train_one_epoch(run, 0)
    log = engine_step.LossLog(run.device)
    with counting(run.optimizer) as seen:
        for batch in batches:
            step(batch, log)
    assert seen == {}, seen


# ---------------------------------------------------------------------------
# The loss log


def test_loss_log_reads_once_per_interval_and_keeps_a_float64_total(monkeypatch):
    copies = []
    log = engine_step.LossLog(torch.device("cpu"), read_every=3)
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: copies.append(self.numel()) or real_tolist(self))
    values = [2.0 ** 24, 1.0, 1.0, 0.5, 0.25]  # float32 would lose the ones next to 2**24
    read = []
    for i, value in enumerate(values):
        log.add(torch.tensor(value, dtype=torch.float32), lr=0.1 * i)
        if log.due:
            read += log.read()
    assert copies == [3] and log.pending == 2 and log.steps == 5
    read += log.read()
    assert read == [(v, pytest.approx(0.1 * i)) for i, v in enumerate(values)] and copies == [3, 2]
    assert log.epoch_total().dtype == torch.float64 and float(log.total) == sum(values)
    assert log.read() == [] and copies == [3, 2]  # nothing pending: no copy


def test_tensorboard_gets_every_steps_loss_at_the_reads(tmp_path, monkeypatch):
    """With reads every 2 steps, TensorBoard still gets each step's global index, loss and rate."""
    monkeypatch.setattr(engine_step, "LOSS_READ_EVERY", 2)
    run, batches = tiny_run(tmp_path)
    calls = []
    run.tensorboard = SimpleNamespace(step=lambda *args: calls.append(args))
    run.loader = batches + batches[:1]  # 5 steps: reads after 2, 4 and at the end
    rates = []
    run.optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
    losses = []
    real_loss = run.loss
    run.loss = lambda logits, landmarks: (lambda v: losses.append(v) or v)(real_loss(logits, landmarks))
    row = trainer.train_one_epoch(run, 1)
    assert [c[0] for c in calls] == [5 + i for i in range(5)]
    assert [c[2] for c in calls] == rates and row["lr"] == rates[-1]
    assert [c[1] for c in calls] == pytest.approx([float(v.detach()) for v in losses])
    assert row["train_loss"] == pytest.approx(sum(float(v.detach()) for v in losses) / len(run.loader))


# ---------------------------------------------------------------------------
# --cuda-graphs: the decision, the optimizer's form


def _stand_in(device="cuda", mode="auto", active=False, amp=None, compile=False, drop_last=True, scaler=None):
    return SimpleNamespace(args=SimpleNamespace(cuda_graphs=mode, amp=amp, compile=compile),
                           device=torch.device(device), dist=SimpleNamespace(active=active), scaler=scaler,
                           loader=SimpleNamespace(drop_last=drop_last))


@pytest.mark.parametrize("change,reason", [
    (dict(device="cpu"), "the device is cpu"), (dict(active=True), "DDP"), (dict(amp="fp16"), "--amp fp16"),
    (dict(compile=True), "--compile"), (dict(drop_last=False), "last partial batch")])
def test_auto_is_on_for_one_cuda_process_and_says_why_not(change, reason):
    on, setting = cuda_graphs.resolve(_stand_in())
    assert on and setting.startswith("on (auto)")
    on, setting = cuda_graphs.resolve(_stand_in(**change))
    assert not on and setting.startswith("off (auto: ") and reason in setting
    if reason in ("--compile", "last partial batch"):  # on captures these anyway
        assert cuda_graphs.resolve(_stand_in(mode="on", **change))[0]
    else:
        with pytest.raises(ValueError, match=f"--cuda-graphs on: .*{reason.split()[0]}"):
            cuda_graphs.resolve(_stand_in(mode="on", **change))
    assert cuda_graphs.resolve(_stand_in(mode="off", **change)) == (False, "off (--cuda-graphs off)")
    with pytest.raises(ValueError, match="--cuda-graphs must be one of"):
        cuda_graphs.resolve(_stand_in(mode="yes"))


def test_the_command_refuses_on_without_cuda_and_says_the_setting(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny_run(tmp_path, "coor", "--cuda-graphs", "on")
    assert "--cuda-graphs on: the device is cpu: CUDA graphs need CUDA" in capsys.readouterr().err
    run, _ = tiny_run(tmp_path, "none", "--cuda-graphs", "off")
    assert run.config["environment"]["cuda_graphs"] == "off (--cuda-graphs off)"
    assert "CUDA graphs: off (--cuda-graphs off)" in capsys.readouterr().out
    assert "cuda_graphs" in train_cmd.RESUME_OVERRIDES  # decided anew on resume, as the device


def test_set_capturable_moves_resumed_step_counts_both_ways():
    """A checkpoint of a graphed run (capturable Adam, device step counts) resumes eagerly and the
    other way round: the flag follows the run, the step counts go where that kind keeps them."""
    param = torch.nn.Parameter(torch.randn(3))
    graphed = torch.optim.Adam([param], lr=0.1)
    graphed.param_groups[0]["capturable"] = True
    graphed.state[param] = {"step": torch.tensor(7.0, dtype=torch.float64), "exp_avg": torch.zeros(3),
                            "exp_avg_sq": torch.zeros(3)}
    cuda_graphs.set_capturable(graphed, True)
    assert graphed.state[param]["step"].dtype == torch.float32  # on the parameter's device, float32
    eager = torch.optim.Adam([param], lr=0.1)
    eager.load_state_dict(graphed.state_dict())
    assert eager.param_groups[0]["capturable"]
    cuda_graphs.set_capturable(eager, False)
    assert not eager.param_groups[0]["capturable"] and float(eager.state[param]["step"]) == 7.0
    param.grad = torch.ones(3)
    eager.step()  # a CPU Adam: capturable would refuse CPU tensors
    assert float(eager.state[param]["step"]) == 8.0
    sgd = torch.optim.SGD([param], lr=0.1)
    cuda_graphs.set_capturable(sgd, True)  # nothing to set
    assert "capturable" not in sgd.param_groups[0]


def test_graphed_step_without_the_graph_trains_as_the_eager_step(tmp_path):
    """GraphedStep(capture=False) on CPU: the static buffers, the device learning rates the
    schedule writes each step (per parameter group, ``--coord-lr-mult``), the log, and a batch of
    another shape run eagerly.  The first step gives EagerStep's weights to float rounding (the
    rate as a float32 tensor); later ones only close, as Adam divides noise-level gradients by
    their own size."""
    runs = {}
    for name in ("eager", "graphed"):
        run, batches = tiny_run(tmp_path / name, "coor", "--coord-lr-mult", "0.5")
        if name == "graphed":
            run.train_step = cuda_graphs.GraphedStep(run, "on (test)", capture=False)
        log = engine_step.LossLog(run.device)
        step = trainer.training_step(run)
        odd = {k: torch.cat((batches[0][k], batches[1][k][:1])) for k in ("image", "landmarks")}  # 3 images
        first = None
        for batch in batches + [odd]:
            step(batch, log)
            first = first or [p.detach().clone() for p in run.model.parameters()]
        runs[name] = run, log.read(), first
    (eager, eager_losses, eager_first), (graphed, graphed_losses, graphed_first) = runs["eager"], runs["graphed"]
    assert graphed.train_step.eager_batches == 1 and len(graphed.optimizer.param_groups) == 2
    for a, b in zip(eager_first, graphed_first):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [lr for _, lr in graphed_losses] == [lr for _, lr in eager_losses]
    assert [loss for loss, _ in graphed_losses] == pytest.approx([loss for loss, _ in eager_losses], rel=1e-3)
    assert all(isinstance(group["lr"], float) for group in graphed.optimizer.param_groups)  # floats outside
    # the device rates hold the last graphed step's rate (the one before the odd batch), per group
    last = graphed_losses[-2][1]
    assert [float(rate) for rate in graphed.train_step.lrs] == pytest.approx([last, last * 0.5], rel=1e-6)
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


def test_coordinate_module_builds_its_grid_once_per_size_without_host_data():
    """The offset grid and scale of a token grid: made with device ops only (no tensor from a host
    list), kept per (size, device, offset range, inference mode), not kept under a dispatch mode."""
    from coorkern.models import CoordinateModule
    from coorkern.models.blocks import reference_grid

    module = CoordinateModule(8, offset_range=3.0)
    x = torch.randn(2, 8, 5, 7)
    with counting() as seen:
        coords = module(x)  # under a dispatch mode: made, not kept
    assert seen == {} and module._geometry_cache == {}
    first = module(x)
    assert torch.equal(first, coords) and len(module._geometry_cache) == 1
    (grid, scale), = module._geometry_cache.values()
    assert torch.equal(grid, reference_grid(5, 7)) and torch.equal(scale, 3.0 * torch.tensor([2.0 / 6, 2.0 / 4]))
    module(x)
    module(torch.randn(2, 8, 4, 4))
    with torch.inference_mode():
        module(x)
    assert len(module._geometry_cache) == 3  # (5, 7), (4, 4), (5, 7) under inference mode
    module.offset_range = 1.0
    torch.testing.assert_close(module(x) - reference_grid(5, 7), (first - reference_grid(5, 7)) / 3.0)
    assert module.state_dict().keys() == CoordinateModule(8).state_dict().keys()  # checkpoints unchanged
