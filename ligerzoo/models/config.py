"""One typed config for every decoder, read from and written to HF ``config.json``.

Both transformers layouts are read (reference/archs.md §10):

* 4.x: top-level ``rope_theta`` + ``rope_scaling`` (``rope_type`` or legacy ``type``),
  ``torch_dtype``;
* 5.x: ``rope_parameters`` (``{"rope_type", "rope_theta", ...}``), ``dtype``.

A config read from a checkpoint keeps the original JSON dict (``hf_config``) so that
``save_hf`` writes back exactly the schema it came with; a config built in code is written
in the 4.x layout, which both transformers 4.x and 5.x read.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ligerzoo._checks import warn_user

_DTYPES = {
    "float64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

# rope types whose inverse frequencies this library computes (models/transformer.py)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
# config.json dropout probabilities of the supported families (none of which ligerzoo applies)
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop")
# The families (HF model_type) a config may name; ligerzoo.models.FAMILIES maps each to its module.
MODEL_TYPES = ("llama", "mistral", "mixtral", "gemma", "gemma2", "qwen2", "phi3")
# rope_scaling keys each type needs (read_rope fills original_max_position_embeddings from the
# top level where transformers does); yarn's and longrope's factor falls back to
# max_position_embeddings / original_max_position_embeddings, as in transformers.
ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("original_max_position_embeddings",),
}
HIDDEN_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def dtype_from_str(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None and
    ``"auto"`` (transformers' "use the checkpoint's") -> None.

    Raises:
        ValueError: a name or dtype other than float64, float32, bfloat16 and float16
            (names also ``"double"``, ``"float"``, ``"half"``).
    """
    if name is None:
        return name
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {name}; expected a floating dtype: "
                             f"{sorted({dtype_to_str(d) for d in _DTYPES.values()})}")
        return name
    if name == "auto":
        return None
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only causal LM, in HF's field names.

    Every family is this one config; family features are fields, not subclasses.

    Attributes:
        model_type: HF ``model_type`` ("llama", ...), which selects the checkpoint key map.
        vocab_size, hidden_size, intermediate_size, num_hidden_layers: as in HF.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (GQA; = heads for MHA, 1 for MQA).
        head_dim: per-head size; not necessarily ``hidden_size // num_attention_heads``.
        rms_norm_eps: epsilon of every RMSNorm (a finite number >= 0).
        rope_theta: RoPE base.
        rope_scaling: None or a dict with ``rope_type`` (4.x's key ``type`` is renamed) and
            that type's parameters (e.g. llama3: ``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``).
        max_position_embeddings: context length the checkpoint was trained for.
        qkv_bias / o_bias / mlp_bias: bias on the q/k/v, o and MLP projections.
        tie_word_embeddings: the LM head shares the embedding matrix.
        hidden_act: gated-MLP activation: "silu" / "swish" (SwiGLU) or "gelu_pytorch_tanh"
            (GeGLU; "gelu_tanh" is taken as an alias and stored as "gelu_pytorch_tanh").
        layer_types: per layer "full_attention" or "sliding_attention" (None: all full).
        sliding_window: W for sliding layers; a key is visible iff q - W < k <= q (HF).
        attn_softcap: attention-logit softcap c: scores -> c * tanh(scores / c) (Gemma2).
        final_softcap: final-logit softcap (Gemma2), applied inside the loss too.
        attn_scale: softmax scale; None means head_dim ** -0.5 (Gemma2: query_pre_attn_scalar ** -0.5).
        norm_offset / norm_casting: RMSNorm weight offset (Gemma: 1.0) and cast order ("llama"/"gemma").
        embed_scale: multiply embeddings by sqrt(hidden_size) rounded to the activation dtype (Gemma).
        post_norms: Gemma2's extra norms after attention and around the MLP.
        partial_rotary_factor: fraction of head_dim that RoPE rotates (Phi3 variants).
        num_local_experts: experts per MoE layer (0: dense MLP); num_experts_per_tok: top-k.
        router_aux_loss_coef / output_router_logits / router_jitter_noise: Mixtral's load
            balancing loss coefficient, whether it is added to the loss, and training jitter.
        initializer_range: std of the normal init of ``CausalLM.init_weights``.
        bos_token_id / eos_token_id / pad_token_id: as in config.json (eos may be a list).
        dtype: the checkpoint's parameter dtype (None: not recorded; fp32 is used); a
            string such as "bfloat16" is converted by :func:`dtype_from_str`.
        hf_config: the config.json dict this config was read from (None when built in code).

    ``num_key_value_heads`` defaults to ``num_attention_heads`` and ``head_dim`` to
    ``hidden_size // num_attention_heads``.

    Raises:
        ValueError: at construction: an unknown ``model_type``; a size field that is not a
            positive int; heads not a multiple of the KV heads; an odd ``head_dim``; an
            unsupported dtype or ``hidden_act``; ``layer_types`` of the wrong length or
            with unknown entries, or sliding layers without ``sliding_window``;
            ``num_experts_per_tok`` outside [1, num_local_experts] in an MoE config; an
            unsupported or missing rope type, its required ``rope_scaling`` fields missing, or
            LongRoPE factor lists not of length ``rotary_dim / 2``.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float | None = None
    norm_offset: float = 0.0
    norm_casting: str = "llama"
    embed_scale: bool = False
    post_norms: bool = False
    partial_rotary_factor: float = 1.0
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False
    router_jitter_noise: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: torch.dtype | None = None
    hf_config: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {self.model_type!r}; supported model types: "
                             f"{', '.join(sorted(MODEL_TYPES))}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"config field {name} must be a positive int, got {value!r} "
                                 f"({type(value).__name__})")
        try:  # a Python / numpy number or a 0-dim tensor, kept as a Python float
            eps = None if isinstance(self.rms_norm_eps, (bool, str)) else float(self.rms_norm_eps)
        except (TypeError, ValueError, RuntimeError):
            eps = None
        if eps is None or not 0 <= eps < math.inf:
            raise ValueError(f"config field rms_norm_eps must be a finite number >= 0, got {self.rms_norm_eps!r}")
        self.rms_norm_eps = eps
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        self.dtype = dtype_from_str(self.dtype)
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(HIDDEN_ACTS)}")
        if self.hidden_act == "gelu_tanh":  # an alias: transformers knows it as gelu_pytorch_tanh
            self.hidden_act = "gelu_pytorch_tanh"
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(f"layer_types must list {self.num_hidden_layers} entries from {LAYER_TYPES}, "
                                 f"got {self.layer_types}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need a sliding_window")
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"[1, num_local_experts={self.num_local_experts}]")
        if self.rope_scaling is not None:
            if "rope_type" not in self.rope_scaling:  # a dict copied from a 4.x config.json names it "type"
                if "type" not in self.rope_scaling:
                    raise ValueError(f"rope_scaling needs a 'rope_type' (one of {', '.join(SUPPORTED_ROPE_TYPES)}), "
                                     f"got {self.rope_scaling}")
                self.rope_scaling = {("rope_type" if k == "type" else k): v for k, v in self.rope_scaling.items()}
            rope_type = self.rope_scaling.get("rope_type", "default")
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            absent = [k for k in ROPE_REQUIRED_KEYS.get(rope_type, ()) if self.rope_scaling.get(k) is None]
            if absent:
                raise ValueError(f"rope_scaling of type {rope_type!r} lacks field(s): {', '.join(absent)}")
            if rope_type == "longrope":
                for key in ("short_factor", "long_factor"):
                    if len(self.rope_scaling.get(key) or ()) != self.rotary_dim // 2:
                        raise ValueError(f"rope_scaling {key} must list rotary_dim / 2 = {self.rotary_dim // 2} "
                                         f"factors, got {len(self.rope_scaling.get(key) or ())}")

    @property
    def activation(self) -> str:
        """"silu" or "gelu_tanh": the gated MLP's activation."""
        return HIDDEN_ACTS[self.hidden_act]

    def layer_type(self, i: int) -> str:
        """"full_attention" or "sliding_attention": the attention of layer ``i``."""
        return self.layer_types[i] if self.layer_types is not None else "full_attention"

    @property
    def rotary_dim(self) -> int:
        """Features per head that RoPE rotates: ``int(head_dim * partial_rotary_factor)``."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        """Width of the query projection: ``num_attention_heads * head_dim``."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (and of the value) projection: ``num_key_value_heads * head_dim``."""
        return self.num_key_value_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (``dataclasses.replace``; validated again, so
        it raises ValueError as the constructor does)."""
        return dataclasses.replace(self, **changes)


def rope_dict(hf: dict) -> dict:
    """The RoPE dict of a config.json dict that transformers runs: a non-empty
    ``rope_scaling`` (the only one 4.x reads; 5.x's ``convert_rope_params_to_dict`` lets it
    replace ``rope_parameters`` too, as in Qwen2.5's recipe of adding a YaRN
    ``rope_scaling`` to a 5.x config), else ``rope_parameters``, else {}."""
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(hf.get(key), dict) and hf[key]:
            return hf[key]
    return {}


def read_rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a config.json dict in the 4.x or 5.x layout.

    The dict read is :func:`rope_dict`'s; its ``rope_theta`` wins over the top-level one
    (which a 5.x dict replaced by ``rope_scaling`` does not carry over: transformers then
    uses the top-level value, else its default). The legacy key ``type`` is read as
    ``rope_type``. A scaling of type "default" is returned as None.

    Raises:
        ValueError: per-layer-type ``rope_parameters`` (a dict of dicts).
    """
    source = rope_dict(hf)
    if source and all(isinstance(v, dict) for v in source.values()):
        raise ValueError("per-layer-type rope_parameters are not supported for this model family")
    scaling = dict(source) if source else None
    theta = hf.get("rope_theta")
    if scaling is not None:
        scaling.pop("partial_rotary_factor", None)  # read separately (read_common)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        else:
            scaling.pop("type", None)
        theta = scaling.pop("rope_theta", theta)
        if scaling.get("rope_type") == "su" or (scaling.get("rope_type") == "yarn" and "short_factor" in scaling):
            scaling["rope_type"] = "longrope"  # Phi3's old names for LongRoPE
        if scaling.get("rope_type") in ("llama3", "yarn", "longrope"):
            # transformers' order (standardize_rope_params): a top-level value wins over the one in
            # the rope dict, which wins over max_position_embeddings
            if hf.get("original_max_position_embeddings") is not None:
                scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
            elif scaling.get("original_max_position_embeddings") is None:
                scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    return float(theta if theta is not None else 10000.0), scaling


