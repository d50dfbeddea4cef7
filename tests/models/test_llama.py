"""Llama against transformers.LlamaForCausalLM on tiny random configs (fp32, CPU).

Our weights come from the transformers-saved checkpoint through the production loader
(from_hf), so the key map is tested too. Compared: logits, loss, and the gradient of every
HF parameter (read back out of our fused parameters through the same key map).
"""
import pytest
import torch

import ligerzoo
from ligerzoo.models import family, transformer
from tests.helpers import make_hf_llama

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

CASES = {
    "gqa_untied": dict(),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_head_dim_override": dict(num_key_value_heads=1, head_dim=16),
    "llama3_scaling": dict(rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING}),
    "linear_scaling": dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}),
    "biases": dict(attention_bias=True, mlp_bias=True),
}


def _pair(tmp_path, overrides):
    hf = make_hf_llama(tmp_path / "hf", **overrides)
    ours = ligerzoo.from_hf(tmp_path / "hf")
    return hf, ours


def _assert_grads_match(hf, ours, atol=1e-5, rtol=1e-4):
    km = family(ours.config.model_type).key_map(ours.config)
    ours_params = dict(ours.named_parameters())
    hf_params = dict(hf.named_parameters())
    checked = 0
    for key, slot in km.slots.items():
        g = ours_params[slot.param].grad
        g = g if slot.start is None else g[slot.start: slot.stop]
        torch.testing.assert_close(g, hf_params[key].grad, atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
        checked += 1
    assert checked == len({k for k in hf_params if k in km.slots}) > 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_loss_grads_match_transformers(tmp_path, case):
    hf, ours = _pair(tmp_path, CASES[case])
    B, T = 2, 11
    ids = torch.randint(0, hf.config.vocab_size, (B, T))
    labels = ids.clone()
    labels[0, :3] = -100
    # positions past the llama3 original context (16) and different per row
    pos = torch.stack([torch.arange(T) + 40, torch.arange(T) + 3])

    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        got = ours(ids, position_ids=pos).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    ref_loss = hf(input_ids=ids, position_ids=pos, labels=labels).loss
    ref_loss.backward()
    out = ours(ids, labels=labels, position_ids=pos)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-6)
    _assert_grads_match(hf, ours)


def test_padding_mask_matches_transformers(tmp_path):
    hf, ours = _pair(tmp_path, {})
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding in row 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_num_items_in_batch_sums_micro_batches_to_full_batch(tmp_path):
    _, ours = _pair(tmp_path, {})
    ids = torch.randint(0, ours.config.vocab_size, (4, 10))
    labels = ids.clone()
    labels[1, 2:] = -100
    labels[3, :7] = -100
    full = ours(ids, labels=labels).loss
    n = int((labels[:, 1:] != -100).sum())
    parts = sum(ours(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=n).loss for i in (0, 2))
    torch.testing.assert_close(parts, full, atol=1e-6, rtol=1e-6)
    as_tensor = ours(ids[:2], labels=labels[:2], num_items_in_batch=torch.tensor([n])).loss  # one element
    assert as_tensor.shape == () and torch.equal(as_tensor, ours(ids[:2], labels=labels[:2], num_items_in_batch=n).loss)
    for bad in (torch.tensor([n, n]), "8", True):  # a (2,) tensor used to give a vector loss
        with pytest.raises(ValueError, match="num_items_in_batch must be a number or a one-element tensor"):
            ours(ids, labels=labels, num_items_in_batch=bad)
    with pytest.raises(ValueError, match="T >= 1"):  # was "target must have shape (0,), got (4,)"
        ours(ids[:, :0], labels=labels[:, :0])


