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
    """Rows ``[start, stop)`` of parameter ``param``, or of its ``expert``-th matrix when the
    parameter stacks experts (E, rows, cols); the whole (expert) tensor when start is None."""

    param: str
    start: int | None = None
    stop: int | None = None
    expert: int | None = None

    def view(self, tensor):
        """The slot's region of parameter ``tensor``: a view (rows of dim 0, after picking
        the expert), never a copy."""
        t = tensor if self.expert is None else tensor[self.expert]
        return t if self.start is None else t[self.start: self.stop]

    def overlaps(self, other: "Slot") -> bool:
        """Whether the two slots share any element of the same parameter."""
        if self.param != other.param:
            return False
        if self.expert is not None and other.expert is not None and self.expert != other.expert:
            return False
        if self.start is None or other.start is None:
            return True
        return self.start < other.stop and other.start < self.stop

    def covers(self, other: "Slot") -> bool:
        """Whether this slot's region contains ``other``'s (same parameter)."""
        if self.param != other.param:
            return False
        if self.expert is None and self.start is None:
            return True
        return self.expert == other.expert and (self.start is None or (
            other.start is not None and self.start <= other.start and other.stop <= self.stop))


@dataclass
class KeyMap:
    """``slots``: HF key -> Slot, in checkpoint order: the layout save_hf writes and from_hf
    expects. ``alternatives``: keys of another layout of the same weights that from_hf also
    accepts (e.g. transformers 5.x fused experts), each covering whole parameters.
    ``ignore``: regexes of HF keys that are
    accepted and dropped (non-persistent buffers old checkpoints carry). ``duplicates``: keys a
    checkpoint may carry as a copy of a slot (a tied head); they must equal it."""

    slots: dict[str, Slot] = field(default_factory=dict)
    alternatives: dict[str, Slot] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    duplicates: dict[str, Slot] = field(default_factory=dict)

    def ignored(self, key: str) -> bool:
        """Whether ``key`` fully matches one of the ``ignore`` regexes."""
        return any(re.fullmatch(p, key) for p in self.ignore)


def decoder_key_map(config: ModelConfig, *, prefix: str = "model.", fused_qkv: bool = False,
                    fused_gate_up: bool = False) -> KeyMap:
    """The Llama-layout decoder map (archs.md §0), shared by every text family.

    HF names: ``{prefix}embed_tokens``, ``{prefix}layers.{i}.input_layernorm``,
    ``self_attn.{q,k,v,o}_proj`` (or one ``qkv_proj`` with ``fused_qkv``, Phi3),
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj`` (or ``gate_up_proj`` with
    ``fused_gate_up``), ``{prefix}norm``, ``lm_head`` (absent when tied). With
    ``config.post_norms`` (Gemma2) ``post_attention_layernorm`` is the norm *after*
    attention and ``pre_/post_feedforward_layernorm`` surround the MLP. MoE configs get the
    expert keys of ``moe_key_map`` instead of the MLP's.
    """
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    km = KeyMap(ignore=[r"(.+\.)?rotary_emb\.inv_freq"])  # any RoPE buffer an old checkpoint carries, as transformers
    s = km.slots
    s[f"{prefix}embed_tokens.weight"] = Slot("embed.weight")
    for i in range(config.num_hidden_layers):
        hf, ours = f"{prefix}layers.{i}.", f"layers.{i}."
        s[hf + "input_layernorm.weight"] = Slot(ours + "attn_norm.weight")
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            if fused_qkv:
                s[hf + f"self_attn.qkv_proj.{kind}"] = Slot(ours + f"attn.wqkv.{kind}")
            else:
                for name, a, b in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
                    s[hf + f"self_attn.{name}.{kind}"] = Slot(ours + f"attn.wqkv.{kind}", a, b)
        for kind in ("weight", "bias") if config.o_bias else ("weight",):
            s[hf + f"self_attn.o_proj.{kind}"] = Slot(ours + f"attn.wo.{kind}")
        if config.post_norms:
            s[hf + "post_attention_layernorm.weight"] = Slot(ours + "attn_post_norm.weight")
            s[hf + "pre_feedforward_layernorm.weight"] = Slot(ours + "mlp_norm.weight")
            s[hf + "post_feedforward_layernorm.weight"] = Slot(ours + "mlp_post_norm.weight")
        else:
            s[hf + "post_attention_layernorm.weight"] = Slot(ours + "mlp_norm.weight")
        if config.num_local_experts:
            moe_key_map(km, config, hf, ours)
            continue
        for kind in ("weight", "bias") if config.mlp_bias else ("weight",):
            if fused_gate_up:
                s[hf + f"mlp.gate_up_proj.{kind}"] = Slot(ours + f"mlp.w_gate_up.{kind}")
            else:
                s[hf + f"mlp.gate_proj.{kind}"] = Slot(ours + f"mlp.w_gate_up.{kind}", 0, inter)
                s[hf + f"mlp.up_proj.{kind}"] = Slot(ours + f"mlp.w_gate_up.{kind}", inter, 2 * inter)
            s[hf + f"mlp.down_proj.{kind}"] = Slot(ours + f"mlp.w_down.{kind}")
    s[f"{prefix}norm.weight"] = Slot("norm.weight")
    if config.tie_word_embeddings:
        km.duplicates["lm_head.weight"] = Slot("embed.weight")  # a stored copy of the tied head must equal it
    else:
        s["lm_head.weight"] = Slot("lm_head.weight")
    return km


def moe_key_map(km: KeyMap, config: ModelConfig, hf: str, ours: str) -> None:
    """Mixtral's expert keys for one layer (archs.md §3).

    Saved layout (every released checkpoint, and what transformers 5.x writes back):
    ``block_sparse_moe.gate.weight`` (E, H) and ``block_sparse_moe.experts.{e}.w1/w3/w2.weight``
    (gate (I, H), up (I, H), down (H, I)). Also accepted on load: transformers 5.x's in-memory
    layout ``mlp.gate.weight``, ``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj``.
    """
    inter = config.intermediate_size
    km.slots[hf + "block_sparse_moe.gate.weight"] = Slot(ours + "mlp.router.weight")
    for e in range(config.num_local_experts):
        x = hf + f"block_sparse_moe.experts.{e}."
        km.slots[x + "w1.weight"] = Slot(ours + "mlp.w_gate_up", 0, inter, expert=e)
        km.slots[x + "w2.weight"] = Slot(ours + "mlp.w_down", expert=e)
        km.slots[x + "w3.weight"] = Slot(ours + "mlp.w_gate_up", inter, 2 * inter, expert=e)
    km.alternatives[hf + "mlp.gate.weight"] = Slot(ours + "mlp.router.weight")
    km.alternatives[hf + "mlp.experts.gate_up_proj"] = Slot(ours + "mlp.w_gate_up")
    km.alternatives[hf + "mlp.experts.down_proj"] = Slot(ours + "mlp.w_down")
