"""GroupNorm against float64 references (torch's own ``F.group_norm`` in float64), through
the Triton kernels (interpreter on CPU, see conftest) and through the forced
torch-reference dispatch.

Tolerances: statistics and affine are fp32 and every output is rounded once to its dtype,
so outputs and gradients are compared with the float64 result of the same inputs within a
few ulps of the output dtype, relative to each element and, as a floor, to the largest
element (the sums cancel). The CPU interpreter truncates fp32 -> bf16 (up to 1 ulp
instead of 1/2), which the bf16 budget covers.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ligerzoo.kernels.group_norm import group_norm, group_norm_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

gn_mod = kernel_module("group_norm")


@pytest.fixture(autouse=True)
def _no_small_groups(request, monkeypatch):
    """CPU tests force the small-group kernels where they mean them (``kernels``): their
    shapes are small, so every group would otherwise take them. GPU tests keep the rules."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN", 0)
        monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN_BWD", 0)


@pytest.fixture(params=["small", "whole_group", "split"])
def kernels(request, monkeypatch):
    """The three Triton layouts: (samples x groups) tiles of small groups, one program per
    (sample, group), or the split reductions (chosen by the group size and the (sample,
    group) count; forced here)."""
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN", 2**30 if request.param == "small" else 0)
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN_BWD", 2**30 if request.param == "small" else 0)
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0 if request.param == "whole_group" else 10**9)
    return request.param


ULPS = {torch.float32: 64, torch.bfloat16: 2, torch.float16: 4}


def _inputs(shape, dtype, shift=1.5, param_dtype=None):
    x = (3.0 * torch.randn(shape) + shift).to(dtype)
    pd = param_dtype or dtype
    w = (1.0 + 0.3 * torch.randn(shape[1])).to(pd)
    b = (0.5 * torch.randn(shape[1])).to(pd)
    return x, w, b


def _torch64(x, groups, w, b, dy, eps=1e-5):
    """float64 F.group_norm output and the gradients of every given (non-None) input."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    w64 = leaves[1]
    if w64 is None and b is not None:  # torch's group_norm backward fails for a bias without weight
        w64 = torch.ones(x.shape[1], dtype=torch.float64, device=x.device)
    y = F.group_norm(leaves[0], groups, w64, leaves[2], eps)
    y.backward(dy.double())
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _run(x, groups, w, b, eps=1e-5, dy=None):
    """Our forward + backward on fresh leaves; returns (y, dy, [grads or None])."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = group_norm(leaves[0], groups, leaves[1], leaves[2], eps)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    return y, dy, [t.grad if t is not None else None for t in leaves]


def _check(x, groups, w, b, dtype, ulps, eps=1e-5):
    originals = [t.clone() if t is not None else None for t in (x, w, b)]
    y, dy, grads = _run(x, groups, w, b, eps)
    y64, grads64 = _torch64(x, groups, w, b, dy, eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_ulps(y, y64, dtype, ulps)
    for g, g64 in zip(grads, grads64):
        if g64 is not None:
            assert_close_ulps(g, g64, dtype, ulps)
    for t, t0 in zip((x, w, b), originals):  # inputs untouched by forward + backward
        if t is not None:
            assert torch.equal(t, t0)
    return grads


SHAPES = [
    ((3, 6, 5, 7), 3),      # images
    ((2, 12), 4),           # no spatial dims
    ((2, 4, 3, 5, 7), 2),   # three spatial dims
    ((2, 6, 37), 6),        # one channel per group (instance norm)
    ((2, 5, 9), 1),         # one group (layer norm over C and spatial)
]


@parametrize_dtype
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_group_norm_matches_float64(path, kernels, dtype, shape, groups):
    x, w, b = _inputs(shape, dtype)
    grads = _check(x, groups, w, b, dtype, ULPS[dtype])
    assert [g.dtype for g in grads] == [dtype] * 3


@pytest.mark.parametrize("affine", ["weight_only", "bias_only", "none"])
def test_group_norm_without_affine(path, kernels, affine):
    x, w, b = _inputs((2, 6, 5, 7), torch.float32)
    w = w if affine == "weight_only" else None
    b = b if affine == "bias_only" else None
    _check(x, 3, w, b, torch.float32, 64)


def test_reference_equals_torch_in_float64():
    x, w, b = (t.double() for t in _inputs((3, 6, 4, 5), torch.float32))
    for args in ((w, b), (w, None), (None, b), (None, None)):
        torch.testing.assert_close(group_norm_reference(x, 2, *args, eps=1e-6),
                                   F.group_norm(x, 2, *args, eps=1e-6), rtol=1e-13, atol=1e-13)


def test_group_norm_matches_torch_bf16():
    """Against torch's own bf16 group norm (fp32 statistics, one rounding)."""
    x, w, b = _inputs((4, 6, 5, 7), torch.bfloat16)
    assert_close_ulps(group_norm(x, 3, w, b), F.group_norm(x, 3, w, b), torch.bfloat16, 2)


@pytest.mark.parametrize("eps", [0.5, 1e-2])
def test_group_norm_large_eps(kernels, eps):
    """eps comparable to the variance: the backward's recomputed rstd must add it as the
    forward does."""
    x, w, b = _inputs((3, 6, 5, 7), torch.float32, shift=0.0)
    _check(0.3 * x, 3, w, b, torch.float32, 64, eps=eps)


def test_group_norm_one_value_per_group_is_bias(kernels):
    """One value per group: x - mean is exactly 0, so y is exactly the bias (the forward
    subtracts the mean before scaling; x * scale - mean * scale would leave rounding noise
    amplified by rstd = 1e6)."""
    x, b = 3.0 * torch.randn(9, 8), torch.randn(8)
    assert torch.equal(group_norm(x, 8, None, b, 1e-12), b.expand(9, 8))


def test_group_norm_large_mean(kernels):
    """Welford statistics: no E[x^2] - mean^2 cancellation."""
    x = torch.randn(2, 6, 5, 7) + 100.0
    w, b = 1.0 + 0.3 * torch.randn(6), torch.randn(6)
    y64, _ = _torch64(x, 3, w, b, torch.zeros_like(x))
    assert_close_ulps(group_norm(x, 3, w, b), y64, torch.float32, 128)


@pytest.mark.parametrize(
    "shape,groups,max_block_s,tile,programs,max_partials,n_split",
    [
        ((2, 4, 37), 2, 8, 16, 64, 2, 5),       # rows split in slices; partials merged over several blocks
        ((1, 6, 5, 7), 3, 16, 16, 24, 1024, 3),  # few rows: every row split
        ((3, 8, 3), 4, 4, 8, 1, 4, 1),           # several rows per tile, no split
    ],
)
def test_group_norm_tiling_and_splits(monkeypatch, shape, groups, max_block_s, tile, programs, max_partials,
                                      n_split):
    monkeypatch.setattr(gn_mod, "_MAX_BLOCK_S", max_block_s)
    monkeypatch.setattr(gn_mod, "_TILE_ELEMS", tile)
    monkeypatch.setattr(gn_mod, "_REDUCE_PROGRAMS_CPU", programs)
    monkeypatch.setattr(gn_mod, "_MAX_BLOCK_PARTIALS", max_partials)
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 10**9)
    x, w, b = _inputs(shape, torch.float32)
    plan = gn_mod._Plan(x, groups)
    assert plan.n_split == n_split and (plan.block_s < plan.n_cols or plan.block_r > 1)
    if n_split > 1:
        assert plan.chunk % plan.block_s == 0
        assert (plan.n_split - 1) * plan.chunk < plan.n_cols <= plan.n_split * plan.chunk
    _check(x, groups, w, b, torch.float32, 64)


