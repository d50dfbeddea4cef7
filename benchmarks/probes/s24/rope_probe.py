"""rope kernel sweep: device time under CUDA graphs (host launch cost removed)."""
import sys, torch, triton, triton.language as tl
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
from ligerzoo.kernels._utils import next_power_of_2
try:
    from liger_kernel.transformers.functional import liger_rope
except Exception as e:
    print("no liger", e); liger_rope = None
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
dev = "cuda"

@triton.jit
def _rope2d(Q, sq_t, sq_h, K_, sk_t, sk_h, COS, sc_t, SIN, ss_t,
            n_qh, n_kh, half, n_qblocks,
            BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, HALF_COS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < half
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
    if hb < n_qblocks:
        X = Q + t * sq_t
        sh = sq_h
        n = n_qh
        h0 = hb * BLOCK_H
    else:
        X = K_ + t * sk_t
        sh = sk_h
        n = n_kh
        h0 = (hb - n_qblocks) * BLOCK_H
    heads = h0 + tl.arange(0, BLOCK_H)
    mask = (heads < n)[:, None] & r_mask[None, :]
    p = X + heads[:, None].to(tl.int64) * sh + offs_r[None, :]
    x1 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p + half, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1[None, :] - x2 * sa[None, :]
    o2 = x2 * c2[None, :] + x1 * sb[None, :]
    tl.store(p, o1.to(Q.dtype.element_ty), mask=mask)
    tl.store(p + half, o2.to(Q.dtype.element_ty), mask=mask)


def cur(q, k, cos, sin, bh, nw, backward, inplace):
    B, T, nq, D = q.shape
    nk = k.shape[2]
    half = cos.shape[-1] // 2
    if inplace:
        qo, ko = q, k
    else:
        qo, ko = torch.empty_like(q), torch.empty_like(k)
    R._rope_kernel[(B * T,)](
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
        qo, qo.stride(0), qo.stride(1), qo.stride(2), ko, ko.stride(0), ko.stride(1), ko.stride(2),
        cos, 0, cos.stride(1), sin, 0, sin.stride(1), T, nq, nk, half, 0,
        BACKWARD=backward, BLOCK_H=bh, BLOCK_R=next_power_of_2(half), BLOCK_P=1, HAS_PASS=False, num_warps=nw)
    return qo, ko


def two_d(q, k, cos, sin, bh, nw, backward, half_cos):
    B, T, nq, D = q.shape
    nk = k.shape[2]
    half = cos.shape[-1] // 2
    nqb, nkb = triton.cdiv(nq, bh), triton.cdiv(nk, bh)
    _rope2d[(B * T, nqb + nkb)](q, q.stride(1), q.stride(2), k, k.stride(1), k.stride(2),
                                cos, cos.stride(1), sin, sin.stride(1), nq, nk, half, nqb,
                                BACKWARD=backward, BLOCK_H=bh, BLOCK_R=next_power_of_2(half), HALF_COS=half_cos,
                                num_warps=nw)


def bench(fn):
    return do_bench_cudagraph(fn, rep=100)


def run(NH, NKV, D, n, full, extra=()):
        q = torch.randn(1, n, NH, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, n, NKV, D, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(n, device=dev)[None]
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
        cos, sin = K.rope_cos_sin(pos, inv)
        cosb, sinb = cos.bfloat16(), sin.bfloat16()
        nbytes = 2 * (q.numel() + k.numel()) * 2
        floor_ms = nbytes / 4.27e12 * 1e3
        print(f"\n== H {NH}/{NKV} D {D} tokens {n}: q+k read+write {nbytes/1e6:.1f} MB, floor {floor_ms*1e3:.1f} us at 4.27 TB/s")
        want = R._launch(q, k, cos, sin, backward=False)
        q2, k2 = q.clone(), k.clone(); two_d(q2, k2, cos, sin, 16, 4, False, True)
        print("2d==cur:", torch.equal(q2, want[0]), torch.equal(k2, want[1]))
        res = {}
        def rec(name, fn):
            ms = bench(fn)
            res[name] = ms
            print(f"{name:48s} {ms*1e3:8.1f} us  {floor_ms/ms*100:5.1f}%", flush=True)
        rec("launch fwd (as shipped, out of place)", lambda: R._launch(q, k, cos, sin, backward=False))
        rec("launch bwd inplace (as shipped)", lambda: R._launch(q, k, cos, sin, backward=True, inplace=True))
        cs = {"f32cos": (cos, sin), "bf16cos": (cosb, sinb)}
        if full:
            for cs_name, (c, s) in cs.items():
                for bh in (8, 16, 32):
                    for nw in (2, 4, 8):
                        rec(f"cur {cs_name} bh={bh} nw={nw} bwd inpl", lambda: cur(q, k, c, s, bh, nw, True, True))
                for bh in (4, 8, 16, 32):
                    for nw in (1, 2, 4):
                        for hc in (False, True):
                            rec(f"2d {cs_name} bh={bh} nw={nw} halfcos={hc} inpl", lambda: two_d(q, k, c, s, bh, nw, True, hc))
        for name in extra:
            kind, cs_name, bh, nw, hc = name
            c, s = cs[cs_name]
            if kind == "cur":
                rec(f"cur {cs_name} bh={bh} nw={nw} bwd inpl", lambda: cur(q, k, c, s, bh, nw, True, True))
            else:
                rec(f"2d {cs_name} bh={bh} nw={nw} halfcos={hc} inpl", lambda: two_d(q, k, c, s, bh, nw, True, hc))
        if liger_rope is not None:
            qt, kt = q.transpose(1, 2), k.transpose(1, 2)
            rec("liger (bf16 cos, in place)", lambda: liger_rope(qt, kt, cosb, sinb))
            rec("liger (f32 cos, in place)", lambda: liger_rope(qt, kt, cos, sin))
        best = sorted(res.items(), key=lambda kv: kv[1])[:8]
        print("best:", [(k_, round(v * 1e3, 1)) for k_, v in best])
        return res


res = run(32, 8, 128, 8192, True)
keys = [k_ for k_, _ in sorted(res.items(), key=lambda kv: kv[1]) if k_.startswith(("cur", "2d"))][:5]
def parse(k_):
    f = k_.split()
    d = dict(x.split("=") for x in f[2:] if "=" in x)
    return (f[0], f[1], int(d["bh"]), int(d["nw"]), d.get("halfcos") == "True")
extra = [parse(k_) for k_ in keys]
for (NH, NKV, D, n) in [(32, 8, 128, 4096), (32, 8, 128, 16384), (28, 4, 128, 8192), (32, 8, 96, 8192)]:
    run(NH, NKV, D, n, False, extra)
