"""Cross entropy rows on Hopper: each row of logits kept in shared memory between passes.

The portable row kernel in :mod:`ligerzoo.kernels.cross_entropy` reads a row twice (pass 1
for ``lse``, pass 2 for the gradient), so at (8192, 128256) bf16 it moves 6.3 GB where the
floor is 4.2 GB (one read, one write). On sm_90 up to 224 KB of a row stay in one SM's
shared memory, so this kernel keeps them there between the two passes: a row that fits is
read from DRAM once, a larger one re-reads only what did not fit (one 32 KB chunk of eight
for a 128256-column bf16 row, 4.5 GB moved in all; 9 of 16 chunks in fp32). Same math and
the same arguments as ``launch_cross_entropy_rows`` (see that module's docstring for the
formulas). Written in Gluon, Triton's lower-level dialect, because plain Triton can
neither hold a tensor in shared memory across loops nor issue TMA copies.

Layout of the work:

- Persistent CTAs (one per SM: 512 threads at ~124 registers fill its register file) take
  rows ``pid``, ``pid + G``, ... A row's full boxes of ``BOX`` (256) columns are
  TMA-copied in chunks of ``NBOX`` boxes into a ring of ``NS`` shared-memory slots; the
  last partial box (``n_cols % 256`` columns) is read with plain loads.
- Pass 1 folds every chunk into per-lane running (max, sum of exp) values, one per
  column a thread owns, so no cross-warp reduction happens until the row's end (the
  online softmax of Milakov & Gimelshein, 2018, kept per lane).
- Pass 2 writes the gradient from the chunks still resident (the row's last ``NS``) and
  reloads the first ``NCH - NS`` (none when the row fits).
- Load ``q`` of a CTA goes to slot ``q % NS`` and is issued right after the last use of
  load ``q - NS``, so the ring is FIFO; the next row's loads are in flight during this
  row's pass 2. mbarrier phase parity of load ``q`` is ``(q // NS) & 1``.

Used by ``launch_cross_entropy_rows`` when :func:`supported` says so (CUDA capability
9.x, bf16 / fp16 / fp32, 16-byte aligned, non-overlapping rows of at least 96 KB, a
gradient to write); everything else runs the portable kernel.
Differences from it: ignored rows are read like the others (their loads are in flight
before the target is known). A non-ignored row whose logits are all -inf gets lse -inf and
a nan loss and gradient in both; an ignored one gets loss 0 and a zero gradient in both. ``ENABLED = False`` turns it
off. Triton's CPU interpreter cannot run Gluon, so the CPU tests compile this kernel for
sm_90 (no GPU needed) and the GPU tests check its values against float64 torch.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ligerzoo.kernels._utils import HAS_TRITON, DirectLaunch, device_guard, interpreter_enabled, multiprocessor_count

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # renamed after Triton 3.6 (async_copy_global_to_shared -> async_load, thread_barrier -> barrier)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    HAS_GLUON = HAS_TRITON
except Exception:  # pragma: no cover - older Triton without Gluon
    HAS_GLUON = False

__all__ = ["ENABLED", "HAS_GLUON", "launch", "settings", "supported"]

ENABLED = True             # tests and benchmarks switch the Hopper path off to compare
BOX = 256                  # columns per TMA box (a box dimension may not exceed 256)
NUM_WARPS = 16
VEC = 4                    # consecutive columns per thread per access
RING_BYTES = 224 * 1024    # shared memory for the ring (sm_90 allows 227 KB per CTA)
CHUNK_BYTES = 32 * 1024    # one slot: 64 boxes of bf16, 32 of fp32
# Below this row size the portable kernel is as fast or faster (its second read of a small
# row mostly hits L2). H200, (8192, V) bf16, forward + gradient, ms (portable / here):
# V = 32000: 0.390 / 0.458; 49152: 0.597 / 0.552; 65536: 0.792 / 0.661; 128256: 1.555 / 1.240.
MIN_ROW_BYTES = 96 * 1024
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _lanes() -> int:
    """Columns one pass of all threads covers: a chunk is (CHUNK // lanes, lanes)."""
    return VEC * 32 * NUM_WARPS


def settings(n_cols: int, elem_bytes: int) -> tuple[int, int, int]:
    """(NBOX, NCH, NS): boxes per chunk, chunks per row (full boxes only), ring slots."""
    nbox = CHUNK_BYTES // (BOX * elem_bytes)
    n_boxes = n_cols // BOX
    nch = -(-n_boxes // nbox)
    ns = max(2, min(nch, RING_BYTES // (nbox * BOX * elem_bytes)))
    return nbox, nch, ns


def supported(logits: torch.Tensor, grad: Optional[torch.Tensor]) -> bool:
    """Whether :func:`launch` can take these rows (else the portable kernel runs).

    Args:
        logits: (N, V) logits the kernel would read.
        grad: the (N, V) buffer the gradient would be written to (may be ``logits``), or
            None when only the loss is wanted (then False: the portable kernel reads once).
    Returns False, never raises, for CPU tensors, other GPUs, other dtypes or layouts.
    """
    if not (ENABLED and HAS_GLUON and logits.is_cuda) or interpreter_enabled():
        return False
    if logits.dtype not in _DTYPES or logits.dim() != 2 or logits.shape[0] == 0:
        return False
    eb = logits.element_size()
    if (logits.stride(1) != 1 or logits.stride(0) < logits.shape[1] or (logits.stride(0) * eb) % 16
            or logits.data_ptr() % 16):   # rows that overlap (an expanded tensor) or TMA-unaligned
        return False
    if grad is None or grad.stride(1) != 1:  # the loss alone: the portable kernel reads once too
        return False
    if logits.shape[1] * eb < MIN_ROW_BYTES:
        return False
    nbox, nch, _ = settings(logits.shape[1], eb)
    if nch < 2 or (nbox * BOX) % _lanes():
        return False
    return _capability(logits.device)[0] == 9


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


if HAS_GLUON:
    import importlib

    _ce = importlib.import_module("ligerzoo.kernels.cross_entropy")  # the module, not the function

    # the portable kernel's tanh, compiled as Gluon (its Python function: under Triton's
    # interpreter the triton.jit object is an interpreted function Gluon cannot call)
    _tanh_f32 = gluon.jit(getattr(_ce._tanh_f32, "fn", _ce._tanh_f32))
    _grad_coefs = gluon.jit(getattr(_ce._grad_coefs, "fn", _ce._grad_coefs))

    @gluon.jit
    def _class_weights(CLASS_W, col0, offs, mask, MASKED: gl.constexpr):
        """The class weights of an (R, LANES) chunk's columns, fp32 (0 where masked)."""
        if MASKED:
            w = gl.load(CLASS_W + col0 + offs, mask=mask, other=0.0)
        else:
            w = gl.load(CLASS_W + col0 + offs)
        return w.to(gl.float32)

    LOG2E = gl.constexpr(1.4426950408889634)

    @gluon.jit
    def _issue(desc, smem, bars, q, total, pid, n_prog,
               LPR: gl.constexpr, NCH: gl.constexpr, NS: gl.constexpr, NBOX: gl.constexpr):
        """Start load q of this CTA (if q < total) into slot q % NS.

        Loads per row (LPR): chunks 0..NCH-1 for pass 1, then chunks 0..NCH-NS-1 again.
        """
        ok = q < total
        local = q // LPR
        idx = q - local * LPR
        c = idx - NCH * (idx >= NCH).to(gl.int32)
        row = pid + local * n_prog
        slot = q % NS
        bar = bars.index(slot)
        mbarrier.expect(bar, desc.block_type.nbytes, pred=ok)
        _tma_load(desc, [row, c * NBOX, 0], bar, smem.index(slot), pred=ok)

    @gluon.jit
    def _stats_chunk(x, offs, col0, n_full, CLASS_W, m_v, d_v, zsum_v, softcap,
                     HAS_WEIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_SMOOTHING: gl.constexpr,
                     MASKED: gl.constexpr):
        """Fold an (R, LANES) chunk into the per-lane running max ``m_v``, sum ``d_v`` of
        exp(z - m_v), and smoothing sum ``zsum_v`` of z (times the class weight)."""
        if HAS_SOFTCAP:
            x = softcap * _tanh_f32(x / softcap)
        mask = offs < n_full - col0   # used only when MASKED
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                xw = _class_weights(CLASS_W, col0, offs, mask, MASKED) * x
            else:
                xw = x
            if MASKED:
                xw = gl.where(mask, xw, 0.0)
            zsum_v += gl.sum(xw, axis=0)
        if MASKED:
            x = gl.where(mask, x, float("-inf"))
        m_new = gl.maximum(m_v, gl.max(x, axis=0))                     # (LANES,)
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)            # lanes with no column yet
        # subtract first: exp2((x - m) * log2e) keeps full precision at |x| ~ 1e4
        d_v = d_v * gl.exp2((m_v - m_ref) * LOG2E) + gl.sum(gl.exp2((x - m_ref[None, :]) * LOG2E), axis=0)
        return m_new, d_v, zsum_v

    @gluon.jit
    def _grad_chunk(x, offs, col0, n_full, t_local, DXROW, CLASS_W, m, log_d, coef_p, sm_c, coef_t, softcap,
                    HAS_WEIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_SMOOTHING: gl.constexpr,
                    MASKED: gl.constexpr, WITH_T: gl.constexpr):
        """Store d(loss)/d(logits) of an (R, LANES) chunk at ``DXROW + col0 + offs``."""
        mask = offs < n_full - col0   # used only when MASKED
        if HAS_SOFTCAP:
            th = _tanh_f32(x / softcap)
            z = softcap * th
        else:
            z = x
        g = coef_p * gl.exp2((z - m) * LOG2E - log_d * LOG2E)   # p_c, lse never rounded (see below)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= sm_c * _class_weights(CLASS_W, col0, offs, mask, MASKED)
            else:
                g -= sm_c
        if WITH_T:
            g = gl.where(offs == t_local, g - coef_t, g)
        if HAS_SOFTCAP:
            g = g * (1.0 - th * th)
        if MASKED:
            gl.store(DXROW + col0 + offs, g.to(DXROW.dtype.element_ty), mask=mask)
        else:
            gl.store(DXROW + col0 + offs, g.to(DXROW.dtype.element_ty))

    @DirectLaunch
    @gluon.jit
    def _cross_entropy_resident_kernel(
        desc,                   # TMA descriptor over X viewed as (N, V // BOX, BOX), boxes (1, NBOX, BOX)
        X, stride_x,            # (N, V) logits (the tail columns and z_t are read directly)
        DX, stride_dx,          # (N, V) out: d(loss)/d(logits) (may be X itself)
        TARGET,                 # (N,) int64
        CLASS_W,                # (V,) class weights (read only when HAS_WEIGHT)
        LOSS, ZLOSS, LSE,       # (N,) fp32 out, as in the portable kernel
        SCALES,                 # (3,) fp32: [ce factor, z-loss factor, sum of class weights]
        ROW_SCALE,              # (N,) fp32 per-row gradient factor (read when HAS_ROW_SCALE)
        GUARD,                  # (1,) int64: the first bad target's row, or N (read when HAS_GUARD)
        n_rows, n_cols, ignore_index,
        label_smoothing, lse_square_scale, softcap,
        HAS_WEIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_SMOOTHING: gl.constexpr,
        HAS_ZLOSS: gl.constexpr, COMPUTE_LOSS: gl.constexpr,
        HAS_ROW_SCALE: gl.constexpr,
        HAS_GUARD: gl.constexpr,        # no rows at all when GUARD names a row (a bad target)
        NCH: gl.constexpr, NS: gl.constexpr, NBOX: gl.constexpr, BOX_: gl.constexpr, VEC_: gl.constexpr,
    ):
        NW: gl.constexpr = gl.num_warps()
        CHUNK: gl.constexpr = NBOX * BOX_
        LANES: gl.constexpr = VEC_ * 32 * NW
        R: gl.constexpr = CHUNK // LANES
        gl.static_assert(R * LANES == CHUNK)
        layout: gl.constexpr = gl.BlockedLayout([R, VEC_], [1, 32], [1, NW], [1, 0])   # a thread owns R x VEC
        lane_layout: gl.constexpr = gl.SliceLayout(0, layout)
        NRES: gl.constexpr = NS if NS < NCH else NCH     # chunks still in the ring after pass 1
        NRELOAD: gl.constexpr = NCH - NRES
        LPR: gl.constexpr = NCH + NRELOAD                 # loads per row

        pid = gl.program_id(0)
        n_prog = gl.num_programs(0)
        my_rows = (n_rows - pid + n_prog - 1) // n_prog
        if HAS_GUARD:
            my_rows = my_rows * (gl.load(GUARD) >= n_rows).to(gl.int32)
        total = my_rows * LPR

        smem = gl.allocate_shared_memory(desc.dtype, [NS, 1, NBOX, BOX_], desc.layout)   # the ring
        bars = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NS):
            mbarrier.init(bars.index(s), count=1)
        for s in gl.static_range(NS):
            _issue(desc, smem, bars, s, total, pid, n_prog, LPR, NCH, NS, NBOX)

        tail_layout: gl.constexpr = gl.BlockedLayout([2], [32], [NW], [0])
        n_full = (n_cols // BOX_) * BOX_
        tail_cols = n_full + gl.arange(0, BOX_, layout=tail_layout)       # (BOX,) the last partial box
        tail_mask = tail_cols < n_cols
        offs = (gl.arange(0, R, layout=gl.SliceLayout(1, layout))[:, None] * LANES
                + gl.arange(0, LANES, layout=lane_layout)[None, :])       # (R, LANES) in chunk order

        ce_f0 = gl.load(SCALES)
        z_f0 = gl.load(SCALES + 1)
        w_all = gl.load(SCALES + 2)
        keep = 1.0 - label_smoothing          # weight of the one-hot part
        eps_v = label_smoothing / n_cols      # weight of the uniform part

        target_next = gl.load(TARGET + pid)
        for i in range(my_rows):
            row = pid + i * n_prog
            base = i * LPR
            target = target_next                       # loaded one row ahead: no wait here
            target_next = gl.load(TARGET + gl.minimum(row + n_prog, n_rows - 1))
            ignored = target == ignore_index
            valid = (target >= 0) & (target < n_cols)
            t32 = gl.where(valid, target, 0).to(gl.int32)
            XROW = X + row.to(gl.int64) * stride_x
            # z and the class weight at the target: first used after pass 2, loaded now (pass 2
            # may write over z in place; the barrier before pass 2 orders this load first)
            z_t = gl.load(XROW + t32).to(gl.float32)
            if HAS_WEIGHT:
                w_t = gl.load(CLASS_W + t32).to(gl.float32)
            else:
                w_t = 1.0

            # ---- pass 1: per-lane (max, sum of exp, smoothing sum); the last chunk masked
            m_v = gl.full([LANES], float("-inf"), gl.float32, lane_layout)
            d_v = gl.zeros([LANES], gl.float32, lane_layout)
            zsum_v = gl.zeros([LANES], gl.float32, lane_layout)
            for c in range(NCH - 1):
                q = base + c
                slot = q % NS
                mbarrier.wait(bars.index(slot), (q // NS) & 1)
                x = smem.index(slot).reshape([R, LANES]).load(layout).to(gl.float32)
                m_v, d_v, zsum_v = _stats_chunk(x, offs, c * CHUNK, n_full, CLASS_W, m_v, d_v, zsum_v, softcap,
                                                HAS_WEIGHT, HAS_SOFTCAP, HAS_SMOOTHING, False)
                if c < NRELOAD:   # this load's last use: its slot takes load q + NS
                    _cta_barrier()
                    _issue(desc, smem, bars, q + NS, total, pid, n_prog, LPR, NCH, NS, NBOX)
            q = base + NCH - 1
            slot = q % NS
            mbarrier.wait(bars.index(slot), (q // NS) & 1)
            x = smem.index(slot).reshape([R, LANES]).load(layout).to(gl.float32)
            m_v, d_v, zsum_v = _stats_chunk(x, offs, (NCH - 1) * CHUNK, n_full, CLASS_W, m_v, d_v, zsum_v,
                                            softcap, HAS_WEIGHT, HAS_SOFTCAP, HAS_SMOOTHING, True)
            xt = gl.load(XROW + tail_cols, mask=tail_mask, other=0.0).to(gl.float32)   # (BOX,)
            if HAS_SOFTCAP:
                tht = _tanh_f32(xt / softcap)
                xt = softcap * tht
            zsum = gl.sum(zsum_v, axis=0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    wt_c = gl.load(CLASS_W + tail_cols, mask=tail_mask, other=0.0).to(gl.float32)
                    zsum += gl.sum(gl.where(tail_mask, wt_c * xt, 0.0), axis=0)
                else:
                    zsum += gl.sum(gl.where(tail_mask, xt, 0.0), axis=0)
            xt = gl.where(tail_mask, xt, float("-inf"))
            m = gl.maximum(gl.max(m_v, axis=0), gl.max(xt, axis=0))
            m = gl.where(m == float("-inf"), 0.0, m)
            d = gl.sum(d_v * gl.exp2((m_v - m) * LOG2E), axis=0) + gl.sum(gl.exp2((xt - m) * LOG2E), axis=0)
            # The loss and the gradient use m and log(d) apart (log p = (z - m) - log d, as the
            # portable kernel does): lse rounded to fp32 is off by more than a confident row's
            # loss at |m| ~ 40. An ignored row keeps its true max, since exp(z - 0) could
            # overflow to inf and the zero coefficients below would turn it into nan, and log(d)
            # 0: an all -inf one has d = 0, and exp2(-inf + inf) would be nan too
            log_d = gl.where(ignored, 0.0, gl.log(d))
            lse = m + log_d
            gl.store(LSE + row, gl.where(ignored, 0.0, lse))
            ce_f = gl.where(ignored, 0.0, ce_f0)      # ignored rows: a zero gradient
            z_f = gl.where(ignored, 0.0, z_f0)
            if HAS_ROW_SCALE:
                r = gl.load(ROW_SCALE + row).to(gl.float32)
                ce_f = ce_f * r
                z_f = z_f * r
            # multiplies p_c; subtracted at the target column
            coef_p, coef_t = _grad_coefs(ce_f, z_f, keep, eps_v, w_t, w_all, lse, lse_square_scale,
                                         HAS_SMOOTHING, HAS_ZLOSS)
            sm_c = ce_f * eps_v                       # subtracted everywhere (times w_c)
            # where the one-hot term goes; an out-of-range target (unchecked under compile)
            # matches no column, as in the portable kernel
            t_cmp = gl.where(valid, t32, -1)
            t_chunk = gl.where(valid, t32 // CHUNK, -1)
            DXROW = DX + row.to(gl.int64) * stride_dx
            _cta_barrier()   # every thread's z_t load is done before any thread stores a gradient

            # ---- pass 2: resident chunks NRELOAD..NCH-1 (in load order), then the reloads
            for k in range(NCH):
                if k < NRES:
                    c = NRELOAD + k
                    q = base + c
                else:
                    c = k - NRES
                    q = base + NCH + c
                    mbarrier.wait(bars.index(q % NS), (q // NS) & 1)
                x = smem.index(q % NS).reshape([R, LANES]).load(layout).to(gl.float32)
                col0 = c * CHUNK
                if c == NCH - 1:
                    _grad_chunk(x, offs, col0, n_full, t_cmp - col0, DXROW, CLASS_W, m, log_d, coef_p, sm_c,
                                coef_t, softcap, HAS_WEIGHT, HAS_SOFTCAP, HAS_SMOOTHING, True, True)
                elif c == t_chunk:
                    _grad_chunk(x, offs, col0, n_full, t_cmp - col0, DXROW, CLASS_W, m, log_d, coef_p, sm_c,
                                coef_t, softcap, HAS_WEIGHT, HAS_SOFTCAP, HAS_SMOOTHING, False, True)
                else:
                    _grad_chunk(x, offs, col0, n_full, t_cmp - col0, DXROW, CLASS_W, m, log_d, coef_p, sm_c,
                                coef_t, softcap, HAS_WEIGHT, HAS_SOFTCAP, HAS_SMOOTHING, False, False)
                _cta_barrier()       # every warp is done with the slot before it is refilled
                _issue(desc, smem, bars, q + NS, total, pid, n_prog, LPR, NCH, NS, NBOX)

            gt = coef_p * gl.exp2((xt - m) * LOG2E - log_d * LOG2E)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    gt -= sm_c * wt_c
                else:
                    gt -= sm_c
            gt = gl.where(tail_cols == t_cmp, gt - coef_t, gt)
            if HAS_SOFTCAP:
                gt = gt * (1.0 - tht * tht)
            gl.store(DXROW + tail_cols, gt.to(DX.dtype.element_ty), mask=tail_mask)

            if COMPUTE_LOSS:
                if HAS_SOFTCAP:
                    z_t = softcap * _tanh_f32(z_t / softcap)
                ce = keep * w_t * ((m - z_t) + log_d)
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        ce += eps_v * (lse * w_all - zsum)
                    else:
                        ce += eps_v * (lse * n_cols - zsum)
                ce = gl.where(valid, ce, float("nan"))   # out-of-range target (unchecked under compile)
                gl.store(LOSS + row, gl.where(ignored, 0.0, ce))
                if HAS_ZLOSS:
                    gl.store(ZLOSS + row, gl.where(ignored, 0.0, lse_square_scale * lse * lse))

        for s in gl.static_range(NS):
            mbarrier.invalidate(bars.index(s))


def launch(logits, target, weight, scales, lse, loss_rows, z_rows, grad, row_scale,
           ignore_index, label_smoothing, lse_square_scale, softcap, n_programs: Optional[int] = None,
           guard: Optional[torch.Tensor] = None) -> None:
    """Run the resident-row kernel; arguments as ``launch_cross_entropy_rows`` (``lse`` is
    always written, ``grad`` must be given). Call only where :func:`supported` is True. ``n_programs``: CTAs to
    launch (default: one per SM)."""
    n_rows, n_cols = logits.shape
    eb = logits.element_size()
    nbox, nch, ns = settings(n_cols, eb)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=eb * 8, rank=3)
    desc = TensorDescriptor(logits, [n_rows, n_cols // BOX, BOX], [logits.stride(0), BOX, 1], [1, nbox, BOX], layout)
    if n_programs is None:  # one CTA per SM: 512 threads x ~124 registers fill the register file
        n_programs = multiprocessor_count(logits.device)
    n_programs = max(1, min(n_programs, n_rows))
    dummy = lse  # placeholder pointer for unused arguments
    with device_guard(logits):
        _cross_entropy_resident_kernel[(n_programs,)](
            desc, logits, logits.stride(0),
            grad, grad.stride(0),
            target,
            weight if weight is not None else dummy,
            loss_rows if loss_rows is not None else dummy,
            z_rows if z_rows is not None else dummy,
            lse, scales,
            row_scale if row_scale is not None else dummy,
            guard if guard is not None else target,
            n_rows, n_cols, ignore_index,
            float(label_smoothing), float(lse_square_scale), float(softcap) if softcap is not None else 1.0,
            HAS_WEIGHT=weight is not None,
            HAS_SOFTCAP=softcap is not None,
            HAS_SMOOTHING=label_smoothing > 0.0,
            HAS_ZLOSS=lse_square_scale != 0.0,
            COMPUTE_LOSS=loss_rows is not None,
            HAS_ROW_SCALE=row_scale is not None,
            HAS_GUARD=guard is not None,
            NCH=nch, NS=ns, NBOX=nbox, BOX_=BOX, VEC_=VEC,
            num_warps=NUM_WARPS,
        )
