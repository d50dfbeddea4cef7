"""Embedding lookup (``torch.nn.functional.embedding``) with a Triton gather forward and a
sorted segment-sum backward.

Math (the lookup table of Bengio et al., "A Neural Probabilistic Language Model", 2003;
PyTorch ``F.embedding`` semantics without ``max_norm`` / ``sparse``): for ids ``i`` of any
shape and a table ``W`` of shape (V, H)::

    out[..., :]  = W[i[...], :]
    dW[v, :]     = sum over positions p with i[p] == v of dout[p, :]     (v != padding_idx)
    dW[padding_idx, :] = 0

The forward is a pure gather (bit-exact copy of the rows). The backward sorts the ids
(stable, ``torch.sort``), so the positions of each distinct id form one contiguous segment,
then writes ``dW`` in one pass, each element once: a program owns a tile of R rows x a
column block, finds the sorted positions of ids in its rows (a binary search, done for
all row blocks by one small kernel beforehand), sums each such id's output-gradient rows
in fp32 in position order, and stores the tile: zeros except those sums, in the table's
dtype. So there is no separate zero fill of the (V, H) table (the largest cost of the
backward: 1 GiB for Llama 3), no atomics and no (V, H) fp32 buffer. An id repeated k times
is summed serially by one program per column block (k row reads), so a batch dominated by
one id is slower than an atomic scatter would be. This is the segment reduction of
PyTorch's ``embedding_dense_backward``, fused: deterministic (the same sum order every
run), fp32 accumulation even for bf16/fp16 tables; the backward holds the (V, H) result
plus O(N) sort buffers.
"""
from __future__ import annotations

from typing import Optional

import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["embedding", "embedding_reference"]

