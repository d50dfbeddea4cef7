"""Model registry: HF ``model_type`` -> family module.

A family module provides ``ARCHITECTURES`` (the HF class names written to config.json),
``config_from_hf(dict) -> ModelConfig``, ``config_to_hf(ModelConfig) -> dict`` and
``key_map(ModelConfig) -> KeyMap``. The model itself is always ``CausalLM``.
"""
from __future__ import annotations

from types import ModuleType

from ligerzoo.models import gemma, gemma2, llama, mistral, mixtral, phi3, qwen2
from ligerzoo.models.config import MODEL_TYPES, ModelConfig
from ligerzoo.models.transformer import FROM_CHECKPOINT, CausalLM, CausalLMOutput, KVCache

FAMILIES: dict[str, ModuleType] = {
    "llama": llama, "mistral": mistral, "mixtral": mixtral, "gemma": gemma, "gemma2": gemma2, "qwen2": qwen2,
    "phi3": phi3,
}
assert set(FAMILIES) == set(MODEL_TYPES), "register a new family in both places"


def family(model_type: str | None) -> ModuleType:
    """The family module for ``model_type`` (a key of :data:`FAMILIES`).

    Raises:
        ValueError: an unknown ``model_type`` (the message lists the supported ones).
    """
    if model_type is None:
        raise ValueError(f"config.json has no \"model_type\" (missing or null); expected one of: "
                         f"{', '.join(sorted(FAMILIES))}")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(
            f"unknown model_type {model_type!r}; supported model types: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict) -> ModelConfig:
    """``ModelConfig`` from a config.json dict (transformers 4.x or 5.x layout).

    Raises:
        ValueError: an unknown ``model_type``, a ``quantization_config``, a required field
            missing, an activation or rope type the family does not implement, or values
            :class:`ModelConfig` refuses.
    """
    return family(hf.get("model_type")).config_from_hf(hf)


__all__ = ["CausalLM", "CausalLMOutput", "KVCache", "ModelConfig", "FAMILIES", "family", "config_from_hf"]
