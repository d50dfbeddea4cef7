"""Decoder-block fusions that keep fewer activations for the backward pass.

Three autograd functions, each built from our kernels and cuBLAS matmuls:

- :func:`norm_linear`: ``s = x + residual`` (optional), ``y = linear(rms_norm(s))``. It keeps
  ``s`` (which the residual stream needs anyway) and the fp32 ``rstd`` row, not the
  normalised activations: the backward recomputes them with one forward-norm pass.
  Saves one (N, H) tensor per norm.
- :func:`rope_qkv_`: RoPE applied in place to the q and k heads of the fused qkv projection,
  so attention reads q, k, v as views of one buffer and no rotated copies are kept.
  Saves (nh + nkv) hd per token per layer; the backward rotates the gradient in place.
- :func:`gated_down`: ``y = linear(act(gate) * up)`` from the fused (N, 2I) gate|up
  projection, keeping only that projection: the backward recomputes ``act(gate) * up``
  in the same kernel that computes the gate/up gradient, writing both over buffers it owns
  (the gradient over the saved projection, the activation over ``dy @ W``). Saves one
  (N, I) tensor per layer and the (N, 2I) gradient buffer.

Per Llama-3-8B layer at 32k tokens (bf16) that is 18.25 H -> 11.5 H of saved activations
per token. The math is exactly the unfused composition's: the same kernels compute the
same roundings, only in a different order of buffers. Without Triton (CPU with no
interpreter, float64) each function falls back to that plain composition.

Recompute in backward follows the selective-recomputation idea of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198), here
applied only to memory-bound elementwise work, never to a matmul.
"""
from __future__ import annotations

import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels.rope import rope
from ligerzoo.kernels.rms_norm import row_settings

__all__ = ["norm_linear", "rope_qkv_", "gated_down"]

_ACT_OPS = {"silu": "swiglu", "gelu_tanh": "geglu"}

