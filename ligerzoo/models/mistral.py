"""Mistral (HF ``model_type`` "mistral"): the Llama decoder with sliding-window attention on
every layer when ``sliding_window`` is set (7B v0.1: 4096; null from v0.2), and ``head_dim``
read from the config (Mistral-Nemo: 128 with hidden 5120 / 32 heads). A config.json with
``layer_types`` (Ministral's alternating sliding and full layers) follows them, as
transformers 5.x does: its ``AutoConfig`` reads such a "mistral" config as "ministral",
whose weights have the same names; they are written back when some layers slide and
others do not."""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig, read_common, uniform_layer_types, write_common
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["MistralForCausalLM"]
DEFAULTS = {"sliding_window": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 4096 * 32}  # MistralConfig


def config_from_hf(hf: dict) -> ModelConfig:
    common = read_common(hf, DEFAULTS)
    window = hf.get("sliding_window", DEFAULTS["sliding_window"])
    layer_types = hf.get("layer_types")
    if layer_types is None:
        layer_types = uniform_layer_types(common["num_hidden_layers"], window)
    elif "sliding_attention" not in layer_types:
        window, layer_types = None, None   # no layer slides
    return ModelConfig(**common, sliding_window=window, layer_types=layer_types)


def config_to_hf(config: ModelConfig) -> dict:
    out = write_common(config, ARCHITECTURES) | {"sliding_window": config.sliding_window}
    types = config.layer_types
    if types and "sliding_attention" in types and types != uniform_layer_types(len(types), config.sliding_window):
        # some layers slide, not all: only transformers 5.x's layer_types (Ministral) says so. A
        # window that no layer uses is not written this way: transformers 4.x would slide every
        # layer (save_hf's read-back check refuses such a config built in code)
        out["layer_types"] = list(types)
    return out


def key_map(config: ModelConfig) -> KeyMap:
    return decoder_key_map(config)
