"""Kullback-Leibler divergence loss, with exactly the semantics of ``torch.nn.functional.kl_div``.

Math (Kullback & Leibler, 1951; PyTorch's ``KLDivLoss`` convention, where ``input`` holds
the log-probabilities ``x = log q`` of the model and ``target`` the reference
distribution ``p``, either as probabilities or, with ``log_target=True``, as ``y = log p``),
elementwise::

    log_target=False:  l = xlogy(p, p) - p * x          (p * log p is 0 where p == 0)
    log_target=True:   l = exp(y) * (y - x)

and the reduction over all elements: ``"none"`` (the elementwise ``l``), ``"sum"``,
``"mean"`` (sum / numel) or ``"batchmean"`` (sum / input.size(0): the true KL divergence
per sample when each row is a distribution). With the optional ``eps`` (Liger Kernel's
``LigerKLDIVLoss(eps=...)`` behaviour) the non-log target is clamped inside the log only:
``l = p * (log(max(p, eps)) - x)``.

Gradients (computed in the backward from the saved tensors, fp32 math)::

    dl/dx = -p                     (log_target: -exp(y))
    dl/dp = log p + 1 - x          (eps: log(max(p, eps)) - x + [p > eps])
    dl/dy = exp(y) * (y - x + 1)   (log_target)

The input gradient needs only the target, so the backward reads one (N, V) tensor and
writes one. ``dl/dp`` at ``p == 0`` is the one-sided limit ``-inf`` (torch's autograd gives
NaN there).

Kernels: loads in the tensors' own dtypes, math in fp32. A reduced loss runs one program
per row (per part of a row when there are fewer rows than 8 programs per SM), adding each
block's sum to an fp32 total, into an (N, parts) buffer summed afterwards (deterministic, no
atomics). ``"none"`` and the backward run a 2-D grid of (row, block of columns) programs;
``"none"`` writes ``l`` rounded once to the output dtype. On an H200 the reduced forward is bound
by the instructions of fp32 ``log`` (libdevice's ``logf``), not by bytes, so for a bf16 target
it takes the log from a 128-entry table of the mantissa's logs (``_log_of_bf16``, as accurate
as ``logf``, 7-9% faster than Liger Kernel's clamped log). PTX's ``lg2.approx`` alone runs at
the copy rate but came out 0.7% off on a KL of 5e-5, and our own degree-7 polynomial log was
no faster than ``logf`` (benchmarks/NOTES.md, sessions 21 and 23).
"""
from __future__ import annotations

from typing import Optional

import torch

from ligerzoo._checks import check_real
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["kl_div", "kl_div_reference"]

REDUCTIONS = ("none", "sum", "mean", "batchmean")

