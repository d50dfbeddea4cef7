"""Session 29's second rope kernel (run 2: constexpr head and feature counts and head strides,
32-bit offsets within a token; the tables loaded first), kept for run 3 to time against the kernel
that replaced it (the tiles loaded first)."""
import torch
import triton
import triton.language as tl
from ligerzoo.kernels._utils import jit, device_guard, next_power_of_2
from ligerzoo.kernels.rope import _num_warps
HAS_TRITON = True


_MAX_BLOCK_HEADS = 16
_TILE_ELEMS = 4096
_WIDE_AT = 2**31 - 1


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _head_offsets(S_H: tl.constexpr, h0, N_HEADS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_W: tl.constexpr, WIDE: tl.constexpr):
        """(offsets, mask) of features [0, WIDTH) of heads [h0, h0 + BLOCK_H) of one token
        (head stride S_H), each (BLOCK_H, BLOCK_W), masked to N_HEADS heads; int64 offsets iff
        WIDE."""
        heads = h0 + tl.arange(0, BLOCK_H)
        offs = tl.arange(0, BLOCK_W)
        mask = (heads < N_HEADS)[:, None] & (offs < WIDTH)[None, :]
        if WIDE:
            ptr_offs = heads.to(tl.int64)[:, None] * S_H + offs[None, :]
        else:
            ptr_offs = heads[:, None] * S_H + offs[None, :]
        return ptr_offs, mask

    @triton.jit
    def _load_halves(X, SX_H: tl.constexpr, h0, N_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_R: tl.constexpr, WIDE: tl.constexpr):
        """Heads [h0, h0 + BLOCK_H) of one token, masked to N_HEADS: (x1, x2), each
        (BLOCK_H, BLOCK_R) fp32, the features [0, HALF) and [HALF, 2 HALF)."""
        offs, mask = _head_offsets(SX_H, h0, N_HEADS, HALF, BLOCK_H, BLOCK_R, WIDE)
        x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        return x1, x2

    @triton.jit
    def _store_rotated(O, SO_H: tl.constexpr, h0, N_HEADS: tl.constexpr, HALF: tl.constexpr, x1, x2, c1, c2, sa, sb,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, WIDE: tl.constexpr):
        """Stores ``x1 c1 - x2 sa`` and ``x2 c2 + x1 sb`` (one rounding each) at features
        [0, HALF) and [HALF, 2 HALF) of heads [h0, h0 + BLOCK_H), masked to N_HEADS."""
        offs, mask = _head_offsets(SO_H, h0, N_HEADS, HALF, BLOCK_H, BLOCK_R, WIDE)
        tl.store(O + offs, (x1 * c1[None, :] - x2 * sa[None, :]).to(O.dtype.element_ty), mask=mask)
        tl.store(O + offs + HALF, (x2 * c2[None, :] + x1 * sb[None, :]).to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _copy_pass(X, SX_H: tl.constexpr, O, SO_H: tl.constexpr, h0, N_HEADS: tl.constexpr, START: tl.constexpr, N_PASS: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
        """Copies features [START, START + N_PASS) of heads [h0, h0 + BLOCK_H), masked to
        N_HEADS (partial rotary's pass-through)."""
        offs_x, mask = _head_offsets(SX_H, h0, N_HEADS, N_PASS, BLOCK_H, BLOCK_P, WIDE)
        offs_o, _ = _head_offsets(SO_H, h0, N_HEADS, N_PASS, BLOCK_H, BLOCK_P, WIDE)
        p = tl.load(X + START + offs_x, mask=mask, other=0.0)
        tl.store(O + START + offs_o, p.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_heads(X, SX_H: tl.constexpr, O, SO_H: tl.constexpr, N_HEADS: tl.constexpr, HALF: tl.constexpr, N_PASS: tl.constexpr,
                    c1, c2, sa, sb, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                    HAS_PASS: tl.constexpr, WIDE: tl.constexpr):
        """Rotates heads [0, N_HEADS) of one token in blocks of BLOCK_H heads."""
        for h0 in range(0, N_HEADS, BLOCK_H):
            x1, x2 = _load_halves(X, SX_H, h0, N_HEADS, HALF, BLOCK_H, BLOCK_R, WIDE)
            _store_rotated(O, SO_H, h0, N_HEADS, HALF, x1, x2, c1, c2, sa, sb, BLOCK_H, BLOCK_R, WIDE)
            if HAS_PASS:
                _copy_pass(X, SX_H, O, SO_H, h0, N_HEADS, 2 * HALF, N_PASS, BLOCK_H, BLOCK_P, WIDE)

    @jit
    def _rope_kernel(
        # head strides are compile-time constants (a model has one layout)
        Q, sq_b, sq_t, SQ_H: tl.constexpr,        # (B, T, Hq, D) input (or output gradient)
        K, sk_b, sk_t, SK_H: tl.constexpr,        # (B, T, Hk, D)
        QO, sqo_b, sqo_t, SQO_H: tl.constexpr,    # (B, T, Hq, D) out
        KO, sko_b, sko_t, SKO_H: tl.constexpr,    # (B, T, Hk, D) out
        COS, sc_b, sc_t,              # (B or 1, T, R), or (B or 1, T, R/2) with HALF_TABLE;
        SIN, ss_b, ss_t,              #   sc_b == 0 broadcasts over batch
        seq_len,
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
        if ONE_TILE:
            q1, q2 = _load_halves(q_in, SQ_H, 0, N_QH, HALF, BLOCK_HQ, BLOCK_R, WIDE)  # (BLOCK_HQ, BLOCK_R) each
            k1, k2 = _load_halves(k_in, SK_H, 0, N_KH, HALF, BLOCK_HK, BLOCK_R, WIDE)  # (BLOCK_HK, BLOCK_R) each
            _store_rotated(q_out, SQO_H, 0, N_QH, HALF, q1, q2, c1, c2, sa, sb, BLOCK_HQ, BLOCK_R, WIDE)
            _store_rotated(k_out, SKO_H, 0, N_KH, HALF, k1, k2, c1, c2, sa, sb, BLOCK_HK, BLOCK_R, WIDE)
            if HAS_PASS:
                _copy_pass(q_in, SQ_H, q_out, SQO_H, 0, N_QH, 2 * HALF, N_PASS, BLOCK_HQ, BLOCK_P, WIDE)
                _copy_pass(k_in, SK_H, k_out, SKO_H, 0, N_KH, 2 * HALF, N_PASS, BLOCK_HK, BLOCK_P, WIDE)
        else:
            _rope_heads(q_in, SQ_H, q_out, SQO_H, N_QH, HALF, N_PASS, c1, c2, sa, sb,
                        BLOCK_HQ, BLOCK_R, BLOCK_P, HAS_PASS, WIDE)
            _rope_heads(k_in, SK_H, k_out, SKO_H, N_KH, HALF, N_PASS, c1, c2, sa, sb,
                        BLOCK_HK, BLOCK_R, BLOCK_P, HAS_PASS, WIDE)


# ----------------------------------------------------------------------------- launcher
def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    # the largest offset within a token any lane forms, masked lanes included (heads padded
    # up to whole blocks)
    pad_q, pad_k = -(-n_qh // block_hq) * block_hq - 1, -(-n_kh // block_hk) * block_hk - 1
    reach = max(pad_q * max(sq[2], sqo[2]), pad_k * max(sk[2], sko[2])) + D + max(block_r, block_p)
    cos_sb = sc[0] if cos.shape[0] == B and B > 1 else 0
    sin_sb = ss[0] if sin.shape[0] == B and B > 1 else 0
    with device_guard(q):
        _rope_kernel[(B * T,)](
            q, sq[0], sq[1], sq[2],
            k, sk[0], sk[1], sk[2],
            qo, sqo[0], sqo[1], sqo[2],
            ko, sko[0], sko[1], sko[2],
            cos, cos_sb, sc[1],
            sin, sin_sb, ss[1],
            T, N_QH=n_qh, N_KH=n_kh, HALF=half, N_PASS=n_pass,
            BACKWARD=backward, HALF_TABLE=half_table, ONE_TILE=one_tile,
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=block_r, BLOCK_P=block_p,
            # rotated over themselves, the pass-through features are already in place
            HAS_PASS=n_pass > 0 and not inplace,
            WIDE=reach >= _WIDE_AT,
            num_warps=num_warps,
        )
    return qo, ko


