"""Embedding lookup against float64 references, through the Triton kernels (interpreter on
CPU, see conftest) and through the forced torch-reference dispatch.

Tolerances: the forward is a gather and must be bit-exact. The Triton backward adds the
bf16/fp16/fp32 output-gradient rows in fp32 and rounds once to the table dtype, so the
weight gradient is within a few ulps of the table dtype of the float64 sum (fp32 tables:
the fp32 summation error of at most a few dozen terms). The torch reference's backward
(``index_select``) accumulates in the table dtype, one rounding per repeated id, so its
bf16 budget grows with the largest repeat count.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ligerzoo.kernels.embedding import embedding, embedding_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

# The op module itself (the package re-exports functions under the same names).
emb_mod = kernel_module("embedding")

V, H = 1000, 123


ULPS = {torch.float32: 16, torch.bfloat16: 2, torch.float16: 2}


def _grad_ulps(path, dtype, ids):
    if path == "reference" and dtype != torch.float32:
        return ULPS[dtype] * int(torch.bincount(ids.reshape(-1)).max())
    return ULPS[dtype]


def _expected_f64(ids, weight, g, padding_idx):
    """Forward rows and weight gradient in float64 with index_add (independent of F.embedding)."""
    n_rows = weight.shape[0]
    ids1 = ids.reshape(-1)
    out = weight.double()[ids1].view(*ids.shape, weight.shape[1])
    dw = torch.zeros(weight.shape, dtype=torch.float64).index_add_(0, ids1, g.reshape(-1, weight.shape[1]).double())
    if padding_idx is not None:
        dw[padding_idx % n_rows] = 0
    return out, dw


def _ordered_sum(g, ids, n_rows, padding_idx):
    """The backward's exact fp32 arithmetic, independently: each id's gradient rows added
    in position order to a zero row (ids outside [0, V) and the padding row add nothing)."""
    dw = torch.zeros(n_rows, g.shape[-1], dtype=torch.float32)
    for p, i in enumerate(ids.reshape(-1).tolist()):
        if 0 <= i < n_rows and i != padding_idx:
            dw[i] += g[p].float()
    return dw


def _torch_sort_path(g, ids, n_rows, padding_idx, dtype):
    """The backward forced onto its path for large batches (one torch.sort of all ids)."""
    saved, emb_mod._MAX_SORT_CHUNKS = emb_mod._MAX_SORT_CHUNKS, 0
    try:
        return emb_mod._backward(g, ids, n_rows, padding_idx, dtype)
    finally:
        emb_mod._MAX_SORT_CHUNKS = saved


def _check(ids, weight, padding_idx, dtype, path, g=None):
    ids0, w0 = ids.clone(), weight.detach().clone()
    w = weight.detach().requires_grad_()          # keeps weight's strides
    out = embedding(ids, w, padding_idx)
    assert out.shape == (*ids.shape, weight.shape[1]) and out.dtype == dtype
    g = torch.randn(out.shape).to(dtype) if g is None else g
    (dw,) = torch.autograd.grad(out, w, g)
    out64, dw64 = _expected_f64(ids, w0, g, padding_idx)
    assert torch.equal(out.double(), out64)                     # a gather is exact
    assert dw.dtype == dtype and dw.shape == weight.shape
    assert_close_ulps(dw, dw64, dtype, _grad_ulps(path, dtype, ids))
    if padding_idx is not None:
        assert torch.count_nonzero(dw[padding_idx]) == 0
    assert torch.equal(ids, ids0) and torch.equal(w.detach(), w0)
    return out, dw


@parametrize_dtype
@pytest.mark.parametrize("padding_idx", [None, 7, -3])
def test_embedding_matches_float64(path, dtype, padding_idx):
    weight = torch.randn(V, H).to(dtype)
    ids = torch.randint(0, 40, (3, 37))          # many repeated ids
    ids[0, :9] = 0 if padding_idx is None else padding_idx % V     # the padding row, repeated
    ids[1, 5] = V - 1                            # last row
    _check(ids, weight, padding_idx, dtype, path)


def test_embedding_matches_torch_f_embedding_float64(path):
    """Same values and gradient as torch's own F.embedding (in float64, no rounding)."""
    w = torch.randn(V, H, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 17))
    ids[:, :4] = 11
    g = torch.randn(2, 17, H, dtype=torch.float64)
    for pad in (None, 11):
        wa = w.clone().requires_grad_()
        wb = w.clone().requires_grad_()
        out_a = embedding(ids, wa, pad)
        out_b = F.embedding(ids, wb, pad)
        assert torch.equal(out_a, out_b)
        out_a.backward(g)
        out_b.backward(g)
        torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_all_ids_equal_accumulate(path, dtype):
    """Every id the same: one row receives the sum of all gradient rows (one segment that
    spans the whole sorted id list)."""
    weight = torch.randn(50, H).to(dtype)
    ids = torch.full((5, 13), 4)
    g = torch.rand(5, 13, H).to(dtype)           # positive: no cancellation, tight check
    _, dw = _check(ids, weight, None, dtype, path, g=g)
    assert torch.count_nonzero(dw[:4]) == 0 and torch.count_nonzero(dw[5:]) == 0


