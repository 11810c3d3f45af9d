"""The coordinate-indexed attention op, in four modules: ``kernels`` (the Triton kernels),
``launch`` (launch configurations, CUDA autotuning and the host passes), ``aot`` (the kernel
variants compiled ahead of time for C++ callers) and ``op`` (schemas, registration, autograd,
the public function and the choice of implementation).

The Triton kernels have three call routes:

=====================================  ===============================  ==================================
route                                  taken by                         entry
=====================================  ===============================  ==================================
eager ``autograd.Function``,           eager calls on plain CPU/CUDA    ``op._TritonEager``
launches the kernels directly          tensors (least host time)
traced ``torch.library.triton_op``     torch.compile, torch.export,     ``coorkern::coor_attention_triton``
(launches through ``wrap_triton``)     fake tensors (torch >= 2.6)      ``[_backward]``
C++-schema opaque op                   dispatcher and C++ callers;      ``coorkern::coor_attention``
(a registered CUDA kernel)             traced calls on torch 2.4/2.5    ``[_backward]`` (``op._direct_*``)
=====================================  ===============================  ==================================
"""

from .op import CoorAttention, coor_attention

__all__ = ["CoorAttention", "coor_attention"]