@pytest.mark.parametrize("shape,groups,max_block_s,tile", [
    ((3, 8, 37), 2, 8, 16),     # 4 channels x 37 values per group in 2 x 8 tiles: loops over both
    ((2, 12), 4, 1024, 2),      # no spatial dims, 3 channels per group in tiles of 2
    ((2, 6, 5, 7), 3, 16, 16),  # one channel per tile row, 35 values in 3 spatial blocks
])
@pytest.mark.parametrize("one_tile", [False, True])
def test_group_norm_whole_group_tiles(monkeypatch, shape, groups, max_block_s, tile, one_tile):
    """The whole-group kernels over tiles of a group (the forward in several tiles, the
    group read three times; the backward's tiles all channels x a few values, read twice),
    or with a group in one register tile (read once), forward and backward."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_GROUP_FWD_ONE_TILE_ELEMS", 1024 if one_tile else 0)
    monkeypatch.setattr(gn_mod, "_GROUP_BWD_ONE_TILE_ELEMS", 1024 if one_tile else 0)
    c2, s2 = gn_mod.next_power_of_2(shape[1] // groups), gn_mod.next_power_of_2(math.prod(shape[2:]))
    assert gn_mod._group_tiles(shape[1] // groups, math.prod(shape[2:]))[2] == (one_tile and c2 * s2 <= 1024)
    assert gn_mod._group_bwd_tiles(shape[1] // groups, math.prod(shape[2:]), 4)[2] == (one_tile and c2 * s2 <= 1024)
    assert not gn_mod._group_bwd_tiles(shape[1] // groups, math.prod(shape[2:]), 2)[2]  # 16-bit: tiles (faster)
    monkeypatch.setattr(gn_mod, "_MAX_BLOCK_S", max_block_s)
    monkeypatch.setattr(gn_mod, "_GROUP_FWD_TILE_ELEMS", tile)
    monkeypatch.setattr(gn_mod, "_GROUP_BWD_TILE_ELEMS", 2 * tile)  # backward: all channels x a few values
    x, w, b = _inputs(shape, torch.float32)
    _check(x, groups, w, b, torch.float32, 64)
    _check(x, groups, w, None, torch.float32, 64)
    _check(x, groups, None, b, torch.float32, 64)


@pytest.mark.parametrize("shape,groups,tile,expected_tiles", [
    ((7, 6, 5), 3, 32, (1, 2, 16)),     # 10 values per group (5 spatial): 2 blocks of groups
    ((9, 12), 4, 16, (1, 4, 4)),        # no spatial dims, 3 channels per group
    ((9, 8, 3), 2, 64, (2, 2, 16)),     # 2 samples per tile, the last tile of the last block half full
    ((6, 4, 2), 2, 16, (2, 2, 4)),      # 2 channels x 2 spatial values per group
])
@pytest.mark.parametrize("dtype,small", [
    *((d, s) for d in (torch.float32, torch.bfloat16) for s in ("both", "forward", "backward", "backward_no_prefetch")),
    (torch.float16, "both"),
])
def test_group_norm_small_group_tiles(monkeypatch, shape, groups, tile, expected_tiles, dtype, small):
    """The small-group kernels over several tiles: blocks of groups, several samples per
    tile and per program, and the parameter gradients' fp32 partial sums (per program and
    value, in slabs; then the spatial values of each channel) summed after; in
    both directions, or the backward alone after the whole-group forward (their group
    sizes differ); after the small-group forward the backward takes the small-group kernels
    whatever its own limit ("forward": the forward keeps no mean for another backward);
    the backward with and without the next tile's loads issued early."""
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_PREFETCH", small != "backward_no_prefetch")
    small = "backward" if small == "backward_no_prefetch" else small
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN", 2**30 if small != "backward" else 0)
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN_BWD", 2**30 if small != "forward" else 0)
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_SMALL_TILE_ELEMS", tile)
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_TILE_BYTES", tile * dtype.itemsize)   # as many values (<= 128 per group)
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_PROGRAMS_CPU", 8)
    group_len = math.prod(shape[1:]) // groups
    assert gn_mod._small_tiles(shape[0], groups, group_len, dtype.itemsize)[:3] == expected_tiles
    assert gn_mod._small_tiles(shape[0], groups, group_len, dtype.itemsize, backward=True)[:3] == expected_tiles
    x, w, b = _inputs(shape, dtype)
    _, mean = gn_mod.ops.group_norm(x, groups, w, b, 1e-5)
    assert mean.shape == (shape[0], 0 if small != "backward" else groups)   # no mean after the small forward
    grads = _check(x, groups, w, b, dtype, ULPS[dtype])
    _check(x, groups, w, None, dtype, ULPS[dtype])
    _check(x, groups, None, b, dtype, ULPS[dtype])
    _check(x, groups, None, None, dtype, ULPS[dtype])
    assert [g.dtype for g in grads] == [dtype] * 3
    _, dy, first = _run(x, groups, w, b)
    _, _, again = _run(x, groups, w, b, dy=dy)
    assert all(torch.equal(g, h) for g, h in zip(first, again))  # a fixed summation order


