"""Shared helpers for the Triton kernels: backend dispatch, launch settings and the op
registration every kernel module uses (:class:`KernelOp`).

Dispatch rule (the project's DESIGN.md): CUDA tensors run the Triton kernels; CPU tensors run the same
Triton kernels under Triton's interpreter when ``TRITON_INTERPRET=1`` is set, and the
plain-PyTorch reference otherwise.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os

from typing import Optional

import torch

try:  # Triton is optional at import time: without it every op uses its reference.
    import triton
    import triton.language as tl

    from triton import knobs as _knobs

    _HookChain = getattr(_knobs, "HookChain", None)  # absent from older Tritons

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


# The dtypes every Triton kernel here takes; other dtypes go to the torch reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_ok(*tensors: torch.Tensor) -> bool:
    """Whether an op should run its Triton kernel: :func:`use_triton` on the first tensor
    (the one whose device decides) and every given tensor in :data:`KERNEL_DTYPES`."""
    return use_triton(tensors[0]) and all(t.dtype in KERNEL_DTYPES for t in tensors)


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives matmuls on ``t``'s device type, or None when autocast is off
    there (or ``t`` is float64, which autocast leaves alone)."""
    kind = t.device.type
    if t.dtype == torch.float64 or kind == "meta":  # (no autocast on meta: torch raises for it)
        return None
    try:
        if not torch.is_autocast_enabled(kind):
            return None
    except RuntimeError:  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(kind)


