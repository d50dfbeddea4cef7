"""SwiGLU activation: ``silu(gate) * up``; and the gated-activation machinery it shares
with GeGLU (:mod:`ligerzoo.kernels.geglu`).

Math (Shazeer, "GLU Variants Improve Transformer", 2020; the Llama MLP
``down(silu(gate(x)) * up(x))``), elementwise in fp32 with ``s = sigmoid(gate)``::

    y      = gate * s * up
    d_up   = dy * gate * s
    d_gate = dy * up * s * (1 + gate * (1 - s))

The backward recomputes ``s`` from the saved inputs, so nothing beyond ``gate`` and
``up`` (which the matmuls keep anyway) is saved.

Two entry points:

- :func:`swiglu` takes ``gate`` and ``up`` as separate (..., I) tensors, which may be
  strided views (e.g. the two halves of one fused ``(N, 2I)`` projection); rows are
  addressed through their strides, nothing is copied.
- :func:`swiglu_fused` takes the fused ``(..., 2I)`` tensor (gate first, then up, as in
  Phi-3's ``gate_up_proj`` or a model that fuses the two projections into one matmul)
  and its backward writes one ``(..., 2I)`` gradient directly (no ``torch.cat``).

Shared machinery: one forward and one backward kernel for ``act(gate) * up``, with the
activation chosen by the constexpr ``ACT`` (:data:`ACT_SILU`, :data:`ACT_GELU_TANH`),
and :func:`_register_gated_ops`, which registers the four ``torch.library`` ops
(split / fused, forward / backward) of one activation.
"""
from __future__ import annotations

import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, KernelOp, ops
from ligerzoo.kernels._utils import HAS_TRITON, as_rows, device_guard, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["swiglu", "swiglu_fused", "swiglu_reference", "swiglu_fused_reference"]

# Activation codes of the gated kernels (the ACT constexpr).
ACT_SILU = 0
ACT_GELU_TANH = 1

