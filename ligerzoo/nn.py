"""``nn.Module`` wrappers of the kernels, for composing your own model.

Each module holds only parameters and options; the math is the functional op in
``ligerzoo.kernels`` (Triton on CUDA, reference torch on CPU unless TRITON_INTERPRET=1).
"""
from __future__ import annotations

import torch
from torch import nn

from ligerzoo.kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dim (Zhang & Sennrich 2019, arXiv 1910.07467).

    ``y = x / sqrt(mean(x**2) + eps) * (offset + weight)`` with the cast order of
    ``casting_mode`` ("llama": HF LlamaRMSNorm; "gemma": HF GemmaRMSNorm; "none").

    Args:
        hidden_size: H, the size of the normalised last dim; ``weight`` is (H,).
        eps: added to the mean square.
        offset: added to the weight (1.0 for Gemma's zero-initialised weights).
        casting_mode: "llama", "gemma" or "none".
    Shapes: x (..., H) -> (..., H), same dtype as x.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, casting_mode: str = "llama"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps, self.offset, self.casting_mode = eps, offset, casting_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, self.casting_mode)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, casting_mode={self.casting_mode!r}"
