"""probe 3: the shipped rope and GLU kernels against Liger's, device time under CUDA graphs."""
import sys, torch, triton
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
S = sys.modules["ligerzoo.kernels.swiglu"]
from liger_kernel.transformers.functional import liger_rope
import liger_kernel.ops.swiglu as lsw
import liger_kernel.ops.geglu as lge
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
dev = "cuda"
bench = lambda fn: do_bench_cudagraph(fn, rep=100)
for (NH, NKV, D, n) in [(32, 8, 128, 4096), (32, 8, 128, 8192), (32, 8, 128, 16384), (28, 4, 128, 8192), (32, 8, 96, 8192)]:
    q = torch.randn(1, n, NH, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, n, NKV, D, device=dev, dtype=torch.bfloat16)
    pos = torch.arange(n, device=dev)[None]
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    cos, sin = K.rope_cos_sin(pos, inv)
    hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
    floor_ms = 2 * (q.numel() + k.numel()) * 2 / 4.27e12 * 1e3
    r = {}
    r["fwd full"] = bench(lambda: R._launch(q, k, cos, sin, backward=False))
    r["bwd full (in place)"] = bench(lambda: R._launch(q, k, cos, sin, backward=True, inplace=True))
    r["fwd half"] = bench(lambda: R._launch(q, k, hcos, hsin, backward=False, half_table=True))
    r["bwd half (in place)"] = bench(lambda: R._launch(q, k, hcos, hsin, backward=True, half_table=True, inplace=True))
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    r["liger bf16 tables (in place)"] = bench(lambda: liger_rope(qt, kt, cos.bfloat16(), sin.bfloat16()))
    r["liger fp32 tables (in place)"] = bench(lambda: liger_rope(qt, kt, cos, sin))
    print(f"rope H {NH}/{NKV} D {D} tokens {n} (floor {floor_ms*1e3:.1f} us): " +
          ", ".join(f"{k_} {v*1e3:.1f} us ({floor_ms/v*100:.0f}%)" for k_, v in r.items()), flush=True)
n, I = 8192, 14336
for act, L in ((0, lsw), (1, lge)):
    a = torch.randn(n, I, device=dev, dtype=torch.bfloat16) * 0.1
    b = torch.randn(n, I, device=dev, dtype=torch.bfloat16) * 0.1
    dy = torch.randn(n, I, device=dev, dtype=torch.bfloat16)
    da, db = torch.empty_like(a), torch.empty_like(a)
    ff, bf = 3 * n * I * 2 / 4.27e9, 5 * n * I * 2 / 4.27e9
    tf = bench(lambda: S._forward(a, b, act))
    tb = bench(lambda: S._backward(dy, a, b, da, db, act))
    a2, b2 = a.clone(), b.clone()
    tbi = bench(lambda: S._backward(dy, a2, b2, a2, b2, act))
    a2, b2 = a.clone(), b.clone()
    lf = bench(lambda: L.swiglu_forward(a2, b2) if act == 0 else L.geglu_forward(a2, b2))
    lb = bench(lambda: L.swiglu_backward(a2, b2, dy) if act == 0 else L.geglu_backward(a2, b2, dy))
    print(f"glu act={act} {n}x{I}: ours fwd {tf*1e3:.1f} us ({ff/tf*100:.0f}%), bwd {tb*1e3:.1f} ({bf/tb*100:.0f}%), "
          f"bwd in place {tbi*1e3:.1f}; liger fwd {lf*1e3:.1f} ({ff/lf*100:.0f}%), bwd {lb*1e3:.1f} ({bf/lb*100:.0f}%); "
          f"sum ours {(tf+tbi)*1e3:.1f} liger {(lf+lb)*1e3:.1f}", flush=True)
