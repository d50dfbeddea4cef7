"""Experimental: int8 activations x packed 2-bit ternary weights, unpacked inside the matmul.

Math (BitNet b1.58: Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in
1.58 Bits", 2024): weights are ternary, ``w in {-1, 0, +1}``, activations are int8 (absmax
per-token quantised); the layer computes the exact integer product ::

    out[m, n] = sum_k x[m, k] * w[n, k]          (int32; |out| <= 2 * 128 * K)

Packing format (the one :func:`pack_int2` writes and the kernel reads):

- each weight is stored as the unsigned 2-bit code ``c = w + 1`` (so -1, 0, +1 -> 0, 1, 2;
  code 3 is never written and decodes to +2);
- four codes share one byte, along K, in four *planes*: with ``K4 = K // 4``, byte
  ``packed[n, j]`` holds ``w[n, j + i * K4]`` in bits ``2i .. 2i+1`` for ``i = 0..3``;
- ``w_packed`` is (N, K // 4) uint8 (int8 storage is accepted and read as the same bits).

Why planes rather than four adjacent weights per byte: a (BLOCK_N x BLOCK_KP) tile of
packed bytes then unpacks, for each of its four 2-bit planes, into a weight tile that
multiplies a *contiguous* (BLOCK_M x BLOCK_KP) tile of x (columns ``i * K4 + kp``): four
plain int8 ``tl.dot`` calls per packed tile, no register shuffles and no strided loads.
The weight matrix never exists unpacked in memory; it is read at 2 bits per weight.
"""
from __future__ import annotations

import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["int2_matmul", "int2_matmul_reference", "pack_int2", "unpack_int2"]

# Largest tile sizes (each shrinks to the problem for small shapes; 16 is tl.dot's
# minimum). BLOCK_KP counts packed bytes, i.e. 4 * BLOCK_KP weights per K step.
# Module-level so tests can shrink them.
_BLOCK_M = 128
_BLOCK_N = 128
_BLOCK_KP = 64
_GROUP_M = 8
_MIN_DOT = 16
_MIN_DOT_K = 32   # int8 tl.dot needs K >= 32 on NVIDIA GPUs


