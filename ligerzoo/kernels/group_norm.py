"""Group normalisation.

Math (Wu & He, "Group Normalization", 2018; ``torch.nn.functional.group_norm``): ``x`` is
(N, C, *spatial) with ``S = prod(spatial)`` (1 without spatial dims), its C channels
split into G groups of ``Cg = C / G`` consecutive channels; each (sample, group) holds
``L = Cg * S`` values and is normalised on its own, then each channel gets its affine::

    mean, var = mean / biased variance of the L values of (n, g)   # fp32
    rstd      = 1 / sqrt(var + eps)
    y[n, c]   = (x[n, c] - mean[n, g]) * rstd[n, g] * weight[c] + bias[c]

Gradients, with ``xhat = (x - mean) * rstd``, ``g = dy * weight[c]`` and sums over the
L values of each (n, g)::

    dx      = rstd * (g - (sum(g) + xhat * sum(g * xhat)) / L)
    dweight = sum over n and spatial of dy * xhat
    dbias   = sum over n and spatial of dy

Only the fp32 mean is kept for the backward, which recomputes the variance (the sum of
squared deviations from that mean, in the pass that reads ``x`` anyway): 4 bytes per
(sample, group), as Liger Kernel's 16-bit mean and rstd, with fp32 accuracy. After the
small-group forward (below) not even that: its backward recomputes the mean too.

Layout of the computation. Small groups (``Cg * S`` at most 512 values forward, 2048
backward, padded to a power of two; a (tokens, C) input with 32 groups has 128): a
program takes (samples x groups) tiles, each group a row of the tile held in registers
and read once, like a layer norm over rows of ``Cg * S`` values with a per-channel
affine; the forward keeps no statistics. The backward's programs (one or two per SM)
each own a block of samples (on Hopper its tiles arrive by TMA, the next ones' copies in
flight) and write their fp32 sums of ``dy * xhat`` and ``dy`` per
value of a sample (C * S; 4 MiB in all for a (tokens, 4096) input on an H200's 132 SMs)
into slabs of dx (the last samples of the first programs' blocks, just read, or else dx's
first samples), whose dx they do not write; a finishing kernel then
sums each slab over the programs in a fixed order (deterministic) and writes the dx of
that slab's samples, which no other program reads. So nothing but dx and the parameter
gradients is allocated (an fp32 buffer takes the sums instead when the slabs would fill
more than half of the samples; with spatial dims, the finishing kernel writes fp32 sums
per value, (P, C * S), whose sums over each channel's S values are taken after). Else, when there are at least two (sample, group) pairs per SM
(the usual case in training), one program per pair does the whole group, reading its
``Cg x S`` values in tiles (from L2 after the first pass): forward, the mean, then the
variance of the deviations (two passes, no cancellation), then ``y`` (a group of up to
16384 values is one tile held in registers, read once); backward (one
program per chunk of samples of a group), per channel ``A = sum(dy * (x - mean))``,
``B = sum(dy)`` and the squared deviations (so rstd; then ``A *= rstd``), then ``dx``
(from L2; a sample's group of up to 16384 values is one tile of registers, read once:
fp32 values as they are, 16-bit ones as int32 words of two values, unpacked to fp32 for
the sums and again for dx, with the next sample's words loaded before this one's sums; on
Hopper a 16-bit group that is one power-of-two box arrives by TMA instead, the next
samples' copies in flight in shared memory, and dx leaves by a TMA store). A
program's fp32 sums of A and B over its samples are its share of ``dweight`` /
``dbias``: it writes them into its slot, then counts itself in on the group's arrival
counter (an atomic add); the last of the group's chunks to arrive adds the slots up in
chunk order, so the summation order is fixed (deterministic) whatever the arrival order,
no program waits for another (the threadfence-reduction pattern of the CUDA samples) and
no per-sample partial rows are stored. The slots live in the group's values of ``dx``'s
last sample (or last two), whose dx that last program writes after it has read them, and
the counters in the first bytes of each group's values of the ``dweight`` (or ``dbias``)
output, which the same program overwrites with the total (on Hopper, where the TMA path
runs, when the slots fit in the last sample and the groups are fewer than the SMs, the
group's last chunk instead keeps that sample's dx in registers and waits for the others
to count in before adding the slots up: nothing is read twice): the backward allocates only
``dx`` and the parameter gradients. (One chunk per group needs neither; groups whose
values hold no slot, or of a byte count not a multiple of 4, keep the slots in a buffer,
and the counters take a small buffer when a group's channels of the output span a byte
count not a multiple of 4; the split kernels below allocate per-row partials.)
Otherwise (few, large groups, or a backward with more than ``_MAX_GROUP_CHANNELS``
channels per group) ``x`` is seen as ``N * C`` rows of ``S`` values
(contiguous), so every row lies in one group and one channel, and the work is split:

- forward: (1) a reduction kernel computes, per row (and per slice of the row when
  there are too few rows to fill the GPU), the mean and sum of squared deviations with
  a per-lane Welford update (no ``E[x^2] - mean^2`` cancellation); (2) one program per
  group merges its rows' partials exactly (Chan et al.'s pairwise formula) into
  ``mean`` / ``rstd``; (3) an elementwise kernel writes ``y``.
- backward: (1) per row ``A = sum(dy * (x - mean))``, ``B = sum(dy)`` and the sum of
  squared deviations in fp32; (2) one program per group forms rstd, scales its rows' A
  by it (they are then the per-sample ``dweight`` contributions, as B are ``dbias``'s,
  summed over n after), and forms ``sum(g) = sum_c w[c] B`` and ``sum(g * xhat) = sum_c
  w[c] A``; (3) an elementwise kernel writes ``dx``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ligerzoo._checks import is_int
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, multiprocessor_count, next_power_of_2, row_settings

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["group_norm", "group_norm_reference"]


# Tiles are (BLOCK_R rows, BLOCK_S spatial values) with BLOCK_S <= _MAX_BLOCK_S and about
# _TILE_ELEMS elements. The reduction kernels aim at _PROGRAMS_PER_SM programs per SM
# (_REDUCE_PROGRAMS_CPU under the interpreter), splitting rows into slices when there
# are fewer row blocks than that. Module-level so tests can shrink them.
_MAX_BLOCK_S = 1024
_TILE_ELEMS = 4096
_PROGRAMS_PER_SM = 4
_REDUCE_PROGRAMS_CPU = 4
_MAX_BLOCK_PARTIALS = 1024
# With at least this many (sample, group) pairs per SM (or _WHOLE_GROUP_PROGRAMS_CPU under
# the interpreter), the whole-group kernels run: one launch forward and one backward (plus
# the zero fill of the backward's arrival counters), instead of three and three plus sums.
_WHOLE_GROUP_PROGRAMS_PER_SM = 2
_WHOLE_GROUP_PROGRAMS_CPU = 4
# The whole-group forward: one program per (sample, group), tiles of channels x up to
# _MAX_BLOCK_S values, _GROUP_FWD_TILE_ELEMS in all, under _GROUP_FWD_WARPS warps. H200,
# (64, 4096, 128) bf16: 46 us, against 53 with 4096-element tiles under 4 warps.
_GROUP_FWD_TILE_ELEMS = 8192
_GROUP_FWD_WARPS = 8
# A group of at most _GROUP_FWD_ONE_TILE_ELEMS values (padded to powers of two) is one tile
# under at most _GROUP_FWD_ONE_TILE_WARPS warps, kept in registers and read once (H200, same shape:
# 35.7 us per call, 87% of the copy bandwidth, against 46 for the tiled passes).
_GROUP_FWD_ONE_TILE_ELEMS = 16384
_GROUP_FWD_ONE_TILE_WARPS = 16
# The whole-group backward: each program takes a chunk of _MAX_SAMPLES_PER_PROGRAM
# samples of one group (fewer if that would leave under _GROUP_BWD_PROGRAMS_PER_SM
# programs per SM; _SAMPLES_PER_PROGRAM_CPU under the interpreter, _SAMPLES_PER_PROGRAM
# when set), in tiles of all the group's channels (at most _MAX_GROUP_CHANNELS, else the
# split kernels) x a few values, _GROUP_BWD_TILE_ELEMS in all, under _GROUP_BWD_WARPS
# warps. H200, same shape: 2 samples, 8192-element tiles, 16 warps took 83 us per call;
# 1 sample, 4096 elements, 4 warps 159 us (benchmarks/NOTES.md).
_GROUP_BWD_PROGRAMS_PER_SM = 2
_MAX_SAMPLES_PER_PROGRAM = 2
_SAMPLES_PER_PROGRAM_CPU = 2
_SAMPLES_PER_PROGRAM = None
_GROUP_BWD_TILE_ELEMS = 8192
_GROUP_BWD_WARPS = 16
_MAX_GROUP_CHANNELS = 4096
# With fp32 inputs, a sample's group of at most _GROUP_BWD_ONE_TILE_ELEMS values (padded
# to powers of two) is one tile of dy and one of x, kept in registers from the sums to dx
# (read once), under at most _GROUP_BWD_ONE_TILE_WARPS warps. H200, (64, 4096, 128), fp32:
# 144 us per call against 168 in tiles; bf16: 100 against 96 (dy and x as fp32 take 102
# registers a thread at 16 warps: one program per SM, whose loads wait for its stores;
# session 11), so 16-bit inputs are held as int32 words instead (_WORDS_ONE_TILE below).
_GROUP_BWD_ONE_TILE_ELEMS = 16384
_GROUP_BWD_ONE_TILE_WARPS = 16
# Samples per program of that one-tile backward (one program per SM): H200, (64, 4096, 128)
# fp32, 134.9 us with 4 against 143.1 with 2 (session 13).
_ONE_TILE_SAMPLES_PER_PROGRAM = 4
# With 16-bit inputs, a sample's group of at most _GROUP_BWD_ONE_TILE_ELEMS values (padded),
# each channel's values at most _WORDS_MAX_ROW int32 words (two values a word; a channel
# within one warp's reach), is read once as int32 words kept in registers (half the
# registers of fp32 tiles), and each program loads the next sample's words before working
# on this one's (register double buffering: about 128 registers a thread, one 16-warp
# program per SM), in chunks of at most _WORDS_MAX_SAMPLES samples from
# words_chunk_samples. H200, bf16 with 32 groups, dx and both parameter gradients, device
# time against the tiles (session 14, run 3): (32, 4096, 128) 37.9 us against 47.8; (64,
# 4096, 128) 65.7 against 79.8; (128, 4096, 128) 126.0 against 146.7; fp16 at 64: 69.1
# against 77.5. Run 2 at (64, 4096, 128): without the prefetch 86.4 us; chunks of 2
# samples 89.2, of 1 sample 110, so chunks of fewer than _WORDS_MIN_SAMPLES keep the tiles.
# At (256, 4096, 128) chunks of 32 and of 64 took the same time (229.0 and 240.6 us in runs
# 2 and 5, 239.7 in run 3): the cap keeps programs short for large N (not measured there).
_WORDS_ONE_TILE = True
_WORDS_PREFETCH = True
# On Hopper (sm_90, TMA, 227 KB of shared memory a block), a 16-bit sample's group that is
# one power-of-two (Cg, S) box of _TMA_MIN_TILE_ELEMS to _TMA_MAX_TILE_ELEMS values (each
# side at most 256, rows of 16 bytes or more) is instead copied into shared memory by TMA,
# with Triton's software pipeliner (num_stages=_TMA_STAGES) keeping _TMA_STAGES - 1 slots
# per operand, the next samples' copies in flight (164 KB with the dx store's buffer at
# 16384 values: one 16-warp program per SM), and dx leaves by a TMA store; chunks as for
# the words. Other GPUs, measured or not (sm_120 allows 99 KB a block), keep the words.
# H200, bf16, 32 groups, dx and both parameter gradients, kernel device time against the
# words' (session 17, run 5; floor: 3 x 2 bytes a value at the 4.28 TB/s copy rate):
# (64, 4096, 128) 59.2 us against 65.9 (80% of the floor's rate against 71%; fp16 58.7 /
# 68.2); (128, 4096, 128) 107.6 / 124.9 (87%); (256, 4096, 128) 208.6 / 242.1 (90%);
# (32, 4096, 128) 34.4 / 37.4; (64, 2048, 256) 59.7 / 68.9. Run 4's probe: 2 stages were
# slower than the words at every size, 4 slower than 3. Boxes of 8192 values run 8 warps,
# two programs per SM (run 6, (64, 2048, 128): chunks of 8 samples 32.9 us, of 16 37.8;
# the words 44.1). fp32 groups take boxes too when the three stages fit in
# _TMA_SHARED_BYTES (8192 values at most: 160 KB): (64, 2048, 128) fp32 56.1 us against
# 76.9 for the register tiles (84% of the floor's rate against 61%; session 18, run 6);
# 16384-value fp32 boxes with two stages (197 KB) were no faster than the tiles (73.0 /
# 131.0 / 250.3 us against 73.3 / 135.1 / 247.9 at 32 / 64 / 128 samples of (4096, 128)).
# None: on sm_90 GPUs; True / False force it (True runs it under the interpreter too, for
# the tests).
_TMA_BWD: Optional[bool] = None
# With TMA and the chunks' sums in dx's last sample, each group's last chunk keeps that
# sample's dx in registers, waits for the group's other chunks to count in, adds the sums
# up and then writes the dx over them (HOLD_LAST), instead of the last chunk to arrive
# reading the sample's dy and x again (with plain loads, after everything else) to write
# it. H200, bf16, 32 groups, kernel time with / without (session 18, run 2; the same bits):
# (32, 4096, 128) 32.3 / 34.4 us; (64, 4096, 128) 56.3 / 59.1 (84% of the copy rate against
# 80%); (128, ...) 106.3 / 108.3; (256, ...) 205.7 / 208.2; (64, 2048, 128) 31.4 / 33.5:
# as fast as sums in a separate buffer (31.8, 55.8, 105.5, 205.9, 31.5), without the buffer.
# None: where _hold_last_ok allows it; True / False force it on or off wherever it can run
# (TMA, the slots in the last sample).
_HOLD_LAST: Optional[bool] = None
_TMA_STAGES = 3
_TMA_SHARED_BYTES = 200 * 1024
_TMA_MIN_TILE_ELEMS = 8192
_TMA_MAX_TILE_ELEMS = 16384
_WORDS_MAX_ROW = 128
_WORDS_MIN_SAMPLES = 4
_WORDS_MAX_SAMPLES = 32
# Small groups (a (tokens, C) input, say): each program takes (samples x groups) tiles,
# each group a row of its tile, read once. The forward takes them for groups of at most
# _SMALL_GROUP_MAX_LEN values (padded to a power of two), the backward at most
# _SMALL_GROUP_MAX_LEN_BWD (H200, bf16: groups of 2048 values, forward 143 us against 70
# for the whole-group kernel, backward 149 against 247); tiles: see _small_tiles. The
# backward's programs (one per SM for its 16-warp tiles, else _SMALL_BWD_PROGRAMS_PER_SM;
# _SMALL_BWD_PROGRAMS_CPU under the interpreter) each own a block of samples and write their
# fp32 sums for the parameter gradients into slabs (in dx's first samples, see the module
# docstring), which _gn_small_finish_kernel adds up. H200,
# (8192, 4096) with 32 groups: forward 40 us and backward 72 us against 186 and 1113 for
# the whole-group kernels (torch: 0.86 ms forward + backward); 75 us with one 16-warp
# program per SM against 81 with two; 4-warp tiles of 512-value groups: 146 us with one
# program per SM, 99 with two, 125 with three (benchmarks/NOTES.md, session 11).
_SMALL_GROUP_MAX_LEN = 512
_SMALL_GROUP_MAX_LEN_BWD = 2048
_SMALL_TILE_ELEMS = 4096
_SMALL_BWD_TILE_BYTES = 16384
_SMALL_BWD_PROGRAMS_PER_SM = 2
_SMALL_BWD_PROGRAMS_CPU = 3
# Values of a sample per slab of the backward's sums (one finishing program each; wider
# for long samples). H200, (8192, 4096) with 32 groups: 128 finishing programs, 640 samples
# (8%) read again, 8.8 us (session 12).
_SMALL_SLAB_VALUES = 32
# The slabs lie in the last samples of the first programs' blocks (each finishing program
# then reads again samples whose dy and x the backward has just read, from L2) when those
# blocks are whole, else in dx's first samples. H200, bf16 with 32 groups, TMA tiles, main
# + finishing kernel, us (session 18, run 13): (8192, 4096) 53.4 + 7.1 with the slabs at
# the blocks' ends against 53.9 + 9.0 first (78% of the copy rate against 75%); 16384:
# 104.5 + 9.3 / 104.5 + 11.6; 4096: 29.0 + 7.0 / 29.5 + 8.6 (sums in a buffer, over Liger's
# peak: 53.9 + 3.0 at 8192). False: always first.
_SLABS_AT_BLOCK_ENDS = True
# The backward issues the next tile's loads before this tile's reductions (register
# double buffering), except for 16-bit tiles under 8 warps (groups of 256 values), whose
# extra registers halve the programs per SM. H200 (8192, 4096), backward us, with / without:
# 128-value groups 71.8 / 75.1, 512: 81.8 / 98.7, 256: 86.4 / 74.8, 64: 74.2 / 70.2;
# (1024, 4096, 16), 2048-value groups: 148.6 / 176.6; fp32, 128: 121.5 / 227.1.
# None: that rule; True / False force it (tests).
_SMALL_BWD_PREFETCH: Optional[bool] = None
# On Hopper (where _tma_device_ok), 16-bit tiles of groups of a power-of-two count of
# values are instead copied by TMA from (N, G, L) views, the next _TMA_STAGES - 1 in
# flight, and dx leaves by a TMA store (_small_tma_ok). H200, (tokens, 4096) with 32
# groups, bf16, main kernel + finishing kernel, us (session 18, run 3; the same bits):
# 4096 tokens 28.2 + 8.7 against 29.6 + 8.5 for the register loads; 8192: 52.2 + 9.1
# (77% of the copy rate) against 57.3 + 8.9 (72%); 16384: 102.2 + 11.7 (83%) against
# 110.9 + 11.1 (78%); fp16 at 8192: 52.6 + 9.4 (76%) against 64.6 + 9.1 (64%). Loading
# all 132 programs' sums at once in the finishing kernel did not shorten it (9.5 us).
# At most this many chunks per group (more samples per program for large N): the group's
# last program adds up one slot of sums per chunk.
_MAX_CHUNKS = 64
# The whole-group backward keeps the chunks' sums in the group's values of at most this
# many last samples of dx, whose dx the group's last program then writes (else a buffer).
_MAX_SCRATCH_SAMPLES = 2
# The group's last program loads the slots in (slots x channels) tiles of at most this many
# values (one round trip for 64 slots of 128 channels; one slot at a time took 33 us more
# on the H200 at (64, 4096, 128), 32 slots a group).
_SLOT_LOAD_ELEMS = 8192
# The tiled whole-group backward of 16-bit inputs is compiled with at most this many
# registers a thread over the threads of _GROUP_BWD_PROGRAMS_PER_SM programs (64 at 16
# warps): left to itself, ptxas gave the kernel 84 on the H200 (Triton 3.6), one program per
# SM: (64, 4096, 128) bf16 took 112 us against 80 with the cap (no spills). fp32 tiles need
# more (their (BLOCK_C, BLOCK_S) accumulators): capped, (16, 256, 64, 64) took 129 us
# against 90 (session 13).
_REGISTERS_PER_SM = 65536


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @jit
    def _gn_stats_kernel(
        X,                    # (R, S) contiguous input rows, R = N * C
        MEAN_P, M2_P,         # (R, n_split) fp32 out: per-slice mean and sum of squared deviations
        n_rows, n_cols, chunk, n_split,
        BLOCK_R: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_r = pid // n_split
        pid_s = pid % n_split
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)                   # (BLOCK_R,)
        row_mask = rows < n_rows
        rows64 = rows.to(tl.int64)
        s_start = pid_s * chunk
        s_end = tl.minimum(s_start + chunk, n_cols)

        # Welford per lane: every column lane keeps its own (count, mean, M2).
        mean = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        m2 = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        cnt = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for s in range(s_start, s_end, BLOCK_S):
            cols = s + tl.arange(0, BLOCK_S)
            col_mask = cols < s_end
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(X + rows64[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            cnt += tl.where(col_mask, 1.0, 0.0)
            inv = 1.0 / tl.maximum(cnt, 1.0)                             # (BLOCK_S,)
            delta = x - mean
            mean_new = mean + tl.where(col_mask[None, :], delta * inv[None, :], 0.0)
            m2 += tl.where(col_mask[None, :], delta * (x - mean_new), 0.0)
            mean = mean_new

        # Merge the lanes of each row (empty lanes have cnt = 0 and add nothing).
        total = tl.sum(cnt, axis=0)
        row_mean = tl.sum(mean * cnt[None, :], axis=1) / total           # (BLOCK_R,)
        d = mean - row_mean[:, None]
        row_m2 = tl.sum(m2, axis=1) + tl.sum(d * d * cnt[None, :], axis=1)
        out = rows64 * n_split + pid_s
        tl.store(MEAN_P + out, row_mean, mask=row_mask)
        tl.store(M2_P + out, row_m2, mask=row_mask)

    @jit
    def _gn_stats_combine_kernel(
        MEAN_P, M2_P,         # (N * G, Cg * n_split) fp32 partials of each group, in order
        MEAN, RSTD,           # (N * G,) fp32 out
        n_part, n_split, chunk, n_cols, group_numel, eps,
        BLOCK_K: tl.constexpr,
    ):
        grp = tl.program_id(0).to(tl.int64)
        base = grp * n_part
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in range(0, n_part, BLOCK_K):
            idx = k + tl.arange(0, BLOCK_K)
            m = idx < n_part
            cnt = tl.minimum(chunk, n_cols - (idx % n_split) * chunk).to(tl.float32)
            mu = tl.load(MEAN_P + base + idx, mask=m, other=0.0)
            acc += tl.where(m, cnt * mu, 0.0)
        mean = tl.sum(acc, axis=0) / group_numel
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in range(0, n_part, BLOCK_K):
            idx = k + tl.arange(0, BLOCK_K)
            m = idx < n_part
            cnt = tl.minimum(chunk, n_cols - (idx % n_split) * chunk).to(tl.float32)
            mu = tl.load(MEAN_P + base + idx, mask=m, other=0.0)
            q = tl.load(M2_P + base + idx, mask=m, other=0.0)
            d = mu - mean
            acc += tl.where(m, q + cnt * d * d, 0.0)
        var = tl.sum(acc, axis=0) / group_numel
        tl.store(MEAN + grp, mean)
        tl.store(RSTD + grp, tl.rsqrt(var + eps))

    @jit
    def _gn_fwd_kernel(
        X, Y,                 # (R, S) contiguous in / out
        W, B,                 # (C,) weight / bias (read only when HAS_WEIGHT / HAS_BIAS)
        MEAN, RSTD,           # (N * G,) fp32
        n_rows, n_cols, n_channels, ch_per_group, n_sblocks,
        HAS_WEIGHT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_r = pid // n_sblocks
        pid_s = pid % n_sblocks
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)
        grp = rows // ch_per_group                                       # n * G + c // Cg
        ch = rows % n_channels
        mean = tl.load(MEAN + grp, mask=row_mask, other=0.0)
        scale = tl.load(RSTD + grp, mask=row_mask, other=0.0)
        if HAS_WEIGHT:
            scale = scale * tl.load(W + ch, mask=row_mask, other=0.0).to(tl.float32)
        offs = rows64[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * scale[:, None]
        if HAS_BIAS:
            y += tl.load(B + ch, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @jit
    def _gn_bwd_reduce_kernel(
        DY, X,                # (R, S) contiguous
        MEAN,                 # (N * G,) fp32
        A_P, B_P, V_P,        # (R, n_split) fp32 out per row slice: sum(dy * (x - mean)),
                              # sum(dy), sum((x - mean)^2)
        n_rows, n_cols, ch_per_group, chunk, n_split,
        BLOCK_R: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_r = pid // n_split
        pid_s = pid % n_split
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        rows64 = rows.to(tl.int64)
        grp = rows // ch_per_group
        mean = tl.load(MEAN + grp, mask=row_mask, other=0.0)
        s_start = pid_s * chunk
        s_end = tl.minimum(s_start + chunk, n_cols)
        a_acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        b_acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        v_acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        for s in range(s_start, s_end, BLOCK_S):
            cols = s + tl.arange(0, BLOCK_S)
            mask = row_mask[:, None] & (cols < s_end)[None, :]
            offs = rows64[:, None] * n_cols + cols[None, :]
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - mean[:, None], 0.0)
            a_acc += dy * d
            b_acc += dy
            v_acc += d * d
        out = rows64 * n_split + pid_s
        tl.store(A_P + out, tl.sum(a_acc, axis=1), mask=row_mask)
        tl.store(B_P + out, tl.sum(b_acc, axis=1), mask=row_mask)
        tl.store(V_P + out, tl.sum(v_acc, axis=1), mask=row_mask)

    @jit
    def _gn_bwd_combine_kernel(
        A_P, B_P, V_P,        # (N * G, Cg * n_split) fp32 partials of each group, in order;
                              # A_P is scaled by rstd in place (the dweight contributions)
        W,                    # (C,) weight (read only when HAS_WEIGHT)
        RSTD,                 # (N * G,) fp32 out: 1 / sqrt(var + eps), the forward's formula
        SUM_G, SUM_GX,        # (N * G,) fp32 out: sum(dy * w), sum(dy * w * xhat)
        n_groups, ch_per_group, n_split, group_numel, eps,
        HAS_WEIGHT: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        grp = tl.program_id(0)
        n_part = ch_per_group * n_split
        base = grp.to(tl.int64) * n_part
        ch0 = (grp % n_groups) * ch_per_group
        acc_v = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in range(0, n_part, BLOCK_K):
            idx = k + tl.arange(0, BLOCK_K)
            acc_v += tl.load(V_P + base + idx, mask=idx < n_part, other=0.0)
        rstd = tl.rsqrt(tl.sum(acc_v, axis=0) / group_numel + eps)
        acc_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k in range(0, n_part, BLOCK_K):
            idx = k + tl.arange(0, BLOCK_K)
            m = idx < n_part
            a = tl.load(A_P + base + idx, mask=m, other=0.0) * rstd
            tl.store(A_P + base + idx, a, mask=m)
            b = tl.load(B_P + base + idx, mask=m, other=0.0)
            if HAS_WEIGHT:
                w = tl.load(W + ch0 + idx // n_split, mask=m, other=0.0).to(tl.float32)
                a = a * w
                b = b * w
            acc_a += a
            acc_b += b
        tl.store(RSTD + grp, rstd)
        tl.store(SUM_G + grp, tl.sum(acc_b, axis=0))
        tl.store(SUM_GX + grp, tl.sum(acc_a, axis=0))

    @jit
    def _gn_bwd_dx_kernel(
        DY, X, DX,            # (R, S) contiguous
        W,                    # (C,) weight (read only when HAS_WEIGHT)
        MEAN, RSTD, SUM_G, SUM_GX,  # (N * G,) fp32
        n_rows, n_cols, n_channels, ch_per_group, n_sblocks, group_numel,
        HAS_WEIGHT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_r = pid // n_sblocks
        pid_s = pid % n_sblocks
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)
        grp = rows // ch_per_group
        mean = tl.load(MEAN + grp, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + grp, mask=row_mask, other=0.0)
        k_g = tl.load(SUM_G + grp, mask=row_mask, other=0.0) * rstd / group_numel      # (BLOCK_R,)
        k_gx = tl.load(SUM_GX + grp, mask=row_mask, other=0.0) * rstd / group_numel
        scale = rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(W + (rows % n_channels), mask=row_mask, other=0.0).to(tl.float32)
        offs = rows64[:, None] * n_cols + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dx = dy * scale[:, None] - k_g[:, None] - xhat * k_gx[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


if HAS_TRITON:

    # Whole-group kernels, used when there are enough (sample, group) pairs to fill the
    # GPU. Forward: one program per pair reads its Cg x S values (channel rows of S, tiles
    # of BLOCK_C x BLOCK_S) several times, from L2 after the first pass. Backward: one
    # program per chunk of samples of a group, all Cg channels in each tile.
    @triton.jit
    def _gn_scale_shift(W, B, ch, c_mask, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Per-channel (scale, shift) of y = (x - mean) * scale + shift for the channels
        ``ch`` (masked by ``c_mask``): rstd * weight and bias, fp32, each 1 / 0 when absent."""
        scale = tl.zeros(ch.shape, dtype=tl.float32) + rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(W + ch, mask=c_mask, other=0.0).to(tl.float32)
        shift = tl.zeros(ch.shape, dtype=tl.float32)
        if HAS_BIAS:
            shift = tl.load(B + ch, mask=c_mask, other=0.0).to(tl.float32)
        return scale, shift

    @jit
    def _gn_group_fwd_kernel(
        X, Y,                 # (N * G, Cg, S) contiguous
        W, B,                 # (C,) weight / bias (read only when HAS_WEIGHT / HAS_BIAS)
        MEAN,                 # (N * G,) fp32 out (the backward recomputes rstd)
        n_groups, ch_per_group, n_cols, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
        ONE_TILE: tl.constexpr,   # the whole group is one (BLOCK_C, BLOCK_S) tile: read once
    ):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * ch_per_group * n_cols
        ch0 = (pid % n_groups) * ch_per_group
        numel = ch_per_group * n_cols
        cc, ss = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_S)
        if ONE_TILE:
            # the group stays in registers: its mean, its deviations' sum of squares, then y
            c_mask = cc < ch_per_group
            mask = c_mask[:, None] & (ss < n_cols)[None, :]
            offs = cc[:, None] * n_cols + ss[None, :]
            d = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(d) / numel
            d = tl.where(mask, d - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d) / numel + eps)
            tl.store(MEAN + pid, mean)
            scale, shift = _gn_scale_shift(W, B, ch0 + cc, c_mask, rstd, HAS_WEIGHT, HAS_BIAS)
            tl.store(Y + base + offs, (d * scale[:, None] + shift[:, None]).to(Y.dtype.element_ty), mask=mask)
            return
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for c0 in range(0, ch_per_group, BLOCK_C):
            for s0 in range(0, n_cols, BLOCK_S):
                mask = ((c0 + cc) < ch_per_group)[:, None] & ((s0 + ss) < n_cols)[None, :]
                offs = (c0 + cc)[:, None] * n_cols + (s0 + ss)[None, :]
                acc += tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc) / numel
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        for c0 in range(0, ch_per_group, BLOCK_C):                   # second pass: no cancellation
            for s0 in range(0, n_cols, BLOCK_S):
                mask = ((c0 + cc) < ch_per_group)[:, None] & ((s0 + ss) < n_cols)[None, :]
                offs = (c0 + cc)[:, None] * n_cols + (s0 + ss)[None, :]
                d = tl.where(mask, tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
                acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc) / numel + eps)
        tl.store(MEAN + pid, mean)
        for c0 in range(0, ch_per_group, BLOCK_C):
            c_mask = (c0 + cc) < ch_per_group
            scale, shift = _gn_scale_shift(W, B, ch0 + c0 + cc, c_mask, rstd, HAS_WEIGHT, HAS_BIAS)
            for s0 in range(0, n_cols, BLOCK_S):
                mask = c_mask[:, None] & ((s0 + ss) < n_cols)[None, :]
                offs = (c0 + cc)[:, None] * n_cols + (s0 + ss)[None, :]
                x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
                # (x - mean) first: x * scale - mean * scale cancels when |mean| * rstd is large
                y = (x - mean) * scale[:, None] + shift[:, None]
                tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_group_dx(DY, X, DX, base, w, mean, rstd, k_g, k_gx, cc, c_mask, ss, n_cols, BLOCK_S: tl.constexpr):
        """dx = rstd * (g - (sum(g) + xhat * sum(g * xhat)) / L) of one (sample, group) at
        ``base``, all its channels x BLOCK_S values per tile (``k_g = sum(g) / L``, ``k_gx =
        sum(g * xhat) / L``; the values from L2 after pass 1)."""
        scale = w * rstd
        for s0 in range(0, n_cols, BLOCK_S):
            mask = c_mask[:, None] & ((s0 + ss) < n_cols)[None, :]
            offs = cc[:, None] * n_cols + (s0 + ss)[None, :]
            dy = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            dx = dy * scale[:, None] - rstd * (k_g + xhat * k_gx)
            tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_group_tile(DY, X, base, mean, s0, cc, c_mask, ss, n_cols):
        """dy and x - mean (0 outside the group), fp32 (BLOCK_C, BLOCK_S), of the tile at
        values s0... of all channels of the (sample, group) at ``base``."""
        mask = c_mask[:, None] & ((s0 + ss) < n_cols)[None, :]
        offs = cc[:, None] * n_cols + (s0 + ss)[None, :]
        dy = tl.load(DY + base + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
        return dy, tl.where(mask, x - mean, 0.0)

    @triton.jit
    def _gn_unpack(v, sh, DT: tl.constexpr):
        """The two 16-bit values of dtype DT in each int32 word of ``v`` as fp32: (first,
        second), the first in the low half (little endian). ``sh`` is 16: a second unpacking
        of the same words with ``sh`` a run-time argument is not merged with a first one
        (whose results would then stay live in registers in between)."""
        if DT == tl.bfloat16:   # a bf16 value is the top half of an fp32 one
            lo = (v << sh).to(tl.float32, bitcast=True)
            hi = ((v >> sh) << sh).to(tl.float32, bitcast=True)
        else:
            lo = ((v << sh) >> sh).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
            hi = (v >> sh).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
        return lo, hi

    @triton.jit
    def _gn_pack(lo, hi, DT: tl.constexpr):
        """fp32 (lo, hi) rounded to DT and packed two to an int32 word, lo in the low half."""
        lo16 = lo.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi16 = hi.to(DT).to(tl.int16, bitcast=True).to(tl.int32) << 16
        return lo16 | hi16

    @triton.jit
    def _gn_words_load(DY, X, pair, numel, cc, c_mask, n_cols, BLOCK_S: tl.constexpr):
        """dy and x of the (sample, group) ``pair`` (16-bit values, ``n_cols`` even) as int32
        words, two values each: (BLOCK_C, BLOCK_S / 2) tiles, 0 outside the group."""
        half = n_cols // 2
        ww = tl.arange(0, BLOCK_S // 2)
        mask = c_mask[:, None] & (ww < half)[None, :]
        offs = cc[:, None] * half + ww[None, :]                                 # words, int32
        wbase = pair.to(tl.int64) * (numel // 2)
        dyw = tl.load(DY.to(tl.pointer_type(tl.int32)) + wbase + offs, mask=mask, other=0)
        xw = tl.load(X.to(tl.pointer_type(tl.int32)) + wbase + offs, mask=mask, other=0)
        return dyw, xw

    @triton.jit
    def _gn_words_sample(dyw, xw, DX, MEAN, pair, numel, w, cc, c_mask, n_cols, eps, sixteen, write_dx,
                         BLOCK_S: tl.constexpr):
        """The one-tile backward of a (sample, group) of 16-bit values held as int32 words
        (from _gn_words_load): its per-channel sums A and B (as _gn_group_sample) and its dx
        when ``write_dx``. The words are unpacked to fp32 for the sums and again for dx."""
        DT: tl.constexpr = DX.dtype.element_ty
        half = n_cols // 2
        ww = tl.arange(0, BLOCK_S // 2)
        mask = c_mask[:, None] & (ww < half)[None, :]
        mean = tl.load(MEAN + pair)
        dy0, dy1 = _gn_unpack(dyw, 16, DT)
        x0, x1 = _gn_unpack(xw, 16, DT)
        d0 = tl.where(mask, x0 - mean, 0.0)
        d1 = tl.where(mask, x1 - mean, 0.0)
        a_c = tl.sum(dy0 * d0 + dy1 * d1, axis=1)
        b_c = tl.sum(dy0 + dy1, axis=1)
        v_c = tl.sum(d0 * d0 + d1 * d1, axis=1)
        rstd = 1.0 / tl.sqrt(tl.sum(v_c, axis=0) / numel + eps)
        a_c = a_c * rstd
        k_gx = tl.sum(a_c * w) / numel
        k_g = tl.sum(b_c * w) / numel
        if write_dx:
            offs = cc[:, None] * half + ww[None, :]
            out = DX.to(tl.pointer_type(tl.int32)) + pair.to(tl.int64) * (numel // 2) + offs
            scale = (w * rstd)[:, None]
            dy0, dy1 = _gn_unpack(dyw, sixteen, DT)
            x0, x1 = _gn_unpack(xw, sixteen, DT)
            # the same operations as _gn_group_dx, in the same order
            dx0 = dy0 * scale - rstd * (k_g + ((x0 - mean) * rstd) * k_gx)
            dx1 = dy1 * scale - rstd * (k_g + ((x1 - mean) * rstd) * k_gx)
            tl.store(out, _gn_pack(dx0, dx1, DT), mask=mask)
        return a_c, b_c

    @triton.jit
    def _gn_group_sample(DY, X, DX, MEAN, pair, numel, w, cc, c_mask, ss, n_cols, eps, write_dx,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr):
        """One (sample, group) of the whole-group backward, ``pair = n * G + g``: its
        per-channel sums A = sum(dy * xhat) and B = sum(dy) (each (BLOCK_C,) fp32, returned
        for the parameter gradients), and its dx when ``write_dx``."""
        base = pair.to(tl.int64) * numel
        mean = tl.load(MEAN + pair)
        # pass 1: per channel A' = sum(dy * (x - mean)), B = sum(dy) and the squared
        # deviations (rstd, as in the forward); A = A' * rstd; sum(g) = sum_c w B,
        # sum(g * xhat) = sum_c w A
        if ONE_TILE:
            # the sample's group stays in registers for dx below
            mask1 = c_mask[:, None] & (ss < n_cols)[None, :]
            offs1 = cc[:, None] * n_cols + ss[None, :]
            dy1 = tl.load(DY + base + offs1, mask=mask1, other=0.0).to(tl.float32)
            d1 = tl.where(mask1, tl.load(X + base + offs1, mask=mask1, other=0.0).to(tl.float32) - mean, 0.0)
            a_c = tl.sum(dy1 * d1, axis=1)
            b_c = tl.sum(dy1, axis=1)
            v_c = tl.sum(d1 * d1, axis=1)
        elif X.dtype.element_ty != tl.float32:
            # 16-bit inputs: reduce each tile over its values (fewer live registers;
            # H200, (64, 4096, 128) bf16, same tiles and warps, kernel time under the
            # profiler: 78 us against 105 for the form below)
            a_c = tl.zeros([BLOCK_C], dtype=tl.float32)
            b_c = tl.zeros([BLOCK_C], dtype=tl.float32)
            v_c = tl.zeros([BLOCK_C], dtype=tl.float32)
            for s0 in range(0, n_cols, BLOCK_S):
                dy, d = _gn_group_tile(DY, X, base, mean, s0, cc, c_mask, ss, n_cols)
                a_c += tl.sum(dy * d, axis=1)
                b_c += tl.sum(dy, axis=1)
                v_c += tl.sum(d * d, axis=1)
        else:
            # fp32 inputs: (BLOCK_C, BLOCK_S) accumulators (Triton 3.6 fails to compile
            # the per-tile form above for fp32 loads: "PassManager::run failed")
            a = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            b = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            v = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            for s0 in range(0, n_cols, BLOCK_S):
                dy, d = _gn_group_tile(DY, X, base, mean, s0, cc, c_mask, ss, n_cols)
                a += dy * d
                b += dy
                v += d * d
            a_c, b_c, v_c = tl.sum(a, axis=1), tl.sum(b, axis=1), tl.sum(v, axis=1)    # (BLOCK_C,)
        rstd = 1.0 / tl.sqrt(tl.sum(v_c, axis=0) / numel + eps)
        a_c = a_c * rstd
        k_gx = tl.sum(a_c * w) / numel
        k_g = tl.sum(b_c * w) / numel
        # pass 2: dx (from registers with ONE_TILE, else from L2)
        if write_dx:
            if ONE_TILE:
                # the same operations as _gn_group_dx, in the same order
                xhat = d1 * rstd
                dx = dy1 * (w * rstd)[:, None] - rstd * (k_g + xhat * k_gx)
                tl.store(DX + base + offs1, dx.to(DX.dtype.element_ty), mask=mask1)
            else:
                _gn_group_dx(DY, X, DX, base, w, mean, rstd, k_g, k_gx, cc, c_mask, ss, n_cols, BLOCK_S)
        return a_c, b_c

    @triton.jit
    def _gn_slot(SLOTS, slot0, j, grp, n_groups, region_stride, slots_per_region, slot_len):
        """fp32 pointer to slot ``j`` (one chunk's sums) of group ``grp``; see _gn_group_bwd_kernel."""
        return (SLOTS.to(tl.pointer_type(tl.float32)) + slot0
                + ((j // slots_per_region) * n_groups + grp).to(tl.int64) * region_stride
                + (j % slots_per_region) * slot_len)

    @triton.jit
    def _gn_slot_store(SLOTS, slot0, chunk, grp, n_groups, region_stride, slots_per_region, sum_a, sum_b, cc, c_mask,
                       ch_per_group, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr):
        """Store a chunk's (BLOCK_C,) fp32 sums of A (with COMPUTE_DW) then B (COMPUTE_DB)
        into its slot (the caller then counts the chunk in on the group's counter)."""
        slot_db = ch_per_group if COMPUTE_DW else 0
        slot_len = (slot_db + ch_per_group) if COMPUTE_DB else ch_per_group
        mine = _gn_slot(SLOTS, slot0, chunk, grp, n_groups, region_stride, slots_per_region, slot_len)
        if COMPUTE_DW:
            tl.store(mine + cc, sum_a, mask=c_mask)
        if COMPUTE_DB:
            tl.store(mine + slot_db + cc, sum_b, mask=c_mask)

    @triton.jit
    def _gn_slot_totals(SLOTS, OUT, slot0, grp, n_groups, n_chunks, region_stride, slots_per_region, cc, c_mask,
                        ch_per_group, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, SLOT_BLOCK: tl.constexpr):
        """Add up the group's ``n_chunks`` slots in chunk order (a fixed order: deterministic,
        whatever order the chunks arrived in), SLOT_BLOCK slots a load, and store the totals
        into OUT, (P, C) in its dtype: dweight's row, then dbias's."""
        slot_db = ch_per_group if COMPUTE_DW else 0
        slot_len = (slot_db + ch_per_group) if COMPUTE_DB else ch_per_group
        tot_a = tl.zeros(cc.shape, dtype=tl.float32)
        tot_b = tl.zeros(cc.shape, dtype=tl.float32)
        jj = tl.arange(0, SLOT_BLOCK)
        for j0 in range(0, n_chunks, SLOT_BLOCK):
            rows = _gn_slot(SLOTS, slot0, j0 + jj, grp, n_groups, region_stride, slots_per_region, slot_len)
            m2 = (j0 + jj < n_chunks)[:, None] & c_mask[None, :]                     # (SLOT_BLOCK, BLOCK_C)
            if COMPUTE_DW:
                tot_a += tl.sum(tl.load(rows[:, None] + cc[None, :], mask=m2, other=0.0, cache_modifier=".cg"),
                                axis=0)
            if COMPUTE_DB:
                tot_b += tl.sum(tl.load(rows[:, None] + slot_db + cc[None, :], mask=m2, other=0.0,
                                        cache_modifier=".cg"), axis=0)
        ch0 = grp * ch_per_group
        if COMPUTE_DW:
            tl.store(OUT + ch0 + cc, tot_a.to(OUT.dtype.element_ty), mask=c_mask)
        if COMPUTE_DB:
            tl.store(OUT + (n_groups * ch_per_group if COMPUTE_DW else 0) + ch0 + cc,
                     tot_b.to(OUT.dtype.element_ty), mask=c_mask)

    @jit
    def _gn_group_bwd_kernel(
        DY, X, DX,            # (N * G, Cg, S) contiguous
        W,                    # (C,) weight (read only when HAS_WEIGHT)
        MEAN,                 # (N * G,) fp32 (rstd is recomputed here)
        SLOTS,                # fp32 sums of each chunk (see below), from element slot0 of
                              # SLOTS seen as fp32: dx itself (the group's values in the last
                              # n_scratch samples) or a buffer
        OUT,                  # (P, C) out, in the parameters' dtype
        TICKET,               # int32 arrival counters, one per group (ticket_stride apart), zeroed
        DY_DESC, X_DESC, DX_DESC,  # TMA: descriptors of dy, x, dx as (N * C, S) with (Cg, S) boxes, else None
        n_samples, n_groups, ch_per_group, n_cols, samples_per_program, eps,
        slot0, region_stride, slots_per_region, n_scratch, ticket_stride,
        sixteen,              # 16 (see _gn_unpack)
        HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
        ONE_TILE: tl.constexpr,   # a sample's group is one (BLOCK_C, BLOCK_S) tile: read once
        SLOT_BLOCK: tl.constexpr,  # slots the last program loads at once
        WORDS: tl.constexpr = False,     # ONE_TILE with 16-bit dy and x (one dtype, 4-byte
                                         # aligned, even S) read as int32 words (_gn_words_load)
        PREFETCH: tl.constexpr = False,  # WORDS: the next sample's words loaded before this one's work
        TMA: tl.constexpr = False,       # ONE_TILE with each sample's group loaded by TMA (Hopper), with
                                         # TMA_STAGES - 1 shared-memory slots per operand
        TMA_STAGES: tl.constexpr = 3,
        HOLD_LAST: tl.constexpr = False,  # TMA, slots in sample N - 1: its dx waits in the last chunk's registers
    ):
        """Each program takes one group of a chunk of samples. With parameter gradients and
        several chunks, each chunk writes its (P, Cg) fp32 sums into slot ``chunk`` of its
        group, then counts itself in on the group's ticket; the last to arrive adds the
        group's slots in chunk order (a fixed order: deterministic, whatever the arrival
        order), rounds the total into OUT, and, when the slots lie in dx, writes the dx of
        the last ``n_scratch`` samples, whose values held them (no program waits on another:
        the threadfence-reduction pattern of the CUDA samples). With HOLD_LAST (TMA, the
        slots in sample N - 1's values) the group's last chunk instead keeps that sample's dx
        in registers, waits for the other chunks to count in, adds the slots up and then
        writes the dx over them: nothing is read twice. Slot j of group g starts at fp32
        element ``slot0 + ((j // slots_per_region) * G + g) * region_stride + (j %
        slots_per_region) * P * Cg`` of SLOTS."""
        pid = tl.program_id(0)
        grp = pid % n_groups
        chunk = pid // n_groups                             # this program's samples: a chunk
        n_chunks = (n_samples + samples_per_program - 1) // samples_per_program
        n_start = chunk * samples_per_program
        n_end = tl.minimum(n_start + samples_per_program, n_samples)
        ch0 = grp * ch_per_group
        n_channels = n_groups * ch_per_group
        numel = ch_per_group * n_cols
        cc, ss = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_S)   # all Cg channels x BLOCK_S
        c_mask = cc < ch_per_group
        if HAS_WEIGHT:
            w = tl.load(W + ch0 + cc, mask=c_mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(c_mask, 1.0, 0.0)
        sum_a = tl.zeros([BLOCK_C], dtype=tl.float32)          # sums over the chunk of A, B
        sum_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        if TMA:
            # each (sample, group) is a (Cg, S) box of dy and x: Triton's software pipeliner
            # keeps the next samples' TMA copies in flight into shared-memory slots (two per
            # operand with 3 stages) during this one's work, and dx leaves by a TMA store
            # (the same operations as _gn_group_sample's one tile)
            held = tl.zeros([BLOCK_C, BLOCK_S], dtype=DX.dtype.element_ty)   # HOLD_LAST: sample N - 1's dx
            for n in tl.range(n_start, n_end, num_stages=TMA_STAGES):
                pair = n * n_groups + grp
                row = pair * ch_per_group
                dy1 = DY_DESC.load([row, 0]).to(tl.float32)                     # (Cg, S)
                mean = tl.load(MEAN + pair)
                d1 = X_DESC.load([row, 0]).to(tl.float32) - mean
                a_c = tl.sum(dy1 * d1, axis=1)
                b_c = tl.sum(dy1, axis=1)
                v_c = tl.sum(d1 * d1, axis=1)
                rstd = 1.0 / tl.sqrt(tl.sum(v_c, axis=0) / numel + eps)
                a_c = a_c * rstd
                k_gx = tl.sum(a_c * w) / numel
                k_g = tl.sum(b_c * w) / numel
                sum_a += a_c
                sum_b += b_c
                if HOLD_LAST:
                    xhat = d1 * rstd
                    dx = dy1 * (w * rstd)[:, None] - rstd * (k_g + xhat * k_gx)
                    if n == n_samples - 1:
                        held = dx.to(DX.dtype.element_ty)   # its values hold the slots: written below
                    else:
                        DX_DESC.store([row, 0], dx.to(DX_DESC.dtype))
                elif n < n_samples - n_scratch:
                    xhat = d1 * rstd
                    dx = dy1 * (w * rstd)[:, None] - rstd * (k_g + xhat * k_gx)
                    DX_DESC.store([row, 0], dx.to(DX_DESC.dtype))
        elif WORDS:
            nxt_dy, nxt_x = _gn_words_load(DY, X, n_start * n_groups + grp, numel, cc, c_mask, n_cols, BLOCK_S)
            for n in range(n_start, n_end):
                dyw, xw = nxt_dy, nxt_x
                if PREFETCH:   # the next sample's loads in flight during this one's sums and dx
                    nxt_dy, nxt_x = _gn_words_load(DY, X, tl.minimum(n + 1, n_end - 1) * n_groups + grp, numel,
                                                   cc, c_mask, n_cols, BLOCK_S)
                a_c, b_c = _gn_words_sample(dyw, xw, DX, MEAN, n * n_groups + grp, numel, w, cc, c_mask, n_cols, eps,
                                            sixteen, n < n_samples - n_scratch, BLOCK_S)
                if not PREFETCH:
                    nxt_dy, nxt_x = _gn_words_load(DY, X, tl.minimum(n + 1, n_end - 1) * n_groups + grp, numel,
                                                   cc, c_mask, n_cols, BLOCK_S)
                sum_a += a_c
                sum_b += b_c
        else:
            for n in range(n_start, n_end):
                a_c, b_c = _gn_group_sample(DY, X, DX, MEAN, n * n_groups + grp, numel, w, cc, c_mask, ss,
                                            n_cols, eps, n < n_samples - n_scratch, BLOCK_C, BLOCK_S, ONE_TILE)
                sum_a += a_c
                sum_b += b_c

        if COMPUTE_DW or COMPUTE_DB:
            db_off = n_channels if COMPUTE_DW else 0
            if n_chunks == 1:
                if COMPUTE_DW:
                    tl.store(OUT + ch0 + cc, sum_a.to(OUT.dtype.element_ty), mask=c_mask)
                if COMPUTE_DB:
                    tl.store(OUT + db_off + ch0 + cc, sum_b.to(OUT.dtype.element_ty), mask=c_mask)
            elif HOLD_LAST:
                _gn_slot_store(SLOTS, slot0, chunk, grp, n_groups, region_stride, slots_per_region, sum_a, sum_b,
                               cc, c_mask, ch_per_group, COMPUTE_DW, COMPUTE_DB)
                tick = TICKET.to(tl.pointer_type(tl.int32)) + grp * ticket_stride
                if n_end < n_samples:
                    tl.debug_barrier()  # every thread's sums stored before the count below
                    tl.atomic_add(tick, 1, sem="release")
                else:
                    # the group's last chunk, whose last sample's values hold the slots: wait
                    # for the other chunks to count in (the programs that run them never wait,
                    # so they finish), add the slots up, then store that sample's dx over them
                    # (plain stores, ordered after the slot loads by the barrier)
                    arrived = tl.atomic_add(tick, 0, sem="acquire")
                    while arrived < n_chunks - 1:   # spin: re-read the counter until all are in
                        arrived = tl.atomic_add(tick, 0, sem="acquire")
                    tl.debug_barrier()  # this program's sums stored, the others' visible to every thread
                    _gn_slot_totals(SLOTS, OUT, slot0, grp, n_groups, n_chunks, region_stride, slots_per_region,
                                    cc, c_mask, ch_per_group, COMPUTE_DW, COMPUTE_DB, SLOT_BLOCK)
                    tl.debug_barrier()  # every slot read before dx overwrites them
                    offs1 = ((n_samples - 1) * n_groups + grp).to(tl.int64) * numel + cc[:, None] * n_cols + ss[None, :]
                    tl.store(DX + offs1, held)
            else:
                _gn_slot_store(SLOTS, slot0, chunk, grp, n_groups, region_stride, slots_per_region, sum_a, sum_b,
                               cc, c_mask, ch_per_group, COMPUTE_DW, COMPUTE_DB)
                tl.debug_barrier()      # every thread's sums stored before the count below
                tick = TICKET.to(tl.pointer_type(tl.int32)) + grp * ticket_stride
                if tl.atomic_add(tick, 1) == n_chunks - 1:   # acq_rel: the others' sums are visible
                    tl.debug_barrier()  # to every thread of this program, after the acquire
                    _gn_slot_totals(SLOTS, OUT, slot0, grp, n_groups, n_chunks, region_stride, slots_per_region,
                                    cc, c_mask, ch_per_group, COMPUTE_DW, COMPUTE_DB, SLOT_BLOCK)
                    if n_scratch > 0:
                        tl.debug_barrier()  # every slot read before dx overwrites them
                        for n_last in range(n_samples - n_scratch, n_samples):
                            if WORDS:
                                dyw, xw = _gn_words_load(DY, X, n_last * n_groups + grp, numel, cc, c_mask, n_cols,
                                                         BLOCK_S)
                                _gn_words_sample(dyw, xw, DX, MEAN, n_last * n_groups + grp, numel, w, cc, c_mask,
                                                 n_cols, eps, sixteen, True, BLOCK_S)
                            else:
                                _gn_group_sample(DY, X, DX, MEAN, n_last * n_groups + grp, numel, w, cc, c_mask,
                                                 ss, n_cols, eps, True, BLOCK_C, BLOCK_S, ONE_TILE)



    @triton.jit
    def _gn_small_tile(row_len, n_samples, n_groups, group_len, n0, g0,
                       BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr):
        """Offsets and mask of the (BLOCK_N samples, BLOCK_G groups, BLOCK_L values) tile of
        samples n0... and groups g0... (each sample a row of ``row_len = C * S`` values, a
        group ``group_len = Cg * S`` consecutive ones of it)."""
        n = n0 + tl.arange(0, BLOCK_N)
        g = g0 + tl.arange(0, BLOCK_G)
        v = tl.arange(0, BLOCK_L)
        offs = (n.to(tl.int64) * row_len)[:, None, None] + (g * group_len)[None, :, None] + v[None, None, :]
        mask = (n < n_samples)[:, None, None] & (g < n_groups)[None, :, None] & (v < group_len)[None, None, :]
        return offs, mask

    @triton.jit
    def _gn_small_loads(DY, X, row_len, n_end, n_groups, group_len, n0, g0,
                        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr):
        """dy and x of the small-group tile at samples n0... (their dtype, zero past n_end)."""
        offs, mask = _gn_small_tile(row_len, n_end, n_groups, group_len, n0, g0, BLOCK_N, BLOCK_G, BLOCK_L)
        return tl.load(DY + offs, mask=mask, other=0.0), tl.load(X + offs, mask=mask, other=0.0)

    @triton.jit
    def _gn_small_stats(x, mask, group_len, eps):
        """Deviations from the mean and rstd of each group of a (BLOCK_N, BLOCK_G, BLOCK_L)
        fp32 tile (0 where masked off): ((BN, BG, BL), (BN, BG)), two passes (no
        cancellation); the forward and the backward share them, so they agree bit for bit."""
        mean = tl.sum(x, axis=2) / group_len                                         # (BN, BG)
        d = tl.where(mask, x - mean[:, :, None], 0.0)
        return d, 1.0 / tl.sqrt(tl.sum(d * d, axis=2) / group_len + eps)

    @jit
    def _gn_small_fwd_kernel(
        X, Y,                 # (N, C * S) contiguous
        W, B,                 # (C,) weight / bias (read only when HAS_WEIGHT / HAS_BIAS)
        n_samples, n_groups, group_len, n_cols, eps,   # group_len = Cg * S, n_cols = S
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        # Small groups: a program normalises (BLOCK_N samples x BLOCK_G groups), each group
        # a row of its (BLOCK_N, BLOCK_G, BLOCK_L) tile, held in registers and read once. No
        # statistics are kept: the backward reads the whole group too, and recomputes them.
        n0, g0 = tl.program_id(0) * BLOCK_N, tl.program_id(1) * BLOCK_G
        row_len = n_groups * group_len
        offs, mask = _gn_small_tile(row_len, n_samples, n_groups, group_len, n0, g0, BLOCK_N, BLOCK_G, BLOCK_L)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)                  # (BN, BG, BL)
        d, rstd = _gn_small_stats(x, mask, group_len, eps)                           # (BN, BG, BL), (BN, BG)
        g = g0 + tl.arange(0, BLOCK_G)
        # the channel of each tile value, and its (scale, shift) as in the whole-group kernel
        ch = (g * (group_len // n_cols))[:, None] + tl.arange(0, BLOCK_L)[None, :] // n_cols   # (BG, BL)
        c_mask = (g < n_groups)[:, None] & (tl.arange(0, BLOCK_L) < group_len)[None, :]
        scale, shift = _gn_scale_shift(W, B, ch, c_mask, 1.0, HAS_WEIGHT, HAS_BIAS)
        y = d * (rstd[:, :, None] * scale[None, :, :]) + shift[None, :, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_small_weight(W, n_groups, group_len, n_cols, g0,
                         HAS_WEIGHT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr):
        """The fp32 weight of each value of groups g0... (1 without weight, 0 outside the
        groups) and the mask of their values: ((BLOCK_G, BLOCK_L), (BLOCK_G, BLOCK_L))."""
        g = g0 + tl.arange(0, BLOCK_G)
        v = tl.arange(0, BLOCK_L)
        ch = (g * (group_len // n_cols))[:, None] + v[None, :] // n_cols               # (BG, BL)
        c_mask = (g < n_groups)[:, None] & (v < group_len)[None, :]
        if HAS_WEIGHT:
            w = tl.load(W + ch, mask=c_mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(c_mask, 1.0, 0.0)
        return w, c_mask

    @triton.jit
    def _gn_small_dx(dy, x, w, mask, group_len, eps):
        """dx and xhat of a (BLOCK_N, BLOCK_G, BLOCK_L) tile of whole groups from fp32 dy and
        x (0 where masked off) and the (BLOCK_G, BLOCK_L) weight: mean and rstd from the
        tile, then dx = rstd * (g - (sum(g) + xhat * sum(g * xhat)) / L), g = dy * w. xhat is
        0 where masked off (with eps = 0 a padded group's rstd is inf, and 0 * inf = nan
        would reach the weight gradient's sums)."""
        d, rstd = _gn_small_stats(x, mask, group_len, eps)
        xhat = tl.where(mask, d * rstd[:, :, None], 0.0)
        gw = dy * w[None, :, :]
        k_g = tl.sum(gw, axis=2) / group_len
        k_gx = tl.sum(gw * xhat, axis=2) / group_len
        dx = dy * (w[None, :, :] * rstd[:, :, None]) - rstd[:, :, None] * (k_g[:, :, None] + xhat * k_gx[:, :, None])
        return dx, xhat

    @triton.jit
    def _gn_held(n, n_held, row0, row_stride, held_samples):
        """Whether sample(s) ``n`` hold a slab of sums in dx: n in [row0 + j * row_stride,
        + held_samples) for some j < n_held."""
        r = n - row0
        return (r >= 0) & (r % row_stride < held_samples) & (r // row_stride < n_held)

    @jit
    def _gn_small_bwd_kernel(
        DY, X, DX,            # (N, C * S) contiguous
        W,                    # (C,) weight (read only when HAS_WEIGHT)
        PARTIAL,              # fp32 slabs (any pointer: read as fp32), slab j from fp32 element
                              # slab0 + j * slab_stride: for the BLOCK_C values j * BLOCK_C... of a
                              # sample, (P_params, programs along axis 0, BLOCK_C) sums over each
                              # program's samples of dy * xhat (COMPUTE_DW) then of dy
                              # (COMPUTE_DB). May be DX itself: slab j (j < n_held) then lies in
                              # samples [row0 + j * row_stride, + held_samples), whose dx is
                              # left to _gn_small_finish_kernel (n_held = 0: a buffer)
        DY_DESC, X_DESC, DX_DESC,  # TMA: descriptors of dy, x, dx as (N, G, L) with (BLOCK_N, BLOCK_G, BLOCK_L)
                                   # boxes, else None
        n_samples, n_groups, group_len, n_cols, samples_per_program, slab0, slab_stride,
        n_held, row0, row_stride, held_samples, eps,
        HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
        PREFETCH: tl.constexpr,
        TMA: tl.constexpr = False,   # tiles copied by TMA (Hopper), _TMA_STAGES - 1 in flight; L == BLOCK_L,
                                     # samples_per_program, row0, row_stride, held_samples multiples of BLOCK_N
        TMA_STAGES: tl.constexpr = 3,
    ):
        # Small groups: a program takes a contiguous block of samples of BLOCK_G groups, in
        # (BLOCK_N, BLOCK_G, BLOCK_L) tiles read once (mean and rstd recomputed from the tile).
        pid, g0 = tl.program_id(0), tl.program_id(1) * BLOCK_G
        n_start = pid * samples_per_program
        n_end = tl.minimum(n_start + samples_per_program, n_samples)
        row_len = n_groups * group_len
        w, c_mask = _gn_small_weight(W, n_groups, group_len, n_cols, g0, HAS_WEIGHT, BLOCK_G, BLOCK_L)
        dw_acc = tl.zeros([BLOCK_G, BLOCK_L], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_G, BLOCK_L], dtype=tl.float32)
        if TMA:
            # whole tiles of this program's samples (none shared with another program; rows
            # past N arrive as zeros, are masked off and add nothing, their dx stores are
            # dropped), the next tiles' copies in flight in shared memory (Triton's software
            # pipeliner)
            for n0 in tl.range(n_start, n_end, BLOCK_N, num_stages=TMA_STAGES):
                rows = (n0 + tl.arange(0, BLOCK_N) < n_end)[:, None, None]             # (BN, 1, 1)
                dy = DY_DESC.load([n0, g0, 0]).to(tl.float32)                          # (BN, BG, BL)
                dx, xhat = _gn_small_dx(dy, X_DESC.load([n0, g0, 0]).to(tl.float32), w, rows, group_len, eps)
                if not _gn_held(n0, n_held, row0, row_stride, held_samples):
                    DX_DESC.store([n0, g0, 0], dx.to(DX_DESC.dtype))
                if COMPUTE_DW:
                    dw_acc += tl.sum(dy * xhat, axis=0)
                if COMPUTE_DB:
                    db_acc += tl.sum(dy, axis=0)
        else:
            if PREFETCH:
                # register double buffering: the next tile's loads are issued before this tile's
                # reductions (past n_end they are masked off and move no bytes)
                dy_next, x_next = _gn_small_loads(DY, X, row_len, n_end, n_groups, group_len, n_start, g0,
                                                  BLOCK_N, BLOCK_G, BLOCK_L)
            for n0 in range(n_start, n_end, BLOCK_N):
                offs, mask = _gn_small_tile(row_len, n_end, n_groups, group_len, n0, g0, BLOCK_N, BLOCK_G, BLOCK_L)
                if PREFETCH:
                    dy, xr = dy_next, x_next
                    dy_next, x_next = _gn_small_loads(DY, X, row_len, n_end, n_groups, group_len, n0 + BLOCK_N, g0,
                                                      BLOCK_N, BLOCK_G, BLOCK_L)
                else:
                    dy, xr = _gn_small_loads(DY, X, row_len, n_end, n_groups, group_len, n0, g0,
                                             BLOCK_N, BLOCK_G, BLOCK_L)
                dy = dy.to(tl.float32)                                                   # (BN, BG, BL)
                dx, xhat = _gn_small_dx(dy, xr.to(tl.float32), w, mask, group_len, eps)
                n = n0 + tl.arange(0, BLOCK_N)
                held = _gn_held(n, n_held, row0, row_stride, held_samples)
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask & (~held)[:, None, None])
                if COMPUTE_DW:
                    dw_acc += tl.sum(dy * xhat, axis=0)
                if COMPUTE_DB:
                    db_acc += tl.sum(dy, axis=0)
        g = g0 + tl.arange(0, BLOCK_G)
        cols = (g * group_len)[:, None] + tl.arange(0, BLOCK_L)[None, :]                # (BG, BL)
        slot = (PARTIAL.to(tl.pointer_type(tl.float32)) + slab0 + (cols // BLOCK_C).to(tl.int64) * slab_stride
                + pid * BLOCK_C + cols % BLOCK_C)
        if COMPUTE_DW:
            tl.store(slot, dw_acc, mask=c_mask)
            slot += tl.num_programs(0) * BLOCK_C
        if COMPUTE_DB:
            tl.store(slot, db_acc, mask=c_mask)

    @jit
    def _gn_small_finish_kernel(
        DY, X, DX,            # (N, C * S) contiguous
        W,                    # (C,) weight (read only when HAS_WEIGHT and RECOMPUTE)
        PARTIAL,              # the backward kernel's slabs (read as fp32; see it for the layout)
        OUT,                  # (P_params, C * S) out: the sums over programs, in OUT's dtype
        n_programs, slab0, slab_stride, row0, row_stride, slab_samples, n_groups, group_len, n_cols, eps,
        HAS_WEIGHT: tl.constexpr, N_PARAMS: tl.constexpr,
        RECOMPUTE: tl.constexpr,  # the slabs are in DX: write their samples' dx after
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        # Program j sums slab j over the programs (a fixed order: deterministic); with
        # RECOMPUTE, slab j is samples [row0 + j * row_stride, + slab_samples) of DX, read by
        # this program alone, so it then writes their dx (all groups), in tiles whose loads
        # (of dy and x, not DX) are issued one tile ahead, the first before the sums.
        j = tl.program_id(0)
        row_len = n_groups * group_len
        n_start = row0 + j * row_stride
        n_end = n_start + slab_samples
        if RECOMPUTE:
            dy_next, x_next = _gn_small_loads(DY, X, row_len, n_end, n_groups, group_len, n_start, 0,
                                              BLOCK_N, BLOCK_G, BLOCK_L)
        cc = tl.arange(0, BLOCK_C)
        col_mask = j * BLOCK_C + cc < row_len
        slab = PARTIAL.to(tl.pointer_type(tl.float32)) + slab0 + j.to(tl.int64) * slab_stride
        rows = tl.arange(0, BLOCK_P)
        for q in tl.static_range(N_PARAMS):
            acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
            for p0 in range(0, n_programs, BLOCK_P):
                mask = ((p0 + rows) < n_programs)[:, None] & col_mask[None, :]
                offs = ((q * n_programs + p0 + rows) * BLOCK_C)[:, None] + cc[None, :]      # (BP, BC)
                acc += tl.load(slab + offs, mask=mask, other=0.0)
            tl.store(OUT + q * row_len + j * BLOCK_C + cc, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)
        if RECOMPUTE:
            tl.debug_barrier()  # every thread's reads of the slab come before the writes below
            for g0 in range(0, n_groups, BLOCK_G):
                w, w_mask = _gn_small_weight(W, n_groups, group_len, n_cols, g0, HAS_WEIGHT, BLOCK_G, BLOCK_L)
                for n0 in range(n_start, n_end, BLOCK_N):
                    offs, mask = _gn_small_tile(row_len, n_end, n_groups, group_len, n0, g0, BLOCK_N, BLOCK_G, BLOCK_L)
                    dy, xr = dy_next, x_next
                    last = n0 + BLOCK_N >= n_end                    # next: this block's next tile, else
                    n_next = tl.where(last, n_start, n0 + BLOCK_N)   # the next block's first
                    dy_next, x_next = _gn_small_loads(DY, X, row_len, n_end, n_groups, group_len, n_next,
                                                      tl.where(last, g0 + BLOCK_G, g0), BLOCK_N, BLOCK_G, BLOCK_L)
                    dx, xhat = _gn_small_dx(dy.to(tl.float32), xr.to(tl.float32), w, mask, group_len, eps)
                    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers
class _Plan:
    """Tile sizes and grid of one (N, C, S) problem."""

    def __init__(self, x: torch.Tensor, num_groups: int):
        n, c = x.shape[0], x.shape[1]
        self.n_rows, self.n_cols = n * c, math.prod(x.shape[2:])
        self.n_channels, self.n_groups = c, num_groups
        self.ch_per_group = c // num_groups
        self.group_numel = self.ch_per_group * self.n_cols
        self.block_s = min(next_power_of_2(self.n_cols), _MAX_BLOCK_S)
        self.block_r = max(1, min(next_power_of_2(self.n_rows), _TILE_ELEMS // self.block_s))
        _, self.num_warps = row_settings(self.block_r * self.block_s, max_block=1 << 30)
        self.row_blocks = cdiv(self.n_rows, self.block_r)
        self.n_sblocks = cdiv(self.n_cols, self.block_s)
        # Reduction kernels: split rows into slices of whole blocks when the row blocks
        # alone cannot fill the device.
        target = (
            multiprocessor_count(x.device) * _PROGRAMS_PER_SM if x.device.type == "cuda" else _REDUCE_PROGRAMS_CPU
        )
        split = min(self.n_sblocks, max(1, cdiv(target, self.row_blocks)))
        blocks_per_chunk = cdiv(self.n_sblocks, split)
        self.n_split = cdiv(self.n_sblocks, blocks_per_chunk)
        self.chunk = blocks_per_chunk * self.block_s
        self.n_part = self.ch_per_group * self.n_split               # partials per group
        self.block_k = min(next_power_of_2(self.n_part), _MAX_BLOCK_PARTIALS)


def _group_tiles(ch_per_group: int, n_cols: int) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_S, one tile, num_warps) of the whole-group forward: the whole group as
    one tile when it fits _GROUP_FWD_ONE_TILE_ELEMS (read once), else tiles of
    _GROUP_FWD_TILE_ELEMS (the group read three times, twice from L2)."""
    c2, s2 = next_power_of_2(ch_per_group), next_power_of_2(n_cols)
    if c2 * s2 <= _GROUP_FWD_ONE_TILE_ELEMS:  # about 1024 values per warp, 4 to 16 warps
        return c2, s2, True, max(4, min(_GROUP_FWD_ONE_TILE_WARPS, c2 * s2 // 1024))
    block_s = min(s2, _MAX_BLOCK_S)
    return max(1, min(c2, _GROUP_FWD_TILE_ELEMS // block_s)), block_s, False, _GROUP_FWD_WARPS


def _group_bwd_tiles(ch_per_group: int, n_cols: int, element_size: int, words: bool = False) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_S, one tile, num_warps) of the whole-group backward for inputs of
    ``element_size`` bytes: for fp32 inputs a sample's group as one tile when it fits
    _GROUP_BWD_ONE_TILE_ELEMS (dy and x read once), else all the group's channels x a few
    values, _GROUP_BWD_TILE_ELEMS in all (read twice, the second time from L2). With
    ``words`` (16-bit inputs that can be read as int32 words) a sample's group is one tile
    under the same rule as fp32's, when a channel's values are at most _WORDS_MAX_ROW words."""
    c2, s2 = next_power_of_2(ch_per_group), next_power_of_2(n_cols)
    held = element_size == 4 or (words and s2 // 2 <= _WORDS_MAX_ROW)
    if held and c2 * s2 <= _GROUP_BWD_ONE_TILE_ELEMS:  # ~1024 values per warp, 4 to 16 warps
        return c2, s2, True, max(4, min(_GROUP_BWD_ONE_TILE_WARPS, c2 * s2 // 1024))
    return c2, max(1, min(s2, _GROUP_BWD_TILE_ELEMS // c2)), False, _GROUP_BWD_WARPS


def _small_groups(x: torch.Tensor, num_groups: int, backward: bool = False) -> bool:
    """Whether the small-group kernels run: a group's Cg * S values number at most
    _SMALL_GROUP_MAX_LEN (_SMALL_GROUP_MAX_LEN_BWD for the backward; powers of two, so the
    padded length fits too), a sample's C * S values fewer than 2^30 (offsets within a sample,
    and into the backward's (2, C * S) sums, are int32) and the groups at most 65535 (their
    blocks are grid axis 1, which CUDA caps there). Plain comparisons, so that the fake
    forward can ask it of symbolic shapes."""
    group_len = x.numel() // max(1, x.shape[0] * num_groups)
    limit = _SMALL_GROUP_MAX_LEN_BWD if backward else _SMALL_GROUP_MAX_LEN
    return group_len <= limit and group_len * num_groups < 2**30 and num_groups <= 65535


def _mean_groups(x: torch.Tensor, num_groups: int) -> int:
    """Columns of the (N, ...) fp32 mean that the forward returns for the backward: none
    after the small-group forward (the small-group backward, which then always runs, reads
    each whole group and recomputes it), else one per group."""
    return 0 if _small_groups(x, num_groups) else num_groups


def _small_tiles(n_samples: int, num_groups: int, group_len: int, element_size: int,
                 backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_N samples, BLOCK_G groups, BLOCK_L values, num_warps) of a small-group tile:
    forward, _SMALL_TILE_ELEMS values under 8 warps; backward, _SMALL_BWD_TILE_BYTES of each
    input under 16 warps (8192 bf16 values) for groups of at most 128 values (padded), else
    half that under 8 warps (256 values) or 4 (more): the best of an H200 sweep at each
    group size (the backward's larger tiles took 378 us against 100 at 512 values per
    group, and 82 against 92 at 128; fp32, 128 values: 233 us with 4096-value tiles, 310
    with 8192)."""
    block_l = next_power_of_2(group_len)
    elems, per_warp = _SMALL_TILE_ELEMS, 512
    if backward:
        elems = _SMALL_BWD_TILE_BYTES // element_size // (1 if block_l <= 128 else 2)
        per_warp = 512 if block_l <= 256 else 1024
    block_g = min(next_power_of_2(num_groups), max(1, elems // block_l))
    block_n = min(next_power_of_2(n_samples), max(1, elems // (block_g * block_l)))
    return block_n, block_g, block_l, max(4, min(16, block_n * block_g * block_l // per_warp))


def _small_bwd_grid(device: torch.device, n_samples: int, num_groups: int, block_n: int, block_g: int,
                    num_warps: int) -> tuple[int, int]:
    """(programs along samples, samples per program) of the small-group backward: one
    program per SM for 16-warp tiles, else _SMALL_BWD_PROGRAMS_PER_SM (split among the blocks
    of groups), each owning whole tiles of samples."""
    per_sm = 1 if num_warps >= 16 else _SMALL_BWD_PROGRAMS_PER_SM
    programs = _utils.persistent_programs(device, n_samples, per_sm, _SMALL_BWD_PROGRAMS_CPU)
    programs = max(1, programs // cdiv(num_groups, block_g))
    spp = cdiv(cdiv(n_samples, programs), block_n) * block_n
    return cdiv(n_samples, spp), spp


def _whole_groups(x: torch.Tensor, num_groups: int, backward: bool = False) -> bool:
    """Whether the whole-group kernels run (enough (sample, group) pairs to fill the
    device; else the split kernels) and each group has fewer than 2^31 values (their
    offsets within a group are int32). The backward's also needs a group's channels in one
    tile (at most _MAX_GROUP_CHANNELS)."""
    if backward and next_power_of_2(x.shape[1] // num_groups) > _MAX_GROUP_CHANNELS:
        return False
    if x.numel() // max(1, x.shape[0] * num_groups) >= 2**31:
        return False
    programs = x.shape[0] * num_groups
    if x.device.type == "cuda":
        return programs >= multiprocessor_count(x.device) * _WHOLE_GROUP_PROGRAMS_PER_SM
    return programs >= _WHOLE_GROUP_PROGRAMS_CPU


def _tma_bwd_ok(x: torch.Tensor, dy: torch.Tensor, num_groups: int, n_cols: int) -> bool:
    """Whether the whole-group backward of contiguous ``x`` and ``dy`` can load each
    sample's group as one TMA box (see _TMA_BWD): 16-bit or fp32 values, dy of x's dtype,
    both 16-byte aligned, a (Cg, S) group of powers of two, each at most 256, rows of S
    values of 16 bytes or more, _TMA_MIN_TILE_ELEMS to _TMA_MAX_TILE_ELEMS values whose
    _TMA_STAGES pipeline stages fit in _TMA_SHARED_BYTES of shared memory (two slots per
    operand and the dx store's box: fp32 boxes of at most 8192 values), fewer than 2**31
    rows of S values, and an NVIDIA GPU of compute capability 9.x (unless forced)."""
    ch_per_group = x.shape[1] // num_groups
    tile = ch_per_group * n_cols
    esize = x.element_size()
    shape_ok = (esize in (2, 4) and (2 * _TMA_STAGES - 1) * tile * esize <= _TMA_SHARED_BYTES and dy.dtype == x.dtype
                and x.data_ptr() % 16 == 0 and dy.data_ptr() % 16 == 0
                and ch_per_group & (ch_per_group - 1) == 0 and n_cols & (n_cols - 1) == 0
                and ch_per_group <= 256 and 16 // esize <= n_cols <= 256
                and _TMA_MIN_TILE_ELEMS <= tile <= _TMA_MAX_TILE_ELEMS and x.shape[0] * x.shape[1] < 2**31)
    return shape_ok and _tma_device_ok(x)



def _tma_device_ok(x: torch.Tensor) -> bool:
    """Whether the backwards' TMA paths may run on ``x``'s device (_utils.hopper_tma, forced
    by _TMA_BWD)."""
    return _utils.hopper_tma(x, _TMA_BWD)


def _small_tma_ok(x: torch.Tensor, dy: torch.Tensor, num_groups: int, group_len: int,
                  block_n: int, block_g: int, block_l: int) -> bool:
    """Whether the small-group backward of contiguous ``x`` and ``dy`` can copy its
    (BLOCK_N, BLOCK_G, BLOCK_L) tiles by TMA from (N, G, L) views: 16-bit values, dy of
    x's dtype, both 16-byte aligned, groups of exactly BLOCK_L values (a power of two; 16
    bytes or more), each box side at most 256, and fewer than 2**31 samples x groups; on
    the devices of _tma_device_ok."""
    return (x.element_size() == 2 and dy.dtype == x.dtype and x.data_ptr() % 16 == 0 and dy.data_ptr() % 16 == 0
            and group_len == block_l and group_len * 2 % 16 == 0 and max(block_n, block_g, block_l) <= 256
            and x.shape[0] * num_groups < 2**31 and _tma_device_ok(x))


def _hold_last_ok(x: torch.Tensor, num_groups: int) -> bool:
    """Whether each group's last chunk of the TMA backward may wait for the group's other
    chunks (HOLD_LAST, see _HOLD_LAST): on a GPU, when the waiting programs (one per group)
    are fewer than the SMs, so that programs that never wait always have an SM to run on
    (they finish whatever order the hardware starts programs in); under the interpreter,
    whose programs run one after another in order, always (the last chunks come last)."""
    if _HOLD_LAST is not None:
        return _HOLD_LAST
    return x.device.type != "cuda" or num_groups < multiprocessor_count(x.device)


def _group_bwd_plan(x: torch.Tensor, dy: torch.Tensor, num_groups: int
                    ) -> tuple[int, int, bool, int, bool, int, bool]:
    """(BLOCK_C, BLOCK_S, one tile, num_warps, words, samples per program, tma) of the
    whole-group backward of contiguous ``x`` and ``dy``. ``tma``: each sample's group one
    TMA box (_tma_bwd_ok), in chunks of at least _WORDS_MIN_SAMPLES samples on a GPU.
    ``words``: 16-bit values read as int32 words,
    two a word (dy of x's dtype, an even number of values per channel, 4-byte aligned
    tensors), one tile a sample's group (see _group_bwd_tiles), in chunks of at least
    _WORDS_MIN_SAMPLES samples on a GPU; else the tiles of _group_bwd_tiles."""
    n_cols = x.numel() // (x.shape[0] * x.shape[1])
    ch_per_group, elt = x.shape[1] // num_groups, x.element_size()
    if _tma_bwd_ok(x, dy, num_groups, n_cols):
        tile = ch_per_group * n_cols
        warps = 16 if tile > _TMA_MIN_TILE_ELEMS else 8  # 128 registers a thread: 16 // warps programs per SM
        spp = _samples_per_program(x, num_groups, True, warps)
        if x.device.type != "cuda" or spp >= _WORDS_MIN_SAMPLES:
            return ch_per_group, n_cols, True, warps, False, spp, True
    words = (_WORDS_ONE_TILE and elt == 2 and dy.dtype == x.dtype and n_cols % 2 == 0 and x.data_ptr() % 4 == 0
             and dy.data_ptr() % 4 == 0)
    block_c, block_s, one_tile, warps = _group_bwd_tiles(ch_per_group, n_cols, elt, words)
    if words and one_tile:
        spp = _samples_per_program(x, num_groups, one_tile, warps)
        if x.device.type != "cuda" or spp >= _WORDS_MIN_SAMPLES:
            return block_c, block_s, True, warps, True, spp, False
        block_c, block_s, one_tile, warps = _group_bwd_tiles(ch_per_group, n_cols, elt)  # too short to pipeline
    return block_c, block_s, one_tile, warps, False, _samples_per_program(x, num_groups, one_tile), False


def _samples_per_program(x: torch.Tensor, num_groups: int, one_tile: bool = False, words_warps: int = 0) -> int:
    """Samples each program of the whole-group backward takes (a chunk; see the kernel);
    ``words_warps``: the warps of the 16-bit one-tile kernel, 0 for the others."""
    if _SAMPLES_PER_PROGRAM is not None:
        return _SAMPLES_PER_PROGRAM
    if x.device.type != "cuda":
        return _SAMPLES_PER_PROGRAM_CPU
    if words_warps:
        return words_chunk_samples(x.shape[0], num_groups, multiprocessor_count(x.device), words_warps)
    return chunk_samples(x.shape[0], num_groups, multiprocessor_count(x.device), one_tile)


@functools.lru_cache(maxsize=256)
def words_chunk_samples(n_samples: int, num_groups: int, sm_count: int, num_warps: int) -> int:
    """Samples per program of the whole-group backward's 16-bit one-tile kernel, whose
    programs each hold a sample's group and the next one's in registers (about 128 a
    thread: 16 // num_warps programs per SM): the chunk with the least estimated time,
    ``ceil(programs / programs in flight) * (chunk + 1)`` in units of a sample's time (each
    program also pays about one sample's time for its unhidden first load and its share of
    the parameter gradients), the longest on ties, at most _WORDS_MAX_SAMPLES samples unless
    _MAX_CHUNKS chunks a group need more. H200, (N, 4096, 128) bf16, 32 groups, us for
    chunks of 4 / 8 / 16 / 32 samples (session 14, run 2): N = 64: 77.1 / 68.1 / 63.5 /
    108.3 (16 chosen); 128: 142.9 / 130.6 / 121.4 / 121.4 (32); 256: 272.2 / 247.9 / 235.8
    / 229.0 (32 chosen; 64, the choice without the cap, took 239.7 in run 3, 32 240.6 in
    run 5)."""
    in_flight = sm_count * max(1, 16 // num_warps)
    best = (math.inf, 0)
    lo = cdiv(n_samples, _MAX_CHUNKS)
    for spp in range(lo, max(lo, min(n_samples, _WORDS_MAX_SAMPLES)) + 1):
        best = min(best, (cdiv(num_groups * cdiv(n_samples, spp), in_flight) * (spp + 1), -spp))
    return -best[1]


def chunk_samples(n_samples: int, num_groups: int, sm_count: int, one_tile: bool = False) -> int:
    """Samples per program of the whole-group backward on a GPU with ``sm_count`` SMs:
    _MAX_SAMPLES_PER_PROGRAM (_ONE_TILE_SAMPLES_PER_PROGRAM for one-tile groups, whose
    programs fill an SM alone), fewer when that would leave under _GROUP_BWD_PROGRAMS_PER_SM
    programs per SM (one), more when a group would have over _MAX_CHUNKS chunks."""
    per_sm, most = (1, _ONE_TILE_SAMPLES_PER_PROGRAM) if one_tile else (_GROUP_BWD_PROGRAMS_PER_SM,
                                                                         _MAX_SAMPLES_PER_PROGRAM)
    spp = max(1, min(most, (n_samples * num_groups) // (sm_count * per_sm)))
    spp = 1 << (spp.bit_length() - 1)  # a power of two (H200, (16, 512, 32, 32) fp32: 3 took 65 us, 2 or 4 55)
    return max(spp, cdiv(n_samples, _MAX_CHUNKS))  # bounds the slots each group's last program adds


_SCRATCH_IN_DX = True  # tests: False keeps the backwards' fp32 sums in their own buffers


def _slot_plan(dx: torch.Tensor, num_groups: int, n_chunks: int, slot_len: int) -> tuple[int, int]:
    """Where the whole-group backward keeps each chunk's fp32 sums (``slot_len`` values a
    chunk, ``n_chunks`` chunks a group): ``(n_scratch, slots per sample)`` when they lie in
    the group's values of dx's last ``n_scratch`` samples (whose dx the group's last program
    writes after adding them up), else ``(0, 0)``: a buffer. In dx when each group's values
    span whole 4-byte words and hold at least one slot, dx starts 16-byte aligned (always,
    for a new tensor), at most min(_MAX_SCRATCH_SAMPLES, max(1, N // 2)) samples are needed
    and ``_SCRATCH_IN_DX`` allows it."""
    n = dx.shape[0]
    group_bytes = dx.numel() // (n * num_groups) * dx.element_size()
    aligned = group_bytes % 4 == 0 and dx.data_ptr() % 16 == 0
    per_sample = group_bytes // (4 * slot_len) if aligned else 0
    if not _SCRATCH_IN_DX or per_sample == 0:
        return 0, 0
    n_scratch = cdiv(n_chunks, per_sample)
    if n_scratch > min(_MAX_SCRATCH_SAMPLES, max(1, n // 2)):
        return 0, 0
    return n_scratch, per_sample


def _launch_forward(x, num_groups, weight, bias, eps):
    """Returns y (x's shape and dtype, contiguous) and the fp32 mean kept for the backward:
    (N, G), or (N, 0) after the small-group kernels (see _mean_groups)."""
    n = x.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y, x.new_zeros((n, _mean_groups(x, num_groups)), dtype=torch.float32)
    if _small_groups(x, num_groups):
        mean = torch.empty((n, 0), dtype=torch.float32, device=x.device)   # nothing kept
        xc = x if x.is_contiguous() else x.contiguous()
        group_len = xc.numel() // (n * num_groups)
        block_n, block_g, block_l, warps = _small_tiles(n, num_groups, group_len, x.element_size())
        with device_guard(x):
            _gn_small_fwd_kernel[(cdiv(n, block_n), cdiv(num_groups, block_g))](
                xc, y, weight.contiguous() if weight is not None else xc, bias.contiguous() if bias is not None else xc,
                n, num_groups, group_len, group_len // (x.shape[1] // num_groups), float(eps),
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_L=block_l, num_warps=warps,
            )
        return y, mean
    if _whole_groups(x, num_groups):
        mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
        xc = x if x.is_contiguous() else x.contiguous()
        ch_per_group = x.shape[1] // num_groups
        n_cols = xc.numel() // (n * x.shape[1])
        block_c, block_s, one_tile, warps = _group_tiles(ch_per_group, n_cols)
        with device_guard(x):
            _gn_group_fwd_kernel[(n * num_groups,)](
                xc, y, weight.contiguous() if weight is not None else xc, bias.contiguous() if bias is not None else xc,
                mean, num_groups, ch_per_group, n_cols, float(eps),
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_C=block_c, BLOCK_S=block_s, ONE_TILE=one_tile, num_warps=warps,
            )
        return y, mean
    mean = torch.zeros((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.zeros((n, num_groups), dtype=torch.float32, device=x.device)
    p = _Plan(x, num_groups)
    xc = x.contiguous()                                                  # (N, C, *) = (R, S) rows
    mean_p = torch.empty((p.n_rows, p.n_split), dtype=torch.float32, device=x.device)
    m2_p = torch.empty_like(mean_p)
    w = weight.contiguous() if weight is not None else xc
    b = bias.contiguous() if bias is not None else xc
    with device_guard(x):
        _gn_stats_kernel[(p.row_blocks * p.n_split,)](
            xc, mean_p, m2_p, p.n_rows, p.n_cols, p.chunk, p.n_split,
            BLOCK_R=p.block_r, BLOCK_S=p.block_s, num_warps=p.num_warps,
        )
        _gn_stats_combine_kernel[(n * num_groups,)](
            mean_p, m2_p, mean, rstd, p.n_part, p.n_split, p.chunk, p.n_cols, float(p.group_numel), float(eps),
            BLOCK_K=p.block_k, num_warps=4,
        )
        _gn_fwd_kernel[(p.row_blocks * p.n_sblocks,)](
            xc, y, w, b, mean, rstd, p.n_rows, p.n_cols, p.n_channels, p.ch_per_group, p.n_sblocks,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_R=p.block_r, BLOCK_S=p.block_s, num_warps=p.num_warps,
        )
    return y, mean


def _launch_backward(dy, x, num_groups, weight, mean, eps, compute_dw, compute_db, param_dtype):
    """Returns dx (x's shape and dtype, contiguous) and the (P, C) parameter gradients in
    ``param_dtype``: dweight then dbias, each only when requested (P = 0, 1 or 2). ``mean``
    is the forward's fp32 mean: (N, G), rstd recomputed from it (with ``eps``), or (N, 0)
    after the small-group forward, whose backward recomputes both."""
    n, c = x.shape[0], x.shape[1]
    n_params = int(compute_dw) + int(compute_db)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return dx, torch.zeros((n_params, c), dtype=param_dtype, device=x.device)
    if mean.shape[1] == 0 or _small_groups(x, num_groups, backward=True):
        xc = x if x.is_contiguous() else x.contiguous()
        dyc = dy if dy.is_contiguous() else dy.contiguous()
        group_len = xc.numel() // (n * num_groups)
        n_cols = group_len // (c // num_groups)
        block_n, block_g, block_l, warps = _small_tiles(n, num_groups, group_len, x.element_size(), backward=True)
        # the next tile's loads issued early, except where their registers would leave one
        # 8-warp program per SM instead of two (16-bit tiles of 4096 values)
        prefetch = not (x.element_size() == 2 and warps == 8)
        prefetch = _SMALL_BWD_PREFETCH if _SMALL_BWD_PREFETCH is not None else prefetch
        programs, spp = _small_bwd_grid(x.device, n, num_groups, block_n, block_g, warps)
        tma = _small_tma_ok(xc, dyc, num_groups, group_len, block_n, block_g, block_l)
        row_len = c * n_cols
        # slabs of _SMALL_SLAB_VALUES values of a sample, wider for long samples (each slab
        # in dx takes at least one sample: at most N / 4 slabs), up to 1024
        block_c = min(max(_SMALL_SLAB_VALUES, next_power_of_2(cdiv(4 * row_len, n))), 1024, next_power_of_2(row_len))
        n_slabs = cdiv(row_len, block_c)
        slab_values = n_params * programs * block_c
        # In dx: each slab spans whole samples (slab_samples, 4-byte aligned), at most half
        # of them in all (else one fp32 buffer).
        sample_bytes = row_len * x.element_size()
        step = 4 // math.gcd(sample_bytes, 4)
        if tma:  # whole tiles of samples either side of the slabs
            step = max(step, block_n)
        slab_samples = cdiv(cdiv(slab_values * 4, sample_bytes), step) * step
        in_dx = n_params > 0 and 2 * n_slabs * slab_samples <= n and _SCRATCH_IN_DX
        if in_dx:
            # slab j in the last samples of program j's block when those blocks are whole and
            # stay 4-byte aligned (their dy and x were just read: the finishing kernel's
            # second read of them hits L2), else in dx's first samples
            row0, row_stride = 0, slab_samples
            if (_SLABS_AT_BLOCK_ENDS and n_slabs <= n // spp and slab_samples <= spp
                    and spp * sample_bytes % 4 == 0):
                row0, row_stride = spp - slab_samples, spp
            partial, n_held = dx, n_slabs
            slab0, slab_stride = row0 * sample_bytes // 4, row_stride * sample_bytes // 4
        else:
            partial = torch.empty(n_slabs * slab_values, dtype=torch.float32, device=x.device) if n_params else dx
            slab0, slab_stride, n_held, row0, row_stride = 0, slab_values, 0, 0, 1
        w = weight.contiguous() if weight is not None else xc
        tiles = dict(BLOCK_N=block_n, BLOCK_G=block_g, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps)
        descs = (tuple(_utils.tma_descriptor(t.view(n, num_groups, group_len), [block_n, block_g, block_l])
                       for t in (dyc, xc, dx)) if tma else (None,) * 3)
        with device_guard(x):
            _gn_small_bwd_kernel[(programs, cdiv(num_groups, block_g))](
                dyc, xc, dx, w, partial, *descs, n, num_groups, group_len, n_cols, spp, slab0, slab_stride,
                n_held, row0, row_stride, slab_samples, float(eps),
                HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, PREFETCH=prefetch,
                TMA=tma, TMA_STAGES=_TMA_STAGES, **tiles,
            )
        if n_params == 0:
            return dx, torch.empty((0, c), dtype=param_dtype, device=x.device)
        # per (channel, spatial) sums, the spatial values of each channel added after (H200:
        # partial rows of C channels per (program, spatial index) instead, one sum over
        # programs x S rows, took 143 against 113 us at (2048, 512, 16), 186 against 149 at
        # (1024, 4096, 16): scattered stores and a tall sum)
        out = torch.empty((n_params, row_len), dtype=param_dtype if n_cols == 1 else torch.float32, device=x.device)
        with device_guard(x):
            _gn_small_finish_kernel[(n_slabs,)](
                dyc, xc, dx, w, partial, out, programs, slab0, slab_stride, row0, row_stride, slab_samples,
                num_groups, group_len, n_cols,
                float(eps), HAS_WEIGHT=weight is not None, N_PARAMS=n_params, RECOMPUTE=in_dx,
                BLOCK_P=max(1, min(16, 4096 // block_c)), **tiles,
            )
        return dx, out if n_cols == 1 else out.view(n_params, c, n_cols).sum(-1).to(param_dtype)
    if _whole_groups(x, num_groups, backward=True):
        xc = x if x.is_contiguous() else x.contiguous()
        dyc = dy if dy.is_contiguous() else dy.contiguous()
        ch_per_group = c // num_groups
        n_cols = xc.numel() // (n * c)
        block_c, block_s, one_tile, warps, words, spp, tma = _group_bwd_plan(xc, dyc, num_groups)
        n_chunks = cdiv(n, spp)
        out = torch.empty((n_params, c), dtype=param_dtype, device=x.device)
        slots = ticket = dx                                    # placeholders when unused
        slot0, region_stride, per_region, n_scratch, ticket_stride = 0, 0, 1, 0, 1
        if n_params and n_chunks > 1:
            slot_len = n_params * ch_per_group                 # fp32 sums of one chunk
            n_scratch, per_region = _slot_plan(dx, num_groups, n_chunks, slot_len)
            if n_scratch:  # in the group's values of the last n_scratch samples
                region_stride = ch_per_group * n_cols * dx.element_size() // 4
                slot0 = (n - n_scratch) * num_groups * region_stride
            else:
                slots = torch.empty(num_groups * n_chunks * slot_len, dtype=torch.float32, device=x.device)
                per_region, region_stride = n_chunks, n_chunks * slot_len
            # the arrival counters: the first 4 bytes of each group's values in out's first
            # row (overwritten by the group's total), else a buffer
            out_bytes = ch_per_group * out.element_size()
            if out_bytes % 4 == 0:
                out[0].view(num_groups, ch_per_group)[:, : cdiv(4, out.element_size())].zero_()
                ticket, ticket_stride = out, out_bytes // 4
            else:
                ticket = torch.zeros(num_groups, dtype=torch.int32, device=x.device)
        descs = (tuple(_utils.tma_descriptor(t.view(-1, n_cols), [ch_per_group, n_cols]) for t in (dyc, xc, dx))
                 if tma else (None,) * 3)
        hold_last = tma and n_scratch == 1 and _hold_last_ok(x, num_groups)
        with device_guard(x):
            _gn_group_bwd_kernel[(n_chunks * num_groups,)](
                dyc, xc, dx, weight.contiguous() if weight is not None else xc,
                mean if mean.is_contiguous() else mean.contiguous(),
                slots, out if n_params else dx, ticket, *descs,
                n, num_groups, ch_per_group, n_cols, spp, float(eps),
                slot0, region_stride, per_region, n_scratch, ticket_stride, 16,
                HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                BLOCK_C=block_c, BLOCK_S=block_s, ONE_TILE=one_tile,
                SLOT_BLOCK=max(1, min(next_power_of_2(n_chunks), _SLOT_LOAD_ELEMS // block_c)), num_warps=warps,
                WORDS=words, PREFETCH=words and _WORDS_PREFETCH, TMA=tma, TMA_STAGES=_TMA_STAGES, HOLD_LAST=hold_last,
                **({"maxnreg": _REGISTERS_PER_SM // (32 * warps * _GROUP_BWD_PROGRAMS_PER_SM)}
                   if x.element_size() == 2 and not one_tile else {}),
            )
        return dx, out
    p = _Plan(x, num_groups)
    xc, dyc = x.contiguous(), dy.contiguous()
    mean1 = mean.contiguous()
    a_p = torch.empty((p.n_rows, p.n_split), dtype=torch.float32, device=x.device)
    b_p = torch.empty_like(a_p)
    v_p = torch.empty_like(a_p)
    rstd = torch.empty(mean.shape, dtype=torch.float32, device=x.device)
    sum_g = torch.empty_like(rstd)
    sum_gx = torch.empty_like(rstd)
    w = weight.contiguous() if weight is not None else xc
    with device_guard(x):
        _gn_bwd_reduce_kernel[(p.row_blocks * p.n_split,)](
            dyc, xc, mean1, a_p, b_p, v_p, p.n_rows, p.n_cols, p.ch_per_group, p.chunk, p.n_split,
            BLOCK_R=p.block_r, BLOCK_S=p.block_s, num_warps=p.num_warps,
        )
        _gn_bwd_combine_kernel[(mean.numel(),)](
            a_p, b_p, v_p, w, rstd, sum_g, sum_gx, p.n_groups, p.ch_per_group, p.n_split,
            float(p.group_numel), float(eps),
            HAS_WEIGHT=weight is not None, BLOCK_K=p.block_k, num_warps=4,
        )
        _gn_bwd_dx_kernel[(p.row_blocks * p.n_sblocks,)](
            dyc, xc, dx, w, mean1, rstd, sum_g, sum_gx,
            p.n_rows, p.n_cols, p.n_channels, p.ch_per_group, p.n_sblocks, float(p.group_numel),
            HAS_WEIGHT=weight is not None, BLOCK_R=p.block_r, BLOCK_S=p.block_s, num_warps=p.num_warps,
        )
    sums = []
    if compute_dw:
        sums.append(a_p.view(n, c, p.n_split).sum(dim=(0, 2)))
    if compute_db:
        sums.append(b_p.view(n, c, p.n_split).sum(dim=(0, 2)))
    params = torch.stack(sums) if sums else torch.empty((0, c), dtype=torch.float32, device=x.device)
    return dx, params.to(param_dtype)


# ----------------------------------------------------------------------------- ops (torch.library + eager path)
@kernel_op("group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # (y, mean): the fp32 mean, (N, G) or (N, 0) (see _mean_groups), is all the backward keeps
    return _launch_forward(x, num_groups, weight, bias, eps)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps):
    mean = x.new_empty((x.shape[0], _mean_groups(x, num_groups)), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), mean


@kernel_op("group_norm_backward", mutates_args=())
def _group_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    eps: float,
    compute_dw: bool,
    compute_db: bool,
    param_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_backward(dy, x, num_groups, weight, mean, eps, compute_dw, compute_db, param_dtype)


@_group_norm_backward_op.register_fake
def _(dy, x, num_groups, weight, mean, eps, compute_dw, compute_db, param_dtype):
    n_params = int(compute_dw) + int(compute_db)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, x.new_empty((n_params, x.shape[1]), dtype=param_dtype)


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradient for mean
    x, num_groups, weight, bias, eps = inputs
    _, mean = output
    ctx.save_for_backward(x, weight, mean)
    ctx.num_groups, ctx.eps = num_groups, eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.w_dtype = weight.dtype if weight is not None else None
    ctx.b_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dmean):
    x, weight, mean = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    compute_dw = ctx.has_weight and ctx.needs_input_grad[2]
    compute_db = ctx.has_bias and ctx.needs_input_grad[3]
    param_dtype = _utils.param_grad_dtype(ctx.w_dtype if compute_dw else None, ctx.b_dtype if compute_db else None)
    dx, params = ops.group_norm_backward(
        dy, x, ctx.num_groups, weight, mean, ctx.eps, compute_dw, compute_db, param_dtype
    )                                                                    # (P, C)
    return (
        dx,
        None,
        params[0].to(ctx.w_dtype) if compute_dw else None,
        params[-1].to(ctx.b_dtype) if compute_db else None,
        None,
    )


ops.group_norm.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- reference
def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Plain-PyTorch :func:`group_norm` with the same math: statistics and affine in
    ``promote_types(x.dtype, float32)`` (float64 input gives a float64 reference), one
    rounding to ``x.dtype`` at the end. Differentiable by torch autograd.

    Arguments, shapes, dtypes and errors as :func:`group_norm`.
    """
    _check_args(x, num_groups, weight, bias)
    ct = torch.promote_types(x.dtype, torch.float32)
    n, c = x.shape[0], x.shape[1]
    num_groups = int(num_groups)
    xg = x.to(ct).reshape(n, num_groups, (c // num_groups) * math.prod(x.shape[2:]))  # (N, G, L)
    xc = xg - xg.mean(dim=-1, keepdim=True)
    y = (xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps)).reshape(x.shape)
    affine_shape = (1, c) + (1,) * (x.dim() - 2)                           # broadcast over N, spatial
    if weight is not None:
        y = y * weight.to(ct).view(affine_shape)
    if bias is not None:
        y = y + bias.to(ct).view(affine_shape)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- public API
def _check_args(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]
) -> None:
    if not x.is_floating_point():
        raise ValueError(f"group_norm expects a floating-point input, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"group_norm expects an input of shape (N, C, *), got {tuple(x.shape)}")
    c = x.shape[1]
    if not is_int(num_groups) or int(num_groups) < 1 or c % int(num_groups):
        raise ValueError(f"num_groups must be a positive int dividing the {c} channels, got {num_groups!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _utils.check_norm_param(name, p, x, c, "the channels of x")



def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Group normalisation (Wu & He, 2018, arXiv 1803.08494), as
    ``torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)``.

    Each sample's channels are split into ``num_groups`` groups of consecutive channels;
    every (sample, group) is normalised by its own mean and biased variance (fp32), then
    channel ``c`` is scaled by ``weight[c]`` and shifted by ``bias[c]``; the result is
    rounded once to ``x.dtype``. The backward returns ``dx``, ``dweight`` and ``dbias``
    (the last two accumulated in fp32, then cast to the parameter dtypes).

    Args:
        x: (N, C, *) with any number of spatial dims (including none), fp32 / bf16 / fp16
            (float64, and planes of 2^30 values or more per (sample, channel), run the
            torch reference). Non-contiguous inputs (e.g. channels-last) are copied to the
            contiguous layout first.
        num_groups: G, a divisor of C.
        weight: (C,) any float dtype, or None (no scale).
        bias: (C,) any float dtype, or None (no shift).
        eps: added to the variance.

    Returns:
        y: same shape and dtype as ``x``, contiguous.

    Raises:
        ValueError: non-float ``x`` or parameters, ``x`` with fewer than 2 dims,
            ``num_groups`` not a positive divisor of C, ``weight`` / ``bias`` not of
            shape (C,), or devices differ.
    """
    _check_args(x, num_groups, weight, bias)
    if not _utils.triton_ok(x) or not _plane_fits(x):
        return group_norm_reference(x, num_groups, weight, bias, eps)
    y, _ = ops.group_norm(x, int(num_groups), weight, bias, float(eps))
    return y


def _plane_fits(x: torch.Tensor) -> bool:
    """Whether the kernels' 32-bit column arithmetic covers ``x``: fewer than 2^30 values per
    (sample, channel) plane (the split kernels' slice starts and column indices are int32).
    Larger planes (4 GiB of bf16 per channel) run the torch reference."""
    return x.numel() == 0 or x.numel() // (x.shape[0] * x.shape[1]) < 2**30
