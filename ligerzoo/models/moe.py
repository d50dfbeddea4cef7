"""Sparse mixture-of-experts feed-forward layer (Mixtral) and its load-balancing loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ligerzoo.models.config import ModelConfig


def gated_act(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` on a fused (..., 2I) projection (gate first) -> (..., I);
    ``activation`` "silu" (SwiGLU) or "gelu_tanh" (GeGLU). Raises ValueError for others."""
    if activation == "silu":
        from ligerzoo.kernels.swiglu import swiglu_fused

        return swiglu_fused(gate_up)
    if activation == "gelu_tanh":
        from ligerzoo.kernels.geglu import geglu_fused

        return geglu_fused(gate_up)
    raise ValueError(f"activation must be 'silu' or 'gelu_tanh', got {activation!r}")


def grouped_mm_fast_path_ok(*mats: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands on its fast CUDA kernel (CUTLASS,
    sm90 / sm100) without copies: every operand bf16, with one of its last two strides 1 and
    the other a multiple of 16 bytes and at least that dim's size, starting 16-byte aligned
    (the checks of ATen's ``GroupedMMUtils.h``, on the storage offset so that it also holds
    under ``torch.compile``; the caching allocator aligns the storage base), each group's
    matrix 16-byte aligned too, and fewer than 1024 groups (CUTLASS's limit).

    Args:
        mats: (G, K, N) grouped weights and/or (M, K) activations.
    """
    for m in mats:
        if m.dtype != torch.bfloat16 or m.dim() not in (2, 3):
            return False
        align = 16 // m.element_size()
        if m.dim() == 3 and (m.shape[0] >= 1024 or m.stride(0) % align):
            return False
        (s_r, s_c), (n_r, n_c) = m.stride()[-2:], m.shape[-2:]
        if (m.storage_offset() * m.element_size()) % 16:
            return False
        row_major = s_c == 1 and s_r >= max(1, n_c) and s_r % align == 0
        col_major = s_r == 1 and s_c >= max(1, n_r) and s_c % align == 0
        if not (row_major or col_major):
            return False
    return True


def sort_by_expert(experts: torch.Tensor, num_experts: int):
    """Groups the (token, slot) assignments by expert, on the device and without a host sync.

    Args:
        experts: (N, k) int64 expert ids of each token's top-k slots.
        num_experts: E.

    Returns:
        ``order`` (N k,) int64: flat assignment ``n k + j`` at each sorted position (a stable
        sort, so tokens keep their order inside an expert's group); ``token`` (N k,) int64:
        ``order // k``, the token of each sorted row; ``inv`` (N k,) int64: the sorted
        position of each flat assignment (``order``'s inverse); ``offs`` (E,) int32:
        cumulative group ends (``offs[e]`` = rows of experts <= e; ``offs[-1] = N k``),
        the ``offs`` of ``torch._grouped_mm``.
    """
    k = experts.shape[-1]
    flat = experts.reshape(-1)  # (N k,)
    sorted_experts, order = torch.sort(flat, stable=True)  # (N k,) each
    token = order // k  # (N k,)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    ids = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)  # (E,)
    offs = torch.searchsorted(sorted_experts, ids, right=True, out_int32=True)  # (E,) group ends
    return order, token, inv, offs


class _Dispatch(torch.autograd.Function):
    """``xs = x[token]``: each token's row copied to its k sorted slots. Backward: the k
    slot gradients of each token gathered back through ``inv`` and summed in one reduction
    (fp32 accumulation for bf16), with no scatter-add."""

    @staticmethod
    def forward(ctx, x, token, inv, k: int):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, token)  # (N k, H)

    @staticmethod
    def backward(ctx, dxs):
        (inv,) = ctx.saved_tensors
        k, H = ctx.k, dxs.shape[-1]
        dx = dxs.index_select(0, inv).view(-1, k, H).sum(1)  # (N k, H) token-major -> (N, H)
        return dx, None, None, None


class _Combine(torch.autograd.Function):
    """``y[n] = sum_j round(out[inv[n k + j]] * w_sorted[inv[n k + j]])``: the expert outputs
    scaled by their routing weights (product in the weights' fp32, rounded to the output
    dtype, as HF's ``current_hidden_states * top_k_weights`` then ``.to(dtype)``), then
    summed per token in one reduction (for k = 2 the same rounding as HF's ``index_add_``).

    Backward (the adjoint of the gather): ``d_out = round(dy[token] * w_sorted)`` and
    ``d_w_sorted = <dy[token], out>`` in fp32, as torch autograd computes HF's graph.
    """

    @staticmethod
    def forward(ctx, out, w_sorted, token, inv, k: int, shape: tuple):
        ow = torch.empty_like(out)  # (N k, H) sorted
        torch.mul(out, w_sorted[:, None], out=ow)  # computed in promote(out, w) dtype, rounded once
        ctx.save_for_backward(out, w_sorted, token)
        ctx.k = k
        # (B, T, H) = shape, summed straight into it (not a view: FSDP2 warns about a block
        # returning one)
        return ow.index_select(0, inv).view(*shape[:-1], k, shape[-1]).sum(-2)

    @staticmethod
    def backward(ctx, dy):
        out, w_sorted, token = ctx.saved_tensors
        g = dy.reshape(-1, dy.shape[-1]).index_select(0, token)  # (N k, H) gradient of each scaled sorted row
        d_out = d_w = None
        if ctx.needs_input_grad[0]:
            d_out = torch.empty_like(out)
            torch.mul(g, w_sorted[:, None], out=d_out)  # (N k, H)
        if ctx.needs_input_grad[1]:
            ct = torch.promote_types(out.dtype, w_sorted.dtype)
            d_w = (g.to(ct) * out).sum(-1).to(w_sorted.dtype)  # (N k,) exact products, ct sums
        return d_out, d_w, None, None, None, None


def experts_grouped(xs: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, offs: torch.Tensor,
                    activation: str) -> torch.Tensor:
    """Every expert's gated MLP over its group of rows: two ``torch._grouped_mm`` calls.

    Args:
        xs: (M, H) rows sorted by expert; rows ``offs[e-1]:offs[e]`` go to expert e.
        w_gate_up: (E, 2I, H) rows gate | up; w_down: (E, H, I).
        offs: (E,) int32 cumulative group ends, ``offs[-1] == M`` (:func:`sort_by_expert`).
        activation: "silu" or "gelu_tanh".

    Returns:
        (M, H): ``down_e(act(gate_e xs) * up_e xs)`` row by row, in ``xs.dtype``.
        Differentiable in ``xs`` and both weights through ``_grouped_mm``'s own autograd
        (weight gradients in the parameters' layout; zero for an expert with no rows).

    The weights are passed as transposed views, (E, H, 2I) and (E, I, H) column-major,
    which the kernel reads in place (no copy). With bf16 on sm90 / sm100 this is one CUTLASS
    grouped GEMM per projection, no host sync; other dtypes / devices use torch's own
    per-group loop (it reads ``offs`` on the host). Either way torch requires every operand's
    row stride to be a multiple of 16 bytes (e.g. H and I multiples of 8 in bf16) and raises
    RuntimeError otherwise.
    """
    gate_up = torch._grouped_mm(xs, w_gate_up.transpose(-2, -1), offs=offs)  # (M, 2I)
    h = gated_act(gate_up, activation)  # (M, I)
    return torch._grouped_mm(h, w_down.transpose(-2, -1), offs=offs)  # (M, H)


def experts_loop(xs: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, offs: torch.Tensor,
                 activation: str) -> torch.Tensor:
    """:func:`experts_grouped` as a loop over experts (two ``F.linear`` per non-empty group),
    for any dtype, size and device; reads ``offs`` on the host (a sync on CUDA).

    Args and returns: as :func:`experts_grouped` (xs (M, H) sorted by expert, w_gate_up
    (E, 2I, H), w_down (E, H, I), offs (E,) cumulative group ends, activation) -> (M, H).

    The rows are cut with ``split`` and the experts with ``unbind``, so the backward
    assembles each gradient once (a cat / a stack, zeros for an empty expert) rather than
    accumulating one full-size zero-padded tensor per expert.
    """
    ends = [0] + offs.tolist()
    sizes = [b - a for a, b in zip(ends[:-1], ends[1:])]
    w1, w2 = w_gate_up.unbind(0), w_down.unbind(0)  # E x (2I, H), E x (H, I)
    outs = [F.linear(gated_act(F.linear(seg, w1[e]), activation), w2[e])  # (n_e, H)
            for e, seg in enumerate(xs.split(sizes)) if sizes[e]]
    if not outs:
        return xs.new_zeros(0, w_down.shape[1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]  # (M, H)


class MoE(nn.Module):
    """Sparse mixture of gated-MLP experts with a softmax top-k router (Mixtral, arXiv 2401.04088).

    Math (HF ``MixtralSparseMoeBlock``): ``p = softmax(x Wr^T)`` in fp32 (float64 for a
    float64 model), top-k, weights renormalised to sum 1 (``MixtralTopKRouter``);
    ``y = sum_j round(w_j * expert_{e_j}(x))``, each weighted expert output rounded to the
    model dtype before the per-token sum.

    Execution: assignments are sorted by expert on the device (:func:`sort_by_expert`), rows
    gathered once (:class:`_Dispatch`), each expert runs over its contiguous group, then
    outputs are weighted and summed back per token (:class:`_Combine`). The experts run as
    two grouped GEMMs (:func:`experts_grouped`, no host sync) when ``torch._grouped_mm``'s
    fast kernel applies (CUDA, bf16, 16-byte aligned layouts), else as a loop
    (:func:`experts_loop`). ``impl`` forces one: "auto" (default), "grouped" or "loop".

    Parameters: ``router.weight`` (E, H), ``w_gate_up`` (E, 2I, H) rows gate | up,
    ``w_down`` (E, H, I).
    """

    impl: str = "auto"

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.jitter = config.router_jitter_noise
        self.activation = config.activation
        self.router = nn.Linear(H, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, 2 * inter, H))
        self.w_down = nn.Parameter(torch.empty(E, H, inter))
        # (N, E) router logits of the last forward, kept only while the model collects them for
        # the aux loss (CausalLM sets it to [] before its blocks and takes it back after), so a
        # checkpoint's recomputation in backward keeps no graph on the module
        self.router_logits: list | None = None

    def use_grouped(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs :func:`experts_grouped` on ``x`` (N, H), by ``impl``.
        "auto": on CUDA bf16 with the fast kernel's layouts (on a GPU other than sm90 /
        sm100, torch serves ``_grouped_mm`` with its own per-group loop, still correct).

        Raises:
            ValueError: ``impl`` not "auto", "grouped" or "loop"; or "grouped" forced where
                ``torch._grouped_mm`` is missing or the sizes break its 16-byte alignment.
        """
        if self.impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"MoE.impl must be 'auto', 'grouped' or 'loop', got {self.impl!r}")
        if self.impl == "grouped":
            H, inter = self.w_down.shape[1], self.w_down.shape[2]
            aligned = H * x.element_size() % 16 == 0 and inter * x.element_size() % 16 == 0  # every row stride
            if not hasattr(torch, "_grouped_mm") or not aligned:
                raise ValueError("MoE.impl='grouped' needs torch._grouped_mm and rows of a multiple of 16 bytes "
                                 f"(hidden_size {self.w_down.shape[1]}, intermediate_size {self.w_down.shape[2]}, "
                                 f"{x.dtype}); use impl='auto' or 'loop'")
            return True
        if self.impl == "loop":
            return False
        return (x.is_cuda and x.shape[0] > 0 and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
                and grouped_mm_fast_path_ok(self.w_gate_up.transpose(-2, -1), self.w_down.transpose(-2, -1)))

    def forward(self, x):
        """x: (B, T, H) -> (B, T, H) in ``x.dtype``; appends the (B T, E) router logits to
        ``router_logits`` when that is a list."""
        B, T, H = x.shape
        k = self.top_k
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        x = x.reshape(-1, H)  # (N, H)
        logits = self.router(x)  # (N, E)
        if self.router_logits is not None:
            self.router_logits.append(logits)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, E)
        weights, experts = torch.topk(probs, k, dim=-1)  # (N, k) each
        weights = weights / weights.sum(dim=-1, keepdim=True)
        order, token, inv, offs = sort_by_expert(experts, self.num_experts)  # (N k,) x3, (E,)
        xs = _Dispatch.apply(x, token, inv, k)  # (N k, H) grouped by expert
        run = experts_grouped if self.use_grouped(x) else experts_loop
        out = run(xs, self.w_gate_up, self.w_down, offs, self.activation)  # (N k, H)
        w_sorted = weights.reshape(-1).index_select(0, order)  # (N k,) routing weight of each row
        return _Combine.apply(out, w_sorted, token, inv, k, (B, T, H))  # (B, T, H)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6) over all MoE layers,
    as HF ``load_balancing_loss_func``: E * sum_e f_e * P_e, with f_e the fraction of top-k
    assignments to expert e and P_e its mean router probability, padding rows excluded (0
    for a batch without tokens, or with every one padding, where HF's divides 0 by 0)."""
    logits = torch.cat(router_logits, dim=0).float()  # (L N, E)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L N, k)
    counts = F.one_hot(chosen, num_experts).sum(1).float()  # (L N, E)
    if attention_mask is None:
        w = torch.ones(logits.shape[0], device=logits.device)
    else:
        w = attention_mask.reshape(-1).float().to(logits.device).repeat(len(router_logits))
    total = w.sum().clamp(min=1.0)  # a count of tokens: only an empty batch has less than 1
    tokens_per_expert = (counts * w[:, None]).sum(0) / total
    prob_per_expert = (probs * w[:, None]).sum(0) / total
    return num_experts * (tokens_per_expert * prob_per_expert).sum()
