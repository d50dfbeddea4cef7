"""Session 30 probe: is rope's 4096-token gap to Liger's an L2 effect of the probe itself?

Session 29's sweep times forward + backward in place back to back under a CUDA graph, L2 never
flushed: at 4096 tokens q and k (42 MB for Llama-3's heads) fit the H200's 50 MB L2, so each pass
reads much of what the previous one wrote from L2, and the order programs run in decides how much.
In a model a pass is followed by attention (forward) or comes after it (backward), not by
another rope pass. This times, for the families' head shapes at 4096 and 8192 tokens, ours (the
package's rule, half fp32 tables) and Liger's (its bf16 tables), us:
- graph: forward + backward under a CUDA graph, no flush (session 29's measure);
- pair: forward + backward with L2 flushed before the pair;
- apart: forward and backward each with L2 flushed before it, summed (the model's case).
Flushed times are CUDA graphs of (a 128 MiB zero fill, the passes) less a graph of the fill alone
(run 3 used triton's do_bench for them instead, whose host launches bounded the small shapes).
And the HBM floor of a pass pair at 4.3 TB/s: q and k read and written twice, plus the tables
(ours fp32 R/2 columns each: 4R bytes per token; Liger's bf16, half read: 2R)."""
import sys
import torch, triton
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
import liger_kernel.ops.rope as lrope

print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
SHAPES = [(32, 8, 128, 128, "llama-3-8b"), (28, 4, 128, 128, "qwen2.5-7b"), (40, 10, 128, 128, "phi-3-medium"),
          (16, 8, 256, 256, "gemma2-9b"), (12, 2, 128, 128, "qwen2.5-1.5b"), (9, 3, 64, 64, "smollm2-135m"),
          (32, 32, 128, 128, "llama-2-7b")]
buf = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
g = lambda fn: do_bench_cudagraph(fn, rep=60, return_mode="median")
print("tokens | heads | graph ours / liger | pair ours / liger | apart ours / liger | floor ours / liger (us)")
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
        of = lambda: R._launch(q, k, hcos, hsin, backward=False, half_table=True, inplace=True)
        ob = lambda: R._launch(q, k, hcos, hsin, backward=True, half_table=True, inplace=True)
        lf = lambda: lrope.rope_forward(qt, kt, cosb, sinb)
        lb = lambda: lrope.rope_backward(qt, kt, cosb, sinb)
        res = {}
        for rnd in range(2):
            for name, f, b in (("ours", of, ob), ("liger", lf, lb)):
                pair = lambda f=f, b=b: (f(), b())
                fill = g(lambda: buf.zero_())
                vals = (g(pair), g(lambda: (buf.zero_(), f(), b())) - fill,
                        g(lambda: (buf.zero_(), f(), buf.zero_(), b())) - 2 * fill)
                res[name] = [min(a, v * 1e3) for a, v in zip(res.get(name, [1e9] * 3), vals)]
        qk = T * (NH + NKV) * D * 2
        floor = lambda tb: 2 * (2 * qk + T * tb) / 4.3e12 * 1e6
        o, l = res["ours"], res["liger"]
        print(f"{T} | {NH}/{NKV}/{D} {fam} | {o[0]:.1f} / {l[0]:.1f} | {o[1]:.1f} / {l[1]:.1f} | "
              f"{o[2]:.1f} / {l[2]:.1f} | {floor(4 * RD):.1f} / {floor(2 * RD):.1f}", flush=True)
        del q, k, qt, kt
        torch.cuda.empty_cache()
