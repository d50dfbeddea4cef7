"""Session 28 probe 3: the package's rope kernel (forward + backward in place, half tables) under
2, 4 and 8 warps and its own rule, against Liger's, for the head shapes of the families, at 4096
and 8192 tokens: device time under CUDA graphs, us (median; best of 2 rounds)."""
import sys
import torch, triton
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
import liger_kernel.ops.rope as lrope

print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
bench = lambda fn: do_bench_cudagraph(fn, rep=40, return_mode="median")
shipped = R._num_warps
SHAPES = [  # (q heads, kv heads, head_dim, family)
    (32, 8, 128, "llama-3-8b / mistral / mixtral"), (28, 4, 128, "qwen2.5-7b"), (32, 32, 96, "phi-3-mini"),
    (40, 10, 128, "phi-3-medium"), (16, 8, 256, "gemma2-9b"), (16, 16, 256, "gemma-7b"),
    (12, 2, 128, "qwen2.5-1.5b"), (32, 32, 128, "llama-2-7b"), (9, 3, 64, "smollm2-135m"),
]
print("shape | tokens | rule's warps | rule, 2, 4, 8 warps, liger (us)")
for (NH, NKV, D, fam) in SHAPES:
    for n in (4096, 8192):
        q = torch.randn(1, n, NH, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, n, NKV, D, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(n, device="cuda")[None]
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
        cos, sin = K.rope_cos_sin(pos, inv)
        hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
        cosb, sinb = cos.bfloat16(), sin.bfloat16()
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        seen = {}

        def spy(*a):
            seen["w"] = shipped(*a)
            return seen["w"]

        def ours():
            R._launch(q, k, hcos, hsin, backward=False, half_table=True, inplace=True)
            R._launch(q, k, hcos, hsin, backward=True, half_table=True, inplace=True)

        def liger():
            lrope.rope_forward(qt, kt, cosb, sinb)
            lrope.rope_backward(qt, kt, cosb, sinb)

        best = {}
        for rnd in range(2):
            for key, rule in (("rule", spy), (2, None), (4, None), (8, None), ("liger", None)):
                if key == "liger":
                    t = bench(liger)
                else:
                    R._num_warps = rule if rule is not None else (lambda *a, nw=key: nw)
                    t = bench(ours)
                best[key] = min(best.get(key, 1e9), t * 1e3)
        R._num_warps = shipped
        print(f"{NH}/{NKV}/{D} {fam} | {n} | {seen['w']} | " + " ".join(f"{best[k_]:.1f}" for k_ in ("rule", 2, 4, 8, "liger")), flush=True)
        del q, k, qt, kt
        torch.cuda.empty_cache()
