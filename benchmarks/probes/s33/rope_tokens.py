"""Session 33 probe: rope with several tokens per program, in the model's case (L2 flushed).

Session 30 left rope behind Liger's by 0.5-2.6% on some families' heads (Qwen2.5-7B, Gemma2,
Qwen2.5-1.5B, SmolLM2) with L2 flushed before each pass; the table bytes were not it (session 30
item 1), nor issue slots (item 6). Not tried: fewer, larger programs. The package's kernel rotates
one token per program (8192 programs of 8-12 KB each at 8192 tokens). This probe's kernel is the
package's one-tile, dense-heads, half-table, in-place path with a token axis: each program loads
(BLOCK_T, heads, R/2) tiles of q and k for BLOCK_T consecutive tokens, all before its first store,
so a program has BLOCK_T times the bytes in flight. Timed forward + backward, each pass after a
128 MiB fill (CUDA graphs less the fills' graph), us, best of 2 rounds: the package's kernel under
its warp rule, the probe's at BLOCK_T 1 (1, 2 warps), 2 (1, 2, 4) and 4 (2, 4, 8), and Liger's.
Then the model's layout (q and k inside the fused qkv output): the package's kernel on views
against the probe's with the q and k heads as one tile of Hq + Hk heads (no padding for
Qwen2.5-7B's 28 + 4). B = 1, so the
token index is the table row. Each probe variant's output is checked against the package's."""
import sys
import torch, triton
import triton.language as tl
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]