def test_embedding_backward_is_deterministic():
    """The same ids and gradient give bit-identical table gradients (a sorted, ordered
    segment sum, no atomics), with ids repeated in shuffled positions."""
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, 6, (4, 29))
    g = torch.randn(4, 29, H)
    grads = []
    for _ in range(2):
        weight.grad = None
        embedding(ids, weight).backward(g)
        grads.append(weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_embedding_backward_tile_choice():
    """Wide tiles (4 x 4096 for H = 4096) when at most a third of the narrow tiles (4 x
    1024) can hold an id: Llama 3's table with 4096 and 8192 ids, not 16384, the boundary
    exact; for a small H a wide tile holds more rows (64 x 128 instead of 32 x 128)."""
    assert emb_mod._bwd_tiles(4096, 4096, 128256) == (4, 4096, 8)
    assert emb_mod._bwd_tiles(4096, 8192, 128256) == (4, 4096, 8)
    assert emb_mod._bwd_tiles(4096, 16384, 128256) == (4, 1024, 4)
    assert emb_mod._bwd_tiles(4096, 10688, 128256) == (4, 4096, 8)    # 3 x 10688 = 32064 blocks
    assert emb_mod._bwd_tiles(4096, 10689, 128256) == (4, 1024, 4)
    assert emb_mod._bwd_tiles(123, 1, 1000) == (64, 128, 8)


def test_embedding_many_blocks(monkeypatch):
    monkeypatch.setattr(emb_mod, "_WIDE_TILES", False)
    monkeypatch.setattr(emb_mod, "_TILE_ELEMS", 16)
    monkeypatch.setattr(emb_mod, "_MAX_BLOCK_H", 8)   # 16 column blocks of H = 123, 2 ids per program
    monkeypatch.setattr(emb_mod, "_ACC_TILE_ELEMS", 256)
    monkeypatch.setattr(emb_mod, "_ACC_BLOCK_H", 64)
    weight = torch.randn(V, H)
    ids = torch.randint(0, 30, (2, 11))
    _check(ids, weight, 3, torch.float32, "triton")


@pytest.mark.parametrize("tile, wide", [((16, 8), False), ((64, 128), False), ((16384, 1024), False),
                                        ((16, 8), True), ((16384, 4096), True)])
@pytest.mark.parametrize("shape", [(1,), (2, 1), (5, 13), (300,)])
def test_embedding_backward_tiles(monkeypatch, tile, wide, shape):
    """The backward writes dW in (rows x columns) tiles, narrow or wide (the knobs of each
    set to the same tile here): tiny tiles (2 rows x 8 columns: many row blocks, ids at their
    edges, several column blocks), mid-size and the defaults, a single id included."""
    monkeypatch.setattr(emb_mod, "_WIDE_TILES", wide)
    for elems, width in (("_ACC_TILE_ELEMS", "_ACC_BLOCK_H"), ("_WIDE_TILE_ELEMS", "_WIDE_BLOCK_H")):
        monkeypatch.setattr(emb_mod, elems, tile[0])
        monkeypatch.setattr(emb_mod, width, tile[1])
    weight = torch.randn(80, H)                     # a small table: the interpreter visits every tile
    ids = torch.randint(0, 9, shape)
    ids.view(-1)[-1] = 79
    if ids.numel() > 3:
        ids.view(-1)[1] = 50
    _check(ids, weight, 2, torch.float32, "triton")



@pytest.mark.parametrize("n_ids, chunk, max_chunks, scratch", [
    (300, 16, 64, None), (300, 16, 64, True), (300, 16, 64, False),   # 19 chunks
    (37, 16, 64, True),                                                # 3 chunks, the last partial
    (1, 1024, 64, True),                                               # one id (chunk of 1 here)
    (37, 16, 2, None),                                                 # over max_chunks: torch.sort
])
def test_embedding_backward_sorted_chunks(monkeypatch, n_ids, chunk, max_chunks, scratch):
    """The backward sorts the ids in chunks (several chunks here: chunk 16), keeps
    the sorted keys and block starts in rows of dW from the middle on (scratch True / None) or
    in a new byte buffer (False), writes those rows afterwards by scanning the ids, and falls back
    to one torch.sort beyond max_chunks chunks. Every way gives the float64 sum within ulps
    and, with the hot-tile kernel off, exactly the fp32 sums in position order (also what the
    torch.sort path gives)."""
    monkeypatch.setattr(emb_mod, "_HOT_MIN", 10**9)
    monkeypatch.setattr(emb_mod, "_SORT_CHUNK", chunk)
    monkeypatch.setattr(emb_mod, "_MAX_SORT_CHUNKS", max_chunks)
    monkeypatch.setattr(emb_mod, "_SCRATCH_IN_DW", scratch)
    monkeypatch.setattr(emb_mod, "_WIDE_TILES", False)
    monkeypatch.setattr(emb_mod, "_ACC_TILE_ELEMS", 512)
    monkeypatch.setattr(emb_mod, "_ACC_BLOCK_H", 64)
    n_rows = 90
    weight = torch.randn(n_rows, H)
    ids = torch.randint(0, 12, (n_ids,))
    ids[::4] = 5                                   # one id repeated across every chunk
    ids[-1] = n_rows // 2 + 1                      # inside the scratch rows (from row 40 on)
    if n_ids > 2:
        ids[1], ids[-2] = 0, n_rows - 1            # the first and last rows
    _, dw = _check(ids, weight, 3, torch.float32, "triton")
    g = torch.randn(n_ids, H)
    for pad in (-1, 5):
        got = emb_mod._backward(g, ids, n_rows, pad, torch.float32)
        assert torch.equal(got, _ordered_sum(g, ids, n_rows, pad))
        assert torch.equal(got, _torch_sort_path(g, ids, n_rows, pad, torch.float32))
    need, row_b = 64 * 8 + 40 * 4, H * 4
    in_dw, byte0, b0, b1 = emb_mod._scratch_place(n_rows, H, 4, need, 8)
    if scratch is False:
        assert not in_dw and byte0 == b0 == b1 == 0
    else:         # from the 8-row block nearest the middle (row 40), 8-byte aligned
        assert in_dw and byte0 == 40 * row_b and (b0, b1) == (5, 6)
        assert b0 * 8 * row_b <= byte0 and byte0 + need <= b1 * 8 * row_b
    if scratch:   # forced in, over half of dW: pushed back from the end
        need = n_rows * H * 4 - 100
        in_dw, byte0, b0, b1 = emb_mod._scratch_place(n_rows, H, 4, need, 8)
        assert in_dw and byte0 == 96 and (b0, b1) == (0, 12)


@pytest.mark.parametrize("n_rows", [28, 32, 36])
@pytest.mark.parametrize("scratch", [True, False])
def test_embedding_backward_several_start_tiles(monkeypatch, n_rows, scratch):
    """The block starts over several tiles of 4 row blocks (4-row blocks): n_blocks + 1 =
    8, 9 and 10 entries per chunk (the end entry alone in a tile, or not), ids in every
    block, in chunks of 16; integer-valued gradients must sum exactly."""
    monkeypatch.setattr(emb_mod, "_STARTS_TILE", 4)
    monkeypatch.setattr(emb_mod, "_SORT_CHUNK", 16)
    monkeypatch.setattr(emb_mod, "_WIDE_TILES", False)
    monkeypatch.setattr(emb_mod, "_ACC_TILE_ELEMS", 64)
    monkeypatch.setattr(emb_mod, "_ACC_BLOCK_H", 16)
    monkeypatch.setattr(emb_mod, "_SCRATCH_IN_DW", scratch)
    ids = torch.cat([torch.arange(n_rows), torch.randint(0, n_rows, (13,))])
    g = torch.randint(-8, 9, (ids.numel(), 16)).float()
    exact, _ = _fp32_sum_bound(g, ids, n_rows, -1)
    assert torch.equal(emb_mod._backward(g, ids, n_rows, -1, torch.float32).double(), exact)


def _fp32_sum_bound(g, ids, n_rows, padding_idx):
    """(float64 sums, bound): per element, an fp32 sum of k terms in any order is within
    (k - 1) * 2^-24 * sum|terms| (+ a sliver) of the exact sum (Higham, "Accuracy and
    Stability of Numerical Algorithms", 2002, eq. 4.4)."""
    keep = (ids >= 0) & (ids < n_rows) & (ids != padding_idx)
    g64 = g.reshape(-1, g.shape[-1]).double()[keep]
    exact = torch.zeros(n_rows, g.shape[-1], dtype=torch.float64).index_add_(0, ids[keep], g64)
    mag = torch.zeros_like(exact).index_add_(0, ids[keep], g64.abs())
    k = torch.bincount(ids[keep], minlength=n_rows).double()[:, None]
    return exact, (k - 1).clamp(min=0) * 2.0**-24 * mag * 1.001 + 1e-30


@pytest.mark.parametrize("hot_min, seg, hot_h, scan_h, scan_seg, chunk, max_chunks, scratch", [
    # every tile with an id is hot: 4-id segments, scratch in dW
    (1, 4, 16, 16, 4, 16, 64, True),
    (1, 4, 16, 16, 4, 16, 2, None),           # the torch.sort path (one chunk)
    (8, 16, 64, 32, 2, 16, 64, False),        # hot and sequential tiles side by side, byte scratch
    (8, 16, 64, 32, 2, 16, 64, True),
    (64, 512, 8, 128, 32, 16, 64, True),      # the defaults
])
def test_embedding_backward_hot_tiles(monkeypatch, hot_min, seg, hot_h, scan_h, scan_seg, chunk, max_chunks, scratch):
    """Tiles holding hot_min ids or more are written by the hot kernel (segments of ids, rows
    of one segment spread over several rows of a tile, several column work items), the
    scratch rows by the scan kernel (a hot id among them). Integer-valued gradients sum
    exactly in any order, so dW must equal the float64 sum (with and without a padding row);
    random ones must lie within the fp32 summation bound of it; reruns give the same bits;
    padding and invalid ids add nothing."""
    monkeypatch.setattr(emb_mod, "_HOT_MIN", hot_min)
    monkeypatch.setattr(emb_mod, "_HOT_SEG", seg)
    monkeypatch.setattr(emb_mod, "_HOT_BLOCK_H", hot_h)
    monkeypatch.setattr(emb_mod, "_SCAN_BLOCK_H", scan_h)
    monkeypatch.setattr(emb_mod, "_SCAN_SEG", scan_seg)
    monkeypatch.setattr(emb_mod, "_SCAN_BLOCK_N", 64)
    monkeypatch.setattr(emb_mod, "_SCAN_TILE_ELEMS", 64)        # scan tiles of 4 / 2 / 1 rows
    monkeypatch.setattr(emb_mod, "_SORT_CHUNK", chunk)
    monkeypatch.setattr(emb_mod, "_MAX_SORT_CHUNKS", max_chunks)
    monkeypatch.setattr(emb_mod, "_SCRATCH_IN_DW", scratch)
    monkeypatch.setattr(emb_mod, "_WIDE_TILES", False)
    monkeypatch.setattr(emb_mod, "_ACC_TILE_ELEMS", 512)
    monkeypatch.setattr(emb_mod, "_ACC_BLOCK_H", 64)            # tiles of 8 rows x 64 columns
    n_rows, n_ids, h = 90, 240, 40          # 3 hot column items of 16, one partial
    ids = torch.randint(0, 30, (n_ids,))
    ids[::3] = 5                                   # hot, in every chunk
    ids[1::5] = 6                                  # a second hot row in the same tile
    ids[2::7] = n_rows // 2 + 2                    # hot, in the scratch rows (from row 40 on)
    ids[6::13] = n_rows - 1                        # after the scratch rows: ~18 ids, hot for hot_min 1, 8
    ids[4::11] = 13                                # padding (when asked)
    ids[10], ids[20] = -2, n_rows + 4              # invalid: no gradient
    for pad in (-1, 13):
        # exact sums (the padding row's among them: 0, as the float64 oracle leaves it)
        gi = torch.randint(-8, 9, (n_ids, h)).float()
        exact, _ = _fp32_sum_bound(gi, ids, n_rows, pad)
        assert torch.equal(emb_mod._backward(gi, ids, n_rows, pad, torch.float32).double(), exact)
    # random gradients (without padding: the interpreter's time goes to each call)
    pad = -1
    g = torch.randn(n_ids, h)
    got = emb_mod._backward(g, ids, n_rows, pad, torch.float32)
    exact, bound = _fp32_sum_bound(g, ids, n_rows, pad)
    assert ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(got, emb_mod._backward(g, ids, n_rows, pad, torch.float32))
    # bf16: the fp32 sum rounded once, within one bf16 ulp (2^-7 relative: the
    # interpreter truncates where the GPU rounds to nearest)
    gb = g.bfloat16()
    exact, bound = _fp32_sum_bound(gb.float(), ids, n_rows, pad)
    gotb = emb_mod._backward(gb, ids, n_rows, pad, torch.bfloat16).double()
    assert ((gotb - exact).abs() <= bound + exact.abs() * 2.0**-7).all()


def _launch_sort_starts(ids, n_rows, pad, chunk, tile, rows_per_block, key32, starts=True):
    """Runs the sort-and-starts kernel alone; returns (keys (n_chunks, chunk) list, starts
    (n_blocks + 1, n_chunks) int32 tensor, the hot-list count)."""
    n_ids = ids.numel()
    n_chunks = -(-n_ids // chunk)
    n_blocks = -(-n_rows // rows_per_block) if starts else 0
    starts_n = (n_blocks + 1) * n_chunks
    scr = torch.full((n_chunks * chunk * 8 + starts_n * 4 + 8,), 0x55, dtype=torch.uint8)
    grid = (1 + (-(-(n_blocks + 1) // tile) if starts else 0), n_chunks)
    emb_mod._chunk_sort_starts_kernel[grid](
        ids, scr, 0, n_ids, n_rows, pad, n_chunks, starts_n, rows_per_block,
        CHUNK=chunk, CHUNK_BITS=chunk.bit_length() - 1, KEY32=key32, TILE=tile, num_warps=4,
    )
    keys = scr[: n_chunks * chunk * 8].view(torch.int64).view(n_chunks, chunk).tolist()
    st = scr[n_chunks * chunk * 8:][: starts_n * 4].view(torch.int32).view(n_blocks + 1, n_chunks)
    return keys, st, scr[-8:-4].view(torch.int32).item()


def _want_keys(ids, c, chunk, n_rows, pad):
    kept = [(p, i) for p, i in enumerate(ids.tolist()) if c * chunk <= p < (c + 1) * chunk
            and 0 <= i < n_rows and i != pad]
    want = sorted((i << 31) | p for p, i in kept)
    return kept, want + [torch.iinfo(torch.int64).max] * (chunk - len(want))


@pytest.mark.parametrize("chunk, tile, rows_per_block, key32", [
    (64, 4, 3, True), (64, 4, 3, False), (16, 16, 1, True), (64, 64, 8, False),
])
def test_embedding_sort_keys_and_block_starts(chunk, tile, rows_per_block, key32):
    """The chunk sort's keys and the block starts of the same launch, against an
    independent Python sort and count: keys (id << 31 | position) ascending within each
    chunk (sorted as int32 keys or as int64), with the padding id, ids outside [0, V) and
    the positions past N all mapped to the largest int64 (so the writer never reads their
    gradient rows: a batch padded with ``padding_idx`` costs no more than its real tokens);
    STARTS[b, c] = the number of chunk c's kept ids below row block b, for b in
    [0, n_blocks], over several tiles of blocks (the last one partial); the hot-list count
    zeroed."""
    n_rows, pad = 40, 7
    ids = torch.tensor([7, 3, -1, 7, 39, 40, 0, 7, 3, 12, 38, 2**40, -2**40] * 7)     # 91 ids
    keys, starts, hot = _launch_sort_starts(ids, n_rows, pad, chunk, tile, rows_per_block, key32)
    for c in range(len(keys)):
        kept, want = _want_keys(ids, c, chunk, n_rows, pad)
        assert keys[c] == want
        for b in range(starts.shape[0]):
            assert starts[b, c].item() == sum(1 for _, i in kept if i // rows_per_block < b)
    assert hot == 0


@pytest.mark.parametrize("n_rows", [2**25 - 1, 2**25, 2**31 + 5])
def test_embedding_sort_keys_large_ids(n_rows):
    """Ids up to V - 1 at the largest table the int32 keys serve (V * CHUNK just under
    2^31, chunks of 64 here) and past 2^31 with int64 keys, the order unchanged; the host
    picks int32 keys exactly when V * CHUNK < 2^31 - 1."""
    chunk = 64
    key32 = emb_mod._int32_keys(n_rows, chunk)
    assert key32 == (n_rows == 2**25 - 1)
    ids = torch.tensor([n_rows - 1, 5, n_rows - 2, n_rows - 1, 0, n_rows, 2**20 + 3] * 20)   # 140 ids
    keys, _, _ = _launch_sort_starts(ids, n_rows, -1, chunk, 4, 1, key32, starts=False)
    for c in range(len(keys)):
        assert keys[c] == _want_keys(ids, c, chunk, n_rows, -1)[1]


def test_embedding_backward_ignores_out_of_range_ids(monkeypatch):
    """Ids outside [0, V) (only possible on CUDA, where they are not checked on the host)
    add no gradient anywhere, in the chunked path and in the torch.sort path."""
    monkeypatch.setattr(emb_mod, "_SORT_CHUNK", 16)
    monkeypatch.setattr(emb_mod, "_SCRATCH_IN_DW", True)
    ids = torch.tensor([3, -1, 40, 3, 39, -7, 41, 0] * 5)
    g = torch.randn(ids.numel(), 16)
    keep = (ids >= 0) & (ids < 40)
    want = torch.zeros(40, 16, dtype=torch.float64).index_add_(0, ids[keep], g[keep].double())
    for fn in (emb_mod._backward, _torch_sort_path):
        got = fn(g, ids, 40, -1, torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@parametrize_dtype
def test_embedding_strided_inputs(path, dtype):
    """Transposed ids, int32 ids, a table that is a column slice of a wider buffer, a
    transposed table, and a non-contiguous output gradient."""
    ids = torch.randint(0, V, (19, 3)).t()                      # (3, 19), non-contiguous
    assert not ids.is_contiguous()
    big = torch.randn(V, H + 9).to(dtype)
    sliced = big[:, :H]                                         # row stride H + 9
    g = torch.randn(H, 3, 19).to(dtype).permute(1, 2, 0)        # (3, 19, H), non-contiguous
    _check(ids, sliced, None, dtype, path, g=g)
    _check(ids.to(torch.int32), sliced, 5, dtype, path, g=g)
    g_cols = torch.randn(3, 19, H + 7).to(dtype)[..., :H]       # rows of H + 7: read in place, row stride kept
    _check(ids, sliced, None, dtype, path, g=g_cols)

    wt = torch.randn(H, V).to(dtype).t().requires_grad_()        # (V, H) view with column stride V
    wt0 = wt.detach().clone()
    out = embedding(ids, wt)
    assert out.shape == (3, 19, H) and out.is_contiguous()
    if path == "triton":  # written in its final shape: no view for autograd to track
        assert not out._is_view()
    out.backward(g)
    out64, dw64 = _expected_f64(ids, wt0, g, None)
    assert torch.equal(out.double(), out64)
    assert_close_ulps(wt.grad, dw64, dtype, _grad_ulps(path, dtype, ids))


@parametrize_dtype
def test_embedding_reference_function(dtype):
    """embedding_reference itself (the CPU fallback), with padding and repeats."""
    weight = torch.randn(V, H).to(dtype).requires_grad_()
    ids = torch.randint(0, 25, (4, 9))
    ids[2, :4] = 13
    out = embedding_reference(ids, weight, padding_idx=13)
    g = torch.randn(out.shape).to(dtype)
    out.backward(g)
    out64, dw64 = _expected_f64(ids, weight.detach(), g, 13)
    assert torch.equal(out.double(), out64)
    assert_close_ulps(weight.grad, dw64, dtype, _grad_ulps("reference", dtype, ids))
    assert torch.count_nonzero(weight.grad[13]) == 0


def test_embedding_tied_weights_accumulate(path):
    """The table used twice (e.g. tied input embedding): gradients add up."""
    weight = torch.randn(V, H, requires_grad=True)
    ids_a, ids_b = torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (3,))
    (embedding(ids_a, weight).sum() + 2 * embedding(ids_b, weight, padding_idx=ids_b[0].item()).sum()).backward()
    w64 = weight.detach().double().requires_grad_()
    (F.embedding(ids_a, w64).sum() + 2 * F.embedding(ids_b, w64, padding_idx=ids_b[0].item()).sum()).backward()
    assert_close_ulps(weight.grad, w64.grad, torch.float32, 16)


def test_embedding_empty_and_errors():
    w = torch.randn(10, 4, requires_grad=True)
    out = embedding(torch.zeros(0, 3, dtype=torch.long), w)
    assert out.shape == (0, 3, 4)
    out.sum().backward()
    assert torch.count_nonzero(w.grad) == 0
    with pytest.raises(ValueError, match="must lie in"):
        embedding(torch.tensor([0, 10]), w)
    with pytest.raises(ValueError, match="must lie in"):
        embedding(torch.tensor([-1, 3]), w)
    with pytest.raises(ValueError, match="int64 or int32"):
        embedding(torch.tensor([0.0, 1.0]), w)
    with pytest.raises(ValueError, match=r"\(V, H\)"):
        embedding(torch.tensor([0]), w[0])
    with pytest.raises(ValueError, match="floating point"):
        embedding(torch.tensor([0]), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_idx"):
        embedding(torch.tensor([0]), w, padding_idx=10)
    with pytest.raises(ValueError, match="padding_idx"):
        embedding(torch.tensor([0]), w, padding_idx=-11)
    for bad in (2.5, True, "2"):  # 2.5 used to run as row 2
        with pytest.raises(ValueError, match="padding_idx must be an integer"):
            embedding(torch.tensor([0]), w, padding_idx=bad)
    assert torch.equal(embedding(torch.tensor([2, 3]), w, padding_idx=np.int64(2)),
                       embedding(torch.tensor([2, 3]), w, padding_idx=2))
    huge = torch.zeros(1, 4).expand(2**32, 4)       # 2^32 rows, no memory: over the key range
    if emb_mod._utils.triton_ok(huge):                # the limit is the Triton path's
        with pytest.raises(ValueError, match="fewer than 2\\^32"):
            embedding(torch.tensor([0]), huge)
    many = torch.zeros(1, dtype=torch.long).expand(2**31)   # 2^31 ids, no memory: over 31-bit positions
    if emb_mod._utils.triton_ok(w):
        with pytest.raises(ValueError, match="fewer than 2\\^31"):
            embedding(many, w)


def test_embedding_opcheck_and_compile():
    from torch.library import opcheck

    w = torch.randn(30, 12, requires_grad=True)
    ids = torch.randint(0, 30, (2, 7))
    ids[0, :3] = 2
    opcheck(torch.ops.ligerzoo.embedding, (ids, w, 2))
    opcheck(torch.ops.ligerzoo.embedding_backward, (torch.randn(2, 7, 12), ids, 30, -1, torch.bfloat16))

    def f(w):
        return (embedding(ids, w, padding_idx=2) * torch.arange(12.0)).sum()

    gc = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(w), w)[0]
    ge = torch.autograd.grad(f(w), w)[0]
    torch.testing.assert_close(gc, ge)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@parametrize_dtype
def test_gpu_embedding_llama3_table(dtype):
    """128256 x 4096 table (Llama 3), 2 x 4096 ids with a padded tail (one id repeated
    1000 times), a hot id, a hot id in the scratch rows (the middle of the table) and one
    in the last rows (hot-tile and scan kernels), against float64 index_add."""
    torch.manual_seed(0)
    Vg, Hg = 128256, 4096
    weight = torch.randn(Vg, Hg, device="cuda").to(dtype).requires_grad_()
    ids = torch.randint(0, Vg, (2, 4096), device="cuda")
    ids[1, -1000:] = 128004          # padding tail
    ids[0, ::7] = 42                 # a hot id
    ids[0, 3::5] = Vg // 2 + 3       # a hot id in the scratch rows
    ids[1, 1::11] = Vg - 3           # a hot id after them
    g = torch.randn(2, 4096, Hg, device="cuda").to(dtype)
    for pad in (None, 128004):
        weight.grad = None
        out = embedding(ids, weight, padding_idx=pad)
        assert torch.equal(out, weight.detach()[ids])
        out.backward(g)
        dw64 = torch.zeros(Vg, Hg, dtype=torch.float64, device="cuda")
        dw64.index_add_(0, ids.reshape(-1), g.reshape(-1, Hg).double())
        if pad is not None:
            dw64[pad] = 0
        assert weight.grad.dtype == dtype
        # fp32: sums of up to ~1000 terms in arbitrary order
        assert_close_ulps(weight.grad, dw64, dtype, 256 if dtype == torch.float32 else 2)
        del dw64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_ids", [1, 16385, 40000])
def test_gpu_embedding_sizes_and_invalid_ids(n_ids):
    """A single id and many; ids outside [0, V) read zero rows and send no gradient."""
    torch.manual_seed(0)
    Vg, Hg = 128256, 256
    weight = torch.randn(Vg, Hg, device="cuda").requires_grad_()
    ids = torch.randint(0, 50, (n_ids,), device="cuda")
    if n_ids > 2:
        ids[1], ids[2] = -5, Vg + 3
    out = embedding(ids, weight)
    valid = (ids >= 0) & (ids < Vg)
    assert torch.equal(out[valid], weight.detach()[ids[valid]]) and torch.count_nonzero(out[~valid]) == 0
    g = torch.randn(n_ids, Hg, device="cuda")
    out.backward(g)
    dw64 = torch.zeros(Vg, Hg, dtype=torch.float64, device="cuda")
    dw64.index_add_(0, ids[valid], g[valid].double())
    assert_close_ulps(weight.grad, dw64, torch.float32, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_ids", [4096, 16384, 40000])
def test_gpu_embedding_backward_allocates_only_dw(n_ids):
    """Up to 32768 ids the backward's peak is dW itself (the sorted keys and starts live in
    rows of dW), with the same bits as the torch.sort path outside the hot tile of id 77
    (there the two paths group the ids differently: within one bf16 ulp); beyond, that path
    adds O(N) buffers and gives the same bits on a rerun."""
    torch.manual_seed(0)
    Vg, Hg = 128256, 4096
    ids = torch.randint(0, Vg, (n_ids,), device="cuda")
    ids[::9] = 77
    g = torch.randn(n_ids, Hg, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dw = emb_mod._backward(g, ids, Vg, -1, torch.bfloat16)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - dw.untyped_storage().nbytes()
    if n_ids <= 32768:
        assert extra == 0
    else:
        assert 0 < extra < 64 * n_ids
    if n_ids <= 32768:
        ref = _torch_sort_path(g, ids, Vg, -1, torch.bfloat16)
        rest = torch.ones(Vg, dtype=torch.bool, device="cuda")
        rest[76:80] = False                       # the hot tile (4-row tiles at H = 4096)
        assert torch.equal(dw[rest], ref[rest])
        assert ((dw[76:80].float() - ref[76:80].float()).abs() <= ref[76:80].float().abs() * 2.0**-7).all()
    else:
        assert torch.equal(dw, emb_mod._backward(g, ids, Vg, -1, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_embedding_compile():
    Vg, Hg = 128256, 4096
    w = torch.randn(Vg, Hg, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, Vg, (8192,), device="cuda")

    def f(w):
        return embedding(ids, w).float().square().sum()

    gc = torch.autograd.grad(torch.compile(f, fullgraph=True)(w), w)[0]
    ge = torch.autograd.grad(f(w), w)[0]
    torch.testing.assert_close(gc, ge)
