"""Shared test helpers: tiny random transformers models saved as HF checkpoint dirs."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

TINY_LLAMA = dict(
    vocab_size=173, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def make_hf_llama(directory: Path | None = None, *, dtype=torch.float32, seed: int = 0, save_kwargs=None, **overrides):
    """A random transformers LlamaForCausalLM (eager attention), saved to ``directory`` if given.

    Norm weights are randomised too (HF initialises them to 1, which would hide a swapped norm).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(TINY_LLAMA | overrides))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.2)
    model.eval()
    if directory is not None:
        model.save_pretrained(directory, **(save_kwargs or {}))
    return model


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in ``directory`` (for comparisons in tests)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out
