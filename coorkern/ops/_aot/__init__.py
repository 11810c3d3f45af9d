"""Ahead-of-time compilation of the ops' Triton kernels for the C++ library's CUDA path:
``compiler`` compiles one kernel variant for an arch without a GPU (and reads its SASS),
``codegen`` turns every op's declared variants (each op's ``aot`` module) into C++ sources
for ``csrc/cuda/``.  Run by ``setup.py`` at build time and by the tests."""
