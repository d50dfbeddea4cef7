"""Cross entropy over a vocabulary, with label smoothing, z-loss and logit soft-capping.

Math. For one row of logits ``x`` (length ``V``) with target class ``t``, optional class
weights ``w`` (``w_c = 1`` when absent), label smoothing ``eps``, z-loss scale ``s`` and
soft-cap ``c``::

    z      = c * tanh(x / c)           (z = x without a soft-cap; Gemma-2 style capping)
    lse    = log(sum_c exp(z_c))
    ce     = (1 - eps) * w_t * (lse - z_t) + (eps / V) * sum_c w_c * (lse - z_c)
    zloss  = s * lse ** 2              (the PaLM / ST-MoE "z-loss", Chowdhery et al. 2022)
    loss   = ce + zloss

``ce`` is exactly ``torch.nn.functional.cross_entropy(z, t, weight, label_smoothing=eps)``
for one row (Szegedy et al. 2016 for the smoothing). Rows whose target equals
``ignore_index`` contribute nothing. Reductions:

- ``"none"``: the per-row ``loss`` (0 on ignored rows).
- ``"sum"``:  the sum over rows.
- ``"mean"``: ``sum(ce) / sum_i w_{t_i}`` (over non-ignored rows, as torch does) plus
  ``sum(zloss) / n_non_ignored``: the z-loss is a per-token regulariser of ``lse`` and is
  averaged over tokens, not weighted by class. When every row is ignored the loss and
  every gradient are 0 (torch would give NaN).

The gradient with respect to ``z`` (then times ``dz/dx = 1 - (z / c) ** 2``) is::

    dce/dz_c   = (1 - eps) * w_t * (p_c - [c == t]) + (eps / V) * (W * p_c - w_c)
    dzloss/dz_c = 2 * s * lse * p_c,        p = softmax(z),  W = sum_c w_c

Kernel (after the online-softmax idea of Milakov & Gimelshein, 2018): one program per row
loops over ``V`` in blocks twice: pass 1 keeps a running (max, sum of exp) to get
``lse``; pass 2 writes ``d(loss)/d(logits)`` in fp32 math, cast to the logits dtype. Both
take ``log p_c = (z_c - max) - log(d)`` with the max and ``log(d)`` apart, as torch's
``log_softmax`` does, never ``z_c - lse`` with ``lse`` rounded to fp32 first: at logits
near 40 that rounding (up to 2e-6) is more than a confident row's loss. The
gradient is produced in the forward (the logits are never needed again), and the
backward only rescales it by the incoming gradient (a no-op when that is exactly 1).
With ``inplace=True`` the gradient is written over the caller's logits buffer, so no
second ``(N, V)`` tensor is allocated (unless elements of the logits share memory: then
a fresh buffer is used, as rms_norm's ``inplace`` and rope's ``backward_inplace`` do).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ligerzoo._checks import check_real, is_int
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["cross_entropy", "cross_entropy_reference"]

REDUCTIONS = ("mean", "sum", "none")

# Largest block of columns one program holds at once (module-level so tests can shrink it
# to exercise the multi-block loop at small vocabularies). On an H200, over (8192, 128256)
# bf16, the lse pass alone ran at ~3.8-4.0 TB/s with 2048-4096 columns x 4 warps per
# program against ~3.0 TB/s with 16384 x 32 (many small programs per SM hide the per-block
# reductions), and forward+backward with every option on was fastest at 2048.
MAX_BLOCK_SIZE = 2048


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _tanh_f32(x):
        """fp32 tanh to ~1 ulp: odd Taylor polynomial for |x| < 0.5, exp form elsewhere.

        (libdevice's tanh is not available under the interpreter, and ``1 - 2/(e^2x + 1)``
        alone loses relative precision near 0.)
        """
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        big = (1.0 - e) / (1.0 + e)
        x2 = ax * ax
        p = 0.000590027440945586
        p = p * x2 - 0.0014558343870513183
        p = p * x2 + 0.003592128036572481
        p = p * x2 - 0.008863235529902197
        p = p * x2 + 0.021869488536155203
        p = p * x2 - 0.05396825396825397
        p = p * x2 + 0.13333333333333333
        p = p * x2 - 0.3333333333333333
        small = ax + ax * x2 * p
        t = tl.where(ax < 0.5, small, big)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _grad_coefs(ce_f, z_f, keep, eps_v, w_t, w_all, lse, lse_square_scale,
                    HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
        """(coef_p, coef_t) of the gradient ``coef_p * p_c - [c == t] * coef_t - ce_f * eps_v * w_c``
        (module docstring), from the row's reduction factors ``ce_f`` / ``z_f`` (row scale
        applied), the target's class weight ``w_t`` and the sum of class weights ``w_all``.
        Plain arithmetic: the Hopper kernel (Gluon) calls it too."""
        coef_p = ce_f * keep * w_t
        if HAS_SMOOTHING:
            coef_p += ce_f * eps_v * w_all
        if HAS_ZLOSS:
            coef_p += z_f * 2.0 * lse_square_scale * lse
        return coef_p, ce_f * keep * w_t

    @jit
    def _cross_entropy_kernel(
        X, stride_x,            # (N, V) logits rows (any float dtype)
        DX, stride_dx,          # (N, V) out: d(loss)/d(logits) (may be X itself)
        TARGET,                 # (N,) int64
        CLASS_W,                # (V,) class weights (read only when HAS_WEIGHT)
        LOSS,                   # (N,) fp32 out: unreduced ce per row
        ZLOSS,                  # (N,) fp32 out: unreduced z-loss per row (only when HAS_ZLOSS)
        LSE,                    # (N,) fp32 out: log-sum-exp of z
        SCALES,                 # (3,) fp32: [ce factor, z-loss factor, sum of class weights]
        ROW_SCALE,              # (N,) fp32 per-row gradient factor (read when HAS_ROW_SCALE)
        GUARD,                  # (1,) int64: the first bad target's row, or N (read when HAS_GUARD)
        n_rows, n_cols, ignore_index,
        label_smoothing, lse_square_scale, softcap,
        HAS_WEIGHT: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_SMOOTHING: tl.constexpr,
        HAS_ZLOSS: tl.constexpr,
        COMPUTE_LOSS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        HAS_ROW_SCALE: tl.constexpr,
        HAS_GUARD: tl.constexpr,        # write nothing when GUARD names a row (a bad target)
        BLOCK_SIZE: tl.constexpr,
    ):
        if HAS_GUARD:
            if tl.load(GUARD) < n_rows:
                return
        row = tl.program_id(0).to(tl.int64)
        X += row * stride_x
        DX += row * stride_dx
        offs = tl.arange(0, BLOCK_SIZE)
        target = tl.load(TARGET + row)

        if target == ignore_index:
            if COMPUTE_LOSS:
                tl.store(LOSS + row, 0.0)
                tl.store(ZLOSS + row, 0.0)
            tl.store(LSE + row, 0.0)
            if COMPUTE_GRAD:
                zeros = tl.zeros([BLOCK_SIZE], dtype=DX.dtype.element_ty)
                for start in range(0, n_cols, BLOCK_SIZE):
                    cols = start + offs
                    tl.store(DX + cols, zeros, mask=cols < n_cols)
            return

        # An out-of-range target (only possible when the Python check was skipped under
        # torch.compile) reads column 0 and makes the row's loss NaN instead of faulting.
        valid = (target >= 0) & (target < n_cols)
        safe_t = tl.where(valid, target, 0)

        # ---- pass 1: lse = m + log(d) with a running max m and rescaled sum d. The loss and
        # the gradient use m and log(d) apart, as torch's log_softmax does: lse rounded to fp32
        # at |m| ~ 40 is off by up to 2e-6, more than a confident row's whole loss (session 26)
        # m starts at the lowest finite fp32: a block of -inf logits (a masked vocabulary)
        # then adds exp(-inf) = 0 to d instead of exp(-inf - -inf) = NaN
        m = tl.full([], -3.4028234663852886e38, tl.float32)
        d = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offs
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                x = softcap * _tanh_f32(x / softcap)
            x = tl.where(mask, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        log_d = tl.log(d)
        lse = m + log_d
        tl.store(LSE + row, lse)

        if HAS_WEIGHT:
            w_t = tl.load(CLASS_W + safe_t).to(tl.float32)
        else:
            w_t = 1.0
        keep = 1.0 - label_smoothing          # weight of the one-hot part
        eps_v = label_smoothing / n_cols      # weight of the uniform part

        if COMPUTE_LOSS:  # read before pass 2, which may overwrite X with the gradient
            z_t = tl.load(X + safe_t).to(tl.float32)
            if HAS_SOFTCAP:
                z_t = softcap * _tanh_f32(z_t / softcap)

        # ---- pass 2: the gradient (and the smoothing term of the loss, which needs lse)
        smooth = tl.zeros([], dtype=tl.float32)
        if COMPUTE_GRAD or (COMPUTE_LOSS and HAS_SMOOTHING):
            ce_f = tl.load(SCALES)
            z_f = tl.load(SCALES + 1)
            if HAS_ROW_SCALE:
                r = tl.load(ROW_SCALE + row).to(tl.float32)
                ce_f = ce_f * r
                z_f = z_f * r
            # multiplies p_c; subtracted at the target column
            coef_p, coef_t = _grad_coefs(ce_f, z_f, keep, eps_v, w_t, tl.load(SCALES + 2), lse, lse_square_scale,
                                         HAS_SMOOTHING, HAS_ZLOSS)
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + offs
                mask = cols < n_cols
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    th = _tanh_f32(x / softcap)
                    z = softcap * th
                else:
                    z = x
                if HAS_WEIGHT:
                    w_c = tl.load(CLASS_W + cols, mask=mask, other=0.0).to(tl.float32)
                if COMPUTE_LOSS and HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        smooth += tl.sum(tl.where(mask, w_c * ((m - z) + log_d), 0.0), axis=0)
                    else:
                        smooth += tl.sum(tl.where(mask, (m - z) + log_d, 0.0), axis=0)
                if COMPUTE_GRAD:
                    g = coef_p * tl.exp((z - m) - log_d)   # p_c
                    if HAS_SMOOTHING:
                        if HAS_WEIGHT:
                            g -= (ce_f * eps_v) * w_c
                        else:
                            g -= ce_f * eps_v
                    g = tl.where(cols == target, g - coef_t, g)
                    if HAS_SOFTCAP:
                        g = g * (1.0 - th * th)
                    tl.store(DX + cols, g.to(DX.dtype.element_ty), mask=mask)

        if COMPUTE_LOSS:
            ce = keep * w_t * ((m - z_t) + log_d)     # -log p_t
            if HAS_SMOOTHING:
                ce += eps_v * smooth
            ce = tl.where(valid, ce, float("nan"))
            tl.store(LOSS + row, ce)
            if HAS_ZLOSS:
                tl.store(ZLOSS + row, lse_square_scale * lse * lse)


    @jit
    def _scale_rows_kernel(
        G, stride_g,            # (N, V) gradient, scaled in place
        S,                      # (N,) fp32 per-row factor
        n_cols,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        ptr = G + row * stride_g + cols
        g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (g * tl.load(S + row)).to(G.dtype.element_ty), mask=mask)


    @jit
    def _scale_kernel(
        G,                      # (n,) contiguous, scaled in place
        S,                      # () the factor (any float dtype)
        n,
        BLOCK_SIZE: tl.constexpr,
    ):
        # Grid-stride over blocks with a few programs per SM: when the factor is exactly 1 (the
        # usual loss.backward()) every program returns at once, where one program per block
        # would cost ~80 us just to launch and retire at (8192, 128256).
        s = tl.load(S).to(tl.float32)
        if s != 1.0:
            step = tl.num_programs(0) * BLOCK_SIZE
            for start in range(tl.program_id(0).to(tl.int64) * BLOCK_SIZE, n, step):
                offs = start + tl.arange(0, BLOCK_SIZE)
                mask = offs < n
                g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(G + offs, (g * s).to(G.dtype.element_ty), mask=mask)

    @jit
    def _reduction_scales_kernel(
        TARGET,                 # (N,) int64
        CLASS_W,                # (V,) class weights (read only when HAS_WEIGHT)
        OUT,                    # (3,) fp32 out: [ce factor, z-loss factor, sum of class weights]
        n_rows, n_cols, ignore_index,
        HAS_WEIGHT: tl.constexpr,
        IS_MEAN: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        # One program: the counts a "mean" needs, in one launch instead of a dozen torch ops.
        offs = tl.arange(0, BLOCK_SIZE)
        count = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
        w_sum = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        for start in range(0, n_rows, BLOCK_SIZE):
            rows = start + offs
            t = tl.load(TARGET + rows, mask=rows < n_rows, other=ignore_index)
            keep = t != ignore_index
            count += keep.to(tl.int32)
            if HAS_WEIGHT:  # an out-of-range target (refused on the host) reads a clamped column
                col = tl.minimum(tl.maximum(t, 0), n_cols - 1)
                w_sum += tl.load(CLASS_W + col, mask=keep, other=0.0).to(tl.float32)
        n_kept = tl.sum(count, axis=0).to(tl.float32)
        if HAS_WEIGHT:
            w_kept = tl.sum(w_sum, axis=0)
            w_all = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + offs
                w_all += tl.load(CLASS_W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            w_total = tl.sum(w_all, axis=0)
        else:
            w_kept = n_kept
            w_total = n_cols * 1.0  # (not .to(): Triton makes an int argument of 1 a constant)
        if IS_MEAN:
            # correctly rounded reciprocals, as torch computes them
            ce_f = tl.where(w_kept != 0.0, tl.math.div_rn(1.0, tl.where(w_kept != 0.0, w_kept, 1.0)), 0.0)
            z_f = tl.where(n_kept > 0.0, tl.math.div_rn(1.0, tl.maximum(n_kept, 1.0)), 0.0)
        else:
            ce_f = 1.0
            z_f = 1.0
        tl.store(OUT, ce_f)
        tl.store(OUT + 1, z_f)
        tl.store(OUT + 2, w_total)

    @jit
    def _first_bad_target_kernel(
        TARGET,                 # (N,) int64
        OUT,                    # (1,) int64 out: first row whose target is out of range, or N
        n_rows, n_cols, ignore_index,
        BLOCK_SIZE: tl.constexpr,
    ):
        offs = tl.arange(0, BLOCK_SIZE)
        first = tl.full([BLOCK_SIZE], n_rows, tl.int64)
        for start in range(0, n_rows, BLOCK_SIZE):
            rows = start + offs
            t = tl.load(TARGET + rows, mask=rows < n_rows, other=ignore_index)
            bad = (t != ignore_index) & ((t < 0) | (t >= n_cols))
            first = tl.minimum(first, tl.where(bad, rows.to(tl.int64), n_rows))
        tl.store(OUT, tl.min(first, axis=0))


_SCALE_BLOCK = 8192


def _launch_scale(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale in place (grad contiguous, scale a one-element tensor on its device),
    fp32 math; a factor of exactly 1 is detected on the device and moves no bytes."""
    n = grad.numel()
    if n == 0:
        return
    programs = _utils.persistent_programs(grad.device, cdiv(n, _SCALE_BLOCK), per_sm=4, cpu_programs=4)
    with device_guard(grad):
        _scale_kernel[(programs,)](grad, scale, n, BLOCK_SIZE=_SCALE_BLOCK, num_warps=8)