class _RecordLaunches:
    """Stands in for a Triton kernel: records each launch's (positional, keyword) arguments
    and forwards it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("shape,groups,dtype", [
    # 3 programs; a slab holds 2 x 3 x 8 fp32 sums (192 bytes) in whole samples
    ((42, 10), 5, torch.bfloat16),       # 20-byte samples: 2 slabs of 10 samples
    ((50, 9), 3, torch.bfloat16),        # 18-byte samples: 2 slabs of 12 (an even count: 4-byte aligned)
    ((21, 10, 3), 2, torch.float32),     # spatial dims, 120-byte samples: 4 slabs of 2 samples
    # 2 blocks of 4 groups, 3 programs each (6 in all); slabs of 16 values (long samples): 8 of 2 samples
    ((36, 128), 8, torch.bfloat16),
])
@pytest.mark.parametrize("in_dx,at_ends", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("params", ["both", "weight", "bias", "none"])
def test_group_norm_small_backward_partials_in_dx(monkeypatch, shape, groups, dtype, in_dx, at_ends, params):
    """The small-group backward keeps its fp32 partial sums in dx (slabs of whole samples,
    whose dx the finishing kernel writes once it has summed them: the last samples of the
    first programs' blocks, or dx's first samples) when they take at most half of the
    samples, or in a buffer (_SCRATCH_IN_DX off, or too few samples): the same values
    every way."""
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN", 2**30)
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN_BWD", 2**30)
    monkeypatch.setattr(gn_mod, "_SCRATCH_IN_DX", in_dx)
    monkeypatch.setattr(gn_mod, "_SLABS_AT_BLOCK_ENDS", at_ends)
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_TILE_BYTES", 64 * dtype.itemsize)   # 64-value tiles: 3 programs
    monkeypatch.setattr(gn_mod, "_SMALL_SLAB_VALUES", 8)
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_PROGRAMS_CPU", 6 if groups == 8 else 3)   # 3 per block of groups
    finish = _RecordLaunches(gn_mod._gn_small_finish_kernel)
    monkeypatch.setattr(gn_mod, "_gn_small_finish_kernel", finish)
    x, w, b = _inputs(shape, dtype)
    w = w if params in ("both", "weight") else None
    b = b if params in ("both", "bias") else None
    _check(x, groups, w, b, dtype, ULPS[dtype])
    n_params = (w is not None) + (b is not None)
    assert [k["RECOMPUTE"] for _, k in finish.launches] == [in_dx] * (n_params > 0)
    sample_bytes = x[0].numel() * x.element_size()
    for args, kwargs in finish.launches:
        programs, slab0, slab_stride, row0, row_stride, slab_samples = args[6:12]
        assert programs == 3
        if kwargs["RECOMPUTE"]:   # whole samples, starting on 4-byte boundaries (fp32 sums)
            tiles = gn_mod._small_tiles(x.shape[0], groups, x[0].numel() // groups, x.element_size(), backward=True)
            spp = gn_mod._small_bwd_grid(x.device, x.shape[0], groups, tiles[0], tiles[1], tiles[3])[1]
            n_slabs = -(-x[0].numel() // kwargs["BLOCK_C"])
            ends = (at_ends and n_slabs <= x.shape[0] // spp and slab_samples <= spp   # whole blocks to hold them
                    and spp * sample_bytes % 4 == 0)                                # 4-byte aligned
            assert (row0, row_stride) == ((spp - slab_samples, spp) if ends else (0, slab_samples))
            assert slab0 * 4 == row0 * sample_bytes and slab_stride * 4 == row_stride * sample_bytes
            assert slab_samples * sample_bytes >= 4 * n_params * programs * kwargs["BLOCK_C"]
    finish.launches.clear()
    few = x[:3]                                                  # too few samples: a buffer
    _check(few, groups, w, b, dtype, ULPS[dtype])
    assert [k["RECOMPUTE"] for _, k in finish.launches] == [False] * (n_params > 0)


@pytest.mark.parametrize("shape,groups,tile_values,programs", [
    ((37, 64), 4, 128, 3),          # (2, 4, 16) boxes; 3 programs of 14 samples, the last box past N
    ((41, 8, 4), 2, 64, 3),         # spatial dims: groups of 16 values, (2, 2, 16) boxes
    ((36, 128), 8, 64, 3),          # (1, 4, 16) boxes: 2 blocks of groups, 3 programs each
    ((24, 256), 2, 256, 2),         # (1, 2, 128) boxes: one sample a tile
    ((64, 16), 2, 128, 2),          # (8, 2, 8) boxes; 2 slabs, in the last tile of each program's block
])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("params", ["both", "weight", "bias"])
def test_group_norm_small_backward_tma(monkeypatch, shape, groups, tile_values, programs, dtype, param_dtype, params):
    """The small-group backward with its tiles copied by TMA (the Hopper path, here under
    the interpreter, tiles shrunk to the test's sizes): the float64 gradients, the bits of
    the register-loaded kernel, the slabs of sums in dx (whole tiles)."""
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN", 2**30)
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN_BWD", 2**30)
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_TILE_BYTES", tile_values * dtype.itemsize)
    monkeypatch.setattr(gn_mod, "_SMALL_SLAB_VALUES", 8)
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_PROGRAMS_CPU", programs)
    monkeypatch.setattr(gn_mod, "_TMA_BWD", True)
    main = _RecordLaunches(gn_mod._gn_small_bwd_kernel)
    monkeypatch.setattr(gn_mod, "_gn_small_bwd_kernel", main)
    x, w, b = _inputs(shape, dtype, param_dtype=param_dtype)
    w = None if params == "bias" else w
    b = None if params == "weight" else b
    y, dy, grads = _run(x, groups, w, b)
    (args, kwargs), = main.launches
    assert kwargs["TMA"]
    spp, row0, row_stride, held = args[12], args[16], args[17], args[18]
    assert args[15] > 0 and all(v % kwargs["BLOCK_N"] == 0 for v in (spp, row0, row_stride, held))   # whole tiles
    if shape == (64, 16):
        assert (row0, row_stride) == (spp - held, spp)                               # at the blocks' ends
    y64, grads64 = _torch64(x, groups, w, b, dy)
    for g, g64, t in zip(grads, grads64, (dtype, param_dtype, param_dtype)):
        if g64 is not None:
            assert g.dtype == t
            assert_close_ulps(g, g64, t, ULPS[t])
    monkeypatch.setattr(gn_mod, "_TMA_BWD", False)
    _, _, loaded = _run(x, groups, w, b, dy=dy)
    assert not main.launches[-1][1]["TMA"]
    for g, h in zip(grads, loaded):
        assert (g is None and h is None) or torch.equal(g, h)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("shape,groups,tile_values", [
    ((37, 64), 4, 128),     # (2, 4, 16) tiles: the last one has a row past N
])
def test_group_norm_small_backward_eps0_padding(monkeypatch, tma, shape, groups, tile_values):
    """With eps = 0 the padded rows of a small-group tile (zeros: rstd = inf) must not
    reach the weight gradient as 0 * inf = nan (a review found they did)."""
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN", 2**30)
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN_BWD", 2**30)
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_TILE_BYTES", tile_values * 2)
    monkeypatch.setattr(gn_mod, "_SMALL_SLAB_VALUES", 8)
    monkeypatch.setattr(gn_mod, "_SMALL_BWD_PROGRAMS_CPU", 3)
    monkeypatch.setattr(gn_mod, "_TMA_BWD", tma)
    x, w, b = _inputs(shape, torch.bfloat16)
    grads = _check(x, groups, w, b, torch.bfloat16, ULPS[torch.bfloat16], eps=0.0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_group_norm_small_backward_tma_fallbacks(monkeypatch):
    """The small-group TMA tiles need 16-bit values, dy of x's dtype, groups of a
    power-of-two count of values (16 bytes or more) and 16-byte aligned tensors."""
    monkeypatch.setattr(gn_mod, "_TMA_BWD", True)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    assert gn_mod._small_tma_ok(x, x, 4, 16, 2, 4, 16)
    assert not gn_mod._small_tma_ok(x.float(), x.float(), 4, 16, 2, 4, 16)        # fp32
    assert not gn_mod._small_tma_ok(x, x.half(), 4, 16, 2, 4, 16)                 # dy of another dtype
    odd = torch.randn(6, 48, dtype=torch.bfloat16)
    assert not gn_mod._small_tma_ok(odd, odd, 4, 12, 2, 4, 16)                    # padded groups
    short = torch.randn(6, 16, dtype=torch.bfloat16)
    assert not gn_mod._small_tma_ok(short, short, 4, 4, 2, 4, 4)                  # 8-byte groups
    store = torch.empty(x.numel() + 8, dtype=torch.bfloat16)
    shifted = store[2: 2 + x.numel()].view(x.shape).copy_(x)                      # 4 bytes past 16
    assert not gn_mod._small_tma_ok(shifted, shifted, 4, 16, 2, 4, 16)
    monkeypatch.setattr(gn_mod, "_TMA_BWD", None)
    assert not gn_mod._small_tma_ok(x, x, 4, 16, 2, 4, 16)                        # not CUDA


@pytest.mark.parametrize("group_len,element_size,expected", [
    (128, 2, (1, 32, 128, 8)),      # forward: 4096 values under 8 warps
    (128, 4, (1, 32, 128, 8)),
    (64, 2, (2, 32, 64, 8)),
    (512, 2, (1, 8, 512, 8)),
])
def test_group_norm_small_tiles_forward(group_len, element_size, expected):
    assert gn_mod._small_tiles(8192, 32, group_len, element_size) == expected


@pytest.mark.parametrize("group_len,element_size,expected", [
    (128, 2, (2, 32, 128, 16)),     # 8192 bf16 values under 16 warps
    (128, 4, (1, 32, 128, 8)),      # fp32: the same bytes
    (256, 2, (1, 16, 256, 8)),      # 4096 values under 8 warps
    (2048, 2, (1, 2, 2048, 4)),     # 4096 values under 4 warps
])
def test_group_norm_small_tiles_backward(group_len, element_size, expected):
    assert gn_mod._small_tiles(8192, 32, group_len, element_size, backward=True) == expected


@pytest.mark.parametrize("samples_per_program", [1, 2, 3, 5])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_tile", [True, False])
def test_group_norm_backward_sample_chunks(monkeypatch, samples_per_program, param_dtype, one_tile):
    """The whole-group backward with each program taking a chunk of samples (1, 2, 3 or 5
    chunks of 5 samples): each chunk writes its parameter-gradient sums into a slot and the
    group's last program to finish adds the slots up in chunk order."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_SAMPLES_PER_PROGRAM", samples_per_program)
    monkeypatch.setattr(gn_mod, "_GROUP_BWD_ONE_TILE_ELEMS", 16384 if one_tile else 0)
    x, w, b = _inputs((5, 6, 7), torch.float32, param_dtype=param_dtype)
    ulps = {torch.float32: 64, torch.bfloat16: 2}[param_dtype]
    y, dy, grads = _run(x, 3, w, b)
    y64, grads64 = _torch64(x, 3, w, b, dy)
    assert_close_ulps(grads[0], grads64[0], torch.float32, 64)
    for g, g64 in zip(grads[1:], grads64[1:]):
        assert g.dtype == param_dtype
        assert_close_ulps(g, g64, param_dtype, ulps)
    _, _, again = _run(x, 3, w, b, dy=dy)
    assert all(torch.equal(g, h) for g, h in zip(grads, again))  # a fixed summation order
    for with_w, with_b in ((True, False), (False, True)):         # one parameter gradient only
        _check(x, 3, w.float() if with_w else None, b.float() if with_b else None, torch.float32, 64)


_SCRATCH_CASES = [  # 2 samples per program; n_scratch: samples of dx holding the slots
    ((5, 6, 9), 3, torch.float32, torch.float32, 1),     # 3 slots of 16 bytes in 72
    ((5, 6, 9), 3, torch.float32, torch.bfloat16, 1),
    ((3, 512, 8), 2, torch.bfloat16, torch.bfloat16, 1),  # 2 slots of 2048 bytes in 4096, exactly
    ((3, 6, 5, 7), 3, torch.bfloat16, torch.float32, 1),
    ((5, 12), 4, torch.float32, torch.bfloat16, 0),      # 12 bytes per group: no 24-byte slot fits
    ((5, 2, 17), 2, torch.bfloat16, torch.float32, 0),   # 34 bytes: not 4-byte aligned
    ((3, 4, 8), 2, torch.bfloat16, torch.bfloat16, 1),   # 32 bytes: 2 slots of 2 x 2 sums, exactly
    ((3, 4, 7), 2, torch.bfloat16, torch.bfloat16, 0),   # 28 bytes: one slot a sample, 2 > N // 2
    ((4, 4, 4), 2, torch.bfloat16, torch.float32, 2),    # 16 bytes: one slot in each of 2 samples
    ((4, 4, 2), 2, torch.float32, torch.float32, 2),
    ((5, 2, 18), 2, torch.bfloat16, torch.bfloat16, 1),  # 1 channel: 2-byte dweight, tickets apart
]


@pytest.mark.parametrize(
    "shape,groups,dtype,param_dtype,n_scratch,one_tile",
    # each sample's group as one register tile (fp32 values, or 16-bit ones as int32 words
    # when a channel's values are even in number) and in tiles
    [(*case, one) for case in _SCRATCH_CASES for one in (True, False)],
)
def test_group_norm_backward_scratch_in_dx(monkeypatch, shape, groups, dtype, param_dtype, n_scratch, one_tile):
    """The whole-group backward's per-chunk fp32 sums live in each group's values of dx's
    last samples when they fit (the group's last program to finish adds them up, then
    writes those samples' dx), else in a buffer: both give the float64 result, with the
    same bits."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_SAMPLES_PER_PROGRAM", 2)
    monkeypatch.setattr(gn_mod, "_GROUP_BWD_ONE_TILE_ELEMS", 16384 if one_tile else 0)
    monkeypatch.setattr(gn_mod, "_GROUP_BWD_TILE_ELEMS", 64)   # several tiles per group when not one
    used = []
    real = gn_mod._slot_plan

    def spy(*args):  # a wrong decision fails here, before a kernel could write past a group
        used.append(real(*args)[0])
        assert used[-1] == (n_scratch if gn_mod._SCRATCH_IN_DX else 0)
        return real(*args)

    monkeypatch.setattr(gn_mod, "_slot_plan", spy)
    x, w, b = _inputs(shape, dtype, param_dtype=param_dtype)
    y, dy, grads = _run(x, groups, w, b)
    assert used == [n_scratch]
    y64, grads64 = _torch64(x, groups, w, b, dy)
    assert_close_ulps(grads[0], grads64[0], dtype, ULPS[dtype])
    for g, g64 in zip(grads[1:], grads64[1:]):
        assert g.dtype == param_dtype
        assert_close_ulps(g, g64, param_dtype, ULPS[param_dtype])
    monkeypatch.setattr(gn_mod, "_SCRATCH_IN_DX", False)           # the buffers: same bits
    _, _, again = _run(x, groups, w, b, dy=dy)
    assert used == [n_scratch, 0]
    assert all(torch.equal(g, h) for g, h in zip(grads, again))
    monkeypatch.setattr(gn_mod, "_slot_plan", real)
    monkeypatch.setattr(gn_mod, "_SCRATCH_IN_DX", True)
    _check(x, groups, w.to(dtype), None, dtype, ULPS[dtype])        # dweight or dbias only
    _check(x, groups, None, b.to(dtype), dtype, ULPS[dtype])


@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_dx", [True, False])
def test_group_norm_backward_counters_start_at_zero(monkeypatch, param_dtype, in_dx):
    """The arrival counters live in the parameter-gradient output, which torch.empty hands
    out with old contents: they must be zeroed for every output dtype (float64 included),
    else no chunk is seen as the last and the gradients are never written. New memory is
    poisoned here so that a counter left as it came fails."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_SAMPLES_PER_PROGRAM", 2)             # 3 chunks of 5 samples
    monkeypatch.setattr(gn_mod, "_SCRATCH_IN_DX", in_dx)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype == torch.bool:
            return t
        return t.fill_(1.1 if t.is_floating_point() else 7)   # no zero bytes in any 4 of them

    x, w, b = _inputs((5, 6, 9), torch.float32, param_dtype=param_dtype)
    dy = torch.randn_like(x)
    y, mean = gn_mod.ops.group_norm(x, 3, w, b, 1e-5)
    monkeypatch.setattr(torch, "empty", poisoned)
    dx, params = gn_mod.ops.group_norm_backward(dy, x, 3, w, mean, 1e-5, True, True, param_dtype)
    monkeypatch.setattr(torch, "empty", real_empty)
    y64, grads64 = _torch64(x, 3, w, b, dy)
    assert params.dtype == param_dtype
    assert_close_ulps(dx, grads64[0], torch.float32, 64)
    ulps = {torch.float64: 2**29, torch.float32: 64, torch.bfloat16: 2}[param_dtype]  # sums in fp32
    assert_close_ulps(params[0], grads64[1], param_dtype, ulps)
    assert_close_ulps(params[1], grads64[2], param_dtype, ulps)


