"""Triton kernels, one module per op; each with its autograd connection, a plain-torch
reference and one public function. CUDA tensors run Triton; CPU tensors run Triton under
the interpreter when ``TRITON_INTERPRET=1``, else the reference (see ``_utils.use_triton``)."""
from ligerzoo.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from ligerzoo.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from ligerzoo.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference, rms_norm, rms_norm_reference
from ligerzoo.kernels.rope import rope, rope_cos_sin, rope_reference
from ligerzoo.kernels.swiglu import swiglu, swiglu_fused, swiglu_fused_reference, swiglu_reference

__all__ = [
    "cross_entropy", "cross_entropy_reference",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference",
    "rms_norm", "rms_norm_reference", "fused_add_rms_norm", "fused_add_rms_norm_reference",
    "rope", "rope_cos_sin", "rope_reference",
    "swiglu", "swiglu_reference", "swiglu_fused", "swiglu_fused_reference",
]
