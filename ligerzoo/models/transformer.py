"""The shared decoder every family is built from: attention, gated MLP, block, causal LM.

Shape legend: B batch, T new tokens, S attended keys (cache + new), H hidden_size,
nh query heads, nkv key/value heads, hd head_dim, I intermediate_size, V vocab_size.

Parameter layout (the model never sees HF names; each family's key map translates):
    embed.weight                       (V, H)
    layers.{i}.attn_norm.weight        (H,)
    layers.{i}.attn.wqkv.weight        ((nh + 2 nkv) hd, H)   rows: q | k | v
    layers.{i}.attn.wqkv.bias          ((nh + 2 nkv) hd,)     when qkv_bias
    layers.{i}.attn.wo.weight          (H, nh hd)
    layers.{i}.mlp_norm.weight         (H,)
    layers.{i}.mlp.w_gate_up.weight    (2 I, H)               rows: gate | up
    layers.{i}.mlp.w_down.weight       (H, I)
    layers.{i}.mlp.router.weight       (E, H)                 MoE layers instead of the two above:
    layers.{i}.mlp.w_gate_up           (E, 2 I, H)            experts' gate | up
    layers.{i}.mlp.w_down              (E, H, I)
    layers.{i}.attn_post_norm.weight / mlp_post_norm.weight   with post_norms (Gemma2)
    norm.weight                        (H,)
    lm_head.weight                     (V, H)                 the same Parameter as embed.weight when tied

q/k/v and gate/up are fused so that each is one matmul; the loader fills the slices by
explicit sizes and the saver cuts them back out (models/keymap.py), bit for bit.

Math follows HF transformers' LlamaForCausalLM (modeling_llama.py): pre-norm blocks,
RoPE in the half-split layout, causal softmax attention scaled by hd**-0.5, SwiGLU MLP.
For training memory the blocks run through models/fused.py (each norm fused into the next
projection, residual adds fused into the norms, RoPE in place on the qkv buffer, the gated
activation recomputed in backward); the MoE layer lives in models/moe.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ligerzoo._checks import any_dtensor, fsdp_modules, is_int, is_real
from ligerzoo.kernels.cross_entropy import TargetCheck, _cross_entropy
from ligerzoo.kernels.fused_linear_cross_entropy import default_chunk_size
from ligerzoo.kernels.rope import rope_cos_sin
from ligerzoo.models import flex
from ligerzoo.models.config import ModelConfig
from ligerzoo.models.fused import add_norm, gated_down, norm_linear, norm_linear_cross_entropy, plain_linear, rope_qkv_
from ligerzoo.models.moe import MoE, load_balancing_loss
from ligerzoo.nn import RMSNorm

IGNORE_INDEX = -100
# A wrapped LM head's loss (head_cross_entropy) runs chunks of at least this many logits
# (256 MiB in bf16): smaller chunks leave the GPU waiting on the host's per-chunk work
# (benchmarks/NOTES.md, session 21). None: the whole (N, V) logits at once, without the
# head's second forward (faster, for the memory of the logits and their gradient).
HEAD_CHUNK_LOGITS: int | None = 2**27


def rope_inv_freq(config: ModelConfig, long: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim/2,) float32 and the cos/sin scale, as HF computes them
    (transformers ``modeling_rope_utils``), on the CPU.

    Types: "default" (theta^(-2i/d), RoFormer, arXiv 2104.09864); "linear" (inv_freq /
    factor); "llama3" (Llama 3.1 band-wise interpolation); "yarn" (Peng et al. 2023, arXiv
    2309.00071: ramp between interpolated and extrapolated frequencies, cos/sin scaled by
    0.1 ln(factor) + 1); "longrope" (Phi3: per-frequency ``short_factor`` or, with
    ``long=True``, ``long_factor`` divisors; cos/sin scaled by
    sqrt(1 + ln(s) / ln(original_max_position_embeddings)), s = max_position / original).
    """
    dim = config.rotary_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponent)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    scale = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif rope_type == "yarn":
        orig = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or config.max_position_embeddings / orig
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        scale = scaling.get("attention_factor") or (
            get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all else get_mscale(factor))
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(config.rope_theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
        pos_freqs = config.rope_theta ** exponent
        extrapolation_weight = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    elif rope_type == "longrope":
        orig = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or config.max_position_embeddings / orig
        scale = scaling.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (ext * config.rope_theta ** exponent)
    return inv_freq, scale


@dataclass
class CausalLMOutput:
    """``loss``: 0-d float32, float64 for a float64 model (None without labels); with ``output_router_logits`` it includes
    ``router_aux_loss_coef * aux_loss``. ``logits``: (B, T, V) in the model dtype, None when
    labels were given (the loss goes through fused linear cross entropy instead).
    ``aux_loss``: Mixtral's load-balancing loss, 0-d float32 (MoE models with
    output_router_logits; None otherwise)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


# a pytree node, as transformers' ModelOutput: DDP (static_graph), torch.compile and tree utilities
# find the tensors inside (DDP with static_graph=True silently skipped its all-reduce otherwise)
torch.utils._pytree.register_dataclass(CausalLMOutput)


class KVCache:
    """Preallocated key/value cache for incremental decoding.

    ``k[i]``, ``v[i]``: (B, nkv, max_len, hd) for layer i, in ``dtype`` on ``device``
    (B = ``batch_size``); ``mask``: (B, max_len) bool, True where a cached position holds a
    real (non-padding) token; ``length``: positions filled so far.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled so far
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hd) of ``layer`` after the cached ones; return all
        (B, nkv, S, hd) views, S = ``length + T``. ``length`` is advanced by the caller
        (``CausalLM``) once every layer has written. Writing past ``max_len`` raises torch's
        RuntimeError (shape mismatch)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attention_mask_for(q_start: int, T: int, S: int, key_valid: torch.Tensor | None, window: int | None,
                       device, document: torch.Tensor | None = None) -> torch.Tensor | None:
    """Bool SDPA mask (B or 1, 1, T, S), True where query t (absolute position q_start + t)
    may see key s: causal, within the last ``window`` positions when given (HF semantics:
    q - W < s <= q), and not padding (``key_valid`` (B, S)), and within its own packed
    document (``document`` (B or 1, T), without a cache: S == T). A query always sees itself,
    so padding queries never get an empty (NaN) softmax row. None when plain causal attention
    (or, for one query after a cache, attention to everything) says it all."""
    if window is not None and S <= window:  # no query is more than S - 1 past a key
        window = None
    if window is None and key_valid is None and document is None and (q_start == 0 or T == 1):
        return None
    q_pos = torch.arange(q_start, q_start + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None, None]  # (1, 1, T, S)
    if document is not None:
        mask = mask & (document[:, None, :, None] == document[:, None, None, :])  # (B|1, 1, T, T)
    if key_valid is not None:
        mask = (mask & key_valid.bool()[:, None, None, :]) | (k_pos == q_pos)
    return mask


