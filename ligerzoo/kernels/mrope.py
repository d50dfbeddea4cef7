"""Multimodal rotary position embedding (M-RoPE) of Qwen2-VL.

Math (Wang et al., "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at
Any Resolution", 2024, section 2.1; Hugging Face ``Qwen2VLRotaryEmbedding``): every token
has three position ids, temporal / height / width (``position_ids`` is (3, B, T)). The
R/2 rotary frequencies are split into three contiguous sections
``mrope_section = [s_t, s_h, s_w]`` (e.g. [16, 24, 24] for head_dim 128) and section ``a``
rotates by the position on axis ``a``::

    axis(j)    = 0 if j < s_t, 1 if j < s_t + s_h, else 2         for j in [0, R/2)
    freqs[j]   = float32(position_ids[axis(j)]) * inv_freq[j]      # one fp32 product
    cos        = cat(cos(freqs), cos(freqs)) * attention_scaling    # (B, T, R)
    sin        = cat(sin(freqs), sin(freqs)) * attention_scaling

This equals HF's two formulations: the transformers 4.x ``apply_multimodal_rotary_pos_emb``
(``emb = cat(freqs, freqs)`` per axis, last dim split by ``mrope_section * 2`` =
[16, 24, 24, 16, 24, 24], chunk ``i`` taken from axis ``i % 3``) and the 5.x
``Qwen2VLRotaryEmbedding.recomposition_frequencies`` (split the R/2 frequencies by
``mrope_section``, then duplicate), since both halves of ``cat(freqs, freqs)`` carry the
same sections.

The rotation itself is ordinary half-split RoPE with these tables: :func:`mrope` is
:func:`ligerzoo.kernels.rope.rope` (same Triton kernels, same autograd). Text-only tokens
have equal ids on all three axes, and then M-RoPE is exactly ordinary RoPE.

The Triton kernel here builds cos/sin straight from the three position rows (no
(3, B, T, R/2) intermediate), in fp32.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ligerzoo._checks import is_int
from ligerzoo.kernels import _utils
from ligerzoo.kernels._utils import cdiv, jit, kernel_op, ops
from ligerzoo.kernels._utils import HAS_TRITON, device_guard, next_power_of_2
from ligerzoo.kernels.rope import rope

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["mrope", "mrope_cos_sin", "mrope_cos_sin_reference"]

# A program fills a tile of about _TILE_ELEMS (token, frequency) pairs, at most
# _MAX_BLOCK_R frequencies wide. Module-level so tests can shrink them.
_TILE_ELEMS = 2048
_MAX_BLOCK_R = 128


# ----------------------------------------------------------------------------- kernel
if HAS_TRITON:

    @jit
    def _mrope_cos_sin_kernel(
        P, sp_a, sp_b, sp_t,     # (3, B, T) position ids (any int or float dtype)
        INV,                     # (R/2,) fp32 inverse frequencies
        COS, SIN,                # (B, T, R) fp32 out, contiguous
        n_tokens, seq_len, half,
        sec_h, sec_w,            # first frequency index of the height / width sections
        scaling,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)           # flattened b * T + t
        t_mask = toks < n_tokens
        toks = toks.to(tl.int64)
        p_off = (toks // seq_len) * sp_b + (toks % seq_len) * sp_t          # (BLOCK_T,)
        pos_t = tl.load(P + p_off, mask=t_mask, other=0).to(tl.float32)
        pos_h = tl.load(P + sp_a + p_off, mask=t_mask, other=0).to(tl.float32)
        pos_w = tl.load(P + 2 * sp_a + p_off, mask=t_mask, other=0).to(tl.float32)

        cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)           # frequency index j
        c_mask = cols < half
        inv = tl.load(INV + cols, mask=c_mask, other=0.0)                   # (BLOCK_R,)
        in_t = (cols < sec_h)[None, :]
        in_h = (cols < sec_w)[None, :]
        pos = tl.where(in_t, pos_t[:, None], tl.where(in_h, pos_h[:, None], pos_w[:, None]))
        freqs = pos * inv[None, :]                                          # (BLOCK_T, BLOCK_R)
        c = tl.cos(freqs) * scaling
        s = tl.sin(freqs) * scaling

        mask = t_mask[:, None] & c_mask[None, :]
        offs = toks[:, None] * (2 * half) + cols[None, :]
        tl.store(COS + offs, c, mask=mask)
        tl.store(COS + offs + half, c, mask=mask)
        tl.store(SIN + offs, s, mask=mask)
        tl.store(SIN + offs + half, s, mask=mask)


# ----------------------------------------------------------------------------- launcher / op
def _launch(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int], scaling: float):
    _, B, T = position_ids.shape
    half = inv_freq.shape[0]
    cos = torch.empty((B, T, 2 * half), dtype=torch.float32, device=position_ids.device)
    sin = torch.empty_like(cos)
    n_tokens = B * T
    if n_tokens == 0 or half == 0:
        return cos, sin
    inv = inv_freq.to(dtype=torch.float32).contiguous()
    block_r = min(next_power_of_2(half), _MAX_BLOCK_R)
    block_t = max(1, min(next_power_of_2(n_tokens), _TILE_ELEMS // block_r))
    num_warps = 8 if block_t * block_r >= 4096 else 4
    grid = (cdiv(n_tokens, block_t), cdiv(half, block_r))
    with device_guard(position_ids):
        _mrope_cos_sin_kernel[grid](
            position_ids, position_ids.stride(0), position_ids.stride(1), position_ids.stride(2),
            inv, cos, sin, n_tokens, T, half,
            mrope_section[0], mrope_section[0] + mrope_section[1], float(scaling),
            BLOCK_T=block_t, BLOCK_R=block_r, num_warps=num_warps,
        )
    return cos, sin


@kernel_op("mrope_cos_sin", mutates_args=())
def _mrope_cos_sin_op(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int], attention_scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(position_ids, inv_freq, mrope_section, attention_scaling)


@_mrope_cos_sin_op.register_fake
def _(position_ids, inv_freq, mrope_section, attention_scaling):
    _, B, T = position_ids.shape
    shape = (B, T, 2 * inv_freq.shape[0])
    return (position_ids.new_empty(shape, dtype=torch.float32),
            position_ids.new_empty(shape, dtype=torch.float32))


# ----------------------------------------------------------------------------- reference / checks
def _check_args(position_ids, inv_freq, mrope_section):
    if position_ids.dim() == 1:           # (T,): one sequence, text only
        position_ids = position_ids[None]
    if position_ids.dim() == 2:           # (B, T): text only, same id on every axis (as HF)
        position_ids = position_ids[None].expand(3, -1, -1)
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(
            "position_ids must be (3, B, T) (temporal, height, width rows), or (B, T) / (T,) for "
            f"text-only positions; got shape {tuple(position_ids.shape)} (drop the text row of HF's "
            "packed (4, B, T) layout first)"
        )
    if position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids must be integer or real, got {position_ids.dtype}")
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D (R/2,), got shape {tuple(inv_freq.shape)}")
    if not inv_freq.is_floating_point():
        raise ValueError(f"inv_freq must be floating point, got {inv_freq.dtype}")
    section = [int(s) for s in mrope_section] if all(is_int(s) for s in mrope_section) else None
    if section is None or len(section) != 3 or min(section) < 0 or sum(section) != inv_freq.shape[0]:
        raise ValueError(
            f"mrope_section must be 3 non-negative sizes [t, h, w] summing to len(inv_freq) = R/2 = "
            f"{inv_freq.shape[0]}; got {list(mrope_section)}"
        )
    return position_ids, inv_freq.detach().to(position_ids.device), section


def mrope_cos_sin_reference(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch M-RoPE tables, the same ops in the same order as HF
    ``Qwen2VLRotaryEmbedding`` (fp32, autocast off); arguments, shapes, dtypes and errors as
    :func:`mrope_cos_sin`."""
    position_ids, inv_freq, section = _check_args(position_ids, inv_freq, mrope_section)
    with _utils.no_autocast(position_ids.device.type):
        freqs = position_ids.float()[..., None] * inv_freq.float()         # (3, B, T, R/2)
        cos = freqs.cos() * attention_scaling
        sin = freqs.sin() * attention_scaling

        def recompose(t):                                                  # (3, B, T, R/2) -> (B, T, R)
            t = torch.cat([part[i % 3] for i, part in enumerate(t.split(section, dim=-1))], dim=-1)
            return torch.cat((t, t), dim=-1)

        return recompose(cos), recompose(sin)


