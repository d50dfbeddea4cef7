"""Layer normalisation over the last dim.

Math (Ba, Kiros & Hinton, "Layer Normalization", 2016; ``torch.nn.functional.layer_norm``
with ``normalized_shape = (H,)``), per row of ``H`` features, all in fp32::

    mean = sum(x) / H
    var  = sum((x - mean) ** 2) / H               # biased, as torch
    rstd = 1 / sqrt(var + eps)                    # mean and rstd cached in fp32
    xhat = (x - mean) * rstd
    y    = xhat * weight + bias                   # rounded once to x.dtype

The variance is computed from the centred values held in registers (two passes over
the row in registers, one read of memory), not as ``E[x^2] - mean^2``.

Gradients, from the saved input and the fp32 ``mean`` / ``rstd``, with ``g = dy * weight``::

    dx     = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat
    dbias   = sum over rows of dy

``dweight`` / ``dbias`` are accumulated in fp32: each backward program owns a contiguous
block of rows and one fp32 partial row of each, and the partial rows are summed after.
"""
from __future__ import annotations

from typing import Optional

import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops, sum_partials
from ligerzoo.kernels._utils import (
    HAS_TRITON,
    as_rows,
    device_guard,
    persistent_row_blocks,
    row_settings,
    row_tile_settings,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ligerzoo.kernels._utils import load_row_stat, load_row_tiles

__all__ = ["layer_norm", "layer_norm_reference"]


# A forward program normalises up to _MAX_BLOCK_ROWS rows at once (when rows are short),
# a tile holding about _TILE_ELEMS elements. Backward: _BWD_PROGRAMS_PER_SM persistent
# programs per SM (a fixed count on CPU). Module-level so tests can shrink them.
_MAX_BLOCK_ROWS = 16
_TILE_ELEMS = 4096
_BWD_TILE_ELEMS = 8192  # two rows of 4096 per tile; see rms_norm.py's _BWD_TILE_ELEMS
_BWD_PROGRAMS_PER_SM = 1
_BWD_PROGRAMS_CPU = 4


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @jit
    def _layer_norm_fwd_kernel(
        X, stride_x,          # (N, H) input rows
        Y, stride_y,          # (N, H) out
        W, B,                 # (H,) weight / bias (read only when HAS_WEIGHT / HAS_BIAS)
        MEAN, RSTD,           # (N,) fp32 out
        n_rows, n_cols, eps,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
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

        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols                                # (BLOCK_M,)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / n_cols
        rstd = tl.rsqrt(var + eps)                                       # (BLOCK_M,)
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = y * w[None, :]
        if HAS_BIAS:
            b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = y + b[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_mask)
        tl.store(RSTD + rows, rstd, mask=row_mask)

    @jit
    def _layer_norm_bwd_kernel(
        DY, stride_dy,        # (N, H) gradient of y
        X, stride_x,          # (N, H) forward input
        W,                    # (H,) weight (read only when HAS_WEIGHT)
        MEAN, RSTD,           # (N,) fp32
        DX, stride_dx,        # (N, H) out
        PARTIAL,              # (G, P, H) fp32 out: one partial row per program of dw
                              # (COMPUTE_DW) then of db (COMPUTE_DB), G = their count
        n_rows, n_cols, rows_per_program,
        HAS_WEIGHT: tl.constexpr,
        COMPUTE_DW: tl.constexpr,
        COMPUTE_DB: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        row_start = pid * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, n_rows)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)

        dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # register double buffering: the next tile's loads are issued before this tile's
        # reductions, so each program keeps two tiles of reads in flight
        # (and the per-row mean and rstd: their loads would otherwise stall each tile's reductions)
        dy_next, x_next = load_row_tiles(DY, stride_dy, X, stride_x, row_start, row_end, cols, col_mask, BLOCK_M)
        mean_next = load_row_stat(MEAN, row_start, row_end, BLOCK_M)
        rstd_next = load_row_stat(RSTD, row_start, row_end, BLOCK_M)
        for m in range(row_start, row_end, BLOCK_M):
            rows = m + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            rows64 = rows.to(tl.int64)

            dy = dy_next.to(tl.float32)
            x = x_next.to(tl.float32)
            mean, rstd = mean_next, rstd_next
            dy_next, x_next = load_row_tiles(DY, stride_dy, X, stride_x, m + BLOCK_M, row_end, cols, col_mask, BLOCK_M)
            mean_next = load_row_stat(MEAN, m + BLOCK_M, row_end, BLOCK_M)
            rstd_next = load_row_stat(RSTD, m + BLOCK_M, row_end, BLOCK_M)

            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(g, axis=1) / n_cols                              # (BLOCK_M,)
            c2 = tl.sum(g * xhat, axis=1) / n_cols
            dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy

        if COMPUTE_DW:
            tl.store(PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if COMPUTE_DB:
            if COMPUTE_DW:
                db_partial = PARTIAL + tl.num_programs(0) * n_cols
            else:
                db_partial = PARTIAL
            tl.store(db_partial + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------- launchers
def _blocks(n_cols: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N >= H columns, num_warps) of one program's tile. The backward
    tile is _BWD_TILE_ELEMS and holds about twice the live values per element of the
    forward's (dy, x, the next tile's dy and x, the two fp32 accumulators), so it asks for
    the warps of twice its size (H = 4096: 2 rows under 16 warps)."""
    if backward:
        return row_tile_settings(n_cols, _MAX_BLOCK_ROWS, _BWD_TILE_ELEMS, warp_scale=2)
    return row_tile_settings(n_cols, _MAX_BLOCK_ROWS, _TILE_ELEMS)


def _launch_forward(x, weight, bias, eps):
    n_cols = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, mean.fill_(0.0), rstd.fill_(0.0)
    x2 = as_rows(x, n_cols)                                              # (N, H)
    n_rows = x2.shape[0]
    y2 = y.view(-1, n_cols)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    block_m, block_n, num_warps = _blocks(n_cols)
    with device_guard(x):
        _layer_norm_fwd_kernel[(cdiv(n_rows, block_m),)](
            x2, x2.stride(0), y2, y2.stride(0), w, b, mean, rstd, n_rows, n_cols, float(eps),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y, mean, rstd


def _launch_backward(dy, x, weight, mean, rstd, compute_dw, compute_db, param_dtype):
    """Returns dx (x's shape and dtype, contiguous) and the (G, H) parameter gradients in
    ``param_dtype``: dweight then dbias, each only when requested (G = 0, 1 or 2)."""
    n_cols = x.shape[-1]
    groups = int(compute_dw) + int(compute_db)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros((groups, n_cols), dtype=param_dtype, device=x.device)
    x2 = as_rows(x, n_cols)
    dy2 = as_rows(dy, n_cols)
    dx2 = dx.view(-1, n_cols)
    n_rows = x2.shape[0]
    block_m, block_n, num_warps = _blocks(n_cols, backward=True)
    programs, rows_per_program = persistent_row_blocks(x.device, n_rows, _BWD_PROGRAMS_PER_SM, _BWD_PROGRAMS_CPU)
    partial = torch.empty((groups, programs, n_cols), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _layer_norm_bwd_kernel[(programs,)](
            dy2, dy2.stride(0), x2, x2.stride(0), weight.contiguous() if weight is not None else x2,
            mean if mean.is_contiguous() else mean.contiguous(), rstd if rstd.is_contiguous() else rstd.contiguous(),
            dx2, dx2.stride(0), partial if groups else dx2,
            n_rows, n_cols, rows_per_program,
            HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )
    return dx, sum_partials(partial, param_dtype)


# ----------------------------------------------------------------------------- ops (torch.library + eager path)
@kernel_op("layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@kernel_op("layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    compute_db: bool,
    param_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(dy, x, weight, mean, rstd, compute_dw, compute_db, param_dtype)


@_layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, compute_dw, compute_db, param_dtype):
    groups = int(compute_dw) + int(compute_db)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, x.new_empty((groups, x.shape[-1]), dtype=param_dtype)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean / rstd
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.w_dtype = weight.dtype if weight is not None else None
    ctx.b_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    compute_dw = ctx.has_weight and ctx.needs_input_grad[1]
    compute_db = ctx.has_bias and ctx.needs_input_grad[2]
    param_dtype = _utils.param_grad_dtype(ctx.w_dtype if compute_dw else None, ctx.b_dtype if compute_db else None)
    dx, params = ops.layer_norm_backward(dy, x, weight, mean, rstd, compute_dw, compute_db, param_dtype)  # (G, H)
    dw = params[0].to(ctx.w_dtype) if compute_dw else None
    db = params[-1].to(ctx.b_dtype) if compute_db else None
    return dx, dw, db, None


ops.layer_norm.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- reference
def layer_norm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Plain-PyTorch :func:`layer_norm` with the same math: statistics and affine in
    ``promote_types(x.dtype, float32)`` (float64 input gives a float64 reference), one
    rounding to ``x.dtype`` at the end. Differentiable by torch autograd.

    Arguments, shapes, dtypes and errors as :func:`layer_norm`.
    """
    _check_args(x, weight, bias)
    ct = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(ct)                                                       # (..., H)
    xc = x32 - x32.mean(dim=-1, keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- public API
def _check_args(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    if not x.is_floating_point():
        raise ValueError(f"layer_norm expects a floating-point input, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("layer_norm expects an input with at least one dimension (..., H)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _utils.check_norm_param(name, p, x, x.shape[-1], "the last dim of x")



def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalisation over the last dim (Ba et al., 2016, arXiv 1607.06450), as
    ``torch.nn.functional.layer_norm(x, (H,), weight, bias, eps)``.

    Statistics (mean, biased variance) and the affine transform are computed in fp32 and
    rounded once to ``x.dtype``; the backward returns ``dx``, ``dweight`` and ``dbias``
    (the last two accumulated in fp32, then cast to the parameter dtypes).

    Args:
        x: (..., H) fp32 / bf16 / fp16 (float64 runs the torch reference). Any strides;
            rows are read in place when the last dim has unit stride.
        weight: (H,) any float dtype, or None (no scale).
        bias: (H,) any float dtype, or None (no shift).
        eps: added to the variance.

    Returns:
        y: same shape and dtype as ``x``; contiguous on the Triton path (the torch
        reference may follow ``x``'s strides).

    Raises:
        ValueError: non-float or 0-dim ``x``, non-float parameters, ``weight`` / ``bias``
            not of shape (H,), devices differ, or (Triton path only) H larger than 65536
            (one row must fit a block).
    """
    _check_args(x, weight, bias)
    if not _utils.triton_ok(x):
        return layer_norm_reference(x, weight, bias, eps)
    row_settings(x.shape[-1])  # raises ValueError for rows that cannot fit one block
    y, _, _ = ops.layer_norm(x, weight, bias, float(eps))
    return y
