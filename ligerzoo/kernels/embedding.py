"""Embedding lookup (``torch.nn.functional.embedding``) with a Triton gather forward and a
sorted segment-sum backward.

Math (the lookup table of Bengio et al., "A Neural Probabilistic Language Model", 2003;
PyTorch ``F.embedding`` semantics without ``max_norm`` / ``sparse``): for ids ``i`` of any
shape and a table ``W`` of shape (V, H)::

    out[..., :]  = W[i[...], :]
    dW[v, :]     = sum over positions p with i[p] == v of dout[p, :]     (v != padding_idx)
    dW[padding_idx, :] = 0

The forward is a pure gather (bit-exact copy of the rows). The backward writes ``dW`` in
one pass, each element once: a program owns a tile of R rows x a column block and stores
zeros except, for each id in its rows, the fp32 sum of that id's output-gradient rows in
position order (in groups, for repeated ids: below), rounded once to the table's dtype. So
there is no separate zero fill of the (V, H) table (the largest cost: 1 GiB for Llama 3),
no atomics and no (V, H) fp32 buffer: deterministic (the same sum order every run), fp32
accumulation even for bf16/fp16 tables (the segment reduction of PyTorch's
``embedding_dense_backward``, fused).

To find the ids of each tile, one launch sorts the ids in chunks of 1024 positions, each
chunk in registers by one program (key ``id << 31 | position``: ascending id, then
position; sorted as int32 ``id * 1024 + index`` when V * 1024 < 2^31 - 1, twice as fast;
the padding id and ids outside [0, V) sort past every row, so their gradient rows are
never read), while the launch's other programs count each chunk's ids per row block (a
histogram per tile of 512 blocks, then a prefix sum: no sort needed) to find, for every
row block and chunk, where the block's ids start in the sorted chunk. A tile walks its
range in each chunk, chunks in order, which adds each id's rows in increasing position
order. These keys and starts (8 bytes per id, the ids rounded up to whole chunks, plus 4
bytes per (row block + 1) x chunk, a row block being 4 rows when H > 512, plus the hot
list below, 4 bytes per 64 ids; 1 MiB for 8192 ids, V = 128256, H = 4096) are kept in the
rows of the dW being written from the middle of the table on (a new buffer instead when
they would take over half of it; the kernels reach them through pointer casts, so this
path builds no host-side views): the tiles around them are written first, then their row
blocks are written by programs that find their ids by scanning all of them. So the
backward allocates nothing but dW (besides contiguous copies of non-contiguous ids or
gradients): no sort buffers, no host-side ``torch.sort``, two to four launches (sort and
starts, writer, hot tiles, scratch rows). The writer's tiles are 4 x 1024, or 4 x 4096
when at most a third of the 4 x 1024 tiles can hold an id (most programs then only store
zeros, which wide tiles do faster). Batches of more than 32 chunks (32768 ids) sort the
same keys with one ``torch.sort`` (O(N) buffers), find the starts by binary search, and go
through the same writers.

Repeated ids. The tile writer reads one gradient row per id, each read waiting for the one
before, so a tile holding k ids (a pad token, one id everywhere) would cost each of its
column-block programs k dependent reads. A tile with 64 ids or more is therefore left by
the writer (appended to a list kept after the starts) to a second kernel, which shares
(tile, 8-column block) work items over a fixed grid and reads the gradient rows of 512 ids
at once; the scan of the scratch rows likewise reads the rows of up to 32 of its ids at
once. There an id's sum is a tree sum within each group of ids and the groups are added in
position order: still fp32, still the same order every run, but not bit-identical to the
one-by-one order of the other tiles. On an H200 (V = 128256, H = 4096, bf16, backward
alone, 8192 ids): uniform ids 0.33 ms; a quarter of the ids on one id 0.34 ms (1.28 ms
with every tile by the writer; on an id among the scratch rows, 0.58 ms); every id the
same 0.36 ms (4.2 ms). ``padding_idx`` ids are dropped by the sort and cost nothing
(``benchmarks/NOTES.md``, sessions 8 and 10).
"""
from __future__ import annotations

from typing import Optional

import torch

from ligerzoo._checks import is_int
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2, persistent_programs

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["embedding", "embedding_reference"]

