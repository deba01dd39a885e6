// The Python module `ortholora_kernels._C`: importing it runs the TORCH_LIBRARY
// registrations of the other translation units (ops under torch.ops.ortholora_C).
// Plain CPython API, no pybind11: the module has no functions of its own.
#include <Python.h>

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "ortholora_kernels compiled kernels",
                                          -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#if defined(ORTHOLORA_WITH_CUDA)
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}

}
