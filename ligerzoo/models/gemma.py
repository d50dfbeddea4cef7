"""Gemma v1 / 1.1 (HF ``model_type`` "gemma").

Differs from the Llama decoder in: RMSNorm weights stored as offsets (``x * (1 + w)``) with
Gemma's cast order (multiply in fp32, then cast); embeddings scaled by sqrt(hidden_size)
rounded to the activation dtype; a tanh-GeGLU MLP whatever ``hidden_act`` says (HF uses
``hidden_activation``, default ``gelu_pytorch_tanh``; transformers PR #29402); a tied head
by default; ``head_dim`` 256 even where hidden / heads differs (7B: q_proj is 4096 wide for
hidden 3072); 2B is multi-query (one KV head). See archs.md §4.
"""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig, read_common, write_common
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["GemmaForCausalLM"]


def gemma_fields(hf: dict) -> dict:
    """ModelConfig keyword arguments shared by Gemma and Gemma2."""
    common = read_common(hf, {"head_dim": 256, "rms_norm_eps": 1e-6})  # GemmaConfig / Gemma2Config defaults
    bias = bool(hf.get("attention_bias", False))
    return common | dict(hidden_act="gelu_pytorch_tanh", tie_word_embeddings=hf.get("tie_word_embeddings", True),
                         norm_offset=1.0, norm_casting="gemma", embed_scale=True, qkv_bias=bias, o_bias=bias)


def gemma_hf_fields(config: ModelConfig, architectures: list[str]) -> dict:
    out = write_common(config, architectures)
    out.pop("hidden_act")
    return out | {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": config.qkv_bias}


def config_from_hf(hf: dict) -> ModelConfig:
    return ModelConfig(**gemma_fields(hf))


def config_to_hf(config: ModelConfig) -> dict:
    return gemma_hf_fields(config, ARCHITECTURES)


def key_map(config: ModelConfig) -> KeyMap:
    return decoder_key_map(config)
