"""Host (Python) overhead of embedding forward + backward on CPU with every kernel launch
stubbed out: ours against Liger's. Median of 2000 steps, best of 5 rounds. Liger Kernel 0.8.5
must be importable (e.g. its wheel unzipped into a directory on PYTHONPATH). With an argument
("ours" or "liger"), also a cProfile of 2000 steps of that variant. Usage (repository root):
    PYTHONPATH=/path/to/liger .venv/bin/python benchmarks/probes/s27/host_cpu.py [ours]"""
import os, sys, statistics, time
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton
from ligerzoo.kernels import _utils as U
from ligerzoo import kernels as K
from triton.runtime.jit import JITFunction
nlaunch = [0]
def _noop(*a, **k):
    nlaunch[0] += 1
U.DirectLaunch.__getitem__ = lambda self, grid: _noop
JITFunction.run = lambda self, *a, **k: _noop()
from triton.runtime.interpreter import InterpretedFunction
InterpretedFunction.__getitem__ = lambda self, grid: _noop
from liger_kernel.ops.experimental.embedding import LigerEmbeddingFunction as LEF
V, H, N = 2000, 16, 4096
w = torch.randn(V, H, requires_grad=True)
ids = torch.randint(0, V, (N,))
def step(fn):
    out = fn(w)
    torch.autograd.backward([out], [torch.ones_like(out)])
    w.grad = None
variants = {"ours": lambda w: K.embedding(ids, w), "liger": lambda w: LEF.apply(w, ids)}
res = {v: [] for v in variants}
# the id range check runs on CPU tensors only (a device sync on CUDA): left out, as on the GPU
E0 = sys.modules["ligerzoo.kernels.embedding"]; E0._check_ids_in_range = lambda *a: None
for rnd in range(5):
    for v, fn in variants.items():
        for _ in range(50):
            step(fn)
        ts = []
        for _ in range(2000):
            t0 = time.perf_counter(); step(fn); ts.append(time.perf_counter() - t0)
        res[v].append(statistics.median(ts) * 1e6)
nlaunch[0] = 0
step(variants["ours"]); n_ours = nlaunch[0]; nlaunch[0] = 0
step(variants["liger"]); n_liger = nlaunch[0]
for v in variants:
    print(f"{v:6s} {min(res[v]):6.1f} us/step (rounds: {' '.join(f'{x:.1f}' for x in res[v])})")
print("launches per step: ours", n_ours, "liger", n_liger)
if len(sys.argv) > 1:
    import cProfile, pstats
    E = sys.modules["ligerzoo.kernels.embedding"]
    pr = cProfile.Profile(); pr.enable()
    for _ in range(2000):
        step(variants[sys.argv[1]])
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)
