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
    norm.weight                        (H,)
    lm_head.weight                     (V, H)                 the same Parameter as embed.weight when tied

q/k/v and gate/up are fused so that each is one matmul; the loader fills the slices by
explicit sizes and the saver cuts them back out (models/keymap.py), bit for bit.

Math follows HF transformers' LlamaForCausalLM (modeling_llama.py): pre-norm blocks,
RoPE in the half-split layout, causal softmax attention scaled by hd**-0.5, SwiGLU MLP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from ligerzoo.kernels.rope import rope, rope_cos_sin
from ligerzoo.kernels.swiglu import swiglu_fused
from ligerzoo.models.config import ModelConfig
from ligerzoo.nn import RMSNorm

IGNORE_INDEX = -100


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (hd/2,) float32 and the cos/sin scale, as HF computes them.

    Types: "default" (theta^(-2i/d), RoFormer, arXiv 2104.09864), "linear" (positions
    divided by ``factor``, i.e. inv_freq / factor) and "llama3" (Meta's Llama 3.1 band-wise
    interpolation; HF ``_compute_llama3_parameters``). Computed on the CPU in float32.
    """
    dim = config.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponent)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
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
    return inv_freq, 1.0


@dataclass
class CausalLMOutput:
    """``loss``: scalar (None without labels). ``logits``: (B, T, V) in the model dtype, None
    when labels were given (the loss goes through fused linear cross entropy instead)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class KVCache:
    """Preallocated key/value cache for incremental decoding.

    ``k[i]``, ``v[i]``: (B, nkv, max_len, hd) for layer i; ``mask``: (B, max_len) bool, True
    where a cached position holds a real (non-padding) token.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # positions filled so far
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hd) after the cached ones; return all (B, nkv, S, hd)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA; MQA when nkv = 1), RoPE and
    ``torch.nn.functional.scaled_dot_product_attention``."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.sizes = [config.q_size, config.kv_size, config.kv_size]
        self.wqkv = nn.Linear(config.hidden_size, sum(self.sizes), bias=config.qkv_bias)
        self.wo = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        self.scale = config.head_dim ** -0.5

    def forward(self, x, cos, sin, attn_mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self.sizes, dim=-1)  # (B, T, nh hd), (B, T, nkv hd) x2
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        q, k = rope(q, k, cos, sin)  # (B, T, nh, hd), (B, T, nkv, hd)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
            scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nh hd)
        return self.wo(y)


class MLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))`` with gate and up fused in one matmul (SwiGLU,
    Shazeer 2020, arXiv 2002.05202)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
        self.w_gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w_down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        return self.w_down(swiglu_fused(self.w_gate_up(x)))  # (B, T, 2I) -> (B, T, I) -> (B, T, H)


class Block(nn.Module):
    """Pre-norm decoder block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, cache)
        return h + self.mlp(self.mlp_norm(h))


