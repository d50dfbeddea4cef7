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


def _run(model, ids, labels, pos, hf_names: bool):
    out = model(input_ids=ids, labels=labels, position_ids=pos) if hf_names else model(ids, labels=labels,
                                                                                        position_ids=pos)
    out.loss.backward()
    return out.loss.item()


def _grads(ours) -> dict:
    km = family("llama").key_map(ours.config)
    params = dict(ours.named_parameters())
    return {key: slot.view(params[slot.param].grad) for key, slot in km.slots.items()}


def test_llama3_8b_layers_fp32_match_transformers():
    torch.backends.cuda.matmul.allow_tf32 = False
    hf, ours = _models(torch.float32)
    B, T = 2, 2048
    ids = torch.randint(0, 128256, (B, T), device="cuda")
    labels = ids.clone()
    labels[0, :100] = -100
    pos = torch.stack([torch.arange(T), torch.arange(T) + 9000]).cuda()  # row 1 past the original 8192
    ref_loss, loss = _run(hf, ids, labels, pos, True), _run(ours, ids, labels, pos, False)
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    hf_params = dict(hf.named_parameters())
    worst = {k: _rel(g, hf_params[k].grad) for k, g in _grads(ours).items()}
    print(f"fp32: loss {loss:.6f} vs {ref_loss:.6f}; worst grad rel err {max(worst.values()):.2e}")
    assert max(worst.values()) < 5e-4, worst
    with torch.no_grad():  # logits on a short slice (the full (B, T, V) fp32 tensor is 2 GB)
        got = ours(ids[:, :256], position_ids=pos[:, :256]).logits
        exp = hf(input_ids=ids[:, :256], position_ids=pos[:, :256]).logits
    assert _rel(got, exp) < 1e-4


def test_llama3_8b_layers_bf16_as_close_to_fp32_as_transformers_bf16():
    """Two bf16 pipelines differ by rounding, so each is measured against the fp32 model on
    the same weights: ours must be about as close to it as transformers' bf16 is."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref32, _ = _models(torch.float32)
    hf16, ours16 = _models(torch.bfloat16)
    B, T = 2, 2048
    ids = torch.randint(0, 128256, (B, T), device="cuda")
    labels = ids.clone()
    labels[0, :100] = -100
    pos = torch.stack([torch.arange(T), torch.arange(T) + 9000]).cuda()
    l32, lhf, lours = (_run(ref32, ids, labels, pos, True), _run(hf16, ids, labels, pos, True),
                       _run(ours16, ids, labels, pos, False))
    assert abs(lours - l32) <= 2 * abs(lhf - l32) + 1e-3 * l32
    p32, phf = dict(ref32.named_parameters()), dict(hf16.named_parameters())
    err_ours = {k: _rel(g, p32[k].grad) for k, g in _grads(ours16).items()}
    err_hf = {k: _rel(phf[k].grad, p32[k].grad) for k in err_ours}
    print(f"bf16: loss ours {lours:.5f} transformers {lhf:.5f} fp32 {l32:.5f}; grad rel err vs fp32: ours max "
          f"{max(err_ours.values()):.2e}, transformers max {max(err_hf.values()):.2e}")
    bad = {k: (err_ours[k], err_hf[k]) for k in err_ours if not err_ours[k] <= 1.5 * err_hf[k] + 1e-2}
    assert not bad, bad


def test_a_wrapped_lm_head_trains_with_one_logits_chunk_alive(monkeypatch):
    """A LoRA-wrapped LM head at Llama-3's vocabulary (8192 tokens, bf16): the loss through
    ``head_cross_entropy`` peaks far below the 2 GiB of whole (N, V) logits (one chunk of rows
    alive at a time) and equals the fused loss of the same model with a bare head (the LoRA
    update starts at zero, as peft's)."""
    from ligerzoo.models import transformer

    torch.manual_seed(0)
    config = ligerzoo.ModelConfig(vocab_size=128256, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                                  num_attention_heads=8, tie_word_embeddings=False)
    model = ligerzoo.CausalLM(config).cuda().to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (4, 2048), device="cuda")

    class LoRA(torch.nn.Module):
        def __init__(self, base, rank=16):
            super().__init__()
            self.base = base
            self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, device="cuda", dtype=base.weight.dtype))
            self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device="cuda", dtype=base.weight.dtype))

        def forward(self, x):
            return self.base(x) + x @ self.A.T @ self.B.T

    def peak_of_step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), (torch.cuda.max_memory_allocated() - base) / 2**30

    fused_loss, fused_peak = peak_of_step()
    model.lm_head = LoRA(model.lm_head)
    loss, peak = peak_of_step()
    monkeypatch.setattr(transformer, "HEAD_CHUNK_LOGITS", None)  # the whole logits at once
    whole_loss, whole_peak = peak_of_step()
    logits_gib = ids.numel() * config.vocab_size * 2 / 2**30
    print(f"bare head (fused): loss {fused_loss:.5f}, peak +{fused_peak:.3f} GiB; LoRA head: chunks {loss:.5f}, "
          f"+{peak:.3f} GiB; whole logits {whole_loss:.5f}, +{whole_peak:.3f} GiB (logits alone {logits_gib:.2f} GiB)")
    assert abs(loss - fused_loss) / fused_loss < 2e-3 and abs(whole_loss - fused_loss) / fused_loss < 2e-3
    assert peak < logits_gib < whole_peak / 2 and peak < whole_peak / 3
    assert model.lm_head.B.grad is not None and model.lm_head.B.grad.abs().max() > 0
