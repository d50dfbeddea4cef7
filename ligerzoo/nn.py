"""``nn.Module`` wrappers of the kernels, for composing your own model.

Each module holds only parameters and options; the math is the functional op in
``ligerzoo.kernels`` (Triton on CUDA, Triton under the interpreter on CPU when
TRITON_INTERPRET=1, the torch reference otherwise). Their Liger Kernel counterparts are
listed in the README. As torch's modules: options are plain attributes read at every call,
modules with parameters take ``device=`` / ``dtype=`` keyword arguments, and ``repr`` shows
the key options and those not at their defaults.
"""
from __future__ import annotations

import torch
from torch import nn

from ligerzoo._checks import check_real, is_int, plain_linear
from ligerzoo.kernels.cross_entropy import check_loss_options, cross_entropy
from ligerzoo.kernels.embedding import embedding, padding_row
from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from ligerzoo.kernels.fused_linear_jsd import fused_linear_jsd
from ligerzoo.kernels.geglu import geglu_fused
from ligerzoo.kernels.group_norm import group_norm
from ligerzoo.kernels.jsd import jsd
from ligerzoo.kernels.kl_div import REDUCTIONS as KL_REDUCTIONS, kl_div
from ligerzoo.kernels.layer_norm import layer_norm
from ligerzoo.kernels.rms_norm import fused_add_rms_norm, rms_norm
from ligerzoo.kernels.swiglu import swiglu_fused


def _check_last_dim(module: str, x: torch.Tensor, size: int) -> None:
    """ValueError unless x is (..., size): the message names the size the module was built for."""
    if x.dim() < 1 or x.shape[-1] != size:
        raise ValueError(f"{module} was built for inputs (..., {size}) (hidden_size={size}), "
                         f"got x of shape {tuple(x.shape)}")


def _positive_ints(module: str, **sizes) -> None:
    """ValueError naming the first of ``sizes`` that is not a positive int (Python, numpy or
    a 0-dim integer tensor, as ``nn.Linear`` takes)."""
    for name, value in sizes.items():
        if not is_int(value) or int(value) < 1:
            raise ValueError(f"{module}: {name} must be a positive int, got {value!r}")


def _last_dim_size(module: str, hidden_size) -> int:
    """H from ``hidden_size`` given as an int or, as torch's ``normalized_shape``, a one-dim
    sequence (``(H,)``, ``[H]``, ``x.shape[-1:]``).

    Raises:
        ValueError: not a positive int or a one-element sequence of one (these modules
            normalise over the last dim only).
    """
    if isinstance(hidden_size, (tuple, list, torch.Size)):
        if len(hidden_size) != 1:
            raise ValueError(f"{module} normalises over the last dim only: normalized_shape must have one entry, "
                             f"got {tuple(hidden_size)}")
        hidden_size = hidden_size[0]
    _positive_ints(module, hidden_size=hidden_size)
    return int(hidden_size)


def _options(module: nn.Module, always: tuple = (), **defaults) -> str:
    """``extra_repr`` text: ``name=value`` for the attributes named in ``always``, then for
    those of ``defaults`` whose value differs from the given default."""
    names = [*always, *(k for k, d in defaults.items() if getattr(module, k) != d)]
    return ", ".join(f"{k}={getattr(module, k)!r}" for k in names)


