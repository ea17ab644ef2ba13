// fusedformer._C: the native library. The `fusedformer_C` operator namespace is declared here;
// each op adds its schemas and CPU / CUDA kernels from its own folder
// (csrc/<op>/<op>_ops.cpp, TORCH_LIBRARY_FRAGMENT + TORCH_LIBRARY_IMPL), so ops can be added
// without touching a shared file. Importing the Python module loads and registers everything.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedformer_C, m) {}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "fusedformer native kernels (registered as torch.ops.fusedformer_C)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
