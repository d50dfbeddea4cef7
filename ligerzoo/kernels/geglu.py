"""GeGLU activation: ``gelu_tanh(gate) * up``.

Math (Shazeer, "GLU Variants Improve Transformer", 2020; the Gemma MLP
``down(gelu(gate(x)) * up(x))`` with HF's ``gelu_pytorch_tanh``), using the tanh
approximation of GELU (Hendrycks & Gimpel, 2016; ``torch.nn.functional.gelu(...,
approximate="tanh")``), elementwise in fp32::

    u      = sqrt(2 / pi) * (gate + 0.044715 * gate ** 3)
    gelu   = 0.5 * gate * (1 + tanh(u))  =  gate * s,     s = sigmoid(2 u)
    y      = gelu * up
    d_up   = dy * gelu
    d_gate = dy * up * (s + gate * 2 s (1 - s) * sqrt(2 / pi) * (1 + 3 * 0.044715 * gate ** 2))

``s`` and ``1 - s`` are both formed from ``exp(-2|u|)`` (no cancellation for large
``|u|``). The backward recomputes them from the saved inputs.

The kernels, launchers and op registration are shared with SwiGLU
(:mod:`ligerzoo.kernels.swiglu`, activation code :data:`ACT_GELU_TANH`); as there:

- :func:`geglu` takes ``gate`` and ``up`` as separate (..., I) tensors, possibly strided
  views (the halves of one fused projection are read in place);
- :func:`geglu_fused` takes the fused ``(..., 2I)`` tensor (gate first, then up) and its
  backward writes one ``(..., 2I)`` gradient.
"""
from __future__ import annotations

import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import ops
from ligerzoo.kernels.swiglu import ACT_GELU_TANH, _check_fused, _check_pair, _register_gated_ops

__all__ = ["geglu", "geglu_fused", "geglu_reference", "geglu_fused_reference"]

_register_gated_ops("geglu", ACT_GELU_TANH)


# ----------------------------------------------------------------------------- references
def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ``gelu(gate, approximate="tanh") * up`` in
    ``promote_types(gate.dtype, float32)``, cast to ``gate.dtype``; differentiable by
    torch autograd.

    Arguments, shapes, dtypes and errors as :func:`geglu`.
    """
    _check_pair(gate, up, "geglu")
    ct = torch.promote_types(gate.dtype, torch.float32)
    return (torch.nn.functional.gelu(gate.to(ct), approximate="tanh") * up.to(ct)).to(gate.dtype)


def geglu_fused_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`geglu_fused`: ``geglu_reference(*gate_up.split(I, -1))``.

    Arguments, shapes, dtypes and errors as :func:`geglu_fused`.
    """
    _check_fused(gate_up)
    n_cols = gate_up.shape[-1] // 2
    return geglu_reference(gate_up[..., :n_cols], gate_up[..., n_cols:])


# ----------------------------------------------------------------------------- public API
def geglu(gate: torch.Tensor, up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """GeGLU: ``gelu_tanh(gate) * up`` (Shazeer 2020, arXiv 2002.05202), computed in fp32.

    GELU (Hendrycks & Gimpel, arXiv 1606.08415) is the tanh approximation,
    ``0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))``, as
    ``torch.nn.functional.gelu(a, approximate="tanh")`` and HF ``gelu_pytorch_tanh``.

    Args:
        gate: (..., I) fp32 / bf16 / fp16 (float64 runs the torch reference). Strided
            views with a unit last-dim stride are read in place (e.g. ``gu[..., :I]``).
        up: same shape, dtype and device as ``gate``.
        inplace: the backward writes the gradients over ``gate`` and ``up`` (one (gate +
            up)-sized buffer less at its peak, what Liger Kernel's ``LigerGELUMulFunction``
            always does); when it may and when it falls back: as
            :func:`ligerzoo.kernels.swiglu.swiglu`.

    Returns:
        (..., I) in ``gate.dtype``, contiguous on the Triton path (the torch reference may
        follow the inputs' strides). Backward returns separate contiguous gradients for
        ``gate`` and ``up``, recomputing GELU from the saved inputs.

    Raises:
        ValueError: shapes, dtypes or devices of ``gate`` and ``up`` differ, not float, or
            0-dim inputs.
    """
    _check_pair(gate, up, "geglu")
    if not _utils.triton_ok(gate):
        return geglu_reference(gate, up)
    return ops.geglu(gate, up, bool(inplace))


def geglu_fused(gate_up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """GeGLU on a fused projection: ``gelu_tanh(gate_up[..., :I]) * gate_up[..., I:]``.

    One matmul produces ``gate_up`` (gate first) and the backward writes its gradient as
    one (..., 2I) tensor.

    Args:
        gate_up: (..., 2I) fp32 / bf16 / fp16; rows with a unit last-dim stride are read
            in place.
        inplace: the backward writes the gradient over ``gate_up`` itself, as
            :func:`ligerzoo.kernels.swiglu.swiglu_fused`'s (same conditions).

    Returns:
        (..., I) in ``gate_up.dtype``, contiguous on the Triton path.

    Raises:
        ValueError: odd last dim, 0-dim or non-float input.
    """
    _check_fused(gate_up)
    if not _utils.triton_ok(gate_up):
        return geglu_fused_reference(gate_up)
    return ops.geglu_fused(gate_up, bool(inplace))
