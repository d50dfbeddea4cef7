"""Session 28 probe 4: where the package's rope kernel trails Liger's (small or padded head shapes),
does probe 1's kernel with the sizes as constexprs and int32 head offsets (`glu_rope._rope_c`,
in place, half tables) close the gap? Forward + backward in place, device time under CUDA graphs, us."""
import importlib.util, sys
import torch, triton
from triton.testing import do_bench_cudagraph
argv, sys.argv = sys.argv, [sys.argv[0], "none"]
spec = importlib.util.spec_from_file_location("glu_rope", "benchmarks/probes/s28/glu_rope.py")
P = importlib.util.module_from_spec(spec); spec.loader.exec_module(P)
sys.argv = argv
K, R, lrope = P.K, P.R, P.lrope
bench = lambda fn: do_bench_cudagraph(fn, rep=40, return_mode="median")
print("shape | tokens | package (its rule's warps) | const fp32 w2, w4 | const bf16-math w4 | liger")
for (NH, NKV, D) in [(9, 3, 64), (12, 2, 128), (16, 8, 256), (40, 10, 128), (28, 4, 128), (32, 8, 128)]:
    for n in (4096, 8192):
        q = torch.randn(1, n, NH, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, n, NKV, D, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(n, device="cuda")[None]
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
        cos, sin = K.rope_cos_sin(pos, inv)
        hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
        cosb, sinb = cos.bfloat16(), sin.bfloat16()
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        q0, k0 = q.clone(), k.clone()
        K.rope(q0, k0, hcos, hsin, inplace=True, half_table=True)
        q1, k1 = q.clone(), k.clone()
        P.const_nw(q1, k1, hcos, hsin, False, 2)
        ok = (q1.float() - q0.float()).abs().max().item() <= 1e-2 * q0.float().abs().max().item()
        del q0, k0, q1, k1

        def fb(f):
            def step():
                f(False)
                f(True)
            return step

        r = [bench(fb(lambda bw: R._launch(q, k, hcos, hsin, backward=bw, half_table=True, inplace=True))),
             bench(fb(lambda bw: P.const_nw(q, k, hcos, hsin, bw, 2))),
             bench(fb(lambda bw: P.const_nw(q, k, hcos, hsin, bw, 4))),
             bench(fb(lambda bw: P.const_nw(q, k, hcos, hsin, bw, 4, fp32=False))),
             bench(fb(lambda bw: (lrope.rope_backward if bw else lrope.rope_forward)(qt, kt, cosb, sinb)))]
        print(f"{NH}/{NKV}/{D} | {n} | " + " | ".join(f"{t*1e3:.1f}" for t in r) + ("" if ok else "  (const != package!)"),
              flush=True)
        del q, k, qt, kt
        torch.cuda.empty_cache()