def _launch_scale_rows(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[i, :] *= scale[i] in place, fp32 math (grad (N, V) with unit column stride)."""
    n_rows, n_cols = grad.shape
    if grad.numel() == 0:
        return
    block, warps = _block_settings(n_cols)
    with device_guard(grad):
        _scale_rows_kernel[(n_rows, cdiv(n_cols, block))](
            grad, grad.stride(0), scale, n_cols, BLOCK_SIZE=block, num_warps=warps
        )


def _block_settings(n_cols: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for the row-looping kernel."""
    block = min(next_power_of_2(n_cols), next_power_of_2(MAX_BLOCK_SIZE))
    if block >= 32768:
        warps = 16
    elif block >= 8192:
        warps = 8
    else:
        warps = 4
    return block, warps


# --------------------------------------------------------------------- shared row engine
def reduction_scales(
    target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int, reduction: str, n_cols: int
) -> torch.Tensor:
    """(3,) fp32 on target's device: [ce factor, z-loss factor, sum of class weights].

    The factors turn per-row values into the reduced loss (``1/sum w_t`` and ``1/count``
    for "mean", 0 when nothing is counted; 1 otherwise). Computed on the device, no sync:
    one Triton program where kernels run (:func:`_reduction_scales_kernel`, up to
    _STATS_MAX_ROWS targets), torch ops otherwise (:func:`reduction_scales_reference`).

    Args:
        target: (N,) int64 class ids; ``ignore_index`` rows are not counted, and an
            out-of-range id (refused earlier by :func:`check_target`) reads a clamped weight.
        weight: optional (V,) float class weights on target's device.
        n_cols: the vocabulary size ``V``.
    """
    if not _one_program_ok(target):
        return reduction_scales_reference(target, weight, ignore_index, reduction, n_cols)
    target = target.contiguous()
    out = torch.empty(3, dtype=torch.float32, device=target.device)
    with device_guard(target):
        _reduction_scales_kernel[(1,)](
            target, weight.contiguous() if weight is not None else out, out,
            target.shape[0], n_cols, ignore_index,
            HAS_WEIGHT=weight is not None, IS_MEAN=reduction == "mean", BLOCK_SIZE=_STATS_BLOCK,
            num_warps=_STATS_WARPS,
        )
    return out


# The one-program target kernels (reduction_scales, the range check) take _STATS_BLOCK
# targets a step, up to _STATS_MAX_ROWS targets (64 steps); beyond, a single program would
# take longer than torch's few kernels (a fresh review measured ~0.25 us a step of 1024 on
# an H200: 0.35 ms for the check at 1M targets against 0.08 for torch), which run instead.
_STATS_BLOCK = 4096
_STATS_WARPS = 8
_STATS_MAX_ROWS = 64 * _STATS_BLOCK


def _one_program_ok(target: torch.Tensor) -> bool:
    """Whether the one-program target kernels take (N,) ``target``: the Triton path, int64,
    at most _STATS_MAX_ROWS targets."""
    return _utils.use_triton(target) and target.dtype == torch.int64 and target.shape[0] <= _STATS_MAX_ROWS


def reduction_scales_reference(
    target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int, reduction: str, n_cols: int
) -> torch.Tensor:
    """:func:`reduction_scales` in torch ops (no Triton; the test oracle of the kernel)."""
    mask = target != ignore_index
    count = mask.sum().to(torch.float32)
    if weight is None:
        w_sum = count
        w_all = torch.full((), float(n_cols), dtype=torch.float32, device=target.device)
    else:
        wf = weight.to(torch.float32)
        w_t = wf[target.clamp(0, n_cols - 1)] if n_cols else torch.zeros_like(target, dtype=torch.float32)
        w_sum = torch.where(mask, w_t, 0.0).sum()
        w_all = wf.sum()
    if reduction == "mean":
        ce_f = torch.where(w_sum != 0, 1.0 / w_sum, 0.0)
        z_f = torch.where(count > 0, 1.0 / count, 0.0)
    else:
        ce_f = torch.ones((), dtype=torch.float32, device=target.device)
        z_f = ce_f
    return torch.stack([ce_f, z_f, w_all]).to(torch.float32)


def launch_cross_entropy_rows(
    logits: torch.Tensor,               # (N, V), last dim contiguous
    target: torch.Tensor,               # (N,) int64 contiguous
    weight: Optional[torch.Tensor],     # (V,) or None
    scales: torch.Tensor,               # (3,) fp32 from reduction_scales
    lse: torch.Tensor,                  # (N,) fp32 out
    loss_rows: Optional[torch.Tensor],  # (N,) fp32 out, or None (no loss)
    z_rows: Optional[torch.Tensor],     # (N,) fp32 out, or None (needed only with the z-loss)
    grad: Optional[torch.Tensor],       # (N, V) out (may be logits itself), or None
    row_scale: Optional[torch.Tensor],  # (N,) fp32 per-row factor, or None
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    guard: Optional[torch.Tensor] = None,  # (1,) int64 on the device, from TargetCheck.first_bad_row
) -> None:
    """Run the Triton row kernel (see the module docstring) on ``logits``; on sm_90, rows of
    96 KB or more with a gradient to write run :mod:`ligerzoo.kernels.cross_entropy_sm90`
    instead (the same results to rounding; up to 224 KB of each row is read from DRAM once).
    With ``guard``, the kernels read it on the device and write nothing at all when it names
    a row (``guard[0] < N``: a target out of range), so an in-place call can leave the logits
    intact on bad targets without the host waiting for the check before the launch."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    assert (logits.stride(1) == 1 or n_cols <= 1) and (grad is None or grad.stride(1) == 1 or n_cols <= 1)
    sm90 = _sm90()
    if sm90 is not None and sm90.supported(logits, grad):
        sm90.launch(logits, target, weight, scales, lse, loss_rows, z_rows, grad, row_scale,
                    ignore_index, label_smoothing, lse_square_scale, softcap, guard=guard)
        return
    block, warps = _block_settings(n_cols)
    compute_loss = loss_rows is not None
    dummy = lse  # placeholder pointer for unused arguments
    with device_guard(logits):
        _cross_entropy_kernel[(n_rows,)](
            logits, logits.stride(0),
            grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
            target,
            weight if weight is not None else dummy,
            loss_rows if compute_loss else dummy,
            z_rows if compute_loss and z_rows is not None else dummy,
            lse,
            scales,
            row_scale if row_scale is not None else dummy,
            guard if guard is not None else target,
            n_rows, n_cols, ignore_index,
            float(label_smoothing), float(lse_square_scale), float(softcap) if softcap is not None else 1.0,
            HAS_WEIGHT=weight is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_SMOOTHING=label_smoothing > 0.0,
            HAS_ZLOSS=lse_square_scale != 0.0,
            COMPUTE_LOSS=compute_loss,
            COMPUTE_GRAD=grad is not None,
            HAS_ROW_SCALE=row_scale is not None,
            HAS_GUARD=guard is not None,
            BLOCK_SIZE=block,
            num_warps=warps,
        )


@functools.lru_cache(maxsize=None)
def _sm90():
    """The Hopper resident-row kernel module (imported on first use), or None without Triton."""
    if not HAS_TRITON:
        return None
    from ligerzoo.kernels import cross_entropy_sm90
    return cross_entropy_sm90


def torch_cross_entropy_rows(
    logits, target, weight, scales, lse, loss_rows, z_rows, grad, row_scale,
    ignore_index, label_smoothing, lse_square_scale, softcap,
) -> None:
    """Plain-torch twin of :func:`launch_cross_entropy_rows` (same arguments, same outputs).

    Used where Triton is unavailable (CPU without the interpreter), e.g. by the chunked
    fused linear cross entropy. Temporaries are fp32 copies of ``logits``.
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    if n_cols == 0:  # no classes: an ignored row adds 0, any other has no valid target (NaN)
        lse.zero_()
        if loss_rows is not None:
            loss_rows.copy_(torch.where(target == ignore_index, 0.0, float("nan")))
            if z_rows is not None:
                z_rows.zero_()
        return
    x = logits.to(torch.float32)                                    # (N, V)
    if softcap is not None:
        th = torch.tanh(x / softcap)
        z = softcap * th
    else:
        z = x
    mask = target != ignore_index                                   # (N,)
    z = torch.where(mask[:, None], z, 0.0)  # ignored rows: finite values (-inf - -inf would be nan)
    valid = mask & (target >= 0) & (target < n_cols)
    safe_t = torch.where(valid, target, 0)
    lse_v = torch.where(mask, torch.logsumexp(z, dim=-1), 0.0)       # (N,)
    lse.copy_(lse_v)
    logp = torch.log_softmax(z, dim=-1)  # (z - m) - log(d): as exact as the kernel's  (N, V)
    if weight is not None:
        wf = weight.to(torch.float32)
        w_t = wf[safe_t]
    else:
        wf = None
        w_t = torch.ones_like(lse_v)
    keep = 1.0 - label_smoothing
    eps_v = label_smoothing / n_cols
    maskf = mask.to(torch.float32)
    if loss_rows is not None:
        ce = keep * w_t * -logp.gather(1, safe_t[:, None]).squeeze(1)
        if label_smoothing > 0.0:
            ce = ce - eps_v * (logp * wf if wf is not None else logp).sum(-1)
        ce = torch.where(valid | ~mask, ce * maskf, float("nan"))
        loss_rows.copy_(ce)
        if z_rows is not None:
            z_rows.copy_(lse_square_scale * lse_v * lse_v * maskf)
    if grad is not None:
        ce_f, z_f, w_all = scales[0], scales[1], scales[2]
        r = maskf if row_scale is None else maskf * row_scale.to(torch.float32)
        ce_f = ce_f * r                                              # (N,)
        z_f = z_f * r
        coef_p = ce_f * keep * w_t + ce_f * eps_v * w_all + z_f * 2.0 * lse_square_scale * lse_v
        g = coef_p[:, None] * torch.exp(logp)
        if label_smoothing > 0.0:
            g = g - ce_f[:, None] * eps_v * (wf[None, :] if wf is not None else 1.0)
        g.scatter_add_(1, safe_t[:, None], -(ce_f * keep * w_t * valid)[:, None])
        if softcap is not None:
            g = g * (1.0 - th * th)
        grad.copy_(torch.where(mask[:, None], g, 0.0))  # ignored rows: exp(z - 0) may overflow


def _reduce(loss_rows: torch.Tensor, z_rows: Optional[torch.Tensor], scales: torch.Tensor, reduction: str):
    """(loss, z_loss) from per-row values: fp32, shape () or (N,). ``z_rows`` None: no z-loss
    (zeros)."""
    if reduction == "none":
        if z_rows is None:
            return loss_rows, torch.zeros_like(loss_rows)
        return loss_rows + z_rows, z_rows
    if z_rows is None:
        return loss_rows.sum() * scales[0], torch.zeros((), dtype=torch.float32, device=loss_rows.device)
    z = z_rows.sum() * scales[1]
    return loss_rows.sum() * scales[0] + z, z


# ------------------------------------------------------------------ ops (torch.library + eager path)
def _forward_impl(logits, target, weight, ignore_index, reduction, label_smoothing,
                  lse_square_scale, softcap, grad, guard=None):
    """Loss (and, when ``grad`` is given, the gradient written into it). -> (loss, z, lse).
    ``guard``: see :func:`launch_cross_entropy_rows`."""
    n_rows = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    scales = reduction_scales(target, weight, ignore_index, reduction, logits.shape[1])
    loss_rows = torch.empty(n_rows, **f32)
    z_rows = torch.empty(n_rows, **f32) if lse_square_scale != 0.0 else None  # only with the z-loss
    lse = torch.empty(n_rows, **f32)
    launch_cross_entropy_rows(
        logits, target, weight, scales, lse, loss_rows, z_rows, grad, None,
        ignore_index, label_smoothing, lse_square_scale, softcap, guard=guard,
    )
    loss, z_loss = _reduce(loss_rows, z_rows, scales, reduction)
    return loss, z_loss, lse


def _fake_outputs(logits, reduction):
    n_rows = logits.shape[0]
    shape = (n_rows,) if reduction == "none" else ()
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (torch.empty(shape, **f32), torch.empty(shape, **f32), torch.empty(n_rows, **f32))


@kernel_op("cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, z_loss, lse (N,) fp32, grad (N, V) or empty). Logits are only read."""
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else None
    loss, z_loss, lse = _forward_impl(
        logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, grad
    )
    if grad is None:
        grad = logits.new_empty(0)
    return loss, z_loss, lse, grad


@_cross_entropy_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
      compute_grad):
    if compute_grad:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    else:
        grad = logits.new_empty(0)
    return (*_fake_outputs(logits, reduction), grad)


@kernel_op("cross_entropy_inplace", mutates_args=("logits",))
def _cross_entropy_inplace_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    guard: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, z_loss, lse); the gradient overwrites ``logits`` (the caller opted in), unless
    ``guard`` (the label check's device answer) names a bad row: then nothing is written."""
    return _forward_impl(
        logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, logits,
        guard,
    )


@_cross_entropy_inplace_op.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, guard=None):
    return _fake_outputs(logits, reduction)


