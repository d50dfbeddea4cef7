"""Attention through ``torch.nn.attention.flex_attention`` on CUDA, for what SDPA can only take
as a dense (B, 1, T, S) bool mask, and for attention-logit softcapping (Gemma2).

- Packed documents and a sliding window shorter than the sequence: :func:`block_mask` builds
  flex's block-sparse mask straight from the document index of each position, so neither the
  (B, T, T) bool mask nor the skipped (query block, key block) tiles are ever touched. SDPA
  with a dense mask runs a kernel that reads the mask and computes every tile.
- Softcapping: ``softcap * tanh(scores / softcap)`` as a score modification; the scores never
  reach device memory as a (T, S) matrix.

Semantics equal ``transformer.eager_attention`` with ``transformer.attention_mask_for``'s
mask: scores ``scale * q k^T``, softcapped when asked, masked, softmax over keys. The block
layout follows the flex_attention paper's ``BlockMask`` (He et al. 2024, arXiv 2412.05496):
per (query block, key block) tile "empty" (skipped), "full" (computed without the mask
function) or "partial" (computed with it).
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

# False: packed documents and sliding windows go to SDPA as dense bool masks (the benchmark's
# baseline, scripts/bench_e2e.py --packed); softcapping keeps using flex_attention.
ENABLED = True
BLOCK = 128  # tile edge of the block mask, in positions (flex_attention's default)

# compiled forms of flex_attention kept per process (torch.compile's default limit is 8 per
# function; each dtype, head layout, score modification and grad mode takes one, and past the
# limit flex_attention falls back to its eager form, which materialises the (T, S) scores)
RECOMPILE_LIMIT = 64

# flex_attention's tiles for 16-bit heads of 256 features on NVIDIA sm90 (H100 / H200). torch's
# defaults there (forward 64 queries x 32 keys, 3 stages, 4 warps; backward 64 x 64, 2 stages, 4
# warps) ran Gemma2-9B's heads (16 q / 8 kv heads, softcap 50, causal, 4 x 2048 tokens, bf16) at 146
# and 85 TFLOP/s (counting the causal half of the scores). Forward tiles of 128 x 64 under 8 warps
# (2 stages) and the backward's under 8 warps: 602 against 942 us forward, 3144 against 4034
# backward; with 3 stages (128 x 64 forward, 64 x 64 backward) or 64 x 128 tiles under 2 the
# kernels exceed the shared memory (session 31, benchmarks/probes/s31/flex_d256.py,
# benchmarks/e2e_h200_s31.log runs 4 and 5; the Gemma2 4 x 2048 step, one run each: 48,577 against
# 47,337 tokens/s). Other head sizes keep torch's defaults, which torch tunes per size.
SM90_HEAD256_OPTIONS = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8,
                        "bwd_num_warps": 8}

_compiled = None
_last: tuple | None = None  # (dense mask, B, T, S, device, block mask): one per forward and layer type


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        def flex(q, k, v, **options):
            # dynamo keeps compiled forms per code object: through this frame ours stay apart from
            # those of a caller's own torch.compile(flex_attention) (its limit is 8, ours
            # RECOMPILE_LIMIT; sharing flex_attention's would push the caller's to eager)
            return flex_attention(q, k, v, **options)

        # torch.compile's default shape handling: static first, dynamic once a length changes
        # (a fixed dynamic=False would recompile per sequence length up to the recompile limit)
        _compiled = torch.compile(flex)
    return _compiled


def applies(device: torch.device, cached: bool, key_valid, head_dim: int) -> bool:
    """Whether the model's masks go through :func:`block_mask`: CUDA, no KV cache, no padding
    mask (``key_valid``), a head_dim flex_attention's kernels take (a multiple of 16 up to
    256), not inside the caller's torch.compile (there, on the H200 machine's torch 2.11, the
    block mask's flex_attention call failed to lower in inductor: compiled models keep the
    dense mask), and :data:`ENABLED`."""
    return (ENABLED and device.type == "cuda" and not cached and key_valid is None
            and head_dim % 16 == 0 and 16 <= head_dim <= 256 and not torch.compiler.is_compiling())


def needed(T: int, document: torch.Tensor | None, window: int | None) -> bool:
    """Whether causal attention over T positions needs more than SDPA's ``is_causal``:
    packed documents, or a window that excludes some earlier position (T > window)."""
    return document is not None or (window is not None and T > window)


def block_classes(T: int, document: torch.Tensor | None, window: int | None,
                  block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tiles of causal self-attention over T positions hold visible pairs.

    A query q sees key s when ``s <= q``, ``s > q - window`` (when given) and both lie in one
    document (``document`` (B, T) int, nondecreasing along each row, as
    ``transformer.packed_documents`` returns it). Positions are cut into ``n = ceil(T / block)``
    blocks. Returns ``(partial, full)``, bool (B or 1, n, n) indexed [query block, key block]:
    ``full`` where every pair is visible, ``partial`` where some may be (the mask function
    decides each pair); a tile in neither holds no visible pair. Exact per tile from its
    corners, since the document index is monotone: a tile is full when both blocks lie in one
    document and every pair passes the causal and window tests. ``block``: :data:`BLOCK` when None."""
    block = block or BLOCK
    n = -(-T // block)
    start = torch.arange(n, device=document.device if document is not None else None) * block
    end = torch.clamp(start + block, max=T) - 1  # last position of each block
    qs, qe, ks, ke = start[:, None], end[:, None], start[None, :], end[None, :]  # (n, 1), (1, n)
    some = ks <= qe  # (n, n): the tile's earliest key is not after its last query
    full = ke <= qs  # (n, n): the tile's last key is not after its first query
    if window is not None:
        some = some & (ke > qs - window)
        full = full & (ks > qe - window)
    some, full = some[None], full[None]  # (1, n, n)
    if document is not None:
        d_first, d_last = document[:, start], document[:, end]  # (B, n): documents at block edges
        some = some & (d_first[:, None, :] <= d_last[:, :, None]) & (d_last[:, None, :] >= d_first[:, :, None])
        one = d_first == d_last  # (B, n): the block lies in one document
        full = full & one[:, :, None] & one[:, None, :] & (d_first[:, :, None] == d_first[:, None, :])
    return some & ~full, full


def _as_indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, n) bool -> BlockMask's (B, 1, n) int32 counts and (B, 1, n, n) int32 key-block
    indices, the selected ones first in increasing order."""
    n = tiles.shape[-1]
    counts = tiles.sum(-1, dtype=torch.int32)[:, None]
    # distinct keys (selected j -> j, others n + j): every sort, stable or not, gives one order
    keys = torch.where(tiles, 0, n) + torch.arange(n, device=tiles.device)
    return counts, torch.argsort(keys, dim=-1).to(torch.int32)[:, None]


def _visible(doc: torch.Tensor, window: torch.Tensor):
    """The per-pair mask function. One code object for every mask, with its variation in the
    captured tensors (``doc`` (B|1, n block) int64, ``window`` 0-d int64), so that the compiled
    flex_attention meets the same function each forward (a Python constant or a branch taken
    per mask would recompile it, until torch.compile's recompile limit sends it to the eager
    fallback, which materialises the (T, S) scores)."""
    rows = doc.shape[0]  # 1 without documents: every batch row reads row 0

    def mask_mod(b, h, q, s):
        r = b % rows
        return (s <= q) & (s > q - window) & (doc[r, q] == doc[r, s])
    return mask_mod


def block_mask(T: int, document: torch.Tensor | None, window: int | None, device,
               block: int | None = None) -> BlockMask:
    """flex_attention's mask for causal self-attention over T positions, within packed
    documents (``document`` (B, T) int64, or None) and the last ``window`` positions (or
    None): the tiles from :func:`block_classes` and, for partial tiles, the per-pair mask
    function ``s <= q and s > q - window and document[b, q] == document[b, s]``."""
    block = block or BLOCK
    partial, full = block_classes(T, document, window, block)
    n = partial.shape[-1]
    # padded to whole blocks (the mask function may read past T); one document when none given
    doc = torch.zeros((1 if document is None else document.shape[0], n * block), dtype=torch.int64, device=device)
    if document is not None:
        doc[:, T:] = -1
        doc[:, :T] = document
    reach = torch.tensor(T if window is None else min(window, T), dtype=torch.int64, device=device)
    counts, indices = _as_indices(partial.to(device))
    full_counts, full_indices = _as_indices(full.to(device))
    return BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=block,
                                    mask_mod=_visible(doc, reach), seq_lengths=(T, T))


def dense(mask: BlockMask, B: int) -> torch.Tensor:
    """The (B, 1, T, T) bool mask a :func:`block_mask` stands for, from its mask function
    (which alone decides every pair). For code compiled apart from the model's mask building
    (a block compiled on its own), where the mask arrives built but flex_attention's call
    inside the compiled graph is not trusted (see :func:`applies`)."""
    T = mask.seq_lengths[0]
    pos = torch.arange(T, device=mask.kv_num_blocks.device)
    b = torch.arange(B, device=pos.device)[:, None, None, None]
    return mask.mask_mod(b, 0, pos[None, None, :, None], pos[None, None, None, :])  # (B, 1, T, T)


def _softcap(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)
    return score_mod


def _dense_block_mask(mask: torch.Tensor | None, B: int, T: int, S: int, device) -> BlockMask:
    """A block mask from a dense bool mask (B|1, 1, T, S), or causal (offset S - T) for None.
    The last one built is kept for the next call with the same mask object, B, T, S and device
    (one per forward and layer type)."""
    global _last
    if _last is not None and _last[0] is mask and _last[1:5] == (B, T, S, device):
        return _last[5]
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
    _last = (mask, B, T, S, device, block)
    return block


def _kernel_options(q: torch.Tensor, block_size: tuple[int, int], capability=None) -> dict | None:
    """flex_attention's ``kernel_options`` for q (B, nh, T, hd) under a block mask of
    ``block_size`` (query, key) positions per tile; None leaves torch's own tiles.

    :data:`SM90_HEAD256_OPTIONS` for 16-bit heads of 256 on an NVIDIA sm90 GPU (``capability``,
    read from q's device when None), when T >= 128 (shorter queries go to inductor's decoding
    kernel, whose bounds checks assume its own tile) and the mask's tiles are multiples of the
    options' (128 queries, 64 keys); None elsewhere (ROCm included)."""
    if (SM90_HEAD256_OPTIONS is None or q.shape[-1] != 256 or q.dtype not in (torch.bfloat16, torch.float16)
            or q.shape[-2] < 128 or block_size[0] % 128 or block_size[1] % 64 or torch.version.hip is not None):
        return None
    if capability is None:
        if q.device.type != "cuda":
            return None
        capability = torch.cuda.get_device_capability(q.device)
    return SM90_HEAD256_OPTIONS if tuple(capability) == (9, 0) else None