@triton.jit
def rope_tokens(Q, K_, COS, SIN, n_rows, sq_t, sk_t, sc_t, N_QH: tl.constexpr, N_KH: tl.constexpr,
                HALF: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
                BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr, HAS_K: tl.constexpr = True):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)          # (BT,) token rows
    rmask = rows < n_rows
    rows = rows.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_r < HALF
    tmask = rmask[:, None] & rm[None, :]
    c = tl.load(COS + rows[:, None] * sc_t + offs_r[None, :], mask=tmask, other=0.0).to(tl.float32)
    s = tl.load(SIN + rows[:, None] * sc_t + offs_r[None, :], mask=tmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s
    c = c[:, None, :]                                                   # (BT, 1, BR)
    s = s[:, None, :]
    hq = tl.arange(0, BLOCK_HQ)
    qoff = rows[:, None, None] * sq_t + (hq * (2 * HALF))[None, :, None] + offs_r[None, None, :]
    qm = rmask[:, None, None] & (hq < N_QH)[None, :, None] & rm[None, None, :]
    q1 = tl.load(Q + qoff, mask=qm, other=0.0).to(tl.float32)
    q2 = tl.load(Q + qoff + HALF, mask=qm, other=0.0).to(tl.float32)
    if HAS_K:  # else Q's heads run on into K's (a fused qkv buffer): one tile of Hq + Hk heads
        hk = tl.arange(0, BLOCK_HK)
        koff = rows[:, None, None] * sk_t + (hk * (2 * HALF))[None, :, None] + offs_r[None, None, :]
        km = rmask[:, None, None] & (hk < N_KH)[None, :, None] & rm[None, None, :]
        k1 = tl.load(K_ + koff, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(K_ + koff + HALF, mask=km, other=0.0).to(tl.float32)
    tl.store(Q + qoff, (q1 * c - q2 * s).to(Q.dtype.element_ty), mask=qm)
    tl.store(Q + qoff + HALF, (q2 * c + q1 * s).to(Q.dtype.element_ty), mask=qm)
    if HAS_K:
        tl.store(K_ + koff, (k1 * c - k2 * s).to(K_.dtype.element_ty), mask=km)
        tl.store(K_ + koff + HALF, (k2 * c + k1 * s).to(K_.dtype.element_ty), mask=km)


def launch(q, k, hcos, hsin, backward, bt, nw):
    """q (1, T, Hq, D), k (1, T, Hk, D) contiguous, rotated in place; hcos/hsin (1, T, D/2) fp32."""
    _, T, nq, D = q.shape
    nk = k.shape[2]
    rope_tokens[(triton.cdiv(T, bt),)](
        q, k, hcos, hsin, T, q.stride(1), k.stride(1), hcos.stride(1), N_QH=nq, N_KH=nk, HALF=D // 2,
        BACKWARD=backward, BLOCK_T=bt, BLOCK_HQ=triton.next_power_of_2(nq), BLOCK_HK=triton.next_power_of_2(nk),
        BLOCK_R=triton.next_power_of_2(D // 2), num_warps=nw)


def launch_joint(qkv, nq, nk, D, hcos, hsin, backward, bt, nw):
    """qkv (1, T, (Hq + 2 Hk) D) in place: the q and k heads as one tile of Hq + Hk heads."""
    T = qkv.shape[1]
    rope_tokens[(triton.cdiv(T, bt),)](
        qkv, qkv, hcos, hsin, T, qkv.stride(1), qkv.stride(1), hcos.stride(1), N_QH=nq + nk, N_KH=1, HALF=D // 2,
        BACKWARD=backward, BLOCK_T=bt, BLOCK_HQ=triton.next_power_of_2(nq + nk), BLOCK_HK=1,
        BLOCK_R=triton.next_power_of_2(D // 2), HAS_K=False, num_warps=nw)


def qkv_views(qkv, nq, nk, D):
    T = qkv.shape[1]
    return qkv[..., :nq * D].view(1, T, nq, D), qkv[..., nq * D:(nq + nk) * D].view(1, T, nk, D)


def check(dev, shapes, T, dtype):
    """The probe's kernel against the package's, both directions, every BLOCK_T (bitwise on the CPU;
    on the GPU the compiler may contract other products into FMAs: within one bf16 rounding)."""
    same = (lambda a, b: torch.equal(a, b)) if dev == "cpu" else (
        lambda a, b: torch.allclose(a.float(), b.float(), rtol=2**-7, atol=2**-14))
    for NH, NKV, D, fam in shapes:
        q = torch.randn(1, T, NH, D, device=dev, dtype=dtype)
        k = torch.randn(1, T, NKV, D, device=dev, dtype=dtype)
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
        hcos, hsin = K.rope_cos_sin(torch.arange(T, device=dev)[None], inv, half_table=True)
        for backward in (False, True):
            qr, kr = q.clone(), k.clone()
            R._launch(qr, kr, hcos, hsin, backward=backward, half_table=True, inplace=True)
            for bt in (1, 2, 4):
                qp, kp = q.clone(), k.clone()
                launch(qp, kp, hcos, hsin, backward, bt, 2)
                assert same(qp, qr) and same(kp, kr), (fam, backward, bt)
                qkv = torch.randn(1, T, (NH + 2 * NKV) * D, device=dev, dtype=dtype)
                ref = qkv.clone()
                R._launch(*qkv_views(ref, NH, NKV, D), hcos, hsin, backward=backward, half_table=True, inplace=True)
                launch_joint(qkv, NH, NKV, D, hcos, hsin, backward, bt, 2)
                assert same(qkv, ref), (fam, backward, bt, "joint")
    print("probe kernel matches the package's:", [s[-1] for s in shapes], T, dtype, flush=True)


if __name__ == "__main__" and not torch.cuda.is_available():  # CPU, interpreter: correctness only
    check("cpu", [(3, 1, 8, "tiny"), (5, 2, 12, "odd")], 7, torch.float32)
    sys.exit(0)

import liger_kernel.ops.rope as lrope
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
SHAPES = [(32, 8, 128, "llama-3-8b"), (28, 4, 128, "qwen2.5-7b"), (40, 10, 128, "phi-3-medium"),
          (16, 8, 256, "gemma2-9b"), (16, 16, 256, "gemma-7b"), (12, 2, 128, "qwen2.5-1.5b"),
          (32, 32, 128, "llama-2-7b"), (9, 3, 64, "smollm2-135m")]
check("cuda", SHAPES, 1001, torch.bfloat16)
buf = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
g = lambda fn: do_bench_cudagraph(fn, rep=60, return_mode="median")
VARIANTS = ["pkg", (1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (4, 4), (4, 8), "liger"]
print("tokens | heads | pkg | " + " ".join(f"t{bt}w{nw}" for bt, nw in VARIANTS[1:-1]) + " | liger (us, flushed)")
tot = {}
for NH, NKV, D, fam in SHAPES:
    for T in (4096, 8192):
        q = torch.randn(1, T, NH, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, T, NKV, D, device="cuda", dtype=torch.bfloat16)
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
        pos = torch.arange(T, device="cuda")[None]
        hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
        cos, sin = K.rope_cos_sin(pos, inv)
        cosb, sinb = cos.bfloat16(), sin.bfloat16()
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)

        def step(v):
            if v == "pkg":
                return lambda: (buf.zero_(), R._launch(q, k, hcos, hsin, backward=False, half_table=True, inplace=True),
                                buf.zero_(), R._launch(q, k, hcos, hsin, backward=True, half_table=True, inplace=True))
            if v == "liger":
                return lambda: (buf.zero_(), lrope.rope_forward(qt, kt, cosb, sinb),
                                buf.zero_(), lrope.rope_backward(qt, kt, cosb, sinb))
            bt, nw = v
            return lambda: (buf.zero_(), launch(q, k, hcos, hsin, False, bt, nw),
                            buf.zero_(), launch(q, k, hcos, hsin, True, bt, nw))

        best = {}
        for rnd in range(2):
            fill = g(lambda: (buf.zero_(), buf.zero_()))
            for v in VARIANTS:
                best[v] = min(best.get(v, 1e9), (g(step(v)) - fill) * 1e3)
        for v in VARIANTS:
            tot[v] = tot.get(v, 0.0) + best[v]
        print(f"{T} | {NH}/{NKV}/{D} {fam} | {best['pkg']:.1f} | "
              + " ".join(f"{best[v]:.1f}" for v in VARIANTS[1:-1]) + f" | {best['liger']:.1f}", flush=True)
        del q, k, qt, kt
        torch.cuda.empty_cache()
print("sum | " + " ".join(f"{tot[v]:.1f}" for v in VARIANTS))

# The model's layout: q and k rotated in place inside the fused qkv projection's output.
print("fused qkv: tokens | heads | pkg (views) | joint " + " ".join(f"t{bt}w{nw}" for bt, nw in VARIANTS[1:-1]) + " (us, flushed)")
tot = {}
for NH, NKV, D, fam in SHAPES:
    for T in (4096, 8192):
        qkv = torch.randn(1, T, (NH + 2 * NKV) * D, device="cuda", dtype=torch.bfloat16)
        q, k = qkv_views(qkv, NH, NKV, D)
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
        hcos, hsin = K.rope_cos_sin(torch.arange(T, device="cuda")[None], inv, half_table=True)

        def step(v):
            if v == "pkg":
                return lambda: (buf.zero_(), R._launch(q, k, hcos, hsin, backward=False, half_table=True, inplace=True),
                                buf.zero_(), R._launch(q, k, hcos, hsin, backward=True, half_table=True, inplace=True))
            bt, nw = v
            return lambda: (buf.zero_(), launch_joint(qkv, NH, NKV, D, hcos, hsin, False, bt, nw),
                            buf.zero_(), launch_joint(qkv, NH, NKV, D, hcos, hsin, True, bt, nw))

        best = {}
        for rnd in range(2):
            fill = g(lambda: (buf.zero_(), buf.zero_()))
            for v in VARIANTS[:-1]:
                best[v] = min(best.get(v, 1e9), (g(step(v)) - fill) * 1e3)
        for v in VARIANTS[:-1]:
            tot[v] = tot.get(v, 0.0) + best[v]
        print(f"{T} | {NH}/{NKV}/{D} {fam} | {best['pkg']:.1f} | "
              + " ".join(f"{best[v]:.1f}" for v in VARIANTS[1:-1]), flush=True)
        del qkv, q, k
        torch.cuda.empty_cache()
print("sum | " + " ".join(f"{tot[v]:.1f}" for v in VARIANTS[:-1]))
