// Defines the coorkern operator namespace.  Each op lives in its own file and adds
// its schemas and kernels with TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL; all of
// csrc/*.cpp form the Python-free library libcoorkern_ops.so (csrc/python/ holds the
// thin Python extension that only loads it).
#include <coorkern/ops.h>
#include <torch/library.h>

#include <string>

#ifdef COORKERN_WITH_AOT_CUDA
#include "aot/aot.h"
#endif

TORCH_LIBRARY(coorkern, m) {}

extern "C" const char* coorkern_build_info() {
  static const std::string info = [] {
    std::string s = "cpu";
#ifdef COORKERN_WITH_AOT_CUDA
    s += ";cuda_aot=" + coorkern::aot::describe();
#endif
    return s;
  }();
  return info.c_str();
}
