// fastce._C_cuda: the library of the CUDA kernels. Importing it registers them for the ops that
// fastce._C defines (fastce/__init__.py imports _C first; a kernel registered before its schema
// would wait for it anyway). The module itself is empty and uses Python's limited API only.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
