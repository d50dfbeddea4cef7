"""RMSNorm and fused residual-add + RMSNorm.

Math (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019), over the last dim
of ``x`` with ``H`` features::

    rstd = 1 / sqrt(mean(x ** 2) + eps)          # one fp32 value per row
    y    = (x * rstd) * (offset + weight)

``offset`` is 0 for Llama-style checkpoints and 1 for Gemma, whose weights are stored as
``w - 1``. Where the rounding to the input dtype happens is the ``casting_mode``:

- ``"llama"`` (Hugging Face ``LlamaRMSNorm``): the statistics are fp32, ``x * rstd`` is
  rounded to ``x.dtype`` *before* the weight multiply, the product is rounded once to
  ``x.dtype``. With ``offset == 0`` and ``weight.dtype == x.dtype`` this equals HF's
  ``weight * (x.float() * rstd).to(x.dtype)``.
- ``"gemma"`` (HF ``GemmaRMSNorm``): everything in fp32,
  ``((x.float() * rstd) * (offset + weight.float())).to(x.dtype)``.
- ``"none"``: the expression evaluated in ``x.dtype`` the way torch evaluates it for
  that dtype: ``x * x`` rounded to ``x.dtype``, its mean accumulated in fp32 and rounded,
  ``mean + eps`` rounded, ``rsqrt`` rounded, ``x * rstd`` rounded,
  ``(offset + weight)`` rounded, the final product rounded. For fp32 inputs the three
  modes coincide.

Gradients are those of the real-valued function (roundings are treated as identities),
computed in fp32 from the saved input and the fp32 ``rstd``::

    g  = dy * (offset + weight)
    dx = rstd * (g - xhat * mean(g * xhat)),     xhat = x * rstd
    dw = sum over rows of dy * xhat              (xhat as rounded in the forward)

``dw`` is accumulated in fp32: each backward program sums a contiguous block of rows into
its own fp32 partial row, and the partial rows are summed afterwards.
"""
from __future__ import annotations

from typing import Optional

import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, as_rows, device_guard, persistent_row_blocks, row_settings
from ligerzoo.kernels._utils import row_tile_settings, sum_partials

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ligerzoo.kernels._utils import load_row_stat, load_row_tiles

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "rms_norm_reference",
    "fused_add_rms_norm_reference",
]

CASTING_MODES = {"llama": 0, "gemma": 1, "none": 2}