# Columns per program (module-level so tests can shrink it below the row length).
MAX_BLOCK_SIZE = 2048


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _kl_elementwise(x, y, eps, LOG_TARGET: tl.constexpr, HAS_EPS: tl.constexpr):
        """fp32 elementwise loss of fp32 ``x = log q`` and ``y`` (p, or log p)."""
        if LOG_TARGET:
            return tl.exp(y) * (y - x)
        elif HAS_EPS:
            return y * (tl.log(tl.maximum(y, eps)) - x)
        else:
            # xlogy(y, y) - y * x: 0 at y == 0 (NaN when x is -inf, as torch), NaN for y < 0
            return y * (tl.log(tl.where(y == 0.0, 1.0, y)) - x)

    @triton.jit
    def _log_of_bf16(y, LOG_TABLE, APPROX_SPECIALS: tl.constexpr):
        """fp32 natural log of fp32 ``y`` holding bf16 values (7 mantissa bits), from a table.

        A positive normal finite ``y = 2**e * (1 + k/128)`` has ``log y = e' ln 2 + T[k]`` with
        ``T[k] = log(1 + k/128)`` and ``e' = e`` for k < 64, ``T[k] = log((1 + k/128) / 2)`` and
        ``e' = e + 1`` for k >= 64 (so the mantissa's part lies in [log 0.75, log 1.5) and ``e' ln 2``
        never cancels it), ``T`` correctly rounded (:func:`_bf16_log_table`), one FMA: within
        1.05 ulp of the exact log on every positive normal bf16 value (a CPU test checks them
        all), in about half the instructions of libdevice's ``logf``. Zero, subnormal,
        inf, negative and NaN ``y`` go through ``lg2.approx.f32`` (``APPROX_SPECIALS``, NVIDIA
        GPUs: 0 -> -inf, subnormals kept, whose logs are large enough that its 2**-22 absolute
        error is under half an ulp) or ``tl.log`` (the CPU interpreter)."""
        bits = y.to(tl.int32, bitcast=True)
        expo = bits >> 23                                     # sign and biased exponent
        normal = (expo - 1).to(tl.uint32, bitcast=True) < 254  # 1 <= expo <= 254, sign 0
        k = (bits >> 16) & 127                                # the 7 mantissa bits
        # e' - 127 + 1.5 * 2**23 in the low mantissa bits: float(e') without a conversion
        ef = (expo + (k >> 6) + (0x4B400000 - 127)).to(tl.float32, bitcast=True) - 12582912.0
        r = ef * 0.6931471805599453 + tl.load(LOG_TABLE + k)
        if APPROX_SPECIALS:
            special = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [y], dtype=tl.float32,
                                                is_pure=True, pack=1) * 0.6931471805599453
        else:
            special = tl.log(y)
        return tl.where(normal, r, special)

    @jit
    def _kl_div_fwd_kernel(
        X, stride_x,            # (N, V) input: log q
        Y, stride_y,            # (N, V) target: p, or log p when LOG_TARGET
        OUT, stride_out,        # (N, V) elementwise loss
        n_cols, eps,
        LOG_TARGET: tl.constexpr,
        HAS_EPS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        loss = _kl_elementwise(x, y, eps, LOG_TARGET, HAS_EPS)
        tl.store(OUT + row * stride_out + cols, loss.to(OUT.dtype.element_ty), mask=mask)

    @jit
    def _kl_div_sum_kernel(
        X, stride_x,            # (N, V) input: log q
        Y, stride_y,            # (N, V) target: p, or log p when LOG_TARGET
        PARTIAL,                # (N, n_splits) fp32: the sum of each row's split
        LOG_TABLE,              # (128,) fp32, read when TABLE_LOG (see _log_of_bf16)
        n_cols, split_cols, n_splits, eps,
        LOG_TARGET: tl.constexpr,
        HAS_EPS: tl.constexpr,
        TABLE_LOG: tl.constexpr,        # Y is bf16 (plain target, no eps): log from the table
        APPROX_SPECIALS: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        """Program (row, split) sums the loss over columns [split * split_cols, + split_cols)
        of its row, a block at a time (each block's sum added to an fp32 total: fewer live
        registers than a block-wide accumulator, measured faster)."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        start = split * split_cols
        end = tl.minimum(start + split_cols, n_cols)
        total = tl.zeros([], dtype=tl.float32)
        for off in range(start, end, BLOCK_SIZE):
            cols = off + tl.arange(0, BLOCK_SIZE)
            mask = cols < end
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            # masked columns load x = y = 0, whose loss is 0 in every mode: no select (measured
            # 4-8% faster on an H200, benchmarks/NOTES.md session 23)
            if TABLE_LOG:
                loss = y * (_log_of_bf16(tl.where(y == 0.0, 1.0, y), LOG_TABLE, APPROX_SPECIALS) - x)
            else:
                loss = _kl_elementwise(x, y, eps, LOG_TARGET, HAS_EPS)
            total += tl.sum(loss, axis=0)
        tl.store(PARTIAL + row * n_splits + split, total)

    @jit
    def _kl_div_bwd_kernel(
        X, stride_x,            # (N, V) input (read only when NEED_DY)
        Y, stride_y,            # (N, V) target
        GO, stride_go0, stride_go1,  # incoming gradient: (N, V) any strides, or one fp32 value
        DX, stride_dx,          # (N, V) out: gradient of input (when NEED_DX)
        DY, stride_dy,          # (N, V) out: gradient of target (when NEED_DY)
        n_cols, scale, eps,
        LOG_TARGET: tl.constexpr,
        HAS_EPS: tl.constexpr,
        GO_ELEMENTWISE: tl.constexpr,
        NEED_DX: tl.constexpr,
        NEED_DY: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        if GO_ELEMENTWISE:
            go = tl.load(GO + row * stride_go0 + cols * stride_go1, mask=mask, other=0.0).to(tl.float32)
        else:
            go = tl.load(GO).to(tl.float32)
        go = go * scale
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=1.0).to(tl.float32)
        if LOG_TARGET:
            p = tl.exp(y)
        else:
            p = y
        if NEED_DX:
            tl.store(DX + row * stride_dx + cols, (-p * go).to(DX.dtype.element_ty), mask=mask)
        if NEED_DY:
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            if LOG_TARGET:
                dy = p * (y - x + 1.0)
            elif HAS_EPS:
                dy = tl.log(tl.maximum(y, eps)) - x + tl.where(y > eps, 1.0, 0.0)
            else:
                dy = tl.log(y) + 1.0 - x
            tl.store(DY + row * stride_dy + cols, (dy * go).to(DY.dtype.element_ty), mask=mask)


def _block_settings(n_cols: int, limit: int | None = None) -> tuple[int, int]:
    """(columns per block, warps): the row's power of two, at most ``limit`` (default
    ``MAX_BLOCK_SIZE``)."""
    block = min(next_power_of_2(max(n_cols, 1)), next_power_of_2(MAX_BLOCK_SIZE if limit is None else limit))
    return block, (16 if block >= 8192 else 8 if block >= 2048 else 4)


# The reduced forward's programs loop over SUM_BLOCK_SIZE columns at a time; at least
# SUM_PROGRAMS_PER_SM programs per SM (rows split into parts when there are fewer rows).
SUM_BLOCK_SIZE = 8192
SUM_PROGRAMS_PER_SM = 8

# The reduced forward takes the log of a bf16 target from a 128-entry table (_log_of_bf16).
TABLE_LOG = True
_LOG_TABLES: dict = {}  # CPU device -> its table (GPU tables are copied per call, see below)
_PINNED_TABLE: list = []  # the pinned host table GPU calls copy from, once made

def _host_log_table() -> torch.Tensor:
    """(128,) fp32 on the CPU: ``log(1 + k/128)`` for k < 64, ``log((1 + k/128) / 2)`` for
    k >= 64, each computed in float64 and rounded once."""
    m = 1 + torch.arange(128, dtype=torch.float64) / 128
    return torch.log(torch.where(m >= 1.5, m / 2, m)).to(torch.float32)


def _bf16_log_table(device: torch.device) -> torch.Tensor:
    """:func:`_host_log_table` on ``device``. On a GPU no copy is kept: a device tensor held
    across calls could sit in a CUDA graph's private pool (torch.compile's cudagraph trees
    route allocations there during their warmup, when no capture runs: a cached table made
    its pool check fail on the H200). Each call copies the table from pinned host memory
    (one asynchronous 512-byte copy), or, inside a capture, builds it with captured kernels."""
    if device.type != "cuda":
        t = _LOG_TABLES.get(device)
        if t is None:
            t = _LOG_TABLES[device] = _host_log_table().to(device)
        return t
    if torch.cuda.is_current_stream_capturing():
        m = 1 + torch.arange(128, dtype=torch.float64, device=device) / 128
        return torch.log(torch.where(m >= 1.5, m / 2, m)).to(torch.float32)
    if not _PINNED_TABLE:
        _PINNED_TABLE.append(_host_log_table().pin_memory())
    return torch.empty(128, dtype=torch.float32, device=device).copy_(_PINNED_TABLE[0], non_blocking=True)


# ------------------------------------------------------------------ ops (torch.library + eager path)
@kernel_op("kl_div", mutates_args=())
def _kl_div_op(
    input: torch.Tensor,
    target: torch.Tensor,
    reduced: bool,
    scale: float,
    log_target: bool,
    eps: Optional[float],
) -> torch.Tensor:
    """input, target: (N, V) with unit column stride. -> fp32 () when ``reduced`` (the sum
    times ``scale``), else the elementwise (N, V) loss in promote(input, target) dtype."""
    n_rows, n_cols = input.shape
    # the kernels take eps as fp32: below its smallest subnormal, max(p, eps) equals max(p, 2**-149)
    # for every fp32 p (and eps no longer rounds to 0, whose log would make 0 * log 0 = NaN)
    eps_value = max(float(eps), 2.0 ** -149) if eps is not None else 0.0
    if reduced:
        # one program per row, or per part of a row when there are too few rows to fill the
        # GPU: (N, n_splits) fp32 partial sums, summed in one pass (deterministic)
        block, warps = _block_settings(n_cols, SUM_BLOCK_SIZE)
        n_blocks = cdiv(n_cols, block)
        want = SUM_PROGRAMS_PER_SM * _utils.multiprocessor_count(input.device)
        n_splits = max(1, min(n_blocks, cdiv(want, max(n_rows, 1))))
        split_cols = cdiv(n_blocks, n_splits) * block
        n_splits = cdiv(n_cols, split_cols) if n_cols else 1
        if not input.numel():
            return input.new_zeros((), dtype=torch.float32) * scale
        partial = torch.empty((n_rows, n_splits), dtype=torch.float32, device=input.device)
        with device_guard(input):
            table = target.dtype == torch.bfloat16 and not log_target and eps is None and TABLE_LOG
            _kl_div_sum_kernel[(n_rows, n_splits)](
                input, input.stride(0), target, target.stride(0), partial,
                _bf16_log_table(input.device) if table else partial,
                n_cols, split_cols, n_splits, eps_value,
                LOG_TARGET=log_target, HAS_EPS=eps is not None, TABLE_LOG=table,
                APPROX_SPECIALS=input.is_cuda and torch.version.hip is None and not _utils.interpreter_enabled(),
                BLOCK_SIZE=block, num_warps=warps,
            )
        return partial.sum() * scale
    block, warps = _block_settings(n_cols)
    out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(input.dtype, target.dtype), device=input.device)
    if input.numel():
        with device_guard(input):
            _kl_div_fwd_kernel[(n_rows, cdiv(n_cols, block))](
                input, input.stride(0), target, target.stride(0), out, out.stride(0), n_cols, eps_value,
                LOG_TARGET=log_target, HAS_EPS=eps is not None, BLOCK_SIZE=block, num_warps=warps,
            )
    return out


@_kl_div_op.register_fake
def _(input, target, reduced, scale, log_target, eps):
    if reduced:
        return input.new_empty((), dtype=torch.float32)
    return input.new_empty(input.shape, dtype=torch.promote_types(input.dtype, target.dtype))


@kernel_op("kl_div_backward", mutates_args=())
def _kl_div_backward_op(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    reduced: bool,
    scale: float,
    log_target: bool,
    eps: Optional[float],
    need_input: bool,
    need_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_input (N, V) or empty, grad_target (N, V) or empty)."""
    n_rows, n_cols = input.shape
    gi = torch.empty((n_rows, n_cols), dtype=input.dtype, device=input.device) if need_input else None
    gt = torch.empty((n_rows, n_cols), dtype=target.dtype, device=target.device) if need_target else None
    if reduced:
        go = grad_out.reshape(1).to(torch.float32)                                  # (1,)
        s0 = s1 = 0
    else:
        go = grad_out                                                                # (N, V), any strides
        if go.stride(1) not in (0, 1):  # e.g. the gradient of a transposed loss: the kernel's
            go = go.contiguous()        # column offsets (cols * stride) are 32-bit
        s0, s1 = go.stride()
    if input.numel() and (need_input or need_target):
        block, warps = _block_settings(n_cols)
        dummy = gi if gi is not None else gt
        with device_guard(input):
            _kl_div_bwd_kernel[(n_rows, cdiv(n_cols, block))](
                input, input.stride(0), target, target.stride(0), go, s0, s1,
                gi if gi is not None else dummy, dummy.stride(0) if gi is None else gi.stride(0),
                gt if gt is not None else dummy, dummy.stride(0) if gt is None else gt.stride(0),
                n_cols, float(scale), float(eps) if eps is not None else 0.0,
                LOG_TARGET=log_target, HAS_EPS=eps is not None, GO_ELEMENTWISE=not reduced,
                NEED_DX=need_input, NEED_DY=need_target, BLOCK_SIZE=block, num_warps=warps,
            )
    return (gi if gi is not None else input.new_empty(0), gt if gt is not None else target.new_empty(0))