ENABLED = True
"""Set False to run the plain composition everywhere (same math, more saved activations):
for measuring what the fusions save."""


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` (..., O) as a fresh tensor, not a view (a custom function's output that is
    a view cannot be modified in place later, and the attention's RoPE is)."""
    y = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    if bias is None:
        torch.mm(_rows(x), weight.t(), out=_rows(y))
    else:
        torch.addmm(bias, _rows(x), weight.t(), out=_rows(y))
    return y


def _weight_grads(dy: torch.Tensor, x: torch.Tensor, need_w: bool, need_b: bool):
    """dW = dy^T x (O, H) and db = sum(dy) (O,) of ``y = x W^T + b`` (None where not needed)."""
    dy2 = _rows(dy)
    dw = dy2.t().mm(_rows(x)) if need_w else None
    db = dy2.sum(0) if need_b else None
    return dw, db


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, norm_weight, weight, bias, eps, offset, casting):
        if residual is not None:
            n, s, rstd = torch.ops.ligerzoo.fused_add_rms_norm(x, residual, norm_weight, eps, offset, casting)
        else:
            n, rstd = torch.ops.ligerzoo.rms_norm(x, norm_weight, eps, offset, casting, False)
            s = None
        y = _linear(n, weight, bias)                                         # (..., O)
        ctx.save_for_backward(x if s is None else s, rstd, norm_weight, weight)
        ctx.norm_args = (eps, offset, casting)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, rstd, norm_weight, weight = ctx.saved_tensors
        eps, offset, casting = ctx.norm_args
        if dy is None:
            dy = torch.zeros(*s.shape[:-1], weight.shape[0], dtype=s.dtype, device=s.device)
        need = ctx.needs_input_grad
        dw = db = None
        if need[3] or need[4]:
            n, _ = torch.ops.ligerzoo.rms_norm(s, norm_weight, eps, offset, casting, False)  # recomputed
            dw, db = _weight_grads(dy, n, need[3], need[4] and ctx.has_bias)
            del n
        dn = dy.matmul(weight)                                               # (..., H), ours to overwrite
        if ds is not None and ds.dtype != dn.dtype:
            ds = ds.to(dn.dtype)
        dnw = torch.ops.ligerzoo.rms_norm_backward_inplace(dn, s, norm_weight, rstd, offset, casting,
                                                           ds.contiguous() if ds is not None else None)
        # dn now holds d(x + residual): both summands receive it.
        return dn, (dn if ctx.has_residual else None), dnw, dw, db, None, None, None


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm, linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x``), ``y = linear(norm(s))``; returns ``(y, s)``.

    Args:
        x: (..., H) the residual stream; residual: (..., H) the branch output to add first,
            or None.
        norm: a :class:`ligerzoo.nn.RMSNorm` (its weight, eps, offset and casting mode).
        linear: an ``nn.Linear`` (H -> O), bias optional.


    Returns:
        ``y`` (..., O) and ``s`` (..., H) in ``x.dtype``; ``s`` is ``x`` itself when
        ``residual`` is None.

    The backward keeps ``s`` and ``rstd`` only and recomputes ``norm(s)`` (see module doc).
    """
    if not (ENABLED and _utils.triton_ok(x, norm.weight)):
        n, s = (norm(x), x) if residual is None else norm(x, residual)
        return linear(n), s
    row_settings(x.shape[-1])
    y, s = _NormLinear.apply(x, residual, norm.weight, linear.weight, linear.bias,
                             float(norm.eps), float(norm.offset), norm.casting_mode)
    return y, (x if s is None else s)


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q_heads, n_kv_heads):
        torch.ops.ligerzoo.rope_qkv_(qkv, cos, sin, n_q_heads, n_kv_heads, False)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_q_heads, n_kv_heads)
        return qkv

    @staticmethod
    def backward(ctx, dqkv):
        cos, sin = ctx.saved_tensors
        # The incoming gradient is the buffer autograd assembled for qkv (the q|k|v pieces of
        # the attention backward, concatenated); it is rotated back in place.
        dqkv = dqkv.contiguous() if dqkv.is_contiguous() else dqkv.clone(memory_format=torch.contiguous_format)
        torch.ops.ligerzoo.rope_qkv_(dqkv, cos, sin, *ctx.heads, True)
        return dqkv, None, None, None, None


def rope_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int,
              n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE on the q and k heads of a fused projection, in place when the kernels run.

    Args:
        qkv: (B, T, (nh + 2 nkv) hd) contiguous, rows q | k | v (the output of the fused
            projection, owned by the caller: it is overwritten).
        cos, sin: (B or 1, T, R) fp32 from :func:`ligerzoo.kernels.rope.rope_cos_sin`.
        n_q_heads, n_kv_heads: nh and nkv.

    Returns:
        ``(q, k, v)``: (B, T, nh, hd), (B, T, nkv, hd), (B, T, nkv, hd); views of ``qkv``
        when the kernels run, new tensors from :func:`ligerzoo.kernels.rope.rope` otherwise.
    """
    B, T, width = qkv.shape
    hd = width // (n_q_heads + 2 * n_kv_heads)
    sizes = [n_q_heads * hd, n_kv_heads * hd, n_kv_heads * hd]
    if ENABLED and _utils.triton_ok(qkv) and qkv.is_contiguous():
        qkv = _RopeQKV.apply(qkv, cos, sin, n_q_heads, n_kv_heads)
        q, k, v = qkv.split(sizes, dim=-1)
        return (q.view(B, T, n_q_heads, hd), k.view(B, T, n_kv_heads, hd), v.view(B, T, n_kv_heads, hd))
    q, k, v = qkv.split(sizes, dim=-1)
    q, k = rope(q.view(B, T, n_q_heads, hd), k.view(B, T, n_kv_heads, hd), cos, sin)
    return q, k, v.view(B, T, n_kv_heads, hd)


class _GatedDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight, bias, op):
        c = getattr(torch.ops.ligerzoo, f"{op}_fused")(gate_up)              # (..., I)
        y = _linear(c, weight, bias)                                         # (..., H)
        ctx.save_for_backward(gate_up, weight)
        ctx.op, ctx.has_bias = op, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_up, weight = ctx.saved_tensors
        dc = dy.matmul(weight)                                               # (..., I)
        # One kernel: gate_up <- d(gate_up), dc <- act(gate) * up (recomputed). Running the
        # backward twice therefore fails autograd's saved-tensor version check.
        getattr(torch.ops.ligerzoo, f"{ctx.op}_fused_backward_recompute_")(dc, gate_up)
        dw, db = _weight_grads(dy, dc, ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
        return gate_up, dw, db, None


def gated_down(gate_up: torch.Tensor, down, activation: str, recompute: bool = True) -> torch.Tensor:
    """``down(act(gate) * up)`` for a fused (..., 2I) projection, gate first.

    Args:
        gate_up: (..., 2I) fp32 / bf16 / fp16, contiguous, owned by the caller (the backward
            overwrites the saved tensor with its gradient).
        down: ``nn.Linear`` (I -> H), bias optional.
        activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh approximation).
        recompute: False runs ``down(act(gate) * up)`` as plain ops, which keep the
            activation output as the projection's saved input. That is the better choice
            as the last op of an activation-checkpointed block: the checkpoint's
            recomputation stops as soon as the last saved tensor is saved again, which for
            the plain ops happens before the down projection's matmul runs, while this
            function's saved tensors are only recorded after its whole forward.

    Returns:
        (..., H) in ``gate_up.dtype``.
    """
    op = _ACT_OPS[activation]
    if not (recompute and ENABLED and _utils.triton_ok(gate_up) and gate_up.is_contiguous()):
        from ligerzoo.models.moe import gated_act

        return down(gated_act(gate_up, activation))
    return _GatedDown.apply(gate_up, down.weight, down.bias, op)