# Columns per program: at most _MAX_BLOCK (module-level so tests can shrink it below the row
# length) and the cap of _TILES[(activation, backward)] = (cap, columns per warp). From
# session 28's sweep on the H200 (bf16, 4096-16384 x 14336, the 1-D grid; run 2 of
# benchmarks/kernels_h200_s28.log), the tile of each pass fastest at every size or within 0.2%
# of the fastest: forwards 4096 columns (SiLU under 16 warps, GELU under 8), backwards 2048
# under 8.
_MAX_BLOCK = 16384
_TILES = {
    (ACT_SILU, False): (4096, 256),
    (ACT_SILU, True): (2048, 256),
    (ACT_GELU_TANH, False): (4096, 512),
    (ACT_GELU_TANH, True): (2048, 256),
}


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _gelu_tanh_sigmoid(a):
        """For the tanh GELU ``0.5 a (1 + tanh(u))``, ``u = sqrt(2/pi) (a + 0.044715 a^3)``:
        returns ``s = sigmoid(2u) = 0.5 (1 + tanh(u))`` and ``1 - s``, both without
        cancellation (from ``e = exp(-2|u|)``), so ``gelu = a * s``."""
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        e = tl.exp(-2.0 * tl.abs(u))
        r = 1.0 / (1.0 + e)
        s = tl.where(u >= 0, r, e * r)
        s_c = tl.where(u >= 0, e * r, r)
        return s, s_c

    @triton.jit
    def _gated_act(a, ACT: tl.constexpr):
        """act(a) in fp32."""
        if ACT == 0:  # silu
            out = a * tl.sigmoid(a)
        else:  # gelu, tanh approximation
            s, _ = _gelu_tanh_sigmoid(a)
            out = a * s
        return out

    @triton.jit
    def _gated_act_and_grad(a, ACT: tl.constexpr):
        """(act(a), act'(a)) in fp32."""
        if ACT == 0:  # silu' = s (1 + a (1 - s))
            s = tl.sigmoid(a)
            out = a * s
            d = s * (1.0 + a * (1.0 - s))
        else:  # (a s)' = s + a * 2 s (1 - s) * du/da
            s, s_c = _gelu_tanh_sigmoid(a)
            out = a * s
            # Clamped polynomial: where s (1 - s) underflows to 0, 0 * inf would be NaN.
            ac = tl.minimum(tl.maximum(a, -1.0e4), 1.0e4)
            du = 0.7978845608028654 * (1.0 + 0.134145 * ac * ac)
            d = s + a * (2.0 * s * s_c) * du
        return out, d

    @jit
    def _gated_fwd_kernel(
        A, stride_a,      # (N, I) gate rows
        B, stride_b, b_off,  # (N, I) up rows, from column b_off of B's rows (I for a fused (N, 2I))
        Y, stride_y,      # (N, I) out
        n_cols, n_blocks,  # n_blocks = cdiv(n_cols, BLOCK)
        ACT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per BLOCK columns of a row, a row's blocks on neighbouring programs (a
        # 1-D grid; rows on axis 0 of a 2-D grid put them a grid row apart: a backward 2.3%
        # slower at 16384 rows of 14336, session 28). The up rows start at column b_off of
        # B's rows: an offset not a multiple of 16 hides their alignment from Triton (no
        # model's I is one).
        pid = tl.program_id(0)
        row = (pid // n_blocks).to(tl.int64)
        cols = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride_b + b_off + cols, mask=mask, other=0.0).to(tl.float32)
        y = _gated_act(a, ACT) * b
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)

    @jit
    def _gated_bwd_kernel(
        DY, stride_dy,    # (N, I)
        A, stride_a,      # (N, I) gate
        B, stride_b, b_off,  # (N, I) up, from column b_off
        DA, stride_da,    # (N, I) out: gradient of gate
        DB, stride_db, db_off,  # (N, I) out: gradient of up, from column db_off
        Y, stride_y,      # (N, I) out: act(gate) * up, recomputed (written only when STORE_Y)
        n_cols, n_blocks,  # n_blocks = cdiv(n_cols, BLOCK)
        ACT: tl.constexpr,
        STORE_Y: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # Every element is read before it is written, by the same program, so the outputs may
        # alias the inputs (DA, DB over A, B and Y over DY: the in-place recompute variant).
        # Grid as the forward's.
        pid = tl.program_id(0)
        row = (pid // n_blocks).to(tl.int64)
        cols = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride_b + b_off + cols, mask=mask, other=0.0).to(tl.float32)
        act, dact = _gated_act_and_grad(a, ACT)
        db = dy * act
        da = dy * b * dact
        tl.store(DA + row * stride_da + cols, da.to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + row * stride_db + db_off + cols, db.to(DB.dtype.element_ty), mask=mask)
        if STORE_Y:
            tl.store(Y + row * stride_y + cols, (act * b).to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
def _settings(n_cols: int, act: int = ACT_SILU, backward: bool = False) -> tuple[int, int]:
    """(columns per program, num_warps) of the gated kernels for rows of ``n_cols``."""
    cap, per_warp = _TILES[(act, backward)]
    block = min(next_power_of_2(n_cols), cap, _MAX_BLOCK)
    return block, max(4, min(32, block // per_warp))


def _forward(a2: torch.Tensor, b2: torch.Tensor, n_cols: int, act: int, shape, b_off: int = 0) -> torch.Tensor:
    """Gate rows ``a2[:, :n_cols]`` and up rows ``b2[:, b_off:b_off + n_cols]`` (2-D, unit column
    stride; a fused (N, 2I) tensor is passed as both, with ``b_off = I``, so no slice is made).
    Returns y contiguous, shaped ``shape`` (N * I elements): a tensor of its own, not a view
    (autograd then has no view to track)."""
    n_rows = a2.shape[0]
    y = a2.new_empty(shape)
    if y.numel() == 0:
        return y
    block, num_warps = _settings(n_cols, act)
    n_blocks = cdiv(n_cols, block)
    with device_guard(a2):
        _gated_fwd_kernel[(n_rows * n_blocks,)](
            a2, a2.stride(0), b2, b2.stride(0), b_off, y, n_cols, n_cols, n_blocks, ACT=act, BLOCK=block,
            num_warps=num_warps,
        )
    return y


def _backward(dy2, a2, b2, da2, db2, n_cols: int, act: int, y2=None, b_off: int = 0, db_off: int = 0) -> None:
    """Writes the gate / up gradients into ``da2[:, :n_cols]`` / ``db2[:, db_off:db_off + n_cols]``
    (and, when ``y2`` is given, the recomputed forward output ``act(a) * b`` into it), reading
    ``dy2``, ``a2[:, :n_cols]`` and ``b2[:, b_off:b_off + n_cols]``: 2-D tensors of N rows with
    unit column stride (a fused (N, 2I) tensor goes in twice, with offsets I)."""
    n_rows = a2.shape[0]
    if n_rows * n_cols == 0:
        return
    block, num_warps = _settings(n_cols, act, backward=True)
    n_blocks = cdiv(n_cols, block)
    y_arg = y2 if y2 is not None else da2
    with device_guard(a2):
        _gated_bwd_kernel[(n_rows * n_blocks,)](
            dy2, dy2.stride(0), a2, a2.stride(0), b2, b2.stride(0), b_off,
            da2, da2.stride(0), db2, db2.stride(0), db_off, y_arg, y_arg.stride(0), n_cols, n_blocks,
            ACT=act, STORE_Y=y2 is not None, BLOCK=block, num_warps=num_warps,
        )


def _owned(*ts: torch.Tensor) -> bool:
    """Whether ``inplace`` may write gradients over the inputs ``ts``: each needs a gradient
    and is an intermediate result (not a leaf, nor a view of one: a parameter or a tensor the
    caller made would be lost)."""
    return all(t.requires_grad and not _utils.of_leaf(t) for t in ts)


def _rows_overwritable(dy: torch.Tensor, *ts: torch.Tensor) -> bool:
    """Whether the backward may write its gradients over ``ts`` (the saved inputs) while it
    reads ``dy``: :func:`ligerzoo.kernels._utils.overwritable` for ``ts``, ``dy`` apart from
    each, and every ``t``'s (N, cols) row view a view of ``t`` (not a copy)."""
    if not (_utils.overwritable(*ts, dy) if dy.is_contiguous() else
            (_utils.overwritable(*ts) and all(_utils.disjoint(dy, t) for t in ts))):
        return False
    return all(t.is_contiguous() or t.numel() == 0 or as_rows(t, t.shape[-1]).data_ptr() == t.data_ptr()
               for t in ts)


def _row_view(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The (N, n_cols) view of a contiguous (..., n_cols) tensor (N given: -1 is ambiguous
    when n_cols == 0)."""
    return t.view(t.shape[:-1].numel(), n_cols)


# ----------------------------------------------------------------------------- torch.library ops
def _register_gated_ops(name: str, act: int) -> None:
    """Registers ``ligerzoo::<name>(gate, up)`` and ``ligerzoo::<name>_fused(gate_up)``
    (with their ``*_backward`` ops, fake implementations and autograd) computing
    ``act(gate) * up`` with the gated kernels above."""

    def split_op(gate: torch.Tensor, up: torch.Tensor, inplace: bool) -> torch.Tensor:
        # ``inplace`` only changes the backward (see swiglu's docstring)
        n_cols = gate.shape[-1]
        return _forward(as_rows(gate, n_cols), as_rows(up, n_cols), n_cols, act, gate.shape)

    def split_fake(gate, up, inplace):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    def split_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_cols = gate.shape[-1]
        dgate = torch.empty_like(gate, memory_format=torch.contiguous_format)
        dup = torch.empty_like(up, memory_format=torch.contiguous_format)
        _backward(as_rows(dy, n_cols), as_rows(gate, n_cols), as_rows(up, n_cols),
                  _row_view(dgate, n_cols), _row_view(dup, n_cols), n_cols, act)
        return dgate, dup

    def split_backward_fake(dy, gate, up):
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(up, memory_format=torch.contiguous_format))

    def split_backward_inplace_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
        # gate and up become their gradients (row views of them: checked by the caller)
        n_cols = gate.shape[-1]
        g2, u2 = as_rows(gate, n_cols), as_rows(up, n_cols)
        _backward(as_rows(dy, n_cols), g2, u2, g2, u2, n_cols, act)

    def split_setup_context(ctx, inputs, output):
        gate, up, inplace = inputs
        ctx.save_for_backward(gate, up)
        ctx.inplace = inplace and _owned(gate, up)

    def split_autograd(ctx, dy):
        gate, up = ctx.saved_tensors
        if ctx.inplace and _rows_overwritable(dy, gate, up):
            getattr(ops, f"{name}_backward_")(dy, gate, up)
            # fresh tensors over the same memory: autograd takes them as the gradients
            # instead of copying
            return gate.detach(), up.detach(), None
        return (*getattr(ops, f"{name}_backward")(dy, gate, up), None)

    def fused_op(gate_up: torch.Tensor, inplace: bool) -> torch.Tensor:
        two_i = gate_up.shape[-1]
        n_cols = two_i // 2
        gu2 = as_rows(gate_up, two_i)                                     # (N, 2I): gate | up
        return _forward(gu2, gu2, n_cols, act, (*gate_up.shape[:-1], n_cols), b_off=n_cols)  # (..., I)

    def fused_fake(gate_up, inplace):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    def fused_backward_op(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        two_i = gate_up.shape[-1]
        n_cols = two_i // 2
        gu2 = as_rows(gate_up, two_i)
        dgu = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        dgu2 = _row_view(dgu, two_i)
        _backward(as_rows(dy, n_cols), gu2, gu2, dgu2, dgu2, n_cols, act, b_off=n_cols, db_off=n_cols)
        return dgu

    def fused_backward_fake(dy, gate_up):
        return torch.empty_like(gate_up, memory_format=torch.contiguous_format)

    def fused_backward_inplace_op(dy: torch.Tensor, gate_up: torch.Tensor) -> None:
        # In place, for a caller that owns gate_up: gate_up (..., 2I, contiguous) becomes its
        # gradient (each element is read before the same thread overwrites it).
        two_i = gate_up.shape[-1]
        n_cols = two_i // 2
        gu2 = as_rows(gate_up, two_i)  # a view (the callers check)
        _backward(as_rows(dy, n_cols), gu2, gu2, gu2, gu2, n_cols, act, b_off=n_cols, db_off=n_cols)

    def recompute_backward_op(dy: torch.Tensor, gate_up: torch.Tensor) -> None:
        # In place, for a caller that owns both buffers: gate_up (..., 2I) becomes its
        # gradient and dy (..., I) becomes the recomputed forward output act(gate) * up.
        two_i = gate_up.shape[-1]
        n_cols = two_i // 2
        gu2, dy2 = _row_view(gate_up, two_i), _row_view(dy, n_cols)
        _backward(dy2, gu2, gu2, gu2, gu2, n_cols, act, y2=dy2, b_off=n_cols, db_off=n_cols)

    def recompute_backward_fake(dy, gate_up):
        return None

    def recompute_backward_out_op(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        # As above but gate_up is only read: its gradient is returned in a new tensor
        # (dy still becomes act(gate) * up).
        two_i = gate_up.shape[-1]
        n_cols = two_i // 2
        gu2, dy2 = as_rows(gate_up, two_i), _row_view(dy, n_cols)
        dgu = torch.empty_like(gate_up, memory_format=torch.contiguous_format)
        dgu2 = _row_view(dgu, two_i)
        _backward(dy2, gu2, gu2, dgu2, dgu2, n_cols, act, y2=dy2, b_off=n_cols, db_off=n_cols)
        return dgu

    def recompute_backward_out_fake(dy, gate_up):
        return torch.empty_like(gate_up, memory_format=torch.contiguous_format)

    def fused_setup_context(ctx, inputs, output):
        gate_up, inplace = inputs
        ctx.save_for_backward(gate_up)
        ctx.inplace = inplace and _owned(gate_up)

    def fused_autograd(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        if ctx.inplace and _rows_overwritable(dy, gate_up):
            getattr(ops, f"{name}_fused_backward_")(dy, gate_up)
            return gate_up.detach(), None
        return getattr(ops, f"{name}_fused_backward")(dy, gate_up), None

    for op_name, fn, fake in (
        (name, split_op, split_fake),
        (f"{name}_backward", split_backward_op, split_backward_fake),
        (f"{name}_fused", fused_op, fused_fake),
        (f"{name}_fused_backward", fused_backward_op, fused_backward_fake),
    ):
        KernelOp(op_name, fn).register_fake(fake)
    KernelOp(f"{name}_backward_", split_backward_inplace_op,
             mutates_args=("gate", "up")).register_fake(lambda dy, gate, up: None)
    KernelOp(f"{name}_fused_backward_", fused_backward_inplace_op,
             mutates_args=("gate_up",)).register_fake(recompute_backward_fake)
    KernelOp(f"{name}_fused_backward_recompute_", recompute_backward_op,
             mutates_args=("dy", "gate_up")).register_fake(recompute_backward_fake)
    KernelOp(f"{name}_fused_backward_recompute", recompute_backward_out_op,
             mutates_args=("dy",)).register_fake(recompute_backward_out_fake)
    getattr(ops, name).register_autograd(split_autograd, setup_context=split_setup_context)
    getattr(ops, f"{name}_fused").register_autograd(fused_autograd, setup_context=fused_setup_context)


_register_gated_ops("swiglu", ACT_SILU)


# ----------------------------------------------------------------------------- references
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ``silu(gate) * up`` in ``promote_types(gate.dtype, float32)``, cast to
    ``gate.dtype``; differentiable by torch autograd.

    Arguments, shapes, dtypes and errors as :func:`swiglu`.
    """
    _check_pair(gate, up)
    ct = torch.promote_types(gate.dtype, torch.float32)
    return (torch.nn.functional.silu(gate.to(ct)) * up.to(ct)).to(gate.dtype)


def swiglu_fused_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`swiglu_fused`: ``swiglu_reference(*gate_up.split(I, -1))``.

    Arguments, shapes, dtypes and errors as :func:`swiglu_fused`.
    """
    _check_fused(gate_up)
    n_cols = gate_up.shape[-1] // 2
    return swiglu_reference(gate_up[..., :n_cols], gate_up[..., n_cols:])


# ----------------------------------------------------------------------------- public API
def _check_pair(gate: torch.Tensor, up: torch.Tensor, op: str = "swiglu") -> None:
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype or not gate.is_floating_point():
        raise ValueError(f"gate and up must share one floating-point dtype, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"gate is on {gate.device} but up is on {up.device}")
    if gate.dim() < 1:
        raise ValueError(f"{op} expects inputs with at least one dimension (..., I)")


def _check_fused(gate_up: torch.Tensor) -> None:
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be (..., 2I) with an even last dim, got {tuple(gate_up.shape)}")
    if not gate_up.is_floating_point():
        raise ValueError(f"gate_up must be floating point, got {gate_up.dtype}")



def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up`` (Shazeer 2020, arXiv 2002.05202), computed in fp32.

    ``silu(a) = a * sigmoid(a)`` (``torch.nn.functional.silu``); HF ``LlamaMLP``'s
    ``act_fn(gate_proj(x)) * up_proj(x)``.

    Args:
        gate: (..., I) fp32 / bf16 / fp16 (float64 runs the torch reference). Strided
            views with a unit last-dim stride are read in place (e.g. ``gu[..., :I]``).
        up: same shape, dtype and device as ``gate``.
        inplace: the backward writes the gradients of ``gate`` and ``up`` over ``gate`` and
            ``up`` themselves (saved for it) and returns them, instead of allocating two new
            tensors: one (gate + up)-sized buffer less at the backward's peak (what Liger
            Kernel's ``LigerSiLUMulFunction`` always does). Only for inputs nothing reads after
            this op's backward, such as the outputs of an MLP's gate and up projections (a
            matmul saves its input, not its output); their values are lost. Falls back to new
            tensors for leaves and views of leaves (a parameter or a tensor you made), for
            inputs that need no gradient, where it cannot (memory shared within or between
            them, rows that would need a copy, under tracing) and on the torch reference path.

    Returns:
        (..., I) in ``gate.dtype``, contiguous on the Triton path (the torch reference may
        follow the inputs' strides). Backward returns separate contiguous gradients for
        ``gate`` and ``up``, recomputing ``silu`` from the saved inputs.

    Raises:
        ValueError: shapes, dtypes or devices of ``gate`` and ``up`` differ, not float, or
            0-dim inputs.
    """
    _check_pair(gate, up)
    if not _utils.triton_ok(gate):
        return swiglu_reference(gate, up)
    return ops.swiglu(gate, up, bool(inplace))


def swiglu_fused(gate_up: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """SwiGLU on a fused projection: ``silu(gate_up[..., :I]) * gate_up[..., I:]``.

    The layout of Phi-3's ``gate_up_proj`` (gate rows first): one matmul produces
    ``gate_up`` and the backward writes its gradient as one (..., 2I) tensor.

    Args:
        gate_up: (..., 2I) fp32 / bf16 / fp16; rows with a unit last-dim stride are read
            in place.
        inplace: the backward writes the gradient over ``gate_up`` itself (saved for it)
            and returns it, instead of allocating a new (..., 2I) tensor. Only for an input
            nothing reads after this op's backward (e.g. the fused projection's output); its
            values are lost. Falls back to a new tensor for a leaf or a view of one, an input
            that needs no gradient, where it cannot (overlapping memory, rows that would need
            a copy, under tracing) and on the torch reference path.

    Returns:
        (..., I) in ``gate_up.dtype``, contiguous on the Triton path.

    Raises:
        ValueError: odd last dim, 0-dim or non-float input.
    """
    _check_fused(gate_up)
    if not _utils.triton_ok(gate_up):
        return swiglu_fused_reference(gate_up)
    return ops.swiglu_fused(gate_up, bool(inplace))
