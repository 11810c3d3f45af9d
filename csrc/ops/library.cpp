// Defines the coorkern operator namespace and says what the library was built with.
// The Python-free library libcoorkern_ops.so is csrc/ops/ (this file, each op's schemas
// and typed entry points), csrc/cpu/ (the CPU kernels) and, when built with them,
// csrc/cuda/ (the ahead-of-time CUDA kernels); each of those files registers its part
// from static initializers (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL), so loading the
// library is what makes the ops exist.  csrc/python/ is the thin Python extension that
// only loads it.
#include <coorkern/ops.h>
#include <torch/library.h>

#include <string>

#ifdef COORKERN_WITH_AOT_CUDA
#include "cuda/aot.h"
#endif

TORCH_LIBRARY(coorkern, m) {}

extern "C" const char* coorkern_build_info() {
  static const std::string info = [] {
    std::string s = "cpu";
#ifdef COORKERN_WITH_AOT_CUDA
    s += ";cuda_aot=" + coorkern::aot::describe();
#else
    s += ";cuda_aot=none";
#endif
    return s;
  }();
  return info.c_str();
}
