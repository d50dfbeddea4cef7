"""Every text family against transformers on tiny random configs (fp32, eager attention):
logits, loss and every parameter gradient; from_hf then save_hf reproduces the
transformers-saved files bit for bit, and transformers loads our output cleanly.

Initialisation is wide (and the caps small) so that Gemma2's softcaps actually clip, and
sequences are longer than the sliding windows.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

import ligerzoo
from ligerzoo.models import family
from tests.helpers import read_safetensors_dir

BASE = dict(vocab_size=151, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.3,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        attention_bias=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4, head_dim=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                             output_router_logits=True, router_aux_loss_coef=0.02)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=16)),  # MQA, q wider than hidden
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=4, head_dim=16, query_pre_attn_scalar=24,
                                                          attn_logit_softcapping=3.0, final_logit_softcapping=2.5,
                                                          initializer_range=1.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, use_sliding_window=True,
                                                       sliding_window=4, max_window_layers=1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        partial_rotary_factor=0.5, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                         "short_factor": [1.0, 1.4, 2.0], "long_factor": [2.0, 4.0, 8.0]})),
}


def make_hf(name, directory=None, **extra):
    import transformers

    cfg_cls, model_cls, overrides = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**(BASE | overrides | extra))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:  # HF initialises norms to 1 (or 0 with Gemma's offset): randomise
                p.uniform_(-0.5, 0.5) if name.startswith("gemma") else p.uniform_(0.5, 1.5)
            elif key.endswith("bias"):
                p.normal_(0, 0.3)
    if directory is not None:
        model.save_pretrained(directory)
    return model


def _grads_match(hf, ours):
    km = family(ours.config.model_type).key_map(ours.config)
    params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    compared = 0
    for key, slot in km.slots.items():
        if key not in hf_params:  # transformers 5 keeps Mixtral experts fused in memory
            continue
        torch.testing.assert_close(slot.view(params[slot.param].grad), hf_params[key].grad, atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{key}: {m}")
        compared += 1
    return compared


def _fused_expert_grads_match(hf, ours):
    for i, layer in enumerate(ours.layers):
        m = hf.model.layers[i].mlp
        torch.testing.assert_close(layer.mlp.w_gate_up.grad, m.experts.gate_up_proj.grad, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(layer.mlp.w_down.grad, m.experts.down_proj.grad, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(layer.mlp.router.weight.grad, m.gate.weight.grad, atol=2e-5, rtol=1e-4)


def _step_matches_transformers(hf, ours, name, ids, pos, labels, atol=1e-6, rtol=1e-5):
    """One forward + backward of both models on the same batch (transformers with
    use_cache=False): the losses and every parameter gradient equal. Returns transformers' output."""
    hf.zero_grad()
    ours.zero_grad()
    ref = hf(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
    ref.loss.backward()
    out = ours(ids, labels=labels, position_ids=pos)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=atol, rtol=rtol)
    if name == "mixtral":
        _fused_expert_grads_match(hf, ours)
    assert _grads_match(hf, ours) > 0
    return ref


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_matches_transformers(tmp_path, name):
    hf = make_hf(name, tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    assert ours.config.model_type == name
    B, T = 2, 13  # longer than the sliding windows (4); phi3: positions past original 16 in row 1
    ids = torch.randint(3, BASE["vocab_size"], (B, T))
    ids[0, 2] = ids[1, 6:8] = BASE["pad_token_id"]  # no gradient for the pad row, as in transformers
    labels = ids.clone()
    labels[1, :4] = -100
    pos = torch.stack([torch.arange(T), torch.arange(T) + 20])
    with torch.no_grad():
        for p in (pos[:1], pos[1:]):  # phi3: one call per LongRoPE regime (HF picks it per call)
            ref = hf(input_ids=ids[:1], position_ids=p).logits
            got = ours(ids[:1], position_ids=p).logits
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    if name == "gemma2":  # the caps really clip
        assert ref.abs().max() > 0.9 * hf.config.final_logit_softcapping

    p = pos[:1].expand(B, T)
    ref = hf(input_ids=ids, position_ids=p, labels=labels)
    ref.loss.backward()
    out = ours(ids, labels=labels, position_ids=p)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-5)
    if name == "mixtral":
        torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
        _fused_expert_grads_match(hf, ours)
    assert _grads_match(hf, ours) > 0
    if not ours.config.tie_word_embeddings:
        assert ours.embed.weight.grad[BASE["pad_token_id"]].abs().max() == 0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_round_trip_bit_exact_and_transformers_loads_ours(tmp_path, name):
    import transformers

    make_hf(name, tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    ligerzoo.save_hf(ours, tmp_path / "out")
    src, out = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "out")
    assert sorted(src) == sorted(out)
    for k in src:
        assert src[k].dtype == out[k].dtype and torch.equal(src[k], out[k]), k
    cls = getattr(transformers, FAMILIES[name][1])
    back, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref = cls.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    ids = torch.randint(3, BASE["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_an_edit_outside_the_layout_keeps_the_source_config(tmp_path, name):
    """A config edit that no layout-dependent key expresses (here eos_token_id) is saved as the
    source's config.json with that key changed: its schema (4.x or 5.x RoPE keys, layer_types,
    dtype key) and extra keys stay; transformers reads it as the model."""
    import transformers

    make_hf(name, tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    ours.config.eos_token_id = 7
    ligerzoo.save_hf(ours, tmp_path / "out")
    src = json.loads((tmp_path / "hf" / "config.json").read_text())
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out == src | {"eos_token_id": 7}
    assert ligerzoo.from_hf(tmp_path / "out").config == ours.config
    cls = getattr(transformers, FAMILIES[name][1])
    back = cls.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ref = cls.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert back.config.eos_token_id == 7
    ids = torch.randint(3, BASE["vocab_size"], (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_model_built_in_code_round_trips_through_transformers(tmp_path):
    """Configs written by config_to_hf (no source config.json) load in transformers."""
    import transformers

    for name in sorted(FAMILIES):
        ref_cfg = ligerzoo.models.config_from_hf(make_hf(name).config.to_dict())
        ref_cfg.hf_config = None
        model = ligerzoo.CausalLM(ref_cfg)
        ligerzoo.save_hf(model, tmp_path / name)
        back = getattr(transformers, FAMILIES[name][1]).from_pretrained(tmp_path / name, attn_implementation="eager")
        ids = torch.randint(3, BASE["vocab_size"], (1, 9))
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, back(ids).logits, atol=2e-5, rtol=2e-5,
                                       msg=lambda m: f"{name}: {m}")


def test_mixtral_loads_transformers5_fused_expert_layout(tmp_path):
    hf = make_hf("mixtral")
    (tmp_path / "v5").mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "v5" / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "v5" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    assert any(".mlp.experts.gate_up_proj" in k for k in hf.state_dict())
    ours = ligerzoo.from_hf(tmp_path / "v5")
    ids = torch.randint(3, BASE["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=2e-5, rtol=2e-5)
    ligerzoo.save_hf(ours, tmp_path / "out")  # written back in the per-expert hub layout
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in read_safetensors_dir(tmp_path / "out")


def test_phi3_gqa_fused_qkv_split_by_sizes(tmp_path):
    make_hf("phi3", tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    hd = ours.config.head_dim
    assert ours.layers[0].attn.wqkv.weight.shape[0] == (4 + 2 * 2) * hd  # q 4 heads, k and v 2 each


def test_shape_mismatch_names_tensor_and_shapes_for_every_family(tmp_path):
    for name in sorted(FAMILIES):
        make_hf(name, tmp_path / name)
        cfg_path = tmp_path / name / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["intermediate_size"] = 64  # the checkpoint's MLP / experts are 72 wide
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=r"tensor '\S*(mlp|experts)\S*' in model\.safetensors has shape "
                                             r"\((\d+, )+\d+\), but the config expects \((\d+, )+\d+\)"):
            ligerzoo.from_hf(tmp_path / name)


def _to_v4_layout(cfg: dict) -> dict:
    """A transformers-5 config.json rewritten in the 4.x layout: top-level rope_theta +
    rope_scaling ("type" key), partial_rotary_factor and original_max_position_embeddings
    top-level, torch_dtype instead of dtype, no layer_types."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope_type = rope.pop("rope_type", "default")
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    return cfg


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_transformers4_config_layout_reads_the_same(tmp_path, name):
    make_hf(name, tmp_path / "v5")
    v5 = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert "rope_parameters" in v5
    (tmp_path / "v4").mkdir()
    (tmp_path / "v4" / "config.json").write_text(json.dumps(_to_v4_layout(v5)))
    (tmp_path / "v4" / "model.safetensors").symlink_to(tmp_path / "v5" / "model.safetensors")
    a, b = ligerzoo.from_hf(tmp_path / "v5"), ligerzoo.from_hf(tmp_path / "v4")
    fields = ("rope_theta", "rope_scaling", "partial_rotary_factor", "layer_types", "sliding_window", "dtype",
              "head_dim", "tie_word_embeddings", "attn_softcap", "num_local_experts")
    assert {f: getattr(a.config, f) for f in fields} == {f: getattr(b.config, f) for f in fields}
    ids = torch.randint(3, BASE["vocab_size"], (1, 20))  # past phi3's original 16: long factors
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_two_layouts_of_the_same_weights_are_refused(tmp_path):
    hf = make_hf("mixtral")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}  # transformers-5 fused layout
    hf.save_pretrained(tmp_path / "hub")  # per-expert hub layout
    sd.update(read_safetensors_dir(tmp_path / "hub"))
    (tmp_path / "mixed").mkdir()
    save_file(sd, tmp_path / "mixed" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "mixed" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    with pytest.raises(ValueError, match="two copies of the same weights"):
        ligerzoo.from_hf(tmp_path / "mixed")


def test_phi3_generation_across_original_context_matches_transformers(tmp_path):
    """transformers recomputes the cache with the long factors at the first step past
    original_max_position_embeddings (16 here); so does generate."""
    hf = make_hf("phi3", tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    ids = torch.randint(3, BASE["vocab_size"], (1, 11))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert ours.generate(ids, max_new_tokens=12, eos_token_id=[]).tolist() == ref.tolist()


def test_model_config_in_code_refuses_an_unknown_model_type():
    """A config built in code names its family up front, as from_hf does for config.json (it
    used to build and run, and fail only at save_hf)."""
    from ligerzoo.models import FAMILIES, ModelConfig

    with pytest.raises(ValueError, match="unknown model_type 'gpt2'; supported model types: gemma, gemma2, llama"):
        ModelConfig(model_type="gpt2")
    for model_type in FAMILIES:
        assert ModelConfig(model_type=model_type).model_type == model_type


def _logits_match(hf, ours, ids):
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = ours(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_phi3_generation_with_every_row_padded_matches_transformers(tmp_path):
    """transformers' Phi3 recomputes its cache when the sequence, padding included, first
    passes original_max_position_embeddings (it recomputed at the real position before)."""
    hf = make_hf("phi3", tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    ids = torch.randint(3, BASE["vocab_size"], (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=[]).tolist() == ref.tolist()


def test_llama_longrope_generation_keeps_its_cache_as_transformers(tmp_path):
    """Only Phi3 recomputes the cache past original_max_position_embeddings; transformers'
    Llama with a LongRoPE keeps it (ours recomputed for every family)."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0, 1.2, 1.4, 1.6, 2.0, 2.2], "long_factor": [2.0, 3.0, 4.0, 5.0, 6.0, 8.0]}
    hf = make_hf("llama", tmp_path / "hf", rope_parameters=rope)
    ours = ligerzoo.from_hf(tmp_path / "hf")
    ids = torch.randint(3, BASE["vocab_size"], (2, 11))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert ours.generate(ids, max_new_tokens=12, eos_token_id=[]).tolist() == ref.tolist()


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_partial_rotary_factor_outside_phi3_is_ignored_as_transformers(tmp_path, name):
    """transformers rotates whole heads in these families whatever partial_rotary_factor says
    (ours rotated half of them); with a scaled RoPE both refuse it."""
    extra = dict(partial_rotary_factor=0.5)
    if name == "llama":
        extra["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    hf = make_hf(name, tmp_path / "hf", **extra)
    with pytest.warns(UserWarning, match="partial_rotary_factor=0.5, which the .* family ignores") as record:
        ours = ligerzoo.from_hf(tmp_path / "hf")
    assert record[0].filename == __file__  # the user's from_hf line, however deep the family's reader
    assert ours.config.rotary_dim == ours.config.head_dim
    _logits_match(hf, ours, torch.randint(3, BASE["vocab_size"], (2, 20)))
    if name == "llama":
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                  "partial_rotary_factor": 0.5}
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="partial_rotary_factor=0.5 with a 'llama3' RoPE"):
            ligerzoo.from_hf(tmp_path / "hf")


def test_phi3_partial_rotary_factor_in_rope_parameters_wins(tmp_path):
    """As transformers: rope_parameters' factor over a different top-level one."""
    hf = make_hf("phi3", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["partial_rotary_factor"] = 1.0
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.5
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    ours = ligerzoo.from_hf(tmp_path / "hf")
    assert ours.config.partial_rotary_factor == 0.5
    _logits_match(hf, ours, torch.randint(3, BASE["vocab_size"], (2, 20)))


def test_top_level_original_max_position_embeddings_wins_as_transformers(tmp_path):
    """transformers' standardize_rope_params: a top-level original_max_position_embeddings
    overrides the rope dict's for llama3 / yarn / longrope in every family."""
    import transformers

    hf = make_hf("llama", tmp_path / "hf")  # llama3 RoPE, original_max_position_embeddings 16
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["original_max_position_embeddings"] = 32
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 32
    ours = ligerzoo.from_hf(tmp_path / "hf")
    assert ours.config.rope_scaling["original_max_position_embeddings"] == 32
    _logits_match(hf, ours, torch.randint(3, BASE["vocab_size"], (2, 40)))


@pytest.mark.parametrize("top_level_theta", [1e6, None])
def test_rope_scaling_added_to_a_v5_config_wins_as_transformers(tmp_path, top_level_theta):
    """Qwen2.5's recipe for long contexts adds a YaRN ``rope_scaling`` to config.json; a 5.x
    config also holds ``rope_parameters``, which transformers then ignores (its theta too:
    the top-level ``rope_theta`` or the class default stands). We ran the
    ``rope_parameters`` instead (logits 12 apart). save_hf keeps the file, so transformers
    reads our saved model the same way."""
    import transformers

    make_hf("qwen2", tmp_path / "hf", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_parameters" in cfg
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    cfg.pop("rope_theta", None)
    if top_level_theta is not None:
        cfg["rope_theta"] = top_level_theta
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    ours = ligerzoo.from_hf(tmp_path / "hf")
    assert ours.config.rope_scaling["rope_type"] == "yarn" and ours.config.rope_scaling["factor"] == 4.0
    assert ours.config.rope_theta == (top_level_theta or 10000.0) == hf.config.rope_parameters["rope_theta"]
    ids = torch.randint(3, BASE["vocab_size"], (2, 40))
    _logits_match(hf, ours, ids)
    ligerzoo.save_hf(ours, tmp_path / "out")
    again = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    _logits_match(again, ours, ids)


def test_phi3_partial_rotary_factor_in_a_legacy_rope_scaling_is_read(tmp_path):
    """transformers' Phi3 takes partial_rotary_factor from the RoPE dict first, rope_scaling
    included (we read it from rope_parameters or the top level only)."""
    hf = make_hf("phi3", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["partial_rotary_factor"] = 1.0
    cfg["rope_scaling"] = rope | {"partial_rotary_factor": 0.5}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    ours = ligerzoo.from_hf(tmp_path / "hf")
    assert ours.config.partial_rotary_factor == 0.5
    _logits_match(hf, ours, torch.randint(3, BASE["vocab_size"], (2, 20)))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_omitted_max_position_embeddings_takes_the_transformers_default(tmp_path, name):
    """The family's config class default (it bounds the YaRN / LongRoPE original context
    when that is omitted too, and save_hf writes it out)."""
    import transformers

    make_hf(name, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["max_position_embeddings"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    expected = transformers.AutoConfig.from_pretrained(tmp_path / "hf").max_position_embeddings
    assert ligerzoo.from_hf(tmp_path / "hf").config.max_position_embeddings == expected


@pytest.mark.parametrize("name", list(FAMILIES))
def test_omitted_pad_token_id_takes_the_transformers_default(tmp_path, name):
    """A config.json without pad_token_id: the family's class default (Gemma's 0, Phi3's
    32000, else none), whose embedding row gets no gradient, as in transformers; generate
    pads only with a stated pad id, as transformers' generation config."""
    import transformers

    make_hf(name, tmp_path / "hf", **({"vocab_size": 32064} if name == "phi3" else {}))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["pad_token_id"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "hf" / "generation_config.json").unlink(missing_ok=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    assert ours.config.pad_token_id == hf.config.pad_token_id
    assert ours.embed.padding_idx == hf.model.embed_tokens.padding_idx
    if name in ("gemma", "gemma2", "phi3"):
        pad = ours.embed.padding_idx
        assert pad == {"phi3": 32000}.get(name, 0)
        ids = torch.tensor([[5, pad, 7, pad, 9, 11]])
        ours(ids, labels=ids).loss.backward()
        hf(input_ids=ids, labels=ids).loss.backward()
        g_hf = hf.model.embed_tokens.weight.grad
        torch.testing.assert_close(ours.embed.weight.grad[[pad, 5]], g_hf[[pad, 5]], rtol=1e-3, atol=1e-5)
        if not ours.config.tie_word_embeddings:  # a tied head's gradient reaches the row too
            assert not ours.embed.weight.grad[pad].any()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    torch.testing.assert_close(ours.generate(ids, 3), hf.generate(ids, max_new_tokens=3, do_sample=False), rtol=0, atol=0)


def test_yarn_without_factor_is_refused(tmp_path):
    """transformers refuses a YaRN dict without ``factor`` (KeyError); we loaded it."""
    make_hf("qwen2", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "original_max_position_embeddings": 16}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks field.*factor"):
        ligerzoo.from_hf(tmp_path / "hf")


def test_gemma_bidirectional_attention_is_refused(tmp_path):
    make_hf("gemma", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["use_bidirectional_attention"] = True
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        ligerzoo.from_hf(tmp_path / "hf")


GEMMA2_IN_CODE = dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, norm_offset=1.0, norm_casting="gemma", embed_scale=True,
                      hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, post_norms=True, attn_softcap=50.0,
                      final_softcap=30.0)


@pytest.mark.parametrize("window", [None, 4])
def test_gemma2_built_in_code_with_default_scale_saves_for_transformers(tmp_path, window):
    """A Gemma2 built in code with the default softmax scale (attn_scale None: head_dim ** -0.5,
    which query_pre_attn_scalar expresses) saves, and so does one without sliding layers:
    config.json then names every layer full (transformers would otherwise slide alternate
    layers); transformers' logits match ours and from_hf reads the same config back."""
    import transformers

    layers = dict(sliding_window=window, layer_types=["sliding_attention", "full_attention"]) if window else {}
    torch.manual_seed(0)
    model = ligerzoo.CausalLM(ligerzoo.ModelConfig(**GEMMA2_IN_CODE, **layers))
    assert model.config.attn_scale is None
    ligerzoo.save_hf(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["query_pre_attn_scalar"] == 8
    if window is None:
        assert saved["layer_types"] == ["full_attention"] * 2 and saved["sliding_window"] >= 2048
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, back(ids).logits, atol=2e-5, rtol=2e-5)
    read = ligerzoo.from_hf(tmp_path / "out").config
    assert (read.sliding_window, read.layer_types) == ((window, layers["layer_types"]) if window else (None, None))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_packed_documents_attend_within_themselves_as_transformers(tmp_path, name):
    """Rows packing documents (position_ids restarting at 0) attend per document when no
    attention_mask is given, as transformers without a cache (use_cache=False): logits, loss
    and gradients match it, and each document's logits equal those of the document run
    alone."""
    hf = make_hf(name, tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    T = 13
    ids = torch.randint(3, BASE["vocab_size"], (2, T))
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(8)]), torch.arange(T)])  # row 0: docs of 5 and 8
    labels = ids.clone()
    labels[0, 5] = -100  # the first token of document 2 is not predicted from document 1
    with torch.no_grad():
        got = ours(ids, position_ids=pos).logits
        torch.testing.assert_close(got, hf(input_ids=ids, position_ids=pos, use_cache=False).logits,
                                   atol=2e-5, rtol=2e-5)
        for a, b in ((0, 5), (5, 13)):  # each document alone
            torch.testing.assert_close(got[0, a:b], ours(ids[:1, a:b]).logits[0], atol=2e-5, rtol=2e-5)
        assert (got[0, 5:] - ours(ids[:1]).logits[0, 5:]).abs().max() > 1e-3  # the mask changes something
    _step_matches_transformers(hf, ours, name, ids, pos, labels)


def test_phi3_longrope_compiles_whole_and_picks_the_regime_per_call(tmp_path):
    """Under torch.compile(fullgraph=True) LongRoPE's short/long choice is made on the device
    (both tables computed, one picked): no data-dependent host read breaks the graph, and
    both regimes give eager's loss."""
    make_hf("phi3", tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(3, BASE["vocab_size"], (2, 12))
    losses = []
    for offset in (0, 20):  # max position 11 < 16 (short factors), 31 >= 16 (long)
        pos = (torch.arange(12) + offset).expand(2, 12)
        want = model(ids, labels=ids, position_ids=pos).loss
        torch.testing.assert_close(compiled(ids, labels=ids, position_ids=pos).loss, want, atol=1e-6, rtol=1e-6)
        losses.append(want)
    assert not torch.allclose(losses[0], losses[1])


def _as_the_kernel_sees_it(block_mask, T, S, B=None):
    """(B, T, S) bool: what flex_attention's kernel computes for a BlockMask, tile by tile:
    a full tile every pair, a partial tile the pairs its mask function allows, others none.
    B: the batch of the attention call (default the mask's own; a mask of batch 1 serves
    every row, its tiles read at row b % 1 and its mask function called with the real b)."""
    bq, bk = block_mask.BLOCK_SIZE
    counts, idx = block_mask.kv_num_blocks[:, 0], block_mask.kv_indices[:, 0]
    full_counts, full_idx = block_mask.full_kv_num_blocks[:, 0], block_mask.full_kv_indices[:, 0]
    rows, n_q = counts.shape
    B = B or rows
    n_k = idx.shape[-1]
    b, q, s = torch.arange(B)[:, None, None], torch.arange(n_q * bq)[None, :, None], torch.arange(n_k * bk)
    allowed = block_mask.mask_mod(b, 0, q, s[None, None, :]).expand(B, n_q * bq, n_k * bk)
    seen = torch.zeros_like(allowed)
    for b in range(B):
        i = b % rows
        for r in range(n_q):
            qs = slice(r * bq, (r + 1) * bq)
            for c in idx[i, r, :counts[i, r]].tolist():
                seen[b, qs, c * bk:(c + 1) * bk] = allowed[b, qs, c * bk:(c + 1) * bk]
            for c in full_idx[i, r, :full_counts[i, r]].tolist():
                seen[b, qs, c * bk:(c + 1) * bk] = True
    return seen[:, :T, :S]


def _flex_as_its_kernel(q, k, v, score_mod=None, block_mask=None, scale=None, enable_gqa=False, kernel_options=None):
    """flex_attention written out over :func:`_as_the_kernel_sees_it`'s pairs (fp32 softmax)."""
    assert kernel_options is None  # tiles are chosen only for CUDA tensors
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(2, 3) * scale  # (B, nh, T, S)
    if score_mod is not None:
        scores = score_mod(scores, None, None, None, None)
    seen = _as_the_kernel_sees_it(block_mask, q.shape[2], k.shape[2], q.shape[0])[:, None]
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_block_masks_give_transformers_attention(tmp_path, name, monkeypatch):
    """The CUDA path for packed documents and sliding windows (flex_attention over a block
    mask built from the document index, never a dense mask), run on the CPU with flex's
    kernel written out tile by tile (8-position tiles, so a 21-token row spans partial, full
    and skipped tiles): logits, loss and gradients equal transformers(use_cache=False), packed
    and not, and the dense path is not taken."""
    from ligerzoo.models import flex, transformer

    monkeypatch.setattr(flex, "BLOCK", 8)
    monkeypatch.setattr(flex, "applies", lambda device, cached, key_valid, head_dim: not cached and key_valid is None)
    monkeypatch.setattr(flex, "_flex", lambda: _flex_as_its_kernel)
    monkeypatch.setattr(transformer, "attention_mask_for", None)  # calling it would fail the test
    hf = make_hf(name, tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    T = 21
    ids = torch.randint(3, BASE["vocab_size"], (2, T))
    packed = torch.stack([torch.cat([torch.arange(5), torch.arange(11), torch.arange(5)]), torch.arange(T)])
    for pos in (packed, torch.arange(T).expand(2, T)):
        labels = ids.clone()
        labels[0, [5, 16]] = -100
        ref = _step_matches_transformers(hf, ours, name, ids, pos, labels)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids, position_ids=pos).logits, ref.logits, atol=2e-5, rtol=2e-5)


def test_flex_tiles_are_chosen_only_where_they_were_measured(monkeypatch):
    """flex._kernel_options: SM90_HEAD256_OPTIONS for 16-bit heads of 256 on sm90 with at least
    128 queries and 128-position mask tiles; torch's own tiles (None) for fp32, other head
    sizes, short queries (inductor's decoding kernel), other tile sizes, other GPUs, CPU tensors."""
    from ligerzoo.models import flex

    def q(T=2048, hd=256, dtype=torch.bfloat16, device="meta"):
        return torch.empty(2, 16, T, hd, dtype=dtype, device=device)
    tiles = flex.SM90_HEAD256_OPTIONS
    assert flex._kernel_options(q(), (128, 128), (9, 0)) is tiles
    assert flex._kernel_options(q(dtype=torch.float16), (128, 128), (9, 0)) is tiles
    assert flex._kernel_options(q(T=128), (256, 128), (9, 0)) is tiles
    for args in [(q(dtype=torch.float32), (128, 128), (9, 0)), (q(hd=128), (128, 128), (9, 0)),
                 (q(T=127), (128, 128), (9, 0)), (q(T=64), (128, 128), (9, 0)), (q(), (8, 8), (9, 0)),
                 (q(), (64, 128), (9, 0)), (q(), (128, 32), (9, 0)), (q(), (128, 128), (8, 0)),
                 (q(), (128, 128), (10, 0)), (q(device="cpu"), (128, 128), None)]:
        assert flex._kernel_options(*args) is None, args
    monkeypatch.setattr(flex, "SM90_HEAD256_OPTIONS", None)
    assert flex._kernel_options(q(), (128, 128), (9, 0)) is None


def test_the_block_mask_cache_is_keyed_by_shape_and_device(monkeypatch):
    """flex._dense_block_mask hands back the last block for the same mask object, B, T, S and
    device, and builds a new one when any of them differs (a mask of another device included)."""
    from ligerzoo.models import flex

    monkeypatch.setattr(flex, "_last", None)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    first = flex._dense_block_mask(None, 2, 300, 300, cpu)
    assert flex._dense_block_mask(None, 2, 300, 300, cpu) is first
    for args in [(None, 1, 300, 300, cpu), (None, 2, 300, 301, cpu), (None, 2, 299, 300, cpu),
                 (torch.ones(1, 1, 300, 300, dtype=torch.bool), 2, 300, 300, cpu)]:
        assert flex._dense_block_mask(*args) is not first, args[1:4]
    first = flex._dense_block_mask(None, 2, 300, 300, cpu)
    other = flex._dense_block_mask(None, 2, 300, 300, meta)
    assert other.kv_num_blocks.device == meta and first.kv_num_blocks.device == cpu


def test_flex_keeps_serving_after_a_softcap_or_scale_changes():
    """One process, flex_attention (inductor, CPU, no grad: flex has no CPU backward) called with
    changing scales and softcaps, as a second model would: every call equals causal softcapped
    GQA attention in float64 and none breaks the graph. Before specialize_float, the fourth call
    (a new softcap) failed in inductor here, and on the H200 fell back to an eager flex whose
    backward raised (session 32). The compiled forms are kept on flex.py's own frame, not on
    flex_attention's, where a caller's own torch.compile(flex_attention) keeps its."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention
    from ligerzoo.models import flex

    theirs = len(_debug_get_cache_entry_list(flex_attention.__code__))  # a caller's own compiled forms
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 200, 32, generator=g) for n in (4, 2, 2))
    counters.clear()
    for scale, cap in ((0.125, None), (0.25, None), (0.5, 5.0), (0.3, 3.0), (0.3, 5.0)):
        with torch.no_grad():
            got = flex.attention(q, k, v, None, scale, cap)
        s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * scale  # (B, H, T, T)
        if cap is not None:
            s = cap * torch.tanh(s / cap)
        s = s.masked_fill(~torch.ones(200, 200, dtype=torch.bool).tril(), float("-inf"))
        want = torch.softmax(s, -1) @ v.double().repeat_interleave(2, 1)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # ours live on flex's own frame: none added to flex_attention's (the caller's limit of 8)
    assert len(_debug_get_cache_entry_list(flex._flex()._torchdynamo_orig_callable.__code__)) >= 4
    assert len(_debug_get_cache_entry_list(flex_attention.__code__)) == theirs


@pytest.mark.parametrize("name", ["gemma2", "mistral"])
def test_blocks_compiled_apart_take_the_block_mask_as_a_dense_one(tmp_path, name, monkeypatch):
    """Blocks compiled one by one (as torchtitan compiles them) while the model builds its
    block masks eagerly: inside the compiled block the mask becomes its dense equivalent and
    runs the dense path; loss and gradients equal transformers', packed and plain rows."""
    from ligerzoo.models import flex

    monkeypatch.setattr(flex, "BLOCK", 8)
    monkeypatch.setattr(flex, "applies", lambda device, cached, key_valid, head_dim: not cached and key_valid is None
                        and not torch.compiler.is_compiling())
    monkeypatch.setattr(flex, "_flex", lambda: pytest.fail("flex_attention called inside a compiled block"))
    hf = make_hf(name, tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    for layer in ours.layers:
        layer.compile(backend="aot_eager", fullgraph=True)
    T = 21
    ids = torch.randint(3, BASE["vocab_size"], (2, T))
    packed = torch.stack([torch.cat([torch.arange(5), torch.arange(11), torch.arange(5)]), torch.arange(T)])
    for pos in (packed, torch.arange(T).expand(2, T)):
        _step_matches_transformers(hf, ours, name, ids, pos, ids.masked_fill(pos == 0, -100))


@pytest.mark.parametrize("window", [None, 5, 16, 30])
def test_block_tiles_cover_exactly_the_dense_mask(window):
    """flex.block_classes against attention_mask_for's dense mask: every full tile is all
    visible, every skipped tile all hidden, and full tiles plus the mask function on partial
    tiles give the dense mask pair for pair; with documents of 1-39 positions, T not a
    multiple of the tile edge, and windows shorter and longer than the documents."""
    from ligerzoo.models import flex
    from ligerzoo.models.transformer import attention_mask_for, packed_documents

    torch.manual_seed(0)
    T, block = 100, 16
    pos = []
    for _ in range(3):
        row = []
        while len(row) < T:
            row += range(int(torch.randint(1, 40, ())))
        pos.append(row[:T])
    for document in (packed_documents(torch.tensor(pos)), None):
        dense = attention_mask_for(0, T, T, None, window, "cpu", document)
        if dense is None:  # plain causal
            dense = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
        dense = dense[:, 0]  # (B|1, T, T)
        seen = _as_the_kernel_sees_it(flex.block_mask(T, document, window, "cpu", block), T, T)
        assert torch.equal(seen, dense.expand_as(seen))
        partial, full = flex.block_classes(T, document, window, block)
        for i in range(partial.shape[-2]):
            for j in range(partial.shape[-1]):
                tile = dense[:, i * block:(i + 1) * block, j * block:(j + 1) * block]
                assert bool(tile[full[:, i, j]].all()) and not bool(tile[~(full | partial)[:, i, j]].any())
        if window is None:  # (a window under two tile edges leaves no tile wholly inside it)
            assert int(full.sum()) > 0


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "linear", "factor": 2.0}, "a 'linear' RoPE for phi3.*only 'longrope'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, "a 'llama3' RoPE for phi3.*only 'longrope'"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}, "short_factor must list"),
])
def test_phi3_refuses_rope_types_transformers_refuses(rope, message):
    """transformers' Phi3Config takes only longrope (legacy su / yarn with factors, which a yarn
    without them lacks) or none."""
    import transformers

    hf = dict(model_type="phi3", vocab_size=151, hidden_size=48, intermediate_size=72, num_hidden_layers=1,
              num_attention_heads=4, max_position_embeddings=64, original_max_position_embeddings=16,
              rope_scaling=rope)
    with pytest.raises(Exception, match="longrope"):
        transformers.Phi3Config(**{k: v for k, v in hf.items() if k != "model_type"})
    with pytest.raises(ValueError, match=message):
        ligerzoo.models.config_from_hf(hf)


@pytest.mark.parametrize("name,layer_types", [
    ("mistral", ["full_attention", "sliding_attention"]),    # transformers reads it as Ministral
    ("mistral", ["full_attention", "full_attention"]),       # a window no layer uses
    ("qwen2", ["sliding_attention", "full_attention"]),      # not the layers from max_window_layers on
])
def test_explicit_layer_types_load_and_save_as_transformers(tmp_path, name, layer_types):
    """A config.json with ``layer_types`` that the family's older keys cannot say: from_hf runs
    what transformers' AutoModelForCausalLM runs (logits and loss), and save_hf, after an edit of
    an unrelated field, writes a config.json that transformers loads to the same model. Until
    session 26 a Mistral config's layer_types were ignored (every layer slid; 0.47 apart in the
    logits), and a Qwen2 one could not be saved."""
    from transformers import AutoModelForCausalLM

    make_hf(name, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["layer_types"] = layer_types
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ours = ligerzoo.from_hf(tmp_path / "hf")
    sliding = [ours.config.layer_type(i) == "sliding_attention" for i in range(2)]
    assert sliding == [t == "sliding_attention" for t in layer_types]
    ids = torch.randint(3, BASE["vocab_size"], (2, 13))  # longer than the window (4)
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        out = ours(ids, labels=ids)
        torch.testing.assert_close(ours(ids).logits, ref.logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-5)
    ours.config.pad_token_id = 3                            # any edit: config.json is written anew
    ligerzoo.save_hf(ours, tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref.logits, atol=2e-5, rtol=2e-5)
