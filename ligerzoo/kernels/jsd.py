"""Generalised Jensen-Shannon divergence between a student and a teacher distribution.

Math. Inputs are log-probabilities over ``V`` classes: ``x = log q`` (student, the
prediction) and ``y = log p`` (teacher, the target). For ``0 < beta < 1`` the mixture
``m = beta * p + (1 - beta) * q`` defines, per row::

    jsd_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)
             = sum_v beta * p_v (y_v - log m_v) + (1 - beta) * q_v (x_v - log m_v)

(beta = 0.5 is the symmetric Jensen-Shannon divergence, Lin 1991; the ``beta`` weighting
is the generalised JSD of Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes" (GKD), whose TRL implementation defines
the end points below.) The end points are the two KL directions, not the limits of the
formula (which vanish)::

    beta = 0:  KL(p || q) = sum_v p_v (y_v - x_v)        forward KL(teacher || student)
    beta = 1:  KL(q || p) = sum_v q_v (x_v - y_v)        reverse KL(student || teacher)

This is the semantics of Liger Kernel's ``LigerJSD(beta, ignore_index)``. The loss is the
mean over rows: the sum of per-row values divided by the number of rows whose label is
not ``ignore_index`` (all rows without labels). Ignored rows contribute nothing; a batch
whose rows are all ignored gives loss 0 and zero gradients.

Gradients (``q = exp(x)``, ``p = exp(y)``; each times ``1 / n_rows_counted``)::

    0 < beta < 1:  dx = (1 - beta) q (x - log m)       dy = beta p (y - log m)
    beta = 0:      dx = -p                             dy = p (y - x + 1)
    beta = 1:      dx = q (x - y + 1)                  dy = -q

(partial derivatives with respect to the log-probabilities, treating them as free
inputs, as autograd does). The log-ratios are evaluated from ``d = x - y`` alone::

    d <= 0:  y - log m = -log(beta + (1 - beta) e^d),        x - log m = d + (y - log m)
    d >  0:  x - log m = -log((1 - beta) + beta e^-d),       y - log m = (x - log m) - d

so they stay finite when ``p`` and ``q`` underflow, and carry no rounding error of the
size of ``|log m|`` (forming ``log m`` itself, about ``-log V``, and subtracting it loses
~``|log m|`` ulps in each term, which the cancellation in the sum then magnifies). Terms
whose weight ``p_v`` or ``q_v`` is exactly 0 (e.g. ``-inf`` log-probabilities of masked
classes) contribute 0 to the loss and the gradient (the ``0 log 0 = 0`` limit).

Kernel: a 2-D grid of (row, block of columns) programs. Each loads its block of ``x`` and
``y`` (own dtypes, fp32 math), writes the fp32 sum of its loss terms into an
(N, n_blocks) partial buffer (summed afterwards: deterministic) and, when gradients are
wanted, the gradient(s) already scaled by ``1 / n_rows_counted``. The gradient is made in
the forward (one read of the inputs in total); the backward only multiplies it by the
incoming scalar gradient, skipping that when it is exactly 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from ligerzoo._checks import check_real
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2
from ligerzoo.kernels.cross_entropy import check_ignore_index, claim_saved_grads, scale_saved_grads

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["jsd", "jsd_reference"]


# Columns per program (module-level so tests can shrink it below the row length).
MAX_BLOCK_SIZE = 2048

# Which formula: the two KL end points and the mixture in between (a kernel constexpr).
MODE_FORWARD_KL, MODE_REVERSE_KL, MODE_MIXTURE = 0, 1, 2


def jsd_mode(beta: float) -> int:
    """The kernel's formula for ``beta`` in [0, 1]: the two KL end points or the mixture."""
    if beta == 0.0:
        return MODE_FORWARD_KL
    if beta == 1.0:
        return MODE_REVERSE_KL
    return MODE_MIXTURE


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def jsd_terms(x, y, beta, MODE: tl.constexpr):
        """fp32 loss terms and d/dx, d/dy for student log-probs x and teacher log-probs y."""
        if MODE == 0:  # forward KL(p || q)
            p = tl.exp(y)
            d = y - x
            loss = tl.where(p > 0.0, p * d, 0.0)
            gx = -p
            gy = tl.where(p > 0.0, p * (d + 1.0), 0.0)
        elif MODE == 1:  # reverse KL(q || p)
            q = tl.exp(x)
            d = x - y
            loss = tl.where(q > 0.0, q * d, 0.0)
            gx = tl.where(q > 0.0, q * (d + 1.0), 0.0)
            gy = -q
        else:
            p = tl.exp(y)
            q = tl.exp(x)
            d = x - y
            e = tl.exp(-tl.abs(d))
            neg = d <= 0.0
            lg = tl.log(tl.where(neg, beta + (1.0 - beta) * e, (1.0 - beta) + beta * e))
            ym = tl.where(neg, -lg, -d - lg)          # y - log m
            xm = tl.where(neg, d - lg, -lg)           # x - log m
            tp = tl.where(p > 0.0, p * ym, 0.0)
            tq = tl.where(q > 0.0, q * xm, 0.0)
            gy = beta * tp
            gx = (1.0 - beta) * tq
            loss = gy + gx
        return loss, gx, gy

    @jit
    def _jsd_kernel(
        X, stride_x,            # (N, V) student log-probs
        Y, stride_y,            # (N, V) teacher log-probs
        LABELS,                 # (N,) int64 (read when HAS_LABELS)
        SCALE,                  # (1,) fp32: 1 / number of counted rows (0 when none)
        PARTIAL,                # (N, n_blocks) fp32 out: block sums of the loss terms
        DX, stride_dx,          # (N, V) out: d(loss)/dx (when NEED_DX)
        DY, stride_dy,          # (N, V) out: d(loss)/dy (when NEED_DY)
        n_cols, n_blocks, ignore_index, beta,
        MODE: tl.constexpr,
        HAS_LABELS: tl.constexpr,
        NEED_DX: tl.constexpr,
        NEED_DY: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        cols = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        if HAS_LABELS:
            if tl.load(LABELS + row) == ignore_index:
                tl.store(PARTIAL + row * n_blocks + blk, 0.0)
                if NEED_DX:
                    tl.store(DX + row * stride_dx + cols,
                             tl.zeros([BLOCK_SIZE], dtype=DX.dtype.element_ty), mask=mask)
                if NEED_DY:
                    tl.store(DY + row * stride_dy + cols,
                             tl.zeros([BLOCK_SIZE], dtype=DY.dtype.element_ty), mask=mask)
                return
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        loss, gx, gy = jsd_terms(x, y, beta, MODE)
        tl.store(PARTIAL + row * n_blocks + blk, tl.sum(tl.where(mask, loss, 0.0), axis=0))
        if NEED_DX or NEED_DY:
            scale = tl.load(SCALE)
            if NEED_DX:
                tl.store(DX + row * stride_dx + cols, (gx * scale).to(DX.dtype.element_ty), mask=mask)
            if NEED_DY:
                tl.store(DY + row * stride_dy + cols, (gy * scale).to(DY.dtype.element_ty), mask=mask)


def _block_settings(n_cols: int) -> tuple[int, int]:
    block = min(next_power_of_2(n_cols), next_power_of_2(MAX_BLOCK_SIZE))
    return block, (8 if block >= 2048 else 4)


def row_scale(labels: Optional[torch.Tensor], n_rows: int, ignore_index: int, device) -> torch.Tensor:
    """(1,) fp32 on the device: 1 / (rows whose label != ignore_index), 0 when there are none.

    Without labels every row counts. Computed on the device (no host sync)."""
    if labels is None:
        return torch.full((1,), 1.0 / n_rows if n_rows else 0.0, dtype=torch.float32, device=device)
    count = (labels != ignore_index).sum().to(torch.float32).reshape(1)
    return torch.where(count > 0, 1.0 / count.clamp(min=1.0), 0.0)


# ------------------------------------------------------------------ ops (torch.library + eager path)
@kernel_op("jsd", mutates_args=())
def _jsd_op(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    labels: Optional[torch.Tensor],
    beta: float,
    ignore_index: int,
    need_student: bool,
    need_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V) inputs with unit column stride -> (loss fp32 (), grad_student or empty,
    grad_teacher or empty); the gradients are those of ``loss`` (incoming gradient 1)."""
    n_rows, n_cols = student_logp.shape
    device = student_logp.device
    mode = jsd_mode(beta)
    block, warps = _block_settings(n_cols)
    n_blocks = cdiv(n_cols, block) if n_cols else 0
    scale = row_scale(labels, n_rows, ignore_index, device)
    partial = torch.zeros((n_rows, n_blocks), dtype=torch.float32, device=device)
    gs = torch.empty((n_rows, n_cols), dtype=student_logp.dtype, device=device) if need_student else None
    gt = torch.empty((n_rows, n_cols), dtype=teacher_logp.dtype, device=device) if need_teacher else None
    if student_logp.numel():
        dummy = partial
        with device_guard(student_logp):
            _jsd_kernel[(n_rows, n_blocks)](
                student_logp, student_logp.stride(0), teacher_logp, teacher_logp.stride(0),
                labels if labels is not None else scale, scale, partial,
                gs if gs is not None else dummy, gs.stride(0) if gs is not None else 0,
                gt if gt is not None else dummy, gt.stride(0) if gt is not None else 0,
                n_cols, n_blocks, ignore_index, float(beta),
                MODE=mode, HAS_LABELS=labels is not None, NEED_DX=need_student, NEED_DY=need_teacher,
                BLOCK_SIZE=block, num_warps=warps,
            )
    loss = (partial.sum() * scale).reshape(())
    return (loss, gs if gs is not None else student_logp.new_empty(0),
            gt if gt is not None else teacher_logp.new_empty(0))


@_jsd_op.register_fake
def _(student_logp, teacher_logp, labels, beta, ignore_index, need_student, need_teacher):
    gs = torch.empty_like(student_logp, memory_format=torch.contiguous_format) if need_student \
        else student_logp.new_empty(0)
    gt = torch.empty_like(teacher_logp, memory_format=torch.contiguous_format) if need_teacher \
        else teacher_logp.new_empty(0)
    return student_logp.new_empty((), dtype=torch.float32), gs, gt


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs get no zero-filled incoming gradients
    loss, gs, gt = output
    ctx.mark_non_differentiable(gs, gt)
    ctx.need = (inputs[5], inputs[6])
    ctx.save_for_backward(gs, gt)


def _backward(ctx, grad_loss, _ggs, _ggt):
    if grad_loss is None:
        return (None,) * 7
    claim_saved_grads(ctx, "jsd")  # before the saved tensors are read
    return (*scale_saved_grads(ctx, ctx.saved_tensors, grad_loss, "jsd"), None, None, None, None, None)


ops.jsd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- reference
def mixture_log_ratios(x: torch.Tensor, y: torch.Tensor, beta: float):
    """``(x - log m, y - log m)`` for ``m = beta e^y + (1 - beta) e^x`` in plain torch, from
    ``d = x - y`` as in the kernel (see the module docstring). Finite for finite inputs, so
    autograd through it is NaN-free."""
    d = x - y
    neg = d <= 0
    e = torch.exp(torch.where(neg, d, -d))  # exp(-|d|), with the right derivative at d == 0
    lg = torch.log(torch.where(neg, beta + (1.0 - beta) * e, (1.0 - beta) + beta * e))
    return torch.where(neg, d - lg, -lg), torch.where(neg, -lg, -d - lg)


def jsd_pointwise_torch(x: torch.Tensor, y: torch.Tensor, beta: float):
    """Plain-torch twin of the kernel's ``jsd_terms`` (explicit formulas, no autograd):
    fp32 (or float64) ``(loss terms, d/dx, d/dy)`` for log-probs ``x`` (student), ``y``."""
    mode = jsd_mode(beta)
    if mode == MODE_FORWARD_KL:
        p = torch.exp(y)
        d = y - x
        return torch.where(p > 0, p * d, 0.0), -p, torch.where(p > 0, p * (d + 1.0), 0.0)
    if mode == MODE_REVERSE_KL:
        q = torch.exp(x)
        d = x - y
        return torch.where(q > 0, q * d, 0.0), torch.where(q > 0, q * (d + 1.0), 0.0), -q
    p = torch.exp(y)
    q = torch.exp(x)
    xm, ym = mixture_log_ratios(x, y, beta)
    tp = torch.where(p > 0, p * ym, 0.0)
    tq = torch.where(q > 0, q * xm, 0.0)
    return beta * tp + (1.0 - beta) * tq, (1.0 - beta) * tq, beta * tp


def jsd_reference(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Plain-PyTorch :func:`jsd` (same semantics), differentiable by torch autograd with
    respect to both inputs. Math in ``promote(inputs, float32)``; returns that dtype.

    ``-inf`` log-probabilities follow the kernel's ``0 log 0 = 0`` convention: a term whose
    weight (``exp`` of the log-probability it is taken under) is 0 adds nothing, with zero
    gradients; under the KL modes (beta 0 or 1) a zero probability where the other
    distribution has mass gives ``inf``, as the kernel does (d/dx of ``p (y - x)`` stays
    ``-p``). For 0 < beta < 1 (finite for any inputs) they are clamped to -1e30, which gives
    the same values with finite gradients.

    Arguments, shapes and dtypes as :func:`jsd`; it checks ``beta`` only (other bad
    input fails in torch's own ops).
    """
    _check_beta(beta)
    cdt = torch.promote_types(torch.promote_types(student_logp.dtype, teacher_logp.dtype), torch.float32)
    n_cols = student_logp.shape[-1]
    x = _utils.as_rows(student_logp, n_cols).to(cdt)                             # (N, V)
    y = _utils.as_rows(teacher_logp, n_cols).to(cdt)
    keep = None if labels is None else labels.reshape(-1) != ignore_index                  # (N,)
    mode = jsd_mode(beta)
    if mode in (MODE_FORWARD_KL, MODE_REVERSE_KL):
        # KL(P || Q) = sum p (a - b) with (p, a, b) = (e^y, y, x) forward, (e^x, x, y) reverse;
        # both log-probs are replaced where p == 0 and in ignored rows, so that no inf (an
        # infinite KL's gradient) or NaN reaches autograd
        a, b = (y, x) if mode == MODE_FORWARD_KL else (x, y)
        p = torch.exp(a)
        has = p > 0 if keep is None else (p > 0) & keep[:, None]
        rows = torch.where(has, p * (torch.where(has, a, 0.0) - torch.where(has, b, 0.0)), 0.0).sum(-1)  # (N,)
    else:
        x, y = x.clamp(min=-1e30), y.clamp(min=-1e30)
        xm, ym = mixture_log_ratios(x, y, beta)
        rows = (beta * torch.exp(y) * ym + (1.0 - beta) * torch.exp(x) * xm).sum(-1)
    if keep is None:
        return rows.sum() / max(rows.shape[0], 1)
    return torch.where(keep, rows, 0.0).sum() / keep.sum().clamp(min=1)


# ---------------------------------------------------------------------------- public
def _check_beta(beta: float) -> None:
    if not 0.0 <= check_real("beta", beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def check_labels(labels: Optional[torch.Tensor], n_rows: int, lead_shape, device) -> Optional[torch.Tensor]:
    """Validate labels of shape ``lead_shape`` (or (N,)); -> (N,) int64 contiguous or None."""
    if labels is None:
        return None
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (any integer dtype, used as int64), got {labels.dtype}")
    if tuple(labels.shape) not in (tuple(lead_shape), (n_rows,)):
        raise ValueError(f"labels must have shape {tuple(lead_shape)}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device}, expected {device}")
    return labels.reshape(-1).to(torch.int64).contiguous()


def jsd(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence loss for distillation (fp32 math).

    Per row ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta)
    * q``, ``q = exp(student_logp)``, ``p = exp(teacher_logp)``; ``beta = 0`` is the forward
    KL(teacher || student) and ``beta = 1`` the reverse KL(student || teacher). Averaged
    over the rows whose label is not ``ignore_index`` (over all rows without labels); an
    all-ignored batch gives 0 and zero gradients. Semantics of Liger Kernel's ``LigerJSD``
    (after GKD, Agarwal et al. 2024, arXiv 2306.13649; the end points are special-cased,
    not limits); see the module docstring for the formulas.

    Args:
        student_logp: (N, V) (or (..., V)) student log-probabilities (``log_softmax``
            output), fp32 / bf16 / fp16 (float64 runs the torch reference); any strides.
        teacher_logp: teacher log-probabilities, same shape and device; any float dtype.
        labels: optional (N,) (or (...)) integer labels; only compared with
            ``ignore_index`` to drop rows (e.g. the shifted LM labels).
        beta: in [0, 1].
        ignore_index: label value of rows to drop.

    Returns:
        fp32 scalar loss (float64 when either input is float64: the torch reference).
        Gradients flow to ``student_logp`` and, if it requires grad, to ``teacher_logp``
        (each in its own dtype).

    Raises:
        ValueError: inputs with fewer than 2 dims, shape / device mismatch, non-float
            inputs, labels not integer / not of the rows' shape / on another device, beta
            not a number in [0, 1], ignore_index not an integer.
    """
    _check_beta(beta)
    if student_logp.dim() < 2:
        raise ValueError(f"student_logp must be (N, V) or (..., V), got shape {tuple(student_logp.shape)}")
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(
            f"student_logp {tuple(student_logp.shape)} and teacher_logp {tuple(teacher_logp.shape)} "
            "must have the same shape"
        )
    if not (student_logp.is_floating_point() and teacher_logp.is_floating_point()):
        raise ValueError(
            f"student_logp and teacher_logp must be float tensors, got {student_logp.dtype} and "
            f"{teacher_logp.dtype}"
        )
    if teacher_logp.device != student_logp.device:
        raise ValueError(f"student_logp is on {student_logp.device} but teacher_logp is on {teacher_logp.device}")
    n_cols = student_logp.shape[-1]
    n_rows = student_logp.numel() // n_cols if n_cols else student_logp.shape[:-1].numel()
    labels = check_labels(labels, n_rows, student_logp.shape[:-1], student_logp.device)
    ignore_index = check_ignore_index(ignore_index)
    beta = float(beta)
    if not _utils.triton_ok(student_logp, teacher_logp):
        return jsd_reference(student_logp, teacher_logp, labels, beta, ignore_index)

    grad_on = torch.is_grad_enabled()
    loss, _, _ = ops.jsd(
        _utils.as_rows(student_logp, n_cols), _utils.as_rows(teacher_logp, n_cols), labels, beta, int(ignore_index),
        grad_on and student_logp.requires_grad, grad_on and teacher_logp.requires_grad,
    )
    return loss
