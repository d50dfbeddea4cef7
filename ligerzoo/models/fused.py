"""Decoder-block fusions that keep fewer activations for the backward pass.

Four autograd functions, each built from our kernels and cuBLAS matmuls:

- :func:`norm_linear`: ``s = x + residual`` (optional), ``y = linear(rms_norm(s))``. It keeps
  ``s`` (which the residual stream needs anyway) and the fp32 ``rstd`` row, not the
  normalised activations: the backward recomputes them with one forward-norm pass.
  Saves one (N, H) tensor per norm.
- :func:`rope_qkv_`: RoPE applied in place to the q and k heads of the fused qkv projection,
  so attention reads q, k, v as views of one buffer and no rotated copies are kept.
  Saves (nh + nkv) hd per token per layer; the backward rotates the gradient into a new
  buffer (the incoming one may be shared by other consumers).
- :func:`gated_down`: ``y = linear(act(gate) * up)`` from the fused (N, 2I) gate|up
  projection, keeping only that projection: the backward recomputes ``act(gate) * up``
  in the same kernel that computes the gate/up gradient, writing the activation over
  ``dy @ W`` (its own buffer) and, with ``inplace=True`` (the model's own projection), the
  gradient over the saved projection. Saves one (N, I) tensor per layer, and with
  ``inplace`` the (N, 2I) gradient buffer.

- :func:`norm_linear_cross_entropy`: the final norm, LM head and summed cross entropy; the
  loss writes its gradient over the normalised rows and the norm's backward follows in the
  same buffer, so one (N, H) buffer outlives the forward instead of three.

Per Llama-3-8B layer at 32k tokens (bf16) that is 18.25 H -> 11.5 H of saved activations
per token. The math is the unfused composition's: the block functions run the same kernels
with the same roundings (bitwise equal); :func:`norm_linear_cross_entropy` applies its
``scale`` inside the loss kernel and any other incoming gradient after the norm's backward,
so its results differ from the plain composition's in rounding order only. Each function
falls back to that plain composition without Triton (CPU with no interpreter, float64),
under autocast, and when a projection is anything but a plain, hook-free ``nn.Linear`` (an
adapter, a quantised layer, a hooked module is called, never bypassed). Second-order
gradients are refused.

Recompute in backward follows the selective-recomputation idea of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", arXiv 2205.05198), here
applied only to memory-bound elementwise work, never to a matmul.
"""
from __future__ import annotations

import torch
from torch import nn

from ligerzoo._checks import _no_hooks, plain_linear  # noqa: F401 (re-exported for the models)
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import ops
from ligerzoo.kernels.cross_entropy import claim_saved_grads, scale_saved_grad
from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_sum_
from ligerzoo.kernels.rms_norm import _check_args as _check_norm_args
from ligerzoo.kernels.rms_norm import _check_residual, row_settings
from ligerzoo.kernels.rope import _check_args as _check_rope_args
from ligerzoo.kernels.rope import rope
from ligerzoo.kernels.swiglu import _check_fused

__all__ = ["add_norm", "norm_linear", "norm_linear_cross_entropy", "rope_qkv_", "gated_down"]

_ACT_OPS = {"silu": "swiglu", "gelu_tanh": "geglu"}

ENABLED = True
"""Set False to run the plain composition everywhere (same math, more saved activations):
for measuring what the fusions save."""


def _fusable(*tensors: torch.Tensor) -> bool:
    """The fused functions run when enabled, on kernel dtypes, and outside autocast (whose
    per-op casts they would bypass: there the plain composition runs instead)."""
    return (ENABLED and _utils.triton_ok(*tensors)
            and not torch.is_autocast_enabled(tensors[0].device.type))


def _refuse_second_order(name: str) -> None:
    """Backward of backward is not implemented: raise rather than return a gradient without a
    graph (``create_graph=True`` runs the backward with grad mode on)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{name} does not support second-order gradients (create_graph=True); "
                           "set ligerzoo.models.fused.ENABLED = False for them")


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


def _promote(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both summands in their promoted dtype, as ``x + residual`` would compute (under
    autocast a bf16 branch output meets an fp32 residual stream)."""
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