def test_all_labels_ignored_gives_zero_loss_and_zero_grads(tmp_path):
    _, ours = _pair(tmp_path, {})
    ids = torch.randint(0, ours.config.vocab_size, (2, 6))
    out = ours(ids, labels=torch.full_like(ids, -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    for name, p in ours.named_parameters():
        assert torch.isfinite(p.grad).all() and not p.grad.any(), name


def test_labels_out_of_range_raise(tmp_path):
    _, ours = _pair(tmp_path, {})
    ids = torch.randint(0, ours.config.vocab_size, (1, 5))
    labels = ids.clone()
    labels[0, 3] = ours.config.vocab_size
    with pytest.raises(ValueError, match=str(ours.config.vocab_size)):
        ours(ids, labels=labels)


def test_generate_greedy_matches_transformers(tmp_path):
    hf, ours = _pair(tmp_path, dict(num_key_value_heads=1))
    ids = torch.randint(3, hf.config.vocab_size, (1, 5))
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert got.tolist() == ref.tolist()


@pytest.mark.parametrize("max_new_tokens", [0, 1, 3])
def test_generate_runs_one_forward_per_new_token(tmp_path, max_new_tokens):
    """The prompt's forward gives the first new token; each later token costs one more
    forward, and none runs after the last (one extra forward used to run and be dropped)."""
    _, ours = _pair(tmp_path, {})
    ids = torch.randint(3, ours.config.vocab_size, (2, 5))
    shapes, forward = [], ours._final_hidden
    ours._final_hidden = lambda x, *a, **k: (shapes.append(tuple(x.shape)), forward(x, *a, **k))[1]
    out = ours.generate(ids, max_new_tokens, eos_token_id=[])
    assert out.shape == (2, 5 + max_new_tokens) and torch.equal(out[:, :5], ids)
    assert shapes == ([(2, 5)] + [(2, 1)] * (max_new_tokens - 1) if max_new_tokens else [])


def test_generate_left_padded_batch_matches_single_rows(tmp_path):
    _, ours = _pair(tmp_path, {})
    a = torch.randint(3, ours.config.vocab_size, (1, 7))
    b = torch.randint(3, ours.config.vocab_size, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    got = ours.generate(batch, max_new_tokens=6, attention_mask=mask, eos_token_id=[])
    assert got[0, 7:].tolist() == ours.generate(a, max_new_tokens=6, eos_token_id=[])[0, 7:].tolist()
    assert got[1, 7:].tolist() == ours.generate(b, max_new_tokens=6, eos_token_id=[])[0, 4:].tolist()


def test_bad_input_shapes_and_right_padding_are_refused(tmp_path):
    _, ours = _pair(tmp_path, {})
    ids = torch.randint(3, ours.config.vocab_size, (2, 5))
    with pytest.raises(ValueError, match=r"must be \(B, T\)"):
        ours(ids[0])                                     # 1-D: a batch dim is missing
    with pytest.raises(ValueError, match=r"T >= 1"):
        ours.generate(ids[:, :0], 3)                     # an empty prompt
    right = torch.ones_like(ids)
    right[0, 3:] = 0
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(ids, 3, attention_mask=right)
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours.generate(ids, 3, attention_mask=right[:, :4])
    # forward: masks and positions shaped unlike the ids are refused by name ((1, T)
    # positions are shared by the rows, as in transformers)
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 5\)"):
        ours(ids, attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\)"):
        ours(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids shape \(2, 4\)"):
        ours(ids, position_ids=torch.arange(4).expand(2, 4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, position_ids=torch.arange(5)[None]).logits, ours(ids).logits)


def test_generate_default_eos_from_generation_config(tmp_path):
    """Instruct checkpoints list their end-of-turn ids in generation_config.json only: generate
    stops there by default, as transformers does; eos ids may be given as a tensor or numpy ints."""
    import json

    import numpy as np
    from transformers import AutoModelForCausalLM

    _, ours = _pair(tmp_path, {})
    ids = torch.randint(3, ours.config.vocab_size, (1, 5))
    free = ours.generate(ids, 8, eos_token_id=[])
    new = free[0, 5:].tolist()
    end = max(i for i in range(len(new)) if new[i] not in new[:i]) + 5  # a new token's first occurrence
    stop = int(free[0, end])
    path = tmp_path / "hf" / "generation_config.json"
    gen = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**gen, "eos_token_id": [ours.config.vocab_size - 1, stop]}))
    reloaded = ligerzoo.from_hf(tmp_path / "hf", dtype=torch.float32)
    assert reloaded.generation_config["eos_token_id"][1] == stop
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = reloaded.generate(ids, 8)
    assert got.tolist() == ref.tolist() == free[:, :end + 1].tolist()
    for eos in (torch.tensor([stop]), np.int64(stop), [np.int32(stop)]):
        assert reloaded.generate(ids, 8, eos_token_id=eos).tolist() == got.tolist(), type(eos)


