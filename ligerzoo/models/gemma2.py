"""Gemma 2 (HF ``model_type`` "gemma2"): Gemma plus

* attention-logit softcapping (``attn_logit_softcapping``, 50) and final-logit softcapping
  (``final_logit_softcapping``, 30; applied inside fused linear cross entropy for the loss);
* norms after attention and around the MLP (``post_attention_layernorm`` normalises the
  attention *output*; ``pre_/post_feedforward_layernorm`` wrap the MLP);
* sliding-window attention on alternate layers (even indices; ``layer_types`` when given; a
  model without sliding layers is written with every layer named full);
* softmax scale ``query_pre_attn_scalar ** -0.5`` (27B: 144, not head_dim 128).
See archs.md §5.
"""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig
from ligerzoo.models.gemma import gemma_fields, gemma_hf_fields
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["Gemma2ForCausalLM"]


def config_from_hf(hf: dict) -> ModelConfig:
    fields = gemma_fields(hf)
    n = fields["num_hidden_layers"]
    window = hf.get("sliding_window", 4096)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if window is None or all(t == "full_attention" for t in layer_types):
        window, layer_types = None, None   # no layer slides
    return ModelConfig(
        **fields, post_norms=True, sliding_window=window, layer_types=layer_types,
        attn_softcap=hf.get("attn_logit_softcapping", 50.0), final_softcap=hf.get("final_logit_softcapping", 30.0),
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5)


def config_to_hf(config: ModelConfig) -> dict:
    scalar = round(config.attn_scale ** -2) if config.attn_scale is not None else config.head_dim
    window, layer_types = config.sliding_window, config.layer_types
    if layer_types is None or "sliding_attention" not in layer_types:
        # no sliding window: transformers would slide alternate layers whatever sliding_window
        # says, so every layer is named full, with a window spanning every position for the
        # transformers releases that read sliding_window alone
        window = config.max_position_embeddings
        layer_types = ["full_attention"] * config.num_hidden_layers
    return gemma_hf_fields(config, ARCHITECTURES) | {
        "sliding_window": window, "layer_types": layer_types,
        "attn_logit_softcapping": config.attn_softcap, "final_logit_softcapping": config.final_softcap,
        "query_pre_attn_scalar": scalar}


def key_map(config: ModelConfig) -> KeyMap:
    return decoder_key_map(config)
