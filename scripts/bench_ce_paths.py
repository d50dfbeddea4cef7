"""Cross entropy's two GPU kernels side by side: the portable two-read row kernel and the
Hopper kernel that keeps rows in shared memory (``ligerzoo.kernels.cross_entropy_sm90``).

Times one forward + gradient launch (gradient written over the logits, no options) with
``triton.testing.do_bench`` (median) for each (tokens, vocabulary, dtype), against the
device copy bandwidth measured in the same process: share = 4 * N * V * bytes-per-value
moved at the floor (one read, one write) over the copy rate. Needs an sm_90 GPU.

Usage (GPU): python scripts/bench_ce_paths.py [--shapes 8192x128256,4096x128256:float16]
"""
from __future__ import annotations

import argparse
import importlib

import torch

DEFAULT_SHAPES = ("8192x128256,4096x128256,16384x128256,2048x128256,8192x152064,8192x256000,8192x32000,"
                  "8192x49152,8192x65536,8192x98304,8192x128256:float32,4096x128256:float16")


def _copy_bandwidth() -> float:
    """GB/s of a 2.1 GB bf16 device-to-device copy (read + write), do_bench median."""
    import triton

    a = torch.empty(8192 * 128256, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300)
    return 2 * a.numel() * a.element_size() / ms / 1e6


def _time_paths(n: int, v: int, dt: torch.dtype, copy_bw: float) -> str:
    import triton

    ce = importlib.import_module("ligerzoo.kernels.cross_entropy")
    from ligerzoo.kernels import cross_entropy_sm90 as sm90

    logits = torch.randn(n, v, device="cuda", dtype=dt)
    target = torch.randint(0, v, (n,), device="cuda")
    scales = ce.reduction_scales(target, None, -100, "mean", v)
    lse, loss = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    floor_gb = 2 * n * v * logits.element_size() / 1e9
    out = []
    try:
        for name, enabled in (("portable", False), ("hopper", True)):
            sm90.ENABLED = enabled
            if enabled and not sm90.supported(logits, logits):
                out.append("hopper: not dispatched")
                continue
            t = triton.testing.do_bench(lambda: ce.launch_cross_entropy_rows(
                logits, target, None, scales, lse, loss, None, logits, None, -100, 0.0, 0.0, None),
                warmup=25, rep=200)
            out.append(f"{name}: {t:.3f} ms ({floor_gb / t * 1e3 / copy_bw:.0%} of copy)")
    finally:
        sm90.ENABLED = True
    return "  ".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxV[:dtype], comma-separated (dtype default bfloat16)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        ap.error("needs an sm_90 GPU (the Hopper kernel's only target)")
    copy_bw = _copy_bandwidth()
    print(f"copy bandwidth: {copy_bw:.0f} GB/s")
    for spec in args.shapes.split(","):
        shape, _, dtype = spec.partition(":")
        n, v = (int(s) for s in shape.split("x"))
        dt = getattr(torch, dtype or "bfloat16")
        print(f"{n} x {v} {dt}: {_time_paths(n, v, dt, copy_bw)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
