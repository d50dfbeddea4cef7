"""Qwen2 / Qwen2.5 (HF ``model_type`` "qwen2"): the Llama decoder with q/k/v biases (always;
o_proj has none) and optional sliding windows on layers ``i >= max_window_layers`` when
``use_sliding_window`` (false in every release); transformers 5.x writes ``layer_types``
(read when present, and written when the sliding layers are not the last ones, which only it
can say).
Small models (0.5B-3B) tie the head."""
from __future__ import annotations

from ligerzoo.models.config import ModelConfig, read_common, write_common
from ligerzoo.models.keymap import KeyMap, decoder_key_map

ARCHITECTURES = ["Qwen2ForCausalLM"]


def config_from_hf(hf: dict) -> ModelConfig:
    common = read_common(hf, {"max_position_embeddings": 32768})  # Qwen2Config's default
    n = common["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    if "sliding_attention" not in layer_types or window is None:
        # transformers too: without use_sliding_window, "sliding_attention" layers attend fully
        layer_types, window = None, None
    return ModelConfig(**common, qkv_bias=True, sliding_window=window, layer_types=layer_types)


def config_to_hf(config: ModelConfig) -> dict:
    types = config.layer_types or ["full_attention"] * config.num_hidden_layers
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    out = write_common(config, ARCHITECTURES) | {
        "use_sliding_window": bool(sliding), "sliding_window": config.sliding_window,
        "max_window_layers": sliding[0] if sliding else config.num_hidden_layers}
    if sliding and sliding != list(range(sliding[0], config.num_hidden_layers)):
        # not the layers from max_window_layers on: only transformers 5.x's layer_types says it
        out["layer_types"] = list(types)
    return out


def key_map(config: ModelConfig) -> KeyMap:
    return decoder_key_map(config)