# A program handles a (BLOCK_N ids x BLOCK_H columns) tile of about _TILE_ELEMS elements,
# at most _MAX_BLOCK_H columns wide. Module-level so tests can shrink them.
_TILE_ELEMS = 4096
_MAX_BLOCK_H = 1024
# The backward sorts the ids in chunks of _SORT_CHUNK positions (in registers), up to
# _MAX_SORT_CHUNKS chunks (32768 ids); larger batches sort the same keys with torch.sort
# (into a new buffer) and use the same kernels. The sorted keys and the block starts are
# kept in rows of the dW being written (see _scratch_place) when they take at most half of it (None),
# or there whenever they fit / in a new byte buffer (True / False: tests).
_SORT_CHUNK = 1024
_MAX_SORT_CHUNKS = 32
# The launch that sorts the chunks also finds where each row block's ids start in each
# chunk: a program per (chunk, _STARTS_TILE row blocks), counting the chunk's ids per block.
_STARTS_TILE = 512
# A backward program writes an fp32 (BLOCK_R, BLOCK_H) tile of dW of about _ACC_TILE_ELEMS
# elements, at most _ACC_BLOCK_H columns wide (on an H200, (V, H) = (128256, 4096) bf16:
# 4 x 1024 under 4 warps took 326 / 344 / 379 us at 4096 / 8192 / 16384 ids, 16 x 1024
# under 8 warps 415 / 503 / 672 us). Module-level so tests can shrink them.
_ACC_TILE_ELEMS = 4096
_ACC_BLOCK_H = 1024
# When at most a third of those tiles can hold an id (4096 ids, 8192 with V = 128256 and
# H = 4096), most programs only store zeros, and wider tiles (fewer, longer stores) are
# faster: _WIDE_TILE_ELEMS elements, at most _WIDE_BLOCK_H columns (H200, same table,
# 4 x 4096 under 8 warps: 298 / 324 us at 4096 / 8192 ids against 315 / 333; at 32768 ids
# 485 against 464). _WIDE_TILES forces either (tests); None: by that rule.
_WIDE_TILE_ELEMS = 16384
_WIDE_BLOCK_H = 4096
_WIDE_TILES: Optional[bool] = None
_SCAN_BLOCK_N = 1024
# Tiles holding _HOT_MIN ids or more are written by a second kernel in (BLOCK_R, _HOT_BLOCK_H)
# work items over _HOT_PROGRAMS_PER_SM programs per SM, the gradient rows of _HOT_SEG ids
# at a time; the scan kernel's tiles are at most _SCAN_BLOCK_H wide and read _SCAN_SEG rows
# at a time.
_HOT_MIN = 64
_HOT_BLOCK_H = 8
_HOT_SEG = 512
_HOT_WARPS = 4
_HOT_PROGRAMS_PER_SM = 4
_SCAN_BLOCK_H = 128
_SCAN_TILE_ELEMS = 4096
_SCAN_SEG = 32
_SCRATCH_IN_DW: Optional[bool] = None


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @jit
    def _embedding_fwd_kernel(
        IDS,                 # (N,) int32 / int64 token ids
        W, stride_w,         # (V, H) table, unit column stride
        O, stride_o,         # (N, H) out
        n_ids, n_rows_w, n_cols,
        BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_mask = rows < n_ids
        ids = tl.load(IDS + rows, mask=r_mask, other=0).to(tl.int64)
        valid = r_mask & (ids >= 0) & (ids < n_rows_w)   # out-of-range ids read nothing
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        c_mask = cols < n_cols
        w = tl.load(W + ids[:, None] * stride_w + cols[None, :],
                    mask=valid[:, None] & c_mask[None, :], other=0.0)
        tl.store(O + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], w,
                 mask=r_mask[:, None] & c_mask[None, :])

    @triton.jit
    def _scratch_ptrs(SCR, scr_byte0, n_keys, n_starts):
        """(KEYS, STARTS, HOT): the int64 sort keys at byte ``scr_byte0`` of ``SCR`` (any dtype:
        rows of dW, or a byte buffer), the int32 block starts right after its n_keys keys,
        and the int32 hot-tile list right after its n_starts starts (HOT[0] counts the entries
        HOT[1:], row-block indices)."""
        base = SCR.to(tl.pointer_type(tl.int8)) + scr_byte0
        starts = base + tl.cast(n_keys, tl.int64) * 8              # in int64: n_keys * 8 may pass 2^31
        hot = starts + tl.cast(n_starts, tl.int64) * 4
        return (base.to(tl.pointer_type(tl.int64)), starts.to(tl.pointer_type(tl.int32)),
                hot.to(tl.pointer_type(tl.int32)))

    @triton.jit
    def _add_rows(acc, G, stride_g, pos, rel, valid, cols, c_mask, BLOCK_R: tl.constexpr):
        """``acc`` (BLOCK_R, BLOCK_H) fp32 plus, for each row r, the sum of the gradient rows
        ``G[pos[k], cols]`` over the k with ``valid[k]`` and ``rel[k] == r``: the S rows load
        at once, as one (S, BLOCK_H) tile, and each row's share is a tree sum over them."""
        g = tl.load(G + pos[:, None] * stride_g + cols, mask=valid[:, None] & c_mask, other=0.0)  # (S, BH)
        g = g.to(tl.float32)
        rr = tl.arange(0, BLOCK_R)[:, None]                                      # (R, 1)
        r = tl.min(tl.where(valid, rel, BLOCK_R), axis=0)
        while r < BLOCK_R:                                # the rows present, usually one
            s = tl.sum(tl.where((valid & (rel == r))[:, None], g, 0.0), axis=0)   # (BH,)
            acc = tl.where(rr == r, acc + s[None, :], acc)
            r = tl.min(tl.where(valid & (rel > r), rel, BLOCK_R), axis=0)
        return acc

    @jit
    def _chunk_sort_starts_kernel(
        IDS,                 # (N,) int32 / int64 token ids
        SCR, scr_byte0,      # scratch: out (n_chunks * CHUNK,) int64 keys, each chunk sorted,
                             # then out ((n_blocks + 1) * n_chunks,) int32 starts, block-major
        n_ids, n_rows_w, padding_idx, n_chunks, n_entries, rows_per_block,
        CHUNK: tl.constexpr,       # positions per chunk
        CHUNK_BITS: tl.constexpr,  # log2(CHUNK)
        KEY32: tl.constexpr,       # V * CHUNK < 2^31 - 1: sort int32 keys (id, index in the chunk)
        TILE: tl.constexpr,        # row blocks per starts program (histogram bins)
    ):
        # A (1 + tiles of TILE row blocks, chunks) grid (the tiles on axis 0: up to 2^31 - 1
        # programs). The stored keys are id << 31 |
        # position; ids outside [0, V), the padding id and the padding past N get the
        # largest int64 and sort last, beyond every row block: they add nothing.
        # Programs (0, c) sort chunk c in registers (ascending id, then position: the
        # positions are unique, so this is the stable order), as int32 keys when they fit
        # (twice as fast as int64), and store it. Programs (t > 0, c) count the chunk's keys
        # per row block of tile t - 1 (a histogram: it needs no sort) and store STARTS[b, c],
        # the count of the chunk's keys in row blocks before b, which is where block b's ids
        # start in the sorted chunk. Program (0, 0) also empties the hot-tile list that the
        # writer fills.
        KEYS, STARTS, HOT = _scratch_ptrs(SCR, scr_byte0, n_chunks * CHUNK, n_entries)
        t, c = tl.program_id(0), tl.program_id(1)
        c0 = c.to(tl.int64) * CHUNK
        idx = tl.arange(0, CHUNK)
        pos = c0 + idx
        m = pos < n_ids
        ids = tl.load(IDS + pos, mask=m, other=0).to(tl.int64)
        ok = m & (ids >= 0) & (ids < n_rows_w) & (ids != padding_idx)
        if t == 0:
            if KEY32:
                k32 = tl.sort(tl.where(ok, (ids.to(tl.int32) << CHUNK_BITS) | idx, 2147483647))
                key = tl.where(k32 == 2147483647, 9223372036854775807,
                               ((k32 >> CHUNK_BITS).to(tl.int64) << 31) | (c0 + (k32 & (CHUNK - 1))))
            else:
                key = tl.sort(tl.where(ok, (ids << 31) | pos, 9223372036854775807))
            tl.store(KEYS + pos, key)
            if c == 0:
                tl.store(HOT, 0)
        else:
            b0 = (t - 1).to(tl.int64) * TILE
            rel = tl.where(ok, ids // rows_per_block, -1) - b0          # (CHUNK,) row block - b0
            in_tile = ok & (rel >= 0) & (rel < TILE)
            before = tl.sum((ok & (rel < 0)).to(tl.int32), axis=0)
            hist = tl.histogram(tl.where(in_tile, rel, 0).to(tl.int32), TILE, mask=in_tile)   # (TILE,)
            b = b0 + tl.arange(0, TILE)
            tl.store(STARTS + b * n_chunks + c, before + tl.cumsum(hist, axis=0) - hist,
                     mask=b < n_entries // n_chunks)

    @jit
    def _sorted_starts_kernel(
        SCR, scr_byte0,      # scratch: (n_chunks * chunk_len,) int64 keys, each chunk sorted,
                             # then out ((n_blocks + 1) * n_chunks,) int32 starts, block-major
        n_entries, n_chunks, chunk_len, rows_per_block,
        N_STEPS: tl.constexpr,   # bit length of chunk_len (binary-search steps)
        BLOCK: tl.constexpr,
    ):
        # The torch.sort path (over _MAX_SORT_CHUNKS chunks: all keys as one sorted chunk):
        # STARTS[b, c], the first index of chunk c whose id is >= b * rows_per_block (a
        # vectorised lower-bound binary search, one lane per (b, c)). Program 0 also empties
        # the hot-tile list that the writer fills.
        KEYS, STARTS, HOT = _scratch_ptrs(SCR, scr_byte0, n_chunks * chunk_len, n_entries)
        if tl.program_id(0) == 0:
            tl.store(HOT, 0)
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # (V / R + 1) * chunks can pass 2^31
        em = e < n_entries
        b = (e // n_chunks).to(tl.int64)
        c = (e % n_chunks).to(tl.int64)
        target = (b * rows_per_block) << 31
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        hi = tl.zeros([BLOCK], dtype=tl.int32) + chunk_len
        for _ in range(N_STEPS + 1):
            open_ = lo < hi
            mid = lo + (hi - lo) // 2                     # lo + hi may pass 2^31
            v = tl.load(KEYS + c * chunk_len + mid, mask=open_ & em, other=0)
            lo = tl.where(open_ & (v < target), mid + 1, lo)
            hi = tl.where(open_ & (v >= target), mid, hi)
        tl.store(STARTS + e, lo, mask=em)

    @triton.jit
    def _store_tile(DW, acc, rows, cols, c_mask, n_rows_w, n_cols):
        """A (BLOCK_R, BLOCK_H) fp32 tile of dW (``rows`` (BLOCK_R, 1), ``cols`` (1, BLOCK_H))
        rounded once to its dtype; rows past V and columns past H masked."""
        tl.store(DW + rows * n_cols + cols, acc.to(DW.dtype.element_ty), mask=(rows < n_rows_w) & c_mask)

    @jit
    def _embedding_bwd_chunks_kernel(
        SCR, scr_byte0,      # scratch: the sorted keys, the starts of _chunk_sort_starts_kernel and
                             # the hot-tile list (its count zeroed by that kernel)
        G, stride_g,         # (N, H) output gradient, unit column stride
        DW,                  # (V, H) out in the table's dtype, contiguous
        n_rows_w, n_cols, n_chunks, chunk_len, n_starts,
        hot_min,             # tiles with this many ids or more are left to the hot kernel
        skip0, n_skip,       # the row blocks [skip0, skip0 + n_skip) hold the scratch: not here
        NC_P2: tl.constexpr,    # n_chunks rounded up to a power of two
        BLOCK_R: tl.constexpr,  # rows of dW per program (the rows_per_block of STARTS)
        BLOCK_H: tl.constexpr,
    ):
        # One program writes a (BLOCK_R, BLOCK_H) tile of dW exactly once: the fp32 sum of
        # the gradient rows of each id in the tile's rows, zeros elsewhere. The ids of the
        # tile sit in one contiguous range of every sorted chunk; taking the chunks in
        # order adds each id's rows in increasing position order (deterministic). Rows and
        # columns are kept 2-D, (BLOCK_R, 1) and (1, BLOCK_H), so a gradient row loads
        # straight into the accumulator's layout (vectorised, no layout conversion). The
        # row reads are serial (one per id), so a tile holding hot_min ids or more is not
        # written here but appended to the hot list (by its first column block).
        KEYS, STARTS, HOT = _scratch_ptrs(SCR, scr_byte0, n_chunks * chunk_len, n_starts)
        pid = tl.program_id(0)
        blk = tl.where(pid >= skip0, pid + n_skip, pid).to(tl.int64)
        cs = tl.arange(0, NC_P2)
        cm = cs < n_chunks
        lo = tl.load(STARTS + blk * n_chunks + cs, mask=cm, other=0)
        hi = tl.load(STARTS + (blk + 1) * n_chunks + cs, mask=cm, other=0)
        if tl.sum(hi - lo, axis=0) >= hot_min:
            if tl.program_id(1) == 0:
                slot = tl.atomic_add(HOT, 1)
                tl.store(HOT + 1 + slot, blk.to(tl.int32))
        else:
            rows = (blk * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]                  # (R, 1)
            cols = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]     # (1, BH)
            c_mask = cols < n_cols
            todo = hi > lo                               # chunks holding ids of this tile
            acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
            while tl.max(todo.to(tl.int32), axis=0) > 0:
                c = tl.min(tl.where(todo, cs, NC_P2), axis=0)
                j = tl.sum(tl.where(cs == c, lo, 0), axis=0)
                end = tl.sum(tl.where(cs == c, hi, 0), axis=0)
                while j < end:
                    key = tl.load(KEYS + c.to(tl.int64) * chunk_len + j)
                    g = tl.load(G + (key & 2147483647) * stride_g + cols, mask=c_mask, other=0.0)
                    acc = tl.where(rows == (key >> 31), acc + g.to(tl.float32), acc)
                    j += 1
                todo = todo & (cs != c)
            _store_tile(DW, acc, rows, cols, c_mask, n_rows_w, n_cols)

    @jit
    def _embedding_bwd_hot_kernel(
        SCR, scr_byte0,      # scratch, as for _embedding_bwd_chunks_kernel (after it ran)
        G, stride_g,         # (N, H) output gradient, unit column stride
        DW,                  # (V, H) out in the table's dtype, contiguous
        n_rows_w, n_cols, n_chunks, chunk_len, n_starts,
        BLOCK_R: tl.constexpr,  # the writer's rows per tile
        BLOCK_H: tl.constexpr,  # columns per work item (narrower than the writer's)
        SEG: tl.constexpr,      # ids whose gradient rows load at once
    ):
        # The tiles of the hot list (those the writer left), as (tile, column block) work
        # items shared out over a fixed grid. Each item walks its tile's range in every
        # chunk, chunks in order, SEG ids at a time: their rows load together (SEG reads in
        # flight instead of one) and each id's share of a segment is a tree sum, added to
        # the fp32 accumulator in position order of the segments (deterministic).
        KEYS, STARTS, HOT = _scratch_ptrs(SCR, scr_byte0, n_chunks * chunk_len, n_starts)
        n_cb = tl.cdiv(n_cols, BLOCK_H)
        n_items = tl.load(HOT) * n_cb
        k = tl.arange(0, SEG)
        for item in range(tl.program_id(0), n_items, tl.num_programs(0)):
            blk = tl.load(HOT + 1 + item // n_cb).to(tl.int64)
            rows = (blk * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]                       # (R, 1)
            cols = ((item % n_cb) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]             # (1, BH)
            c_mask = cols < n_cols
            acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
            for c in range(0, n_chunks):
                j = tl.load(STARTS + blk * n_chunks + c)
                n = tl.load(STARTS + (blk + 1) * n_chunks + c) - j          # ids of the tile here
                base = KEYS + tl.cast(c, tl.int64) * chunk_len + j
                # by segment index: no int32 sum here passes j + n (torch.sort path: up to 2^31 - 1)
                for s0 in range(0, tl.where(n > 0, (n - 1) // SEG + 1, 0)):
                    valid = k < n - s0 * SEG
                    key = tl.load(base + s0 * SEG + k, mask=valid, other=0)                       # (SEG,)
                    acc = _add_rows(acc, G, stride_g, key & 2147483647, (key >> 31) - blk * BLOCK_R, valid,
                                    cols, c_mask, BLOCK_R)
            _store_tile(DW, acc, rows, cols, c_mask, n_rows_w, n_cols)

    @jit
    def _embedding_bwd_scan_kernel(
        IDS,                 # (N,) int32 / int64 token ids
        G, stride_g,         # (N, H) output gradient, unit column stride
        DW,                  # (V, H) out in the table's dtype, contiguous
        n_ids, row_end, n_cols, padding_idx, row0,   # the rows [row0, row_end) of dW
        BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,  # ids tested at once
        SEG: tl.constexpr,      # ids whose gradient rows load at once (a divisor of BLOCK_N)
    ):
        # A (BLOCK_R, BLOCK_H) tile of dW, rows from row0 on, its ids found by scanning every
        # id (no sorted keys): for the few row blocks of dW whose memory held the keys
        # and starts while the other tiles were written. In a block of BLOCK_N ids holding
        # some of the tile's, their positions are taken in order (picked out one by one when
        # there are at most SEG, else sorted to the front) and their gradient rows read SEG
        # at a time, as in the hot kernel.
        r0 = row0 + tl.program_id(0).to(tl.int64) * BLOCK_R
        rows = (r0 + tl.arange(0, BLOCK_R))[:, None]                             # (R, 1)
        cols = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]     # (1, BH)
        c_mask = cols < n_cols
        k = tl.arange(0, SEG)
        seg_of = tl.arange(0, BLOCK_N // SEG)[:, None]                            # (N / SEG, 1)
        acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=tl.float32)
        for n0 in range(0, n_ids, BLOCK_N):
            p = n0 + tl.arange(0, BLOCK_N)
            ids = tl.load(IDS + p, mask=p < n_ids, other=-1).to(tl.int64)
            hit = (ids >= r0) & (ids < r0 + BLOCK_R) & (ids < row_end) & (ids != padding_idx)
            n_hit = tl.sum(hit.to(tl.int32), axis=0)
            if n_hit > SEG:
                # the hit positions first, ascending, as (N / SEG, SEG) rows of SEG
                front = tl.reshape(tl.sort(tl.where(hit, p, 2147483647)), (BLOCK_N // SEG, SEG))
                for s0 in range(0, tl.cdiv(n_hit, SEG)):
                    q = tl.sum(tl.where(seg_of == s0, front, 0), axis=0)                   # (SEG,)
                    valid = s0 * SEG + k < n_hit
                    qi = tl.load(IDS + q, mask=valid, other=0).to(tl.int64)
                    acc = _add_rows(acc, G, stride_g, q.to(tl.int64), qi - r0, valid, cols, c_mask, BLOCK_R)
            elif n_hit > 0:
                # few (the usual case): picked out in order, one reduction each, no sort
                rest = tl.where(hit, p, 2147483647)
                q = tl.zeros([SEG], dtype=tl.int32)
                for i in range(0, n_hit):
                    first = tl.min(rest, axis=0)
                    q = tl.where(k == i, first, q)
                    rest = tl.where(rest == first, 2147483647, rest)
                valid = k < n_hit
                qi = tl.load(IDS + q, mask=valid, other=0).to(tl.int64)
                acc = _add_rows(acc, G, stride_g, q.to(tl.int64), qi - r0, valid, cols, c_mask, BLOCK_R)
        _store_tile(DW, acc, rows, cols, c_mask, row_end, n_cols)


# ----------------------------------------------------------------------------- launchers
def _tiles(n_ids: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_H, num_warps) of one program's tile."""
    block_h = min(next_power_of_2(n_cols), _MAX_BLOCK_H)
    block_n = max(1, min(next_power_of_2(n_ids), _TILE_ELEMS // block_h))
    num_warps = 8 if block_n * block_h >= 4096 else 4
    return block_n, block_h, num_warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


# Launch settings by sizes (and the module-level knobs, which tests change): the step is
# bound by the host's time at training sizes, and working them out took more of it than a
# dict lookup. Cleared when it grows past _PLAN_CACHE_MAX entries.
_PLANS: dict = {}
_PLAN_CACHE_MAX = 256


def _cached(key, make):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLAN_CACHE_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def _forward(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n_rows_w, n_cols = weight.shape
    out = weight.new_empty((*ids.shape, n_cols))   # (..., H), written as (N, H) rows
    n_ids = ids.numel()
    if n_ids and n_cols:
        ids1 = _contiguous(ids)                     # read as (N,) in memory order
        w = _rows(weight)
        block_n, block_h, num_warps = _cached(("fwd", n_ids, n_cols, _TILE_ELEMS, _MAX_BLOCK_H),
                                              lambda: _tiles(n_ids, n_cols))
        grid = (cdiv(n_ids, block_n), cdiv(n_cols, block_h))
        with device_guard(weight):
            _embedding_fwd_kernel[grid](
                ids1, w, w.stride(0), out, n_cols, n_ids, n_rows_w, n_cols,
                BLOCK_N=block_n, BLOCK_H=block_h, num_warps=num_warps,
            )
    return out


def _bwd_tiles(n_cols: int, n_ids: int, n_rows_w: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) of one backward program's tile of dW: the narrow
    tiles, or the wide ones when at most a third of the narrow tiles can hold an id (or as
    forced by ``_WIDE_TILES``)."""
    block_h = min(next_power_of_2(n_cols), _ACC_BLOCK_H)
    block_r = max(1, min(_ACC_TILE_ELEMS // block_h, 64))
    wide = _WIDE_TILES if _WIDE_TILES is not None else 3 * n_ids <= cdiv(n_rows_w, block_r)
    if wide:
        block_h = min(next_power_of_2(n_cols), _WIDE_BLOCK_H)
        block_r = max(1, min(_WIDE_TILE_ELEMS // block_h, 64))
    return block_r, block_h, 8 if block_r * block_h >= 8192 else 4


def _int32_keys(n_rows_w: int, chunk: int) -> bool:
    """Whether the chunk sort can use int32 keys ``id * chunk + index in the chunk``: all
    of them below the int32 maximum, which marks the ids that add nothing."""
    return n_rows_w * chunk < 2**31 - 1


def _scratch_place(n_rows_w: int, n_cols: int, elem_size: int, need: int, block_r: int) -> tuple[bool, int, int, int]:
    """Where the backward keeps ``need`` bytes of sort keys, block starts and hot list:
    ``(in_dw, byte offset, b0, b1)``, the scratch overlapping dW's row blocks [b0, b1) of
    ``block_r`` rows. In dW when it takes at most half of it (or as forced by
    ``_SCRATCH_IN_DW``), from the start of the row block nearest the middle of the table
    (8-byte aligned; pushed back from the end when it would not fit): tokenizers put their
    special and padding tokens, often the most repeated ids, at either end of the table,
    and the ids of the scratch rows are summed by the slower scan kernel. Else a new byte
    buffer: ``(False, 0, 0, 0)``. The kernels address it through pointer casts: no
    host-side views."""
    total = n_rows_w * n_cols * elem_size
    in_dw = _SCRATCH_IN_DW if _SCRATCH_IN_DW is not None else 2 * need <= total
    if not in_dw or need > total:
        return False, 0, 0, 0
    row_bytes = n_cols * elem_size
    mid = n_rows_w // 2 // block_r * block_r * row_bytes
    byte0 = min((mid + 7) // 8 * 8, (total - need) // 8 * 8)
    b0 = byte0 // row_bytes // block_r
    b1 = min(cdiv(cdiv(byte0 + need, row_bytes), block_r), cdiv(n_rows_w, block_r))
    return True, byte0, b0, b1


class _BwdPlan:
    """The backward's launch settings (:func:`_bwd_plan`), cached by :func:`_backward` per
    (ids, H, V, dtype size, interpreter or not, device, module-level knobs)."""
    __slots__ = ("block_r", "block_h", "warps", "n_blocks", "chunk", "n_chunks", "starts_n", "max_hot",
                 "hot_b", "chunked", "sort_grid", "tile", "key32", "need", "in_dw", "byte0", "b0", "b1",
                 "writer_grid", "nc_p2", "hot_h", "hot_grid", "scan", "starts_grid")


def _bwd_plan(n_ids: int, n_cols: int, n_rows_w: int, elem_size: int, interp: bool, device) -> _BwdPlan:
    """Every size-derived setting of :func:`_backward`'s launches (``n_ids``, ``n_cols`` and
    ``n_rows_w`` all positive; ``interp``: the CPU interpreter, whose sort is slow enough to
    shrink the chunks to the batch; ``device``: where the hot kernel's persistent grid is
    sized)."""
    p = _BwdPlan()
    p.block_r, p.block_h, p.warps = _bwd_tiles(n_cols, n_ids, n_rows_w)
    p.n_blocks = n_blocks = cdiv(n_rows_w, p.block_r)
    chunk = _SORT_CHUNK
    if interp:  # its sort: ~2 ms per element, no padding to 1024
        chunk = min(chunk, next_power_of_2(n_ids))
    n_chunks = cdiv(n_ids, chunk)
    # the hot list: a count, then room for every tile that can hold _HOT_MIN ids
    p.max_hot = min(n_blocks, n_ids // _HOT_MIN)
    p.hot_b = 4 * (1 + p.max_hot)
    p.chunked = n_chunks <= _MAX_SORT_CHUNKS
    if p.chunked:
        p.starts_n = (n_blocks + 1) * n_chunks
        p.need = n_chunks * chunk * 8 + p.starts_n * 4 + p.hot_b
        p.in_dw, p.byte0, p.b0, p.b1 = _scratch_place(n_rows_w, n_cols, elem_size, p.need, p.block_r)
        p.tile = min(_STARTS_TILE, next_power_of_2(n_blocks + 1))
        p.sort_grid = (1 + cdiv(n_blocks + 1, p.tile), n_chunks)
        p.key32 = _int32_keys(n_rows_w, chunk)
    else:  # the same keys, all ids as one chunk sorted by torch.sort, in a new buffer
        chunk, n_chunks = n_ids, 1
        p.starts_n = n_blocks + 1
        p.need = n_ids * 8 + p.starts_n * 4 + p.hot_b
        p.in_dw, p.byte0, p.b0, p.b1 = False, 0, 0, 0
        p.starts_grid = (cdiv(p.starts_n, 1024),)
    p.chunk, p.n_chunks = chunk, n_chunks
    n_cb = cdiv(n_cols, p.block_h)
    sorted_blocks = n_blocks - (p.b1 - p.b0)  # the row blocks outside the scratch
    p.writer_grid = (sorted_blocks, n_cb) if sorted_blocks else None
    p.nc_p2 = next_power_of_2(n_chunks)
    p.hot_h = min(p.block_h, _HOT_BLOCK_H)
    p.hot_grid = None
    if sorted_blocks and p.max_hot:
        items = min(p.max_hot, sorted_blocks) * cdiv(n_cols, p.hot_h)
        p.hot_grid = (persistent_programs(device, items, _HOT_PROGRAMS_PER_SM, 4),)
    p.scan = None
    if p.b1 > p.b0:
        scan_h = min(p.block_h, _SCAN_BLOCK_H)
        scan_r = max(1, _SCAN_TILE_ELEMS // scan_h)
        row0, row_end = p.b0 * p.block_r, min(p.b1 * p.block_r, n_rows_w)
        p.scan = ((cdiv(row_end - row0, scan_r), cdiv(n_cols, scan_h)), row0, row_end, scan_r, scan_h)
    return p


def _backward(grad: torch.Tensor, ids: torch.Tensor, n_rows_w: int, padding_idx: int,
              dtype: torch.dtype) -> torch.Tensor:
    n_cols = grad.shape[-1]
    n_ids = ids.numel()
    if n_ids == 0 or n_cols == 0 or n_rows_w == 0:
        return grad.new_zeros((n_rows_w, n_cols), dtype=dtype)
    dw = grad.new_empty((n_rows_w, n_cols), dtype=dtype)
    # (N, H) rows, unit column stride: a contiguous (..., H) gradient as it is
    if grad.is_contiguous():
        g, stride_g = grad, n_cols
    else:
        g = _rows(grad.reshape(n_ids, n_cols))
        stride_g = g.stride(0)
    ids1 = _contiguous(ids)                         # read as (N,) in memory order
    interp = not grad.is_cuda and _utils.interpreter_enabled()
    elem = dw.element_size()
    p = _cached(("bwd", n_ids, n_cols, n_rows_w, elem, interp, grad.get_device(), _ACC_TILE_ELEMS, _ACC_BLOCK_H,
                 _WIDE_TILE_ELEMS, _WIDE_BLOCK_H, _WIDE_TILES, _SORT_CHUNK, _MAX_SORT_CHUNKS, _STARTS_TILE,
                 _HOT_MIN, _HOT_BLOCK_H, _HOT_PROGRAMS_PER_SM, _SCAN_BLOCK_H, _SCAN_TILE_ELEMS, _SCRATCH_IN_DW),
                lambda: _bwd_plan(n_ids, n_cols, n_rows_w, elem, interp, grad.device))
    chunk, n_chunks, starts_n, byte0 = p.chunk, p.n_chunks, p.starts_n, p.byte0
    with device_guard(grad):
        if p.chunked:
            scr = dw if p.in_dw else torch.empty(p.need, dtype=torch.uint8, device=grad.device)
            _chunk_sort_starts_kernel[p.sort_grid](
                ids1, scr, byte0, n_ids, n_rows_w, padding_idx, n_chunks, starts_n, p.block_r,
                CHUNK=chunk, CHUNK_BITS=chunk.bit_length() - 1, KEY32=p.key32, TILE=p.tile, num_warps=4,
            )
        else:  # the same keys, all ids as one chunk sorted by torch.sort, in a new buffer
            flat = ids1.reshape(-1)
            keys = flat.to(torch.int64) << 31
            keys |= torch.arange(n_ids, device=grad.device)
            keys.masked_fill_((flat < 0) | (flat >= n_rows_w) | (flat == padding_idx), torch.iinfo(torch.int64).max)
            scr = torch.empty(p.need, dtype=torch.uint8, device=grad.device)
            scr[: n_ids * 8].view(torch.int64).copy_(torch.sort(keys).values)
            _sorted_starts_kernel[p.starts_grid](
                scr, byte0, starts_n, n_chunks, chunk, p.block_r, N_STEPS=chunk.bit_length(), BLOCK=1024, num_warps=4,
            )
        if p.writer_grid is not None:
            _embedding_bwd_chunks_kernel[p.writer_grid](
                scr, byte0, g, stride_g, dw, n_rows_w, n_cols, n_chunks, chunk, starts_n, _HOT_MIN, p.b0, p.b1 - p.b0,
                NC_P2=p.nc_p2, BLOCK_R=p.block_r, BLOCK_H=p.block_h, num_warps=p.warps,
            )
            if p.hot_grid is not None:  # the tiles the writer left (none, usually: then each program reads a count)
                _embedding_bwd_hot_kernel[p.hot_grid](
                    scr, byte0, g, stride_g, dw, n_rows_w, n_cols, n_chunks, chunk, starts_n,
                    BLOCK_R=p.block_r, BLOCK_H=p.hot_h, SEG=_HOT_SEG, num_warps=_HOT_WARPS,
                )
        if p.scan is not None:  # after the writers above: these rows held the scratch
            grid, row0, row_end, scan_r, scan_h = p.scan
            _embedding_bwd_scan_kernel[grid](
                ids1, g, stride_g, dw, n_ids, row_end, n_cols, padding_idx, row0,
                BLOCK_R=scan_r, BLOCK_H=scan_h, BLOCK_N=_SCAN_BLOCK_N, SEG=_SCAN_SEG, num_warps=4,
            )
    return dw


# ----------------------------------------------------------------------------- ops (torch.library + eager path)
@kernel_op("embedding", mutates_args=())
def _embedding_op(input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: int) -> torch.Tensor:
    # padding_idx: a row in [0, V), or -1 for none (embedding() normalises and checks it)
    return _forward(input_ids, weight)


@_embedding_op.register_fake
def _(input_ids, weight, padding_idx):
    return weight.new_empty((*input_ids.shape, weight.shape[1]))


@kernel_op("embedding_backward", mutates_args=())
def _embedding_backward_op(
    grad: torch.Tensor, input_ids: torch.Tensor, num_weights: int, padding_idx: int, dtype: torch.dtype
) -> torch.Tensor:
    return _backward(grad, input_ids, num_weights, padding_idx, dtype)


@_embedding_backward_op.register_fake
def _(grad, input_ids, num_weights, padding_idx, dtype):
    return grad.new_empty((num_weights, grad.shape[-1]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    input_ids, weight, padding_idx = inputs
    ctx.save_for_backward(input_ids)
    ctx.num_weights = weight.shape[0]
    ctx.padding_idx = padding_idx
    ctx.w_dtype = weight.dtype


def _embedding_backward(ctx, grad):
    (input_ids,) = ctx.saved_tensors
    dw = ops.embedding_backward(grad, input_ids, ctx.num_weights, ctx.padding_idx, ctx.w_dtype)
    return None, dw, None


ops.embedding.register_autograd(_embedding_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- reference and checks
def _check_args(input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int]) -> int:
    """Validates the arguments; returns padding_idx normalised to [0, V) or -1 for none."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.device != weight.device:
        raise ValueError(f"input_ids ({input_ids.device}) and weight ({weight.device}) must share a device")
    n_rows_w = weight.shape[0]
    row = padding_row(padding_idx, n_rows_w)
    return -1 if row is None else row


def padding_row(padding_idx, n_rows: int) -> Optional[int]:
    """``padding_idx`` (an int, numpy int or 0-d int tensor; negative counts from the end, as
    torch) as a row in [0, n_rows), or None for None.

    Raises:
        ValueError: not an integer (a float, a bool, ...) or outside [-n_rows, n_rows).
    """
    if padding_idx is None:
        return None
    if not (is_int(padding_idx) and -n_rows <= padding_idx < n_rows):
        raise ValueError(f"padding_idx must be an integer row index within [-{n_rows}, {n_rows}) or None, "
                         f"got {padding_idx!r}")
    return int(padding_idx) % n_rows


def _check_ids_in_range(input_ids: torch.Tensor, n_rows_w: int) -> None:
    # A host-side check costs a device sync: done on CPU tensors only (see embedding()), and
    # not while torch.compile traces (data-dependent control flow).
    if input_ids.numel() and not input_ids.is_cuda and not input_ids.is_meta and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= n_rows_w:
            raise ValueError(f"input_ids must lie in [0, {n_rows_w}), found values in [{lo}, {hi}]")


def embedding_reference(
    input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Plain-PyTorch embedding, same math as :func:`embedding`: ``index_select`` of the rows;
    rows looked up at ``padding_idx`` are detached so they send no gradient. Differentiable
    by torch autograd (its backward accumulates in the table's dtype).

    Arguments, shapes and dtypes as :func:`embedding`; it raises the same ValueErrors except
    the Triton-path size limits (CUDA ids out of range fail in ``index_select``)."""
    pad = _check_args(input_ids, weight, padding_idx)
    _check_ids_in_range(input_ids, weight.shape[0])
    ids1 = input_ids.reshape(-1)
    out = weight.index_select(0, ids1)                                      # (N, H)
    if pad >= 0:
        out = torch.where((ids1 == pad)[:, None], out.detach(), out)
    return out.view(*input_ids.shape, weight.shape[1])


def embedding(
    input_ids: torch.Tensor, weight: torch.Tensor, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """Look up rows of an embedding table (``torch.nn.functional.embedding``).

    Forward: a Triton gather ``out[...] = weight[input_ids[...]]`` (exact copies). Backward:
    the ids are sorted (in chunks, on the device) and each distinct id's output-gradient
    rows are summed in fp32 in position order (tiles of the table with 64 ids or more, and
    the rows that held the sort keys: tree sums within groups of ids, the groups in
    position order) and written once in ``weight.dtype`` (deterministic; ids equal to
    ``padding_idx`` are dropped, never read). For up to 32768
    ids and a table at least twice the size of the sort keys and block starts (about 1 MiB
    for 8192 ids and V = 128256) it allocates only the (V, H) gradient
    (see the module docstring, also for the cost of one id repeated thousands of times).

    Args:
        input_ids: int64 or int32 ids of any shape (...), any strides, values in [0, V).
        weight: (V, H) fp32 / bf16 / fp16 table (float64 runs the torch reference); any
            strides (rows with a non-unit column stride are copied).
        padding_idx: like ``F.embedding``: the row it names (negative counts from the end)
            receives no gradient; its forward value is the row itself. ``None``: no padding.

    Returns:
        (..., H) tensor of ``weight.dtype``, new memory (never a view of ``weight``).

    Raises:
        ValueError: ``weight`` not 2-D floating point, ``input_ids`` not int64/int32,
            devices differ, ``padding_idx`` outside [-V, V), V >= 2^32 or 2^31 ids or
            more (Triton path: the backward's sort keys pack an id in 32 bits and a
            position in 31), or
            (CPU tensors) ids outside [0, V). On CUDA ids are not checked on the host (that would cost a device
            sync): out-of-range ids read as zero rows and add no gradient instead of
            faulting.
    """
    pad = _check_args(input_ids, weight, padding_idx)
    if not _utils.triton_ok(weight):
        return embedding_reference(input_ids, weight, padding_idx)
    if weight.shape[0] >= 2**32:  # the backward's sort keys hold an id in 32 bits
        raise ValueError(f"weight has {weight.shape[0]} rows; the Triton embedding supports fewer than 2^32")
    if input_ids.numel() >= 2**31:  # ... and a position in 31
        raise ValueError(f"input_ids has {input_ids.numel()} ids; the Triton embedding supports fewer than 2^31")
    _check_ids_in_range(input_ids, weight.shape[0])
    return ops.embedding(input_ids, weight, pad)