@_kl_div_backward_op.register_fake
def _(grad_out, input, target, reduced, scale, log_target, eps, need_input, need_target):
    gi = torch.empty_like(input, memory_format=torch.contiguous_format) if need_input else input.new_empty(0)
    gt = torch.empty_like(target, memory_format=torch.contiguous_format) if need_target else target.new_empty(0)
    return gi, gt


def _setup_context(ctx, inputs, output):
    input, target, reduced, scale, log_target, eps = inputs
    ctx.opts = (reduced, scale, log_target, eps)
    ctx.save_for_backward(input, target)


def _backward(ctx, grad_out):
    input, target = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gi, gt = ops.kl_div_backward(grad_out, input, target, *ctx.opts, need_input, need_target)
    return (gi if need_input else None, gt if need_target else None, None, None, None, None)


ops.kl_div.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- reference
def _reduction_scale(reduction: str, shape: torch.Size, numel: int) -> float:
    if reduction == "mean":
        return 1.0 / numel if numel else float("nan")
    if reduction == "batchmean":
        return 1.0 / shape[0] if shape[0] else float("nan")
    return 1.0


def kl_div_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "batchmean",
    log_target: bool = False,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """Plain-PyTorch :func:`kl_div` (same semantics and output dtypes), differentiable by
    torch autograd. Math in ``promote(input, target, float32)``. At ``target == 0`` (with
    ``log_target=False`` and no ``eps``) autograd's target gradient is NaN, not ``-inf``.

    Arguments, shapes and dtypes as :func:`kl_div`; it does not check them as that
    function does (bad input fails in torch's own ops).
    """
    cdt = torch.promote_types(torch.promote_types(input.dtype, target.dtype), torch.float32)
    x = input.to(cdt)
    y = target.to(cdt)
    if log_target:
        loss = torch.exp(y) * (y - x)
    elif eps is not None:
        loss = y * (torch.log(y.clamp(min=eps)) - x)
    else:
        loss = torch.xlogy(y, y) - y * x
    if reduction == "none":
        return loss.to(torch.promote_types(input.dtype, target.dtype))
    total = loss.sum()
    if cdt == torch.float32:
        total = total.to(torch.float32)
    return total * _reduction_scale(reduction, input.shape, input.numel())