def add_norm(norm, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x``) and ``norm(s)`` in one kernel; returns ``(norm(s), s)``.

    Args:
        norm: a :class:`ligerzoo.nn.RMSNorm`.
        x, residual: (..., H); ``residual`` may be None. Different dtypes are promoted first,
            as ``x + residual`` does.

    Raises:
        ValueError: ``residual`` shaped unlike ``x``, or the norm's own argument errors.
    """
    if residual is None:
        return norm(x), x
    x, residual = _promote(x, residual)
    return norm(x, residual)


class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, norm_weight, weight, bias, eps, offset, casting):
        if residual is not None:
            n, s, rstd = ops.fused_add_rms_norm(x, residual, norm_weight, eps, offset, casting)
        else:
            n, rstd = ops.rms_norm(x, norm_weight, eps, offset, casting, False)
            s = None
        y = _linear(n, weight, bias)                                         # (..., O)
        ctx.save_for_backward(x if s is None else s, rstd, norm_weight, weight)
        ctx.norm_args = (eps, offset, casting)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        _refuse_second_order("norm_linear")
        s, rstd, norm_weight, weight = ctx.saved_tensors
        eps, offset, casting = ctx.norm_args
        if dy is None:
            dy = torch.zeros(*s.shape[:-1], weight.shape[0], dtype=s.dtype, device=s.device)
        need = ctx.needs_input_grad
        dw = db = None
        if need[3] or need[4]:
            n, _ = ops.rms_norm(s, norm_weight, eps, offset, casting, False)  # recomputed
            dw, db = _weight_grads(dy, n, need[3], need[4] and ctx.has_bias)
            del n
        dn = dy.matmul(weight)                                               # (..., H), ours to overwrite
        if ds is not None and ds.dtype != dn.dtype:
            ds = ds.to(dn.dtype)
        dnw = ops.rms_norm_backward_inplace(dn, s, norm_weight, rstd, offset, casting,
                                                           ds.contiguous() if ds is not None else None)
        # dn now holds d(x + residual): both summands receive it.
        return dn, (dn if ctx.has_residual else None), dnw, dw, db, None, None, None


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm, linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (or ``x``), ``y = linear(norm(s))``; returns ``(y, s)``.

    Args:
        x: (..., H) the residual stream, fp32 / bf16 / fp16.
        residual: (..., H) the branch output to add first (promoted with ``x`` as
            ``x + residual`` would be), or None.
        norm: a :class:`ligerzoo.nn.RMSNorm` (its weight, eps, offset and casting mode).
        linear: the projection (H -> O). Fused only when it is exactly an ``nn.Linear``
            without hooks; any other module (an adapter, a quantised layer) is called.

    Returns:
        ``y`` (..., O) and ``s`` (..., H); ``s`` is ``x`` itself when ``residual`` is None.

    Raises:
        ValueError: ``residual`` shaped unlike ``x``, or the norm's argument errors (weight
            not (H,), unknown casting mode, rows too long for one block).

    Fused (Triton, outside autocast): the backward keeps ``s`` and ``rstd`` only and
    recomputes ``norm(s)`` (see module doc). Backward of backward is not supported (raises).
    """
    if residual is not None:
        x, residual = _promote(x, residual)
        _check_residual(x, residual)
    if not (_fusable(x, norm.weight) and plain_linear(linear) and _no_hooks(norm)):
        n, s = add_norm(norm, x, residual)
        return linear(n), s
    _check_norm_args(x, norm.weight, norm.casting_mode)
    row_settings(x.shape[-1])
    y, s = _NormLinear.apply(x, residual, norm.weight, linear.weight, linear.bias,
                             float(norm.eps), float(norm.offset), norm.casting_mode)
    return y, (x if s is None else s)


