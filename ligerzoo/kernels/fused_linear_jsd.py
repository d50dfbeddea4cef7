"""Fused linear + generalised JSD: distillation loss without materialising the (N, V) logits.

Math: with ``T`` the temperature,

    student_logp = log_softmax(student_x @ student_weight.T / T)       # (N, V)
    teacher_logp = log_softmax(teacher_x @ teacher_weight.T / T)       # (N, V)
    loss = jsd(student_logp, teacher_logp, labels, beta, ignore_index)

where :func:`ligerzoo.kernels.jsd.jsd` is the generalised Jensen-Shannon divergence
(``beta = 0``: forward KL(teacher || student), ``beta = 1``: reverse KL(student ||
teacher)), averaged over the rows whose label is not ``ignore_index``. The logits are
computed in the inputs' dtype (as a model's LM head computes them) and everything after
the matmuls is fp32. No ``T ** 2`` factor is applied (multiply the loss yourself if you
want Hinton et al.'s gradient scaling). This is the semantics of Liger Kernel's
``LigerFusedLinearJSD(jsd_beta, ignore_index, temperature)``.

The teacher is a constant: no gradient flows to ``teacher_x`` or ``teacher_weight``. The
student and teacher may have different hidden sizes (and dtypes); they share ``V``.

Method (the chunked-loss scheme of ``fused_linear_cross_entropy``): ``chunk_size`` tokens
at a time::

    s = x_s[c] @ W_s.T ;  t = x_t[c] @ W_t.T           # (C, V) each, two reused buffers
    row kernel on (s, t)                                # loss per row, d(loss)/d(s) over s
    dx_s[c] = ds @ W_s                                  # (C, Hs)
    dW_s   += ds.T @ x_s[c]                             # (V, Hs), accumulated in fp32

The row kernel (one program per row, looping over ``V`` in blocks) makes three passes:
(1) online log-sum-exp of ``s / T`` and ``t / T`` (Milakov & Gimelshein 2018); (2) the
JSD terms of ``x = s/T - lse_s``, ``y = t/T - lse_t``, summed into the row loss, and
``G = sum_v dL/dx_v``; (3) the softmax-Jacobian product ``ds_v = (dL/dx_v - q_v G) / T``
(``q = exp(x)``), scaled by ``1 / n_rows_counted`` and written over the student chunk
buffer (a buffer the op owns). The gradients are complete after the forward; the backward
only multiplies them by the incoming scalar gradient (skipped when it is exactly 1).
Without Triton (CPU without the interpreter) the same chunked loop runs with a plain-torch
twin of the row kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ligerzoo._checks import check_real, is_int
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2
from ligerzoo.kernels.cross_entropy import check_ignore_index, claim_saved_grads, scale_saved_grads
from ligerzoo.kernels.fused_linear_cross_entropy import _accumulate_mm, default_chunk_size
from ligerzoo.kernels.jsd import _check_beta, check_labels, jsd_mode, jsd_pointwise_torch, jsd_reference, row_scale

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ligerzoo.kernels.jsd import jsd_terms

__all__ = ["fused_linear_jsd", "fused_linear_jsd_reference"]


# Columns a row program holds at once (module-level so tests can shrink it).
MAX_BLOCK_SIZE = 2048


# ----------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @jit
    def _fused_jsd_rows_kernel(
        S, stride_s,            # (C, V) student logits; overwritten with d(loss)/d(logits)
        T, stride_t,            # (C, V) teacher logits (read only)
        LABELS,                 # (C,) int64 (read when HAS_LABELS)
        SCALE,                  # (1,) fp32: 1 / number of counted rows in the whole batch
        LOSS,                   # (C,) fp32 out: per-row JSD (unscaled)
        n_cols, ignore_index, inv_temp, beta,
        MODE: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        S += row * stride_s
        T += row * stride_t
        offs = tl.arange(0, BLOCK_SIZE)
        if HAS_LABELS:
            if tl.load(LABELS + row) == ignore_index:
                tl.store(LOSS + row, 0.0)
                if COMPUTE_GRAD:
                    zeros = tl.zeros([BLOCK_SIZE], dtype=S.dtype.element_ty)
                    for start in range(0, n_cols, BLOCK_SIZE):
                        cols = start + offs
                        tl.store(S + cols, zeros, mask=cols < n_cols)
                return

        # ---- pass 1: log-sum-exp of both tempered rows (running max m, rescaled sum d).
        # m starts at the lowest finite fp32 so a block of -inf logits never gives inf - inf.
        m_s = tl.full([], -3.4028234663852886e38, tl.float32)
        m_t = tl.full([], -3.4028234663852886e38, tl.float32)
        d_s = tl.zeros([], dtype=tl.float32)
        d_t = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offs
            mask = cols < n_cols
            zs = tl.load(S + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            zt = tl.load(T + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            new_s = tl.maximum(m_s, tl.max(zs, axis=0))
            new_t = tl.maximum(m_t, tl.max(zt, axis=0))
            d_s = d_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(zs - new_s), axis=0)
            d_t = d_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(zt - new_t), axis=0)
            m_s = new_s
            m_t = new_t
        # log-probs are (z - m) - log(d), as torch's log_softmax: subtracting an lse rounded to
        # fp32 first shifts every log-ratio by up to ulp(m) (at logits near 60 with a student
        # 1e-2 from its teacher, the KL modes' gradient error was 5.7e-4 of its largest element)
        ld_s = tl.log(d_s)
        ld_t = tl.log(d_t)

        # ---- pass 2: the loss and G = sum_v dL/dx_v
        acc_loss = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offs
            mask = cols < n_cols
            x = (tl.load(S + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - m_s) - ld_s
            y = (tl.load(T + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - m_t) - ld_t
            loss, gx, gy = jsd_terms(x, y, beta, MODE)
            acc_loss += tl.where(mask, loss, 0.0)
            acc_g += tl.where(mask, gx, 0.0)
        tl.store(LOSS + row, tl.sum(acc_loss, axis=0))

        # ---- pass 3: d(loss)/d(logits) = (dL/dx - q * G) / T, times 1 / n_counted
        if COMPUTE_GRAD:
            g_sum = tl.sum(acc_g, axis=0)
            factor = tl.load(SCALE) * inv_temp
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + offs
                mask = cols < n_cols
                x = (tl.load(S + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - m_s) - ld_s
                y = (tl.load(T + cols, mask=mask, other=0.0).to(tl.float32) * inv_temp - m_t) - ld_t
                loss, gx, gy = jsd_terms(x, y, beta, MODE)
                ds = (gx - tl.exp(x) * g_sum) * factor
                tl.store(S + cols, ds.to(S.dtype.element_ty), mask=mask)


def _block_settings(n_cols: int) -> tuple[int, int]:
    block = min(next_power_of_2(n_cols), next_power_of_2(MAX_BLOCK_SIZE))
    return block, (8 if block >= 8192 else 4)


def _launch_rows(s, t, labels, scale, loss_rows, compute_grad, beta, ignore_index, temperature):
    """Triton row kernel on one chunk: s, t (c, V) with unit column stride."""
    n_rows, n_cols = s.shape
    if n_rows == 0:
        return
    mode = jsd_mode(beta)
    block, warps = _block_settings(n_cols)
    with device_guard(s):
        _fused_jsd_rows_kernel[(n_rows,)](
            s, s.stride(0), t, t.stride(0), labels if labels is not None else scale, scale, loss_rows,
            n_cols, ignore_index, 1.0 / temperature, float(beta),
            MODE=mode, HAS_LABELS=labels is not None, COMPUTE_GRAD=compute_grad,
            BLOCK_SIZE=block, num_warps=warps,
        )


def _torch_rows(s, t, labels, scale, loss_rows, compute_grad, beta, ignore_index, temperature):
    """Plain-torch twin of :func:`_launch_rows` (same arguments, same outputs)."""
    if s.shape[0] == 0:
        return
    x = torch.log_softmax(s.to(torch.float32) / temperature, dim=-1)              # (c, V)
    y = torch.log_softmax(t.to(torch.float32) / temperature, dim=-1)
    loss, gx, _ = jsd_pointwise_torch(x, y, beta)
    keep = labels != ignore_index if labels is not None else torch.ones_like(loss[:, 0], dtype=torch.bool)
    loss_rows.copy_(torch.where(keep, loss.sum(-1), 0.0))
    if compute_grad:
        ds = (gx - torch.exp(x) * gx.sum(-1, keepdim=True)) * (scale / temperature)
        s.copy_(torch.where(keep[:, None], ds, 0.0))


# ------------------------------------------------------------------------ chunk loop
def _chunk_loop(xs, ws, xt, wt, labels, scale, beta, ignore_index, temperature, chunk_size, need_x, need_w):
    """-> (loss_rows (N,) fp32, grad_x or None, grad_w (fp32) or None)."""
    n_rows, hidden = xs.shape
    vocab = ws.shape[0]
    use_kernel = _utils.triton_ok(xs, xt)
    rows_fn = _launch_rows if use_kernel else _torch_rows
    compute_grad = need_x or need_w
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=xs.device)
    grad_x = torch.empty_like(xs) if need_x else None                                # (N, Hs)
    grad_w = torch.empty((vocab, hidden), dtype=torch.float32, device=xs.device) if need_w else None
    if n_rows == 0:
        return loss_rows, grad_x, grad_w.zero_() if need_w else None
    chunk = max(1, min(int(chunk_size), n_rows))
    buf_s = torch.empty((chunk, vocab), dtype=xs.dtype, device=xs.device)           # (C, V)
    buf_t = torch.empty((chunk, vocab), dtype=xt.dtype, device=xt.device)           # (C, V)
    ws_t, wt_t = ws.t(), wt.t()                                                      # (Hs, V), (Ht, V)
    for start in range(0, n_rows, chunk):
        end = min(start + chunk, n_rows)
        xs_c = xs[start:end]                                                         # (c, Hs)
        s = buf_s[: end - start]                                                     # (c, V)
        t = buf_t[: end - start]
        torch.mm(xs_c, ws_t, out=s)
        torch.mm(xt[start:end], wt_t, out=t)
        rows_fn(s, t, labels[start:end] if labels is not None else None, scale, loss_rows[start:end],
                compute_grad, beta, ignore_index, temperature)
        if need_x:
            torch.mm(s, ws, out=grad_x[start:end])
        if need_w:
            _accumulate_mm(grad_w, s.t(), xs_c, write=start == 0)  # the first chunk writes: no zero fill
    return loss_rows, grad_x, grad_w


# ------------------------------------------------------------------ torch.library op
@kernel_op("fused_linear_jsd", mutates_args=())
def _fused_linear_jsd_op(
    student_x: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_x: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor],
    beta: float,
    ignore_index: int,
    temperature: float,
    chunk_size: int,
    need_x: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss fp32 (), grad_student_x or empty, grad_student_weight or empty), the
    gradients being those of ``loss`` (incoming gradient 1)."""
    scale = row_scale(labels, student_x.shape[0], ignore_index, student_x.device)   # (1,)
    loss_rows, gx, gw = _chunk_loop(
        student_x, student_weight, teacher_x, teacher_weight, labels, scale, beta, ignore_index,
        temperature, chunk_size, need_x, need_w,
    )
    loss = (loss_rows.sum() * scale).reshape(())
    gx = gx if gx is not None else student_x.new_empty(0)
    gw = gw.to(student_weight.dtype) if gw is not None else student_weight.new_empty(0)
    return loss, gx, gw


