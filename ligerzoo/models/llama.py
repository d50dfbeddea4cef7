"""Llama 2 / 3 / 3.1 / 3.2 / 3.3 and SmolLM2 (HF ``model_type`` "llama").

What differs from the shared decoder: nothing but the config translation. ``attention_bias``
puts a bias on q, k, v and o; ``mlp_bias`` on gate, up and down; ``rope_scaling`` may be
"llama3" (3.1+) or "linear"; ``head_dim`` may differ from hidden/heads.
"""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig, read_common, write_common
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["LlamaForCausalLM"]


def config_from_hf(hf: dict) -> ModelConfig:
    # pretraining_tp > 1 only makes HF slice its matmuls; the math is identical, so it is ignored.
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**read_common(hf), qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def config_to_hf(config: ModelConfig) -> dict:
    if config.qkv_bias != config.o_bias:
        raise ValueError("Llama's attention_bias covers q, k, v and o together; qkv_bias and o_bias must match")
    return write_common(config, ARCHITECTURES) | {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}


def key_map(config: ModelConfig) -> KeyMap:
    return decoder_key_map(config)
