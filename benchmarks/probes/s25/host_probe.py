"""Host time per forward + backward step (no sync inside the loop: the GPU keeps up when the step
is host-bound) for ours and Liger's rope, swiglu, geglu and cross entropy, inputs through
bench_kernels' _Upstream, as in the benchmark."""
import importlib.util, sys, time, torch
spec = importlib.util.spec_from_file_location("bk", "scripts/bench_kernels.py")
bk = importlib.util.module_from_spec(spec); sys.modules["bk"] = bk; spec.loader.exec_module(bk)
from ligerzoo import kernels as K
specs = bk.op_specs(torch.bfloat16)


def host_us(step, n=300):
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


for op, n in (("rope", 8192), ("swiglu", 4096), ("geglu", 4096), ("cross_entropy", 4096)):
    inputs, variants = specs[op][1](n)
    vs = {v: bk._after_upstream(fn) for v, fn in variants.items() if v in ("ligerzoo", "liger")}
    for v, fn in vs.items():
        for rep in range(2):
            h, w = host_us(bk.full_step(fn, inputs))
            print(f"{op:14s} {n:6d} {v:9s} host {h:7.1f} us/step  wall {w:7.1f} us/step", flush=True)