def _eager(t: torch.Tensor) -> bool:
    """True for a plain tensor outside any tracing (torch.compile, AOTAutograd, fake modes)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``grad * grad_output`` for a gradient precomputed in the forward.

    The saved buffer belongs to the op, so in eager it is scaled in place (no second copy;
    the ops call :func:`claim_saved_grads` first, so a second backward through the same graph
    raises instead of rescaling). The factor is never read on the host (that would
    stall the stream at the start of every backward): a Triton kernel reads it on the
    device and skips the pass when it is exactly 1, the factor of a plain
    ``loss.backward()``. While traced (torch.compile) the product is taken out of place.
    """
    if not (_eager(grad) and _eager(grad_output)):
        go = grad_output.to(torch.float32)
        if per_row:
            go = go.reshape(-1, *([1] * (grad.dim() - 1)))
        return (grad * go).to(grad.dtype)
    kernel_ok = (_utils.use_triton(grad) and grad.dtype in _utils.KERNEL_DTYPES
                 and grad_output.device == grad.device)
    if per_row:
        go = grad_output.to(torch.float32).reshape(-1).contiguous()              # (N,)
        if kernel_ok and grad.dim() == 2 and grad.stride(1) == 1:
            _launch_scale_rows(grad, go)
            torch.autograd.graph.increment_version(grad)  # as an in-place torch op would
            return grad
        return grad.mul_(go.reshape(-1, *([1] * (grad.dim() - 1))))
    if kernel_ok and grad.is_contiguous() and grad_output.numel() == 1:
        _launch_scale(grad, grad_output)
        torch.autograd.graph.increment_version(grad)
        return grad
    if not grad_output.is_cuda:  # reading a CPU scalar costs nothing
        scale = float(grad_output)
        return grad if scale == 1.0 else grad.mul_(scale)
    return grad.mul_(grad_output.to(torch.float32))