class _NormLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, norm_weight, weight, target, eps, offset, casting, ignore_index, softcap, scale):
        if residual is not None:
            n, s, rstd = ops.fused_add_rms_norm(x, residual, norm_weight, eps, offset, casting)
        else:
            n, rstd = ops.rms_norm(x, norm_weight, eps, offset, casting, False)
            s = x
        H = n.shape[-1]
        loss, gw = fused_linear_cross_entropy_sum_(n.view(-1, H), weight, target.reshape(-1), ignore_index,
                                                   softcap, need_w=ctx.needs_input_grad[3],
                                                   scale=scale)  # n <- d loss / d n
        dnw = ops.rms_norm_backward_inplace(n, s, norm_weight, rstd, offset, casting, None)  # n <- d s
        ctx.save_for_backward(n, dnw, gw)
        ctx.has_residual = residual is not None
        return loss

    @staticmethod
    def backward(ctx, g):
        _refuse_second_order("norm_linear_cross_entropy")
        claim_saved_grads(ctx, "norm_linear_cross_entropy")
        ds, dnw, gw = ctx.saved_tensors  # gradients of the summed loss, scaled here by g
        ds = scale_saved_grad(ds, g, False)
        gw = scale_saved_grad(gw, g, False) if ctx.needs_input_grad[3] else None
        dnw = (dnw.float() * g.float()).to(dnw.dtype) if ctx.needs_input_grad[2] else None
        return ds, (ds if ctx.has_residual else None), dnw, gw, None, None, None, None, None, None, None


