"""Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1 for tests). One file per op: kernels, then the
launcher registered as a `fmkernels::*_triton` custom op. Importing a module here imports triton."""
import torch


def fp32_dot_precision() -> str:
    """input_precision for a tl.dot of fp32 operands on the GPU, from PyTorch's own fp32 matmul policy
    (torch.set_float32_matmul_precision): "highest" -> "tf32x3" (three TF32 tensor-core products, fp32-level
    error), "high"/"medium" -> "tf32". Either way the dot runs on the tensor cores, never as SIMT FMAs."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