def test_generate_fills_a_stopped_row_with_the_pad_id_as_transformers(tmp_path):
    """A row that stops while another goes on is filled with pad_token_id, taken as
    transformers takes it: the argument, else the file the eos default comes from
    (config.json without generation_config.json), else the first eos id. An explicit None
    overrides the checkpoint's, as in transformers: eos_token_id=None never stops,
    pad_token_id=None pads with the first eos id."""
    import json

    from transformers import AutoModelForCausalLM

    _, ours = _pair(tmp_path, {})
    src = tmp_path / "hf"
    V = ours.config.vocab_size
    for seed in range(50):  # prompts where row 0 emits a token row 1 never does, before the end
        ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(seed))
        free = ours.generate(ids, 8, eos_token_id=[])
        new0, new1 = free[0, 5:].tolist(), free[1, 5:].tolist()
        stops = [t for t in new0[:-2] if t not in new1]
        if stops:
            break
    stop = stops[0]
    assert new0.index(stop) < 6
    (src / "generation_config.json").unlink(missing_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    for pad, gen in ((None, None), (1, None), (2, {"eos_token_id": stop, "pad_token_id": 2})):
        (src / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [stop, V - 1], "pad_token_id": pad}))
        if gen:
            (src / "generation_config.json").write_text(json.dumps(gen))
        model = ligerzoo.from_hf(src, dtype=torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        got = model.generate(ids, 8)
        assert got.tolist() == ref.tolist(), (pad, gen)
        fill = stop if pad is None else pad
        assert got[0, 5 + new0.index(stop) + 1:].eq(fill).all() and got[1].tolist() == free[1].tolist()
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          pad_token_id=0)
        assert model.generate(ids, 8, pad_token_id=torch.tensor(0)).tolist() == ref.tolist()
        never = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
        assert model.generate(ids, 8, eos_token_id=None, pad_token_id=0).tolist() == never.tolist() == free.tolist()
        by_eos = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=None)
        got = model.generate(ids, 8, pad_token_id=None)
        assert got.tolist() == by_eos.tolist() and got[0, 5 + new0.index(stop) + 1:].eq(stop).all(), (pad, gen)
    with pytest.raises(ValueError, match="pad_token_id must be an int"):
        model.generate(ids, 3, pad_token_id=1.0)
    for bad in (-1, V):
        with pytest.raises(ValueError, match=rf"pad_token_id {bad} is outside \[0, vocab_size={V}\)"):
            model.generate(ids, 3, pad_token_id=bad)
    assert model.generate(ids, 8, pad_token_id=torch.tensor([0])).tolist() == ref.tolist()  # one-element 1-D
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": stop, "pad_token_id": -1}))
    stored = ligerzoo.from_hf(src, dtype=torch.float32)  # a stored pad outside the vocabulary: the first eos id
    assert stored.generate(ids, 8)[0, 5 + new0.index(stop) + 1:].eq(stop).all()
    # bad ids in the checkpoint's files are named as theirs, not as arguments the caller never gave
    for stored, match in (({"eos_token_id": "2"}, r"eos_token_id must be an int or ints, got '2' \(from "
                                                   r"generation_config.json\)"),
                          ({"eos_token_id": -1}, r"the pad id \(the first eos id, from generation_config.json\) -1 "
                                                 r"is outside \[0, vocab_size=\d+\); pass pad_token_id")):
        (src / "generation_config.json").write_text(json.dumps(stored))
        with pytest.raises(ValueError, match=match):
            ligerzoo.from_hf(src, dtype=torch.float32).generate(ids, 2)
    (src / "generation_config.json").unlink()
    model = ligerzoo.from_hf(src, dtype=torch.float32)
    model.config.eos_token_id = "2"  # no generation_config.json: the model's config is the source
    with pytest.raises(ValueError, match=r"got '2' \(from model.config.eos_token_id\)"):
        model.generate(ids, 2)


