"""coorkern: fused kernels for heatmap-based anatomical landmark detection.

Public API:

* :func:`central_loss`, :func:`central_loss_from_landmarks`, :class:`CentralLoss`
  -- the position- and sample-aware central loss, fused forward/backward;
* :func:`heatmap_loss` -- the central loss or a baseline of the paper's Table II
  (BCE, weighted BCE, focal) by name, from :mod:`coorkern.losses`;
* :func:`coor_attention`, :class:`CoorAttention` -- coordinate-indexed attention
  (bilinear sampling at learned coordinates fused with flash attention);
* :func:`backend` -- force the implementation (``triton``/``cpp``/``reference``);
* :mod:`coorkern.reference` -- eager PyTorch oracles for every op;
* :func:`cmake_prefix_path` -- for ``find_package(coorkern)`` in C++ projects.

Rooms (docs/architecture.md): :mod:`coorkern.ops` (the two ops: kernels, launch, ahead-of-time
variants, registration), :mod:`coorkern.models` (the detector), :mod:`coorkern.data` (datasets),
:mod:`coorkern.engine` (training loop, inference, checkpoints, run folders, profiles), the
metrics (:mod:`coorkern.metrics`, :mod:`coorkern.conformal`), and the commands of the
``coorkern`` console script (:mod:`coorkern.cli`): ``train``, ``evaluate``, ``predict``,
``export``, ``experiments``, ``info``.

Ops are also registered as ``torch.ops.coorkern.*`` for ``torch.compile`` and C++.
"""

from . import reference
from .ops._runtime.backend import BACKENDS, BackendUnavailableError, backend
from .ops._runtime.extension import cmake_prefix_path, cpp_available
from .ops._runtime.library import python_cuda_kernels_take_over

with python_cuda_kernels_take_over():
    from .ops.central_loss import CentralLoss, central_loss, central_loss_from_landmarks
    from .ops.coor_attention import CoorAttention, coor_attention
from .losses import heatmap_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CentralLoss",
    "CoorAttention",
    "backend",
    "central_loss",
    "central_loss_from_landmarks",
    "cmake_prefix_path",
    "coor_attention",
    "cpp_available",
    "heatmap_loss",
    "reference",
]
