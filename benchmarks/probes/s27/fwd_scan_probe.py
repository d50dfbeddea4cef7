"""Embedding forward tiles (device time, do_bench median with the L2 flushed, as the plain
rows), ours by (BLOCK_N ids, BLOCK_H columns, warps) against Liger's kernel; then the whole
backward's device time (CUDA graph) by the scan kernel's BLOCK_N. V = 128256, H = 4096, bf16."""
import sys, torch
from triton.testing import do_bench, do_bench_cudagraph
import ligerzoo.kernels.embedding  # noqa
E = sys.modules["ligerzoo.kernels.embedding"]
from ligerzoo.kernels._utils import cdiv
from liger_kernel.ops.experimental.embedding import LigerEmbeddingFunction as LEF

V, H = 128256, 4096
w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16)
for n in map(int, sys.argv[1].split(",")):
    ids = torch.randint(0, V, (n,), device="cuda")
    out = torch.empty(n, H, device="cuda", dtype=torch.bfloat16)
    ref = w[ids]
    with torch.no_grad():
        t = do_bench(lambda: LEF.apply(w, ids), return_mode="median")
    print(f"n={n} liger forward {t * 1e3:.1f} us", flush=True)
    for bn, bh, nw in ((4, 1024, 8), (8, 1024, 8), (16, 1024, 8), (2, 4096, 8), (4, 4096, 8), (8, 4096, 16),
                       (32, 512, 8), (64, 128, 4), (128, 128, 4), (16, 512, 4), (8, 512, 4)):
        run = lambda: E._embedding_fwd_kernel[(cdiv(n, bn), cdiv(H, bh))](
            ids, w, H, out, H, n, V, H, BLOCK_N=bn, BLOCK_H=bh, num_warps=nw)
        out.zero_(); run(); ok = torch.equal(out, ref)
        t = do_bench(run, return_mode="median")
        print(f"n={n} ours forward N{bn} H{bh} w{nw}: {t * 1e3:.1f} us ok={ok}", flush=True)
    g = torch.randn(n, H, device="cuda", dtype=torch.bfloat16)
    for sbn in (1024, 2048, 4096):
        E._SCAN_BLOCK_N = sbn
        dw = E._backward(g, ids, V, -1, torch.bfloat16)
        if sbn == 1024:
            dw0 = dw.clone()
        same = torch.equal(dw, dw0)
        del dw
        t = do_bench_cudagraph(lambda: E._backward(g, ids, V, -1, torch.bfloat16), rep=100, return_mode="median")
        print(f"n={n} backward (graph) scan BLOCK_N {sbn}: {t * 1e3:.1f} us same={same}", flush=True)
    E._SCAN_BLOCK_N = 1024
