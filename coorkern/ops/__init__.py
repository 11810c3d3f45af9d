"""One package per op, each built the same way: ``kernels`` (Triton device code), ``launch``
(configurations, autotuning, host passes), ``aot`` (ahead-of-time variants for C++ callers)
and ``op`` (registration, autograd, public functions); ``_runtime`` and ``_aot`` are shared."""