def mrope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of Qwen2-VL multimodal RoPE (Wang et al. 2024, arXiv 2409.12191),
    built as HF ``Qwen2VLRotaryEmbedding`` does.

    Frequency ``j`` of section ``a`` (temporal, height, width) rotates by
    ``float32(position_ids[a]) * inv_freq[j]`` (one fp32 product, as HF); the R/2
    frequencies are duplicated into the two RoPE halves; both tables are multiplied by
    ``attention_scaling``. Equivalent to HF 4.x ``apply_multimodal_rotary_pos_emb``'s
    split of ``cat(freqs, freqs)`` by ``mrope_section * 2`` with chunk ``i`` from axis
    ``i % 3``. Feed the result to :func:`mrope` (= :func:`ligerzoo.kernels.rope.rope`).

    Args:
        position_ids: (3, B, T) integer (or float) ids, rows temporal / height / width
            (from HF's ``get_rope_index``; any strides). (B, T) or (T,) means text only:
            the same ids on every axis, which gives ordinary RoPE.
        inv_freq: (R/2,) float inverse frequencies, e.g. ``1 / theta ** (arange(0, R, 2) / R)``
            (theta 1e6 for Qwen2-VL); moved to ``position_ids.device``, used in fp32, no
            gradient.
        mrope_section: three sizes ``[s_t, s_h, s_w]`` summing to R/2 (Qwen2-VL: [16, 24, 24]).
        attention_scaling: multiplies cos and sin (1.0 for Qwen2-VL's default RoPE).

    Returns:
        ``(cos, sin)``, each (B, T, R) float32, contiguous. (HF's module additionally casts
        them to the activation dtype; :func:`rope` takes fp32 tables and computes in fp32.)

    Raises:
        ValueError: ``position_ids`` not (3, B, T) / (B, T) / (T,) or bool / complex,
            ``inv_freq`` not a 1-D float tensor, or ``mrope_section`` not three non-negative
            sizes summing to R/2.
    """
    position_ids, inv_freq, section = _check_args(position_ids, inv_freq, mrope_section)
    if not _utils.use_triton(position_ids):
        return mrope_cos_sin_reference(position_ids, inv_freq, section, attention_scaling)
    return ops.mrope_cos_sin(position_ids, inv_freq, section, float(attention_scaling))


def mrope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply Qwen2-VL multimodal RoPE to queries and keys.

    Once the tables are mixed per section (:func:`mrope_cos_sin`), the rotation is the
    standard half-split RoPE, so this is :func:`ligerzoo.kernels.rope.rope` (Triton forward
    and backward, math in fp32): ``out = x * cos + rotate_half(x) * sin`` per head.

    Args:
        q: (B, T, Hq, D) fp32 / bf16 / fp16 (BTHD layout; unit last-dim stride views are
            read in place).
        k: (B, T, Hk, D).
        cos, sin: (B, T, R) from :func:`mrope_cos_sin` (R <= D, usually R = D).

    Returns:
        ``(q_out, k_out)``, new contiguous tensors shaped and typed like q and k.

    Raises:
        ValueError: as :func:`ligerzoo.kernels.rope.rope`.
    """
    return rope(q, k, cos, sin)
