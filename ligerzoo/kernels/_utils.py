"""Shared helpers for the Triton kernels: backend dispatch and launch settings.

Dispatch rule (DESIGN.md): CUDA tensors run the Triton kernels; CPU tensors run the same
Triton kernels under Triton's interpreter when ``TRITON_INTERPRET=1`` is set, and the
plain-PyTorch reference otherwise.
"""
from __future__ import annotations

import os

import torch

try:  # Triton is optional at import time: without it every op uses its reference.
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` should run its Triton kernel (else its torch reference)."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreter_enabled()


def next_power_of_2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def row_settings(n_cols: int, max_block: int = 65536) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a kernel that keeps one row of ``n_cols`` in registers."""
    block = next_power_of_2(n_cols)
    if block > max_block:
        raise ValueError(f"row length {n_cols} exceeds the largest supported block {max_block}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def device_guard(t: torch.Tensor):
    """Context manager that makes ``t``'s device current for the launch (multi-GPU safety)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., n_cols) -> (N, n_cols) with unit column stride: a view whenever the strides
    allow (e.g. a column slice of a wider tensor), else a contiguous copy."""
    n_rows = 1
    for d in t.shape[:-1]:
        n_rows *= d
    t2 = t.reshape(n_rows, n_cols)  # explicit row count: -1 is ambiguous when n_cols == 0
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for any other device)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def persistent_programs(device: torch.device, n_items: int, per_sm: int, cpu_programs: int) -> int:
    """Program count for a persistent kernel over ``n_items`` work items: ``per_sm`` per SM
    on CUDA, ``cpu_programs`` elsewhere (the interpreter); clamped to [1, n_items]."""
    programs = multiprocessor_count(device) * per_sm if device.type == "cuda" else cpu_programs
    return max(1, min(programs, n_items))