def no_autocast(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or a no-op context for a device type
    autocast does not take (meta: torch raises for it)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints on the host (``triton.cdiv`` is a JIT callable there, and
    costs microseconds per call)."""
    return -(-a // b)


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


@functools.lru_cache(maxsize=1024)
def row_tile_settings(n_cols: int, max_block_rows: int, tile_elems: int, warp_scale: int = 1) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N >= n_cols columns, num_warps) of a tile of whole rows.

    BLOCK_N is ``n_cols`` rounded up to a power of two (see :func:`row_settings`); BLOCK_M
    is as many rows as fit in about ``tile_elems`` elements, in [1, max_block_rows]; the
    warps are :func:`row_settings`' for ``BLOCK_M * BLOCK_N * warp_scale`` elements (a
    kernel holding more live values per element asks for more warps with ``warp_scale``).
    """
    block_n, _ = row_settings(n_cols)
    block_m = max(1, min(max_block_rows, tile_elems // block_n))
    _, num_warps = row_settings(block_m * block_n * warp_scale, max_block=1 << 30)
    return block_m, block_n, num_warps


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """Context manager that makes ``t``'s device current for the launch (multi-GPU safety);
    a no-op when it already is, or for a CPU tensor."""
    if t.is_cuda and t.get_device() != torch._C._cuda_getDevice():
        return torch.cuda.device(t.device)
    return _NO_GUARD


def as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., n_cols) -> (N, n_cols) with unit column stride: a view whenever the strides
    allow (e.g. a column slice of a wider tensor), else a contiguous copy."""
    if t.dim() == 2 and t.stride(1) == 1:
        return t
    n_rows = 1
    for d in t.shape[:-1]:
        n_rows *= d
    t2 = t.reshape(n_rows, n_cols)  # explicit row count: -1 is ambiguous when n_cols == 0
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def non_overlapping(t: torch.Tensor) -> bool:
    """Whether no two elements of ``t`` share memory (so a kernel may write it in place):
    sorted by stride, every dim of size > 1 steps past the whole extent of the smaller ones.
    (A sufficient test: False for some exotic non-overlapping layouts.)"""
    if t.is_contiguous():  # the common case, a flag torch keeps: no Python loop on the host
        return True
    extent = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < extent:
            return False
        extent += (size - 1) * stride
    return True


def _span(t: torch.Tensor, dims) -> int:
    """Elements from the first to the last of ``t`` over ``dims`` (the others held fixed)."""
    return sum((t.shape[d] - 1) * t.stride(d) for d in dims) + 1


def _extent(t: torch.Tensor) -> int:
    """Elements from the first to the last of a non-empty ``t`` (its numel when contiguous)."""
    return t.numel() if t.is_contiguous() else _span(t, range(t.dim()))


def disjoint(a: torch.Tensor, b: torch.Tensor, interleaved: bool = True) -> bool:
    """Whether ``a`` and ``b`` share no element, so writing one cannot change the other.
    True when their memory spans (first to last element) do not meet, or (``interleaved``)
    when they are interleaved slices of one buffer: equal strides and leading sizes, and
    over some trailing dims spans that do not meet within a period that every leading step
    moves past (e.g. the q and k heads of a fused qkv projection, or of a (B, H, T, D) buffer
    seen as (B, T, H, D), or the gate and up halves of a fused gate_up). Conservative
    otherwise. Needs real tensors (data pointers)."""
    if a.numel() == 0 or b.numel() == 0:
        return True
    pa, pb = a.data_ptr(), b.data_ptr()
    ea = pa + _extent(a) * a.element_size()
    eb = pb + _extent(b) * b.element_size()
    if ea <= pb or eb <= pa:
        return True
    if not interleaved or a.dim() != b.dim() or a.stride() != b.stride() or a.dtype != b.dtype:
        return False
    size = a.element_size()
    if (pb - pa) % size:
        return False
    shift = (pb - pa) // size                          # b's start, in elements from a's
    for inner in range(1, a.dim()):                    # the last `inner` dims, by position
        lead = a.dim() - inner
        if a.shape[:lead] != b.shape[:lead]:
            continue
        ia, ib = _span(a, range(lead, a.dim())), _span(b, range(lead, b.dim()))
        if not (shift >= ia or -shift >= ib):          # the inner spans meet
            continue
        period = max(ia, shift + ib) - min(0, shift)   # their union
        extent, ok = period, True
        for stride, sz in sorted((a.stride(d), a.shape[d]) for d in range(lead) if a.shape[d] > 1):
            if stride < extent:
                ok = False
                break
            extent += (sz - 1) * stride
        if ok:
            return True
    return False


def of_leaf(t: torch.Tensor) -> bool:
    """Whether ``t`` is a leaf or a view of one: a tensor the caller made (or a parameter),
    whose memory an ``inplace`` option must not take over as an op's gradient buffer."""
    return (t if t._base is None else t._base).is_leaf


def overwritable(*ts: torch.Tensor, interleaved: bool = True) -> bool:
    """Whether a kernel may write over every tensor in ``ts`` in place: real tensors (not
    traced: compiled graphs get the out-of-place ops), unit last-dim strides, no element
    shared within any of them or between any two (:func:`disjoint`, ``interleaved``)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    spans = []  # (first byte, end byte) of each non-empty tensor, while all are contiguous
    for t in ts:
        if type(t) is not torch.Tensor:
            return False
        if spans is not None and t.is_contiguous():
            if t.numel():
                p = t.data_ptr()
                spans.append((p, p + t.numel() * t.element_size()))
            continue
        spans = None
        if (t.numel() and t.stride(-1) != 1) or not non_overlapping(t):
            return False
    if spans is not None:  # all contiguous (the common case): their byte ranges must not meet
        spans.sort()
        return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    return all(disjoint(a, b, interleaved) for i, a in enumerate(ts) for b in ts[i + 1:])


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for any other device); cached per device."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def has_tensor_descriptors() -> bool:
    """Whether this Triton has host-side TMA tensor descriptors (``triton.tools``)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return False
    return TensorDescriptor is not None


def hopper_tma(t: torch.Tensor, force: Optional[bool] = None) -> bool:
    """Whether a kernel may copy ``t``'s tiles by TMA (Triton tensor descriptors): on an
    NVIDIA GPU of compute capability 9.x (the TMA paths' only target: their shared-memory
    use is sized for its 227 KB a block), or as ``force`` says (True also under the
    interpreter, for tests; False never). Shapes and alignment are the caller's to check."""
    if force is False or not has_tensor_descriptors():
        return False
    if force:
        return True
    return t.is_cuda and torch.version.hip is None and _capability(t.device)[0] == 9


def _capability(device: torch.device) -> tuple[int, int]:
    return _device_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tma_descriptor(t: torch.Tensor, box: list):
    """A TMA descriptor of contiguous ``t`` (a view of the shape to address) with boxes of
    ``box`` values (each side a power of two of at most 256)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, box)


def persistent_programs(device: torch.device, n_items: int, per_sm: int, cpu_programs: int) -> int:
    """Program count for a persistent kernel over ``n_items`` work items: ``per_sm`` per SM
    on CUDA, ``cpu_programs`` elsewhere (the interpreter); clamped to [1, n_items]."""
    programs = multiprocessor_count(device) * per_sm if device.type == "cuda" else cpu_programs
    return max(1, min(programs, n_items))


def persistent_row_blocks(device: torch.device, n_rows: int, per_sm: int, cpu_programs: int) -> tuple[int, int]:
    """(programs, rows_per_program) for a persistent kernel in which each program owns a
    contiguous block of ``rows_per_program`` rows (the last block possibly shorter): the
    :func:`persistent_programs` count, reduced so that no program is left without rows."""
    programs = persistent_programs(device, n_rows, per_sm, cpu_programs)
    rows_per_program = math.ceil(n_rows / programs)
    return math.ceil(n_rows / rows_per_program), rows_per_program


def check_norm_param(name: str, p: torch.Tensor, x: torch.Tensor, size: int, what: str) -> None:
    """Validate a normalisation's per-feature parameter ``p`` (a weight or bias tensor):
    shape ``(size,)`` (``what`` names the dim of ``x`` it must match, e.g. "the last dim of
    x"), floating point, on ``x``'s device. Raises ValueError otherwise."""
    if p.dim() != 1 or p.shape[0] != size:
        raise ValueError(f"{name} must have shape ({size},) to match {what} {tuple(x.shape)}, got {tuple(p.shape)}")
    if not p.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"x is on {x.device} but {name} is on {p.device}")


# ----------------------------------------------------------------------------- kernel launch
# Triton's ``kernel[grid](...)`` binds and specialises every argument, builds a string
# cache key, reads its runtime knobs and checks the kernel's globals on every call: about
# 12 us of the 19 us a launch costs the H200 machine's CPU (benchmarks/NOTES.md), where the
# compiled kernel's own launcher takes 7 us. For a norm over a few thousand tokens that is
# more than the GPU time, so the launched kernels here go through DirectLaunch.
_Parameter = torch.nn.Parameter  # a plain tensor to the dispatcher (no __torch_dispatch__)
_DIRECT_LAUNCH = os.environ.get("LIGERZOO_DIRECT_LAUNCH", "1") != "0"
_I32_MIN, _I32_MAX, _U64_MIN = -(2**31), 2**31, 2**63


def _arg_key(args) -> tuple:
    """What Triton specialises a launch on, per positional (runtime) argument: a tensor's
    dtype and whether its address is 16-byte aligned; an int's value class (== 1, which
    Triton makes a constant; i32, i64 or u64; a multiple of 16 or not); the type of
    anything else (float, bool, None). Two launches with equal keys (and equal keyword
    arguments, which must hold every constexpr) run the same compiled kernel."""
    key = []
    add = key.append
    for a in args:
        t = type(a)
        if t is int or (t is not bool and isinstance(a, int)):  # int subclasses by value, as Triton
            # == 1 (a constant); else i32 / i64 / u64, times two, plus one for a multiple of 16
            add(-1 if a == 1 else (0 if _I32_MIN <= a < _I32_MAX else (2 if a < _U64_MIN else 4)) + (a & 15 == 0))
        elif t is torch.Tensor or t is _Parameter or isinstance(a, torch.Tensor):
            add(a.dtype)
            add(a.data_ptr() & 15 == 0)
        elif hasattr(a, "block_shape") and hasattr(a, "base"):
            # a TMA tensor descriptor (Gluon's, or triton.tools'): Triton specialises on its
            # dtype and box, and Gluon's on its shared layout (the padding and tf32 rounding
            # of triton.tools' are keyed too, which can only split equal kernels)
            add((t, a.base.dtype, tuple(a.block_shape), getattr(a, "layout", None), getattr(a, "padding", None),
                 getattr(a, "round_f32_to_tf32", False)))
        else:
            add(t)
    return tuple(key)


class DirectLaunch:
    """A ``@triton.jit`` kernel that relaunches its compiled binary directly.

    ``kernel[grid](*args, **kwargs)`` works as on the Triton kernel. The first launch of
    each specialisation goes through Triton (which compiles and caches); later launches
    with the same specialisation key (:func:`_arg_key` of the positional arguments, the
    keyword arguments, the device) call the compiled kernel's launcher with the current
    stream, skipping Triton's per-call binding. Falls back to Triton's path under the
    interpreter, while a Triton launch hook is set (profilers), when the positional
    arguments reach into the constexpr parameters or the keyword arguments do not cover
    the remaining parameters, and when ``LIGERZOO_DIRECT_LAUNCH=0``. Tensors must be
    passed by position (TypeError otherwise). Triton settings changed after a kernel's
    first launch (``knobs``, environment) do not reach its later direct launches.
    """

    def __init__(self, fn):
        self.fn = fn
        self._cache: dict = {}
        from triton.runtime.jit import JITFunction

        self._direct = _DIRECT_LAUNCH and isinstance(fn, JITFunction)  # Gluon's subclass too
        self._arg_names = tuple(getattr(fn, "arg_names", ()))
        params = getattr(fn, "params", ())
        # how many leading parameters are runtime values (constexprs must come by keyword)
        self._n_runtime = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))

    def __getattr__(self, name):  # warmup, arg_names, ... of the Triton kernel
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        if not self._direct:
            return self.fn[grid]
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **kwargs):
        device = torch._C._cuda_getDevice()
        key = (device, _arg_key(args), tuple(kwargs.items()))
        entry = self._cache.get(key)
        if entry is None or _launch_hooked():
            if entry is None and any(isinstance(v, torch.Tensor) for v in kwargs.values()):
                name = getattr(self.fn, "__name__", "kernel")
                raise TypeError(f"{name}: pass tensors by position to a DirectLaunch kernel")
            kernel = self.fn[grid](*args, **kwargs)
            if entry is None:
                names = self._arg_names[len(args):]
                ok = (len(args) <= self._n_runtime and all(n in kwargs for n in names)
                      and hasattr(kernel, "packed_metadata"))
                self._cache[key] = (kernel, tuple(kwargs[n] for n in names)) if ok else False
            return kernel
        if entry is False:
            return self.fn[grid](*args, **kwargs)
        kernel, tail = entry
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                   torch._C._cuda_getCurrentRawStream(device), kernel.function, kernel.packed_metadata,
                   None, None, None, *args, *tail)
        return kernel