def norm_linear_cross_entropy(x: torch.Tensor, residual: torch.Tensor | None, norm, weight: torch.Tensor,
                              target: torch.Tensor, ignore_index: int = -100,
                              softcap: float | None = None, scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross entropy of ``norm(x + residual) @ weight.T`` (the final norm and LM head),
    times ``scale``.

    Args:
        x: (..., H) residual stream; residual: (..., H) or None (as :func:`norm_linear`).
        norm: the final :class:`ligerzoo.nn.RMSNorm`; weight: (V, H) LM-head weight.
        target: (...) int64 targets, ``ignore_index`` entries skipped; softcap: final-logit
            soft-cap or None.
        scale: None, a float or a one-element tensor (no gradient flows to it), e.g. the
            model's ``1 / num_items_in_batch``. Fused, it is folded into the kernels' gradients,
            so ``backward()`` of the result moves no bytes to rescale them; the plain
            composition multiplies the loss by it.

    Returns:
        0-d fp32 loss summed over the counted targets, times ``scale``.

    Fused (Triton, grad mode on and something to differentiate, contiguous bf16/fp32 ``x``,
    a hook-free norm, outside autocast): :func:`ligerzoo.kernels.fused_linear_cross_entropy`'s
    chunk loop runs on the normalised rows, writes their gradient over them, and the norm's
    backward follows at once in the same buffer, so the normalised activations, their
    gradient and the norm's input are never all kept: one (N, H) buffer (the gradient of
    ``x``) outlives the forward. The gradients are those of the summed loss, scaled by the
    incoming gradient in backward (fp16 is left to the plain composition, whose earlier
    scaling keeps the norm weight's gradient in range). Otherwise the plain composition.

    Raises:
        ValueError: as :func:`norm_linear` and :func:`ligerzoo.kernels.fused_linear_cross_entropy`;
            a ``scale`` tensor of more than one element.
    """
    if residual is not None:
        x, residual = _promote(x, residual)
        _check_residual(x, residual)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        scale = scale.detach().reshape(())  # a constant: no gradient flows to it
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, norm.weight, weight))
    if not (wants_grad and _fusable(x, norm.weight, weight) and x.is_contiguous() and _no_hooks(norm)
            and x.dtype != torch.float16):
        n, _ = add_norm(norm, x, residual)
        loss = fused_linear_cross_entropy(n.reshape(-1, n.shape[-1]), weight, target.reshape(-1),
                                          ignore_index=ignore_index, reduction="sum", softcap=softcap)
        # the plain composition multiplies afterwards (the loss's backward then rescales the gradients)
        return loss if scale is None else loss * (scale.to(loss.dtype) if isinstance(scale, torch.Tensor) else scale)
    _check_norm_args(x, norm.weight, norm.casting_mode)
    row_settings(x.shape[-1])
    return _NormLinearCE.apply(x, residual, norm.weight, weight, target, float(norm.eps), float(norm.offset),
                               norm.casting_mode, int(ignore_index), softcap, scale)


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_q_heads, n_kv_heads, backward_inplace, half_table):
        ops.rope_qkv_(qkv, cos, sin, n_q_heads, n_kv_heads, False, half_table)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_q_heads, n_kv_heads)
        ctx.half_table = half_table
        ctx.backward_inplace, ctx.dtype = backward_inplace, qkv.dtype
        return qkv

    @staticmethod
    def backward(ctx, dqkv):
        _refuse_second_order("rope_qkv_")
        cos, sin = ctx.saved_tensors
        if ctx.backward_inplace and dqkv.is_contiguous() and dqkv.dtype == ctx.dtype:
            # the caller guarantees that this gradient buffer is ours (see rope_qkv_)
            ops.rope_qkv_(dqkv, cos, sin, *ctx.heads, True, ctx.half_table)
            return dqkv, None, None, None, None, None, None
        # Out of place: autograd may hand the same gradient buffer to other consumers.
        return ops.rope_qkv(dqkv, cos, sin, *ctx.heads, True, ctx.half_table), None, None, None, None, None, None


def rope_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int,
              n_kv_heads: int, inplace: bool = True, backward_inplace: bool = False, *,
              half_table: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE on the q and k heads of a fused projection, in place when the kernels run.

    Args:
        qkv: (B, T, (nh + 2 nkv) hd), rows q | k | v (the output of the fused projection,
            owned by the caller: when contiguous it is overwritten).
        cos, sin: (B or 1, T, R) fp32 from :func:`ligerzoo.kernels.rope.rope_cos_sin`;
            (B or 1, T, R/2) with ``half_table`` (as :func:`ligerzoo.kernels.rope.rope`).
        n_q_heads, n_kv_heads: nh and nkv.
        inplace: False rotates into new tensors (for a ``qkv`` someone else may hold).
        backward_inplace: with ``inplace``, the backward also rotates the incoming gradient
            of ``qkv`` in place instead of into a new (B, T, W) buffer. Only for callers that
            use nothing but the returned q, k, v afterwards (not ``qkv`` itself): the gradient
            then arrives as the fresh concatenation of dq, dk, dv that no one else holds.
            The model's attention does this; by default the backward is out of place.
        half_table: cos and sin hold only the first half of HF's tables (the model's layout).

    Returns:
        ``(q, k, v)``: (B, T, nh, hd), (B, T, nkv, hd), (B, T, nkv, hd); views of ``qkv``
        when the kernels run, new tensors from :func:`ligerzoo.kernels.rope.rope` otherwise.

    Raises:
        ValueError: ``qkv`` not 3-D or its width not a multiple of nh + 2 nkv, or cos/sin
            shaped unlike (B or 1, T, R) with R even and <= hd (R/2 with ``half_table``).
    """
    if qkv.dim() != 3 or qkv.shape[-1] % (n_q_heads + 2 * n_kv_heads):
        raise ValueError(f"qkv must be (B, T, (nh + 2 nkv) hd) with nh={n_q_heads}, nkv={n_kv_heads}, "
                         f"got shape {tuple(qkv.shape)}")
    B, T, width = qkv.shape
    hd = width // (n_q_heads + 2 * n_kv_heads)
    sizes = [n_q_heads * hd, n_kv_heads * hd, n_kv_heads * hd]
    q, k, v = qkv.split(sizes, dim=-1)
    q, k, v = q.view(B, T, n_q_heads, hd), k.view(B, T, n_kv_heads, hd), v.view(B, T, n_kv_heads, hd)
    if inplace and _fusable(qkv) and qkv.is_contiguous():
        cos, sin = _check_rope_args(q, k, cos, sin, half_table)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, cos, sin)):
            qkv = _RopeQKV.apply(qkv, cos, sin, n_q_heads, n_kv_heads, bool(backward_inplace), bool(half_table))
        else:  # no autograd node (torch.compile cannot trace mark_dirty without one)
            ops.rope_qkv_(qkv, cos, sin, n_q_heads, n_kv_heads, False, bool(half_table))
        q, k, v = qkv.split(sizes, dim=-1)
        return q.view(B, T, n_q_heads, hd), k.view(B, T, n_kv_heads, hd), v.view(B, T, n_kv_heads, hd)
    q, k = rope(q, k, cos, sin, half_table=half_table)
    return q, k, v


