"""Training steps replayed from a CUDA graph: ``coorkern train --cuda-graphs {auto,on,off}``.

On a GPU the detector's step is bound by the host: hundreds of kernel launches, each a few
microseconds of Python and driver time, for kernels that take less.  A CUDA graph records the
whole step once -- forward, loss, backward and the optimizer step -- and replays it with one
launch per step.  What that takes here (torch's whole-network capture):

* static shapes: the loader drops the last partial batch (``drop_last=True``), so every batch
  has the shape of the first; a batch of another shape (a loader that keeps its last one) runs
  eagerly with the same optimizer, and ``auto`` is off for such a loader;
* static inputs: each batch is copied into the graph's input buffers from pinned memory,
  without blocking;
* ``Adam(capturable=True)``: step counts and bias corrections on the device, and the learning
  rate of each parameter group a device tensor, written (``fill_``) before each replay with the
  rate the cyclic schedule set in the group.  The schedule, its state and the checkpoints keep
  plain floats, so per-group rates (``lr_mult``) work as in eager runs and a checkpoint resumes
  graphed or eager (:func:`set_capturable` moves the step counts where each kind keeps them);
* autocast inside the graph (bf16) without its weight-cast cache.  fp16 is refused: its
  gradient scaler reads the found-inf flag on the host every step, which a graph cannot hold;
* warm-up before capture: a few steps on a side stream compile and autotune every kernel (a
  capture cannot time kernels), then the model, optimizer and RNG state are put back, so the
  first replay is the run's first step: a graphed run's weights match an eager run's after N
  steps (to float rounding: capturable Adam orders its arithmetic differently; bitwise against
  the same step run without the graph, ``GraphedStep(capture=False)``, where the kernels are
  deterministic).  Checkpoints, resume and ``--deterministic`` work as in eager runs.

``auto`` is on for one CUDA process whose loader drops its last batch, without ``--amp fp16``
and without ``--compile``; off on CPU, under DDP (its gradient all-reduce runs in autograd hooks
outside any graph here), with fp16 and with ``--compile`` (the compiled model runs as before;
torch.compile's own ``mode="reduce-overhead"`` graphs the model alone).  ``on`` refuses what
cannot be captured, and with ``--compile`` captures the compiled model: its kernels are compiled
in the warm-up, before the capture.  The run says which in its first lines and in
``config.json`` (``environment.cuda_graphs``).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.optim.optimizer import _get_scalar_dtype

from .step import EagerStep, LossLog

__all__ = ["MODES", "WARMUP_STEPS", "GraphedStep", "resolve", "set_capturable"]

MODES = ("auto", "on", "off")
WARMUP_STEPS = 3  # eager steps before the capture (torch's recipe: a few, on a side stream)


def _obstacle(run, mode: str) -> Optional[str]:
    """Why ``run``'s step cannot (``on``) or should not (``auto``) be graphed, else None."""
    args = run.args
    if run.device.type != "cuda":
        return f"the device is {run.device.type}: CUDA graphs need CUDA"
    if run.dist.active:
        return "DDP: its gradient all-reduce runs in autograd hooks outside the graph"
    if getattr(args, "amp", None) == "fp16" or run.scaler is not None:
        return ("--amp fp16: the gradient scaler reads its found-inf flag on the host every step, which a graph "
                "cannot hold; --amp bf16 needs no scaler")
    if mode == "auto" and getattr(args, "compile", False):
        return "--compile: the compiled model runs as before; --cuda-graphs on captures it too"
    if mode == "auto" and not getattr(run.loader, "drop_last", False):
        return "the loader keeps its last partial batch (another shape)"
    return None


