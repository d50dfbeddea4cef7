"""probe 4: peak memory of one rope forward + backward on non-leaf q, k (a projection's fresh
output), ours out of place / in place against Liger's (always in place), and device time of
ours in place under CUDA graphs."""
import sys, torch
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
from liger_kernel.transformers.functional import liger_rope
dev = "cuda"
NH, NKV, D = 32, 8, 128
for n in (4096, 8192, 16384):
    q0 = torch.randn(1, n, NH, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k0 = torch.randn(1, n, NKV, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(n, device=dev)[None]
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    cos, sin = K.rope_cos_sin(pos, inv)
    hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
    variants = {
        "ligerzoo out of place": lambda q, k: K.rope(q, k, hcos, hsin, backward_inplace=True, half_table=True),
        "ligerzoo inplace": lambda q, k: K.rope(q, k, hcos, hsin, backward_inplace=True, half_table=True, inplace=True),
        "liger": lambda q, k: tuple(t.transpose(1, 2) for t in liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)),
    }
    for name, f in variants.items():
        for rep in range(2):
            q, k = q0 * 1, k0 * 1          # non-leaves, made before the measured region
            gq, gk = torch.ones_like(q), torch.ones_like(k)
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            qo, ko = f(q, k)
            torch.autograd.backward((qo, ko), (gq, gk))
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            del q, k, qo, ko, gq, gk
            q0.grad = k0.grad = None
        print(f"tokens {n} {name:24s} peak above the inputs and output gradients: {peak:8.1f} MiB", flush=True)
    q, k = q0.detach().clone(), k0.detach().clone()
    t_in = do_bench_cudagraph(lambda: R._launch(q, k, hcos, hsin, backward=False, half_table=True, inplace=True), rep=100)
    print(f"tokens {n} ours forward in place (device time): {t_in*1e3:.1f} us", flush=True)