def claim_saved_grads(ctx, op_name: str) -> None:
    """Mark the gradients an op precomputed in its forward as handed out. They are scaled in
    place and returned by the first backward (they may become a leaf's ``.grad``), so a
    second backward through the same graph (``retain_graph=True``) cannot reuse them: it
    raises RuntimeError instead of returning rescaled buffers."""
    if getattr(ctx, "saved_grads_claimed", False):
        raise RuntimeError(
            f"{op_name}: a second backward through the same graph is not supported: this op computes its "
            "gradients in the forward and the first backward handed them out. Run the forward again "
            "before another backward."
        )
    ctx.saved_grads_claimed = True


def scale_saved_grads(ctx, grads, grad_loss: torch.Tensor, op_name: str) -> list:
    """Gradients of an op's first ``len(grads)`` inputs from buffers its forward precomputed
    for a scalar loss: for input ``i`` that autograd wants (``ctx.needs_input_grad[i]``),
    ``grads[i]`` scaled by ``grad_loss`` (:func:`scale_saved_grad`); None for the others.
    ``ctx.need[i]`` says whether the forward prepared buffer ``i``; a wanted gradient it did
    not prepare raises RuntimeError (naming ``op_name``). Call :func:`claim_saved_grads`
    before reading ``ctx.saved_tensors``."""
    out = []
    for i, (g, have) in enumerate(zip(grads, ctx.need)):
        if not ctx.needs_input_grad[i]:
            out.append(None)
            continue
        if not have:
            raise RuntimeError(f"{op_name}: a gradient was requested that the forward did not prepare")
        out.append(scale_saved_grad(g, grad_loss, False))
    return out


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled (N, V) gradient for the unused grad output
    reduction = inputs[4]
    loss, z_loss, lse, grad = output
    ctx.mark_non_differentiable(z_loss, lse, grad)
    ctx.per_row = reduction == "none"
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _gz, _glse, _ggrad):
    claim_saved_grads(ctx, "cross_entropy")
    (grad,) = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        if grad.numel() == 0 and grad.dim() == 1:
            raise RuntimeError("cross_entropy: the forward ran without computing the gradient")
        dlogits = scale_saved_grad(grad, grad_loss, ctx.per_row)
    return dlogits, None, None, None, None, None, None, None, None