class CausalLM(nn.Module):
    """A decoder-only causal language model for any supported family.

    Args:
        config: the architecture (``ModelConfig``), also kept as ``self.config``.

    Build on the meta device and load with ``ligerzoo.from_hf``; or build directly and call
    ``init_weights()`` for a randomly initialised model.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq, self._rope_scale = rope_inv_freq(config)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}
        if not self.embed.weight.is_meta:
            self.init_weights()

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the embedding Parameter when the config ties them (needed
        again after ``to_empty``, which replaces Parameters one module at a time)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, zeros for biases, ones for
        norm weights (HF ``_init_weights``)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)

    def rope_cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, hd) float32 for ``position_ids`` (B, T)."""
        device = position_ids.device
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self._inv_freq.to(device)
        return rope_cos_sin(position_ids, self._inv_freq_on[device], self._rope_scale)

    def hidden_states(self, input_ids, position_ids=None, attn_mask=None, cache: KVCache | None = None):
        """Final-norm hidden states (B, T, H) for ``input_ids`` (B, T).

        ``attn_mask``: None or bool (B, 1, T, S), True where a query may attend. None means
        causal attention over the T new tokens, or, for one new token (T = 1) after a cache,
        attention to every cached key; a chunk of T > 1 tokens after a non-empty cache needs
        an explicit mask.
        """
        B, T = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope_cos_sin(position_ids)  # (B, T, hd) each
        x = self.embed(input_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None,
                num_items_in_batch=None) -> CausalLMOutput:
        """Causal LM forward, HF conventions.

        Args:
            input_ids: (B, T) int64 token ids.
            labels: (B, T) int64, aligned with ``input_ids`` (shifted inside: position t is
                scored on labels[t + 1]); -100 entries are ignored. With labels the loss goes
                through fused linear cross entropy and no logits are materialised.
            position_ids: (B, T) int64; default ``0..T-1`` for every row.
            attention_mask: (B, T) with 1 for real tokens and 0 for padding (keys at padding
                positions are masked out); None means no padding.
            num_items_in_batch: the number of target tokens in the whole optimizer step
                (int or 0-d tensor), for gradient accumulation: loss = summed token loss /
                num_items_in_batch. Default: this batch's number of non-ignored targets.

        Returns:
            ``CausalLMOutput(loss, logits)``: loss a 0-d float32 tensor (0 when every target is
            ignored), logits (B, T, V) in the model dtype only when no labels were given.

        Raises:
            ValueError: labels shaped unlike input_ids, or label ids outside [0, vocab_size)
                other than -100.
        """
        attn_mask = padding_mask(attention_mask, input_ids.shape[1]) if attention_mask is not None else None
        h = self.hidden_states(input_ids, position_ids, attn_mask)  # (B, T, H)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(h))
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): targets[t] = labels[t + 1]
        loss_sum = fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        if num_items_in_batch is None:
            num_items_in_batch = (targets != IGNORE_INDEX).sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device).clamp(min=1)
        else:
            num_items_in_batch = max(int(num_items_in_batch), 1)
        return CausalLMOutput(loss=loss_sum / num_items_in_batch)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, attention_mask=None, eos_token_id=None,
                 temperature: float = 0.0, top_k: int | None = None, generator=None) -> torch.Tensor:
        """Decode with a KV cache: greedy when ``temperature == 0`` else sampling.

        Args:
            input_ids: (B, T) prompt ids; rows may be left-padded, marked by ``attention_mask``.
            max_new_tokens: tokens to add at most.
            attention_mask: (B, T), 1 for real tokens; None means no padding.
            eos_token_id: int or list of ints; a row stops at its first one (later positions
                are filled with the first eos id). Default: the config's.
        Returns:
            (B, T + n) int64, n <= max_new_tokens.
        """
        B, T = input_ids.shape
        device = input_ids.device
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=device, dtype=torch.long)
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
        attention_mask = attention_mask.bool()
        padded = not bool(attention_mask.all())
        cache = KVCache(self.config, B, T + max_new_tokens, device, self.embed.weight.dtype)
        cache.mask[:, :T] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        mask = padding_mask(attention_mask, T) if padded else None
        tokens, done = input_ids, torch.zeros(B, dtype=torch.bool, device=device)
        next_pos = positions[:, -1:] + 1  # (B, 1)
        h = self.hidden_states(input_ids, positions, mask, cache)[:, -1]  # (B, H)
        for _ in range(max_new_tokens):
            logits = self.lm_head(h).float()  # (B, V)
            if temperature > 0:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            if eos.numel():
                nxt = torch.where(done, eos[0], nxt)
                done = done | torch.isin(nxt, eos)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if bool(done.all()) or cache.length == cache.max_len:
                break
            cache.mask[:, cache.length] = True
            step_mask = cache.mask[:, None, None, : cache.length + 1] if padded else None  # (B, 1, 1, S)
            h = self.hidden_states(nxt[:, None], next_pos, step_mask, cache)[:, -1]
            next_pos = next_pos + 1
        return tokens


def padding_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Bool (B, 1, T, T) SDPA mask: causal and key not padding. A query row always sees its
    own position, so padding queries never get an empty (NaN) softmax row."""
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return (causal & keys) | eye
