"""Where embedding's plain step (forward + backward, as bench_kernels' paired rows: sync,
L2 flush, events) spends its time, ours against Liger's: per variant, the median of 100
steps of host issue time (perf_counter around the call), event time, and one torch.profiler
trace (CPU ops and GPU kernels, us from the start event) printed as a timeline."""
import importlib.util, json, statistics, sys, time, torch
spec = importlib.util.spec_from_file_location("bk", "scripts/bench_kernels.py")
bk = importlib.util.module_from_spec(spec); sys.modules["bk"] = bk; spec.loader.exec_module(bk)
from triton import runtime
specs = bk.op_specs(torch.bfloat16)
cache = runtime.driver.active.get_empty_cache_for_benchmark()
out = sys.argv[2] if len(sys.argv) > 2 else "."

for n in map(int, sys.argv[1].split(",")):
    inputs, variants = specs["embedding"][1](n)
    steps = {v: bk.full_step(fn, inputs) for v, fn in variants.items() if v in ("ligerzoo", "liger")}
    for f in steps.values():
        for _ in range(30):
            f()
    names = list(steps)
    res = {v: ([], []) for v in names}
    for r in range(200):
        for v in (names if r % 2 else names[::-1]):
            torch.cuda.synchronize()
            runtime.driver.active.clear_cache(cache)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); t0 = time.perf_counter(); steps[v](); t1 = time.perf_counter(); b.record()
            res[v][0].append((t1 - t0) * 1e3); res[v][1].append((a, b))
    torch.cuda.synchronize()
    for v in names:
        print(f"n={n} {v:9s} host {statistics.median(res[v][0]):.3f} ms  event {statistics.median(x.elapsed_time(y) for x, y in res[v][1]):.3f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile
    for v in names:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                torch.cuda.synchronize()
                runtime.driver.active.clear_cache(cache)
                steps[v]()
            torch.cuda.synchronize()
        path = f"{out}/trace_{v}_{n}.json"
        prof.export_chrome_trace(path)
        ev = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X"]
        ev.sort(key=lambda e: e["ts"])
        # the last step: from the last flush kernel on
        gpu = [e for e in ev if e.get("cat") == "kernel"]
        t_start = gpu[-1]["ts"]
        flushes = [e for e in gpu if "fill" in e["name"].lower() or "memset" in e["name"].lower()]
        lastflush = [e for e in gpu if e["ts"] >= 0]
        # find the CPU launch of the last step's flush: the cudaLaunchKernel/Memset after the third-to-last sync
        syncs = [e for e in ev if e["name"] in ("cudaDeviceSynchronize",)]
        t0 = syncs[-2]["ts"] + syncs[-2]["dur"]
        print(f"--- n={n} {v} timeline (us after the last step's sync returned)")
        for e in ev:
            if e["ts"] >= t0 and e.get("cat") in ("kernel", "cuda_runtime", "cpu_op", "python_function", "gpu_memset", "gpu_memcpy"):
                if e.get("cat") == "cpu_op" and e["dur"] < 2 and "autograd" not in e["name"]:
                    continue
                print(f"{e['ts'] - t0:9.1f} {e['dur']:8.1f} {e.get('cat', ''):12s} {e['name'][:90]}")
        import os; os.remove(path)
