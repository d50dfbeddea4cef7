"""ligerzoo: standalone PyTorch LLMs on our own Triton kernels, with exact HF checkpoint I/O.

    model = ligerzoo.from_hf("Qwen/Qwen2.5-7B", dtype=torch.bfloat16, device="cuda").train()
    out = model(input_ids, labels=labels)   # loss via fused linear cross entropy
    out.loss.backward()
    ligerzoo.save_hf(model, "out/")
"""
from ligerzoo import data, kernels, nn, parallel  # so that ligerzoo.parallel.apply_fsdp etc. resolve
from ligerzoo.hub import from_hf, save_hf
from ligerzoo.models import CausalLM, CausalLMOutput, ModelConfig
from ligerzoo.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = ["from_hf", "save_hf", "load_tokenizer", "Tokenizer", "CausalLM", "CausalLMOutput", "ModelConfig",
           "__version__"]
