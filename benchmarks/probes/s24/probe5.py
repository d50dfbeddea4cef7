"""probe 5: rope one-tile num_warps for head_dim 96 and 128 (half tables, in place), three
interleaved repeats, against Liger (fp32 tables), device time under CUDA graphs."""
import sys, torch
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
from ligerzoo.kernels._utils import next_power_of_2
R = sys.modules["ligerzoo.kernels.rope"]
from liger_kernel.transformers.functional import liger_rope
dev = "cuda"

def launch(q, k, cos, sin, backward, nw):
    B, T, nq, D = q.shape
    nk = k.shape[2]
    half = cos.shape[-1]
    R._rope_kernel[(B * T,)](q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
                             q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
                             cos, 0, cos.stride(1), sin, 0, sin.stride(1), T, nq, nk, half, D - 2 * half,
                             BACKWARD=backward, HALF_TABLE=True, ONE_TILE=True, BLOCK_HQ=next_power_of_2(nq),
                             BLOCK_HK=next_power_of_2(nk), BLOCK_R=next_power_of_2(half), BLOCK_P=1, HAS_PASS=False,
                             num_warps=nw)

for (NH, NKV, D, n) in [(32, 8, 96, 8192), (32, 8, 128, 8192), (32, 8, 128, 4096)]:
    q = torch.randn(1, n, NH, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, n, NKV, D, device=dev, dtype=torch.bfloat16)
    pos = torch.arange(n, device=dev)[None]
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    cos, sin = K.rope_cos_sin(pos, inv)
    hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    res = {}
    for rep in range(3):
        for name, fn in {
            "shipped fwd+bwd in place": lambda: (R._launch(q, k, hcos, hsin, False, True, inplace=True),
                                                 R._launch(q, k, hcos, hsin, True, True, inplace=True)),
            "nw=4": lambda: (launch(q, k, hcos, hsin, False, 4), launch(q, k, hcos, hsin, True, 4)),
            "nw=8": lambda: (launch(q, k, hcos, hsin, False, 8), launch(q, k, hcos, hsin, True, 8)),
            "liger fwd+bwd (2 calls)": lambda: (liger_rope(qt, kt, cos, sin), liger_rope(qt, kt, cos, sin)),
        }.items():
            res.setdefault(name, []).append(do_bench_cudagraph(fn, rep=100) * 1e3)
    print(f"rope H {NH}/{NKV} D {D} tokens {n}: " + "; ".join(f"{k_} " + "/".join(f"{v:.1f}" for v in vs) + " us"
                                                           for k_, vs in res.items()), flush=True)
