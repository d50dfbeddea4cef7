"""probe 2: GLU kernel tile sweep and a Liger-like single-tile rope, device time under CUDA graphs."""
import sys, torch, triton, triton.language as tl
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
S = sys.modules["ligerzoo.kernels.swiglu"]
from ligerzoo.kernels._utils import next_power_of_2
try:
    from liger_kernel.transformers.functional import liger_rope
    import liger_kernel.ops.swiglu as lsw
    import liger_kernel.ops.geglu as lge
except Exception as e:
    print("no liger", e); liger_rope = lsw = lge = None
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
dev = "cuda"
bench = lambda fn: do_bench_cudagraph(fn, rep=100)

# ------------------------------------------------------------------ GLU sweep
n, I = 8192, 14336
for act in (0, 1):
    a = torch.randn(n, I, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, I, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(n, I, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(a); da = torch.empty_like(a); db = torch.empty_like(a)
    fb, bb = 3 * n * I * 2, 5 * n * I * 2
    ff, bf = fb / 4.27e12 * 1e3, bb / 4.27e12 * 1e3
    print(f"\n== GLU act={act} {n}x{I}: fwd floor {ff*1e3:.1f} us, bwd floor {bf*1e3:.1f} us")
    for block in (1024, 2048, 4096, 8192, 16384):
        for nw in (4, 8, 16, 32):
            if block // (nw * 32) < 4 or block // (nw * 32) > 64:
                continue
            g = (n, triton.cdiv(I, block))
            tf = bench(lambda: S._gated_fwd_kernel[g](a, I, b, I, y, I, I, ACT=act, BLOCK=block, num_warps=nw))
            tb = bench(lambda: S._gated_bwd_kernel[g](dy, I, a, I, b, I, da, I, db, I, da, I, I, ACT=act, STORE_Y=False, BLOCK=block, num_warps=nw))
            print(f"block {block:5d} nw {nw:2d}: fwd {tf*1e3:7.1f} us ({ff/tf*100:5.1f}%)  bwd {tb*1e3:7.1f} us ({bf/tb*100:5.1f}%)", flush=True)
    # in-place backward (outputs over a, b) at the shipped tile
    blk, nw = S._settings(I)
    g = (n, triton.cdiv(I, blk))
    a2, b2 = a.clone(), b.clone()
    tb = bench(lambda: S._gated_bwd_kernel[g](dy, I, a2, I, b2, I, a2, I, b2, I, a2, I, I, ACT=act, STORE_Y=False, BLOCK=blk, num_warps=nw))
    print(f"shipped tile, in-place bwd: {tb*1e3:7.1f} us ({bf/tb*100:5.1f}%)")
    L = lsw if act == 0 else lge
    if L is not None:
        a2, b2 = a.clone() * 0.1, b.clone() * 0.1
        tf = bench(lambda: L.swiglu_forward(a2, b2) if act == 0 else L.geglu_forward(a2, b2))
        fwd_b = (lambda: L.swiglu_backward(a2, b2, dy)) if act == 0 else (lambda: L.geglu_backward(a2, b2, dy))
        tb = bench(fwd_b)
        print(f"liger: fwd {tf*1e3:7.1f} us ({ff/tf*100:5.1f}%)  bwd (in place) {tb*1e3:7.1f} us ({bf/tb*100:5.1f}%)")
    del a, b, dy, y, da, db, a2, b2
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ rope: one tile of all heads
@triton.jit
def _rope1(Q, sq_t, sq_h, K_, sk_t, sk_h, QO, sqo_t, sqo_h, KO, sko_t, sko_h, COS, sc_t, SIN, ss_t,
           n_qh, n_kh, half,
           BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
           HALF_COS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < half
    hq = tl.arange(0, BLOCK_HQ)
    hk = tl.arange(0, BLOCK_HK)
    mq = (hq < n_qh)[:, None] & r_mask[None, :]
    mk = (hk < n_kh)[:, None] & r_mask[None, :]
    pq = Q + t * sq_t + hq[:, None] * sq_h + offs_r[None, :]
    pk = K_ + t * sk_t + hk[:, None] * sk_h + offs_r[None, :]
    q1 = tl.load(pq, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(pq + half, mask=mq, other=0.0).to(tl.float32)
    k1 = tl.load(pk, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(pk + half, mask=mk, other=0.0).to(tl.float32)
    c1 = tl.load(COS + t * sc_t + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + t * ss_t + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    if HALF_COS:
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(COS + t * sc_t + half + offs_r, mask=r_mask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + t * ss_t + half + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2
    oq = QO + t * sqo_t + hq[:, None] * sqo_h + offs_r[None, :]
    ok = KO + t * sko_t + hk[:, None] * sko_h + offs_r[None, :]
    tl.store(oq, (q1 * c1[None, :] - q2 * sa[None, :]).to(QO.dtype.element_ty), mask=mq)
    tl.store(oq + half, (q2 * c2[None, :] + q1 * sb[None, :]).to(QO.dtype.element_ty), mask=mq)
    tl.store(ok, (k1 * c1[None, :] - k2 * sa[None, :]).to(KO.dtype.element_ty), mask=mk)
    tl.store(ok + half, (k2 * c2[None, :] + k1 * sb[None, :]).to(KO.dtype.element_ty), mask=mk)


def one(q, k, cos, sin, nw, backward, inplace, hc):
    B, T, nq, D = q.shape
    nk = k.shape[2]
    half = cos.shape[-1] // 2
    qo, ko = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    _rope1[(B * T,)](q, q.stride(1), q.stride(2), k, k.stride(1), k.stride(2),
                     qo, qo.stride(1), qo.stride(2), ko, ko.stride(1), ko.stride(2),
                     cos, cos.stride(1), sin, sin.stride(1), nq, nk, half,
                     BACKWARD=backward, BLOCK_HQ=next_power_of_2(nq), BLOCK_HK=next_power_of_2(nk),
                     BLOCK_R=next_power_of_2(half), HALF_COS=hc, num_warps=nw)
    return qo, ko


for (NH, NKV, D, n) in [(32, 8, 128, 8192), (32, 8, 128, 16384), (28, 4, 128, 8192), (32, 8, 96, 8192)]:
    q = torch.randn(1, n, NH, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, n, NKV, D, device=dev, dtype=torch.bfloat16)
    pos = torch.arange(n, device=dev)[None]
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    cos, sin = K.rope_cos_sin(pos, inv)
    cosb, sinb = cos.bfloat16(), sin.bfloat16()
    floor_ms = 2 * (q.numel() + k.numel()) * 2 / 4.27e12 * 1e3
    print(f"\n== rope H {NH}/{NKV} D {D} tokens {n}: floor {floor_ms*1e3:.1f} us")
    want = R._launch(q, k, cos, sin, backward=False)
    got = one(q, k, cos, sin, 4, False, False, False)
    print("one==cur:", torch.equal(got[0], want[0]), torch.equal(got[1], want[1]))
    def rec(name, fn):
        ms = bench(fn)
        print(f"{name:44s} {ms*1e3:8.1f} us  {floor_ms/ms*100:5.1f}%", flush=True)
    rec("shipped fwd (out of place)", lambda: R._launch(q, k, cos, sin, backward=False))
    rec("shipped bwd (in place)", lambda: R._launch(q, k, cos, sin, backward=True, inplace=True))
    for nw in (2, 4, 8, 16):
        for hc in (False, True):
            rec(f"one nw={nw} halfcos={hc} fwd oop", lambda: one(q, k, cos, sin, nw, False, False, hc))
            rec(f"one nw={nw} halfcos={hc} bwd inpl", lambda: one(q, k, cos, sin, nw, True, True, hc))
    if liger_rope is not None:
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        rec("liger (bf16 cos, in place)", lambda: liger_rope(qt, kt, cosb, sinb))
        rec("liger (f32 cos, in place)", lambda: liger_rope(qt, kt, cos, sin))