# ----------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @jit
    def _int2_matmul_kernel(
        X, sx_m,            # (M, K) int8, unit column stride
        W, sw_n,            # (N, K // 4) uint8 packed codes, unit column stride
        O, so_m,            # (M, N) int32 out, unit column stride
        M, N, K4,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_KP: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped program order: GROUP_M row blocks share each column block while it is
        # hot in L2.
        pid = tl.program_id(0)
        n_blocks_m = tl.cdiv(M, BLOCK_M)
        n_blocks_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * n_blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(n_blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                        # (BLOCK_M,)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # (BLOCK_N,)
        m_mask = rows < M
        n_mask = cols < N
        kp = tl.arange(0, BLOCK_KP)
        x_ptrs = X + rows.to(tl.int64)[:, None] * sx_m + kp[None, :]          # (BLOCK_M, BLOCK_KP)
        w_ptrs = W + cols.to(tl.int64)[None, :] * sw_n + kp[:, None]          # (BLOCK_KP, BLOCK_N)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K4, BLOCK_KP):
            k_mask = (k0 + kp) < K4
            packed = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0)  # uint8
            for i in tl.static_range(4):
                # plane i: weights w[n, i * K4 + k0 + kp] as int8 in {-1, 0, 1, (2)}
                w = (((packed >> (2 * i)) & 3).to(tl.int8) - 1).to(tl.int8)
                # masked-off x entries are 0, so whatever w decodes to there adds nothing
                x = tl.load(x_ptrs + (i * K4 + k0), mask=m_mask[:, None] & k_mask[None, :], other=0)
                acc = tl.dot(x, w, acc, out_dtype=tl.int32)

        o_ptrs = O + rows.to(tl.int64)[:, None] * so_m + cols[None, :]
        tl.store(o_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------- launcher / op
def _block(n: int, cap: int) -> int:
    return max(_MIN_DOT, min(next_power_of_2(n), cap))


def _launch(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N, K4 = w_packed.shape
    out = torch.empty((M, N), dtype=torch.int32, device=x.device)
    if M == 0 or N == 0:
        return out
    if K4 == 0:
        return out.zero_()
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w_packed.view(torch.uint8)                                           # same bits, unsigned shifts
    w = w if w.stride(1) == 1 else w.contiguous()
    block_m = _block(M, _BLOCK_M)
    block_n = _block(N, _BLOCK_N)
    block_kp = max(_MIN_DOT_K, _block(K4, _BLOCK_KP))
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    grid = (cdiv(M, block_m) * cdiv(N, block_n),)
    with device_guard(x):
        _int2_matmul_kernel[grid](
            x, x.stride(0), w, w.stride(0), out, out.stride(0), M, N, K4,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KP=block_kp, GROUP_M=_GROUP_M,
            num_warps=num_warps, num_stages=3,
        )
    return out


@kernel_op("int2_matmul", mutates_args=())
def _int2_matmul_op(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    return _launch(x, w_packed)


@_int2_matmul_op.register_fake
def _(x, w_packed):
    return x.new_empty((x.shape[0], w_packed.shape[0]), dtype=torch.int32)


# ----------------------------------------------------------------------------- packing helpers
def pack_int2(w: torch.Tensor) -> torch.Tensor:
    """Pack ternary weights into 2-bit codes, four per byte along K (plane layout, see the
    module docstring): ``packed[n, j]`` bits ``2i..2i+1`` = ``w[n, j + i * (K // 4)] + 1``.

    Args:
        w: (N, K) integer (or integral-valued float) tensor with values in {-1, 0, 1};
            K divisible by 4.

    Returns:
        (N, K // 4) uint8 tensor on ``w``'s device.

    Raises:
        ValueError: ``w`` not 2-D, K not divisible by 4, or values outside {-1, 0, 1}.
    """
    if w.dim() != 2:
        raise ValueError(f"w must be (N, K), got shape {tuple(w.shape)}")
    N, K = w.shape
    if K % 4:
        raise ValueError(f"K = {K} must be divisible by 4 (four 2-bit weights per byte)")
    if w.is_floating_point() and not torch.equal(w, w.round()):
        raise ValueError("w must hold integers in {-1, 0, 1}")
    wide = w if w.is_floating_point() else w.to(torch.int64)  # uint8 has no -1; int16 would wrap 65536 to 0
    if not bool(((wide >= -1) & (wide <= 1)).all()):
        raise ValueError("w must hold ternary values in {-1, 0, 1}")
    codes = w.to(torch.int16) + 1
    planes = codes.view(N, 4, K // 4)                                       # plane i = w[:, i*K4:(i+1)*K4]
    packed = planes[:, 0] | (planes[:, 1] << 2) | (planes[:, 2] << 4) | (planes[:, 3] << 6)
    return packed.to(torch.uint8)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int2`: (N, K // 4) uint8 (or int8 storage) -> (N, K) int8
    with values ``code - 1`` in {-1, 0, 1} (and 2 for the unused code 3, as the kernel reads it).

    Raises:
        ValueError: ``packed`` not a 2-D uint8 / int8 tensor.
    """
    if packed.dim() != 2 or packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"packed must be a 2-D uint8 (or int8) tensor, got {packed.dtype} {tuple(packed.shape)}")
    p = packed.view(torch.uint8).to(torch.int16)
    planes = [((p >> (2 * i)) & 3) - 1 for i in range(4)]                  # each (N, K4)
    return torch.cat(planes, dim=1).to(torch.int8)


# ----------------------------------------------------------------------------- reference / public
def _check_args(x: torch.Tensor, w_packed: torch.Tensor) -> None:
    if x.dim() != 2 or x.dtype != torch.int8:
        raise ValueError(f"x must be a 2-D (M, K) int8 tensor, got {x.dtype} {tuple(x.shape)}")
    if w_packed.dim() != 2 or w_packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(
            f"w_packed must be a 2-D (N, K // 4) uint8 tensor, got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    K = x.shape[1]
    if K % 4:
        raise ValueError(f"K = {K} must be divisible by 4 (four 2-bit weights per byte)")
    if K >= 2**23:
        raise ValueError(f"K = {K} must be below 2^23, so that every output fits in int32 (|out| <= 256 * K)")
    if w_packed.shape[1] != K // 4:
        raise ValueError(f"w_packed {tuple(w_packed.shape)} must be (N, K // 4) = (N, {K // 4}) for x {tuple(x.shape)}")
    if x.device != w_packed.device:
        raise ValueError(f"x ({x.device}) and w_packed ({w_packed.device}) must share a device")


def int2_matmul_reference(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch ``x @ unpack_int2(w_packed).T`` as int32, exact: int64 matmul on CPU,
    float64 on other devices (exact: every partial sum is an integer below 2^53).

    Arguments, shapes, dtypes and errors as :func:`int2_matmul`.
    """
    _check_args(x, w_packed)
    w = unpack_int2(w_packed)                                               # (N, K) int8
    if x.device.type == "cpu":
        return (x.to(torch.int64) @ w.to(torch.int64).T).to(torch.int32)
    return (x.to(torch.float64) @ w.to(torch.float64).T).round().to(torch.int32)


def int2_matmul(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    """Exact int8 x ternary-weight matmul with the 2-bit unpacking fused into a Triton
    tiled matmul (experimental; BitNet b1.58 layers, Ma et al. 2024, arXiv 2402.17764).

    ``out = x @ unpack_int2(w_packed).T`` computed with int8 ``tl.dot`` (int8 tensor cores
    on the GPU) and int32 accumulation; weights are decoded in registers from the packed
    bytes (see the module docstring for the packing format). No autograd: it is an
    inference / quantised-forward op on integer tensors.

    Args:
        x: (M, K) int8 activations; K divisible by 4. Any strides (a non-unit column
            stride is copied).
        w_packed: (N, K // 4) uint8 from :func:`pack_int2` (int8 storage read as uint8).

    Returns:
        (M, N) int32, exact (|out| <= 256 * K).

    Raises:
        ValueError: wrong ranks or dtypes, K not divisible by 4 or not below 2^23 (the
            int32 output bound), ``w_packed.shape[1] != K // 4``, or devices differ.
    """
    _check_args(x, w_packed)
    if not _utils.use_triton(x):
        return int2_matmul_reference(x, w_packed)
    return ops.int2_matmul(x, w_packed)
