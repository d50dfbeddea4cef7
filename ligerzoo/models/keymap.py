"""HF checkpoint key <-> ligerzoo parameter slice maps.

A key map says, for every tensor name of an HF checkpoint, which parameter of our model
holds it and which rows (dim 0) of that parameter: fused parameters (q|k|v, gate|up) are
filled slice by slice on load and cut back out on save, by explicit sizes (never
``chunk``, which is wrong where GQA makes the parts unequal). Loading and saving are
plain row copies, so a round trip is bit for bit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ligerzoo.models.config import ModelConfig


@dataclass(frozen=True)
class Slot:
    """Rows ``[start, stop)`` of parameter ``param`` (the whole parameter when start is None)."""

    param: str
    start: int | None = None
    stop: int | None = None


@dataclass
class KeyMap:
    """``slots``: HF key -> Slot, in checkpoint order. ``ignore``: regexes of HF keys that are
    accepted and dropped (non-persistent buffers old checkpoints carry, a tied duplicate)."""

    slots: dict[str, Slot] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)

    def ignored(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.ignore)


def decoder_key_map(config: ModelConfig, prefix: str = "model.") -> KeyMap:
    """The Llama-layout decoder map (archs.md §0) shared by the Llama-style families.

    HF names: ``{prefix}embed_tokens``, ``{prefix}layers.{i}.input_layernorm``,
    ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``,
    ``{prefix}norm``, ``lm_head`` (absent when tied).
    """
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    km = KeyMap(ignore=[rf"{re.escape(prefix)}layers\.\d+\.self_attn\.rotary_emb\.inv_freq"])
    s = km.slots
    s[f"{prefix}embed_tokens.weight"] = Slot("embed.weight")
    for i in range(config.num_hidden_layers):
        hf, ours = f"{prefix}layers.{i}.", f"layers.{i}."
        s[hf + "input_layernorm.weight"] = Slot(ours + "attn_norm.weight")
        parts = (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv))
        for name, a, b in parts:
            s[hf + f"self_attn.{name}.weight"] = Slot(ours + "attn.wqkv.weight", a, b)
        if config.qkv_bias:
            for name, a, b in parts:
                s[hf + f"self_attn.{name}.bias"] = Slot(ours + "attn.wqkv.bias", a, b)
        s[hf + "self_attn.o_proj.weight"] = Slot(ours + "attn.wo.weight")
        if config.o_bias:
            s[hf + "self_attn.o_proj.bias"] = Slot(ours + "attn.wo.bias")
        s[hf + "post_attention_layernorm.weight"] = Slot(ours + "mlp_norm.weight")
        s[hf + "mlp.gate_proj.weight"] = Slot(ours + "mlp.w_gate_up.weight", 0, inter)
        s[hf + "mlp.up_proj.weight"] = Slot(ours + "mlp.w_gate_up.weight", inter, 2 * inter)
        s[hf + "mlp.down_proj.weight"] = Slot(ours + "mlp.w_down.weight")
        if config.mlp_bias:
            s[hf + "mlp.gate_proj.bias"] = Slot(ours + "mlp.w_gate_up.bias", 0, inter)
            s[hf + "mlp.up_proj.bias"] = Slot(ours + "mlp.w_gate_up.bias", inter, 2 * inter)
            s[hf + "mlp.down_proj.bias"] = Slot(ours + "mlp.w_down.bias")
    s[f"{prefix}norm.weight"] = Slot("norm.weight")
    if config.tie_word_embeddings:
        km.ignore.append(r"lm_head\.weight")  # HF tolerates a stored duplicate of the tied head
    else:
        s["lm_head.weight"] = Slot("lm_head.weight")
    return km
