"""Mixtral (HF ``model_type`` "mixtral"): the Mistral decoder with a sparse mixture of
SwiGLU experts in place of the MLP (``num_local_experts`` experts, top ``num_experts_per_tok``,
softmax router with renormalised top-k weights) and, when ``output_router_logits``, the
load-balancing loss scaled by ``router_aux_loss_coef`` added to the loss. Checkpoints in the
per-expert hub layout and in transformers 5.x's fused layout both load; save_hf writes the
hub layout (archs.md §3)."""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig, read_common, uniform_layer_types, write_common
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["MixtralForCausalLM"]
DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32}  # MixtralConfig


def config_from_hf(hf: dict) -> ModelConfig:
    common = read_common(hf, DEFAULTS)
    window = hf.get("sliding_window")
    return ModelConfig(
        **common, sliding_window=window, layer_types=uniform_layer_types(common["num_hidden_layers"], window),
        num_local_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        output_router_logits=bool(hf.get("output_router_logits", False)),
        router_jitter_noise=hf.get("router_jitter_noise", 0.0) or 0.0)


def config_to_hf(config: ModelConfig) -> dict:
    return write_common(config, ARCHITECTURES) | {
        "sliding_window": config.sliding_window, "num_local_experts": config.num_local_experts,
        "num_experts_per_tok": config.num_experts_per_tok, "router_aux_loss_coef": config.router_aux_loss_coef,
        "output_router_logits": config.output_router_logits, "router_jitter_noise": config.router_jitter_noise}


def key_map(config: ModelConfig) -> KeyMap:
    return decoder_key_map(config)
