"""The embedding backward's writer alone (device time, do_bench median, L2 flushed), against a
pure zero-store of the same table: the shipped writer, and a writer whose programs take K row
blocks each with all their block starts loaded at once (the starts' load latency paid once
per K tiles). Uniform ids, V = 128256, H = 4096, bf16."""
import sys, torch, triton, triton.language as tl
from triton.testing import do_bench
import ligerzoo.kernels.embedding  # noqa
E = sys.modules["ligerzoo.kernels.embedding"]
from ligerzoo.kernels._utils import cdiv, next_power_of_2


@triton.jit
def writer_k(SCR, scr_byte0, G, stride_g, DW, n_rows_w, n_cols, n_chunks, chunk_len, n_starts, hot_min,
             skip0, n_skip, n_sorted, NC_P2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
             K: tl.constexpr, CS: tl.constexpr):
    KEYS, STARTS, HOT = E._scratch_ptrs(SCR, scr_byte0, n_chunks * chunk_len, n_starts)
    kk = tl.arange(0, K)
    j = tl.program_id(0) * K + kk                                   # (K,) sorted-block index
    blk = tl.where(j >= skip0, j + n_skip, j).to(tl.int64)
    cs = tl.arange(0, NC_P2)
    m2 = (j < n_sorted)[:, None] & (cs < n_chunks)[None, :]
    LO = tl.load(STARTS + blk[:, None] * n_chunks + cs[None, :], mask=m2, other=0)        # (K, NC)
    HI = tl.load(STARTS + (blk[:, None] + 1) * n_chunks + cs[None, :], mask=m2, other=0)
    cnt = tl.sum(HI - LO, axis=1)                                                         # (K,)
    cols = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]
    c_mask = cols < n_cols
    for k in tl.static_range(K):
        bk = tl.sum(tl.where(kk == k, blk, 0), axis=0)
        ck = tl.sum(tl.where(kk == k, cnt, 0), axis=0)
        jk = tl.program_id(0) * K + k
        if jk < n_sorted:
            if ck >= hot_min:
                if tl.program_id(1) == 0:
                    slot = tl.atomic_add(HOT, 1)
                    tl.store(HOT + 1 + slot, bk.to(tl.int32))
            else:
                rows = (bk * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
                acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
                if ck > 0:
                    lo = tl.sum(tl.where(kk[:, None] == k, LO, 0), axis=0)
                    hi = tl.sum(tl.where(kk[:, None] == k, HI, 0), axis=0)
                    todo = hi > lo
                    while tl.max(todo.to(tl.int32), axis=0) > 0:
                        c = tl.min(tl.where(todo, cs, NC_P2), axis=0)
                        jj = tl.sum(tl.where(cs == c, lo, 0), axis=0)
                        end = tl.sum(tl.where(cs == c, hi, 0), axis=0)
                        while jj < end:
                            key = tl.load(KEYS + c.to(tl.int64) * chunk_len + jj)
                            g = tl.load(G + (key & 2147483647) * stride_g + cols, mask=c_mask, other=0.0)
                            acc = tl.where(rows == (key >> 31), acc + g.to(tl.float32), acc)
                            jj += 1
                        todo = todo & (cs != c)
                if CS:
                    tl.store(DW + rows * n_cols + cols, acc.to(DW.dtype.element_ty),
                             mask=(rows < n_rows_w) & c_mask, cache_modifier=".cs")
                else:
                    tl.store(DW + rows * n_cols + cols, acc.to(DW.dtype.element_ty), mask=(rows < n_rows_w) & c_mask)


@triton.jit
def zeros_k(DW, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(DW + o, tl.zeros([BLOCK], dtype=DW.dtype.element_ty), mask=o < n)


V, H = 128256, 4096
for n in map(int, sys.argv[1].split(",")):
    torch.manual_seed(0)
    ids = torch.randint(0, V, (n,), device="cuda")
    g = torch.randn(n, H, device="cuda", dtype=torch.bfloat16)
    # run the shipped backward once, catching its writer launch's arguments
    caught = {}
    orig = E._embedding_bwd_chunks_kernel.__class__._launch
    def spy(self, grid, *a, **k):
        if self is E._embedding_bwd_chunks_kernel:
            caught["grid"], caught["a"], caught["k"] = grid, a, dict(k)
        if self is E._embedding_bwd_scan_kernel:
            return None  # keep the scratch (the sorted keys and starts) in dW for the reruns
        return orig(self, grid, *a, **k)
    E._embedding_bwd_chunks_kernel.__class__._launch = spy
    E._backward(g, ids, V, -1, torch.bfloat16)
    ref = torch.zeros(V, H, device="cuda").index_add_(0, ids, g.float()).bfloat16()
    E._embedding_bwd_chunks_kernel.__class__._launch = orig
    grid, a, kw = caught["grid"], caught["a"], caught["k"]
    dw = a[4]
    ms = do_bench(lambda: E._embedding_bwd_chunks_kernel[grid](*a, **kw), return_mode="median")
    print(f"n={n} shipped writer grid {grid} {kw}: {ms * 1e3:.1f} us", flush=True)
    b0r = a[11] * kw["BLOCK_R"]
    assert torch.equal(dw[:b0r], ref[:b0r])
    z = torch.empty_like(dw)
    for blk in (4096, 16384):
        ms = do_bench(lambda: zeros_k[(cdiv(z.numel(), blk),)](z, z.numel(), BLOCK=blk, num_warps=8), return_mode="median")
        print(f"n={n} zero-store BLOCK {blk}: {ms * 1e3:.1f} us", flush=True)
    print(f"n={n} torch zero_: {do_bench(lambda: z.zero_(), return_mode='median') * 1e3:.1f} us", flush=True)
    (scr, byte0, G, sg, DW, nrw, ncols, nch, clen, nst, hmin, b0, nskip) = a
    n_sorted = grid[0]
    lo_r, hi_r = b0 * kw["BLOCK_R"], (b0 + nskip) * kw["BLOCK_R"]
    print(f"n={n} shipped same as index_add outside the scratch rows: {torch.equal(dw[:lo_r], ref[:lo_r]) and torch.equal(dw[hi_r:], ref[hi_r:])}")
    for block_r, block_h, warps in ((4, 4096, 8), (4, 1024, 4), (4, 2048, 4)):
        for K in (1, 2, 4):
            for cs in (False,):
                g2 = (cdiv(n_sorted, K), cdiv(ncols, block_h))
                run = lambda: writer_k[g2](scr, byte0, G, sg, DW, nrw, ncols, nch, clen, nst, hmin, b0, nskip, n_sorted,
                                           NC_P2=kw["NC_P2"], BLOCK_R=block_r, BLOCK_H=block_h, K=K, CS=cs, num_warps=warps)
                lo_r, hi_r = b0 * block_r, (b0 + nskip) * block_r   # the scratch rows: keep them
                DW[:lo_r].fill_(1.0); DW[hi_r:].fill_(1.0); run()
                same = torch.equal(DW[:lo_r], ref[:lo_r]) and torch.equal(DW[hi_r:], ref[hi_r:])
                ms = do_bench(run, return_mode="median")
                print(f"n={n} writer_k R{block_r} H{block_h} w{warps} K{K} cs{int(cs)}: {ms * 1e3:.1f} us  same={same}", flush=True)