def _ones_zeros(weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        if weight is not None:
            weight.fill_(1.0)
        if bias is not None:
            bias.zero_()


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dim (Zhang & Sennrich 2019, arXiv 1910.07467).

    ``y = x / sqrt(mean(x**2) + eps) * (offset + weight)`` with the cast order of
    ``casting_mode`` ("llama": HF LlamaRMSNorm; "gemma": HF GemmaRMSNorm; "none").

    Args:
        hidden_size: H, the size of the normalised last dim (or ``(H,)``); ``weight`` is (H,).
        eps: added to the mean square.
        offset: added to the weight (1.0 for Gemma's zero-initialised weights; the weight then
            starts at 0).
        casting_mode: "llama", "gemma" or "none".
        device, dtype: of ``weight`` (keyword only, as torch's factory kwargs; default fp32).

    Shapes and dtypes: x (..., H) of any float dtype -> (..., H) in x's dtype (the math in
    fp32 as ``casting_mode`` says). ``forward(x, residual)`` adds the residual first and
    returns ``(normed, x + residual)`` in one kernel.

    Raises:
        ValueError: an unknown ``casting_mode`` or a ``hidden_size`` that is not a positive
            int or ``(H,)`` (at construction); at the call, x whose last
            dim is not H (the message names H and x's shape), or the other errors of
            :func:`ligerzoo.kernels.rms_norm` (non-float x, ``residual`` unlike x).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, casting_mode: str = "llama",
                 *, device=None, dtype=None):
        super().__init__()
        if casting_mode not in ("llama", "gemma", "none"):
            raise ValueError(f"casting_mode must be 'llama', 'gemma' or 'none', got {casting_mode!r}")
        hidden_size = _last_dim_size("RMSNorm", hidden_size)
        self.normalized_shape = (hidden_size,)
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.eps, self.offset, self.casting_mode = eps, offset, casting_mode
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` to ``1 - offset`` (a scale of 1), as after construction."""
        with torch.no_grad():
            self.weight.fill_(1.0 - self.offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        _check_last_dim("RMSNorm", x, self.normalized_shape[0])
        if residual is not None:
            return fused_add_rms_norm(x, residual, self.weight, self.eps, self.offset, self.casting_mode)
        return rms_norm(x, self.weight, self.eps, self.offset, self.casting_mode)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, " + _options(self, ("eps",), offset=0.0, casting_mode="llama")


class LayerNorm(nn.Module):
    """Layer norm over the last dim (Ba et al. 2016, arXiv 1607.06450) =
    ``torch.nn.LayerNorm(hidden_size, eps, elementwise_affine=..., bias=..., device=...,
    dtype=...)``.

    Args:
        hidden_size: H, the size of the normalised last dim, or torch's ``normalized_shape``
            for one dim (``(H,)``, ``[H]``, ``x.shape[-1:]``); the module's
            ``normalized_shape`` is ``(H,)``.
        eps: added to the variance.
        elementwise_affine, bias, device, dtype: in torch's order:
            ``elementwise_affine=False`` makes no ``weight`` and no ``bias`` (both None),
            ``bias=False`` no ``bias``; ``device`` / ``dtype`` of the parameters (fp32 by
            default).

    Shapes and dtypes: x (..., H) of any float dtype -> (..., H) in x's dtype (statistics in
    fp32); ``weight`` (ones) / ``bias`` (zeros) (H,) parameters.

    Raises:
        ValueError: a ``hidden_size`` that is not a positive int or ``(H,)`` (at construction);
            at the call, x whose last dim is not H (the message names H and x's
            shape), or the other errors of :func:`ligerzoo.kernels.layer_norm` (non-float x).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        hidden_size = _last_dim_size("LayerNorm", hidden_size)
        self.normalized_shape, self.eps, self.elementwise_affine = (hidden_size,), eps, elementwise_affine
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(hidden_size, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.empty(hidden_size, **factory)) if elementwise_affine and bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` to ones and ``bias`` to zeros, as torch's."""
        _ones_zeros(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_last_dim("LayerNorm", x, self.normalized_shape[0])
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, " + _options(self, ("eps",), elementwise_affine=True)
        return text + (", bias=False" if self.elementwise_affine and self.bias is None else "")


class GroupNorm(nn.Module):
    """Group norm (Wu & He 2018, arXiv 1803.08494): the same math as
    ``torch.nn.GroupNorm(num_groups, num_channels, eps, affine)``, but with Liger Kernel's
    argument order (``LigerGroupNorm(num_channels, num_groups, eps)``): channels first.
    Keyword arguments avoid the mix-up: ``GroupNorm(num_channels=64, num_groups=8)``.

    ``device`` / ``dtype`` (keyword only, as torch's) place and type the parameters.

    Shapes and dtypes: x (N, C, *) of any float dtype -> same shape and dtype (statistics in
    fp32); ``weight``/``bias`` (C,) parameters, fp32 by default (``affine=False``: none).

    Raises:
        ValueError: ``num_channels`` or ``num_groups`` not a positive int, ``num_channels``
            not divisible by ``num_groups`` (the message names both,
            and the argument order); x that is not (N, num_channels, *) (at the call, with or
            without ``affine``).
    """

    def __init__(self, num_channels: int, num_groups: int, eps: float = 1e-5, affine: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        _positive_ints("GroupNorm", num_channels=num_channels, num_groups=num_groups)
        num_channels, num_groups = int(num_channels), int(num_groups)
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
                             f"note the order GroupNorm(num_channels, num_groups), as Liger Kernel's, not torch's")
        self.num_channels, self.num_groups, self.eps, self.affine = num_channels, num_groups, eps, affine
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_channels, **factory)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_channels, **factory)) if affine else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` to ones and ``bias`` to zeros, as torch's."""
        _ones_zeros(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            channels = f" with {x.shape[1]} channels" if x.dim() >= 2 else ""
            raise ValueError(f"GroupNorm was built for num_channels={self.num_channels} (x of shape "
                             f"(N, {self.num_channels}, *)), got x of shape {tuple(x.shape)}{channels}")
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:  # by keyword: the argument order is not torch's
        return _options(self, ("num_channels", "num_groups", "eps"), affine=True)


class _GatedMLP(nn.Module):
    _act = staticmethod(swiglu_fused)

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, *, device=None, dtype=None):
        super().__init__()
        _positive_ints(type(self).__name__, hidden_size=hidden_size, intermediate_size=intermediate_size)
        hidden_size, intermediate_size = int(hidden_size), int(intermediate_size)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.w_gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias, device=device, dtype=dtype)
        self.w_down = nn.Linear(intermediate_size, hidden_size, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)                                        # (.., H) -> (.., 2I)
        # the projection's fresh output, seen by no one else when it is a plain nn.Linear: the
        # activation's backward writes d(gate_up) over it (no second (.., 2I) buffer)
        return self.w_down(self._act(gate_up, inplace=plain_linear(self.w_gate_up)))  # -> (.., I) -> (.., H)

    def extra_repr(self) -> str:
        return _options(self, ("hidden_size", "intermediate_size"))


class SwiGLUMLP(_GatedMLP):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020, arXiv 2002.05202), gate and up fused into
    one (2I, H) matmul (rows gate | up): ``w_gate_up`` (2I, H), ``w_down`` (H, I).

    Args: hidden_size H, intermediate_size I, bias (on both projections); device, dtype
    (keyword only, as ``nn.Linear``'s).
    Shapes and dtypes: x (..., H) -> (..., H), in the parameters' dtype (as ``nn.Linear``).
    Raises: ValueError at construction for sizes that are not positive ints; RuntimeError
    (from ``nn.Linear``) for x whose last dim is not H or whose dtype is not the parameters'.
    Memory: while ``w_gate_up`` is a plain ``nn.Linear`` (no hooks), the backward writes
    d(gate_up) over its output (``inplace=True``) instead of allocating a second (..., 2I).
    """


class GeGLUMLP(_GatedMLP):
    """``down(gelu_tanh(gate(x)) * up(x))`` (Shazeer 2020, arXiv 2002.05202; Gemma's MLP,
    tanh-approximate GELU), gate and up fused into one (2I, H) matmul (rows gate | up):
    ``w_gate_up`` (2I, H), ``w_down`` (H, I).

    Args: hidden_size H, intermediate_size I, bias (on both projections); device, dtype
    (keyword only, as ``nn.Linear``'s).
    Shapes and dtypes: x (..., H) -> (..., H), in the parameters' dtype (as ``nn.Linear``).
    Raises: ValueError at construction for sizes that are not positive ints; RuntimeError
    (from ``nn.Linear``) for x whose last dim is not H or whose dtype is not the parameters'.
    Memory: while ``w_gate_up`` is a plain ``nn.Linear`` (no hooks), the backward writes
    d(gate_up) over its output (``inplace=True``) instead of allocating a second (..., 2I).
    """

    _act = staticmethod(geglu_fused)


class CrossEntropyLoss(nn.Module):
    """``torch.nn.CrossEntropyLoss`` over (N, V) logits plus ``softcap`` and z-loss
    (``lse_square_scale``); the options and math of ``ligerzoo.kernels.cross_entropy``.

    Args: ``weight`` (V,) class weights (a buffer), then the options of
    :func:`ligerzoo.kernels.cross_entropy`. Each option is a plain attribute read at every
    call (``loss.reduction = "sum"`` takes effect, as on torch's loss modules).
    Shapes and dtypes: ``forward(logits, target)``: logits (N, V) of any float dtype, target
    (N,) int64 -> fp32 loss (float64 for float64 logits), () or (N,) for reduction "none";
    ``(loss, z_loss)`` with ``return_z_loss``.

    Raises:
        ValueError: a bad reduction, label_smoothing outside [0, 1], a negative
            lse_square_scale or a softcap <= 0 (at construction, and at the call for values
            assigned later); shapes, dtypes or target values out of range (at the call, from
            the functional op).
    """

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float | None = None,
                 return_z_loss: bool = False):
        super().__init__()
        check_loss_options(reduction, label_smoothing, lse_square_scale, softcap)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.lse_square_scale, self.softcap, self.return_z_loss = lse_square_scale, softcap, return_z_loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        return cross_entropy(logits, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             self.lse_square_scale, self.softcap, self.return_z_loss)

    def extra_repr(self) -> str:
        return _options(self, ("ignore_index", "reduction"), label_smoothing=0.0, lse_square_scale=0.0,
                        softcap=None, return_z_loss=False)


class FusedLinearCrossEntropyLoss(CrossEntropyLoss):
    """Cross entropy of ``x @ lm_head_weight.T (+ bias)`` without materialising the (N, V)
    logits (:func:`ligerzoo.kernels.fused_linear_cross_entropy`); called
    ``loss(lm_head_weight, x, target, bias=None)`` like Liger's.

    Args: the options of :class:`CrossEntropyLoss` (``weight`` is the (V,) class weight),
    plus ``accum_dtype`` (of the weight-gradient accumulation; fp32 by default) and
    ``chunk_size`` (rows per logits chunk; None: the op's default); all plain attributes
    read at every call.
    Shapes and dtypes: lm_head_weight (V, H), x (N, H) in the same float dtype, target (N,)
    int64, bias (V,) or None -> fp32 loss, () or (N,) for reduction "none".

    Raises:
        ValueError: as :class:`CrossEntropyLoss`; shapes or dtypes that do not match (at the
            call).
    """

    def __init__(self, weight: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float | None = None,
                 return_z_loss: bool = False, accum_dtype: torch.dtype = torch.float32,
                 chunk_size: int | None = None):
        super().__init__(weight, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, return_z_loss)
        self.accum_dtype, self.chunk_size = accum_dtype, chunk_size

    def forward(self, lm_head_weight: torch.Tensor, x: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None):
        if (lm_head_weight.dim() == x.dim() == target.dim() + 1 == 2 and target.shape[0] == lm_head_weight.shape[0]
                != x.shape[0]):
            raise ValueError(f"FusedLinearCrossEntropyLoss takes (lm_head_weight, x, target), Liger Kernel's order: "
                             f"target has {target.shape[0]} rows like the first argument {tuple(lm_head_weight.shape)}, "
                             f"not like the second {tuple(x.shape)}; were the two swapped?")
        return fused_linear_cross_entropy(x, lm_head_weight, target, bias, self.weight, self.ignore_index,
                                          self.reduction, self.label_smoothing, self.lse_square_scale, self.softcap,
                                          self.return_z_loss, self.accum_dtype, self.chunk_size)

    def extra_repr(self) -> str:
        more = _options(self, accum_dtype=torch.float32, chunk_size=None)
        return super().extra_repr() + (", " + more if more else "")


class KLDivLoss(nn.Module):
    """``torch.nn.KLDivLoss(reduction, log_target)`` (Kullback & Leibler 1951) on log-prob
    ``input``; the math of :func:`ligerzoo.kernels.kl_div`. The defaults are torch's (and
    Liger Kernel's ``LigerKLDIVLoss``): ``reduction="mean"`` divides the summed loss by the
    number of elements; ``"batchmean"`` (the functional ``kl_div``'s default) divides by the
    batch size, which gives the KL divergence per sample. ``reduction`` and ``log_target`` are
    plain attributes read at every call.

    Shapes and dtypes: input and target (..., V) of float dtypes (target as probabilities, or
    log-probabilities with ``log_target``) -> fp32 loss () for "batchmean" / "sum" / "mean";
    for "none" the (..., V) elementwise loss in torch's promoted dtype.

    Raises:
        ValueError: an unknown reduction (at construction, and at the call for a value
            assigned later); shapes, dtypes or devices that do not match (at the call).
    """

    def __init__(self, reduction: str = "mean", log_target: bool = False):
        super().__init__()
        if reduction not in KL_REDUCTIONS:
            raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
        self.reduction, self.log_target = reduction, log_target

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_div(input, target, self.reduction, self.log_target)

    def extra_repr(self) -> str:
        return _options(self, ("reduction",), log_target=False)


class JSD(nn.Module):
    """Generalised Jensen-Shannon divergence (Lin 1991; the distillation form of Agarwal et al.
    2024, arXiv 2306.13649) between student and teacher log-probs; the math of
    :func:`ligerzoo.kernels.jsd`.
    ``beta`` 0 / 1 give forward / reverse KL; rows whose label is ``ignore_index`` are left out.
    ``beta`` and ``ignore_index`` are plain attributes read at every call.

    Shapes and dtypes: ``forward(student_logp, teacher_logp, labels=None)``: log-probs (..., V)
    of float dtypes, labels (...) int64 or None -> fp32 loss () (float64 for a float64
    input), averaged over counted rows.

    Raises:
        ValueError: beta outside [0, 1] or not a number (at construction, and at the call for
            a value assigned later); shapes, dtypes or labels that do not match (at the call).
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100):
        super().__init__()
        if not 0.0 <= check_real("beta", beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta, self.ignore_index = beta, ignore_index

    def forward(self, student_logp, teacher_logp, labels=None) -> torch.Tensor:
        return jsd(student_logp, teacher_logp, labels, self.beta, self.ignore_index)

    def extra_repr(self) -> str:
        return _options(self, ("beta", "ignore_index"))


class FusedLinearJSD(nn.Module):
    """JSD between two LM heads' softmax(x W^T / temperature) without the (N, V) logits
    (:func:`ligerzoo.kernels.fused_linear_jsd`); called
    ``loss(student_x, student_weight, teacher_x, teacher_weight, labels=None)``. The options
    (``beta``, ``ignore_index``, ``temperature``, ``chunk_size``) are plain attributes read at
    every call.

    Shapes and dtypes: student_x (N, Hs) and student_weight (V, Hs), teacher_x (N, Ht) and
    teacher_weight (V, Ht), each pair in one float dtype; labels (N,) int64 or None -> fp32
    loss ().

    Raises:
        ValueError: beta outside [0, 1] or not a number, a temperature that is not a finite
            number > 0 (at construction, and at the call for values assigned later); shapes or dtypes that do not match (at the call).
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 chunk_size: int | None = None):
        super().__init__()
        if not 0.0 <= check_real("beta", beta) <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not 0.0 < check_real("temperature", temperature) < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.beta, self.ignore_index, self.temperature, self.chunk_size = beta, ignore_index, temperature, chunk_size

    def forward(self, student_x, student_weight, teacher_x, teacher_weight, labels=None) -> torch.Tensor:
        return fused_linear_jsd(student_x, student_weight, teacher_x, teacher_weight, labels, self.beta,
                                self.ignore_index, self.temperature, self.chunk_size)

    def extra_repr(self) -> str:
        return _options(self, ("beta", "ignore_index", "temperature"), chunk_size=None)


class Embedding(nn.Module):
    """``torch.nn.Embedding`` through the fused Triton gather (forward) and sorted segment
    sum (backward, deterministic, fp32 sums; :mod:`ligerzoo.kernels.embedding`).

    Args: num_embeddings, embedding_dim, padding_idx (a negative one counts from the end and
    is stored as ``num_embeddings + padding_idx``, as torch does); device, dtype (keyword
    only, of ``weight``; fp32 by default).
    Shapes and dtypes: ids (...) int64 or int32 -> (..., embedding_dim) in the weight's dtype;
    ``weight`` (num_embeddings, embedding_dim), N(0, 1) initialised, the ``padding_idx`` row
    zero (it gets no gradient).

    Raises:
        ValueError: sizes that are not positive ints or a ``padding_idx`` that is not an int
            in [-num_embeddings, num_embeddings) (at construction); ids not int64 / int32, or
            out of range (on CPU tensors), at the call.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 device=None, dtype=None):
        super().__init__()
        _positive_ints("Embedding", num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        num_embeddings, embedding_dim = int(num_embeddings), int(embedding_dim)
        padding_idx = padding_row(padding_idx, num_embeddings)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` from N(0, 1) with the ``padding_idx`` row zero, as torch's."""
        with torch.no_grad():
            self.weight.normal_()
            if self.padding_idx is not None:
                self.weight[self.padding_idx].zero_()

    @classmethod
    def from_pretrained(cls, embeddings: torch.Tensor, freeze: bool = True, padding_idx: int | None = None
                        ) -> "Embedding":
        """An Embedding holding a copy of the 2-D float tensor ``embeddings`` (V, H) as its
        weight, frozen (``requires_grad=False``) unless ``freeze=False``, as
        ``torch.nn.Embedding.from_pretrained`` (the ``padding_idx`` row is kept as given).

        Raises:
            ValueError: ``embeddings`` not a 2-D float tensor, or a bad ``padding_idx``.
        """
        if not (isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 and embeddings.is_floating_point()):
            raise ValueError(f"embeddings must be a 2-D float tensor (num_embeddings, embedding_dim), got "
                             f"{getattr(embeddings, 'shape', type(embeddings).__name__)}")
        module = cls(*embeddings.shape, padding_idx=padding_idx, device="meta")
        module.weight = nn.Parameter(embeddings.detach().clone(), requires_grad=not freeze)
        return module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return embedding(input_ids, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}" + (
            f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


__all__ = ["RMSNorm", "LayerNorm", "GroupNorm", "SwiGLUMLP", "GeGLUMLP", "CrossEntropyLoss",
           "FusedLinearCrossEntropyLoss", "KLDivLoss", "JSD", "FusedLinearJSD", "Embedding"]
