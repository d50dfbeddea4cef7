"""Session 28 probe 2: the package's gated kernels (1-D grid, a row's column blocks on
neighbouring programs) over tiles and warps, and its rope kernel (constexpr sizes, int32 head
offsets) over warps, against Liger Kernel's: device time under CUDA graphs, us."""
import sys
import torch, triton
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
S = sys.modules["ligerzoo.kernels.swiglu"]
import liger_kernel.ops.swiglu as lsw
import liger_kernel.ops.geglu as lge
import liger_kernel.ops.rope as lrope

print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
dev = "cuda"
WHAT = sys.argv[1] if len(sys.argv) > 1 else "all"
bench = lambda fn: do_bench_cudagraph(fn, rep=50, return_mode="median")


def show(title, res):
    print(title)
    for k_, v in res.items():
        print(f"  {k_:36s} " + " ".join(f"{t*1e3:7.1f}" for t in v) + f"   min {min(v)*1e3:7.1f}", flush=True)


def gated():
    I = 14336
    tiles = [(16384, 32), (8192, 32), (8192, 16), (4096, 16), (4096, 8), (2048, 8), (2048, 4)]
    shipped = dict(S._TILES)
    for act, L in ((0, lsw), (1, lge)):
        for n in (4096, 8192, 16384):
            a = torch.randn(n, I, device=dev, dtype=torch.bfloat16) * 0.1
            b = torch.randn(n, I, device=dev, dtype=torch.bfloat16) * 0.1
            dy = torch.randn(n, I, device=dev, dtype=torch.bfloat16)
            res = {}
            rec = lambda key, fn: res.setdefault(key, []).append(bench(fn))
            for rnd in range(2):
                S._TILES.update(shipped)
                rec("fwd shipped", lambda: S._forward(a, b, act))
                rec("bwd shipped (in place)", lambda: S._backward(dy, a, b, a, b, act))
                rec("fwd liger", lambda: L.swiglu_forward(a, b) if act == 0 else L.geglu_forward(a, b))
                rec("bwd liger (in place)", lambda: L.swiglu_backward(a, b, dy) if act == 0 else L.geglu_backward(a, b, dy))
                for blk, nw in tiles:
                    S._TILES[(act, False)] = S._TILES[(act, True)] = (blk, blk // nw)
                    assert S._settings(I, act) == (blk, nw)
                    rec(f"fwd {blk} / {nw}", lambda: S._forward(a, b, act))
                    rec(f"bwd {blk} / {nw}", lambda: S._backward(dy, a, b, a, b, act))
            S._TILES.update(shipped)
            show(f"== act {act} ({'silu' if act == 0 else 'gelu'}) {n} x {I} bf16, us (2 rounds)", res)
            del a, b, dy
            torch.cuda.empty_cache()


def rope():
    shipped = R._num_warps
    for (NH, NKV, D, n) in [(32, 8, 128, 4096), (32, 8, 128, 8192), (32, 8, 128, 16384), (32, 8, 96, 4096),
                            (32, 8, 96, 8192), (28, 4, 128, 8192), (28, 4, 128, 4096)]:
        q = torch.randn(1, n, NH, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, n, NKV, D, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(n, device=dev)[None]
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
        cos, sin = K.rope_cos_sin(pos, inv)
        hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
        cosb, sinb = cos.bfloat16(), sin.bfloat16()
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        res = {}
        rec = lambda key, fn: res.setdefault(key, []).append(bench(fn))

        def ours():
            R._launch(q, k, hcos, hsin, backward=False, half_table=True, inplace=True)
            R._launch(q, k, hcos, hsin, backward=True, half_table=True, inplace=True)

        def liger():
            lrope.rope_forward(qt, kt, cosb, sinb)
            lrope.rope_backward(qt, kt, cosb, sinb)

        for rnd in range(3):
            R._num_warps = shipped
            rec("shipped warps", ours)
            rec("liger (bf16 full tables)", liger)
            for nw in (2, 4, 8):
                R._num_warps = lambda *a, nw=nw: nw
                rec(f"warps {nw}", ours)
        R._num_warps = shipped
        show(f"== rope {NH}/{NKV} heads, D {D}, {n} tokens: fwd + bwd in place, us (3 rounds)", res)
        del q, k, qt, kt
        torch.cuda.empty_cache()


if WHAT in ("all", "gated"):
    gated()
if WHAT in ("all", "rope"):
    rope()