def test_generate_refuses_bad_arguments(tmp_path):
    _, ours = _pair(tmp_path, {})
    ids = torch.randint(3, ours.config.vocab_size, (2, 5))
    for kwargs in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-1.0),
                   dict(top_k=0), dict(top_k=2.5, temperature=1.0)):
        with pytest.raises(ValueError, match="finite temperature"):
            ours.generate(ids, 3, **kwargs)
    for n in (2.0, -1, True):
        with pytest.raises(ValueError, match="int max_new_tokens"):
            ours.generate(ids, n)
    with pytest.raises(ValueError, match="must be an int or ints"):
        ours.generate(ids, 3, eos_token_id=[1.5])
    with pytest.raises(ValueError, match="must hold integers"):
        ours.generate(ids, 3, eos_token_id=torch.tensor([1.0]))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] of attention_mask have no real token"):
        ours.generate(ids, 3, attention_mask=mask)
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 5\)$"):  # the [None] hint is for 1-D ids only
        ours(ids[None])
    with pytest.raises(ValueError, match=r"add a batch dim with input_ids\[None\]"):
        ours(ids[0])


def test_sampling_at_a_tiny_temperature_is_greedy(tmp_path):
    """softmax(logits / temperature) tends to the argmax as the temperature falls; logits / 1e-300
    overflowed to inf and torch.multinomial raised on the nan probabilities."""
    _, ours = _pair(tmp_path, {})
    ids = torch.randint(3, ours.config.vocab_size, (2, 5))
    greedy = ours.generate(ids, 6, eos_token_id=[])
    for t in (1e-300, 1e-30):
        got = ours.generate(ids, 6, eos_token_id=[], temperature=t, generator=torch.Generator().manual_seed(0))
        assert got.tolist() == greedy.tolist(), t
    for seed in range(4):  # top_k = 1 keeps the argmax alone at any temperature (1e300: all scaled gaps ~0)
        got = ours.generate(ids, 6, eos_token_id=[], temperature=1e300, top_k=1,
                            generator=torch.Generator().manual_seed(seed))
        assert got.tolist() == greedy.tolist(), seed


def test_the_default_marker_survives_copies():
    """generate's FROM_CHECKPOINT default, copied or pickled with a caller's kwargs, is still
    the default (an equal-looking copy was refused as an eos id)."""
    import copy
    import pickle

    from ligerzoo.models import FROM_CHECKPOINT

    assert copy.deepcopy(FROM_CHECKPOINT) is FROM_CHECKPOINT and copy.copy(FROM_CHECKPOINT) is FROM_CHECKPOINT
    assert pickle.loads(pickle.dumps({"eos_token_id": FROM_CHECKPOINT}))["eos_token_id"] is FROM_CHECKPOINT


def test_input_ids_out_of_range_or_not_integers_raise(tmp_path):
    """Out-of-range ids get a ValueError naming the range (the embedding lookup would raise an
    IndexError, or a device-side assert on CUDA), in forward and generate alike."""
    _, ours = _pair(tmp_path, {})
    V = ours.config.vocab_size
    for bad in (V, -1):
        ids = torch.randint(0, V, (2, 5))
        ids[1, 2] = bad
        with pytest.raises(ValueError, match=rf"\[0, vocab_size={V}\)"):
            ours(ids)
        with pytest.raises(ValueError, match=rf"\[0, vocab_size={V}\)"):
            ours.generate(ids, 2)
    for dtype in (torch.float32, torch.uint8, torch.int16, torch.bool):  # the lookup takes int64 / int32
        with pytest.raises(ValueError, match="int64 or int32 token ids"):
            ours(torch.zeros(1, 3, dtype=dtype))
        with pytest.raises(ValueError, match="int64 or int32 token ids"):
            ours.generate(torch.zeros(1, 3, dtype=dtype), 1)
    ids = torch.randint(0, V, (2, 5), dtype=torch.int32)
    for n in (0, 1):  # a new int64 tensor, n = 0 included
        out = ours.generate(ids, n, eos_token_id=[])
        assert out.dtype == torch.int64 and out.shape == (2, 5 + n) and torch.equal(out[:, :5], ids.long())
        out[:, 0] = V - 1 - ids[:, 0]
        assert not torch.equal(out[:, 0], ids[:, 0].long())  # the caller's ids untouched


