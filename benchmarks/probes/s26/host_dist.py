"""Where the plain (do_bench-style) rows of rope, swiglu and geglu come from on this host: per
variant, the distribution of the paired per-step times (L2 flushed before each, variants
interleaved, as bench_kernels' paired_ms), the host's issue time per step (no sync inside a
loop of 200 steps), and the device time under a CUDA graph. Inputs through _Upstream, ours
with inplace=True, as in the benchmark."""
import importlib.util, statistics, sys, time, torch
spec = importlib.util.spec_from_file_location("bk", "scripts/bench_kernels.py")
bk = importlib.util.module_from_spec(spec); sys.modules["bk"] = bk; spec.loader.exec_module(bk)
from triton import runtime
specs = bk.op_specs(torch.bfloat16)
cache = runtime.driver.active.get_empty_cache_for_benchmark()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


for op in sys.argv[1].split(","):
    for n in map(int, sys.argv[2].split(",")):
        inputs, variants = specs[op][1](n)
        steps = {v: bk.full_step(bk._after_upstream(fn), inputs) for v, fn in variants.items() if v in ("ligerzoo", "liger")}
        names = list(steps)
        for f in steps.values():
            for _ in range(20):
                f()
        torch.cuda.synchronize()
        for rnd in range(3):
            ev = {v: [] for v in names}
            for r in range(200):
                k = r % len(names)
                for v in names[k:] + names[:k]:
                    runtime.driver.active.clear_cache(cache)
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record(); steps[v](); b.record()
                    ev[v].append((a, b))
            torch.cuda.synchronize()
            host = {}
            for v in names[rnd % 2:] + names[:rnd % 2]:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    steps[v]()
                host[v] = (time.perf_counter() - t0) / 200 * 1e3
                torch.cuda.synchronize()
            for v in names:
                ms = [a.elapsed_time(b) for a, b in ev[v]]
                print(f"{op:8s} {n:6d} round {rnd} {v:9s} paired p10 {pct(ms, .1):.3f} p50 {statistics.median(ms):.3f} "
                      f"p90 {pct(ms, .9):.3f} ms   host issue {host[v]:.3f} ms/step", flush=True)
        for v in names:
            print(f"{op:8s} {n:6d} graph   {v:9s} {bk.graph_ms(bk._after_upstream(variants[v]), inputs):.4f} ms", flush=True)
        del inputs, variants, steps
        torch.cuda.empty_cache()
