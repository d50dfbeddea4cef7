"""Device copy bandwidth against size: dst.copy_(src) of S MiB (2 S MiB moved), median of
do_bench (L2 flushed before each call) and of do_bench_cudagraph (no flush), in TB/s. The
kernel rows' bytes floors at 4096 / 8192 / 16384 tokens are 48-336 MB a pass."""
import torch
from triton.testing import do_bench, do_bench_cudagraph
for mib in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048):
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    f = lambda: dst.copy_(src)
    a = do_bench(f, warmup=25, rep=200, return_mode="median")
    b = do_bench_cudagraph(f, rep=200, return_mode="median")
    moved = 2 * mib * 2**20
    print(f"copy {mib:5d} MiB  do_bench {a * 1e3:8.1f} us {moved / a / 1e9:5.2f} TB/s   graph {b * 1e3:8.1f} us "
          f"{moved / b / 1e9:5.2f} TB/s", flush=True)
