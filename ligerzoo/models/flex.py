"""Attention-logit softcapping on CUDA through ``torch.nn.attention.flex_attention``
(compiled once; the scores never reach device memory as a (T, S) matrix).

Semantics equal ``transformer.eager_attention``: scores ``scale * q k^T``, then
``softcap * tanh(scores / softcap)``, masked (causal, or the given bool mask), softmax.
"""
from __future__ import annotations

import torch

_compiled = None
_last: tuple | None = None  # (mask object, B, T, S, block mask): one per forward and layer type


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _block_mask(mask: torch.Tensor | None, B: int, T: int, S: int, device):
    global _last
    if _last is not None and _last[0] is mask and _last[1:4] == (B, T, S):
        return _last[4]
    from torch.nn.attention.flex_attention import create_block_mask

    if mask is None:
        offset = S - T

        def mask_mod(b, h, q, kv):
            return kv <= q + offset
        block = create_block_mask(mask_mod, None, None, T, S, device=device)
    else:
        dense = mask[:, 0]  # (B|1, T, S)
        per_batch = dense.shape[0] != 1

        def mask_mod(b, h, q, kv):
            return dense[b if per_batch else 0, q, kv]
        block = create_block_mask(mask_mod, B if per_batch else None, None, T, S, device=device)
    _last = (mask, B, T, S, block)
    return block


def softcap_attention(q, k, v, mask, scale: float, softcap: float):
    """q (B, nh, T, hd), k/v (B, nkv, S, hd), mask bool (B|1, 1, T, S) or None (causal).
    Returns (B, nh, T, hd)."""
    B, _, T, _ = q.shape
    S = k.shape[2]

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    block = _block_mask(mask, B, T, S, q.device)
    return _flex()(q, k, v, score_mod=score_mod, block_mask=block, scale=scale,
                   enable_gqa=k.shape[1] != q.shape[1])