@_fused_linear_jsd_op.register_fake
def _(student_x, student_weight, teacher_x, teacher_weight, labels, beta, ignore_index, temperature,
      chunk_size, need_x, need_w):
    gx = torch.empty_like(student_x) if need_x else student_x.new_empty(0)
    gw = torch.empty_like(student_weight) if need_w else student_weight.new_empty(0)
    return student_x.new_empty((), dtype=torch.float32), gx, gw


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs get no zero-filled incoming gradients
    loss, gx, gw = output
    ctx.mark_non_differentiable(gx, gw)
    ctx.need = (inputs[9], inputs[10])
    ctx.save_for_backward(gx, gw)


def _backward(ctx, grad_loss, _ggx, _ggw):
    if grad_loss is None:
        return (None,) * 11
    claim_saved_grads(ctx, "fused_linear_jsd")  # before the saved tensors are read
    return (*scale_saved_grads(ctx, ctx.saved_tensors, grad_loss, "fused_linear_jsd"), *([None] * 9))


ops.fused_linear_jsd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- reference
def fused_linear_jsd_reference(
    student_x: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_x: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Plain-PyTorch reference: full logits in the inputs' dtype, ``log_softmax`` of
    ``logits / temperature`` in fp32, then :func:`ligerzoo.kernels.jsd.jsd_reference`.
    The teacher is detached. Differentiable by autograd; materialises (N, V).
    ``chunk_size`` is accepted for signature parity and ignored.

    Arguments, shapes and dtypes as :func:`fused_linear_jsd`; it does not check them as that
    function does (bad input fails in torch's own ops).
    """
    del chunk_size
    cdt = torch.promote_types(student_x.dtype, torch.float32)
    s = F.linear(student_x, student_weight).to(cdt) / temperature                   # (N, V)
    with torch.no_grad():
        t = F.linear(teacher_x, teacher_weight).to(torch.promote_types(teacher_x.dtype, torch.float32))
        t = t / temperature
    return jsd_reference(torch.log_softmax(s, -1), torch.log_softmax(t, -1), labels, beta, ignore_index)


# ---------------------------------------------------------------------------- public
def _check_pair(x: torch.Tensor, w: torch.Tensor, who: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{who}_x must be 2-D (N, H), got shape {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"{who}_weight must be 2-D (V, H), got shape {tuple(w.shape)}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"{who}_x is (N, H) = {tuple(x.shape)} but {who}_weight is (V, H) = {tuple(w.shape)}: H differs"
        )
    if not x.is_floating_point():
        raise ValueError(f"{who}_x must be a float tensor, got {x.dtype}")
    if w.dtype != x.dtype:
        raise ValueError(f"{who}_x and {who}_weight must have the same dtype, got {x.dtype} and {w.dtype}")
    if w.device != x.device:
        raise ValueError(f"{who}_x is on {x.device} but {who}_weight is on {w.device}")


def fused_linear_jsd(
    student_x: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_x: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Generalised JSD between student and teacher LM heads, without the (N, V) logits.

    ``jsd(log_softmax(student_x @ student_weight.T / T), log_softmax(teacher_x @
    teacher_weight.T / T), labels, beta, ignore_index)`` (see :func:`ligerzoo.kernels.jsd.jsd`
    and the module docstring; Liger Kernel's ``LigerFusedLinearJSD`` semantics, the
    generalised JSD of GKD, Agarwal et al. 2024, arXiv 2306.13649), with the logits
    computed in the inputs' dtype and fp32 math after that.

    Args:
        student_x: (N, Hs) student hidden states, fp32 / bf16 / fp16.
        student_weight: (V, Hs) student LM-head weight, same dtype and device.
        teacher_x: (N, Ht) teacher hidden states (Ht may differ from Hs).
        teacher_weight: (V, Ht) teacher LM-head weight, same dtype as ``teacher_x``.
        labels: optional (N,) integer labels; rows equal to ``ignore_index`` are dropped.
        beta: in [0, 1]; 0 = forward KL(teacher || student), 1 = reverse KL.
        ignore_index: label value of rows to drop.
        temperature: softmax temperature (> 0) applied to both logits; no ``T**2`` factor.
        chunk_size: tokens per chunk; default
            :func:`ligerzoo.kernels.fused_linear_cross_entropy.default_chunk_size`.

    Returns:
        fp32 scalar loss. Gradients flow to ``student_x`` and ``student_weight`` (the weight
        gradient accumulated in fp32 across chunks, returned in the weight's dtype); the
        teacher tensors are treated as constants. float64 inputs (both pairs) run
        :func:`fused_linear_jsd_reference` in float64 and give a float64 loss.

    Raises:
        ValueError: shape / dtype / device mismatches (x (N, H) vs weight (V, H), the two
            V's or N's differ), non-float x, labels not (N,) integer on the same device,
            beta not a number in [0, 1], temperature not a finite number > 0, ignore_index not an
            integer, chunk_size not an integer >= 1.

    Under ``torch.autocast`` the four tensors are first cast to the autocast dtype (float
    ones other than float64), as autocast casts a linear layer's inputs.
    """
    cast = _utils.autocast_dtype(student_x) if student_x.is_floating_point() else None
    if cast is not None:
        def to(t):
            return t.to(cast) if t.is_floating_point() and t.dtype != torch.float64 else t

        with torch.autocast(student_x.device.type, enabled=False):
            return fused_linear_jsd(to(student_x), to(student_weight), to(teacher_x), to(teacher_weight), labels,
                                    beta, ignore_index, temperature, chunk_size)
    _check_pair(student_x, student_weight, "student")
    _check_pair(teacher_x, teacher_weight, "teacher")
    _check_beta(beta)
    n_rows, hidden = student_x.shape
    vocab = student_weight.shape[0]
    if teacher_x.shape[0] != n_rows:
        raise ValueError(f"student_x has N={n_rows} rows but teacher_x has {teacher_x.shape[0]}")
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"student_weight has V={vocab} rows but teacher_weight has {teacher_weight.shape[0]}")
    if teacher_x.device != student_x.device:
        raise ValueError(f"student_x is on {student_x.device} but teacher_x is on {teacher_x.device}")
    if not 0.0 < check_real("temperature", temperature) < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    ignore_index = check_ignore_index(ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, max(hidden, teacher_x.shape[1]), vocab)
    elif not is_int(chunk_size) or int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    labels = check_labels(labels, n_rows, (n_rows,), student_x.device)
    if student_x.dtype == torch.float64 and teacher_x.dtype == torch.float64:  # float64 all the way
        return fused_linear_jsd_reference(student_x, student_weight, teacher_x, teacher_weight, labels,
                                          float(beta), ignore_index, float(temperature))

    grad_on = torch.is_grad_enabled()
    need_x = grad_on and student_x.requires_grad
    need_w = grad_on and student_weight.requires_grad
    loss, _, _ = ops.fused_linear_jsd(
        student_x.contiguous(), student_weight.contiguous(),
        teacher_x.detach().contiguous(), teacher_weight.detach().contiguous(),
        labels, float(beta), int(ignore_index), float(temperature), int(chunk_size), need_x, need_w,
    )
    return loss
