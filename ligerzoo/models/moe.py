"""Sparse mixture-of-experts feed-forward layer (Mixtral) and its load-balancing loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ligerzoo.models.config import ModelConfig


def gated_act(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` on a fused (..., 2I) projection (gate first) -> (..., I)."""
    if activation == "silu":
        from ligerzoo.kernels.swiglu import swiglu_fused

        return swiglu_fused(gate_up)
    from ligerzoo.kernels.geglu import geglu_fused

    return geglu_fused(gate_up)


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts with a softmax top-k router (Mixtral, arXiv 2401.04088).

    Router: ``p = softmax(x Wr^T)`` in fp32, top-k, weights renormalised to sum 1 (HF
    ``MixtralTopKRouter``). Tokens are sorted by expert and each expert runs one batched
    matmul over its contiguous group (a loop over experts, never over tokens).

    Parameters: ``router.weight`` (E, H), ``w_gate_up`` (E, 2I, H) rows gate | up,
    ``w_down`` (E, H, I).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.jitter = config.router_jitter_noise
        self.activation = config.activation
        self.router = nn.Linear(H, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * inter, H))
        self.w_down = nn.Parameter(torch.empty(E, H, inter))
        self.router_logits: torch.Tensor | None = None  # (N, E), kept for the aux loss

    def forward(self, x):
        B, T, H = x.shape
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        x = x.reshape(-1, H)  # (N, H)
        logits = self.router(x)  # (N, E)
        self.router_logits = logits
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = experts.reshape(-1)  # (N k,)
        order = torch.argsort(flat, stable=True)
        token = order // self.top_k  # token of each sorted assignment
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[token]  # (N k, H) grouped by expert
        out = torch.empty(xs.shape[0], H, dtype=x.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                seg = xs[start:start + n]
                h = gated_act(F.linear(seg, self.w_gate_up[e]), self.activation)  # (n, I)
                out[start:start + n] = F.linear(h, self.w_down[e])
            start += n
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out)
        return y.view(B, T, H)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6) over all MoE layers,
    as HF ``load_balancing_loss_func``: E * sum_e f_e * P_e, with f_e the fraction of top-k
    assignments to expert e and P_e its mean router probability, padding rows excluded."""
    logits = torch.cat(router_logits, dim=0).float()  # (L N, E)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L N, k)
    counts = F.one_hot(chosen, num_experts).sum(1).float()  # (L N, E)
    if attention_mask is None:
        w = torch.ones(logits.shape[0], device=logits.device)
    else:
        w = attention_mask.reshape(-1).float().to(logits.device).repeat(len(router_logits))
    total = w.sum()
    tokens_per_expert = (counts * w[:, None]).sum(0) / total
    prob_per_expert = (probs * w[:, None]).sum(0) / total
    return num_experts * (tokens_per_expert * prob_per_expert).sum()
