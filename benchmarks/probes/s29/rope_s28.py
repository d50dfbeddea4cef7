"""Session 28's rope kernel and launcher (ligerzoo/kernels/rope.py at 2f35ec3, lines 44-222), kept for
session 29's probes to time against the kernel that replaced it."""
import torch
import triton
import triton.language as tl
from ligerzoo.kernels._utils import jit, device_guard, next_power_of_2
HAS_TRITON = True
_MAX_BLOCK_HEADS = 16
_TILE_ELEMS = 4096


# ----------------------------------------------------------------------------- kernels
if HAS_TRITON:

    @triton.jit
    def _load_halves(X, sx_h, h0, n_heads, half, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        """Heads [h0, h0 + BLOCK_H) of one token, masked to n_heads: (x1, x2), each
        (BLOCK_H, BLOCK_R) fp32, the features [0, half) and [half, 2 half)."""
        heads = h0 + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, BLOCK_R)
        mask = (heads < n_heads)[:, None] & (offs_r < half)[None, :]
        # int64: head strides can be large (e.g. a (B, H, T, D) buffer)
        ptr = X + heads.to(tl.int64)[:, None] * sx_h + offs_r[None, :]
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
        return x1, x2

    @triton.jit
    def _store_rotated(O, so_h, h0, n_heads, half, x1, x2, c1, c2, sa, sb,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
        """Stores ``x1 c1 - x2 sa`` and ``x2 c2 + x1 sb`` (one rounding each) at features
        [0, half) and [half, 2 half) of heads [h0, h0 + BLOCK_H), masked to n_heads."""
        heads = h0 + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, BLOCK_R)
        mask = (heads < n_heads)[:, None] & (offs_r < half)[None, :]
        ptr = O + heads.to(tl.int64)[:, None] * so_h + offs_r[None, :]
        tl.store(ptr, (x1 * c1[None, :] - x2 * sa[None, :]).to(O.dtype.element_ty), mask=mask)
        tl.store(ptr + half, (x2 * c2[None, :] + x1 * sb[None, :]).to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _copy_pass(X, sx_h, O, so_h, h0, n_heads, start, n_pass, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
        """Copies features [start, start + n_pass) of heads [h0, h0 + BLOCK_H), masked to
        n_heads (partial rotary's pass-through)."""
        heads = h0 + tl.arange(0, BLOCK_H)
        h_mask = heads < n_heads
        heads = heads.to(tl.int64)
        offs_p = tl.arange(0, BLOCK_P)
        mask = h_mask[:, None] & (offs_p < n_pass)[None, :]
        p = tl.load(X + heads[:, None] * sx_h + start + offs_p[None, :], mask=mask, other=0.0)
        tl.store(O + heads[:, None] * so_h + start + offs_p[None, :], p.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_heads(X, sx_h, O, so_h, n_heads, half, n_pass, c1, c2, sa, sb,
                    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                    HAS_PASS: tl.constexpr):
        """Rotates heads [0, n_heads) of one token in blocks of BLOCK_H heads."""
        for h0 in range(0, n_heads, BLOCK_H):
            x1, x2 = _load_halves(X, sx_h, h0, n_heads, half, BLOCK_H, BLOCK_R)
            _store_rotated(O, so_h, h0, n_heads, half, x1, x2, c1, c2, sa, sb, BLOCK_H, BLOCK_R)
            if HAS_PASS:
                _copy_pass(X, sx_h, O, so_h, h0, n_heads, 2 * half, n_pass, BLOCK_H, BLOCK_P)

    @jit
    def _rope_kernel(
        Q, sq_b, sq_t, sq_h,          # (B, T, Hq, D) input (or output gradient)
        K, sk_b, sk_t, sk_h,          # (B, T, Hk, D)
        QO, sqo_b, sqo_t, sqo_h,      # (B, T, Hq, D) out
        KO, sko_b, sko_t, sko_h,      # (B, T, Hk, D) out
        COS, sc_b, sc_t,              # (B or 1, T, R), or (B or 1, T, R/2) with HALF_TABLE;
        SIN, ss_b, ss_t,              #   sc_b == 0 broadcasts over batch
        seq_len, n_qh, n_kh, half, n_pass,
        BACKWARD: tl.constexpr,
        HALF_TABLE: tl.constexpr,     # cos/sin hold only their first half (the halves are equal)
        ONE_TILE: tl.constexpr,       # BLOCK_HQ >= n_qh and BLOCK_HK >= n_kh
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
        HAS_PASS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)                              # one token per program
        b = pid // seq_len
        t = pid % seq_len
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < half
        cos_ptr = COS + b * sc_b + t * sc_t + offs_r
        sin_ptr = SIN + b * ss_b + t * ss_t + offs_r
        c1 = tl.load(cos_ptr, mask=r_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr, mask=r_mask, other=0.0).to(tl.float32)
        if HALF_TABLE:
            c2 = c1
            s2 = s1
        else:
            c2 = tl.load(cos_ptr + half, mask=r_mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + half, mask=r_mask, other=0.0).to(tl.float32)
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
            q1, q2 = _load_halves(q_in, sq_h, 0, n_qh, half, BLOCK_HQ, BLOCK_R)  # (BLOCK_HQ, BLOCK_R) each
            k1, k2 = _load_halves(k_in, sk_h, 0, n_kh, half, BLOCK_HK, BLOCK_R)  # (BLOCK_HK, BLOCK_R) each
            _store_rotated(q_out, sqo_h, 0, n_qh, half, q1, q2, c1, c2, sa, sb, BLOCK_HQ, BLOCK_R)
            _store_rotated(k_out, sko_h, 0, n_kh, half, k1, k2, c1, c2, sa, sb, BLOCK_HK, BLOCK_R)
            if HAS_PASS:
                _copy_pass(q_in, sq_h, q_out, sqo_h, 0, n_qh, 2 * half, n_pass, BLOCK_HQ, BLOCK_P)
                _copy_pass(k_in, sk_h, k_out, sko_h, 0, n_kh, 2 * half, n_pass, BLOCK_HK, BLOCK_P)
        else:
            _rope_heads(q_in, sq_h, q_out, sqo_h, n_qh, half, n_pass, c1, c2, sa, sb,
                        BLOCK_HQ, BLOCK_R, BLOCK_P, HAS_PASS)
            _rope_heads(k_in, sk_h, k_out, sko_h, n_kh, half, n_pass, c1, c2, sa, sb,
                        BLOCK_HK, BLOCK_R, BLOCK_P, HAS_PASS)


# ----------------------------------------------------------------------------- launcher
def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_warps(n_qh: int, n_kh: int, block_hq: int, block_hk: int, half: int, block_r: int, half_table: bool,
               one_tile: bool) -> int:
    """num_warps of the rope kernel for tiles of BLOCK_HQ / BLOCK_HK heads (n_qh / n_kh of them
    used) x BLOCK_R features (``half`` of them used)."""
    if one_tile:
        if not half_table:  # session 24's sweep (H200, bf16, Llama-3 heads): 4 warps with full tables
            return 4
        # Session 28's sweep (H200, bf16, the families' head shapes at 4096 and 8192 tokens,
        # run 5 of benchmarks/kernels_h200_s28.log): 8 warps pay only when every lane of the
        # tiles holds a feature (head_dim 128, head counts powers of two) and they hold 32 heads
        # or more (Llama-3 at 8192 tokens: 86.9 us against 89.3 under 2); elsewhere 2 warps are
        # the fastest or within 1.1% of it (SmolLM2's 9/3 heads of 64: 14.6 us against 21.5 under
        # the rule before; Phi-3-medium's 40/10: 111.2 against 125.0).
        full_lanes = half == block_r == 64 and (n_qh, n_kh) == (block_hq, block_hk)
        return 8 if full_lanes and block_hq + block_hk >= 32 else 2
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
            T, n_qh, n_kh, half, n_pass,
            BACKWARD=backward, HALF_TABLE=half_table, ONE_TILE=one_tile,
            BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=block_r, BLOCK_P=block_p,
            # rotated over themselves, the pass-through features are already in place
            HAS_PASS=n_pass > 0 and not inplace,
            num_warps=num_warps,
        )
    return qo, ko

