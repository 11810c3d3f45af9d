"""One training step of ``coorkern train``, and the loss log that reads the steps' losses back.

A step -- the batch to the device, the forward under autocast, the loss, backward, the
optimizer and the learning-rate schedule, the loss added to the log -- never waits for the
device: no ``.item()``, ``.cpu()``, ``bool(tensor)`` or tensor made from host values in it
(``python_tests/engine/test_sync_free_step.py`` counts them).  On a GPU the host then runs
ahead and queues the next steps while the kernels of this one run.  The losses stay on the
device in :class:`LossLog` and are read back once per :data:`LOSS_READ_EVERY` steps and at the
end of the epoch, one device-to-host copy each: the progress bar and TensorBoard get them then.

Two syncs are torch's, not the step's: with ``--amp fp16`` on CUDA the gradient scaler reads
its found-inf flag on the host every step (bf16 needs no scaler), and the first step of a
shape times the Triton kernels' candidate configs (autotuning).

:func:`make_train_step` picks the step of a run: :class:`EagerStep`, or the CUDA-graph step of
:mod:`coorkern.engine.cuda_graphs` (``--cuda-graphs``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .inference import autocast

__all__ = ["LOSS_READ_EVERY", "LossLog", "EagerStep", "make_train_step", "to_device"]

LOSS_READ_EVERY = 50  # steps between two reads of the losses (a device-to-host copy each)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` copied to ``device`` without blocking the host.  To CUDA from pinned memory: a
    copy from pageable memory would wait for the device (it is pinned here unless the loader
    pinned it already; torch's pinned-memory cache keeps the block until the copy is done)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class LossLog:
    """The losses of an epoch's steps, kept on the device until they are read.

    :meth:`add` copies a step's loss into a slot of a device buffer (one small kernel, no
    wait); :meth:`read` adds the buffered losses to the epoch's float64 total on the device and
    brings them to the host in one copy, with the learning rate each step used.
    """

    def __init__(self, device: torch.device, read_every: Optional[int] = None) -> None:
        self.read_every = max(1, int(read_every or LOSS_READ_EVERY))
        self.window = torch.zeros(self.read_every, dtype=torch.float64, device=device)
        self.slots = self.window.unbind()  # views made once: a step only copies into one
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.lrs: list[float] = []  # learning rate of every step not read yet
        self.steps = 0  # steps added this epoch

    def add(self, loss: torch.Tensor, lr: float) -> None:
        """Record a step's (scalar) loss and the learning rate it used; never waits for the device."""
        self.slots[len(self.lrs)].copy_(loss.detach())
        self.lrs.append(lr)
        self.steps += 1

    @property
    def due(self) -> bool:
        """Whether the buffer is full: :meth:`read` before the next :meth:`add`."""
        return len(self.lrs) == self.read_every

    @property
    def pending(self) -> int:
        return len(self.lrs)

    def read(self) -> list[tuple[float, float]]:
        """``(loss, lr)`` of every step since the last read (one device-to-host copy)."""
        count = len(self.lrs)
        if count == 0:
            return []
        losses = self.window[:count]
        self.total += losses.sum()
        values = list(zip(losses.tolist(), self.lrs))
        self.lrs = []
        return values

    def epoch_total(self) -> torch.Tensor:
        """The float64 sum of every loss added (a device tensor; read what is pending first)."""
        self.read()
        return self.total


class EagerStep:
    """The step run op by op: the batch to the device, forward (under the run's autocast), loss,
    backward (through the gradient scaler with ``--amp fp16`` on CUDA), optimizer, schedule, log.

    Reads the run's parts at every call (``train_model``, ``loss``, ``optimizer``, ``scheduler``,
    ``scaler``), so a driver may replace them between steps.
    """

    def __init__(self, run, setting: str = "off") -> None:
        self.run = run
        self.setting = setting  # what --cuda-graphs resolved to, for the run's settings

    def __call__(self, batch: dict, log: LossLog) -> None:
        run = self.run
        images = to_device(batch["image"], run.device)
        landmarks = to_device(batch["landmarks"], run.device)
        with autocast(run.device, run.args.amp):
            logits = run.train_model(images)
        loss = run.loss(logits, landmarks)
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            loss.backward()
            run.optimizer.step()
        lr = run.optimizer.param_groups[0]["lr"]  # the rate this step used (a host float)
        run.scheduler.step()
        log.add(loss, lr)


def make_train_step(run):
    """The step of ``run`` for its ``--cuda-graphs`` setting (``run.args.cuda_graphs``, default
    ``auto``): a :class:`~coorkern.engine.cuda_graphs.GraphedStep` when it resolves to on, else an
    :class:`EagerStep`.  Sets the optimizer up for it (capturable Adam for graphs, plain
    otherwise: a checkpoint of the other kind resumes either way).  ``step.setting`` says which
    and why.  ValueError for ``--cuda-graphs on`` where graphs cannot run."""
    from . import cuda_graphs

    on, setting = cuda_graphs.resolve(run)
    cuda_graphs.set_capturable(run.optimizer, on)
    return cuda_graphs.GraphedStep(run, setting) if on else EagerStep(run, setting)
