"""probe 6: peak memory of one GLU forward + backward on non-leaf gate and up (a projection's
fresh outputs): ours out of place / inplace=True against Liger's (always in place)."""
import torch
import ligerzoo.kernels as K
from ligerzoo.kernels.geglu import geglu
from liger_kernel.transformers.functional import liger_swiglu, liger_geglu
dev = "cuda"
I = 14336
for n in (4096, 8192, 16384):
    g0 = torch.randn(n, I, device=dev, dtype=torch.bfloat16, requires_grad=True)
    u0 = torch.randn(n, I, device=dev, dtype=torch.bfloat16, requires_grad=True)
    for act, ours, liger in (("swiglu", K.swiglu, liger_swiglu), ("geglu", geglu, liger_geglu)):
        for name, f in {"ligerzoo out of place": ours, "ligerzoo inplace": lambda g, u: ours(g, u, inplace=True),
                        "liger": liger}.items():
            for rep in range(2):
                g, u = g0 * 1, u0 * 1
                dy = torch.ones(n, I, device=dev, dtype=torch.bfloat16)
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                y = f(g, u)
                y.backward(dy)
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                del g, u, y, dy
                g0.grad = u0.grad = None
            print(f"tokens {n} {act} {name:22s} peak above inputs and output gradient: {peak:8.1f} MiB", flush=True)
    del g0, u0
    torch.cuda.empty_cache()
