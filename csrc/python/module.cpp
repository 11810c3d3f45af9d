// The Python extension coorkern._C: nothing but the module init.  It is linked
// against libcoorkern_ops.so (rpath $ORIGIN/lib), so importing it loads the library,
// whose static initializers register the ops with the dispatcher.  Its only attribute,
// build_info, says what the library holds (and keeps the link from being dropped).
#include <Python.h>

extern "C" const char* coorkern_build_info();

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "build_info", coorkern_build_info()) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
