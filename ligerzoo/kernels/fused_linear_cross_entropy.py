"""Fused linear + cross entropy: the LM-head loss without materialising the (N, V) logits.

Math: ``cross_entropy(x @ weight.T + bias, target, ...)`` with every option of
:func:`ligerzoo.kernels.cross_entropy.cross_entropy` (class weights, ``ignore_index``,
label smoothing, z-loss, soft-cap, reductions). The logits are computed in ``x``'s dtype
(as Hugging Face does before upcasting in its loss) and the loss math is fp32.

Method (the chunked-loss idea of mgmalek/efficient_cross_entropy and Liger Kernel,
re-derived here): the tokens are processed ``chunk_size`` rows at a time. For a chunk::

    logits = x_c @ W.T + b                     # (C, V) in x.dtype, one reused buffer
    CE row kernel on logits                    # loss rows, lse, and d(loss)/d(logits)
                                               #   written over the chunk buffer
    dx_c  = dlogits @ W                        # (C, H)
    dW   += dlogits.T @ x_c                    # (V, H), accumulated in accum_dtype (fp32)
    db   += dlogits.sum(0)                     # (V,) fp32

For "mean" and "sum" the gradients are complete after the forward (the reduction factors
are computed from the targets first, on the device) and the backward only multiplies them
by the scalar incoming gradient, skipping that when it is exactly 1. For "none" a
per-token incoming gradient cannot be folded into ``dW`` afterwards, so the forward only
computes the loss, and the backward recomputes each chunk's logits and runs the row kernel
again with the per-row factors (both of its passes: the gradient needs the row's max and
``log(d)`` apart, not a saved ``lse`` rounded to fp32).
Peak extra memory is one (C, V) chunk plus the gradients themselves.

Without Triton (CPU without the interpreter) the same chunked loop runs with a plain-torch
twin of the row kernel, so the full logits are never materialised there either.
Measured on one H200 (N=8192, H=4096, V=128256, bf16, default chunk, forward+backward):
44 ms and 3.0 GiB above the inputs (the fp32 dW accumulator and its bf16 copy dominated;
the accumulator now narrows into its own storage, so the peak is the accumulator plus one
logits chunk: 0.49 GiB lower in the Llama-3-8B training step of benchmarks/NOTES.md),
against 54-56 ms and 11.7 GiB for torch's unfused ``F.cross_entropy((x @ W.T).float(), t)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ligerzoo._checks import is_int
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import kernel_op, ops
from ligerzoo.kernels._utils import next_power_of_2
from ligerzoo.kernels.cross_entropy import (
    _reduce,
    check_class_weight,
    check_ignore_index,
    claim_saved_grads,
    check_loss_options,
    TargetCheck,
    check_target_shape,
    cross_entropy_reference,
    launch_cross_entropy_rows,
    reduction_scales,
    scale_saved_grad,
    torch_cross_entropy_rows,
)

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_reference", "default_chunk_size"]


def default_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: a (C, V) logits chunk of about max(size of x, half the size of W).

    ``C = next_power_of_2(max(ceil(N * H / V), ceil(H / 2)))``, clipped to ``[1, N]``.
    Both bounds are tensors that already exist, so the chunk never dominates memory (the
    fp32 ``dW`` accumulator alone is 2x ``W``), while chunks of >= H/2 rows keep the
    ``dW += dlogits.T @ x_c`` GEMMs efficient: on an H200 at N=8192, H=4096, V=128256
    (bf16) forward+backward took 80 / 54 / 48 / 42 ms at C = 256 / 512 / 1024 / 2048,
    against 57 ms for torch's unfused linear + cross entropy.
    """
    rows = max(-(-n_rows * hidden // max(vocab, 1)), -(-hidden // 2), 1)
    return max(1, min(next_power_of_2(rows), n_rows))


# ------------------------------------------------------------------------ chunk loop
_OUT_DTYPE_MM: Optional[bool] = None  # whether torch.addmm(..., out_dtype=) works on CUDA


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, write: bool = False) -> None:
    """``acc += a @ b`` where ``acc`` may be fp32 while ``a``, ``b`` are bf16/fp16 (the
    product then leaves the GEMM in fp32). ``write``: ``acc = a @ b`` instead, the values of
    adding to zeros; ``acc``'s prior contents are ignored (it may hold anything), and on CUDA
    the GEMM does not read it (beta = 0: the first chunk needs no zero-filled buffer)."""
    global _OUT_DTYPE_MM
    if acc.dtype == a.dtype:
        torch.mm(a, b, out=acc) if write else acc.addmm_(a, b)
        return
    if a.is_cuda and _OUT_DTYPE_MM is not False:
        try:  # fp32 output straight from the GEMM's fp32 accumulator (torch >= 2.8)
            if write:
                torch.mm(a, b, out_dtype=acc.dtype, out=acc)
            else:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
                _OUT_DTYPE_MM = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            if not write:
                _OUT_DTYPE_MM = False
    if write:  # the accumulating forms below, onto zeros
        acc.zero_()
        _accumulate_mm(acc, a, b)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b))  # product rounded once per chunk, sum kept in acc.dtype
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _WeightGradAccumulator:
    """The (V, H) ``dW`` accumulator in ``accum_dtype``, returned in ``out_dtype`` without a
    second full-size buffer.

    When ``out_dtype`` is half the width of ``accum_dtype`` (bf16/fp16 weights, fp32
    accumulation) the rows are split in two halves held in two allocations, the first one
    exactly the byte size of the final (V, H) result. :meth:`finish` narrows the first half
    into the front of its own storage (in geometrically growing ranges, so that no copy reads
    bytes an earlier one has overwritten), then writes the second half behind it, and frees
    the second allocation: the result lives in the first allocation and no fp32 buffer and
    its cast copy ever coexist (a (V, H) cast would need 1.5x the accumulator at its end).
    Otherwise it is one buffer, cast by ``.to``.
    """

    def __init__(self, vocab: int, hidden: int, accum_dtype: torch.dtype, out_dtype: torch.dtype, device):
        self.shape, self.out_dtype = (vocab, hidden), out_dtype
        ratio = torch.empty(0, dtype=accum_dtype).element_size() // max(1, torch.empty(0, dtype=out_dtype).element_size())
        self.split = ratio == 2 and torch.empty(0, dtype=accum_dtype).element_size() == 4 and vocab >= 2
        # uninitialised: the first add_mm writes every element (no fill, and its GEMMs read nothing)
        self.written = False
        if not self.split:
            self.parts = [torch.empty((vocab, hidden), dtype=accum_dtype, device=device)]
            self.rows = [(0, vocab)]
            return
        r1 = vocab // 2
        # first allocation: room for all V*H results of the narrow dtype (= ceil(V*H / 2) wide elements)
        self.storage = torch.empty(-(-vocab * hidden // 2), dtype=accum_dtype, device=device)
        self.parts = [self.storage[: r1 * hidden].view(r1, hidden),
                      torch.empty((vocab - r1, hidden), dtype=accum_dtype, device=device)]
        self.rows = [(0, r1), (r1, vocab)]

    def add_mm(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """``dW += a @ b`` for ``a`` (V, C) (any strides), ``b`` (C, H)."""
        for part, (lo, hi) in zip(self.parts, self.rows):
            _accumulate_mm(part, a[lo:hi], b, write=not self.written)
        self.written = True

    def finish(self) -> torch.Tensor:
        """The accumulated (V, H) gradient in ``out_dtype`` (the accumulator is consumed)."""
        if not self.written:  # nothing added: zeros
            for part in self.parts:
                part.zero_()
        if not self.split:
            out = self.parts[0]
            return out if out.dtype == self.out_dtype else out.to(self.out_dtype)
        vocab, hidden = self.shape
        first, second = self.parts
        src = first.reshape(-1)                                        # (r1 H,) wide
        dst = self.storage.view(self.out_dtype)[: vocab * hidden]     # (V H,) narrow, same bytes
        n = src.numel()
        start = min(n, 1 << 16)
        dst[:start].copy_(src[:start].to(self.out_dtype))  # the front block overlaps itself: via a copy
        while start < n:  # [s, 2s): writes bytes [2s, 4s) (wide elements < s, done), reads [4s, 8s)
            end = min(2 * start, n)
            dst[start:end].copy_(src[start:end])
            start = end
        dst[n:].copy_(second.reshape(-1))  # behind it: bytes whose wide elements are all consumed
        self.parts = []
        return dst.view(vocab, hidden)


def _chunk_loop(
    x, weight, target, bias, ce_weight, scales, lse, loss_rows, z_rows, row_scale,
    ignore_index, label_smoothing, lse_square_scale, softcap,
    accum_dtype, chunk_size, need_x, need_w, need_b, grad_x_out=None,
):
    """Run the chunked forward (and/or gradient) pass. -> (grad_x, grad_w, grad_b) or Nones.
    ``grad_x_out``: an (N, H) buffer for grad_x, which may be ``x`` itself (each chunk's rows
    are read for the last time before its gradient rows are written)."""
    n_rows, hidden = x.shape
    vocab = weight.shape[0]
    compute_grad = need_x or need_w or need_b
    use_kernel = _utils.triton_ok(x)
    rows_fn = launch_cross_entropy_rows if use_kernel else torch_cross_entropy_rows
    grad_x = (grad_x_out if grad_x_out is not None else torch.empty_like(x)) if need_x else None  # (N, H)
    grad_w = _WeightGradAccumulator(vocab, hidden, accum_dtype, weight.dtype, x.device) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=x.device) if need_b else None
    if n_rows == 0:
        return grad_x, grad_w.finish() if grad_w is not None else None, grad_b
    chunk = max(1, min(int(chunk_size), n_rows))
    buf = torch.empty((chunk, vocab), dtype=x.dtype, device=x.device)              # (C, V)
    w_t = weight.t()                                                               # (H, V)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        x_c = x[start:end]                                                         # (c, H)
        logits = buf[: end - start]                                                # (c, V)
        if bias is not None:
            torch.addmm(bias, x_c, w_t, out=logits)
        else:
            torch.mm(x_c, w_t, out=logits)
        rows_fn(
            logits, target[start:end], ce_weight, scales, lse[start:end],
            loss_rows[start:end] if loss_rows is not None else None,
            z_rows[start:end] if z_rows is not None else None,
            logits if compute_grad else None,                  # dlogits over the chunk buffer
            row_scale[start:end] if row_scale is not None else None,
            ignore_index, label_smoothing, lse_square_scale, softcap,
        )
        if compute_grad:
            if need_w:  # before dx: dx may be written over x_c
                grad_w.add_mm(logits.t(), x_c)
            if need_x:
                torch.mm(logits, weight, out=grad_x[start:end])
            if need_b:
                grad_b += logits.sum(0, dtype=torch.float32)
    del buf, logits
    return grad_x, grad_w.finish() if grad_w is not None else None, grad_b


# ------------------------------------------------------------------ ops (torch.library + eager path)
def _forward(x, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
             softcap, accum_dtype, chunk_size, need_x, need_w, need_b, grad_x_out=None, scale=None):
    """The forward pass shared by the ops: -> (loss, z_loss, lse, grad_x, grad_w, grad_b),
    gradients (None where not computed) only for "mean"/"sum". ``scale``: an optional 0-d fp32
    tensor on x's device multiplying the loss and every gradient (folded into the kernels'
    reduction factors, so it costs no pass of its own)."""
    n_rows = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    scales = reduction_scales(target, ce_weight, ignore_index, reduction, weight.shape[0])
    if scale is not None:
        scales[:2] *= scale  # [ce factor, z-loss factor]
    loss_rows, lse = torch.empty(n_rows, **f32), torch.empty(n_rows, **f32)
    z_rows = torch.empty(n_rows, **f32) if lse_square_scale != 0.0 else None  # only with the z-loss
    in_fwd = reduction != "none"
    gx, gw, gb = _chunk_loop(
        x, weight, target, bias, ce_weight, scales, lse, loss_rows, z_rows, None,
        ignore_index, label_smoothing, lse_square_scale, softcap,
        accum_dtype, chunk_size, need_x and in_fwd, need_w and in_fwd, need_b and in_fwd,
        grad_x_out=grad_x_out,
    )
    loss, z_loss = _reduce(loss_rows, z_rows, scales, reduction)
    return loss, z_loss, lse, gx, gw, gb


@kernel_op("fused_linear_cross_entropy", mutates_args=())
def _flce_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor],
    ce_weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    accum_dtype: torch.dtype,
    chunk_size: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, z_loss, lse (N,), grad_x, grad_w, grad_b); a gradient not computed is empty.

    Gradients are computed here only for "mean"/"sum" (for "none" the backward op does it).
    """
    loss, z_loss, lse, gx, gw, gb = _forward(
        x, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
        softcap, accum_dtype, chunk_size, need_x, need_w, need_b)
    gx = gx if gx is not None else x.new_empty(0)
    gw = gw if gw is not None else weight.new_empty(0)  # already in weight.dtype
    gb = gb.to(bias.dtype) if gb is not None else x.new_empty(0)
    return loss, z_loss, lse, gx, gw, gb


@_flce_op.register_fake
def _(x, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
      softcap, accum_dtype, chunk_size, need_x, need_w, need_b):
    n_rows = x.shape[0]
    shape = (n_rows,) if reduction == "none" else ()
    f32 = dict(dtype=torch.float32, device=x.device)
    in_fwd = reduction != "none"
    gx = torch.empty_like(x) if (need_x and in_fwd) else x.new_empty(0)
    gw = torch.empty_like(weight) if (need_w and in_fwd) else weight.new_empty(0)
    gb = torch.empty_like(bias) if (need_b and in_fwd) else x.new_empty(0)
    return torch.empty(shape, **f32), torch.empty(shape, **f32), torch.empty(n_rows, **f32), gx, gw, gb


@kernel_op("fused_linear_cross_entropy_backward", mutates_args=())
def _flce_backward_op(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor],
    ce_weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    accum_dtype: torch.dtype,
    chunk_size: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for reduction="none": recompute each chunk's logits and run the row kernel's
    both passes again (log p = (z - max) - log(d) needs the max and log(d) apart, which an
    lse saved in fp32 would not give: see cross_entropy's module docstring)."""
    scales = reduction_scales(target, ce_weight, ignore_index, "none", weight.shape[0])
    row_scale = grad_loss.to(torch.float32).contiguous()                          # (N,)
    lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)            # rewritten, unused
    gx, gw, gb = _chunk_loop(
        x, weight, target, bias, ce_weight, scales, lse, None, None, row_scale,
        ignore_index, label_smoothing, lse_square_scale, softcap,
        accum_dtype, chunk_size, need_x, need_w, need_b,
    )
    gx = gx if gx is not None else x.new_empty(0)
    gw = gw if gw is not None else weight.new_empty(0)  # already in weight.dtype
    gb = gb.to(bias.dtype) if gb is not None else x.new_empty(0)
    return gx, gw, gb


