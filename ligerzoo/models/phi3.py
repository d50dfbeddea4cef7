"""Phi-3 / Phi-3.5 (HF ``model_type`` "phi3").

Differs from the Llama decoder in the checkpoint layout only: one ``qkv_proj`` (rows q | k | v,
sizes nh*hd, nkv*hd, nkv*hd: GQA variants such as Phi-3-medium make them unequal) and one
``gate_up_proj`` (rows gate | up), which map onto our fused parameters whole. Plus
LongRoPE scaling (``rope_scaling`` type "longrope", old names "su" and "yarn" with
short/long factors) and ``partial_rotary_factor``; a ``sliding_window`` applies to every layer.

LongRoPE regime (as transformers): each forward call picks the long factors when
``max(position_ids) + 1 > original_max_position_embeddings``, else the short ones, and
scales cos/sin by the attention factor in both regimes. ``generate`` recomputes its KV cache
once, when the sequence (left padding included) first grows past the boundary, as
transformers' Phi3 does (vLLM instead uses the long factors throughout); other families
with a LongRoPE keep their cache, as transformers' do. ``partial_rotary_factor`` (read from
the RoPE dict first, ``rope_scaling`` else ``rope_parameters``, as transformers) is honoured
only here.
"""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig, read_common, uniform_layer_types, write_common
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["Phi3ForCausalLM"]
# Phi3Config's defaults for keys config.json may omit (pad_token_id: the embedding row
# transformers gives no gradient; generate pads only with a stated one)
DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "pad_token_id": 32000}


def config_from_hf(hf: dict) -> ModelConfig:
    common = read_common(hf, DEFAULTS, partial_rotary=True)
    scaling = common["rope_scaling"]
    if scaling is not None and scaling.get("rope_type") != "longrope":
        # transformers' Phi3Config refuses them too: no such checkpoint loads there, and save_hf
        # would write a config.json transformers cannot read
        raise ValueError(f"config.json sets a {scaling.get('rope_type')!r} RoPE for phi3; Phi3 (as transformers' "
                         f"Phi3Config) takes only 'longrope' (legacy 'su' / 'yarn' with short and long factors) or none")
    if scaling is not None and scaling.get("rope_type") == "longrope":
        # Phi3Config's top-level value (class default 4096) takes priority over rope_scaling's
        scaling["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", 4096)
    window = hf.get("sliding_window")
    return ModelConfig(**common, sliding_window=window, layer_types=uniform_layer_types(common["num_hidden_layers"], window))


def config_to_hf(config: ModelConfig) -> dict:
    out = write_common(config, ARCHITECTURES) | {"sliding_window": config.sliding_window,
                                                 "partial_rotary_factor": config.partial_rotary_factor}
    if config.rope_scaling and "original_max_position_embeddings" in config.rope_scaling:
        out["original_max_position_embeddings"] = config.rope_scaling["original_max_position_embeddings"]
    return out


def key_map(config: ModelConfig) -> KeyMap:
    return decoder_key_map(config, fused_qkv=True, fused_gate_up=True)
