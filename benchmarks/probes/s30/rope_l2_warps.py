"""Session 30 probe: rope's warps re-swept in the model's case (L2 flushed before each pass).

Session 29's warp rule came from sweeps that never flush L2 (`s29/rope_sweep.py`); at 4096 tokens,
and for small heads at 8192, q and k fit the H200's 50 MB L2 there, which the model never sees
(`rope_l2.py`, run 4). This times forward and backward in place with half fp32 tables (the
model's path), each pass after a 128 MiB fill, as CUDA graphs less the fills' graph, under the
package's rule and 1, 2, 4, 8 warps, with Liger's beside them; us, best of 2 rounds."""
import sys
import torch, triton
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
import liger_kernel.ops.rope as lrope

print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
SHAPES = [(32, 8, 128, 128, "llama-3-8b"), (28, 4, 128, 128, "qwen2.5-7b"), (32, 32, 96, 96, "phi-3-mini"),
          (40, 10, 128, 128, "phi-3-medium"), (16, 8, 256, 256, "gemma2-9b"), (16, 16, 256, 256, "gemma-7b"),
          (12, 2, 128, 128, "qwen2.5-1.5b"), (32, 32, 128, 128, "llama-2-7b"), (9, 3, 64, 64, "smollm2-135m"),
          (24, 8, 128, 96, "phi-4-mini (partial)")]
WARPS = (1, 2, 4, 8)
buf = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
g = lambda fn: do_bench_cudagraph(fn, rep=60, return_mode="median")
shipped = R._num_warps
print("tokens | heads | rule's warps | rule, " + ", ".join(map(str, WARPS)) + " warps | liger (us, flushed before each pass)")
for NH, NKV, D, RD, fam in SHAPES:
    for T in (4096, 8192):
        q = torch.randn(1, T, NH, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, T, NKV, D, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(T, device="cuda")[None]
        inv = 1.0 / (500000.0 ** (torch.arange(0, RD, 2, device="cuda").float() / RD))
        hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
        cos, sin = K.rope_cos_sin(pos, inv)
        cosb, sinb = cos.bfloat16(), sin.bfloat16()
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        seen = {}

        def spy(*a):
            seen["w"] = shipped(*a)
            return seen["w"]

        def ours():
            buf.zero_()
            R._launch(q, k, hcos, hsin, backward=False, half_table=True, inplace=True)
            buf.zero_()
            R._launch(q, k, hcos, hsin, backward=True, half_table=True, inplace=True)

        def liger():
            buf.zero_()
            lrope.rope_forward(qt, kt, cosb, sinb)
            buf.zero_()
            lrope.rope_backward(qt, kt, cosb, sinb)

        keys = ("rule",) + WARPS + ("liger",)
        best = {}
        for rnd in range(2):
            fill = g(lambda: (buf.zero_(), buf.zero_()))
            for key in keys:
                if key == "liger":
                    t = g(liger)
                else:
                    R._num_warps = spy if key == "rule" else (lambda *a, nw=key: nw)
                    t = g(ours)
                best[key] = min(best.get(key, 1e9), (t - fill) * 1e3)
        R._num_warps = shipped
        print(f"{T} | {NH}/{NKV}/{D}/{RD} {fam} | {seen['w']} | " + " ".join(f"{best[k_]:.1f}" for k_ in keys), flush=True)
        del q, k, qt, kt
        torch.cuda.empty_cache()
