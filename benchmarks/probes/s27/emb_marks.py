"""Host timeline of embedding's forward + backward step, ours against Liger's: timestamps
(perf_counter) at the step's start, at each op entry and at each kernel launch's start and
end, medians over 200 steps with the GPU kept busy by a queued sleep (no launch waits), in us
from the step's start."""
import collections, functools, importlib.util, statistics, sys, time, torch
spec = importlib.util.spec_from_file_location("bk", "scripts/bench_kernels.py")
bk = importlib.util.module_from_spec(spec); sys.modules["bk"] = bk; spec.loader.exec_module(bk)
import ligerzoo.kernels.embedding  # noqa
E = sys.modules["ligerzoo.kernels.embedding"]
from ligerzoo.kernels import _utils as U
import triton
specs = bk.op_specs(torch.bfloat16)
marks = []
pc = time.perf_counter


def mark(name):
    marks.append((name, pc()))


def wrap(obj, attr, name):
    f = getattr(obj, attr)

    @functools.wraps(f)
    def g(*a, **k):
        mark(name + ">")
        r = f(*a, **k)
        mark(name + "<")
        return r
    setattr(obj, attr, g)


# ours
wrap(E, "_forward", "_forward"); wrap(E, "_backward", "_backward")
_orig_launch = U.DirectLaunch._launch
def _launch(self, grid, *a, **k):
    mark("launch " + self.fn.__name__ + ">"); r = _orig_launch(self, grid, *a, **k); mark("launch<"); return r
U.DirectLaunch._launch = _launch
# liger
from triton.runtime.jit import JITFunction
_orig_run = JITFunction.run
def _run(self, *a, **k):
    mark("triton.run " + self.__name__ + ">"); r = _orig_run(self, *a, **k); mark("triton.run<"); return r
JITFunction.run = _run
lemb = importlib.import_module("liger_kernel.ops.experimental.embedding")
F = lemb.LigerEmbeddingFunction
F.forward = staticmethod(lambda ctx, *a, _f=F.forward: (mark("liger fwd>"), _f(ctx, *a))[1])
F.backward = staticmethod(lambda ctx, *a, _f=F.backward: (mark("liger bwd>"), _f(ctx, *a))[1])
_ones = torch.ones_like
for n in map(int, sys.argv[1].split(",")):
    (w,), variants = specs["embedding"][1](n)
    for v in ("ligerzoo", "liger"):
        fn = variants[v]

        def step():
            mark("step>")
            out = fn(w)
            mark("fwd returned")
            g = _ones(out)
            mark("ones_like")
            torch.autograd.backward([out], [g])
            mark("backward returned")
            w.grad = None
            mark("end")
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        runs = []
        for i in range(200):
            if i % 20 == 0:
                torch.cuda.synchronize(); torch.cuda._sleep(int(5e8))
            marks.clear()
            step()
            runs.append(list(marks))
        torch.cuda.synchronize()
        names = [m[0] for m in runs[-1]]
        if not all([m[0] for m in r] == names for r in runs):
            print("mark sequences differ")
        print(f"--- n={n} {v} (us from step start, median of 200; delta)")
        prev = 0.0
        for j, nm in enumerate(names):
            t = statistics.median((r[j][1] - r[0][1]) * 1e6 for r in runs)
            print(f"{t:8.1f} {t - prev:7.1f}  {nm}")
            prev = t
        sys.stdout.flush()
