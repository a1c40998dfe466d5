// Python module fmkernels._C. Importing it registers every CPU kernel with the dispatcher
// (TORCH_LIBRARY_IMPL blocks in the other files); it also exposes CPU feature detection.
#include <Python.h>

#include <c10/util/Exception.h>

#include "cpu/vec.h"

namespace {

PyObject* py_cpu_features(PyObject*, PyObject*) {
  const auto& f = fmk::cpu::cpu_features();
  PyObject* d = PyDict_New();
  auto put = [&](const char* k, bool v) { PyDict_SetItemString(d, k, v ? Py_True : Py_False); };
  put("avx2", f.avx2 && f.fma);
  put("f16c", f.f16c);
  put("avx512f", f.avx512f);
  put("avx512bw", f.avx512bw);
  put("avx512vl", f.avx512vl);
  put("avx512dq", f.avx512dq);
  put("avx512_vnni", f.avx512_vnni);
  put("avx512_vbmi", f.avx512_vbmi);
  put("avx512_bf16", f.avx512_bf16);
  put("avx512_fp16", f.avx512_fp16);
  put("amx_tile", f.amx_tile);
  put("amx_bf16", f.amx_bf16);
  put("amx_int8", f.amx_int8);
  return d;
}

PyObject* py_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fmk::cpu::isa_name(fmk::cpu::max_isa()));
  } catch (const c10::Error& e) {  // a bad FMK_CPU_ISA: ValueError, never an escaping C++ exception
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_features", py_cpu_features, METH_NOARGS, "CPUID-detected ISA extensions (dict of bool)."},
    {"isa", py_isa, METH_NOARGS, "ISA level the CPU kernels use now (honours FMK_CPU_ISA)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "fmkernels CPU kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