_WORDS_CASES = [  # (shape, groups): an even number of values per channel
    ((5, 6, 8), 3),
    ((5, 4, 3, 6), 2),     # spatial dims
    ((7, 3, 10), 3),       # one channel per group
    ((5, 10, 6), 2),       # 5 channels a group: a padded tile
]


@pytest.mark.parametrize("shape,groups", _WORDS_CASES)
@pytest.mark.parametrize("dtype,param_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("samples_per_program,prefetch", [(1, True), (3, True), (2, False)])
def test_group_norm_backward_words(monkeypatch, shape, groups, dtype, param_dtype, samples_per_program, prefetch):
    """16-bit inputs with each sample's group as one tile of int32 words (two values each),
    the next sample's words loaded before this one's sums (prefetch), in chunks of 1 to 5
    samples: the float64 gradients, deterministically; and the same as the tiled kernel's
    to within one rounding of dx."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_SAMPLES_PER_PROGRAM", samples_per_program)
    monkeypatch.setattr(gn_mod, "_WORDS_PREFETCH", prefetch)
    _check_16bit_path(monkeypatch, shape, groups, dtype, param_dtype, "_WORDS_ONE_TILE", 4)


def _check_16bit_path(monkeypatch, shape, groups, dtype, param_dtype, flag, plan_item):
    """The checks shared by the 16-bit one-tile backwards (module flag ``flag`` on, taken as
    item ``plan_item`` of _group_bwd_plan): the float64 gradients, deterministically; dx
    within one rounding of the path taken with ``flag`` off; one parameter gradient alone."""
    x, w, b = _inputs(shape, dtype, param_dtype=param_dtype)
    assert gn_mod._group_bwd_plan(x, x, groups)[plan_item]
    y, dy, grads = _run(x, groups, w, b)
    y64, grads64 = _torch64(x, groups, w, b, dy)
    for g, g64, t in zip(grads, grads64, (dtype, param_dtype, param_dtype)):
        assert g.dtype == t
        assert_close_ulps(g, g64, t, ULPS[t])
    _, _, again = _run(x, groups, w, b, dy=dy)
    assert all(torch.equal(g, h) for g, h in zip(grads, again))       # a fixed summation order
    monkeypatch.setattr(gn_mod, flag, False)
    assert not gn_mod._group_bwd_plan(x, x, groups)[plan_item]
    _, _, other = _run(x, groups, w, b, dy=dy)
    assert_close_ulps(grads[0], other[0], dtype, 1)
    monkeypatch.setattr(gn_mod, flag, True)
    _check(x, groups, w.to(dtype), None, dtype, ULPS[dtype])        # dweight or dbias only
    _check(x, groups, None, b.to(dtype), dtype, ULPS[dtype])


_TMA_CASES = [  # (shape, groups): each sample's group a power-of-two (Cg, S) box, rows of S >= 8 16-bit values
    ((6, 8, 16), 2),       # (4, 16) boxes
    ((5, 16, 8), 4),       # (4, 8)
    ((7, 4, 4, 4), 1),     # spatial dims: (4, 16)
]


@pytest.mark.parametrize("shape,groups", _TMA_CASES)
@pytest.mark.parametrize("dtype,param_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("samples_per_program", [1, 3])
def test_group_norm_backward_tma(monkeypatch, shape, groups, dtype, param_dtype, samples_per_program):
    """16-bit groups loaded as TMA boxes (the Hopper path, here under the interpreter,
    tiles shrunk to the test's sizes), in chunks of 1 or 3 samples (the chunks' sums in dx's
    last samples, whose dx the group's last program writes): the float64 gradients,
    deterministically, and the words kernel's dx to within one rounding."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_TMA_BWD", True)
    monkeypatch.setattr(gn_mod, "_TMA_MIN_TILE_ELEMS", 32)
    monkeypatch.setattr(gn_mod, "_SAMPLES_PER_PROGRAM", samples_per_program)
    x = _inputs(shape, dtype)[0]
    plan = gn_mod._group_bwd_plan(x, x, groups)
    assert plan[6] and not plan[4] and plan[5] == samples_per_program        # tma, not words
    _check_16bit_path(monkeypatch, shape, groups, dtype, param_dtype, "_TMA_BWD", 6)  # against the words


@pytest.mark.parametrize("shape,groups,samples_per_program", [
    ((6, 8, 16), 2, 3),      # 2 chunks a group, 2 slots a sample's group: the slots in the last sample
    ((7, 4, 4, 4), 1, 2),    # 4 chunks, the last one of a single sample; one group
    ((9, 16, 16), 4, 4),     # 3 chunks, the last one shorter
])
@pytest.mark.parametrize("params", ["both", "weight", "bias"])
def test_group_norm_backward_tma_hold_last(monkeypatch, shape, groups, samples_per_program, params):
    """The TMA backward's HOLD_LAST form (each group's last chunk waits for the other
    chunks, adds up their sums and writes its last sample's dx from registers) gives the
    bits of the form where the last chunk to arrive reads that sample again, and the
    float64 gradients; it is what runs when the chunks' sums fill one sample."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_TMA_BWD", True)
    monkeypatch.setattr(gn_mod, "_TMA_MIN_TILE_ELEMS", 32)
    monkeypatch.setattr(gn_mod, "_SAMPLES_PER_PROGRAM", samples_per_program)
    spy = _RecordLaunches(gn_mod._gn_group_bwd_kernel)
    monkeypatch.setattr(gn_mod, "_gn_group_bwd_kernel", spy)
    x, w, b = _inputs(shape, torch.bfloat16)
    w = None if params == "bias" else w
    b = None if params == "weight" else b
    y, dy, held = _run(x, groups, w, b)
    assert spy.launches[-1][1]["HOLD_LAST"] and spy.launches[-1][1]["TMA"]
    y64, grads64 = _torch64(x, groups, w, b, dy)
    for g, g64 in zip(held, grads64):
        if g64 is not None:
            assert_close_ulps(g, g64, torch.bfloat16, ULPS[torch.bfloat16])
    monkeypatch.setattr(gn_mod, "_HOLD_LAST", False)
    _, _, reread = _run(x, groups, w, b, dy=dy)
    assert not spy.launches[-1][1]["HOLD_LAST"]
    for g, h in zip(held, reread):
        assert (g is None and h is None) or torch.equal(g, h)


@pytest.mark.parametrize("shape,groups", _TMA_CASES + [((6, 32, 4), 4)])   # fp32: (8, 4) boxes of 16-byte rows
@pytest.mark.parametrize("samples_per_program", [1, 3])
def test_group_norm_backward_tma_fp32(monkeypatch, shape, groups, samples_per_program):
    """fp32 groups loaded as TMA boxes: the float64 gradients, deterministically, and the
    tiled kernel's within a few fp32 roundings."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_TMA_BWD", True)
    monkeypatch.setattr(gn_mod, "_TMA_MIN_TILE_ELEMS", 32)
    monkeypatch.setattr(gn_mod, "_SAMPLES_PER_PROGRAM", samples_per_program)
    x, w, b = _inputs(shape, torch.float32)
    assert gn_mod._group_bwd_plan(x, x, groups)[6]
    _, dy, grads = _run(x, groups, w, b)
    _, grads64 = _torch64(x, groups, w, b, dy)
    for g, g64 in zip(grads, grads64):
        assert_close_ulps(g, g64, torch.float32, ULPS[torch.float32])
    _, _, again = _run(x, groups, w, b, dy=dy)
    assert all(torch.equal(g, h) for g, h in zip(grads, again))
    monkeypatch.setattr(gn_mod, "_TMA_BWD", False)
    assert not gn_mod._group_bwd_plan(x, x, groups)[6]
    _, _, tiles = _run(x, groups, w, b, dy=dy)
    for g, h in zip(grads, tiles):
        assert_close_ulps(g, h, torch.float32, ULPS[torch.float32])


def test_group_norm_tma_box_fits_shared_memory(monkeypatch):
    """A group takes TMA boxes only when its three pipeline stages (two slots per operand
    and the dx store's box) fit in _TMA_SHARED_BYTES: (128, 128) bf16 boxes (160 KB) and
    (64, 128) fp32 boxes (160 KB) do, (128, 128) fp32 boxes (320 KB) keep the tiles."""
    monkeypatch.setattr(gn_mod, "_TMA_BWD", True)
    for (channels, dtype), fits in {(4096, torch.bfloat16): True, (2048, torch.float32): True,
                                    (4096, torch.float32): False}.items():
        x = torch.empty(1, channels, 128, dtype=dtype)
        assert gn_mod._tma_bwd_ok(x, x, 32, 128) == fits


def test_group_norm_backward_tma_fallbacks(monkeypatch):
    """The TMA boxes need 16-bit or fp32 values, dy of x's dtype, power-of-two sides (Cg <= 256,
    S <= 256, rows of S values 16 bytes or more), 16-byte aligned tensors and a box within the
    tile bounds; else the words or tiles run. Never chosen off the GPU unless forced."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_TMA_MIN_TILE_ELEMS", 32)
    x = torch.randn(6, 8, 16, dtype=torch.bfloat16)
    assert not gn_mod._group_bwd_plan(x, x, 2)[6]                            # not forced, not CUDA
    monkeypatch.setattr(gn_mod, "_TMA_BWD", True)
    assert gn_mod._group_bwd_plan(x, x, 2)[6]
    assert gn_mod._group_bwd_plan(x.float(), x.float(), 2)[6]                # fp32 too
    assert not gn_mod._group_bwd_plan(x.double(), x.double(), 2)[6]          # not fp64
    assert not gn_mod._group_bwd_plan(x, x.half(), 2)[6]                     # dy of another dtype
    odd = torch.randn(6, 8, 12, dtype=torch.bfloat16)                        # S = 12
    assert not gn_mod._group_bwd_plan(odd, odd, 2)[6]
    narrow = torch.randn(6, 16, 4, dtype=torch.bfloat16)                     # S = 4: 8-byte rows
    assert not gn_mod._group_bwd_plan(narrow, narrow, 2)[6]
    store = torch.empty(x.numel() + 8, dtype=torch.bfloat16)
    shifted = store[2: 2 + x.numel()].view(x.shape).copy_(x)                 # 4 bytes past 16
    assert shifted.data_ptr() % 16 != 0 and not gn_mod._group_bwd_plan(shifted, shifted, 2)[6]
    monkeypatch.setattr(gn_mod, "_TMA_MAX_TILE_ELEMS", 32)                   # a (4, 16) box: too big
    assert not gn_mod._group_bwd_plan(x, x, 2)[6]
    _check(shifted, 2, *(t.to(torch.bfloat16) for t in _inputs((6, 8, 16), torch.bfloat16)[1:]),
           torch.bfloat16, ULPS[torch.bfloat16])


def test_group_norm_backward_words_fallbacks(monkeypatch):
    """The words kernel needs an even number of values per channel, 4-byte aligned dy and
    x, and at most _WORDS_MAX_ROW words a channel; otherwise the tiles run, and the result
    is right either way."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    x, w, b = _inputs((5, 6, 8), torch.bfloat16)
    assert gn_mod._group_bwd_plan(x, x, 3)[4]
    odd = x[..., :7].contiguous()
    assert not gn_mod._group_bwd_plan(odd, odd, 3)[4]
    _check(odd, 3, w, b, torch.bfloat16, 2)
    # one element past an aligned start: x and dy contiguous but 2 bytes off a 4-byte boundary
    store = torch.empty(x.numel() + 1, dtype=x.dtype)
    shifted = store[1:].view(x.shape).copy_(x)
    assert shifted.is_contiguous() and shifted.data_ptr() % 4 == 2
    assert not gn_mod._group_bwd_plan(shifted, shifted, 3)[4]
    dy = torch.randn(x.shape).to(x.dtype)
    y, mean = gn_mod.ops.group_norm(x, 3, w, b, 1e-5)
    dx, params = gn_mod.ops.group_norm_backward(dy, shifted, 3, w, mean, 1e-5, True, True, torch.bfloat16)
    y64, grads64 = _torch64(x, 3, w, b, dy)
    assert_close_ulps(dx, grads64[0], torch.bfloat16, 2)
    assert_close_ulps(params[0], grads64[1], torch.bfloat16, 2)
    monkeypatch.setattr(gn_mod, "_WORDS_MAX_ROW", 2)                   # 4 words a channel: too long
    assert not gn_mod._group_bwd_plan(x, x, 3)[4]
    _check(x, 3, w, b, torch.bfloat16, 2)


def test_group_norm_backward_words_needs_dy_of_x_dtype(monkeypatch):
    """The backward op called with dy in another dtype than x (fp32 dy for bf16 x) runs the
    tiles, which convert what they load: the words kernel would read dy's bytes as x's
    dtype."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    x, w, b = _inputs((4, 6, 8), torch.bfloat16)
    y, mean = gn_mod.ops.group_norm(x, 3, w, b, 1e-5)
    for dy in (torch.randn(x.shape), torch.randn(x.shape).to(torch.float16)):
        assert not gn_mod._group_bwd_plan(x, dy, 3)[4]
        dx, params = gn_mod.ops.group_norm_backward(dy, x, 3, w, mean, 1e-5, True, True, torch.bfloat16)
        y64, grads64 = _torch64(x, 3, w, b, dy)
        assert_close_ulps(dx, grads64[0], torch.bfloat16, 2)
        assert_close_ulps(params[0], grads64[1], torch.bfloat16, 2)
        assert_close_ulps(params[1], grads64[2], torch.bfloat16, 2)


@pytest.mark.parametrize("n,groups,warps,expected", [
    (32, 32, 16, 8),      # 128 programs on 132 SMs, one wave (measured: 36.0 us against 40.8 with 4)
    (64, 32, 16, 16),     # the benchmark at 8192 tokens (63.5 us against 68.1 with 8, 108.3 with 32)
    (128, 32, 16, 32),
    (256, 32, 16, 32),    # capped at 32 (229.0 us against 239.7 for 64, the uncapped choice)
    (64, 64, 8, 16),      # 8-warp tiles: two programs per SM
    (64, 24, 8, 6),       # 264 programs, exactly one wave of two per SM
    (8, 32, 16, 2),       # too short to pipeline: the tiles run (GPU)
    (1000, 32, 16, 31),   # 33 chunks a group: 1056 programs, 8 waves of 32 sample times
    (8192, 32, 16, 128),  # 64 chunks a group at most: longer than the cap
])
def test_group_norm_words_chunk_samples(n, groups, warps, expected):
    spp = gn_mod.words_chunk_samples(n, groups, 132, warps)
    assert spp == expected
    assert gn_mod.cdiv(n, spp) <= gn_mod._MAX_CHUNKS


@pytest.mark.parametrize("n,groups,expected,expected_one_tile", [
    (64, 32, 2, 4),       # the benchmark at 8192 tokens: 2 samples, 32 chunks per group
    (32, 32, 2, 4),
    (4, 32, 1, 1),        # too few (sample, group) pairs for 2 per program
    (8192, 32, 128, 128),  # (8192, C) inputs: capped at 64 chunks (slots) per group
    (1000, 1, 16, 16),
])
def test_group_norm_chunk_samples(n, groups, expected, expected_one_tile):
    assert gn_mod.chunk_samples(n, groups, 132) == expected
    assert gn_mod.chunk_samples(n, groups, 132, one_tile=True) == expected_one_tile  # one program per SM
    assert gn_mod.cdiv(n, expected) <= gn_mod._MAX_CHUNKS


def test_group_norm_backward_wide_groups_split(monkeypatch):
    """Groups with more channels than the whole-group backward holds in one tile take the
    split kernels in the backward (the forward stays whole-group)."""
    monkeypatch.setattr(gn_mod, "_WHOLE_GROUP_PROGRAMS_CPU", 0)
    monkeypatch.setattr(gn_mod, "_MAX_GROUP_CHANNELS", 2)
    x, w, b = _inputs((3, 8, 5), torch.float32)
    assert gn_mod._whole_groups(x, 2) and not gn_mod._whole_groups(x, 2, backward=True)
    _check(x, 2, w, b, torch.float32, 64)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_group_norm_non_contiguous(path, kernels, layout):
    if layout == "channels_last":
        x = (3 * torch.randn(2, 6, 5, 7) + 1).to(memory_format=torch.channels_last)
    else:
        x = (3 * torch.randn(2, 6, 5, 11) + 1)[..., 2:9]
    assert not x.is_contiguous()
    w = torch.randn(12)[::2] + 1.0   # strided weight
    b = torch.randn(6)
    x0 = x.clone()
    dy = torch.randn(x.shape).to(memory_format=torch.channels_last)
    y, _, grads = _run(x, 3, w, b, dy=dy)
    y64, grads64 = _torch64(x, 3, w, b, dy)
    assert_close_ulps(y, y64, torch.float32, 64)
    for g, g64 in zip(grads, grads64):
        assert_close_ulps(g, g64, torch.float32, 64)
    assert torch.equal(x, x0)


def test_group_norm_mixed_param_dtype(path, kernels):
    """bf16 activations with fp32 weight / bias: output bf16, parameter gradients fp32."""
    x, w, b = _inputs((2, 6, 5, 7), torch.bfloat16, param_dtype=torch.float32)
    y, dy, grads = _run(x, 3, w, b)
    y64, grads64 = _torch64(x, 3, w, b, dy)
    assert y.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    assert_close_ulps(y, y64, torch.bfloat16, 2)
    assert_close_ulps(grads[0], grads64[0], torch.bfloat16, 2)
    for g, g64 in zip(grads[1:], grads64[1:]):
        assert_close_ulps(g, g64, torch.float32, 64)


def test_group_norm_partial_requires_grad(path, kernels):
    x, w, b = _inputs((2, 6, 5), torch.float32)
    xr = x.clone().requires_grad_()
    y = group_norm(xr, 2, w, b)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (xr,), dy)
    _, grads64 = _torch64(x, 2, w, b, dy)
    assert_close_ulps(dx, grads64[0], torch.float32, 64)
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    dw, db = torch.autograd.grad(group_norm(x, 2, wr, br), (wr, br), dy)
    assert_close_ulps(dw, grads64[1], torch.float32, 64)
    assert_close_ulps(db, grads64[2], torch.float32, 64)


def test_group_norm_empty_and_errors():
    w = torch.ones(6)
    assert group_norm(torch.empty(0, 6, 4), 3, w, w).shape == (0, 6, 4)
    xe = torch.empty(0, 6, 4, requires_grad=True)
    we = w.clone().requires_grad_()
    group_norm(xe, 2, we).sum().backward()
    assert xe.grad.shape == xe.shape and torch.equal(we.grad, torch.zeros(6))
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(torch.randn(2, 6, 4), 4)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(torch.randn(2, 6, 4), 0)
    with pytest.raises(ValueError, match=r"\(N, C, \*\)"):
        group_norm(torch.randn(6), 3)
    with pytest.raises(ValueError, match="weight must have shape"):
        group_norm(torch.randn(2, 6, 4), 3, torch.ones(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        group_norm(torch.randn(2, 6, 4), 3, w, torch.ones(6, 1))
    with pytest.raises(ValueError, match="floating-point"):
        group_norm(torch.ones(2, 6, 4, dtype=torch.int64), 3)
    for bad in (True, 3.0, torch.tensor([3])):  # True used to run as one group
        with pytest.raises(ValueError, match="num_groups"):
            group_norm(torch.randn(2, 6, 4), bad)
    x = torch.randn(2, 6, 4)
    for same in (np.int64(3), torch.tensor(3)):  # numpy / 0-d tensor ints, as nn.GroupNorm takes them
        assert torch.equal(group_norm(x, same, w), group_norm(x, 3, w))
        assert torch.equal(group_norm_reference(x, same, w), group_norm_reference(x, 3, w))



def test_group_norm_huge_planes_route_to_reference():
    """Planes of 2^30 values or more per (sample, channel) exceed the split kernels' int32
    column arithmetic and run the torch reference (checked on expanded tensors: no memory)."""
    assert gn_mod._plane_fits(torch.zeros(2, 3, 1).expand(2, 3, 2**30 - 1))
    assert not gn_mod._plane_fits(torch.zeros(2, 3, 1).expand(2, 3, 2**30))
    assert not gn_mod._plane_fits(torch.zeros(1, 1, 1, 1).expand(1, 1, 2**15, 2**15))
    assert gn_mod._plane_fits(torch.zeros(0, 3, 5))


@pytest.mark.parametrize("small", [False, True])
def test_group_norm_opcheck_and_compile(monkeypatch, small):
    """The custom ops' schema, fake tensors and autograd registration (opcheck), and
    torch.compile(fullgraph=True) over them, on the whole-group and the small-group kernels."""
    from torch.library import opcheck

    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN", 2**30 if small else 0)
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN_BWD", 2**30 if small else 0)

    x = torch.randn(2, 6, 3, 5, requires_grad=True)
    w = torch.randn(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    opcheck(torch.ops.ligerzoo.group_norm, (x, 3, w, b, 1e-5))
    opcheck(torch.ops.ligerzoo.group_norm, (x, 2, None, None, 1e-5))
    _, mean = torch.ops.ligerzoo.group_norm(x.detach(), 3, w.detach(), b.detach(), 1e-5)
    dy = torch.randn(2, 6, 3, 5)
    opcheck(torch.ops.ligerzoo.group_norm_backward,
            (dy, x.detach(), 3, w.detach(), mean, 1e-5, True, True, torch.float32))
    opcheck(torch.ops.ligerzoo.group_norm_backward, (dy, x.detach(), 3, None, mean, 1e-5, False, False, torch.float32))

    g = torch.randn(2, 6, 3, 5)

    def f(x, w, b):
        return (group_norm(x, 3, w, b) * g).sum() + group_norm(x * 2, 6).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    want = torch.autograd.grad(f(x, w, b), (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------- GPU
@parametrize_dtype
@pytest.mark.parametrize(
    "shape,groups",
    [((32, 256, 64, 64), 32), ((1, 128, 256, 256), 32), ((8192, 4096), 32), ((4, 320, 7, 9, 11), 8),
     ((2048, 320, 3), 32), ((256, 1024, 8), 8)],
    # small groups: (8192, 4096) and (2048, 320, 3) of 128 and 30 (10 x 3) values; (256, 1024, 8)
    # of 1024, the whole-group forward and the small-group backward
)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_group_norm(dtype, shape, groups):
    torch.manual_seed(0)
    x, w, b = (t.cuda() for t in _inputs(shape, dtype))
    y, dy, grads = _run(x, groups, w, b)
    y64, grads64 = _torch64(x, groups, w, b, dy)
    ulps = {torch.float32: 64, torch.bfloat16: 2}[dtype]
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(grads[0], grads64[0], dtype, ulps)
    for g, g64 in zip(grads[1:], grads64[1:]):  # sums over N * spatial values
        assert_close_ulps(g, g64, dtype, 4 * ulps if dtype == torch.float32 else ulps)
    _, _, again = _run(x, groups, w, b, dy=dy)  # the chunks add in a fixed order: same bits
    assert all(torch.equal(g, h) for g, h in zip(grads, again))


def _gpu_grads_checked(x, groups, w, b, dtype):
    """Our forward + backward against float64, and again for the same bits (a fixed
    summation order) -> (dy, our gradients, float64 gradients)."""
    y, dy, grads = _run(x, groups, w, b)
    y64, grads64 = _torch64(x, groups, w, b, dy)
    for g, g64 in zip(grads, grads64):
        if g64 is not None:
            assert_close_ulps(g, g64, dtype, ULPS[dtype])
    _, _, again = _run(x, groups, w, b, dy=dy)
    assert all(g is None or torch.equal(g, h) for g, h in zip(grads, again))
    return dy, grads, grads64


def _misaligned_copies(x, dy):
    """Copies of x and dy that start 4 bytes past a 16-byte boundary (4-byte aligned)."""
    store = torch.empty(2 * (x.numel() + 2), dtype=x.dtype, device=x.device)
    return store[2: 2 + x.numel()].view(x.shape).copy_(x), store[x.numel() + 4:].view(x.shape).copy_(dy)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,groups,dtype", [
    ((64, 4096, 128), 32, torch.float16),
    ((64, 320, 256), 32, torch.bfloat16),     # 10 channels a group: a padded 16-channel tile
    ((1024, 4096, 2), 2, torch.bfloat16),     # 2 values a channel: one word a channel
    ((48, 2048, 256), 32, torch.bfloat16),    # 128 words a channel, the most
])
@pytest.mark.parametrize("params", ["both", "weight", "bias"])
def test_gpu_group_norm_backward_words(monkeypatch, shape, groups, dtype, params):
    """The 16-bit whole-group backward in int32 words on the GPU (fp16, padded tiles, one
    word a channel, the widest rows; one parameter gradient or both), against float64 and
    deterministic; then on x and dy that start 4 bytes past a 16-byte boundary. (The TMA
    path, which Hopper takes for some of these shapes, is switched off.)"""
    monkeypatch.setattr(gn_mod, "_TMA_BWD", False)
    torch.manual_seed(0)
    x, w, b = (t.cuda() for t in _inputs(shape, dtype))
    w = None if params == "bias" else w
    b = None if params == "weight" else b
    assert gn_mod._whole_groups(x, groups, backward=True) and not gn_mod._small_groups(x, groups, backward=True)
    plan = gn_mod._group_bwd_plan(x, x, groups)
    assert plan[4] and plan[5] >= gn_mod._WORDS_MIN_SAMPLES                # words, chunks
    dy, grads, grads64 = _gpu_grads_checked(x, groups, w, b, dtype)
    xs, dys = _misaligned_copies(x, dy)
    assert xs.data_ptr() % 16 == 4 and dys.data_ptr() % 4 == 0 and gn_mod._group_bwd_plan(xs, dys, groups)[4]
    _, mean = gn_mod.ops.group_norm(x, groups, w, b, 1e-5)
    dx, _ = gn_mod.ops.group_norm_backward(dys, xs, groups, w, mean, 1e-5, False, False, dtype)
    assert_close_ulps(dx, grads64[0], dtype, ULPS[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None
                    or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs an NVIDIA Hopper GPU (compute capability 9.x): the TMA path's only target")
@pytest.mark.parametrize("shape,groups,dtype", [
    ((64, 4096, 128), 32, torch.bfloat16),    # the benchmark's 8192 tokens: (128, 128) boxes, 16 chunks
    ((64, 4096, 128), 32, torch.float16),
    ((48, 2048, 256), 32, torch.bfloat16),    # (64, 256) boxes
    ((64, 2048, 128), 32, torch.bfloat16),    # (64, 128) boxes: 8192 values, 8 warps
    ((64, 2048, 128), 32, torch.float32),     # fp32 (64, 128) boxes: three stages fit (160 KB)
    ((256, 4096, 128), 32, torch.bfloat16),   # chunks of 32 samples
    ((6, 4096, 128), 32, torch.bfloat16),     # too few (sample, group) pairs: the split kernels, no TMA
])
@pytest.mark.parametrize("params", ["both", "weight", "bias"])
def test_gpu_group_norm_backward_tma(monkeypatch, shape, groups, dtype, params):
    """The Hopper path of the 16-bit whole-group backward (each sample's group a TMA box,
    the next samples' copies in flight): against float64, deterministic, the words kernel's
    dx to within one rounding; x and dy 4 bytes past a 16-byte boundary take the words."""
    torch.manual_seed(0)
    x, w, b = (t.cuda() for t in _inputs(shape, dtype))
    w = None if params == "bias" else w
    b = None if params == "weight" else b
    plan = gn_mod._group_bwd_plan(x, x, groups)
    assert plan[6] == (shape[0] >= 8)                                       # tma (else too few samples)
    dy, grads, grads64 = _gpu_grads_checked(x, groups, w, b, dtype)
    monkeypatch.setattr(gn_mod, "_TMA_BWD", False)
    _, _, words = _run(x, groups, w, b, dy=dy)                              # (fp32: the tiles)
    assert_close_ulps(grads[0], words[0], dtype, ULPS[dtype] if dtype == torch.float32 else 1)
    monkeypatch.setattr(gn_mod, "_TMA_BWD", None)
    xs, dys = _misaligned_copies(x, dy)
    assert not gn_mod._group_bwd_plan(xs, dys, groups)[6]
    _, mean = gn_mod.ops.group_norm(x, groups, w, b, 1e-5)
    dx, _ = gn_mod.ops.group_norm_backward(dys, xs, groups, w, mean, 1e-5, False, False, dtype)
    assert_close_ulps(dx, grads64[0], dtype, ULPS[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,groups,extra", [
    ((64, 4096, 128), 32, 0),                  # the benchmark's 8192 tokens: scratch in dx
    # 4 bytes per group: the fp32 slots in a buffer (32 groups x 60 chunks x 2 x 2 sums)
    ((300, 64, 1), 32, 32 * 60 * 2 * 2 * 4),
])
def test_gpu_group_norm_backward_memory(monkeypatch, shape, groups, extra):
    """The whole-group backward allocates dx and the (2, C) parameter gradients, and nothing
    else where each group's values hold its scratch; the forward keeps only the fp32 mean."""
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN", 0)  # (300, 64, 1) has small groups
    monkeypatch.setattr(gn_mod, "_SMALL_GROUP_MAX_LEN_BWD", 0)
    torch.manual_seed(0)
    x, w, b = (t.cuda() for t in _inputs(shape, torch.bfloat16))
    dy = torch.randn_like(x)
    rounded = lambda t: -(-t.numel() * t.element_size() // 512) * 512  # the caching allocator's blocks
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y, mean = gn_mod.ops.group_norm(x, groups, w, b, 1e-5)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before == rounded(y) + rounded(mean)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dx, params = gn_mod.ops.group_norm_backward(dy, x, groups, w, mean, 1e-5, True, True, torch.bfloat16)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before == rounded(dx) + rounded(params) + extra
    y64, grads64 = _torch64(x, groups, w, b, dy)
    assert_close_ulps(dx, grads64[0], torch.bfloat16, 2)
    assert_close_ulps(params[0], grads64[1], torch.bfloat16, 2)
    assert_close_ulps(params[1], grads64[2], torch.bfloat16, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,groups,dtype", [
    ((8192, 4096), 32, torch.bfloat16),      # the benchmark's group_norm_2d: 128 values per group
    ((3000, 320), 32, torch.float32),        # 10 values per group, fp32
    ((4096, 512, 2), 64, torch.bfloat16),    # spatial dims: one more (2, C * S) fp32 sum
    ((3000, 321), 3, torch.bfloat16),        # 642-byte samples: slabs of an even sample count
])
def test_gpu_group_norm_small_groups_memory(shape, groups, dtype):
    """The small-group forward keeps no statistics (it allocates y alone) and the backward
    keeps its partial sums in dx's first samples: it allocates dx and the parameter
    gradients (and, with spatial dims, their fp32 per-value sums)."""
    torch.manual_seed(0)
    x, w, b = (t.cuda() for t in _inputs(shape, dtype))
    dy = torch.randn_like(x)
    assert gn_mod._small_groups(x, groups)
    rounded = lambda n: -(-n // 512) * 512  # the caching allocator's blocks
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y, mean = gn_mod.ops.group_norm(x, groups, w, b, 1e-5)
    torch.cuda.synchronize()
    assert mean.shape == (shape[0], 0)
    assert torch.cuda.max_memory_allocated() - before == rounded(y.numel() * y.element_size())
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dx, params = gn_mod.ops.group_norm_backward(dy, x, groups, w, mean, 1e-5, True, True, dtype)
    torch.cuda.synchronize()
    expected = rounded(dx.numel() * dx.element_size()) + rounded(params.numel() * params.element_size())
    if x.dim() == 2:
        assert torch.cuda.max_memory_allocated() - before == expected
    else:  # the (2, C * S) fp32 sums, then their (2, C) sums over S
        sums = rounded(2 * x[0].numel() * 4) + rounded(2 * shape[1] * 4)
        assert torch.cuda.max_memory_allocated() - before <= expected + sums
    y64, grads64 = _torch64(x, groups, w, b, dy)
    ulps = {torch.float32: 64, torch.bfloat16: 2}[dtype]
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(dx, grads64[0], dtype, ulps)
    assert_close_ulps(params[0], grads64[1], dtype, 4 * ulps if dtype == torch.float32 else ulps)
    assert_close_ulps(params[1], grads64[2], dtype, 4 * ulps if dtype == torch.float32 else ulps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_group_norm_compile():
    x = torch.randn(8, 256, 32, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(x, w, b):
        return (group_norm(x, 32, w, b) * x).float().sum()

    compiled = torch.compile(f, fullgraph=True)
    gc = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    ge = torch.autograd.grad(f(x, w, b), (x, w, b))
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)