# A program handles a (BLOCK_N ids x BLOCK_H columns) tile of about _TILE_ELEMS elements,
# at most _MAX_BLOCK_H columns wide. Module-level so tests can shrink them.
_TILE_ELEMS = 4096
_MAX_BLOCK_H = 1024
# A backward program writes a tile of dW of about _BWD_TILE_ELEMS elements, at most
# _BWD_BLOCK_H columns wide (module-level so tests can shrink them).
_BWD_TILE_ELEMS = 16384
_BWD_BLOCK_H = 1024


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @jit
    def _embedding_fwd_kernel(
        IDS,                 # (N,) int32 / int64 token ids
        W, stride_w,         # (V, H) table, unit column stride
        O, stride_o,         # (N, H) out
        n_ids, n_rows_w, n_cols,
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_mask = rows < n_ids
        ids = tl.load(IDS + rows, mask=r_mask, other=0).to(tl.int64)
        valid = r_mask & (ids >= 0) & (ids < n_rows_w)   # out-of-range ids read nothing
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        c_mask = cols < n_cols
        w = tl.load(W + ids[:, None] * stride_w + cols[None, :],
                    mask=valid[:, None] & c_mask[None, :], other=0.0)
        tl.store(O + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], w,
                 mask=r_mask[:, None] & c_mask[None, :])

    @jit
    def _row_block_starts_kernel(
        SORTED,              # (N,) ids sorted ascending
        STARTS,              # (n_blocks + 1,) int32 out: first sorted position with id >= b * R
        n_ids, n_bounds, rows_per_block, n_steps,   # n_steps = bit length of N (binary search)
        BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        target = b.to(tl.int64) * rows_per_block
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        hi = tl.zeros([BLOCK], dtype=tl.int32) + n_ids
        for _ in range(n_steps + 1):  # lower bound: the first position whose id is >= target
            open_ = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(SORTED + mid, mask=open_, other=0).to(tl.int64)
            right = open_ & (v < target)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(open_ & (v >= target), mid, hi)
        tl.store(STARTS + b, lo, mask=b < n_bounds)

    @jit
    def _embedding_bwd_kernel(
        SORTED,              # (N,) ids sorted ascending (stable)
        ORDER,               # (N,) int64 position in G of each sorted id
        STARTS,              # (n_blocks + 1,) int32 from _row_block_starts_kernel
        G, stride_g,         # (N, H) output gradient, unit column stride
        DW,                  # (V, H) out in the table's dtype, contiguous, written whole
        n_rows_w, n_cols, padding_idx,   # padding_idx < 0: none
        BLOCK_R: tl.constexpr,  # rows of dW per program (the rows_per_block of STARTS)
        BLOCK_H: tl.constexpr,
    ):
        # One program writes a (BLOCK_R, BLOCK_H) tile of dW exactly once: zeros, except the
        # rows whose id occurs, which get the fp32 sum of their gradient rows (in position order).
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        c_mask = cols < n_cols
        tile = tl.zeros([BLOCK_R, BLOCK_H], dtype=DW.dtype.element_ty)
        j = tl.load(STARTS + tl.program_id(0))
        end = tl.load(STARTS + tl.program_id(0) + 1)
        while j < end:
            idx = tl.load(SORTED + j).to(tl.int64)
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            cur = idx
            while cur == idx:
                src = tl.load(ORDER + j)
                acc += tl.load(G + src * stride_g + cols, mask=c_mask, other=0.0).to(tl.float32)
                j += 1
                cur = tl.load(SORTED + j, mask=j < end, other=-1).to(tl.int64)
            if (idx < n_rows_w) & (idx != padding_idx):
                tile = tl.where(rows[:, None] == idx, acc.to(DW.dtype.element_ty)[None, :], tile)
        tl.store(DW + rows[:, None] * n_cols + cols[None, :], tile,
                 mask=(rows < n_rows_w)[:, None] & c_mask[None, :])


# ----------------------------------------------------------------------------- launchers
def _tiles(n_ids: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_H, num_warps) of one program's tile."""
    block_h = min(next_power_of_2(n_cols), _MAX_BLOCK_H)
    block_n = max(1, min(next_power_of_2(n_ids), _TILE_ELEMS // block_h))
    num_warps = 8 if block_n * block_h >= 4096 else 4
    return block_n, block_h, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n_rows_w, n_cols = weight.shape
    ids1 = ids.reshape(-1).contiguous()
    n_ids = ids1.numel()
    out = torch.empty((n_ids, n_cols), dtype=weight.dtype, device=weight.device)
    if n_ids and n_cols:
        w = _rows(weight)
        block_n, block_h, num_warps = _tiles(n_ids, n_cols)
        grid = (cdiv(n_ids, block_n), cdiv(n_cols, block_h))
        with device_guard(weight):
            _embedding_fwd_kernel[grid](
                ids1, w, w.stride(0), out, out.stride(0), n_ids, n_rows_w, n_cols,
                BLOCK_N=block_n, BLOCK_H=block_h, num_warps=num_warps,
            )
    return out.view(*ids.shape, n_cols)


def _backward(grad: torch.Tensor, ids: torch.Tensor, n_rows_w: int, padding_idx: int,
              dtype: torch.dtype) -> torch.Tensor:
    n_cols = grad.shape[-1]
    n_ids = ids.numel()
    if n_ids == 0 or n_cols == 0 or n_rows_w == 0:
        return torch.zeros((n_rows_w, n_cols), dtype=dtype, device=grad.device)
    dw = torch.empty((n_rows_w, n_cols), dtype=dtype, device=grad.device)
    g = _rows(grad.reshape(n_ids, n_cols))
    sorted_ids, order = torch.sort(ids.reshape(-1), stable=True)          # (N,), (N,) int64
    block_h = min(next_power_of_2(n_cols), _BWD_BLOCK_H)
    block_r = max(1, min(_BWD_TILE_ELEMS // block_h, 64))
    n_blocks = cdiv(n_rows_w, block_r)
    starts = torch.empty(n_blocks + 1, dtype=torch.int32, device=grad.device)
    with device_guard(grad):
        _row_block_starts_kernel[(cdiv(n_blocks + 1, 1024),)](
            sorted_ids, starts, n_ids, n_blocks + 1, block_r, n_ids.bit_length(), BLOCK=1024, num_warps=4,
        )
        _embedding_bwd_kernel[(n_blocks, cdiv(n_cols, block_h))](
            sorted_ids, order, starts, g, g.stride(0), dw, n_rows_w, n_cols, padding_idx,
            BLOCK_R=block_r, BLOCK_H=block_h, num_warps=8 if block_r * block_h >= 8192 else 4,
        )
    return dw


# ----------------------------------------------------------------------------- ops (torch.library + eager path)
@kernel_op("embedding", mutates_args=())
def _embedding_op(input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: int) -> torch.Tensor:
    return _forward(input_ids, weight)


@_embedding_op.register_fake
def _(input_ids, weight, padding_idx):
    return weight.new_empty((*input_ids.shape, weight.shape[1]))


@kernel_op("embedding_backward", mutates_args=())
def _embedding_backward_op(
    grad: torch.Tensor, input_ids: torch.Tensor, num_weights: int, padding_idx: int, dtype: torch.dtype
) -> torch.Tensor:
    return _backward(grad, input_ids, num_weights, padding_idx, dtype)


@_embedding_backward_op.register_fake
def _(grad, input_ids, num_weights, padding_idx, dtype):
    return grad.new_empty((num_weights, grad.shape[-1]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    input_ids, weight, padding_idx = inputs
    ctx.save_for_backward(input_ids)
    ctx.num_weights = weight.shape[0]
    ctx.padding_idx = padding_idx
    ctx.w_dtype = weight.dtype


def _embedding_backward(ctx, grad):
    (input_ids,) = ctx.saved_tensors
    dw = ops.embedding_backward(grad, input_ids, ctx.num_weights, ctx.padding_idx, ctx.w_dtype)
    return None, dw, None


ops.embedding.register_autograd(_embedding_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- reference and checks
def _check_args(input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int]) -> int:
    """Validates the arguments; returns padding_idx normalised to [0, V) or -1 for none."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.device != weight.device:
        raise ValueError(f"input_ids ({input_ids.device}) and weight ({weight.device}) must share a device")
    n_rows_w = weight.shape[0]
    if padding_idx is None:
        return -1
    padding_idx = int(padding_idx)
    if not -n_rows_w <= padding_idx < n_rows_w:
        raise ValueError(f"padding_idx {padding_idx} must be within [-{n_rows_w}, {n_rows_w})")
    return padding_idx % n_rows_w


def _check_ids_in_range(input_ids: torch.Tensor, n_rows_w: int) -> None:
    # A host-side check costs a device sync: done on CPU tensors only (see embedding()), and
    # not while torch.compile traces (data-dependent control flow).
    if input_ids.numel() and not input_ids.is_cuda and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= n_rows_w:
            raise ValueError(f"input_ids must lie in [0, {n_rows_w}), found values in [{lo}, {hi}]")


def embedding_reference(
    input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Plain-PyTorch embedding, same math as :func:`embedding`: ``index_select`` of the rows;
    rows looked up at ``padding_idx`` are detached so they send no gradient. Differentiable
    by torch autograd (its backward accumulates in the table's dtype)."""
    pad = _check_args(input_ids, weight, padding_idx)
    _check_ids_in_range(input_ids, weight.shape[0])
    ids1 = input_ids.reshape(-1)
    out = weight.index_select(0, ids1)                                      # (N, H)
    if pad >= 0:
        out = torch.where((ids1 == pad)[:, None], out.detach(), out)
    return out.view(*input_ids.shape, weight.shape[1])


def embedding(
    input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Look up rows of an embedding table (``torch.nn.functional.embedding``).

    Forward: a Triton gather ``out[...] = weight[input_ids[...]]`` (exact copies). Backward:
    the ids are sorted and each distinct id's output-gradient rows are summed in fp32 and
    written once in ``weight.dtype`` (deterministic; rows of ``padding_idx`` get no
    gradient). See the module docstring for memory.

    Args:
        input_ids: int64 or int32 ids of any shape (...), any strides, values in [0, V).
        weight: (V, H) fp32 / bf16 / fp16 table (float64 runs the torch reference); any
            strides (rows with a non-unit column stride are copied).
        padding_idx: like ``F.embedding``: the row it names (negative counts from the end)
            receives no gradient; its forward value is the row itself. ``None``: no padding.

    Returns:
        (..., H) tensor of ``weight.dtype``, new memory (never a view of ``weight``).

    Raises:
        ValueError: ``weight`` not 2-D floating point, ``input_ids`` not int64/int32,
            devices differ, ``padding_idx`` outside [-V, V), or (CPU tensors) ids outside
            [0, V). On CUDA ids are not checked on the host (that would cost a device
            sync): out-of-range ids read as zero rows and add no gradient instead of
            faulting.
    """
    pad = _check_args(input_ids, weight, padding_idx)
    if not _utils.triton_ok(weight):
        return embedding_reference(input_ids, weight, padding_idx)
    _check_ids_in_range(input_ids, weight.shape[0])
    return ops.embedding(input_ids, weight, pad)
