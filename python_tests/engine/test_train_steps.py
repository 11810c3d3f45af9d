"""The steps of a training run (``coorkern.engine.trainer``), each on a hand-built ``Run`` of tiny parts.

The end-to-end tests (test_train.py, test_resume.py) show that a run trains, checkpoints and
resumes; they cannot see what one step hands to the next.  Here each step runs on a ``Run``
whose model, data, loss, scaler, logger and clock are small stand-ins that record what they
are given: the epoch's loss is the float64 mean of its steps, the sampler and dataset hear
the epoch, batches move to the run's device without blocking, autocast and the gradient
scaler are used, TensorBoard gets each step's global index, loss and learning rate, the
progress bar its text, validation fills the metrics row and chooses the selection score, and
checkpoints carry the mean shape and the scaler.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from coorkern.engine import step as engine_step
from coorkern.engine import trainer
from coorkern.engine.checkpoints import load_checkpoint

LANDMARKS, SIZE = 3, (8, 8)


class Moving:
    """A batch tensor that records how it is moved."""

    def __init__(self, tensor, log):
        self.tensor, self.log = tensor, log

    def to(self, *args, **kwargs):
        self.log.append((args, kwargs))
        return self.tensor


class ScriptedRun(trainer.Run):
    """A run whose loss is scripted (``script``: one value per step, no gradient) or the real one."""

    script: list = None

    def loss(self, logits, landmarks):
        if self.script is None:
            value = super().loss(logits, landmarks)
        else:
            value = logits.float().mean() * 0 + self.script.pop(0)
        self.losses.append(float(value.detach()))
        return value


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class EpochRecorder:
    """A sampler or dataset that only hears ``set_epoch``."""

    def __init__(self):
        self.calls = []

    def set_epoch(self, epoch):
        self.calls.append(("set_epoch", (epoch,), {}))


class AutocastProbe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, LANDMARKS, 3, padding=1)
        self.autocast = []

    def forward(self, x):
        self.autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return self.conv(x)


def make_run(tmp_path, steps=3, batch_size=2, world=1, amp=None, scaler=None, script=None, **args):
    torch.manual_seed(0)
    model = AutocastProbe()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0.01, max_lr=0.1, step_size_up=2,
                                                  cycle_momentum=False)
    moves = []
    loader = [{"image": Moving(torch.randn(batch_size, 1, *SIZE), moves),
               "landmarks": Moving(torch.rand(batch_size, LANDMARKS, 2) * 7, moves)} for _ in range(steps)]
    namespace = dict(epochs=5, progress=False, amp=amp, batch_size=batch_size, loss="central", sigma=1.0, r=2.0,
                     select="mre", eval_batch_size=2)
    namespace.update(args)
    run = ScriptedRun(args=argparse.Namespace(**namespace), dist=SimpleNamespace(world=world, rank=0, main=True,
                                                                                 active=False),
                      device=torch.device("cpu"), config={"model": {"kind": "probe"}}, run_dir=tmp_path,
                      train_ds=EpochRecorder(), val_ds=[], test_ds=[], thresholds=(2.0, 4.0),
                      mean_shape=torch.rand(1, LANDMARKS, 2), model=model, train_model=model, optimizer=optimizer,
                      scheduler=scheduler, scaler=scaler, sampler=EpochRecorder(), loader=loader)
    run.script, run.moves, run.losses = script, moves, []
    return run


def step_learning_rates(run):
    lrs = []
    run.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: lrs.append(optimizer.param_groups[0]["lr"]))
    return lrs


def test_epoch_loss_is_the_float64_mean_of_its_steps(tmp_path):
    # float32 would lose the ones next to 2**24: (2**24 + 1) rounds to 2**24
    run = make_run(tmp_path, script=[2.0 ** 24, 1.0, 1.0])
    row = trainer.train_one_epoch(run, epoch=0)
    assert row["train_loss"] == (2.0 ** 24 + 2) / 3 and row["epoch"] == 1
    assert row["epoch_time_s"] > 0 and row["images_per_s"] == pytest.approx(3 * 2 / row["epoch_time_s"])


def test_epoch_reports_the_learning_rate_of_its_last_step(tmp_path):
    run = make_run(tmp_path, steps=3)
    lrs = step_learning_rates(run)
    row = trainer.train_one_epoch(run, epoch=0)
    assert len(lrs) == 3 and len(set(lrs)) == 3 and row["lr"] == lrs[-1]
    assert run.optimizer.param_groups[0]["lr"] != lrs[-1]  # the schedule moved on after the last step


def test_epoch_tells_the_sampler_and_the_dataset_and_trains_the_model(tmp_path):
    run = make_run(tmp_path)
    run.model.eval()
    before = [p.detach().clone() for p in run.model.parameters()]
    trainer.train_one_epoch(run, epoch=4)
    assert run.sampler.calls == [("set_epoch", (4,), {})]
    assert run.train_ds.calls == [("set_epoch", (4,), {})]  # the augmentation's per-epoch seed
    assert run.model.training
    assert all(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    # a dataset without set_epoch (no augmentation) is fine
    run = make_run(tmp_path)
    run.train_ds = object()
    trainer.train_one_epoch(run, epoch=0)


def test_batches_move_to_the_runs_device_without_blocking(tmp_path):
    run = make_run(tmp_path, steps=2)
    run.device = torch.device("cpu", 0)  # a device object the stand-ins can tell apart from a default
    trainer.train_one_epoch(run, epoch=0)
    assert run.moves == [((run.device,), {"non_blocking": True})] * 4


@pytest.mark.parametrize("amp,expected", [(None, False), ("bf16", torch.bfloat16)])
def test_forward_runs_under_the_runs_autocast(tmp_path, amp, expected):
    run = make_run(tmp_path, steps=2, amp=amp)
    trainer.train_one_epoch(run, epoch=0)
    assert run.model.autocast == [expected] * 2


def test_gradient_scaler_scales_steps_and_updates(tmp_path):
    """With a scaler (fp16 on CUDA) every step goes through scale -> step(optimizer) ->
    update, and the parameters move as they do without one (it unscales before stepping)."""

    class RecordingScaler(torch.amp.GradScaler):
        def __init__(self):
            super().__init__("cpu", init_scale=64.0)
            self.calls = []

        def scale(self, outputs):
            self.calls.append(("scale", float(outputs.detach())))
            return super().scale(outputs)

        def step(self, optimizer, *args, **kwargs):
            self.calls.append(("step", optimizer))
            return super().step(optimizer, *args, **kwargs)

        def update(self, new_scale=None):
            self.calls.append(("update", new_scale))
            return super().update(new_scale)

    plain, scaled = make_run(tmp_path), make_run(tmp_path, scaler=RecordingScaler())
    row_plain, row_scaled = trainer.train_one_epoch(plain, epoch=0), trainer.train_one_epoch(scaled, epoch=0)
    calls = scaled.scaler.calls
    assert [c[0] for c in calls] == ["scale", "step", "update"] * 3
    assert all(c[1] is scaled.optimizer for c in calls if c[0] == "step")
    assert all(c[1] is None for c in calls if c[0] == "update")
    assert [c[1] for c in calls if c[0] == "scale"] == scaled.losses == pytest.approx(plain.losses, rel=1e-6)
    for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert row_plain["train_loss"] == pytest.approx(row_scaled["train_loss"], rel=1e-6)


def test_tensorboard_gets_each_steps_global_index_loss_and_lr(tmp_path):
    run = make_run(tmp_path, steps=3, script=[0.5, 0.25, 0.125])
    run.tensorboard = Recorder()
    lrs = step_learning_rates(run)
    trainer.train_one_epoch(run, epoch=2)
    assert run.tensorboard.calls == [("step", (6 + i, loss, lr), {}) for i, (loss, lr) in
                                     enumerate(zip([0.5, 0.25, 0.125], lrs))]


class FakeBar:
    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.postfix, self.updates, self.closed = kwargs, [], [], False
        FakeBar.made.append(self)

    def set_postfix_str(self, text, refresh=True):
        self.postfix.append((text, refresh))

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("progress,main,disable", [(True, True, None), (True, False, True), (False, True, True)])
def test_progress_bar_counts_steps_and_shows_loss_lr_and_throughput(tmp_path, monkeypatch, progress, main, disable):
    clock = iter(100 + 0.5 * i for i in range(100))  # half a second per clock read: t0, one per step, the end
    monkeypatch.setattr(trainer, "time", SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(trainer, "tqdm", FakeBar)
    monkeypatch.setattr(engine_step, "LOSS_READ_EVERY", 1)  # the losses read after every step (default: every 50)
    FakeBar.made = []
    run = make_run(tmp_path, steps=2, batch_size=3, world=2, progress=progress, script=[0.5, 0.25])
    run.dist.main = main
    lr = run.optimizer.param_groups[0]["lr"]
    row = trainer.train_one_epoch(run, epoch=1)
    (bar,) = FakeBar.made
    assert bar.kwargs["total"] == 2 and bar.kwargs["desc"] == "epoch 2/5" and bar.kwargs["unit"] == "step"
    assert bar.kwargs["disable"] is disable  # None: tqdm draws only on a terminal
    # at most two redraws a second, as wide as the terminal is now
    assert bar.kwargs["mininterval"] == 0.5 and bar.kwargs["dynamic_ncols"] is True
    # step 1: 1 x 3 images x 2 processes in 0.5 s; step 2: 2 x 3 x 2 in 1 s.  The postfix only
    # sets the text (refresh=False): tqdm redraws at most every mininterval.
    assert bar.postfix[0] == (f"loss=0.50000, lr={lr:.2e}, img_s=12.0", False)
    assert bar.postfix[1][0].startswith("loss=0.25000, lr=") and bar.postfix[1][0].endswith("img_s=12.0")
    assert bar.postfix[1][1] is False and bar.updates == [1, 1] and bar.closed
    # the epoch: 2 steps x 3 images x 2 processes in 1.5 s
    assert row["epoch"] == 2 and row["epoch_time_s"] == 1.5 and row["images_per_s"] == 8.0


def test_processes_average_the_epoch_loss_and_the_float_buffers(tmp_path, monkeypatch):
    """Under DDP the epoch loss and the BatchNorm-like buffers are summed over the processes
    and divided by their number (here the other process holds loss sum 3 and buffers 3)."""
    reduced = []

    def all_reduce(tensor):
        reduced.append(tensor.dtype)
        tensor += 3

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    run = make_run(tmp_path, steps=2, world=2, script=[1.0, 2.0])
    run.dist.active = True
    run.model.register_buffer("running", torch.ones(2))
    run.model.register_buffer("count", torch.tensor(5))  # integer buffers stay per process
    row = trainer.train_one_epoch(run, epoch=0)
    assert row["train_loss"] == (1.0 + 2.0 + 3.0) / 2 / 2
    assert torch.equal(run.model.running, torch.full((2,), 2.0)) and int(run.model.count) == 5
    assert reduced == [torch.float64, torch.float32]


# ---------------------------------------------------------------------------
# Validation, checkpoints, restore, calibration, seeding


@pytest.mark.parametrize("select", ["mre", "loss"])
def test_validate_fills_the_row_and_returns_the_selection_score(tmp_path, monkeypatch, select):
    run = make_run(tmp_path, amp="bf16", select=select)
    seen = {}

    def run_inference(model, dataset, batch_size, device, amp, loss_fn):
        seen.update(model=model, dataset=dataset, batch_size=batch_size, device=device, amp=amp, loss_fn=loss_fn)
        return {"loss": 0.75}

    def evaluate_predictions(inference, thresholds):
        seen.update(inference=inference, thresholds=thresholds)
        return {"unit": "mm", "overall": {"mre": 1.5, "sdr": {"2.0": 60.0, "4.0": 90.0}}}, None, None

    monkeypatch.setattr(trainer, "run_inference", run_inference)
    monkeypatch.setattr(trainer, "evaluate_predictions", evaluate_predictions)
    row = {"epoch": 3}
    score, val_metrics = trainer.validate(run, row)
    assert row == {"epoch": 3, "val_loss": 0.75, "val_mre_mm": 1.5, "val_sdr_2.0mm": 60.0, "val_sdr_4.0mm": 90.0}
    assert score == (0.75 if select == "loss" else 1.5) and val_metrics["overall"]["mre"] == 1.5
    assert seen["model"] is run.model and seen["dataset"] is run.val_ds and seen["amp"] == "bf16"
    assert seen["batch_size"] == run.eval_batch_size and seen["device"] == run.device
    assert seen["thresholds"] == run.thresholds and seen["inference"] == {"loss": 0.75}
    logits, landmarks = torch.randn(2, LANDMARKS, *SIZE), torch.rand(2, LANDMARKS, 2) * 7
    assert torch.equal(seen["loss_fn"](logits, landmarks), run.loss(logits, landmarks))


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=128.0)  # a state that differs from the new ones below


def test_checkpoints_carry_the_mean_shape_scaler_history_and_best(tmp_path):
    run = make_run(tmp_path, scaler=_scaler())
    run.history, run.best = [{"epoch": 1, "train_loss": 1.0, "val_loss": 2.0, "val_mre_px": 3.0}], 3.0
    trainer.save_checkpoints(run, epoch=0, improved=False)
    assert not (tmp_path / "checkpoint_best.pt").exists()
    trainer.save_checkpoints(run, epoch=0, improved=True)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        ckpt = load_checkpoint(tmp_path / name)
        assert torch.equal(ckpt["mean_shape"], run.mean_shape)  # evaluate's mean-shape baseline
        assert ckpt["scaler"]["scale"] == 128.0 and ckpt["best"] == 3.0 and ckpt["epoch"] == 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == run.history
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,train_loss,val_loss,val_mre_px",
                                                                 "1,1.0,2.0,3.0"]
    run.scaler = None
    trainer.save_checkpoints(run, epoch=1, improved=False)
    assert "scaler" not in load_checkpoint(tmp_path / "checkpoint_last.pt")


def _checkpoint(tmp_path, scaler):
    source = make_run(tmp_path, scaler=scaler)
    source.history, source.best = [{"epoch": 1, "train_loss": 1.0}], 2.5
    trainer.save_checkpoints(source, epoch=0, improved=False)
    return load_checkpoint(tmp_path / "checkpoint_last.pt")


def test_restore_loads_the_scaler_only_where_both_sides_have_one(tmp_path):
    run = make_run(tmp_path, scaler=torch.amp.GradScaler("cpu", init_scale=512.0))
    trainer._restore(run, _checkpoint(tmp_path, _scaler()))
    assert run.scaler.get_scale() == 128.0 and run.start_epoch == 1 and run.best == 2.5
    assert run.history == [{"epoch": 1, "train_loss": 1.0}]
    # a checkpoint of a run without a scaler (CPU, bf16) resumed with one: the new scaler stays as it is
    run = make_run(tmp_path, scaler=torch.amp.GradScaler("cpu", init_scale=512.0))
    trainer._restore(run, _checkpoint(tmp_path, None))
    assert run.scaler.get_scale() == 512.0
    # and the other way round: nothing to load it into
    run = make_run(tmp_path)
    trainer._restore(run, _checkpoint(tmp_path, _scaler()))
    assert run.scaler is None and not math.isinf(run.best)


def test_calibrate_radii_uses_the_validation_split_and_the_runs_options(tmp_path, monkeypatch):
    run = make_run(tmp_path, amp="bf16", coverage=0.9, conformal_score="normalized", val_split="val")
    seen = {}
    truth = torch.zeros(2, LANDMARKS, 2)
    pred = truth + torch.tensor([3.0, 4.0])  # radial error 5 px everywhere

    def run_inference(model, dataset, batch_size, device, amp):
        seen.update(model=model, dataset=dataset, amp=amp, batch_size=batch_size, device=device)
        return {"pred": pred, "truth": truth, "confidence": torch.full((2, LANDMARKS), 0.5)}

    def calibrate(errors, coverage, confidence, score):
        seen.update(errors=errors, coverage=coverage, confidence=confidence, score=score)
        return {"radius": [1.0]}

    monkeypatch.setattr(trainer, "run_inference", run_inference)
    monkeypatch.setattr(trainer.conformal, "calibrate", calibrate)
    other_model = AutocastProbe()
    assert trainer.calibrate_radii(run, other_model) == {"radius": [1.0], "split": "val"}
    assert seen["model"] is other_model and seen["dataset"] is run.val_ds and seen["amp"] == "bf16"
    assert seen["batch_size"] == run.eval_batch_size and seen["device"] == run.device
    assert torch.equal(seen["errors"], torch.full((2, LANDMARKS), 5.0)) and seen["coverage"] == 0.9
    assert torch.equal(seen["confidence"], torch.full((2, LANDMARKS), 0.5)) and seen["score"] == "normalized"


def test_seed_everything_seeds_python_numpy_and_torch():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    trainer._seed_everything(7)
    first = draws()
    trainer._seed_everything(8)
    assert all(a != b for a, b in zip(draws(), first))
    trainer._seed_everything(7)
    assert draws() == first
    assert first[1] == np.random.RandomState(7).rand()
    trainer._seed_everything(2 ** 32 + 7)  # numpy takes seeds below 2**32: the seed is reduced modulo
    assert draws()[1] == first[1]


def test_set_deterministic_sets_cudnn_cublas_and_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", calls.append)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    trainer._set_deterministic(False)  # already off: nothing to change
    assert calls == [] and torch.backends.cudnn.benchmark and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    trainer._set_deterministic(True)
    assert calls == [True] and not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's deterministic workspace
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's choice is kept
    trainer._set_deterministic(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and calls == [True, True]
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    trainer._set_deterministic(True)
    trainer._set_deterministic(False)
    assert calls == [True, True, False]