def test_generation_config_without_eos_save_and_bad_file(tmp_path):
    """A generation_config.json without eos_token_id means no early stop, as in transformers
    (config.json's eos is used only without the file); a malformed file is skipped with a
    warning; save_hf writes model.generation_config when it was edited; numpy eos arrays work."""
    import json

    import numpy as np
    from transformers import AutoModelForCausalLM

    _, ours = _pair(tmp_path, {})
    src = tmp_path / "hf"
    ids = torch.randint(3, ours.config.vocab_size, (1, 5))
    free = ours.generate(ids, 6, eos_token_id=[])
    first = int(free[0, 5])
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "eos_token_id": first}))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    model = ligerzoo.from_hf(src, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert model.generate(ids, 6).tolist() == ref.tolist() == free.tolist()  # no stop at `first`
    (src / "generation_config.json").unlink()
    assert ligerzoo.from_hf(src, dtype=torch.float32).generate(ids, 6).shape[1] == 6  # config.json's eos
    (src / "generation_config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring .*generation_config.json") as record:
        model = ligerzoo.from_hf(src, dtype=torch.float32)
    assert record[0].filename == __file__
    assert model.generation_config == {}
    model.generation_config = {"eos_token_id": [first], "max_new_tokens": 3}
    out = ligerzoo.save_hf(model, tmp_path / "out")
    assert json.loads((out / "generation_config.json").read_text()) == model.generation_config
    assert ligerzoo.from_hf(out, dtype=torch.float32).generate(ids, 6).shape[1] == 6
    for eos in (np.array(first), np.array([[first]])):
        assert model.generate(ids, 6, eos_token_id=eos).shape[1] == 6
    for bad in (5.0, "5", [[first]], np.array([1.5])):
        with pytest.raises(ValueError, match="must be an int or ints"):
            model.generate(ids, 2, eos_token_id=bad)


class _LoRAHead(torch.nn.Module):
    """A LoRA-style wrapper of the LM head (as peft builds one): the base weight stays
    reachable as ``.weight``, the output adds ``x A^T B^T``."""

    def __init__(self, base, rank=4):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features) * 0.3)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.3)

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@pytest.mark.parametrize("head", ["lora", "hook", "forward", "bias"])
def test_a_wrapped_lm_head_is_part_of_the_loss(model_type, head, dtype, monkeypatch):
    """With labels the loss must be that of the model's own logits whatever lm_head is: a
    LoRA wrapper, a forward hook, a ``forward`` replaced on the instance (as accelerate's
    hooks do) or a biased Linear is called as a module (the fused loss would read
    lm_head.weight alone). Reference: torch's cross entropy in float64 on the logits of the
    same model without labels (Gemma2's final softcap included), and autograd through it for
    the head's gradients. float64 takes the torch reference loss, fp32 the Triton kernel
    (under the interpreter): fp32 rounding of logits of size ~10 allows 1e-5."""
    from tests.models.test_families import GEMMA2_IN_CODE

    torch.manual_seed(0)
    config = (ligerzoo.ModelConfig(**(GEMMA2_IN_CODE | {"tie_word_embeddings": False})) if model_type == "gemma2" else
              ligerzoo.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4))
    model = ligerzoo.CausalLM(config).to(dtype)
    if head == "lora":
        model.lm_head = _LoRAHead(model.lm_head).to(dtype)
        params = [model.lm_head.A, model.lm_head.B]
    elif head == "hook":
        model.lm_head.register_forward_hook(lambda mod, inp, out: out * 1.5)
        params = [model.lm_head.weight]
    elif head == "forward":
        plain_forward = model.lm_head.forward
        model.lm_head.forward = lambda x: plain_forward(x) * 1.5
        params = [model.lm_head.weight]
    else:
        bias = torch.nn.Linear(32, 64, bias=True).to(dtype)
        bias.weight.data.copy_(model.lm_head.weight)
        model.lm_head = bias
        params = [model.lm_head.weight, model.lm_head.bias]
    ids = torch.randint(0, 64, (2, 10))
    labels = ids.clone()
    labels[0, 3] = -100
    monkeypatch.setattr(transformer, "HEAD_CHUNK_LOGITS", 1)  # chunks of default_chunk_size rows (16 of 20)
    loss = model(ids, labels=labels).loss
    got = torch.autograd.grad(loss, params)
    logits = model(ids).logits[:, :-1].double()
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    want = torch.autograd.grad(ref, params)
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double(), ref, atol=tol, rtol=tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(dtype), atol=tol, rtol=10 * tol)