class _GatedDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight, bias, op, inplace):
        c = getattr(ops, f"{op}_fused")(gate_up, False)       # (..., I)
        y = _linear(c, weight, bias)                                         # (..., H)
        ctx.save_for_backward(gate_up, weight)
        ctx.op, ctx.has_bias, ctx.inplace = op, bias is not None, inplace
        return y

    @staticmethod
    def backward(ctx, dy):
        _refuse_second_order("gated_down")
        gate_up, weight = ctx.saved_tensors
        dc = dy.matmul(weight)                                               # (..., I)
        # One kernel: d(gate_up) and, over dc, the recomputed act(gate) * up. In place over
        # the saved gate_up when the caller said it owns it (then a second backward fails
        # autograd's saved-tensor version check).
        if ctx.inplace:
            getattr(ops, f"{ctx.op}_fused_backward_recompute_")(dc, gate_up)
            d_gate_up = gate_up
        else:
            d_gate_up = getattr(ops, f"{ctx.op}_fused_backward_recompute")(dc, gate_up)
        dw, db = _weight_grads(dy, dc, ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
        return d_gate_up, dw, db, None, None


class _GatedActInplaceBackward(torch.autograd.Function):
    """``act(gate) * up`` whose backward writes d(gate_up) over the saved gate_up."""

    @staticmethod
    def forward(ctx, gate_up, op):
        ctx.save_for_backward(gate_up)
        ctx.op = op
        return getattr(ops, f"{op}_fused")(gate_up, False)                   # (..., I)

    @staticmethod
    def backward(ctx, dc):
        _refuse_second_order("gated_down")
        (gate_up,) = ctx.saved_tensors
        getattr(ops, f"{ctx.op}_fused_backward_")(dc.contiguous(), gate_up)  # gate_up <- d(gate_up)
        return gate_up, None


def gated_down(gate_up: torch.Tensor, down, activation: str, recompute: bool = True,
               inplace: bool = False) -> torch.Tensor:
    """``down(act(gate) * up)`` for a fused (..., 2I) projection, gate first.

    Args:
        gate_up: (..., 2I) fp32 / bf16 / fp16.
        down: the projection (I -> H). Fused only when it is exactly an ``nn.Linear`` without
            hooks; any other module is called on ``act(gate) * up``.
        activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, tanh approximation).
        recompute: True keeps only ``gate_up`` for the backward and recomputes
            ``act(gate) * up`` there. False runs ``down(act(gate) * up)`` as plain ops, which
            keep the activation output as the projection's saved input. That is the better
            choice as the last op of an activation-checkpointed block: the checkpoint's
            recomputation stops as soon as the last saved tensor is saved again, which for
            the plain ops happens before the down projection's matmul runs, while this
            function's saved tensors are only recorded after its whole forward.
        inplace: the backward writes the gradient of ``gate_up`` over the saved ``gate_up``
            itself (one (..., 2I) buffer less), with or without ``recompute``. Only for a
            ``gate_up`` that nothing else reads after the forward (the model's own projection
            output).

    Returns:
        (..., H) in ``gate_up.dtype``.

    Raises:
        ValueError: unknown ``activation``, or an odd last dim.
    """
    if activation not in _ACT_OPS:
        raise ValueError(f"activation must be one of {sorted(_ACT_OPS)}, got {activation!r}")
    _check_fused(gate_up)
    if not (recompute and _fusable(gate_up) and gate_up.is_contiguous() and plain_linear(down)):
        if inplace and _fusable(gate_up) and gate_up.is_contiguous():
            return down(_GatedActInplaceBackward.apply(gate_up, _ACT_OPS[activation]))
        from ligerzoo.models.moe import gated_act

        return down(gated_act(gate_up, activation))
    return _GatedDown.apply(gate_up, down.weight, down.bias, _ACT_OPS[activation], bool(inplace))