# A forward program normalises up to this many rows at once (when a row is short), so a
# tile holds about _TILE_ELEMS elements. Module-level so tests can shrink them.
_MAX_BLOCK_ROWS = 16
_TILE_ELEMS = 4096
# Backward programs per streaming multiprocessor (each owns a contiguous block of rows
# and one fp32 partial row of dw; one per SM keeps the partial rows as small as Liger's).
# On CPU (interpreter) a fixed small count is used. With one program per SM, the loads of
# the next tile are issued before the current tile is reduced (register double
# buffering) and a tile holds _BWD_TILE_ELEMS elements (2 rows of 4096 under 16 warps).
# H200, (8192, 4096) bf16, backward + dw sum: 100 us with 1-row tiles and no double
# buffering, 75 us at two programs per SM, 67 us like this (benchmarks/NOTES.md).
_BWD_TILE_ELEMS = 8192
_BWD_PROGRAMS_PER_SM = 1
_BWD_PROGRAMS_CPU = 4


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @jit
    def _rms_norm_fwd_kernel(
        X, stride_x,          # (N, H) input rows
        RES, stride_res,      # (N, H) residual rows (read only when HAS_RESIDUAL)
        S, stride_s,          # (N, H) out: x + residual (written only when HAS_RESIDUAL)
        Y, stride_y,          # (N, H) out: normalised rows
        W,                    # (H,) weight
        RSTD,                 # (N,) out: fp32 1/rms per row
        n_rows, n_cols, eps, offset,
        CASTING: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)                     # (BLOCK_M,)
        cols = tl.arange(0, BLOCK_N)                                     # (BLOCK_N,)
        row_mask = rows < n_rows
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]                     # (BLOCK_M, BLOCK_N)
        rows64 = rows.to(tl.int64)
        dtype = Y.dtype.element_ty

        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(RES + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)          # the sum in x's dtype
            tl.store(S + rows64[:, None] * stride_s + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_N,)

        if CASTING == 2:  # "none": round every step to x's dtype
            sq = (x * x).to(dtype).to(tl.float32)
            ms = (tl.sum(sq, axis=1) / n_cols).to(dtype).to(tl.float32)
            ms = (ms + eps).to(dtype).to(tl.float32)
            rstd = tl.rsqrt(ms).to(dtype).to(tl.float32)                 # (BLOCK_M,)
            xhat = (x * rstd[:, None]).to(dtype).to(tl.float32)
            w_eff = (offset + w).to(dtype).to(tl.float32)
            y = xhat * w_eff[None, :]
        else:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)        # (BLOCK_M,)
            xhat = x * rstd[:, None]
            if CASTING == 0:  # "llama": round x*rstd before the weight multiply
                xhat = xhat.to(dtype).to(tl.float32)
            y = xhat * (offset + w)[None, :]

        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(dtype), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @jit
    def _rms_norm_bwd_kernel(
        DY, stride_dy,        # (N, H) gradient of y
        X, stride_x,          # (N, H) forward input (x + residual for the fused op)
        W,                    # (H,) weight
        RSTD,                 # (N,) fp32
        DX, stride_dx,        # (N, H) out (may be DY itself for the in-place variant)
        DRES, stride_dres,    # (N, H) gradient of the fused op's residual output
        DW_PARTIAL,           # (P, H) fp32 out: one partial row per program
        n_rows, n_cols, rows_per_program, offset,
        CASTING: tl.constexpr,
        HAS_DRES: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        x_dtype = X.dtype.element_ty

        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        w_eff = offset + w
        if CASTING == 2:
            w_eff = w_eff.to(x_dtype).to(tl.float32)

        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # register double buffering: the next tile's loads are issued before this tile's
        # reductions, so each program keeps two tiles of reads in flight
        # (and the per-row rstd: its load would otherwise stall each tile's reductions)
        dy_next, x_next = load_row_tiles(DY, stride_dy, X, stride_x, row_start, row_end, cols, col_mask, BLOCK_M)
        rstd_next = load_row_stat(RSTD, row_start, row_end, BLOCK_M)
        for m in range(row_start, row_end, BLOCK_M):
            rows = m + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)

            dy = dy_next.to(tl.float32)
            x = x_next.to(tl.float32)
            rstd = rstd_next
            dy_next, x_next = load_row_tiles(DY, stride_dy, X, stride_x, m + BLOCK_M, row_end, cols, col_mask, BLOCK_M)
            rstd_next = load_row_stat(RSTD, m + BLOCK_M, row_end, BLOCK_M)

            xhat = x * rstd[:, None]
            g = dy * w_eff[None, :]
            c = tl.sum(g * xhat, axis=1) / n_cols                        # (BLOCK_M,)
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            if HAS_DRES:
                dx += tl.load(DRES + rows64[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(
                    tl.float32
                )
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

            if CASTING != 1:  # the forward multiplied the weight by the rounded xhat
                xhat = xhat.to(x_dtype).to(tl.float32)
            dw_acc += dy * xhat

        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------- launchers
def _blocks(n_cols: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N >= H columns, num_warps) of one program's tile: about
    _TILE_ELEMS elements forward, _BWD_TILE_ELEMS backward (H = 4096: 2 rows, 16 warps)."""
    return row_tile_settings(n_cols, _MAX_BLOCK_ROWS, _BWD_TILE_ELEMS if backward else _TILE_ELEMS)


def _launch_forward(x, weight, residual, eps, offset, casting):
    n_cols = x.shape[-1]
    x2 = as_rows(x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if n_rows == 0:
        return y, s, rstd
    block_m, block_n, num_warps = _blocks(n_cols)
    y2 = as_rows(y, n_cols)
    r2 = as_rows(residual, n_cols) if residual is not None else x2
    s2 = as_rows(s, n_cols) if s is not None else y2
    grid = (cdiv(n_rows, block_m),)
    with device_guard(x):
        _rms_norm_fwd_kernel[grid](
            x2, x2.stride(0), r2, r2.stride(0), s2, s2.stride(0), y2, y2.stride(0),
            weight.contiguous(), rstd, n_rows, n_cols, float(eps), float(offset),
            CASTING=CASTING_MODES[casting], HAS_RESIDUAL=residual is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y, s, rstd


def _launch_backward(dy, x, weight, rstd, offset, casting, dres, dx_out):
    """Writes dx into ``dx_out`` (an (..., H) tensor, possibly ``dy``); returns dw."""
    n_cols = x.shape[-1]
    x2 = as_rows(x, n_cols)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return torch.zeros_like(weight)
    dy2 = as_rows(dy, n_cols)
    dx2 = as_rows(dx_out, n_cols)
    dres2 = as_rows(dres, n_cols) if dres is not None else dy2
    rstd1 = rstd if rstd.is_contiguous() else rstd.contiguous()  # (...) fp32, one per row

    block_m, block_n, num_warps = _blocks(n_cols, backward=True)
    programs, rows_per_program = persistent_row_blocks(x.device, n_rows, _BWD_PROGRAMS_PER_SM, _BWD_PROGRAMS_CPU)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _rms_norm_bwd_kernel[(programs,)](
            dy2, dy2.stride(0), x2, x2.stride(0), weight.contiguous(), rstd1, dx2, dx2.stride(0),
            dres2, dres2.stride(0), dw_partial, n_rows, n_cols, rows_per_program, float(offset),
            CASTING=CASTING_MODES[casting], HAS_DRES=dres is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return sum_partials(dw_partial, weight.dtype)


# ----------------------------------------------------------------------------- ops (torch.library + eager path)
@kernel_op("rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # ``inplace`` only changes the backward (see rms_norm's docstring).
    y, _, rstd = _launch_forward(x, weight, None, eps, offset, casting)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps, offset, casting, inplace):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@kernel_op("fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, rstd = _launch_forward(x, weight, residual, eps, offset, casting)
    return y, s, rstd


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, offset, casting):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), x.new_empty(x.shape[:-1], dtype=torch.float32)


@kernel_op("rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    casting: str,
    dres: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = _launch_backward(dy, x, weight, rstd, offset, casting, dres, dx)
    return dx, dw


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, offset, casting, dres):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


@kernel_op("rms_norm_backward_inplace", mutates_args=("dy",))
def _rms_norm_backward_inplace_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float, casting: str,
    dres: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # dx (+ dres when given) overwrites dy (which must be contiguous and of x's dtype); returns dw.
    return _launch_backward(dy, x, weight, rstd, offset, casting, dres, dy)


@_rms_norm_backward_inplace_op.register_fake
def _(dy, x, weight, rstd, offset, casting, dres=None):
    return torch.empty_like(weight)


def _rms_norm_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradient for rstd
    x, weight, eps, offset, casting, inplace = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset, ctx.casting, ctx.inplace = offset, casting, inplace


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    can_overwrite = dy.is_contiguous() and dy.dtype == x.dtype and dy.shape == x.shape
    if ctx.inplace and can_overwrite:
        dw = ops.rms_norm_backward_inplace(dy, x, weight, rstd, ctx.offset, ctx.casting)
        dx = dy
    else:
        dx, dw = ops.rms_norm_backward(dy, x, weight, rstd, ctx.offset, ctx.casting, None)
    return dx, dw, None, None, None, None


ops.rms_norm.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


def _fused_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradients for rstd or an unused output
    x, residual, weight, eps, offset, casting = inputs
    _, s, rstd = output
    ctx.save_for_backward(s, weight, rstd)
    ctx.offset, ctx.casting = offset, casting


def _fused_backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    dx, dw = ops.rms_norm_backward(dy, s, weight, rstd, ctx.offset, ctx.casting, ds)
    # d(x + residual)/dx = d/dresidual = identity: both inputs receive the same gradient.
    return dx, dx, dw, None, None, None


ops.fused_add_rms_norm.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ----------------------------------------------------------------------------- references
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, casting_mode: str = "llama"
) -> torch.Tensor:
    """Plain-PyTorch RMSNorm with the same math and roundings as :func:`rms_norm`.

    Differentiable by torch autograd. Statistics are computed in
    ``promote_types(x.dtype, float32)`` (so a float64 input gives a float64 reference).

    Arguments, shapes, dtypes and errors as :func:`rms_norm` (no ``inplace``; no row-length
    limit).
    """
    _check_args(x, weight, casting_mode)
    ct = _compute_dtype(x.dtype)
    dt = x.dtype
    if casting_mode == "none":
        ms = (x * x).to(ct).mean(dim=-1, keepdim=True).to(dt)                 # (..., 1)
        rstd = torch.rsqrt(ms + eps)
        return (x * rstd) * (offset + weight.to(ct)).to(dt)
    x32 = x.to(ct)
    xhat = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)   # (..., H)
    if casting_mode == "llama":
        xhat = xhat.to(dt).to(ct)
    return (xhat * (offset + weight.to(ct))).to(dt)


def fused_add_rms_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch ``(rms_norm(x + residual), x + residual)``; see :func:`fused_add_rms_norm`.

    Arguments, shapes, dtypes and errors as :func:`fused_add_rms_norm`.
    """
    _check_residual(x, residual)
    s = x + residual
    return rms_norm_reference(s, weight, eps, offset, casting_mode), s


# ----------------------------------------------------------------------------- public API
def _check_args(x: torch.Tensor, weight: torch.Tensor, casting_mode: str) -> None:
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {sorted(CASTING_MODES)}, got {casting_mode!r}")
    if not x.is_floating_point():
        raise ValueError(f"rms_norm expects a floating-point input, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("rms_norm expects an input with at least one dimension (..., H)")
    _utils.check_norm_param("weight", weight, x, x.shape[-1], "the last dim of x")


def _check_residual(x: torch.Tensor, residual: torch.Tensor) -> None:
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            "residual must match x in shape, dtype and device: "
            f"x {tuple(x.shape)} {x.dtype} {x.device}, "
            f"residual {tuple(residual.shape)} {residual.dtype} {residual.device}"
        )



def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
    inplace: bool = False,
) -> torch.Tensor:
    """Root-mean-square layer normalisation over the last dim (Zhang & Sennrich, 2019,
    arXiv 1910.07467).

    ``y = x / sqrt(mean(x**2, -1) + eps) * (offset + weight)``, with the roundings of
    ``casting_mode`` (module docstring): ``"llama"`` = HF ``LlamaRMSNorm`` (also Mistral,
    Qwen2, Phi-3, Mllama), ``"gemma"`` = HF ``GemmaRMSNorm`` (use ``offset=1.0``),
    ``"none"`` = computed in ``x.dtype``.

    Args:
        x: (..., H) fp32 / bf16 / fp16 (float64 runs the torch reference). Any strides;
            rows are read in place when the last dim has unit stride.
        weight: (H,) any float dtype; ``dweight`` is returned in this dtype after an fp32
            accumulation.
        eps: added to the mean square.
        offset: added to the weight (Gemma stores ``weight - 1``).
        casting_mode: ``"llama"``, ``"gemma"`` or ``"none"``.
        inplace: if True, the backward writes ``dx`` over the incoming gradient buffer
            ``dy`` instead of allocating (one (N, H) buffer less). Only safe when no other
            consumer of that gradient buffer exists, e.g. *not* when ``y`` is added to a
            residual stream whose gradient autograd passes through unchanged (Gemma2's
            post-norms), nor when the gradient is a tensor you pass to ``backward`` yourself
            (``y.backward(g)``: ``g`` then holds ``dx``, and a second ``retain_graph``
            backward with it is wrong) or that a hook on ``y`` keeps. ``x`` itself is never
            modified.

    Returns:
        y: same shape and dtype as ``x``; contiguous on the Triton path (the torch
        reference may follow ``x``'s strides).

    Raises:
        ValueError: bad ``casting_mode``, non-float or 0-dim ``x``, ``weight`` not a float
            (H,) tensor on ``x``'s device, or (Triton path only) H larger than 65536 (one
            row must fit a block).
    """
    _check_args(x, weight, casting_mode)
    if not _utils.triton_ok(x):
        return rms_norm_reference(x, weight, eps, offset, casting_mode)
    row_settings(x.shape[-1])  # raises ValueError for rows that cannot fit one block
    y, _ = ops.rms_norm(x, weight, float(eps), float(offset), casting_mode, bool(inplace))
    return y


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting_mode: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm, in one pass over memory.

    ``new_residual = x + residual`` (rounded to ``x.dtype``), ``normed =
    rms_norm(new_residual, weight, eps, offset, casting_mode)``. This is the pre-norm
    decoder step ``h = h + sublayer(...); n = norm(h)`` fused. The backward takes the
    gradients of both outputs; ``x`` and ``residual`` receive the same gradient.

    Args:
        x: (..., H) fp32 / bf16 / fp16.
        residual: same shape, dtype and device as ``x``.
        weight, eps, offset, casting_mode: as in :func:`rms_norm`.

    Returns:
        ``(normed, new_residual)``, both shaped and typed like ``x``; contiguous on the
        Triton path.

    Raises:
        ValueError: as :func:`rms_norm`, or if ``residual`` does not match ``x``.
    """
    _check_args(x, weight, casting_mode)
    _check_residual(x, residual)
    if not _utils.triton_ok(x):
        return fused_add_rms_norm_reference(x, residual, weight, eps, offset, casting_mode)
    row_settings(x.shape[-1])
    y, s, _ = ops.fused_add_rms_norm(x, residual, weight, float(eps), float(offset), casting_mode)
    return y, s
