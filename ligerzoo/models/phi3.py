"""Phi-3 / Phi-3.5 (HF ``model_type`` "phi3").

Differs from the Llama decoder in the checkpoint layout only: one ``qkv_proj`` (rows q | k | v,
sizes nh*hd, nkv*hd, nkv*hd: GQA variants such as Phi-3-medium make them unequal) and one
``gate_up_proj`` (rows gate | up), which map onto our fused parameters whole. Plus
LongRoPE scaling (``rope_scaling`` type "longrope", old names "su" and "yarn" with
short/long factors) and ``partial_rotary_factor``; a ``sliding_window`` applies to every layer.

LongRoPE regime (as transformers): each forward call picks the long factors when
``max(position_ids) + 1 > original_max_position_embeddings``, else the short ones, and
scales cos/sin by the attention factor in both regimes. Keys already in a KV cache keep the
rotation of the call that produced them (generation that crosses the boundary does not
re-rotate them; vLLM instead uses the long factors throughout).
"""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig, read_common, uniform_layer_types, write_common
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["Phi3ForCausalLM"]


def config_from_hf(hf: dict) -> ModelConfig:
    common = read_common(hf)
    scaling = common["rope_scaling"]
    if scaling is not None and scaling.get("rope_type") == "yarn" and "short_factor" in scaling:
        scaling["rope_type"] = "longrope"  # Phi3's old name for it
    window = hf.get("sliding_window")
    return ModelConfig(**common, sliding_window=window,
                       layer_types=uniform_layer_types(hf, common["num_hidden_layers"], window))


def config_to_hf(config: ModelConfig) -> dict:
    out = write_common(config, ARCHITECTURES) | {"sliding_window": config.sliding_window,
                                                 "partial_rotary_factor": config.partial_rotary_factor}
    if config.rope_scaling and "original_max_position_embeddings" in config.rope_scaling:
        out["original_max_position_embeddings"] = config.rope_scaling["original_max_position_embeddings"]
    return out


def key_map(config: ModelConfig) -> KeyMap:
    return decoder_key_map(config, fused_qkv=True, fused_gate_up=True)