def test_a_wrapped_lm_head_never_holds_the_whole_logits(monkeypatch):
    """A head called as a module runs a chunk of rows at a time under activation
    checkpointing: it never sees more than a chunk's rows, nothing saved for backward outside
    a chunk is logits-sized, and in training each chunk runs twice (forward, then again in
    backward). The loss and gradients are still those of the whole logits (float64 torch)."""
    from ligerzoo.kernels.fused_linear_cross_entropy import default_chunk_size

    torch.manual_seed(0)
    V, H, B, T = 256, 32, 2, 40
    model = ligerzoo.CausalLM(ligerzoo.ModelConfig(vocab_size=V, hidden_size=H, intermediate_size=48,
                                                   num_hidden_layers=1, num_attention_heads=4)).double()
    model.lm_head = _LoRAHead(model.lm_head).double()
    rows_seen = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: rows_seen.append(inp[0].shape[0]))
    monkeypatch.setattr(transformer, "HEAD_CHUNK_LOGITS", 24 * V)  # a floor of 24 rows at this tiny V
    chunk = max(default_chunk_size(B * T, H, V), 24)
    assert chunk == 24
    n_chunks = -(-B * T // chunk)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    ids = torch.randint(0, V, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    assert rows_seen and max(rows_seen) == chunk and len(rows_seen) == n_chunks
    assert max(saved) < B * T * V / 2  # no (N, V) logits nor their gradient kept
    params = [model.lm_head.A, model.lm_head.B, model.norm.weight]
    got = torch.autograd.grad(loss, params)
    assert len(rows_seen) == 2 * n_chunks
    logits = model(ids).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for g, w in zip(got, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    monkeypatch.setattr(transformer, "HEAD_CHUNK_LOGITS", None)  # opt out: the whole logits in one call
    rows_seen.clear()
    torch.testing.assert_close(model(ids, labels=ids).loss, ref, atol=1e-12, rtol=1e-12)
    assert rows_seen == [B * T]
    with torch.no_grad():
        assert model(ids[:0], labels=ids[:0]).loss.item() == 0  # no rows: one empty chunk
    bad = ids.clone()
    bad[1, 30] = V  # in the last chunk
    with pytest.raises(ValueError, match=f"target value {V} is out of range"):
        model(ids, labels=bad)
    monkeypatch.setattr(transformer, "HEAD_CHUNK_LOGITS", 24 * V)
    model.lm_head = torch.nn.Linear(H, V - 1).double()
    with pytest.raises(ValueError, match=r"lm_head maps .* got shape \(24, 255\)"):
        model(ids, labels=ids)


def test_head_cross_entropy_recomputes_a_dropout_head_with_the_same_mask():
    """The chunk's second forward (in backward) draws the dropout mask of its first, so the
    gradient is that of the loss computed (float64 torch, same seed, no checkpointing)."""
    from ligerzoo.models.transformer import head_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, 30)).double()
    h = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 30, (13,))
    t[4] = -100
    torch.manual_seed(1)
    loss = head_cross_entropy(head, h, t, 30, chunk_rows=4)
    got = torch.autograd.grad(loss, [h, head[1].weight])
    torch.manual_seed(1)
    ref = sum(torch.nn.functional.cross_entropy(head(h[i:i + 4]), t[i:i + 4], reduction="sum")
              for i in range(0, 13, 4))
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    for g, w in zip(got, torch.autograd.grad(ref, [h, head[1].weight])):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