def _launch_hooked() -> bool:
    """Whether a Triton launch hook is installed: recent Tritons keep a ``HookChain``, empty
    or not, where older ones had None; a hook object set in place of the chain counts
    whatever its attributes."""
    rt = _knobs.runtime
    for h in (rt.launch_enter_hook, rt.launch_exit_hook):
        if h is not None and (type(h) is not _HookChain or h.calls):
            return True
    return False


def jit(fn):
    """``triton.jit`` for a kernel launched from Python (``kernel[grid](...)``), wrapped in
    :class:`DirectLaunch`. Device functions called from inside kernels use ``triton.jit``."""
    return DirectLaunch(triton.jit(fn))


# ----------------------------------------------------------------------------- row tiles
if HAS_TRITON:

    @triton.jit
    def load_row_tiles(A, stride_a, B, stride_b, row0, row_end, cols, col_mask, BLOCK_M: tl.constexpr):
        """Rows [row0, row0 + BLOCK_M) of two (N, H) tensors, masked to rows < row_end and
        ``col_mask``, in their own dtypes: ((BLOCK_M, BLOCK_N), (BLOCK_M, BLOCK_N)). The
        norm backwards call it one tile ahead of the one they reduce (register double
        buffering: the next tile's loads are in flight during this tile's reductions)."""
        rows = row0 + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        a = tl.load(A + rows64[:, None] * stride_a + cols[None, :], mask=mask, other=0.0)
        b = tl.load(B + rows64[:, None] * stride_b + cols[None, :], mask=mask, other=0.0)
        return a, b

    @triton.jit
    def load_row_stat(S, row0, row_end, BLOCK_M: tl.constexpr):
        """Entries [row0, row0 + BLOCK_M) of a per-row fp32 statistic (mean, rstd), 0 at rows
        >= row_end: (BLOCK_M,). Loaded a tile ahead, like :func:`load_row_tiles`."""
        rows = row0 + tl.arange(0, BLOCK_M)
        return tl.load(S + rows, mask=rows < row_end, other=0.0)