def read_common(hf: dict, defaults: dict | None = None, partial_rotary: bool = False) -> dict[str, Any]:
    """The fields every decoder family shares, as ModelConfig keyword arguments.

    ``defaults``: the family's transformers class defaults for keys config.json may omit
    (e.g. Mixtral's rope_theta 1e6); the stored ``hf_config`` stays the file's own dict.
    ``partial_rotary``: whether the family's transformers attention honours
    ``partial_rotary_factor`` (Phi3). Elsewhere transformers rotates the whole head with the
    default RoPE, so the factor is ignored with a warning, and a scaled RoPE with a factor
    below 1 (which transformers cannot run either) raises ValueError.
    """
    original = hf
    hf = (defaults or {}) | hf  # only keys the file omits; an explicit null stays null
    rope_theta, rope_scaling = read_rope(hf)
    # transformers copies a top-level factor into the RoPE dict only where that lacks one
    factor = rope_dict(hf).get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
    if float(factor) != 1.0 and not partial_rotary:
        family = hf.get("model_type")
        if rope_scaling is not None:
            raise ValueError(f"config.json sets partial_rotary_factor={factor} with a {rope_scaling.get('rope_type')!r} "
                             f"RoPE: the {family} family rotates whole heads (transformers cannot run this either)")
        warn_user(f"config.json sets partial_rotary_factor={factor}, which the {family} family ignores: RoPE "
                  f"rotates the whole head_dim, as in transformers")
        factor = 1.0
    dropout = {k: hf[k] for k in DROPOUT_KEYS if isinstance(hf.get(k), (int, float)) and hf[k] > 0}
    if dropout:
        warn_user(f"config.json sets {', '.join(f'{k}={v}' for k, v in dropout.items())}: ligerzoo models have "
                  f"no dropout, so training runs without it (transformers would apply it)")
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ValueError(f"config.json has a quantization_config (quant_method={method!r}): quantized checkpoints "
                         f"are not supported; load an unquantized (float) checkpoint")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json lacks required field(s): {', '.join(missing)}")
    return dict(
        model_type=hf["model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        hidden_act=hf.get("hidden_act", "silu"),
        partial_rotary_factor=float(factor),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        dtype=hf.get("dtype") or hf.get("torch_dtype"),
        hf_config=copy.deepcopy(original),
    )


def uniform_layer_types(num_layers: int, window: int | None) -> list[str] | None:
    """``layer_types`` for families whose window (if any) applies to every layer (Mixtral and
    Phi3, where transformers ignores a ``layer_types`` key; Mistral without one)."""
    return ["sliding_attention"] * num_layers if window else None


def write_common(config: ModelConfig, architectures: list[str]) -> dict[str, Any]:
    """A 4.x-layout config.json dict for ``config`` (read by transformers 4.x and 5.x)."""
    rope_scaling = copy.deepcopy(config.rope_scaling)
    return {
        "architectures": architectures,
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": config.hidden_act,
        "initializer_range": config.initializer_range,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype_to_str(config.dtype or torch.float32),
    }


def with_dtype(hf: dict, dtype: torch.dtype) -> dict:
    """A copy of config.json dict ``hf`` recording ``dtype`` under the key its layout uses."""
    out = copy.deepcopy(hf)
    name = dtype_to_str(dtype)
    if "dtype" in out or "torch_dtype" not in out:
        out["dtype"] = name
    if "torch_dtype" in out:
        out["torch_dtype"] = name
    return out
