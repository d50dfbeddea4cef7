"""Triton kernels, one module per op; each with its autograd connection, a plain-torch
reference and one public function. CUDA tensors run Triton; CPU tensors run Triton under
the interpreter when ``TRITON_INTERPRET=1``, else the reference (see ``_utils.use_triton``)."""
from ligerzoo.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from ligerzoo.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from ligerzoo.kernels.embedding import embedding, embedding_reference
from ligerzoo.kernels.fused_linear_jsd import fused_linear_jsd, fused_linear_jsd_reference
from ligerzoo.kernels.geglu import geglu, geglu_fused, geglu_fused_reference, geglu_reference
from ligerzoo.kernels.group_norm import group_norm, group_norm_reference
from ligerzoo.kernels.int2_matmul import int2_matmul, int2_matmul_reference, pack_int2, unpack_int2
from ligerzoo.kernels.jsd import jsd, jsd_reference
from ligerzoo.kernels.kl_div import kl_div, kl_div_reference
from ligerzoo.kernels.layer_norm import layer_norm, layer_norm_reference
from ligerzoo.kernels.mrope import mrope, mrope_cos_sin, mrope_cos_sin_reference
from ligerzoo.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference, rms_norm, rms_norm_reference
from ligerzoo.kernels.rope import rope, rope_cos_sin, rope_reference
from ligerzoo.kernels.swiglu import swiglu, swiglu_fused, swiglu_fused_reference, swiglu_reference

__all__ = [
    "cross_entropy", "cross_entropy_reference",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference",
    "rms_norm", "rms_norm_reference", "fused_add_rms_norm", "fused_add_rms_norm_reference",
    "rope", "rope_cos_sin", "rope_reference",
    "swiglu", "swiglu_reference", "swiglu_fused", "swiglu_fused_reference",
    "geglu", "geglu_reference", "geglu_fused", "geglu_fused_reference",
    "layer_norm", "layer_norm_reference", "group_norm", "group_norm_reference",
    "mrope", "mrope_cos_sin", "mrope_cos_sin_reference", "embedding", "embedding_reference",
    "int2_matmul", "int2_matmul_reference", "pack_int2", "unpack_int2",
    "kl_div", "kl_div_reference", "jsd", "jsd_reference", "fused_linear_jsd", "fused_linear_jsd_reference",
]
