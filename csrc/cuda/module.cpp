// Python module fmkernels._C_cuda: importing it registers every CUDA kernel (TORCH_LIBRARY_IMPL blocks).
#include <Python.h>

namespace {
PyMethodDef methods[] = {{nullptr, nullptr, 0, nullptr}};
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", "fmkernels CUDA kernels", -1, methods};
}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&module_def); }