ops.cross_entropy.register_autograd(_backward, setup_context=_setup_context)


class _CrossEntropyInplaceFunction(torch.autograd.Function):
    """Autograd wrapper of the mutating op (torch.library cannot attach autograd to it)."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction, label_smoothing,
                lse_square_scale, softcap, guard):
        loss, z_loss, lse = ops.cross_entropy_inplace(
            logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, guard
        )
        ctx.mark_non_differentiable(z_loss, lse)
        ctx.per_row = reduction == "none"
        ctx.save_for_backward(logits)  # now holds d(loss)/d(logits)
        return loss, z_loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _gz, _glse):
        claim_saved_grads(ctx, "cross_entropy")
        (grad,) = ctx.saved_tensors
        return scale_saved_grad(grad, grad_loss, ctx.per_row), None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------- reference
def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    inplace: bool = False,
):
    """Plain-PyTorch cross entropy with the exact semantics of :func:`cross_entropy`.

    Differentiable by torch autograd (``z_loss`` is returned detached, as by the public
    function: it is already part of ``loss``). Math in fp32 (float64 for float64 logits);
    returns fp32 (float64) values. ``inplace`` is accepted for signature parity and ignored.

    Arguments, shapes and dtypes as :func:`cross_entropy`; it does not check them as that
    function does (bad input fails in torch's own ops).
    """
    del inplace
    cdt = torch.promote_types(logits.dtype, torch.float32)
    n_cols = logits.shape[-1]
    z = logits.to(cdt)                                               # (N, V)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    mask = target != ignore_index                                    # (N,)
    maskf = mask.to(cdt)
    # ignored rows contribute nothing: give them finite values (all -inf would make nan * 0)
    z = torch.where(mask[:, None], z, 0.0)
    safe_t = torch.where(mask, target, 0)
    # ignored rows: lse 0 (with no classes at all, where every row must be ignored, it is -inf)
    lse = torch.where(mask, torch.logsumexp(z, dim=-1), 0.0)         # (N,)
    # log p = (z - max) - log(sum exp(z - max)): rounding lse first would cost a confident
    # row its whole loss at |z| ~ 40 (and the target's gradient with it)
    logp = torch.log_softmax(z, dim=-1)                              # (N, V)
    logp_t = logp.gather(1, safe_t[:, None]).squeeze(1) if n_cols else torch.zeros_like(lse)
    w_t = weight.to(cdt)[safe_t] * maskf if weight is not None and n_cols else maskf
    ce = (1.0 - label_smoothing) * w_t * -logp_t
    if label_smoothing > 0.0 and n_cols:
        neg = -logp
        if weight is not None:
            neg = neg * weight.to(cdt)
        ce = ce + (label_smoothing / n_cols) * neg.sum(-1) * maskf
    z_rows = lse_square_scale * lse.square() * maskf
    if reduction == "none":
        loss, z_loss = ce + z_rows, z_rows
    elif reduction == "sum":
        z_loss = z_rows.sum()
        loss = ce.sum() + z_loss
    else:
        w_sum = w_t.sum()
        count = maskf.sum()
        z_loss = z_rows.sum() / torch.where(count > 0, count, 1.0)
        loss = ce.sum() / torch.where(w_sum != 0, w_sum, 1.0) + z_loss
    return (loss, z_loss.detach()) if return_z_loss else loss


# ---------------------------------------------------------------------------- checks
class TargetCheck:
    """The range check of class-id targets, started on the device and finished later.

    ``TargetCheck(target, n_cols, ignore_index)`` queues the check (the index of the first
    target outside ``[0, n_cols)`` that is not ``ignore_index``: one Triton program up to
    _STATS_MAX_ROWS targets, torch ops beyond) and a non-blocking copy of its answer to
    pinned host memory, on the current stream of the target's device; :meth:`wait` blocks
    only until that copy is done and raises. An op starts the check, queues its own
    kernels, then waits: the GPU then has the op's kernels queued while the host waits,
    instead of idling through the host work between a sync and the op's first launch (at
    (8192, 128256) bf16 on an H200 the up-front check cost ~0.4 ms of a 1.75 ms
    cross-entropy step). The host still waits for everything queued before the check.

    The kernels run safely on out-of-range targets (the row's loss is NaN, no memory
    outside the row is touched), and an op that raises returns nothing; but buffers it
    writes in place are written: ops that overwrite a caller's tensor (the in-place
    ``cross_entropy``) hand :attr:`first_bad_row`, the check's answer on the device, to their
    kernels, which then write nothing when it names a row. Off CUDA (CPU, the interpreter) the check
    runs at construction; under torch.compile and while the current stream is capturing a
    CUDA graph (``torch.cuda.graph``, ``make_graphed_callables``) it is skipped: graphs cannot
    raise on data, and the wait's host sync would break the capture.
    """

    __slots__ = ("target", "n_cols", "ignore_index", "_first", "_event", "first_bad_row")

    def __init__(self, target: torch.Tensor, n_cols: int, ignore_index: int):
        self.target, self.n_cols, self.ignore_index = target, n_cols, ignore_index
        self._first, self._event = None, None
        # (1,) int64 on the target's device while the check runs there: the first bad row, or N
        self.first_bad_row: Optional[torch.Tensor] = None
        if torch.compiler.is_compiling() or target.numel() == 0 or target.is_meta:  # no values to check
            return
        with device_guard(target):  # the target's device and its current stream
            if target.is_cuda and torch.cuda.is_current_stream_capturing():  # no host sync in a graph
                return
            first = _first_bad_row(target.reshape(-1), n_cols, ignore_index)       # (1,) int64
            if not target.is_cuda:  # CPU or the interpreter: already done
                self._raise_if_bad(int(first[0]))
                return
            self.first_bad_row = first
            self._first = torch.empty(1, dtype=torch.int64, pin_memory=True)
            self._first.copy_(first, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> None:
        """Raise ValueError (naming the value and ``V``) if a target was out of range.
        Returns at once when the check already ran (off CUDA) or was skipped."""
        if self._event is None:
            return
        self._event.synchronize()
        self._event = None
        self._raise_if_bad(int(self._first[0]))

    def _raise_if_bad(self, first_row: int) -> None:
        """ValueError naming ``target[first_row]`` unless ``first_row`` is the row count."""
        if first_row >= self.target.numel():
            return
        value = int(self.target.reshape(-1)[first_row].item())
        raise ValueError(
            f"target value {value} is out of range for a vocabulary of V={self.n_cols} classes "
            f"(expected 0 <= target < {self.n_cols}, or ignore_index={self.ignore_index})"
        )


def _first_bad_row(target: torch.Tensor, n_cols: int, ignore_index: int) -> torch.Tensor:
    """(1,) int64 on target's device: the first row of (N,) ``target`` whose value is
    outside [0, n_cols) and not ``ignore_index``, or N. No sync."""
    n_rows = target.shape[0]
    if _one_program_ok(target):
        target = target.contiguous()
        first = torch.empty(1, dtype=torch.int64, device=target.device)
        _first_bad_target_kernel[(1,)](target, first, n_rows, n_cols, ignore_index,
                                       BLOCK_SIZE=_STATS_BLOCK, num_warps=_STATS_WARPS)
        return first
    bad = (target != ignore_index) & ((target < 0) | (target >= n_cols))
    rows = torch.arange(n_rows, device=target.device)
    return torch.where(bad, rows, n_rows).amin().reshape(1)


def check_target(target: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """ValueError if a non-ignored target is outside [0, n_cols), checked now (a host sync on
    CUDA; :class:`TargetCheck` defers it). Skipped under torch.compile."""
    TargetCheck(target, n_cols, ignore_index).wait()


_FP32_MAX = float(torch.finfo(torch.float32).max)


def check_loss_options(reduction: str, label_smoothing: float, lse_square_scale: float,
                       softcap: Optional[float]) -> None:
    """Validate the scalar options of :func:`cross_entropy` (shared by the fused losses and
    ``ligerzoo.nn.CrossEntropyLoss``).

    Raises:
        ValueError: ``reduction`` not "mean" / "sum" / "none", ``label_smoothing`` outside
            [0, 1], ``lse_square_scale`` < 0, or ``softcap`` neither None nor finite and > 0;
            any of the three not a real number (a string, a bool).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= check_real("label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not check_real("lse_square_scale", lse_square_scale) >= 0.0:  # nan too
        raise ValueError(f"lse_square_scale must be >= 0, got {lse_square_scale}")
    if softcap is not None and not 0.0 < check_real("softcap", softcap) <= _FP32_MAX:  # the kernels' math is fp32
        raise ValueError(f"softcap must be a finite number > 0 (or None), got {softcap}")


def check_ignore_index(ignore_index) -> int:
    """``ignore_index`` as a Python int (a Python / numpy int or a 0-dim integer tensor).

    Raises:
        ValueError: anything else (a float such as 1.5, a bool, a tensor of more dims, an int
            outside int64).
    """
    if not is_int(ignore_index) or not -(2**63) <= int(ignore_index) < 2**63:
        raise ValueError(f"ignore_index must be an integer class id (int64), got {ignore_index!r}")
    return int(ignore_index)


def check_class_weight(weight: Optional[torch.Tensor], n_cols: int, device: torch.device) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"class weight must have shape ({n_cols},), got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"class weight must be a float tensor, got {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"class weight is on {weight.device}, expected {device}")


def check_target_shape(target: torch.Tensor, n_rows: int, device: torch.device) -> torch.Tensor:
    if target.dim() != 1 or target.shape[0] != n_rows:
        raise ValueError(f"target must have shape ({n_rows},), got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer tensor of class ids (any integer dtype, used as int64), "
                         f"got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target is on {target.device}, expected {device}")
    return target.to(torch.int64).contiguous()


# ---------------------------------------------------------------------------- public
def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    inplace: bool = False,
):
    """Cross entropy over ``V`` classes with z-loss and soft-capping, fp32 math.

    Equals ``torch.nn.functional.cross_entropy(z, target, weight, ignore_index=...,
    reduction=..., label_smoothing=...)`` on ``z = softcap * tanh(logits / softcap)``
    (``z = logits`` when ``softcap`` is None), plus the z-loss ``lse_square_scale *
    logsumexp(z) ** 2`` of every non-ignored row (PaLM, Chowdhery et al. 2022, arXiv
    2204.02311), reduced like the loss ("mean" averages it over non-ignored rows).
    Differences from torch: a batch whose targets are all ``ignore_index`` gives loss 0 and
    zero gradients for "mean" (torch gives NaN), and so does one whose kept rows' class
    weights sum to 0 (torch: NaN or inf); the loss is fp32 for fp32 / bf16 / fp16 logits
    (as in Hugging Face, which upcasts logits before the loss).

    Args:
        logits: (N, V) float (fp32 / bf16 / fp16; float64 runs the torch reference), any
            strides.
        target: (N,) integer class ids (any integer dtype, used as int64); ``ignore_index``
            rows are skipped.
        weight: optional (V,) float class weights on the logits' device (no gradient is
            computed for them).
        ignore_index: target value that marks a row to ignore.
        reduction: "mean" | "sum" | "none".
        label_smoothing: in [0, 1].
        lse_square_scale: z-loss coefficient (>= 0).
        softcap: logit soft-cap ``c > 0`` (Gemma 2), or None.
        return_z_loss: also return the z-loss part (detached, already in ``loss``).
        inplace: allow the gradient to be written over ``logits`` (saves one (N, V)
            buffer; the caller must not read ``logits`` after the forward). Ignored
            (a fresh gradient buffer is used, as without it) under torch.compile, for
            logits whose elements share memory (e.g. an ``expand``ed row, stride 0) and for
            a leaf or a view of one (its memory would become its own ``.grad``, which its
            next use would overwrite): for the output of the LM head, not for a tensor you made.

    Returns:
        ``loss`` (fp32, float64 for float64 logits; shape () or (N,) for "none"), or
        ``(loss, z_loss)``. On the kernel path (CUDA, or the interpreter) its gradient is
        computed in the forward: first-order only (``create_graph=True`` is refused) and one
        backward per forward (a second one through the same graph, ``retain_graph=True``,
        raises RuntimeError); the torch reference path (CPU, float64) has neither limit.

    Raises:
        ValueError: logits not 2-D float, target not (N,) integer on the logits' device,
            a class weight not (V,) float on that device, options outside the ranges above
            (:func:`check_loss_options`), an ``ignore_index`` that is not an integer, or a target outside ``[0, V)`` that is not
            ``ignore_index`` (the message names the value and ``V``; not checked under
            torch.compile).
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale,
                          softcap, return_z_loss, inplace, check_targets=True)


def _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                   return_z_loss, inplace, check_targets: bool):
    """:func:`cross_entropy`; ``check_targets=False`` skips the target range check (and its
    host sync), for a caller that checked the targets itself (one check for many calls)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    n_rows, n_cols = logits.shape
    check_loss_options(reduction, label_smoothing, lse_square_scale, softcap)
    ignore_index = check_ignore_index(ignore_index)
    target = check_target_shape(target, n_rows, logits.device)
    check_class_weight(weight, n_cols, logits.device)
    # waited on after the launch below
    target_check = TargetCheck(target if check_targets else target[:0], n_cols, ignore_index)
    softcap = float(softcap) if softcap is not None else None
    label_smoothing = float(label_smoothing)
    lse_square_scale = float(lse_square_scale)

    if not _utils.triton_ok(logits):
        target_check.wait()
        return cross_entropy_reference(
            logits, target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
            return_z_loss,
        )

    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    args = (target, weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    # rows that share memory (stride 0, ...) would be overwritten while later rows still read them;
    # a leaf's memory would become its own .grad, which its next use would overwrite
    if (inplace and need_grad and not torch.compiler.is_compiling() and _utils.non_overlapping(logits)
            and not _utils.of_leaf(logits)):
        # the kernels read the check's answer on the device and leave the logits intact on a bad
        # target; the host waits for it only once they are queued
        loss, z_loss, _ = _CrossEntropyInplaceFunction.apply(logits, *args, target_check.first_bad_row)
        target_check.wait()
    else:
        loss, z_loss, _, _ = ops.cross_entropy(logits, *args, need_grad)
        target_check.wait()
    return (loss, z_loss.detach()) if return_z_loss else loss
