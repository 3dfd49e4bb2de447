// The Python module l2d_kernels._C: importing it loads this library, whose static initializers
// register the operators (ops.cpp). Kept apart so that C++ users (CMake) link without Python.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of l2d_kernels", -1, nullptr};
  return PyModule_Create(&module);
}
