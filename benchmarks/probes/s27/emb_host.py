"""Host time of embedding's step pieces, ours against Liger's (ms, median of 200, GPU kept
busy by a queued sleep so no launch waits): the forward with grad, ones_like + backward, and
for ours the raw _forward / _backward; then a cProfile of 200 full steps per variant."""
import cProfile, importlib.util, io, pstats, statistics, sys, time, torch
spec = importlib.util.spec_from_file_location("bk", "scripts/bench_kernels.py")
bk = importlib.util.module_from_spec(spec); sys.modules["bk"] = bk; spec.loader.exec_module(bk)
import ligerzoo.kernels.embedding
E = sys.modules["ligerzoo.kernels.embedding"]
specs = bk.op_specs(torch.bfloat16)


def host(f, n=200):
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    ts = []
    for i in range(n):
        if i % 20 == 0:
            torch.cuda.synchronize(); torch.cuda._sleep(int(5e8))
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e3


for n in map(int, sys.argv[1].split(",")):
    (w,), variants = specs["embedding"][1](n)
    ids = torch.randint(0, w.shape[0], (n,), device="cuda")
    g = torch.ones(n, w.shape[1], device="cuda", dtype=w.dtype)
    for v in ("ligerzoo", "liger"):
        fn = variants[v]
        full = bk.full_step(fn, (w,))
        print(f"n={n} {v:9s} full {host(full):.3f}", flush=True)
        outs = []
        def fwd():
            outs.append(fn(w))
        print(f"n={n} {v:9s} forward {host(fwd):.3f}", flush=True)
        def bwd():
            o = fn(w)
            t0 = time.perf_counter()
            torch.autograd.backward([o], [torch.ones_like(o)])
            w.grad = None
            return time.perf_counter() - t0
        ts = []
        for i in range(200):
            if i % 20 == 0:
                torch.cuda.synchronize(); torch.cuda._sleep(int(5e8))
            ts.append(bwd())
        torch.cuda.synchronize()
        print(f"n={n} {v:9s} ones_like+backward {statistics.median(ts) * 1e3:.3f}", flush=True)
        outs.clear()
    print(f"n={n} ours raw _forward {host(lambda: E._forward(ids, w)):.3f}", flush=True)
    print(f"n={n} ours raw _backward {host(lambda: E._backward(g, ids, w.shape[0], -1, w.dtype)):.3f}", flush=True)
    print(f"n={n} torch.empty(dw) {host(lambda: torch.empty(w.shape, dtype=w.dtype, device='cuda')):.4f}", flush=True)
    print(f"n={n} torch.zeros(dw) {host(lambda: torch.zeros(w.shape, dtype=w.dtype, device='cuda')):.4f}", flush=True)
    print(f"n={n} ones_like {host(lambda: torch.ones_like(g)):.4f}", flush=True)
    for v in ("ligerzoo", "liger"):
        full = bk.full_step(variants[v], (w,))
        torch.cuda.synchronize(); torch.cuda._sleep(int(2e9))
        pr = cProfile.Profile(); pr.enable()
        for _ in range(100):
            full()
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(f"=== cProfile n={n} {v}\n" + s.getvalue()[-6000:], flush=True)
