"""Rotary position embedding (RoPE), Hugging Face half-split layout.

Math (Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021),
in the layout of HF ``apply_rotary_pos_emb`` / ``rotate_half``: feature ``i`` is paired
with ``i + R/2`` over the first ``R`` (= rotary_dim) features, and
``cos, sin = cat(freqs, freqs).cos(), .sin()``. With ``x1 = x[..., :R/2]``,
``x2 = x[..., R/2:R]`` and ``c1, c2, s1, s2`` the halves of cos and sin::

    out[..., :R/2]  = x1 * c1 - x2 * s1          (= x * cos + rotate_half(x) * sin)
    out[..., R/2:R] = x2 * c2 + x1 * s2
    out[..., R:]    = x[..., R:]                  (partial rotary: Phi-3 / phi-4-mini)

The map is linear in ``x``; its transpose gives the backward (a rotation by minus the
angle when ``c1 == c2`` and ``s1 == s2``, as HF's layout guarantees)::

    dx1 = g1 * c1 + g2 * s2
    dx2 = g2 * c2 - g1 * s1

All math is fp32; outputs are rounded once to the input dtype. cos/sin are treated as
constants (no gradient flows to them).
"""
from __future__ import annotations

import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["rope", "rope_reference", "rope_cos_sin"]

# A program rotates one token. When every q head fits one tile of at most _TILE_ELEMS
# elements per half, and every k head another, it loads all four half-tiles before its first
# store (the most bytes in flight); past that it walks the heads in blocks of at most
# _MAX_BLOCK_HEADS. Head and feature counts are compile-time constants (one compile per head
# shape, and a model has one), so masks that cover a whole tile fold away. So are the head
# strides when every one is D (heads contiguous within a token: a model's layouts), which makes
# every offset within a token a constant; other head strides (a (B, H, T, D) buffer seen as
# (B, T, H, D): T D, a new value per sequence length) are read at run time (Triton still
# compiles apart strides that are multiples of 16 or not, and past 2^31 or not). Offsets within a
# token are 32-bit unless one reaches _WIDE_AT elements (such a buffer can put its last heads
# past 2^31). All three are module-level so tests can shrink them (a small _WIDE_AT runs the
# 64-bit branch on small tensors).
_MAX_BLOCK_HEADS = 16
_TILE_ELEMS = 4096
_WIDE_AT = 2**31 - 1


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _head_offsets(s_h, h0, N_HEADS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_W: tl.constexpr, WIDE: tl.constexpr):
        """(offsets, mask) of features [0, WIDTH) of heads [h0, h0 + BLOCK_H) of one token
        (head stride s_h: a run-time value, or a constant the offsets fold into), each
        (BLOCK_H, BLOCK_W), masked to N_HEADS heads; int64 offsets iff WIDE."""
        heads = h0 + tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK_W)
        mask = (heads < N_HEADS)[:, None] & (offs < WIDTH)[None, :]
        if WIDE:
            ptr_offs = heads.to(tl.int64)[:, None] * s_h + offs[None, :]
        else:
            ptr_offs = heads[:, None] * s_h + offs[None, :]
        return ptr_offs, mask

    @triton.jit
    def _load_halves(X, sx_h, h0, N_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_R: tl.constexpr, WIDE: tl.constexpr):
        """Heads [h0, h0 + BLOCK_H) of one token, masked to N_HEADS: (x1, x2), each
        (BLOCK_H, BLOCK_R) fp32, the features [0, HALF) and [HALF, 2 HALF)."""
        offs, mask = _head_offsets(sx_h, h0, N_HEADS, HALF, BLOCK_H, BLOCK_R, WIDE)
        x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        return x1, x2

    @triton.jit
    def _store_rotated(O, so_h, h0, N_HEADS: tl.constexpr, HALF: tl.constexpr, x1, x2, c1, c2, sa, sb,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr):
        """Stores ``x1 c1 - x2 sa`` and ``x2 c2 + x1 sb`` (one rounding each) at features
        [0, HALF) and [HALF, 2 HALF) of heads [h0, h0 + BLOCK_H), masked to N_HEADS."""
        offs, mask = _head_offsets(so_h, h0, N_HEADS, HALF, BLOCK_H, BLOCK_R, WIDE)
        tl.store(O + offs, (x1 * c1[None, :] - x2 * sa[None, :]).to(O.dtype.element_ty), mask=mask)
        tl.store(O + offs + HALF, (x2 * c2[None, :] + x1 * sb[None, :]).to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _copy_pass(X, sx_h, O, so_h, h0, N_HEADS: tl.constexpr, START: tl.constexpr, N_PASS: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
        """Copies features [START, START + N_PASS) of heads [h0, h0 + BLOCK_H), masked to
        N_HEADS (partial rotary's pass-through)."""
        offs_x, mask = _head_offsets(sx_h, h0, N_HEADS, N_PASS, BLOCK_H, BLOCK_P, WIDE)
        offs_o, _ = _head_offsets(so_h, h0, N_HEADS, N_PASS, BLOCK_H, BLOCK_P, WIDE)
        p = tl.load(X + START + offs_x, mask=mask, other=0.0)
        tl.store(O + START + offs_o, p.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_heads(X, sx_h, O, so_h, N_HEADS: tl.constexpr, HALF: tl.constexpr, N_PASS: tl.constexpr,
                    c1, c2, sa, sb, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                    HAS_PASS: tl.constexpr, WIDE: tl.constexpr):
        """Rotates heads [0, N_HEADS) of one token in blocks of BLOCK_H heads."""
        for h0 in range(0, N_HEADS, BLOCK_H):
            x1, x2 = _load_halves(X, sx_h, h0, N_HEADS, HALF, BLOCK_H, BLOCK_R, WIDE)
            _store_rotated(O, so_h, h0, N_HEADS, HALF, x1, x2, c1, c2, sa, sb, BLOCK_H, BLOCK_R, WIDE)
            if HAS_PASS:
                _copy_pass(X, sx_h, O, so_h, h0, N_HEADS, 2 * HALF, N_PASS, BLOCK_H, BLOCK_P, WIDE)

    @triton.jit
    def _rope_token(q_in, sq_h, k_in, sk_h, q_out, sqo_h, k_out, sko_h, c1, c2, sa, sb,
                    N_QH: tl.constexpr, N_KH: tl.constexpr, HALF: tl.constexpr, N_PASS: tl.constexpr,
                    ONE_TILE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_P: tl.constexpr, HAS_PASS: tl.constexpr, WIDE: tl.constexpr):
        """Rotates the q and k heads of one token (pointers at its feature 0, head strides
        run-time values or constants) into q_out and k_out."""
        if ONE_TILE:
            q1, q2 = _load_halves(q_in, sq_h, 0, N_QH, HALF, BLOCK_HQ, BLOCK_R, WIDE)  # (BLOCK_HQ, BLOCK_R) each
            k1, k2 = _load_halves(k_in, sk_h, 0, N_KH, HALF, BLOCK_HK, BLOCK_R, WIDE)  # (BLOCK_HK, BLOCK_R) each
            _store_rotated(q_out, sqo_h, 0, N_QH, HALF, q1, q2, c1, c2, sa, sb, BLOCK_HQ, BLOCK_R, WIDE)
            _store_rotated(k_out, sko_h, 0, N_KH, HALF, k1, k2, c1, c2, sa, sb, BLOCK_HK, BLOCK_R, WIDE)
            if HAS_PASS:
                _copy_pass(q_in, sq_h, q_out, sqo_h, 0, N_QH, 2 * HALF, N_PASS, BLOCK_HQ, BLOCK_P, WIDE)
                _copy_pass(k_in, sk_h, k_out, sko_h, 0, N_KH, 2 * HALF, N_PASS, BLOCK_HK, BLOCK_P, WIDE)
        else:
            _rope_heads(q_in, sq_h, q_out, sqo_h, N_QH, HALF, N_PASS, c1, c2, sa, sb,
                        BLOCK_HQ, BLOCK_R, BLOCK_P, HAS_PASS, WIDE)
            _rope_heads(k_in, sk_h, k_out, sko_h, N_KH, HALF, N_PASS, c1, c2, sa, sb,
                        BLOCK_HK, BLOCK_R, BLOCK_P, HAS_PASS, WIDE)

    @jit
    def _rope_kernel(
        Q, sq_b, sq_t, sq_h,          # (B, T, Hq, D) input (or output gradient)
        K, sk_b, sk_t, sk_h,          # (B, T, Hk, D)
        QO, sqo_b, sqo_t, sqo_h,      # (B, T, Hq, D) out
        KO, sko_b, sko_t, sko_h,      # (B, T, Hk, D) out
        COS, sc_b, sc_t,              # (B or 1, T, R), or (B or 1, T, R/2) with HALF_TABLE;
        SIN, ss_b, ss_t,              #   sc_b == 0 broadcasts over batch
        seq_len,
        # Compile-time constants from here on (the launcher passes them by keyword, which
        # DirectLaunch's fast relaunch needs).
        DENSE_HEADS: tl.constexpr,    # every head stride is D: the run-time ones are not read
        N_QH: tl.constexpr,           # Hq
        N_KH: tl.constexpr,           # Hk
        HALF: tl.constexpr,           # R / 2
        N_PASS: tl.constexpr,         # D - R: features passed through
        BACKWARD: tl.constexpr,
        HALF_TABLE: tl.constexpr,     # cos/sin hold only their first half (the halves are equal)
        ONE_TILE: tl.constexpr,       # BLOCK_HQ >= N_QH and BLOCK_HK >= N_KH
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
        HAS_PASS: tl.constexpr,
        WIDE: tl.constexpr,           # some head's offset within its token needs 64 bits
    ):
        pid = tl.program_id(0)                                           # one token per program (B T < 2^31)
        b = (pid // seq_len).to(tl.int64)
        t = (pid % seq_len).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < HALF
        cos_ptr = COS + b * sc_b + t * sc_t + offs_r
        sin_ptr = SIN + b * ss_b + t * ss_t + offs_r
        c1 = tl.load(cos_ptr, mask=r_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr, mask=r_mask, other=0.0).to(tl.float32)
        if HALF_TABLE:
            c2 = c1
            s2 = s1
        else:
            c2 = tl.load(cos_ptr + HALF, mask=r_mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + HALF, mask=r_mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the forward map
            sa = -s2
            sb = -s1
        else:
            sa = s1
            sb = s2
        q_in = Q + b * sq_b + t * sq_t
        k_in = K + b * sk_b + t * sk_t
        q_out = QO + b * sqo_b + t * sqo_t
        k_out = KO + b * sko_b + t * sko_t
        if DENSE_HEADS:  # head stride D, a constant: every offset within the token folds
            _rope_token(q_in, 2 * HALF + N_PASS, k_in, 2 * HALF + N_PASS, q_out, 2 * HALF + N_PASS,
                        k_out, 2 * HALF + N_PASS, c1, c2, sa, sb, N_QH, N_KH, HALF, N_PASS, ONE_TILE,
                        BLOCK_HQ, BLOCK_HK, BLOCK_R, BLOCK_P, HAS_PASS, WIDE)
        else:
            _rope_token(q_in, sq_h, k_in, sk_h, q_out, sqo_h, k_out, sko_h, c1, c2, sa, sb, N_QH, N_KH, HALF,
                        N_PASS, ONE_TILE, BLOCK_HQ, BLOCK_HK, BLOCK_R, BLOCK_P, HAS_PASS, WIDE)


# ----------------------------------------------------------------------------- launcher
def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_warps(n_qh: int, n_kh: int, block_hq: int, block_hk: int, half: int, block_r: int, half_table: bool,
               one_tile: bool) -> int:
    """num_warps of the rope kernel for tiles of BLOCK_HQ / BLOCK_HK heads (n_qh / n_kh of them
    used) x BLOCK_R features (``half`` of them used)."""
    if one_tile:
        # Session 29's sweep of this kernel (H200, bf16, forward + backward in place, the
        # families' head shapes at 4096 and 8192 tokens; runs 2 and 3 of
        # benchmarks/kernels_h200_s29.log):
        # - features padded (head_dim 96: Phi-3-mini, phi-4-mini's rotary 96): 2 warps
        #   (1 warp: 4-8% slower);
        # - every lane used and 64 heads or more (Llama-2's 32/32): 8 warps (2: 2.5% slower);
        # - else one warp while the tiles hold at most 4096 features per half (Llama-3's 32/8:
        #   88.6-88.8 us at 8192 tokens against 89.3-89.5 under 2 warps; SmolLM2's 9/3 of 64:
        #   12.8-12.9 against 13.2; Gemma's 16/16 of 256: 1% faster), 2 warps past it, where one
        #   warp holds too many values (Phi-3-medium's 40/10, padded to 64/16: 1% slower under 1).
        # - full tables (the cos/sin halves loaded apart: twice the table values a program
        #   holds): the same rule with the one-warp bound halved to 2048 (session 30's sweep,
        #   benchmarks/kernels_h200_s30.log run 1: the ten shapes' sum 3% under session 24's
        #   4 warps at 8192 tokens and 4% at 4096; Llama-3's heads 92.3 us at 8192 tokens
        #   under 2 warps against 94.1 under 1; SmolLM2's 13.5 under 1 against 19.3 under 4).
        if half != block_r:
            return 2
        if (n_qh, n_kh) == (block_hq, block_hk) and block_hq + block_hk >= 64:
            return 8
        return 1 if (block_hq + block_hk) * block_r <= (4096 if half_table else 2048) else 2
    return 8 if block_hq * block_r >= 2048 else 4


def _launch(q, k, cos, sin, backward: bool, half_table: bool = False, inplace: bool = False, out=None):
    """Rotates q (B,T,Hq,D) and k (B,T,Hk,D) into new contiguous tensors, over themselves
    with ``inplace``, or into the given ``out = (qo, ko)`` views (then every tensor must have
    unit last-dim stride). ``half_table``: cos/sin are (B|1, T, R/2)."""
    B, T, n_qh, D = q.shape
    n_kh = k.shape[2]
    half = cos.shape[-1] if half_table else cos.shape[-1] // 2
    n_pass = D - 2 * half
    cos, sin = _unit_last(cos), _unit_last(sin)
    if inplace:
        qo, ko = q, k
    elif out is not None:
        qo, ko = out
    else:
        q, k = _unit_last(q), _unit_last(k)
        qo = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, T, Hq, D)
        ko = torch.empty_like(k, memory_format=torch.contiguous_format)  # (B, T, Hk, D)
    if B * T == 0:
        return qo, ko
    block_r = next_power_of_2(half)
    block_p = next_power_of_2(n_pass) if n_pass > 0 else 1
    block_hq, block_hk = next_power_of_2(n_qh), next_power_of_2(n_kh)
    one_tile = max(block_hq, block_hk) * block_r <= _TILE_ELEMS
    if not one_tile:
        cap = min(_MAX_BLOCK_HEADS, max(1, _TILE_ELEMS // block_r))
        block_hq, block_hk = min(block_hq, cap), min(block_hk, cap)
    num_warps = _num_warps(n_qh, n_kh, block_hq, block_hk, half, block_r, half_table, one_tile)
    sq, sk, sqo, sko, sc, ss = q.stride(), k.stride(), qo.stride(), ko.stride(), cos.stride(), sin.stride()
    # head strides; a lone head's is never used (any value, e.g. past 2^31, would do): D
    s_qh, s_qoh = (sq[2], sqo[2]) if n_qh > 1 else (D, D)
    s_kh, s_koh = (sk[2], sko[2]) if n_kh > 1 else (D, D)
    # an upper bound on the offsets within a token that any lane forms, masked lanes included
    # (heads padded up to whole blocks)
    pad_q, pad_k = -(-n_qh // block_hq) * block_hq - 1, -(-n_kh // block_hk) * block_hk - 1
    reach = max(pad_q * max(s_qh, s_qoh), pad_k * max(s_kh, s_koh)) + D + max(block_r, block_p)
    cos_sb = sc[0] if cos.shape[0] == B and B > 1 else 0
    sin_sb = ss[0] if sin.shape[0] == B and B > 1 else 0
    with device_guard(q):
        _rope_kernel[(B * T,)](
            q, sq[0], sq[1], s_qh,
            k, sk[0], sk[1], s_kh,
            qo, sqo[0], sqo[1], s_qoh,
            ko, sko[0], sko[1], s_koh,
            cos, cos_sb, sc[1],
            sin, sin_sb, ss[1],
            T, DENSE_HEADS=s_qh == s_kh == s_qoh == s_koh == D, N_QH=n_qh, N_KH=n_kh, HALF=half, N_PASS=n_pass,
            BACKWARD=backward, HALF_TABLE=half_table, ONE_TILE=one_tile,
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=block_r, BLOCK_P=block_p,
            # rotated over themselves, the pass-through features are already in place
            HAS_PASS=n_pass > 0 and not inplace,
            WIDE=reach >= _WIDE_AT,
            num_warps=num_warps,
        )
    return qo, ko


# ----------------------------------------------------------------------------- ops (torch.library + eager path)
@kernel_op("rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward_inplace: bool,
    half_table: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # ``backward_inplace`` only changes the backward (see rope's docstring).
    return _launch(q, k, cos, sin, backward=False, half_table=half_table)


@_rope_op.register_fake
def _(q, k, cos, sin, backward_inplace, half_table):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@kernel_op("rope_backward", mutates_args=())
def _rope_backward_op(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half_table: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(dq, dk, cos, sin, backward=True, half_table=half_table)


@_rope_backward_op.register_fake
def _(dq, dk, cos, sin, half_table):
    return (torch.empty_like(dq, memory_format=torch.contiguous_format),
            torch.empty_like(dk, memory_format=torch.contiguous_format))


@kernel_op("rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
                     half_table: bool) -> None:
    # rotates q and k (or, with ``backward``, their gradients) over themselves (unit last-dim strides)
    _launch(q, k, cos, sin, backward=backward, half_table=half_table, inplace=True)


@_rope_inplace_op.register_fake
def _(q, k, cos, sin, backward, half_table):
    return None


@kernel_op("rope_qkv_", mutates_args=("qkv",))
def _rope_qkv_op(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int, n_kv_heads: int, backward: bool,
    half_table: bool,
) -> None:
    # qkv: (B, T, (Hq + 2 Hk) D), rows q | k | v; rotates the q and k heads over themselves
    # (backward=True applies the transposed rotation, for gradients).
    q, k, _ = _qkv_views(qkv, n_q_heads, n_kv_heads)
    _launch(q, k, cos, sin, backward=backward, half_table=half_table, inplace=True)


@_rope_qkv_op.register_fake
def _(qkv, cos, sin, n_q_heads, n_kv_heads, backward, half_table):
    return None


def _qkv_views(qkv: torch.Tensor, n_q_heads: int, n_kv_heads: int):
    B, T, width = qkv.shape
    D = width // (n_q_heads + 2 * n_kv_heads)
    q = qkv[..., : n_q_heads * D].view(B, T, n_q_heads, D)
    k = qkv[..., n_q_heads * D: (n_q_heads + n_kv_heads) * D].view(B, T, n_kv_heads, D)
    return q, k, (n_q_heads + n_kv_heads) * D


@kernel_op("rope_qkv", mutates_args=())
def _rope_qkv_out_op(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q_heads: int, n_kv_heads: int, backward: bool,
    half_table: bool,
) -> torch.Tensor:
    # Out-of-place twin of rope_qkv_: a new (B, T, W) tensor, q and k heads rotated, v copied.
    qkv = qkv.contiguous()
    out = torch.empty_like(qkv)
    q, k, v_start = _qkv_views(qkv, n_q_heads, n_kv_heads)
    qo, ko, _ = _qkv_views(out, n_q_heads, n_kv_heads)
    out[..., v_start:].copy_(qkv[..., v_start:])
    _launch(q, k, cos, sin, backward=backward, half_table=half_table, out=(qo, ko))
    return out


@_rope_qkv_out_op.register_fake
def _(qkv, cos, sin, n_q_heads, n_kv_heads, backward, half_table):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _rope_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # an unused q or k gets a zero gradient below
    q, k, cos, sin, backward_inplace, half_table = inputs
    ctx.save_for_backward(cos, sin)
    ctx.half_table = half_table
    ctx.q_meta = (q.shape, q.dtype)
    ctx.k_meta = (k.shape, k.dtype)
    ctx.backward_inplace = backward_inplace


def _can_overwrite(dq: torch.Tensor, dk: torch.Tensor) -> bool:
    """Whether the backward may rotate the output gradients over themselves
    (:func:`ligerzoo.kernels._utils.overwritable`). Not when they interleave in one buffer:
    such gradients come from a consumer like ``cat`` whose incoming gradient autograd may
    also hand to another input (``cat((q, k)) + x``)."""
    return _utils.overwritable(dq, dk, interleaved=False)


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    # An output that did not reach the loss has a zero gradient.
    if dq is None:
        dq = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=cos.device)
    if dk is None:
        dk = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=cos.device)
    if ctx.backward_inplace and _can_overwrite(dq, dk):
        ops.rope_(dq, dk, cos, sin, True, ctx.half_table)
        # fresh tensors over the same memory: the caller may still hold dq / dk (autograd
        # would copy a gradient that is referenced elsewhere before making it a leaf's .grad);
        # detach() costs a sixth of view(shape) on the host
        return dq.detach(), dk.detach(), None, None, None, None
    dq_in, dk_in = ops.rope_backward(dq, dk, cos, sin, ctx.half_table)
    return dq_in, dk_in, None, None, None, None


ops.rope.register_autograd(_rope_backward, setup_context=_rope_setup_context)


class _RopeInplace(torch.autograd.Function):
    """rope(..., inplace=True) under autograd: q and k rotated over themselves (marked dirty),
    the backward as the out-of-place op's."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, backward_inplace, half_table):
        ops.rope_(q, k, cos, sin, False, half_table)
        ctx.mark_dirty(q, k)
        _rope_setup_context(ctx, (q, k, cos, sin, backward_inplace, half_table), None)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        _refuse_second_order()
        return _rope_backward(ctx, dq, dk)


def _refuse_second_order() -> None:
    if torch.is_grad_enabled():  # create_graph=True: the rotation's own backward has no graph
        raise RuntimeError("rope(inplace=True) does not support second-order gradients (create_graph=True)")


def _no_heads(x: torch.Tensor) -> torch.Tensor:
    """An empty (B, T, 0, D) partner for rotating x alone."""
    return x.new_empty((x.shape[0], x.shape[1], 0, x.shape[3]))


class _RopeInplaceOne(torch.autograd.Function):
    """As :class:`_RopeInplace` for one of q and k (autograd lets a Function that writes into
    a view return only one tensor): x rotated over itself, with an empty partner."""

    @staticmethod
    def forward(ctx, x, cos, sin, backward_inplace, half_table):
        none = _no_heads(x)
        ops.rope_(x, none, cos, sin, False, half_table)
        ctx.mark_dirty(x)
        _rope_setup_context(ctx, (x, none, cos, sin, backward_inplace, half_table), None)
        return x

    @staticmethod
    def backward(ctx, dx):
        _refuse_second_order()
        return _rope_backward(ctx, dx, None)[0], None, None, None, None


def _rope_inplace(q, k, cos, sin, backward_inplace: bool, half_table: bool):
    """rope(..., inplace=True) on the Triton path, q and k checked."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        ops.rope_(q, k, cos, sin, False, half_table)
        return q, k
    for x in (q, k):  # refused before anything is written, as torch's in-place ops do
        if _utils.of_leaf(x) and (x if x._base is None else x._base).requires_grad:
            raise RuntimeError("rope(inplace=True): q or k is a leaf that requires grad (or a view of one), "
                               "which autograd does not let an operation change in place")
    if q._base is None and k._base is None:  # one launch for both
        return _RopeInplace.apply(q, k, cos, sin, backward_inplace, half_table)
    # views (e.g. the heads of a fused projection): one Function, and one launch, each
    out = []
    for x in (q, k):
        if x.requires_grad:
            out.append(_RopeInplaceOne.apply(x, cos, sin, backward_inplace, half_table))
        else:
            ops.rope_(x, _no_heads(x), cos, sin, False, half_table)
            out.append(x)
    return tuple(out)


# ----------------------------------------------------------------------------- reference and helpers
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    R = cos.shape[-1]
    ct = torch.promote_types(x.dtype, torch.float32)
    c = cos.to(ct).unsqueeze(-2)                                          # (B|1, T, 1, R)
    s = sin.to(ct).unsqueeze(-2)
    xr = x[..., :R].to(ct)                                                # (B, T, H, R)
    x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
    out = xr * c + torch.cat((-x2, x1), dim=-1) * s
    return torch.cat((out.to(x.dtype), x[..., R:]), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, half_table: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch RoPE, same math as :func:`rope` (HF ``apply_rotary_pos_emb`` with
    ``rotate_half`` on the first ``R`` dims, the rest passed through). Math in
    ``promote_types(dtype, float32)``; differentiable by torch autograd.

    Arguments, shapes, dtypes and errors as :func:`rope` (no ``backward_inplace`` or
    ``inplace``)."""
    cos, sin = _check_args(q, k, cos, sin, half_table)
    if half_table:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0, *,
    half_table: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables exactly as HF's rotary embedding modules build them.

    ``freqs = position_ids.float()[..., None] * inv_freq.float()`` (fp32, autocast off),
    ``emb = cat(freqs, freqs, -1)``, ``cos = emb.cos() * attention_scaling`` (same for sin).
    HF forms ``freqs`` as a matmul with an inner dim of 1, i.e. the same single fp32
    product per element. With ``half_table`` the duplicate is left out: ``freqs.cos() *
    attention_scaling``, the first half of HF's table (flash-attn's layout), for
    ``rope(..., half_table=True)``.

    Args:
        position_ids: (B, T) or (T,) integer (or float) positions; rows may differ
            (packed or left-padded batches).
        inv_freq: (R/2,) inverse frequencies (any float dtype, any device: moved to
            ``position_ids.device``), e.g. ``1 / theta ** (arange(0, R, 2) / R)`` or a
            scaled variant (llama3, LongRoPE, YaRN).
        attention_scaling: multiplies cos and sin (LongRoPE/YaRN ``attention_factor``).
        half_table: return only the first half of each table.

    Returns:
        ``(cos, sin)``, each (B, T, R) float32 ((1, T, R) for 1-D ``position_ids``); R/2
        columns with ``half_table``.

    Raises:
        ValueError: ``position_ids`` not 1-D/2-D or ``inv_freq`` not 1-D.
    """
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (B, T) or (T,), got shape {tuple(position_ids.shape)}")
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D (R/2,), got shape {tuple(inv_freq.shape)}")
    with _utils.no_autocast(position_ids.device.type):
        inv = inv_freq.to(device=position_ids.device, dtype=torch.float32)
        freqs = position_ids.float()[..., None] * inv[None, None, :]      # (B, T, R/2)
        emb = freqs if half_table else torch.cat((freqs, freqs), dim=-1)  # (B, T, R)
        cos = emb.cos() * attention_scaling
        sin = emb.sin() * attention_scaling
    return cos, sin


def _check_args(q, k, cos, sin, half_table=False):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be (B, T, H, D) (BTHD layout), got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in B, T and D")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"q and k must be floating point, got {q.dtype} and {k.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1] != T:
        width = "R/2 (half_table)" if half_table else "R"
        raise ValueError(f"cos/sin must be (B, T, {width}), (1, T, {width}) or (T, {width}) with B={B}, T={T}; "
                         f"got {tuple(cos.shape)}")
    if half_table:
        R = 2 * cos.shape[-1]
        if R == 0 or R > D:
            raise ValueError(f"with half_table, rotary dim R = 2 * cos.shape[-1] = {R} must be positive "
                             f"and <= head_dim {D}")
    else:
        R = cos.shape[-1]
        if R % 2 or R == 0 or R > D:
            raise ValueError(f"rotary dim R = cos.shape[-1] = {R} must be even, positive and <= head_dim {D}")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise ValueError(f"cos/sin must be floating point, got {cos.dtype}")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError(f"q, k, cos, sin must share a device: {q.device}, {k.device}, {cos.device}, {sin.device}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rope does not differentiate with respect to cos/sin; pass detached tensors")
    return cos, sin


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward_inplace: bool = False,
    *, half_table: bool = False, inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embeddings to queries and keys (RoFormer, Su et al. 2021,
    arXiv 2104.09864; HF ``apply_rotary_pos_emb`` half-split layout).

    ``out = x * cos + rotate_half(x) * sin`` on the first ``R = cos.shape[-1]`` features
    of every head, features ``R:`` passed through (partial rotary), math in fp32.

    Args:
        q: (B, T, Hq, D) fp32 / bf16 / fp16 (float64 runs the torch reference). Any
            strides with a unit last-dim stride are read in place, e.g. head views of a
            fused qkv projection ``qkv[..., :Hq*D].view(B, T, Hq, D)``.
        k: (B, T, Hk, D), Hk may differ from Hq (GQA, MQA with Hk = 1).
        cos, sin: (B, T, R), (1, T, R) or (T, R), usually fp32 from :func:`rope_cos_sin`;
            R even, R <= D. Rows may carry different positions. No gradient flows to them.
        backward_inplace: the backward rotates the incoming output gradients over
            themselves (when it can: unit last-dim strides, no memory shared within or
            between them, not under tracing; else as usual) and returns them as the
            gradients of q and k, instead of allocating new ones (what Liger Kernel's rope
            always does: one (q + k)-sized buffer less at the backward's peak). Only for
            outputs whose gradient tensors nothing else reads: q and k going straight into
            attention, whose backward makes fresh gradients. Never when q_out or k_out also
            feeds an add, a subtraction or a residual (autograd hands the same gradient
            tensor to every input of an add, so another branch would read the rotated
            values), nor when the gradients are tensors you passed to ``backward`` yourself
            or that a hook on q_out or k_out keeps (it would see them rotated).
        half_table: cos and sin are (B|1, T, R/2) (or (T, R/2)): the first half of HF's
            tables, whose two halves are equal (``cat(freqs, freqs)``), e.g. from
            ``rope_cos_sin(..., half_table=True)``; flash-attn's layout. The kernel then reads
            half the table bytes (H200, Llama-3 heads: 1-2.5% less time at 8192 tokens; no
            gain measured at head_dim 96). Then R = 2 * cos.shape[-1]. A half table passed
            without it reads as a full table of a partial rotary R/2 (no error can tell).
        inplace: rotate q and k over themselves and return them, instead of new tensors
            (what Liger Kernel's rope always does: no (q + k)-sized output buffer). Their old
            values are lost, so only for q and k nothing else reads, e.g. the fresh output of
            the q and k projections. They need unit last-dim strides and no memory shared
            within or between them, and must not be leaves that require grad (autograd
            refuses in-place changes to those; checked before any write). Views under
            autograd (e.g. head views of a fused projection) take one launch each for q and
            k, others one for both. The memory check is conservative (it accepts head slices
            of one buffer, e.g. of a fused qkv or of a (B, H, T, D) tensor, but may refuse
            other exotic layouts) and needs real tensors: under torch.compile it is skipped.
            First-order gradients only. On the torch reference path (no check) new tensors
            are returned and q and k are left alone, so always use the returned tensors.

    Returns:
        ``(q_out, k_out)``: new contiguous tensors shaped and typed like q and k (q and k
        themselves with ``inplace``).

    Raises:
        ValueError: q or k not 4-D, mismatched B/T/D, non-float q, k, cos or sin, cos and
            sin of different shapes or not (B|1, T, R) / (T, R), R odd, 0 or > D, devices
            differ, or cos/sin requiring grad (with grad mode on); with ``inplace``, q or k
            without unit last-dim stride or sharing memory.
        RuntimeError: ``inplace`` on a leaf that requires grad (or a view of one); a
            second-order backward through ``inplace``.
    """
    cos, sin = _check_args(q, k, cos, sin, half_table)
    if not _utils.triton_ok(q, k):
        return rope_reference(q, k, cos, sin, half_table=half_table)
    if not inplace:
        return ops.rope(q, k, cos, sin, bool(backward_inplace), bool(half_table))
    unit = all(t.numel() == 0 or t.stride(-1) == 1 for t in (q, k))
    real = not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or type(q) is not torch.Tensor or type(k) is not torch.Tensor)  # data pointers to check
    if not unit or (real and not _utils.overwritable(q, k)):
        raise ValueError("rope(inplace=True) needs q and k with unit last-dim strides and no memory shared "
                         f"within or between them; got strides {q.stride()} and {k.stride()}")
    return _rope_inplace(q, k, cos, sin, bool(backward_inplace), bool(half_table))