# ---------------------------------------------------------------------------- public
def _check(input: torch.Tensor, target: torch.Tensor, reduction: str, eps: Optional[float]) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if input.dim() < 1:
        raise ValueError("kl_div expects input with at least one dimension (..., V)")
    if input.shape != target.shape:
        raise ValueError(
            f"input {tuple(input.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    if not (input.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"input and target must be float tensors, got {input.dtype} and {target.dtype}")
    if input.device != target.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}")
    if eps is not None and not 0.0 < check_real("eps", eps) <= torch.finfo(torch.float32).max:
        raise ValueError(f"eps must be > 0 and at most fp32's largest value 3.4e38 (or None), got {eps}")


def kl_div(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "batchmean",
    log_target: bool = False,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """KL divergence loss ``torch.nn.functional.kl_div(input, target, reduction, log_target)``.

    ``input`` holds log-probabilities ``log q``; ``target`` holds ``p`` (or ``log p`` with
    ``log_target=True``). Elementwise ``xlogy(p, p) - p * log q`` (``exp(log p) * (log p -
    log q)``), reduced as torch does (see the module docstring; math from PyTorch's
    ``KLDivLoss``, Kullback & Leibler 1951). Computed in fp32 for fp32 / bf16 / fp16
    inputs.

    Args:
        input: (..., V) float (fp32 / bf16 / fp16; float64 runs the torch reference), any
            strides. Rows are the leading dims flattened.
        target: same shape and device as ``input``; any float dtype.
        reduction: "none" | "sum" | "mean" (over all elements) | "batchmean" (sum divided
            by ``input.shape[0]``, torch's convention).
        log_target: ``target`` holds log-probabilities.
        eps: optional clamp of ``p`` inside the log (``p * (log(max(p, eps)) - log q)``,
            Liger Kernel's variant); ``None`` (default) is torch's exact ``xlogy``.

    Returns:
        fp32 scalar for the reductions (float64 when either input is float64: the torch
        reference); for "none" the (..., V) elementwise loss in
        ``promote_types(input.dtype, target.dtype)`` (torch's dtype).

    Gradients: with respect to ``input`` always (``-p`` times the reduction factor), and
    with respect to ``target`` when it requires grad (``log p + 1 - log q``, or
    ``exp(y)(y - log q + 1)`` for a log target; ``-inf`` where ``p == 0``).

    Raises:
        ValueError: shapes, devices differ, non-float or 0-dim tensors, unknown reduction,
            eps <= 0 or above 3.4e38.
    """
    _check(input, target, reduction, eps)
    eps = float(eps) if eps is not None else None
    if not _utils.triton_ok(input, target):
        return kl_div_reference(input, target, reduction, log_target, eps)
    shape = input.shape
    reduced = reduction != "none"
    scale = _reduction_scale(reduction, shape, input.numel())
    rows_in, rows_t = _utils.as_rows(input, shape[-1]), _utils.as_rows(target, shape[-1])  # (N, V)
    out = ops.kl_div(rows_in, rows_t, reduced, scale, bool(log_target), eps)
    return out if reduced else out.view(shape)