def attention(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """q (B, nh, T, hd), k/v (B, nkv, S, hd); mask a :class:`BlockMask`, a bool (B|1, 1, T, S)
    tensor, or None (causal). Returns (B, nh, T, hd) in q's dtype. ``softcap``: scores become
    ``softcap * tanh(scores / softcap)`` before masking (None: plain softmax attention)."""
    B, _, T, _ = q.shape
    S = k.shape[2]
    block = mask if isinstance(mask, BlockMask) else _dense_block_mask(mask, B, T, S, q.device)
    options = dict(score_mod=None if softcap is None else _softcap(softcap), block_mask=block, scale=scale,
                   enable_gqa=k.shape[1] != q.shape[1], kernel_options=_kernel_options(q, block.BLOCK_SIZE))
    if torch.compiler.is_compiling():  # (the model does not call it there: it takes the dense path)
        return _flex()(q, k, v, **options)
    from torch._dynamo import config

    # specialize_float: scale and softcap stay constants of each compiled form. Otherwise dynamo
    # turns a float that changed between calls (a second model's softcap) into a traced tensor,
    # which flex_attention reads back on the host: a graph break at its call, whose eager fallback
    # failed in the backward (H200, torch 2.11; session 32) or, on the CPU, an inductor error.
    # The cost: one compile per distinct value (a model has one scale and one softcap; a value new
    # on every call would reach RECOMPILE_LIMIT and then run torch's eager flex_attention)
    with config.patch(recompile_limit=max(RECOMPILE_LIMIT, config.recompile_limit), specialize_float=True):
        return _flex()(q, k, v, **options)
