"""Where a kernel benchmark's forward + backward time goes: host (Python, dispatch, launch)
or device (the kernels themselves).

For each op of ``scripts/bench_kernels.py`` and each variant, one forward + backward step
(the benchmark's "full" mode) is measured three ways:

- ``wall``: median milliseconds of ``triton.testing.do_bench`` (what kernels.csv reports);
- ``host``: milliseconds the CPU spends issuing one step while the GPU is kept busy by a
  queued ``torch.cuda._sleep`` (so no launch waits for the device);
- ``device``: the sum of the step's GPU kernel durations from ``torch.profiler``, with the
  largest kernels listed.

When ``host`` is close to ``wall`` and ``device`` well below it, the op is bound by host
overhead, not by bytes. Usage (GPU):
    python scripts/profile_kernels.py [--ops rms_norm,rope] [--tokens 8192] [--variants ligerzoo,liger]
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch


def _load_bench():
    path = Path(__file__).with_name("bench_kernels.py")
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def host_ms(f, iters=20):
    """CPU milliseconds per call of ``f`` while the GPU is busy with a queued sleep. Few
    iterations: past about a thousand queued launches the CUDA launch queue is full and the
    host blocks, which would read as host time."""
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # about a second of GPU spin: every launch below is queued
    t0 = time.perf_counter()
    for _ in range(iters):
        f()
    dt = (time.perf_counter() - t0) / iters * 1e3
    torch.cuda.synchronize()
    return dt


def device_ms(f, iters=20, top=6):
    """(summed GPU kernel milliseconds per call, [(kernel name, ms per call)] largest first)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            f()
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] = per.get(e.name, 0.0) + e.device_time / 1e3 / iters
    kernels = sorted(per.items(), key=lambda kv: -kv[1])
    return sum(per.values()), kernels[:top]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="rms_norm,rope,layer_norm")
    ap.add_argument("--tokens", default="8192")
    ap.add_argument("--variants", default="ligerzoo,liger")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    bench = _load_bench()
    specs = bench.op_specs(getattr(torch, args.dtype))
    for op in args.ops.split(","):
        x_name, make = specs[op]
        for n in map(int, args.tokens.split(",")):
            inputs, variants = make(n)
            for variant in args.variants.split(","):
                if variant not in variants:
                    continue
                f = bench.full_step(variants[variant], inputs)
                wall = do_bench(f, warmup=25, rep=100, return_mode="median")
                host = host_ms(f)
                dev, kernels = device_ms(f)
                print(f"{op:12s} {variant:9s} {x_name}={n:<6d} wall {wall:7.3f} ms  host {host:7.3f} ms  "
                      f"device {dev:7.3f} ms", flush=True)
                for name, ms in kernels:
                    print(f"    {ms:8.4f} ms  {name[:110]}")
            del inputs, variants
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
