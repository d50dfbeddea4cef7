"""GPU tier: Llama at Llama-3-8B layer sizes (hidden 4096, 32/8 heads, intermediate 14336,
vocab 128256, llama3 RoPE) cut to 2 layers, against transformers on the same weights.

fp32 (TF32 off) must match at fp32 tolerance; bf16 is compared by relative error of the
loss and of every gradient (norm-wise), since two bf16 pipelines differ by rounding.
Run on a CUDA machine: ``TRITON_INTERPRET=0 python -m pytest -m gpu tests/models``.
"""
import pytest
import torch

import ligerzoo
from ligerzoo.hub import load_hf_state_dict
from ligerzoo.models import family

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LLAMA3_8B_2L = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def _models(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA3_8B_2L)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norms so a swapped norm cannot hide
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    config = ligerzoo.models.config_from_hf(cfg.to_dict())
    with torch.device("meta"):
        ours = ligerzoo.CausalLM(config)
    ours.to(dtype).to_empty(device="cuda")
    ours.tie_weights()
    load_hf_state_dict(ours, hf.state_dict())
    return hf, ours


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama3_8b_layers_match_transformers(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf, ours = _models(dtype)
    B, T = 2, 2048
    ids = torch.randint(0, 128256, (B, T), device="cuda")
    labels = ids.clone()
    labels[0, :100] = -100
    pos = torch.stack([torch.arange(T), torch.arange(T) + 9000]).cuda()  # row 1 past the original 8192

    ref = hf(input_ids=ids, labels=labels, position_ids=pos)
    ref.loss.backward()
    out = ours(ids, labels=labels, position_ids=pos)
    out.loss.backward()

    loss_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 3e-2)
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < loss_tol
    km = family("llama").key_map(ours.config)
    params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    worst = {}
    for key, slot in km.slots.items():
        g = params[slot.param].grad
        g = g if slot.start is None else g[slot.start: slot.stop]
        worst[key] = _rel(g, hf_params[key].grad)
    bad = {k: v for k, v in worst.items() if not v < grad_tol}
    assert not bad, bad

    with torch.no_grad():  # logits on a short slice (the full (B, T, V) fp32 tensor is 2 GB)
        got = ours(ids[:, :256], position_ids=pos[:, :256]).logits
        exp = hf(input_ids=ids[:, :256], position_ids=pos[:, :256]).logits
    assert _rel(got, exp) < (1e-5 if dtype == torch.float32 else 2e-2)