def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, T) int64 document index of each position of packed rows, from (B, T)
    ``position_ids`` that restart (any step other than +1 starts a document; the first
    position of a row starts document 0), or None when no row restarts (one host sync;
    under torch.compile the indices are always returned). transformers'
    ``find_packed_sequence_indices`` (masking_utils), which it applies without a cache."""
    first = position_ids[:, :1] - 1
    document = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)  # (B, T)
    if torch.compiler.is_compiling() or bool((document[:, -1] > 0).any()):
        return document
    return None


def eager_attention(q, k, v, mask, scale: float, softcap: float | None):
    """Softmax attention written out (for what SDPA cannot express: logit softcapping).
    q (B, nh, T, hd), k/v (B, nkv, S, hd), mask bool (B|1, 1, T, S) or None (causal).
    Scores ``scale * q k^T``, then ``softcap * tanh(scores / softcap)``, masked, softmax in fp32
    (HF ``eager_attention_forward``)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, nh, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)  # (B, nh, T, hd)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA; MQA when nkv = 1), RoPE,
    optional sliding window and attention-logit softcap.

    Runs ``F.scaled_dot_product_attention``. On CUDA it runs ``torch.nn.attention.flex_attention``
    (models/flex.py) for a block mask (packed documents, a sliding window shorter than the
    sequence) and for a softcap (Gemma2); a softcap elsewhere, and inside the caller's
    torch.compile (where the flex call gave a loss unlike eager's on the H200 and once an illegal
    memory access), runs ``eager_attention``, which holds the (B, nh, T, S) scores.
    ``attn_mask``: None (causal), a bool (B|1, 1, T, S) tensor, or a flex ``BlockMask`` (inside
    a block compiled on its own, turned into its dense equivalent for the dense path).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.sizes = [config.q_size, config.kv_size, config.kv_size]
        self.wqkv = nn.Linear(config.hidden_size, sum(self.sizes), bias=config.qkv_bias)
        self.wo = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        self.scale = config.attn_scale if config.attn_scale is not None else config.head_dim ** -0.5
        self.softcap = config.attn_softcap

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None, qkv=None):
        """x: (B, T, H) normalised input, or None when ``qkv`` (B, T, (nh + 2 nkv) hd), its
        projection, is given (the block fuses the norm into it); cos, sin: (B or 1, T,
        rotary_dim / 2) float32 half tables. Returns (B, T, H)."""
        if qkv is None:
            qkv = self.wqkv(x)
        B, T, _ = qkv.shape
        # in place only on a buffer nothing else holds (a hooked or wrapped projection's output may be)
        q, k, v = rope_qkv_(qkv, cos, sin, self.num_heads, self.num_kv_heads, inplace=plain_linear(self.wqkv),
                            backward_inplace=True, half_table=True)  # (B, T, nh|nkv|nkv, hd); qkv is not used again
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        if isinstance(attn_mask, flex.BlockMask) and torch.compiler.is_compiling():
            attn_mask = flex.dense(attn_mask, B)  # a block compiled on its own: the dense path below
        if isinstance(attn_mask, flex.BlockMask) or (self.softcap is not None and q.is_cuda and cache is None
                                                     and not torch.compiler.is_compiling()):
            y = flex.attention(q, k, v, attn_mask, self.scale, self.softcap)
        elif self.softcap is not None:
            y = eager_attention(q, k, v, attn_mask, self.scale, self.softcap)
        else:
            y = F.scaled_dot_product_attention(
                # causal without a cache (any T, so no shape-dependent bool under torch.compile's
                # dynamic shapes), and for a prefill; a decoded token sees the whole cache
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and (cache is None or T > 1),
                scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nh hd)
        return self.wo(y)


class MLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))`` with gate and up fused in one matmul: SwiGLU
    or tanh-GeGLU (Shazeer 2020, arXiv 2002.05202)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        self.w_gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w_down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x, gate_up=None, recompute: bool = True):
        """x: (..., H), or None when ``gate_up`` (..., 2I), its projection, is given (it is
        then consumed when ``w_gate_up`` is a plain ``nn.Linear``: the backward reuses its buffer
        for its gradient).
        ``recompute``: see :func:`ligerzoo.models.fused.gated_down`."""
        if gate_up is None:
            gate_up = self.w_gate_up(x)
        return gated_down(gate_up, self.w_down, self.activation, recompute,
                          inplace=plain_linear(self.w_gate_up))  # 2I -> I -> H


