"""The central loss op, in four modules: ``kernels`` (the Triton kernels), ``launch`` (launch
configurations, CUDA autotuning and the host passes), ``aot`` (the kernel variants compiled
ahead of time for C++ callers) and ``op`` (schemas, registration, autograd, public functions).

The Triton kernels have three call routes:

=====================================  ===============================  ================================
route                                  taken by                         entry
=====================================  ===============================  ================================
eager ``autograd.Function``,           eager calls on plain CPU/CUDA    ``op._TritonEager``
launches the kernels directly          tensors (least host time)
traced ``torch.library.triton_op``     torch.compile, torch.export,     ``coorkern::central_loss_triton``
(launches through ``wrap_triton``)     fake tensors (torch >= 2.6)      ``[_backward]``
C++-schema opaque op                   dispatcher and C++ callers;      ``coorkern::central_loss*``
(a registered CUDA kernel)             traced calls on torch 2.4/2.5    (``op._cl_cuda`` etc.)
=====================================  ===============================  ================================
"""

from .op import CentralLoss, central_loss, central_loss_from_landmarks

__all__ = ["CentralLoss", "central_loss", "central_loss_from_landmarks"]
