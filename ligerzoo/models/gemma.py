"""Gemma v1 / 1.1 (HF ``model_type`` "gemma").

Differs from the Llama decoder in: RMSNorm weights stored as offsets (``x * (1 + w)``) with
Gemma's cast order (multiply in fp32, then cast); embeddings scaled by sqrt(hidden_size)
rounded to the activation dtype; a tanh-GeGLU MLP (transformers reads ``hidden_act`` in 5.x,
where the releases' legacy "gelu" means tanh-GELU, and ``hidden_activation`` in 4.x, default
``gelu_pytorch_tanh``; PR #29402: any other activation is refused); a tied head
by default; ``head_dim`` 256 even where hidden / heads differs (7B: q_proj is 4096 wide for
hidden 3072); 2B is multi-query (one KV head). See archs.md §4.
"""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig, read_common, write_common
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["GemmaForCausalLM"]


# Activation names that are tanh-approximate GELU in transformers' ACT2FN.
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def check_tanh_gelu(hf: dict, fields: tuple[str, ...]) -> None:
    """Refuse a config whose MLP activation is not tanh-GELU: ``fields`` are the config keys
    transformers reads for it (Gemma: ``hidden_act`` in 5.x, where the legacy "gelu" of the
    original releases means tanh-GELU, and ``hidden_activation`` in 4.x; Gemma2:
    ``hidden_activation``). Absent keys take transformers' default, tanh-GELU.

    Raises:
        ValueError: naming the field and its value.
    """
    for key in fields:
        value = hf.get(key)
        if value is not None and value not in TANH_GELUS and not (key == "hidden_act" and value == "gelu"):
            raise ValueError(f"config.json {key}={value!r}: this family's MLP is tanh-GELU (GeGLU) in ligerzoo; "
                             f"supported: {', '.join(TANH_GELUS)}")


def gemma_fields(hf: dict) -> dict:
    """ModelConfig keyword arguments shared by Gemma and Gemma2."""
    check_tanh_gelu(hf, ("hidden_act", "hidden_activation") if hf.get("model_type") == "gemma"
                    else ("hidden_activation",))
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json sets use_bidirectional_attention=true (an encoder such as EmbeddingGemma): "
                         "ligerzoo's Gemma is a causal decoder only")
    # GemmaConfig / Gemma2Config defaults for keys config.json may omit (pad_token_id: the
    # embedding row transformers gives no gradient; generate pads only with a stated one)
    common = read_common(hf, {"head_dim": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
                              "pad_token_id": 0})
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
