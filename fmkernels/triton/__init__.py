"""Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1 for tests). One file per op: kernels, then the
launcher registered as a `fmkernels::*_triton` custom op. Importing a module here imports triton."""