@_flce_backward_op.register_fake
def _(grad_loss, x, weight, target, bias, ce_weight, ignore_index, label_smoothing,
      lse_square_scale, softcap, accum_dtype, chunk_size, need_x, need_w, need_b):
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    gw = torch.empty_like(weight) if need_w else weight.new_empty(0)
    gb = torch.empty_like(bias) if need_b else x.new_empty(0)
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs get no zero-filled incoming gradients
    (x, weight, target, bias, ce_weight, ignore_index, reduction, label_smoothing, lse_square_scale,
     softcap, accum_dtype, chunk_size, need_x, need_w, need_b) = inputs
    loss, z_loss, lse, gx, gw, gb = output
    ctx.mark_non_differentiable(z_loss, lse, gx, gw, gb)
    ctx.reduction = reduction
    ctx.need = (need_x, need_w, need_b)
    if reduction == "none":
        ctx.opts = (ignore_index, label_smoothing, lse_square_scale, softcap, accum_dtype, chunk_size)
        ctx.save_for_backward(x, weight, target, bias, ce_weight)
    else:
        ctx.save_for_backward(gx, gw, gb)


def _backward(ctx, grad_loss, _gz, _glse, _ggx, _ggw, _ggb):
    if grad_loss is None:
        return (None,) * 15
    want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    for w, have in zip(want, ctx.need):
        if w and not have:
            raise RuntimeError(
                "fused_linear_cross_entropy: a gradient was requested that the forward did not prepare"
            )
    if ctx.reduction == "none":
        x, weight, target, bias, ce_weight = ctx.saved_tensors
        gx, gw, gb = ops.fused_linear_cross_entropy_backward(
            grad_loss, x, weight, target, bias, ce_weight, *ctx.opts, *want
        )
    else:
        claim_saved_grads(ctx, "fused_linear_cross_entropy")
        gx, gw, gb = ctx.saved_tensors
        gx = scale_saved_grad(gx, grad_loss, False) if want[0] else None
        gw = scale_saved_grad(gw, grad_loss, False) if want[1] else None
        gb = scale_saved_grad(gb, grad_loss, False) if want[2] else None
    return (gx if want[0] else None, gw if want[1] else None, None, gb if want[2] else None,
            *([None] * 11))


