"""Host (Python) time of the benchmark's forward + backward step per op, ours against Liger's,
on this machine's CPU with every kernel launch stubbed out: bench_kernels' inputs and variants
(through _Upstream, as the benchmark calls them) at a few tokens, median of 1000 steps, best of
3 interleaved rounds, us. Liger Kernel 0.8.5 must be importable. Usage (repository root):
    PYTHONPATH=/path/to/liger .venv/bin/python benchmarks/probes/s27/host_ops_cpu.py [ops] [tokens]"""
import importlib.util, os, statistics, sys, time
os.environ["TRITON_INTERPRET"] = "1"
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
from ligerzoo.kernels import _utils as U

U.DirectLaunch.__getitem__ = lambda self, grid: (lambda *a, **k: None)
InterpretedFunction.__getitem__ = lambda self, grid: (lambda *a, **k: None)
InterpretedFunction.run = lambda self, *a, **k: None  # autotuned kernels call run
JITFunction.run = lambda self, *a, **k: None
spec = importlib.util.spec_from_file_location("bk", "scripts/bench_kernels.py")
bk = importlib.util.module_from_spec(spec); sys.modules["bk"] = bk; spec.loader.exec_module(bk)
# the id range check of embedding runs on CPU tensors only (a device sync on CUDA): left out
sys.modules["ligerzoo.kernels.embedding"]._check_ids_in_range = lambda *a: None
ops = (sys.argv[1] if len(sys.argv) > 1 else "rms_norm,fused_add_rms_norm,rope,swiglu,geglu,cross_entropy,layer_norm,group_norm,embedding").split(",")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
specs = bk.op_specs(torch.bfloat16, device="cpu")
for op in ops:
    inputs, variants = specs[op][1](n)
    steps = {}
    for v in ("ligerzoo", "liger"):
        if v in variants:
            fn = bk._after_upstream(variants[v]) if op in bk.UPSTREAM else variants[v]
            steps[v] = bk.full_step(fn, inputs)
    best = {v: float("inf") for v in steps}
    for rnd in range(3):
        for v, f in steps.items():
            try:
                for _ in range(20):
                    f()
                ts = []
                for _ in range(1000):
                    t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
                best[v] = min(best[v], statistics.median(ts) * 1e6)
            except Exception as e:
                best[v] = f"failed: {type(e).__name__}: {str(e)[:60]}"
    print(f"{op:20s} " + "  ".join(f"{v} {b:.1f}" if isinstance(b, float) else f"{v} {b}" for v, b in best.items()), flush=True)
