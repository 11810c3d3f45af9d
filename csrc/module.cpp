// Defines the coorkern operator namespace and makes the shared library importable
// as the Python module coorkern._C.  Each op lives in its own file and adds its
// schemas and CPU kernels with TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(coorkern, m) {}

extern "C" {
// Importing coorkern._C only needs to load the library: the static initializers
// above register the ops with the dispatcher.  No Python bindings are exported.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