class Block(nn.Module):
    """Pre-norm decoder block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``; with
    ``post_norms`` (Gemma2) the attention and MLP outputs are normalised before the residual
    add: ``h = x + norm(attn(norm(x))); out = h + norm(mlp(norm(h)))``."""

    checkpointed: bool = False
    """Set by :func:`ligerzoo.parallel.apply_activation_checkpointing` on the blocks it wraps:
    the MLP's down projection then runs as a plain op, so that the checkpoint's recomputation
    stops before that matmul (see :func:`ligerzoo.models.fused.gated_down`; not with post-norms,
    whose saved input comes after it), and the model adds the residual before calling the
    block, so that the checkpoint keeps one input."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        norm = lambda: RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset, config.norm_casting)  # noqa: E731
        self.layer_type = config.layer_type(layer_idx)
        self.attn_norm = norm()
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = norm()
        self.mlp = MoE(config) if config.num_local_experts else MLP(config)
        if config.post_norms:
            self.attn_post_norm, self.mlp_post_norm = norm(), norm()
        else:
            self.attn_post_norm = self.mlp_post_norm = None

    def forward(self, x, cos, sin, masks: dict, cache=None, delta=None):
        """One block on the residual stream, with the last residual add left to the caller.

        Args:
            x: (B, T, H) residual stream; delta: (B, T, H) the previous block's last branch
                output, still to be added to ``x`` (None for the first block).
            cos, sin: (B or 1, T, rotary_dim / 2) float32, from :meth:`CausalLM.rope_cos_sin`.
        Returns:
            ``(h, m)``: the residual stream after the attention branch and this block's MLP
            branch output; the block's output is ``h + m``, which the next norm computes in
            its fused add (:func:`ligerzoo.models.fused.norm_linear`).
        """
        qkv, x = norm_linear(x, delta, self.attn_norm, self.attn.wqkv)  # x <- x + delta
        a = self.attn(None, cos, sin, masks[self.layer_type], cache, qkv=qkv)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        if isinstance(self.mlp, MLP):
            gate_up, h = norm_linear(x, a, self.mlp_norm, self.mlp.w_gate_up)  # h = x + a
            m = self.mlp(None, gate_up, recompute=not self.checkpointed)
        else:
            n, h = add_norm(self.mlp_norm, x, a)
            m = self.mlp(n)
        if self.mlp_post_norm is not None:
            m = self.mlp_post_norm(m)
        return h, m


class _RecomputedEmbedding:
    """Saved-tensor hooks that store the embedding output as its recipe (a copy of the ids and
    the table), not its bytes: a backward that needs it gathers it again (one lookup of
    (B, T) rows, against a (B, T, H) tensor kept from the forward to the end of the backward).

    Only the tensor ``x`` itself is replaced. Every other tensor saved inside the hooks is
    kept as is, with its version: autograd does not check the version of tensors that pass
    through saved-tensor hooks, so unpacking does it (a tensor modified in place between the
    forward and the backward raises RuntimeError, as without the hooks). The table's version
    is checked the same way before the recompute.

    :meth:`applies` says when it is used: a plain ``nn.Embedding`` without hooks (whose
    output a second call reproduces exactly), and no saved-tensor hooks of the caller's
    already active (``save_on_cpu``, offloading: those keep seeing every tensor).
    """

    def __init__(self, model: "CausalLM", input_ids: torch.Tensor, x: torch.Tensor):
        # x itself is not kept (the packed recipe would keep it alive): only what identifies it
        # while the hooks are active, i.e. while the caller still holds x
        self.model, self.input_ids = model, input_ids.detach().clone()  # (B, T): the ids may be reused
        self.key = (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, x._version)

    @staticmethod
    def applies(model: "CausalLM") -> bool:
        from ligerzoo.models.fused import _no_hooks

        top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _: None)
        return type(model.embed) is nn.Embedding and _no_hooks(model.embed) and top_hooks(True) is None

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version) == self.key:
            return (self, self.model.embed.weight._version)
        return (t, t._version)

    def _unpack(self, packed):
        obj, version = packed
        if obj is not self:
            if obj._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation (saved by the first decoder block) "
                    f"has been modified by an inplace operation: {tuple(obj.shape)} {obj.dtype} is at version "
                    f"{obj._version}; expected version {version}")
            return obj
        if self.model.embed.weight._version != version:
            raise RuntimeError("the embedding table was modified in place between the forward and the backward: "
                               "its output cannot be recomputed for the first block's backward")
        with torch.no_grad():
            return self.model._embed(self.input_ids)


def head_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                       softcap: float | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed cross entropy of ``head(h)`` for an LM head that must be called as a module (a
    LoRA or quantised wrapper, a forward hook, a bias), without keeping its (N, V) logits.

    Args:
        head: maps (C, H) rows to (C, V) logits.
        h: (..., H) final-norm output; targets: (...) int64, ``IGNORE_INDEX`` entries skipped.
        vocab_size: V, for the chunk size; softcap: final-logit soft-cap or None.
        chunk_rows: rows per chunk; default
            :func:`ligerzoo.kernels.fused_linear_cross_entropy.default_chunk_size`, raised to
            hold at least ``HEAD_CHUNK_LOGITS`` logits (2**27, so 1,047 rows at V = 128,256):
            smaller chunks leave the GPU waiting on the host's per-chunk work. With
            ``HEAD_CHUNK_LOGITS = None``, one chunk of all N rows.

    Returns:
        0-d fp32 (fp64 for fp64 logits) loss summed over the counted targets.

    The rows go through ``head`` and :func:`ligerzoo.kernels.cross_entropy` a chunk at a time,
    each chunk under non-reentrant activation checkpointing (``torch.utils.checkpoint``) when
    autograd records: its logits are freed after its forward and computed again in backward,
    so one (C, V) chunk is alive at a time instead of the whole (N, V) logits and their
    gradient, for one more forward of the head. ``head`` therefore runs twice per chunk
    in training (its forward hooks too); the RNG state is restored for the second run, so
    dropout inside the head draws the same mask. The targets are range-checked once for all
    chunks (one host sync). Measured on an H200 (bf16, 8 x 4096 tokens, hidden 4096, V 128,256,
    a LoRA head, 2 layers): the step's peak 26.8 -> 6.5 GiB above the weights, its time 330 ->
    406 ms (the head's second forward; a bare head's fused loss: 321 ms, 5.7 GiB).

    Raises:
        ValueError: a target outside [0, vocab_size) other than ``IGNORE_INDEX``, a head
            whose output is not (C, vocab_size), or a ``chunk_rows`` that is not an int >= 1.
    """
    h = h.reshape(-1, h.shape[-1])  # (N, H)
    targets = targets.reshape(-1)  # (N,)
    n = h.shape[0]
    if chunk_rows is None:
        chunk_rows = max(n, 1) if HEAD_CHUNK_LOGITS is None else \
            max(default_chunk_size(n, h.shape[-1], vocab_size), -(-HEAD_CHUNK_LOGITS // vocab_size))
    if not (is_int(chunk_rows) and chunk_rows >= 1):
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    rows = int(chunk_rows)
    target_check = TargetCheck(targets, vocab_size, IGNORE_INDEX)  # one check (and host sync) for all chunks

    def piece(h_c, t_c):  # (C, H), (C,) -> 0-d
        logits = head(h_c)  # (C, V)
        if logits.shape != (h_c.shape[0], vocab_size):
            raise ValueError(f"lm_head maps (C, H) rows to (C, vocab_size={vocab_size}) logits; got shape "
                             f"{tuple(logits.shape)} for {tuple(h_c.shape)} rows")
        return _cross_entropy(logits, t_c, None, IGNORE_INDEX, "sum", 0.0, 0.0, softcap, False, False,
                              check_targets=False)

    record = torch.is_grad_enabled()
    total = None
    for i in range(0, max(n, 1), rows):  # one empty chunk when N = 0
        args = (h[i:i + rows], targets[i:i + rows])
        part = torch.utils.checkpoint.checkpoint(piece, *args, use_reentrant=False) if record and rows < n \
            else piece(*args)
        total = part if total is None else total + part
    target_check.wait()
    return total


def _all_ranks(flag: bool, device) -> bool:
    """Whether ``flag`` holds on every rank of the default process group (a collective)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _same_on_every_rank(max_new_tokens: int, device) -> None:
    """ValueError on every rank unless all ranks asked for the same ``max_new_tokens`` (a
    collective): synced ranks must run the same number of forwards."""
    t = torch.tensor([int(max_new_tokens), -int(max_new_tokens)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ValueError(f"generate on synced ranks needs the same max_new_tokens on every rank, got values from "
                         f"{-int(t[1])} to {int(t[0])}")


class _FromCheckpoint:
    """The type of :data:`FROM_CHECKPOINT`."""

    def __repr__(self) -> str:
        return "FROM_CHECKPOINT"

    def __reduce__(self) -> str:  # copy.deepcopy and pickle give back the one instance
        return "FROM_CHECKPOINT"


FROM_CHECKPOINT = _FromCheckpoint()
"""``generate``'s default for ``eos_token_id`` and ``pad_token_id``: the checkpoint's value. An
explicit None is not the default: as in transformers' ``generate``, ``eos_token_id=None`` never
stops early and ``pad_token_id=None`` pads with the first eos id."""


def _eos_list(eos) -> list[int]:
    """``generate``'s eos ids as a list: from None, an int, a sequence of ints, or a tensor /
    numpy array or scalar of ints (any shape).

    Raises:
        ValueError: anything else (floats, bools, strings, nested lists).
    """
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        if eos.is_floating_point() or eos.is_complex() or eos.dtype == torch.bool:
            raise ValueError(f"eos_token_id must hold integers, got a {eos.dtype} tensor")
        return eos.flatten().tolist()
    if hasattr(eos, "ravel") and hasattr(eos, "tolist"):  # numpy arrays and scalars
        eos = eos.ravel().tolist()
    items = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if not all(is_int(i) for i in items):
        raise ValueError(f"eos_token_id must be an int or ints, got {eos!r}")
    return [int(i) for i in items]


class CausalLM(nn.Module):
    """A decoder-only causal language model for any supported family.

    Args:
        config: the architecture (``ModelConfig``), also kept as ``self.config``.

    Attributes:
        generation_config: the checkpoint's generation_config.json as a dict ({} when it has
            none or the model was built in code); ``generate`` takes its default
            ``eos_token_id`` from it, as transformers does.

    Build on the meta device and load with ``ligerzoo.from_hf``; or build directly (random
    initialisation as HF's ``_init_weights``).

    The math is that of the family's HF transformers model (``LlamaForCausalLM``,
    ``MistralForCausalLM``, ``MixtralForCausalLM``, ``GemmaForCausalLM``,
    ``Gemma2ForCausalLM``, ``Qwen2ForCausalLM``, ``Phi3ForCausalLM``), checked against it in
    the tests; see the module docstring for the parameter layout. The constructor raises
    nothing itself (:class:`ModelConfig` validated ``config``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.generation_config: dict = {}
        # transformers gives the pad token's row no gradient (nn.Embedding's padding_idx)
        pad = config.pad_token_id
        pad = pad if isinstance(pad, int) and -config.vocab_size <= pad < config.vocab_size else None
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset, config.norm_casting)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq = {False: rope_inv_freq(config)}
        # LongRoPE: the long table serves positions past this length (fixed at build, like the
        # tables: a later edit of config.rope_scaling is refused by save_hf, never half-followed)
        self._longrope_original: int | None = None
        if (config.rope_scaling or {}).get("rope_type") == "longrope":
            self._inv_freq[True] = rope_inv_freq(config, long=True)
            self._longrope_original = int(config.rope_scaling["original_max_position_embeddings"])
        self._inv_freq_on: dict = {}
        if not self.embed.weight.is_meta:
            self.init_weights()

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding Parameter when the config ties them (needed
        again after ``to_empty``, which replaces Parameters one module at a time)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices, embeddings and experts, zeros for biases
        and the pad token's embedding row, norm weights 1 (0 where the norm adds an offset of
        1, as Gemma stores them)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0 - self.config.norm_offset)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        if self.embed.padding_idx is not None:
            self.embed.weight[self.embed.padding_idx].zero_()

    def rope_cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, rotary_dim / 2) float32 for ``position_ids`` (B, T): the first half
        of HF's tables (whose halves are equal), as the attention's RoPE takes them.

        LongRoPE picks its long factors when ``max(position_ids) + 1`` exceeds
        ``original_max_position_embeddings``, per call, like HF (so keys cached by an earlier
        short call keep their short-factor rotation). Under torch.compile both tables are made
        and the pick happens on the device (no host read of the positions)."""
        long = False
        original = self._longrope_original
        if original is not None and position_ids.numel():  # (no positions: no table to pick)
            if torch.compiler.is_compiling():  # no data-dependent branch: both tables, picked on the device
                longer = position_ids.max() + 1 > original  # 0-d bool
                short_cs, long_cs = (rope_cos_sin(position_ids, *self._inv_freq_for(position_ids.device, k), half_table=True)
                                     for k in (False, True))
                return torch.where(longer, long_cs[0], short_cs[0]), torch.where(longer, long_cs[1], short_cs[1])
            long = int(position_ids.max()) + 1 > original
        return rope_cos_sin(position_ids, *self._inv_freq_for(position_ids.device, long), half_table=True)

    def _inv_freq_for(self, device, long: bool):
        """(inv_freq on ``device``, attention scale) of the short or long RoPE table, cached."""
        key = (device, long)
        if key not in self._inv_freq_on:
            inv, scale = self._inv_freq[long]
            self._inv_freq_on[key] = (inv.to(device), scale)
        return self._inv_freq_on[key]

    def hidden_states(self, input_ids, position_ids=None, attention_mask=None, cache: KVCache | None = None):
        """Final-norm hidden states (B, T, H), in the model dtype, for ``input_ids`` (B, T).

        ``position_ids``: (B, T) or (1, T), default ``cache.length + 0..T-1``.
        ``attention_mask``: (B, T) (or (B, S) covering the cache too), 1 for real tokens.
        ``cache``: a :class:`KVCache` to read and extend (its ``length`` is advanced).

        Unlike :meth:`forward` it checks nothing: out-of-range ids fail in the embedding
        lookup (IndexError on CPU, a device-side assert on CUDA).
        """
        return self._final_hidden(input_ids, position_ids, attention_mask, cache)

    def _final_hidden(self, input_ids, position_ids=None, attention_mask=None, cache: KVCache | None = None):
        """:meth:`hidden_states` without its FSDP forward-method wrapper, for ``generate`` (a
        nested wrapper would reshard the root's parameters before generate's own LM head)."""
        return add_norm(self.norm, *self._trunk(input_ids, position_ids, attention_mask, cache))[0]

    def _embed(self, input_ids):
        """The residual stream's start: token embeddings (B, T, H), times sqrt(H) for Gemma."""
        x = self.embed(input_ids)
        if self.config.embed_scale:  # sqrt(H) rounded to the activation dtype first (HF Gemma)
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def _trunk(self, input_ids, position_ids=None, attention_mask=None, cache: KVCache | None = None):
        """The decoder blocks: ``(x, delta)``, each (B, T, H), whose sum the final norm takes."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        S = start + T
        # packed documents (positions that restart) attend within themselves, as transformers
        # does without a cache and without an attention mask
        document = packed_documents(position_ids) if (
            position_ids is not None and attention_mask is None and cache is None and T > 1) else None
        if position_ids is None:
            position_ids = torch.arange(start, S, device=input_ids.device).expand(B, T)
        cos, sin = self.rope_cos_sin(position_ids)  # (B, T, rotary_dim / 2) each
        key_valid = None
        if cache is not None and (attention_mask is not None or not bool(cache.mask[:, :start].all())):
            if attention_mask is not None:
                cache.mask[:, start:S] = attention_mask[:, -T:].bool()
            else:
                cache.mask[:, start:S] = True
            key_valid = cache.mask[:, :S]
        elif cache is not None:
            cache.mask[:, start:S] = True
        elif attention_mask is not None:
            key_valid = attention_mask
        masks = {}
        for t in {layer.layer_type for layer in self.layers}:
            window = self.config.sliding_window if t == "sliding_attention" else None
            if flex.applies(input_ids.device, cache is not None, key_valid, self.config.head_dim):  # never dense
                masks[t] = flex.block_mask(T, document, window, input_ids.device) if flex.needed(
                    T, document, window) else None
            else:
                masks[t] = attention_mask_for(start, T, S, key_valid, window, input_ids.device, document)
        x = self._embed(input_ids)  # (B, T, H)
        delta = None  # each block hands its last branch output to the next block's fused add
        for i, layer in enumerate(self.layers):
            if delta is not None and getattr(layer, "checkpointed", False):
                x, delta = x + delta, None  # the checkpoint then keeps one input, not two
            if (i == 0 and cache is None and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                    and _RecomputedEmbedding.applies(self)):
                # the first block saves the embedding output as ids + table, recomputed in backward
                with _RecomputedEmbedding(self, input_ids, x).hooks():
                    x, delta = layer(x, cos, sin, masks, cache, delta)
            else:
                x, delta = layer(x, cos, sin, masks, cache, delta)
        if cache is not None:
            cache.length = S
        return x, delta

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None,
                num_items_in_batch=None) -> CausalLMOutput:
        """Causal LM forward, HF conventions.

        Args:
            input_ids: (B, T) int64 token ids.
            labels: (B, T) int64, aligned with ``input_ids`` (shifted inside: position t is
                scored on labels[t + 1]); -100 entries are ignored. With labels the loss goes
                through fused linear cross entropy (final softcap included) and no logits are
                materialised.
            position_ids: (B, T) int64, or (1, T) for every row; default ``0..T-1``. Positions that
                restart inside a row (any step other than +1) mark packed documents: without an
                ``attention_mask`` each document attends only within itself (a causal mask per
                document, as transformers without a cache, ``use_cache=False``, and as running
                the documents separately); with one, the restarts only change RoPE.
            attention_mask: (B, T) with 1 for real tokens and 0 for padding (keys at padding
                positions are masked out; a padding position's query attends to itself, so
                its outputs, and a loss on the label it predicts, differ from transformers',
                whose values there depend on its attention backend: mask those labels);
                None means no padding.
            num_items_in_batch: the number of target tokens in the whole optimizer step
                (int or 0-d tensor), for gradient accumulation: loss = summed token loss /
                num_items_in_batch. Default: this batch's number of non-ignored targets.
                Values below 1 count as 1 (a step without targets has loss 0 anyway). Under DDP
                or FSDP, which average gradients over ranks, pass the global count divided by
                the world size (or multiply the loss by the world size, as transformers' Trainer).

        Returns:
            ``CausalLMOutput(loss, logits, aux_loss)``: loss a 0-d float32 tensor (float64 for a
            float64 model; 0 when
            every target is ignored), logits (B, T, V) in the model dtype only without labels.

        The graph is freed by the first backward: ``loss.backward(retain_graph=True)`` then a
        second backward raises RuntimeError (the fused loss keeps its gradients, not its
        logits, and hands them out once).

        Raises:
            ValueError: input_ids not 2-D, not int64 / int32 or outside [0, vocab_size), labels or
                attention_mask shaped unlike input_ids, position_ids neither (B, T) nor (1, T),
                label ids outside [0, vocab_size) other than -100, labels with T = 0, or a
                num_items_in_batch that is neither a number nor a one-element tensor. The id
                and label range checks read values on the host, so torch.compile skips them
                (an out-of-range label there gives a NaN loss).
        """
        if input_ids.dim() != 2:
            hint = "; add a batch dim with input_ids[None]" if input_ids.dim() == 1 else ""
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}{hint}")
        self._check_ids(input_ids)
        if labels is not None and input_ids.shape[1] == 0:
            raise ValueError("labels need sequences of at least one position (T >= 1), got input_ids of shape "
                             f"{tuple(input_ids.shape)}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got a tensor of "
                                 f"shape {tuple(num_items_in_batch.shape)}")
            num_items_in_batch = num_items_in_batch.reshape(())
        elif num_items_in_batch is not None and not is_real(num_items_in_batch):
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got {num_items_in_batch!r}")
        for name, t in (("labels", labels), ("position_ids", position_ids), ("attention_mask", attention_mask)):
            if t is not None and t.shape != input_ids.shape and not (
                    name == "position_ids" and t.shape == (1, input_ids.shape[1])):
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
                                 + (" (or be (1, T), shared by the rows)" if name == "position_ids" else ""))
        if self.config.num_local_experts and self.config.output_router_logits:
            for layer in self.layers:
                layer.mlp.router_logits = []  # collected for the aux loss during this forward only
        x, delta = self._trunk(input_ids, position_ids, attention_mask)  # (B, T, H) x2
        aux = self._aux_loss(attention_mask)
        if labels is not None and delta is not None:
            # the last residual add on its own, so that the last branch output is freed before
            # the loss instead of staying referenced through it (one (B, T, H) tensor less at
            # the loss, where the training step peaks)
            x, delta = x + delta, None
        if labels is None:
            logits = self.lm_head(add_norm(self.norm, x, delta)[0])
            if self.config.final_softcap is not None:
                logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
            return CausalLMOutput(logits=logits, aux_loss=aux)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): targets[t] = labels[t + 1]
        if num_items_in_batch is None:
            num_items_in_batch = (targets != IGNORE_INDEX).sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            # float32 at least (float64 for a float64 model): the 1 / count below is taken in it
            count_dtype = torch.promote_types(x.dtype, torch.float32)
            num_items_in_batch = num_items_in_batch.to(x.device, count_dtype).clamp(min=1)
        else:
            num_items_in_batch = max(num_items_in_batch, 1)
        if plain_linear(self.lm_head) and self.lm_head.bias is None:
            # final norm + LM head + summed cross entropy over num_items_in_batch, without
            # materialising the logits (the 1 / count is folded into the gradients it precomputes)
            loss = norm_linear_cross_entropy(x, delta, self.norm, self.lm_head.weight, targets, IGNORE_INDEX,
                                             self.config.final_softcap, scale=1 / num_items_in_batch)
        else:
            # a head that is not a bare weight (a LoRA or quantised wrapper, a forward hook, a
            # bias): called as a module, a chunk of rows at a time
            loss = head_cross_entropy(self.lm_head, add_norm(self.norm, x, delta)[0], targets,
                                      self.config.vocab_size, self.config.final_softcap) / num_items_in_batch
        if aux is not None:
            loss = loss + self.config.router_aux_loss_coef * aux
        return CausalLMOutput(loss=loss, aux_loss=aux)

    def _aux_loss(self, attention_mask) -> torch.Tensor | None:
        if not self.config.num_local_experts:
            return None
        logits = []
        for layer in self.layers:  # taken back from the layers, so no graph stays attached to the model
            logits.extend(layer.mlp.router_logits or [])
            layer.mlp.router_logits = None
        if not self.config.output_router_logits:
            return None
        return load_balancing_loss(logits, self.config.num_local_experts, self.config.num_experts_per_tok,
                                   attention_mask)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        """ValueError for ids that are not int64 / int32 (the dtypes an embedding lookup takes)
        or lie outside [0, vocab_size), which the lookup would report as an index error (on
        CUDA a device-side assert that ends the process). One host sync, like the loss's label
        check; the range is not checked under torch.compile or on the meta device."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.numel() and not input_ids.is_meta and not torch.compiler.is_compiling():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in "
                                 f"[{lo}, {hi}]")

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, attention_mask=None, eos_token_id=FROM_CHECKPOINT,
                 pad_token_id=FROM_CHECKPOINT, temperature: float = 0.0, top_k: int | None = None, generator=None,
                 synced_ranks: bool | None = None) -> torch.Tensor:
        """Decode with a KV cache: greedy when ``temperature == 0`` else sampling.

        Args:
            input_ids: (B, T) prompt ids; rows may be left-padded, marked by ``attention_mask``.
            max_new_tokens: tokens to add at most.
            attention_mask: (B, T), 1 for real tokens; None means no padding.
            eos_token_id: int, list of ints or int tensor; a row stops at its first one.
                Default (``FROM_CHECKPOINT``): generation_config.json's
                (``self.generation_config``; none when that file has none), else, without that
                file, config.json's. None or ``[]`` never stops early (as transformers, where
                an explicit None overrides the checkpoint's).
            pad_token_id: int (or one-element int tensor) in [0, vocab_size) that fills a
                stopped row's later positions, while other rows go on. Default
                (``FROM_CHECKPOINT``), as transformers: taken from the same file as the eos
                default, else (or when that one is outside the vocabulary) the first eos id.
                None: the first eos id (as transformers' explicit None).
            temperature: 0 for greedy decoding, > 0 (finite) to sample from
                softmax(logits / temperature).
            top_k: when sampling, keep only the k most likely tokens (k >= 1).
            generator: optional ``torch.Generator`` for the sampling (``torch.multinomial``).
            synced_ranks: keep every rank of the default process group stepping until all
                of them are done (a rank whose rows all reached eos runs the remaining forwards
                without adding tokens, as transformers' ``synced_gpus``), for a model whose
                forward is a collective. None: when the model is FSDP2-sharded (DTensor parameters
                or fully_shard units) and
                torch.distributed is initialised. Every rank must then call generate with the
                same ``max_new_tokens``.

        Returns:
            (B, T + n) int64 (the prompt followed by the new tokens), n <= max_new_tokens:
            n new-token forwards (the prompt's included), never one more.

        Raises:
            ValueError: input_ids not 2-D, without tokens or with ids outside [0, vocab_size)
                (see ``forward``), a temperature that is negative
                or not finite, max_new_tokens or top_k not an int (or < 0, < 1), an
                attention_mask not shaped like input_ids, a row with no real token, right
                padding (a row whose last prompt position is padding), an
                ``eos_token_id`` that is not an int or ints, a ``pad_token_id`` that is not an
                int, or not in [0, vocab_size) when an eos id is set (a stopped row is then
                fed it), or (synced ranks) a
                ``max_new_tokens`` that differs between ranks (on every rank).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
        self._check_ids(input_ids)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is not None and not bool(attention_mask.bool().any(-1).all()):
            rows = (~attention_mask.bool().any(-1)).nonzero().flatten().tolist()
            raise ValueError(f"rows {rows} of attention_mask have no real token (all 0): every prompt needs one")
        if attention_mask is not None and not bool(attention_mask[:, -1].bool().all()):
            raise ValueError("generate needs left padding: some rows end in padding (attention_mask 0 at the "
                             "last position); pad prompts on the left (tokenizer padding_side='left')")
        if not (is_int(max_new_tokens) and max_new_tokens >= 0 and (top_k is None or (is_int(top_k) and top_k >= 1))
                and 0 <= temperature < math.inf):
            raise ValueError(f"need an int max_new_tokens >= 0, a finite temperature >= 0 and an int top_k >= 1 (or "
                             f"None); got temperature={temperature}, max_new_tokens={max_new_tokens}, top_k={top_k}")
        B, T = input_ids.shape
        device = input_ids.device
        if synced_ranks is None:
            synced_ranks = torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1 \
                and (any_dtensor(self.parameters()) or bool(fsdp_modules(self)))
        if synced_ranks:  # 0 too: a rank returning at once would leave the others waiting
            _same_on_every_rank(max_new_tokens, device)
        source = "the eos_token_id argument"
        if eos_token_id is FROM_CHECKPOINT:  # as transformers: generation_config.json decides when there is one
            source = "generation_config.json" if self.generation_config else "model.config.eos_token_id"
            eos_token_id = self.generation_config.get("eos_token_id") if self.generation_config \
                else self.config.eos_token_id
        try:
            eos = torch.tensor(_eos_list(eos_token_id), device=device, dtype=torch.long)
        except ValueError as e:
            raise ValueError(f"{e} (from {source})") from None
        pad_from_eos = pad_token_id is None  # as transformers' explicit None: the first eos id, if any
        if pad_from_eos:
            pad_token_id = int(eos[0]) if eos.numel() else None
        elif pad_token_id is FROM_CHECKPOINT:
            # as transformers: generation_config.json's, else the one config.json states (a
            # family's class default, e.g. Gemma's 0, sets the embedding's padding_idx only)
            pad_token_id = self.generation_config.get("pad_token_id") if self.generation_config \
                else (self.config.hf_config.get("pad_token_id") if self.config.hf_config is not None
                      else self.config.pad_token_id)
            if not (is_int(pad_token_id) and 0 <= pad_token_id < self.config.vocab_size):
                # none, or a stored one outside the vocabulary (some configs hold -1), which
                # transformers would feed back and fail on once a row stops early
                pad_token_id, pad_from_eos = (int(eos[0]) if eos.numel() else None), True
        if isinstance(pad_token_id, torch.Tensor) and pad_token_id.numel() == 1:
            pad_token_id = pad_token_id.reshape(())  # a one-element tensor, as transformers takes it
        if pad_token_id is not None:
            if not is_int(pad_token_id):
                raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
            pad_token_id = int(pad_token_id)
            if eos.numel() and not 0 <= pad_token_id < self.config.vocab_size:  # it is fed back as an input
                what = f"the pad id (the first eos id, from {source})" if pad_from_eos else "pad_token_id"
                raise ValueError(f"{what} {pad_token_id} is outside [0, vocab_size={self.config.vocab_size})"
                                 + ("; pass pad_token_id" if pad_from_eos else ""))
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        attention_mask = attention_mask.bool()
        cache = KVCache(self.config, B, T + max_new_tokens, device, self.embed.weight.dtype)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        tokens, done = input_ids, torch.zeros(B, dtype=torch.bool, device=device)
        next_pos = positions[:, -1:] + 1  # (B, 1)
        padded = not bool(attention_mask.all())
        # Phi3's generate in transformers (prepare_inputs_for_generation) drops its cache once,
        # when the sequence (padding included) first grows past original_max_position_embeddings,
        # and recomputes it; other families with LongRoPE keep their cache.
        long_rope_at = None  # that length
        if self._longrope_original is not None and self.config.model_type == "phi3" and T <= self._longrope_original:
            long_rope_at = self._longrope_original + 1
        if max_new_tokens == 0:
            return input_ids.to(torch.long, copy=True)  # int64 and the caller's own tensor left alone
        h = self._final_hidden(input_ids, positions, attention_mask if padded else None, cache)[:, -1]  # (B, H)
        finished = False  # this rank's rows all stopped (later forwards only keep the ranks in step)
        for step in range(max_new_tokens):
            if not finished:
                logits = self.lm_head(h).float()  # (B, V)
                if self.config.final_softcap is not None:
                    logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
                if temperature > 0:
                    if top_k is not None:  # before the division, which keeps the order (ties aside)
                        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    # shifted (<= 0, 0 at the max) and divided in float64, where any temperature
                    # > 0 is > 0 (1e-300 is 0 in fp32: 0 / 0 gave nan probabilities)
                    logits = (logits - logits.amax(-1, keepdim=True)).double() / temperature
                    nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
                else:
                    nxt = logits.argmax(-1)
                if eos.numel():
                    nxt = torch.where(done, pad_token_id, nxt)
                    done = done | torch.isin(nxt, eos)
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                finished = bool(eos.numel()) and bool(done.all())
            if step == max_new_tokens - 1 or (_all_ranks(finished, device) if synced_ranks else finished):
                break
            if long_rope_at is not None and tokens.shape[1] >= long_rope_at:
                # recompute the whole cache; each forward picks the short or long factors from its
                # largest position, as transformers' does
                mask = torch.cat([attention_mask, torch.ones_like(tokens[:, T:], dtype=torch.bool)], dim=1)
                cache = KVCache(self.config, B, T + max_new_tokens, device, self.embed.weight.dtype)
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
                h = self._final_hidden(tokens, pos, mask if padded else None, cache)[:, -1]
                long_rope_at = None
            else:
                h = self._final_hidden(nxt[:, None], next_pos, None, cache)[:, -1]
            next_pos = next_pos + 1
        return tokens
