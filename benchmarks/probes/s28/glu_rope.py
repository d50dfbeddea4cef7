"""Session 28 probe 1: device time (CUDA graphs) of swiglu at 16384 x 14336 and rope at 4096
tokens / head_dim 96 against Liger Kernel's, with the launch variants that might close the last
gaps: tile, warps, grid order, eviction hints, and sizes passed as constexprs (as Liger does)."""
import sys
import torch, triton, triton.language as tl
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
from ligerzoo.kernels._utils import next_power_of_2
R = sys.modules["ligerzoo.kernels.rope"]
S = sys.modules["ligerzoo.kernels.swiglu"]
import liger_kernel.ops.swiglu as lsw
import liger_kernel.ops.rope as lrope

print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
dev = "cuda"
WHAT = sys.argv[1] if len(sys.argv) > 1 else "all"


def bench(fn):
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


# ------------------------------------------------------------------ swiglu variants
@triton.jit
def _fwd(A, B, Y, stride, n_cols, NC: tl.constexpr, BLOCK: tl.constexpr, COLS_FAST: tl.constexpr,
         HINT: tl.constexpr, CONST_N: tl.constexpr):
    if COLS_FAST:
        row = tl.program_id(1).to(tl.int64)
        cb = tl.program_id(0)
    else:
        row = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    if CONST_N:
        mask = cols < NC
    else:
        mask = cols < n_cols
    if HINT:
        a = tl.load(A + row * stride + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        b = tl.load(B + row * stride + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        a = tl.load(A + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    if HINT:
        tl.store(Y + row * stride + cols, y.to(Y.dtype.element_ty), mask=mask, cache_modifier=".cs")
    else:
        tl.store(Y + row * stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(DY, A, B, stride, n_cols, NC: tl.constexpr, BLOCK: tl.constexpr, COLS_FAST: tl.constexpr,
         HINT: tl.constexpr, CONST_N: tl.constexpr):
    if COLS_FAST:
        row = tl.program_id(1).to(tl.int64)
        cb = tl.program_id(0)
    else:
        row = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    if CONST_N:
        mask = cols < NC
    else:
        mask = cols < n_cols
    if HINT:
        dy = tl.load(DY + row * stride + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        a = tl.load(A + row * stride + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        b = tl.load(B + row * stride + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        dy = tl.load(DY + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    act = a * s
    db = dy * act
    da = dy * b * (s * (1.0 + a * (1.0 - s)))
    if HINT:
        tl.store(A + row * stride + cols, da.to(A.dtype.element_ty), mask=mask, cache_modifier=".cs")
        tl.store(B + row * stride + cols, db.to(B.dtype.element_ty), mask=mask, cache_modifier=".cs")
    else:
        tl.store(A + row * stride + cols, da.to(A.dtype.element_ty), mask=mask)
        tl.store(B + row * stride + cols, db.to(B.dtype.element_ty), mask=mask)


def glu(n=16384, I=14336):
    a = torch.randn(n, I, device=dev, dtype=torch.bfloat16) * 0.1
    b = torch.randn(n, I, device=dev, dtype=torch.bfloat16) * 0.1
    dy = torch.randn(n, I, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(a)
    ff, bf = 3 * n * I * 2 / 4.24e9, 5 * n * I * 2 / 4.24e9  # floors, ms at 4.24 TB/s
    # correctness of the probe kernels against the shipped ones
    y0 = S._forward(a, b, 0)
    _fwd[(n, 1)](a, b, y, I, I, NC=I, BLOCK=16384, COLS_FAST=False, HINT=True, CONST_N=True, num_warps=32)
    print("probe fwd == shipped:", torch.equal(y, y0), flush=True)
    a2, b2 = a.clone(), b.clone()
    da0, db0 = torch.empty_like(a), torch.empty_like(a)
    S._backward(dy, a, b, da0, db0, 0)
    _bwd[(2, n)](dy, a2, b2, I, I, NC=I, BLOCK=8192, COLS_FAST=True, HINT=True, CONST_N=True, num_warps=32)
    print("probe bwd == shipped:", torch.equal(a2, da0), torch.equal(b2, db0), flush=True)
    del y0, da0, db0
    a2, b2 = a.clone(), b.clone()
    res = {}

    def rec(key, fn):
        res.setdefault(key, []).append(bench(fn))

    fwd_vars = [(16384, 32, False, False, False), (16384, 32, False, True, False), (16384, 32, False, False, True),
                (16384, 32, False, True, True), (16384, 16, False, False, False), (8192, 16, False, False, False),
                (8192, 16, True, False, False), (8192, 32, True, True, True), (4096, 8, True, False, False)]
    bwd_vars = [(8192, 32, False, False, False), (8192, 32, True, False, False), (8192, 32, True, True, False),
                (8192, 32, True, False, True), (8192, 32, True, True, True), (16384, 32, False, False, False),
                (16384, 32, False, True, True), (16384, 16, False, False, False), (4096, 16, True, False, False),
                (4096, 8, True, False, False), (8192, 16, True, False, False)]
    for rep in range(3):
        rec("fwd shipped", lambda: S._forward(a, b, 0))
        rec("fwd liger", lambda: lsw.swiglu_forward(a, b))
        for (blk, nw, cf, hint, cn) in fwd_vars:
            nb = triton.cdiv(I, blk)
            g = (nb, n) if cf else (n, nb)
            rec(f"fwd blk {blk} nw {nw} colsfast {cf:d} hint {hint:d} constN {cn:d}",
                lambda: _fwd[g](a, b, y, I, I, NC=I, BLOCK=blk, COLS_FAST=cf, HINT=hint, CONST_N=cn, num_warps=nw))
        rec("bwd shipped (in place)", lambda: S._backward(dy, a2, b2, a2, b2, 0))
        rec("bwd liger (in place)", lambda: lsw.swiglu_backward(a2, b2, dy))
        for (blk, nw, cf, hint, cn) in bwd_vars:
            nb = triton.cdiv(I, blk)
            g = (nb, n) if cf else (n, nb)
            rec(f"bwd blk {blk} nw {nw} colsfast {cf:d} hint {hint:d} constN {cn:d}",
                lambda: _bwd[g](dy, a2, b2, I, I, NC=I, BLOCK=blk, COLS_FAST=cf, HINT=hint, CONST_N=cn, num_warps=nw))
    print(f"== swiglu {n} x {I} bf16: floors fwd {ff*1e3:.1f} us, bwd {bf*1e3:.1f} us (4.24 TB/s); 3 rounds, us")
    for k_, v in res.items():
        fl = ff if k_.startswith("fwd") else bf
        print(f"{k_:48s} " + " ".join(f"{t*1e3:7.1f}" for t in v) + f"   min {min(v)*1e3:7.1f} ({fl/min(v)*100:5.1f}%)",
              flush=True)
    del a, b, dy, y, a2, b2
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ rope variants
@triton.jit
def _rope_c(Q, sq_t, K_, sk_t, COS, sc_t, SIN, ss_t,
            NQH: tl.constexpr, NKH: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr,
            BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
            FP32: tl.constexpr):
    # in place, half tables, sizes as constexprs (Liger's way); FP32: math in fp32 (else bf16 as Liger)
    t = tl.program_id(0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < HALF
    hq = tl.arange(0, BLOCK_HQ)
    hk = tl.arange(0, BLOCK_HK)
    mq = (hq < NQH)[:, None] & r_mask[None, :]
    mk = (hk < NKH)[:, None] & r_mask[None, :]
    pq = Q + t * sq_t + hq[:, None] * HD + offs_r[None, :]
    pk = K_ + t * sk_t + hk[:, None] * HD + offs_r[None, :]
    ct = tl.float32 if FP32 else Q.dtype.element_ty
    q1 = tl.load(pq, mask=mq, other=0.0).to(ct)
    k1 = tl.load(pk, mask=mk, other=0.0).to(ct)
    q2 = tl.load(pq + HALF, mask=mq, other=0.0).to(ct)
    k2 = tl.load(pk + HALF, mask=mk, other=0.0).to(ct)
    c = tl.load(COS + t * sc_t + offs_r, mask=r_mask, other=0.0).to(ct)
    s = tl.load(SIN + t * ss_t + offs_r, mask=r_mask, other=0.0).to(ct)
    if BACKWARD:
        s = -s
    tl.store(pq, (q1 * c[None, :] - q2 * s[None, :]).to(Q.dtype.element_ty), mask=mq)
    tl.store(pq + HALF, (q2 * c[None, :] + q1 * s[None, :]).to(Q.dtype.element_ty), mask=mq)
    tl.store(pk, (k1 * c[None, :] - k2 * s[None, :]).to(K_.dtype.element_ty), mask=mk)
    tl.store(pk + HALF, (k2 * c[None, :] + k1 * s[None, :]).to(K_.dtype.element_ty), mask=mk)


def shipped_nw(q, k, cos, sin, backward, nw):
    B, T, nq, D = q.shape
    nk = k.shape[2]
    half = cos.shape[-1]
    br = next_power_of_2(half)
    sq, sk, sc, ss = q.stride(), k.stride(), cos.stride(), sin.stride()
    R._rope_kernel[(B * T,)](q, sq[0], sq[1], sq[2], k, sk[0], sk[1], sk[2], q, sq[0], sq[1], sq[2],
                             k, sk[0], sk[1], sk[2], cos, 0, sc[1], sin, 0, ss[1], T, nq, nk, half, 0,
                             BACKWARD=backward, HALF_TABLE=True, ONE_TILE=True, BLOCK_HQ=next_power_of_2(nq),
                             BLOCK_HK=next_power_of_2(nk), BLOCK_R=br, BLOCK_P=1, HAS_PASS=False, num_warps=nw)


def const_nw(q, k, cos, sin, backward, nw, fp32=True):
    B, T, nq, D = q.shape
    nk = k.shape[2]
    half = cos.shape[-1]
    _rope_c[(B * T,)](q, q.stride(1), k, k.stride(1), cos, cos.stride(1), sin, sin.stride(1),
                      NQH=nq, NKH=nk, HD=D, HALF=half, BACKWARD=backward, BLOCK_HQ=next_power_of_2(nq),
                      BLOCK_HK=next_power_of_2(nk), BLOCK_R=next_power_of_2(half), FP32=fp32, num_warps=nw)


def rope_all():
    for (NH, NKV, D, n) in [(32, 8, 128, 4096), (32, 8, 96, 8192), (32, 8, 128, 8192), (32, 8, 96, 4096)]:
        q = torch.randn(1, n, NH, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, n, NKV, D, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(n, device=dev)[None]
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
        cos, sin = K.rope_cos_sin(pos, inv)
        hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
        cosb, sinb = cos.bfloat16(), sin.bfloat16()
        floor_us = 2 * 2 * (q.numel() + k.numel()) * 2 / 4.24e6  # fwd + bwd, in place
        # probe correctness: const kernel (fp32) == shipped, forward
        q0, k0 = q.clone(), k.clone()
        K.rope(q0, k0, hcos, hsin, inplace=True, half_table=True)
        q1, k1 = q.clone(), k.clone()
        const_nw(q1, k1, hcos, hsin, False, 4)
        print(f"const == shipped (rope {NH}/{NKV} D {D}):", torch.equal(q0, q1), torch.equal(k0, k1), flush=True)
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        res = {}

        def rec(key, fn):
            res.setdefault(key, []).append(bench(fn))

        def fb(f):  # forward then backward, both in place
            def step():
                f(False)
                f(True)
            return step

        for rep in range(3):
            rec("shipped (package launch)", fb(lambda bw: R._launch(q, k, hcos, hsin, backward=bw, half_table=True,
                                                                      inplace=True)))
            rec("liger (bf16 full tables)", fb(lambda bw: (lrope.rope_backward if bw else lrope.rope_forward)(qt, kt, cosb, sinb)))
            for nw in (2, 4, 8):
                rec(f"shipped kernel nw {nw}", fb(lambda bw: shipped_nw(q, k, hcos, hsin, bw, nw)))
                rec(f"constexpr sizes fp32 nw {nw}", fb(lambda bw: const_nw(q, k, hcos, hsin, bw, nw)))
            rec("constexpr sizes bf16 math nw 4", fb(lambda bw: const_nw(q, k, hcos, hsin, bw, 4, fp32=False)))
        print(f"== rope {NH}/{NKV} heads, D {D}, {n} tokens: fwd + bwd in place, floor {floor_us:.1f} us; 3 rounds, us")
        for k_, v in res.items():
            print(f"{k_:40s} " + " ".join(f"{t*1e3:6.1f}" for t in v) + f"   min {min(v)*1e3:6.1f}", flush=True)
        del q, k, qt, kt
        torch.cuda.empty_cache()


if WHAT in ("all", "glu"):
    glu()
if WHAT in ("all", "rope"):
    rope_all()