ops.fused_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("fused_linear_cross_entropy_sum_", mutates_args=("x",))
def _flce_sum_inplace_op(
    x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int, softcap: Optional[float],
    accum_dtype: torch.dtype, chunk_size: int, need_w: bool, scale: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    # For callers that own x (N, H) and fold the loss into their own autograd function:
    # reduction="sum" loss (times scale), d(loss)/dx written over x, and d(loss)/dW (empty unless need_w).
    loss, _, _, _, gw, _ = _forward(x, weight, target, None, None, ignore_index, "sum", 0.0, 0.0, softcap,
                                    accum_dtype, chunk_size, True, need_w, False, grad_x_out=x, scale=scale)
    return loss, gw if gw is not None else weight.new_empty(0)


@_flce_sum_inplace_op.register_fake
def _(x, weight, target, ignore_index, softcap, accum_dtype, chunk_size, need_w, scale):
    return x.new_empty((), dtype=torch.float32), (torch.empty_like(weight) if need_w else weight.new_empty(0))


def fused_linear_cross_entropy_sum_(
    x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
    softcap: Optional[float] = None, accum_dtype: torch.dtype = torch.float32, need_w: bool = True,
    scale: Optional[float | torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross entropy of ``x @ weight.T`` with its gradients, for fused callers.

    Not differentiable itself: it returns ``(loss, grad_w)`` (fp32 0-d; (V, H) in
    ``weight.dtype`` with fp32 accumulation, empty unless ``need_w``) and writes
    ``d(loss)/dx`` over ``x``, which the caller must own (e.g. the output of its own norm).
    Same math as :func:`fused_linear_cross_entropy` with ``reduction="sum"``, times ``scale``.

    Args:
        x: (N, H) contiguous; weight: (V, H), same dtype; target: (N,) int64 with
            ``ignore_index`` entries allowed; softcap: final-logit soft-cap or None.
        scale: None, a float or a one-element tensor (a caller's ``1 / count``; a constant, no
            gradient flows to it), read on the device, never on the host (a CPU tensor with a
            CUDA ``x`` is copied over first): the loss and both gradients are multiplied by it
            inside the kernels, where a later ``* scale`` would cost a pass over each gradient.
            For fp16 ``x`` the products are taken afterwards instead (scaled before rounding
            to fp16, the small per-row gradients of a large count would underflow).

    Raises:
        ValueError: as :func:`fused_linear_cross_entropy` (shapes, dtypes, targets out of range).
            The target range check is waited on after the chunks are queued (no stall of the
            GPU before them, :class:`TargetCheck`), so on CUDA a refused call has already
            written over ``x``: it is the caller's scratch either way.
    """
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.dtype != x.dtype:
        raise ValueError(f"need x (N, H) and weight (V, H) of one dtype, got x {tuple(x.shape)} {x.dtype} and "
                         f"weight {tuple(weight.shape)} {weight.dtype}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (its gradient is written over it)")
    check_loss_options("sum", 0.0, 0.0, softcap)
    target = check_target_shape(target, x.shape[0], x.device)
    target_check = TargetCheck(target, weight.shape[0], ignore_index)  # waited on once the chunks are queued
    chunk = default_chunk_size(x.shape[0], x.shape[1], weight.shape[0])
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        raise ValueError(f"scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
    if scale is not None:  # a 0-d fp32 tensor on x's device (a float: filled there, no copy from the host)
        f32 = dict(dtype=torch.float32, device=x.device)
        scale = (scale.detach().to(**f32).reshape(()) if isinstance(scale, torch.Tensor)
                 else torch.full((), float(scale), **f32))
    after = scale if x.dtype == torch.float16 else None  # fp16: scaled after the kernels
    loss, gw = ops.fused_linear_cross_entropy_sum_(
        x, weight.contiguous(), target, ignore_index, float(softcap) if softcap is not None else None,
        accum_dtype, chunk, need_w, None if after is not None else scale)
    target_check.wait()
    if after is not None:
        loss = loss * after
        x.mul_(after)
        gw.mul_(after)
    return loss, gw


# ------------------------------------------------------------------------- reference
def fused_linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ce_weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    accum_dtype: torch.dtype = torch.float32,
    chunk_size: Optional[int] = None,
):
    """Plain-PyTorch reference: full logits ``F.linear(x, weight, bias)`` (in x.dtype), then
    :func:`cross_entropy_reference`. Differentiable by autograd; materialises (N, V).
    ``accum_dtype`` and ``chunk_size`` are accepted for signature parity and ignored.

    Arguments, shapes and dtypes as :func:`fused_linear_cross_entropy`; it does not check them as that
    function does (bad input fails in torch's own ops).
    """
    del accum_dtype, chunk_size
    logits = F.linear(x, weight, bias)                                            # (N, V)
    return cross_entropy_reference(
        logits, target, ce_weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
        return_z_loss,
    )


# ---------------------------------------------------------------------------- public
def fused_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ce_weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    accum_dtype: torch.dtype = torch.float32,
    chunk_size: Optional[int] = None,
):
    """``cross_entropy(x @ weight.T + bias, target, ...)`` without the full (N, V) logits.

    Semantics are those of :func:`ligerzoo.kernels.cross_entropy.cross_entropy` applied to
    the logits ``x @ weight.T + bias`` computed in ``x.dtype`` (as Hugging Face computes
    them in the model dtype), with fp32 loss math. See the module docstring for the
    chunked method (after mgmalek/efficient_cross_entropy and Liger Kernel's FLCE, Hsu et
    al. 2024, arXiv 2410.10989).

    Args:
        x: (N, H) hidden states, fp32 / bf16 / fp16 (float64 runs the torch reference:
            float64 logits and loss, differentiable without this op's limits).
        weight: (V, H) LM-head weight, same dtype and device as ``x``.
        target: (N,) integer class ids (int64); ``ignore_index`` rows are skipped.
        bias: optional (V,) LM-head bias, same dtype as ``x``.
        ce_weight: optional (V,) class weights (no gradient).
        ignore_index, reduction, label_smoothing, lse_square_scale, softcap, return_z_loss:
            as in ``cross_entropy``.
        accum_dtype: dtype of the ``weight`` gradient accumulator across chunks (fp32 by
            default; the result is returned in ``weight.dtype``).
        chunk_size: rows per chunk; default :func:`default_chunk_size` (a (C, V) chunk about
            the size of ``x``).

    Returns:
        ``loss`` (fp32, shape () or (N,) for "none"), or ``(loss, z_loss)`` (z_loss detached,
        already included in ``loss``).

    Under ``torch.autocast`` (on ``x``'s device type) ``x``, ``weight`` and ``bias`` are first
    cast to the autocast dtype, as autocast casts a linear layer's inputs (fp32 weights with
    bf16 activations, the usual mixed precision), and the rest runs in that dtype.

    Raises:
        ValueError: shape, dtype or device mismatches (x (N, H) vs weight (V, H), target
            (N,) integer, bias (V,), ce_weight (V,) float), non-float ``x``, an
            ``accum_dtype`` that is not a float dtype, ``chunk_size`` not an integer >= 1, options
            and ``ignore_index`` as in ``cross_entropy``, or a target outside ``[0, V)`` that is
            not ``ignore_index``.
    """
    cast = _utils.autocast_dtype(x) if x.is_floating_point() else None
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast) if weight.is_floating_point() else weight
        bias = bias.to(cast) if bias is not None and bias.is_floating_point() else bias
        with torch.autocast(x.device.type, enabled=False):
            return fused_linear_cross_entropy(x, weight, target, bias, ce_weight, ignore_index, reduction,
                                              label_smoothing, lse_square_scale, softcap, return_z_loss,
                                              accum_dtype, chunk_size)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, H), got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    n_rows, hidden = x.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hidden:
        raise ValueError(
            f"x is (N, H) = {tuple(x.shape)} but weight is (V, H) = {tuple(weight.shape)}: H differs"
        )
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise ValueError(f"x and weight must have the same dtype, got x {x.dtype} and weight {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (vocab,):
            raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias must match x's dtype/device ({x.dtype}, {x.device}), got ({bias.dtype}, {bias.device})"
            )
    if not (isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point):
        raise ValueError(f"accum_dtype must be a float torch.dtype, got {accum_dtype!r}")
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, hidden, vocab)
    elif not is_int(chunk_size) or int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    check_loss_options(reduction, label_smoothing, lse_square_scale, softcap)
    ignore_index = check_ignore_index(ignore_index)
    target = check_target_shape(target, n_rows, x.device)
    check_class_weight(ce_weight, vocab, x.device)
    target_check = TargetCheck(target, vocab, ignore_index)  # waited on once the chunks are queued
    if x.dtype == torch.float64:  # float64 all the way, as cross_entropy's float64 path
        target_check.wait()
        return fused_linear_cross_entropy_reference(
            x, weight, target, bias, ce_weight, ignore_index, reduction, float(label_smoothing),
            float(lse_square_scale), float(softcap) if softcap is not None else None, return_z_loss)

    x = x.contiguous()
    weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if ce_weight is not None:
        ce_weight = ce_weight.contiguous()
    grad_on = torch.is_grad_enabled()
    need_x = grad_on and x.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    loss, z_loss, _, _, _, _ = ops.fused_linear_cross_entropy(
        x, weight, target, bias, ce_weight, ignore_index, reduction, float(label_smoothing),
        float(lse_square_scale), float(softcap) if softcap is not None else None, accum_dtype,
        int(chunk_size), need_x, need_w, need_b,
    )
    target_check.wait()
    return (loss, z_loss.detach()) if return_z_loss else loss