def resolve(run) -> tuple[bool, str]:
    """``(on, setting)`` for ``run.args.cuda_graphs`` (default ``auto``): whether the run's steps
    are graphed, and the words the run's settings say it with.  ValueError for ``on`` where the
    step cannot be captured (naming the reason) and for an unknown mode."""
    mode = getattr(run.args, "cuda_graphs", None) or "auto"
    if mode not in MODES:
        raise ValueError(f"--cuda-graphs must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False, "off (--cuda-graphs off)"
    reason = _obstacle(run, mode)
    if reason is None:
        return True, (f"on ({mode}): forward, loss, backward and Adam(capturable) replayed from one graph per step; "
                      "the loader drops the last partial batch")
    if mode == "on":
        raise ValueError(f"--cuda-graphs on: {reason}")
    return False, f"off (auto: {reason})"


def set_capturable(optimizer: torch.optim.Optimizer, on: bool) -> None:
    """Set ``capturable`` of every parameter group of an Adam-like optimizer to ``on``, moving the
    step counts it already holds (a resumed checkpoint's) where that kind keeps them: on the
    parameter's device in float32 when capturable, else on the CPU.  Other optimizers (no
    ``capturable`` option) are left alone."""
    for group in optimizer.param_groups:
        if "capturable" not in group or group.get("fused"):
            continue
        group["capturable"] = on
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if torch.is_tensor(step):
                device, dtype = (param.device, torch.float32) if on else (torch.device("cpu"), _get_scalar_dtype())
                if step.device != device or step.dtype != dtype:
                    optimizer.state[param]["step"] = step.to(device=device, dtype=dtype)


class _Snapshot:
    """The model's parameters and buffers, the optimizer's state and the RNG states, put back in
    place (the graph keeps the tensors' addresses) after the warm-up steps changed them."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.tensors = [(t, t.detach().clone()) for t in model.state_dict(keep_vars=True).values()]
        self.state = {param: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
                      for param, state in optimizer.state.items()}
        self.rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.tensors:
            live.copy_(saved)
        for param, state in self.optimizer.state.items():
            saved = self.state.get(param, {})
            for key, value in state.items():
                if not torch.is_tensor(value):
                    continue
                if key in saved:
                    value.copy_(saved[key])
                else:  # state the warm-up created: zero, as the optimizer makes it fresh
                    value.zero_()
        torch.set_rng_state(self.rng[0])
        torch.cuda.set_rng_state(self.rng[1], self.device)


def _fill(static: torch.Tensor, batch_part: torch.Tensor) -> None:
    """Copy a batch tensor into its static buffer without blocking: to CUDA from pinned memory."""
    if static.device.type == "cuda" and batch_part.device.type == "cpu" and not batch_part.is_pinned():
        batch_part = batch_part.pin_memory()
    static.copy_(batch_part, non_blocking=True)


class GraphedStep:
    """The training step captured in a CUDA graph on its first batch and replayed for the others.

    ``capture=False`` runs the very same step (static buffers, device learning rates, capturable
    Adam) without the graph: the eager twin the tests compare a graphed run with.
    """

    def __init__(self, run, setting: str = "on", capture: bool = True) -> None:
        self.run, self.setting, self.capture = run, setting, capture
        self.eager = EagerStep(run, setting)  # batches of another shape
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.shapes: Optional[tuple] = None
        self.images = self.landmarks = self.loss = None
        self.lrs: list[torch.Tensor] = []
        self.eager_batches = 0  # batches of another shape, run eagerly

    # -- the step ------------------------------------------------------------------

    def __call__(self, batch: dict, log: LossLog) -> None:
        run = self.run
        images, landmarks = batch["image"], batch["landmarks"]
        shapes = (tuple(images.shape), images.dtype, tuple(landmarks.shape), landmarks.dtype)
        if self.shapes is None:
            self._prepare(images, landmarks, shapes)
        elif shapes != self.shapes:
            self.eager_batches += 1
            return self.eager(batch, log)
        _fill(self.images, images)
        _fill(self.landmarks, landmarks)
        groups = run.optimizer.param_groups
        for rate, group in zip(self.lrs, groups):
            rate.fill_(group["lr"])  # the schedule's rate for this step, without a host-to-device copy
        lr = groups[0]["lr"]
        if self.graph is not None:
            self.graph.replay()
            loss = self.loss
        else:
            with self._device_lrs():
                loss = self._body()
        run.scheduler.step()
        log.add(loss, lr)

    def _body(self) -> torch.Tensor:
        """Forward, loss, backward, optimizer step on the static buffers: what the graph holds."""
        run = self.run
        run.optimizer.zero_grad(set_to_none=True)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.args.amp)
        # No autocast weight-cast cache: cached casts made during capture would be stale in replays.
        with torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False):
            logits = run.train_model(self.images)
        loss = run.loss(logits, self.landmarks)
        loss.backward()
        run.optimizer.step()
        return loss.detach()

    @contextlib.contextmanager
    def _device_lrs(self):
        """The groups' rates as the device tensors while the step is warmed up or captured (the
        optimizer reads them there); plain floats again after, for the schedule and checkpoints."""
        groups = self.run.optimizer.param_groups
        floats = [group["lr"] for group in groups]
        for group, rate in zip(groups, self.lrs):
            group["lr"] = rate
        try:
            yield
        finally:
            for group, value in zip(groups, floats):
                group["lr"] = value

    # -- capture -------------------------------------------------------------------

    def _prepare(self, images: torch.Tensor, landmarks: torch.Tensor, shapes: tuple) -> None:
        run, device = self.run, self.run.device
        self.shapes = shapes
        self.images = torch.empty(images.shape, dtype=images.dtype, device=device)
        self.landmarks = torch.empty(landmarks.shape, dtype=landmarks.dtype, device=device)
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in run.optimizer.param_groups]
        if not self.capture:
            return
        # The warm-up trains on the first batch: real values, no NaN from uninitialized memory.
        _fill(self.images, images)
        _fill(self.landmarks, landmarks)
        for rate, group in zip(self.lrs, run.optimizer.param_groups):
            rate.fill_(group["lr"])
        snapshot = _Snapshot(run.model, run.optimizer, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), self._device_lrs():
            for _ in range(WARMUP_STEPS):  # compiles and autotunes every kernel: no timing in a capture
                self._body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        run.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients it keeps
        # thread_local: a DataLoader's pin-memory thread may allocate pinned memory meanwhile.
        with self._device_lrs(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.loss = self._body()
        self.graph = graph
        snapshot.restore()