# ----------------------------------------------------------------------------- partial-row sums
if HAS_TRITON:

    @jit
    def _sum_partials_kernel(
        P,                    # (G, R, C) fp32 partial rows, contiguous
        OUT,                  # (G, C) out: column sums, in OUT's dtype
        n_rows, n_cols,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        col_block, group = tl.program_id(0), tl.program_id(1).to(tl.int64)
        cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        base = P + group * n_rows * n_cols
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask = (rows[:, None] < n_rows) & col_mask[None, :]
            acc += tl.load(base + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
        tl.store(OUT + group * n_cols + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


def sum_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Column sums of fp32 partial rows, rounded once to ``dtype``: ``(G, R, C) -> (G, C)``
    (or ``(R, C) -> (C,)``). One launch in place of ``partial.sum(-2).to(dtype)`` (two
    torch ops, each costing more host time than the launch). Sums in fp32 in a fixed order
    (deterministic). ``partial`` must be a contiguous fp32 tensor on a device the kernels
    run on (:func:`use_triton`)."""
    squeeze = partial.dim() == 2
    groups, n_rows, n_cols = (1, *partial.shape) if squeeze else partial.shape
    out = torch.empty((n_cols,) if squeeze else (groups, n_cols), dtype=dtype, device=partial.device)
    if n_cols == 0:
        return out
    if n_rows == 0:
        return out.zero_()
    block_c = min(max(16, next_power_of_2(n_cols)), 64)  # H = 4096: 64 programs per group
    with device_guard(partial):
        _sum_partials_kernel[(cdiv(n_cols, block_c), groups)](
            partial, out, n_rows, n_cols, BLOCK_R=16, BLOCK_C=block_c, num_warps=4,
        )
    return out


def param_grad_dtype(w_dtype, b_dtype) -> torch.dtype:
    """The dtype a norm's backward rounds its fp32 weight / bias gradient sums to (one
    rounding): the parameters' dtype, given as None for a parameter whose gradient is not
    computed; fp32 when both are computed and their dtypes differ, or neither is."""
    if w_dtype is not None and b_dtype is not None and w_dtype != b_dtype:
        return torch.float32
    return w_dtype or b_dtype or torch.float32


# ----------------------------------------------------------------------------- op registration
_EMPTY = inspect.Parameter.empty


class KernelOp:
    """A Triton op registered as the torch.library custom op ``ligerzoo::<name>``, with a
    lean eager path.

    torch.compile, AOTAutograd, tensor subclasses (DTensor, ...), any active
    ``TorchDispatchMode`` (fake tensors, ``make_fx``, selective activation checkpointing's
    policy) and ``torch.jit.trace`` see the custom op, so graphs capture it whole. Plain
    tensors and ``nn.Parameter`` in eager mode outside those skip the dispatcher: the Python
    body runs directly, and an op with autograd runs through an equivalent
    ``torch.autograd.Function`` built from the same ``setup_context`` and ``backward``.
    The custom-op dispatch costs tens of microseconds per call, about the GPU time of a
    norm over a few thousand tokens (``scripts/profile_kernels.py`` measures it).

    Use it as the decorator ``@kernel_op(name, mutates_args=...)``; ``register_fake`` and
    ``register_autograd`` work as on ``torch.library``'s ``CustomOpDef``. Call it with
    positional arguments (missing trailing ones take the function's defaults; a missing
    argument without a default gets the dispatcher's error).

    In eager mode without autograd, an argument named in ``mutates_args`` has its autograd
    version counter bumped after the call (as the dispatcher does), so a tensor saved for a
    backward and then overwritten is still caught. (No op here both mutates an input and
    registers autograd.) The eager backward refuses ``create_graph=True``
    (RuntimeError): the kernels' backwards are not themselves differentiable. Under
    ``torch.func`` transforms (grad, vmap, ...), which the ops do not support, a failure is
    reported as a RuntimeError naming the op (the cause chained).
    """

    def __init__(self, name: str, fn, mutates_args=()):
        self.name = name
        self._fn = fn
        params = list(inspect.signature(fn).parameters.values())
        self._n_params = len(params)
        self._defaults = tuple(p.default for p in params)
        self._mutated = tuple(i for i, p in enumerate(params) if p.name in tuple(mutates_args))
        if name in _REGISTRY:
            raise ValueError(f"a kernel op named ligerzoo::{name} is already registered")
        self.op = torch.library.custom_op(f"ligerzoo::{name}", fn, mutates_args=mutates_args)
        self._packet = getattr(torch.ops.ligerzoo, name)
        self._function = None
        _REGISTRY[name] = self

    def register_fake(self, fake):
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward, setup_context) -> None:
        torch.library.register_autograd(self.op, backward, setup_context=setup_context)
        fn, name = self._fn, self.name

        def eager_backward(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"ligerzoo::{name} does not support second-order gradients (create_graph=True)")
            return backward(ctx, *grads)

        def forward(ctx, *args):
            out = fn(*args)
            setup_context(ctx, args, out)
            return _not_views(out)

        # forward(ctx, ...) style: a separate setup_context makes every apply() bind the
        # arguments with inspect.signature (about 20 us per call)
        self._function = type(
            f"{name}_function", (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(eager_backward)},
        )

    def __call__(self, *args):
        if len(args) < self._n_params:
            fill = self._defaults[len(args):]
            if any(d is _EMPTY for d in fill):
                return self._packet(*args)  # the dispatcher's "missing value for argument" error
            args = args + fill
        # graph capture, dispatch modes (FakeTensorMode, selective checkpointing, make_fx) and
        # jit tracing must see the op itself
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_tracing():
            return self._packet(*args)
        needs_grad = False
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) is not torch.Tensor and type(a) is not _Parameter:
                    return self._packet(*args)  # tensor subclasses (DTensor, ...) dispatch
                needs_grad = needs_grad or a.requires_grad
        try:
            if needs_grad and torch.is_grad_enabled():
                # without a registered autograd, the dispatcher's own handling (it refuses a backward)
                return self._function.apply(*args) if self._function is not None else self._packet(*args)
            out = self._fn(*args)
        except Exception as e:
            if torch._C._are_functorch_transforms_active():
                raise RuntimeError(f"ligerzoo::{self.name} does not support torch.func transforms (grad, vmap, "
                                   f"jacrev, ...); call it outside them") from e
            raise
        for i in self._mutated:
            if args[i] is not None:
                torch.autograd.graph.increment_version(args[i])
        return out


def _not_views(out):
    """``out`` with every tensor that is a view (of a buffer made inside the op) replaced by a
    detached alias of the same memory, which autograd does not treat as a view: an autograd
    Function's view outputs refuse in-place edits (``loss /= k``), which torch's own ops and
    the dispatcher path allow."""
    if isinstance(out, torch.Tensor):
        return out.detach() if out._is_view() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_not_views(o) for o in out)
    return out


_REGISTRY: dict = {}


class _Ops:
    """``ops.<name>`` is the :class:`KernelOp` registered as ``ligerzoo::<name>``."""

    def __getattr__(self, name: str) -> KernelOp:
        try:
            return _REGISTRY[name]
        except KeyError:
            raise AttributeError(f"no ligerzoo kernel op named {name!r}") from None


ops = _Ops()


def kernel_op(name: str, mutates_args=()):
    """Decorator: ``fn`` -> :class:`KernelOp` registered as ``ligerzoo::<name>``."""
    return lambda fn: KernelOp(name, fn, mutates_args)
