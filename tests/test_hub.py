"""Checkpoint contract: from_hf / save_hf round trips, sharding, hub cache, bad input."""
import dataclasses
import json
import re
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ligerzoo
import ligerzoo.hub
from ligerzoo.models.config import read_rope
from tests.helpers import make_hf_llama, read_safetensors_dir


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_bit_exact_and_transformers_loads_it(tmp_path, dtype, tied):
    from transformers import LlamaForCausalLM

    hf = make_hf_llama(tmp_path / "hf", dtype=dtype, tie_word_embeddings=tied, attention_bias=True)
    model = ligerzoo.from_hf(tmp_path / "hf")
    assert model.embed.weight.dtype == dtype  # the checkpoint's dtype by default
    ligerzoo.save_hf(model, tmp_path / "out")
    _assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "out"))
    assert ("lm_head.weight" in read_safetensors_dir(tmp_path / "out")) is (not tied)

    back, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert back.dtype == dtype
    src = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, hf.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, src(ids).logits)


def test_sharded_checkpoints_both_ways(tmp_path):
    from transformers import LlamaForCausalLM

    hf = make_hf_llama(tmp_path / "hf", save_kwargs=dict(max_shard_size="40KB"))
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = ligerzoo.from_hf(tmp_path / "hf")
    ligerzoo.save_hf(model, tmp_path / "out", max_shard_size="50KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / s).exists() for s in shards)
    for s in shards:  # every tensor sits in the shard the index names
        assert set(load_file(tmp_path / "out" / s)) == {k for k, v in index["weight_map"].items() if v == s}
    _assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "out"))
    back, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    src = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, hf.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, src(ids).logits)


def test_save_dtype_and_config_schema(tmp_path):
    make_hf_llama(tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf", dtype=torch.bfloat16)
    ligerzoo.save_hf(model, tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in read_safetensors_dir(tmp_path / "out").values())
    src = json.loads((tmp_path / "hf" / "config.json").read_text())
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out.pop("dtype") == "bfloat16"
    src.pop("dtype")
    assert out == src  # the same schema and fields it came with


def test_config_reads_both_transformers_layouts():
    v4 = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    v5 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert read_rope(v4) == read_rope(v5)
    assert read_rope(v4)[1]["rope_type"] == "llama3" and read_rope(v4)[0] == 500000.0
    assert read_rope({"rope_theta": 1e6, "rope_scaling": None}) == (1e6, None)
    assert read_rope({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}) == (1e4, None)
    # both (a rope_scaling added to a 5.x file): rope_scaling wins whole, as in transformers
    both = v5 | {"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert read_rope(both) == (1e6, {"rope_type": "linear", "factor": 2.0})
    assert read_rope(v5 | {"rope_scaling": {}}) == read_rope(v5)


def test_model_built_in_code_saves_a_loadable_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = ligerzoo.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = ligerzoo.CausalLM(cfg)
    ligerzoo.save_hf(model, tmp_path / "out")
    back, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, back(ids).logits, atol=1e-5, rtol=1e-5)


def _prefilled_cache(tmp_path: Path, name: str, **make_kwargs) -> tuple[str, dict]:
    """An HF hub cache under tmp_path/cache holding repo tiny-org/<name> (a tiny Llama) at one
    commit on main; returns (commit, the environment of an offline process that uses it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / f"models--tiny-org--{name}"
    make_hf_llama(repo / "snapshots" / commit, **make_kwargs)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit, dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), TRITON_INTERPRET="0")


def test_hub_id_resolves_from_prefilled_cache_offline(tmp_path):
    """A repo id is fetched through huggingface_hub: here from a pre-filled cache, offline."""
    commit, env = _prefilled_cache(tmp_path, "tiny-llama", save_kwargs=dict(max_shard_size="40KB"))
    code = ("import ligerzoo; m = ligerzoo.from_hf('tiny-org/tiny-llama'); "
            "print(m.config.num_hidden_layers, m.source_dir)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "2" and commit in r.stdout
    code = "import ligerzoo; ligerzoo.from_hf('tiny-org/not-cached')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "FileNotFoundError" in r.stderr and "tiny-org/not-cached" in r.stderr
    code = "import ligerzoo; ligerzoo.from_hf('tiny-org/tiny-llama', revision='v9')"   # a revision not cached
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "at revision 'v9'" in r.stderr


# ---- bad input -------------------------------------------------------------------------


def test_missing_shard(tmp_path):
    make_hf_llama(tmp_path / "hf", save_kwargs=dict(max_shard_size="40KB"))
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        ligerzoo.from_hf(tmp_path / "hf")


def _saved_runs_in_transformers(model, directory: Path, seq_len: int) -> None:
    """save_hf(model, directory) unless already saved there, then transformers' reload of
    the directory gives the model's logits (fp32, eager attention)."""
    import transformers

    if not (directory / "config.json").exists():
        ligerzoo.save_hf(model, directory)
    back = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=2e-5, rtol=2e-5)


def _rewrite(directory: Path, edit):
    f = directory / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    make_hf_llama(tmp_path / "hf")
    _rewrite(tmp_path / "hf", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model\.layers\.1\.self_attn\.k_proj\.weight"):
        ligerzoo.from_hf(tmp_path / "hf")


def test_a_tensor_the_index_misplaces_is_named_with_the_index(tmp_path):
    """An index that puts a tensor in the wrong shard (so the shard holding it is never read, as
    in transformers, which would initialise that weight at random) is refused, naming the index's
    entry and the unread shard rather than only a missing tensor."""
    make_hf_llama(tmp_path / "hf", save_kwargs=dict(max_shard_size="10KB"))  # down_proj: 15 KB
    path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    home, wrong = index["weight_map"][key], index["weight_map"]["model.embed_tokens.weight"]
    assert sum(v == home for v in index["weight_map"].values()) == 1  # the tensor has a shard of its own
    index["weight_map"][key] = wrong
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"missing tensor\(s\): {key} \(model.safetensors.index.json lists {key} in "
                                         rf"{wrong}, which does not hold it; {home} in the directory is not named by "
                                         rf"the index, so it was not read\)"):
        ligerzoo.from_hf(tmp_path / "hf")
    del index["weight_map"][key]
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json does not list {key}; {home} in the"):
        ligerzoo.from_hf(tmp_path / "hf")
    # entries written "./shard" name the same files; a base model's index (keys without
    # "model.") lists the tensor under its own name
    base = {k.removeprefix("model."): "./" + v for k, v in index["weight_map"].items()}
    base[key.removeprefix("model.")] = "./" + wrong
    for shard in sorted(set(index["weight_map"].values())) + [home]:
        save_file({k.removeprefix("model."): t for k, t in load_file(tmp_path / "hf" / shard).items()},
                  tmp_path / "hf" / shard, metadata={"format": "pt"})
    path.write_text(json.dumps({"weight_map": base}))
    short = key.removeprefix("model.")
    with pytest.raises(ValueError, match=rf"missing tensor\(s\): {key} \(model.safetensors.index.json lists {short} "
                                         rf"in ./{wrong}, which does not hold it; {home} in the directory is not "
                                         rf"named by the index, so it was not read\)"):
        ligerzoo.from_hf(tmp_path / "hf")


def test_untied_head_missing_is_an_error_not_random_init(tmp_path):
    make_hf_llama(tmp_path / "hf")
    _rewrite(tmp_path / "hf", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        ligerzoo.from_hf(tmp_path / "hf")


def test_unexpected_tensor(tmp_path):
    make_hf_llama(tmp_path / "hf")
    _rewrite(tmp_path / "hf", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*model\.layers\.0\.mlp\.extra\.weight"):
        ligerzoo.from_hf(tmp_path / "hf")


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    make_hf_llama(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 96
    cfg_path.write_text(json.dumps(cfg))
    shapes = r"has shape \((80, 48|48, 80)\), but the config expects \((96, 48|48, 96)\)"
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' in model\.safetensors " + shapes):
        ligerzoo.from_hf(tmp_path / "hf")


def test_unknown_model_type_lists_supported(tmp_path):
    make_hf_llama(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"unknown model_type 'gpt_neox'.*llama"):
        ligerzoo.from_hf(tmp_path / "hf")
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"model_type": ["llama"]}))
    with pytest.raises(ValueError, match=r"unknown model_type \['llama'\].*llama"):
        ligerzoo.from_hf(tmp_path / "hf")
    cfg = json.loads(cfg_path.read_text())
    del cfg["model_type"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'config.json has no "model_type" \(missing or null\); expected one of: gemma, .*llama'):
        ligerzoo.from_hf(tmp_path / "hf")


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        ligerzoo.from_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ligerzoo.from_hf(tmp_path / "empty")


def test_save_refuses_non_empty_dir_unless_overwrite(tmp_path):
    make_hf_llama(tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ligerzoo.save_hf(model, out)
    # overwrite replaces a checkpoint directory only: a directory holding anything else
    # (notes, scripts, data: the working directory, say) is refused, naming what is there
    with pytest.raises(FileExistsError, match="notes.txt"):
        ligerzoo.save_hf(model, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    ligerzoo.save_hf(model, out, max_shard_size="40KB")                       # a sharded checkpoint
    ligerzoo.save_hf(model, out, overwrite=True)                              # replaced by one file
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    (tmp_path / "empty").mkdir()
    ligerzoo.save_hf(model, tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "config.json").exists()


def test_interrupted_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    make_hf_llama(tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf")
    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash mid-save")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(ligerzoo.hub, "save_file", failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        ligerzoo.save_hf(model, tmp_path / "out", max_shard_size="40KB")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dir left behind

    # an existing checkpoint survives a failed overwrite untouched
    monkeypatch.setattr(ligerzoo.hub, "save_file", save_file)
    ligerzoo.save_hf(model, tmp_path / "out")
    before = read_safetensors_dir(tmp_path / "out")
    calls.clear()
    monkeypatch.setattr(ligerzoo.hub, "save_file", failing_save_file)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ligerzoo.save_hf(model, tmp_path / "out", max_shard_size="40KB", overwrite=True)
    _assert_same_tensors(before, read_safetensors_dir(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_save_writes_the_models_current_config(tmp_path):
    """A config changed after loading (or derived with replace) is what save_hf writes."""
    from transformers import LlamaForCausalLM

    make_hf_llama(tmp_path / "hf")
    src = ligerzoo.from_hf(tmp_path / "hf")
    small = ligerzoo.CausalLM(src.config.replace(num_hidden_layers=1))
    small.config.eos_token_id = 7
    ligerzoo.save_hf(small, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["eos_token_id"] == 7
    back, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, 173, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, back(ids).logits, atol=1e-5, rtol=1e-5)
    assert ligerzoo.from_hf(tmp_path / "out").config.num_hidden_layers == 1


def test_float64_and_auto_dtypes(tmp_path):
    make_hf_llama(tmp_path / "hf")
    ligerzoo.save_hf(ligerzoo.from_hf(tmp_path / "hf", dtype=torch.float64), tmp_path / "f64")
    assert ligerzoo.from_hf(tmp_path / "f64").embed.weight.dtype == torch.float64
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"dtype": "auto"}))
    assert ligerzoo.from_hf(tmp_path / "hf").embed.weight.dtype == torch.float32


def test_files_are_read_as_transformers_reads_them_and_paths_are_checked(tmp_path):
    """transformers reads model.safetensors when there is one (an index next to it is not
    used), else every tensor of every shard the index names, listed there or not: the same
    weights load here (checked against transformers' own load). A tensor stored in two
    shards, which transformers takes from the last, is refused naming both."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "hf"
    make_hf_llama(src, save_kwargs=dict(max_shard_size="40KB"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    home = index["weight_map"].pop("model.norm.weight")  # listed nowhere, still stored in its shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    index["weight_map"]["model.bogus.weight"] = home  # listed, not stored: nothing to read
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    model = ligerzoo.from_hf(src)
    hf = AutoModelForCausalLM.from_pretrained(src)
    assert torch.equal(model.norm.weight, hf.model.norm.weight)
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
    tensors = load_file(src / other)
    save_file(tensors | {"model.norm.weight": torch.full((hf.config.hidden_size,), 7.0)}, src / other,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="stores 'model.norm.weight' twice") as err:
        ligerzoo.from_hf(src)
    assert home in str(err.value) and other in str(err.value)
    save_file(tensors, src / other, metadata={"format": "pt"})
    single = {k: v + 1.0 for k, v in hf.state_dict().items()}  # a whole other checkpoint in model.safetensors
    save_file(single, src / "model.safetensors", metadata={"format": "pt"})
    model = ligerzoo.from_hf(src)
    hf = AutoModelForCausalLM.from_pretrained(src)
    assert torch.equal(model.norm.weight, hf.model.norm.weight) and torch.equal(model.norm.weight, single["model.norm.weight"])
    with pytest.raises(FileNotFoundError):
        ligerzoo.from_hf("no-such-dir/")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        ligerzoo.save_hf(model, tmp_path / "afile", overwrite=True)


def test_tied_head_stored_anyway_must_equal_the_embedding(tmp_path):
    make_hf_llama(tmp_path / "hf", tie_word_embeddings=True)
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(f)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    model = ligerzoo.from_hf(tmp_path / "hf")  # an identical stored copy is fine
    assert model.lm_head.weight is model.embed.weight
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        ligerzoo.from_hf(tmp_path / "hf")


@pytest.mark.parametrize("model_type,fields,named", [
    ("gemma", {}, "norm_offset=0.0"),                         # Gemma checkpoints always add 1 to the norms
    ("mistral", {"qkv_bias": True}, "qkv_bias=True"),         # no attention biases in a Mistral config.json
    ("phi3", {"mlp_bias": True}, "mlp_bias=True"),
    ("qwen2", {}, "qkv_bias=False"),                          # Qwen2 always has q/k/v biases
])
def test_save_refuses_a_config_its_family_cannot_express(tmp_path, model_type, fields, named):
    """A config built in code with features its family's config.json cannot carry would save
    a checkpoint that loads as another model: refused, naming the field, before any file."""
    cfg = ligerzoo.ModelConfig(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=1, num_attention_heads=4, **fields)
    with pytest.raises(ValueError, match=re.escape(named)):
        ligerzoo.save_hf(ligerzoo.CausalLM(cfg), tmp_path / "out")
    assert not any(tmp_path.iterdir())


def test_saved_files_are_readable_like_any_new_file(tmp_path):
    """safetensors writes its files 0600; save_hf gives them the mode of any new file (the
    umask's), so a shared checkpoint is readable by whoever can read its config.json."""
    make_hf_llama(tmp_path / "hf")
    ligerzoo.save_hf(ligerzoo.from_hf(tmp_path / "hf"), tmp_path / "out", max_shard_size="40KB")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {modes["config.json"]}, modes


def test_save_through_a_symlink_and_dtype_checks(tmp_path):
    make_hf_llama(tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf")
    (tmp_path / "disk" / "ckpt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "ckpt")
    assert ligerzoo.save_hf(model, tmp_path / "link") == tmp_path / "link"
    assert (tmp_path / "link").is_symlink()                   # the link is kept; the files are behind it
    _assert_same_tensors(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "disk" / "ckpt"))
    ligerzoo.save_hf(model, tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["disk", "hf", "link"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["ckpt"]   # nothing left aside
    for bad in (torch.int8, "int8", torch.complex64):
        with pytest.raises(ValueError, match="unsupported dtype"):
            ligerzoo.save_hf(model, tmp_path / "other", dtype=bad)
        with pytest.raises(ValueError, match="unsupported dtype"):
            ligerzoo.from_hf(tmp_path / "hf", dtype=bad)
    assert not (tmp_path / "other").exists()


def test_save_refuses_the_working_directory_and_paths_under_a_file(tmp_path, monkeypatch):
    make_hf_llama(tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf")
    ligerzoo.save_hf(model, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path / "ckpt")
    for where in (".", tmp_path / "ckpt", tmp_path):  # the working directory, or one above it
        with pytest.raises(FileExistsError, match="working directory|holds more"):
            ligerzoo.save_hf(model, where, overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile is a file, so .* cannot be a directory under it"):
        ligerzoo.save_hf(model, tmp_path / "afile" / "sub" / "out")
    assert (tmp_path / "afile").read_text() == "x"


def test_from_hf_returns_eval_mode_like_transformers(tmp_path):
    """from_pretrained returns eval mode; so does from_hf: Mixtral's router jitter noise (a
    training-time option) then leaves inference deterministic."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        router_jitter_noise=0.5, max_position_embeddings=64)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    model = ligerzoo.from_hf(tmp_path / "moe")
    assert not model.training
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)   # the noise, in training only


@pytest.mark.parametrize("model_type,field,value,ok", [
    ("gemma", "hidden_act", "gelu", True),                   # the releases' legacy name for tanh-GELU
    ("gemma", "hidden_act", "gelu_pytorch_tanh", True),
    ("gemma", "hidden_act", "silu", False),                  # transformers 5.x would run SiLU
    ("gemma", "hidden_activation", "gelu", False),           # transformers 4.x: exact GELU
    ("gemma2", "hidden_activation", "silu", False),
    ("gemma2", "hidden_activation", "gelu_pytorch_tanh", True),
])
def test_gemma_activation_is_checked(model_type, field, value, ok):
    hf = dict(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, head_dim=8) | {field: value}
    if ok:
        assert ligerzoo.models.config_from_hf(hf).activation == "gelu_tanh"
    else:
        with pytest.raises(ValueError, match=f"{field}={value!r}"):
            ligerzoo.models.config_from_hf(hf)


def test_quantized_and_integer_checkpoints_are_refused(tmp_path):
    make_hf_llama(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    plain = cfg_path.read_text()
    cfg_path.write_text(json.dumps(json.loads(plain) | {"quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match="quantization_config.*'fp8'"):
        ligerzoo.from_hf(tmp_path / "hf")
    cfg_path.write_text(plain)
    key = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(tmp_path / "hf", lambda t: t.__setitem__(key, (t[key] * 10).to(torch.int8)))
    with pytest.raises(ValueError, match=re.escape(f"{key!r} in model.safetensors is torch.int8")):
        ligerzoo.from_hf(tmp_path / "hf")


def test_unreadable_files_are_named(tmp_path):
    make_hf_llama(tmp_path / "hf", save_kwargs=dict(max_shard_size="40KB"))
    d = tmp_path / "hf"
    index = d / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="no \"weight_map\""):
        ligerzoo.from_hf(d)
    index.write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        ligerzoo.from_hf(d)
    bad = json.loads(good)
    bad["weight_map"][next(iter(bad["weight_map"]))] = 5
    index.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="must map tensor names to shard file names, got .*: 5"):
        ligerzoo.from_hf(d)
    index.write_text(good)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])                                # truncated
    with pytest.raises(ValueError, match=re.escape(shard.name) + ".*truncated"):
        ligerzoo.from_hf(d)
    shard.write_bytes(data)
    config = (d / "config.json").read_text()
    (d / "config.json").write_text(config[:-5])
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        ligerzoo.from_hf(d)
    (d / "config.json").write_text(config)
    shard.rename(d / "blob")                                                  # a hub cache's missing blob
    shard.symlink_to(d / "gone")
    with pytest.raises(FileNotFoundError, match="a link to the missing"):
        ligerzoo.from_hf(d)


@pytest.mark.parametrize("edit,message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks field.*low_freq_factor, high_freq_factor"),
    ({"rope_scaling": {"rope_type": "linear"}}, "'linear' lacks field.*factor"),
    ({"hidden_size": "48"}, "hidden_size must be a positive int, got '48'"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int"),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a finite number >= 0, got None"),   # used to fail at the forward
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a finite number >= 0, got '1e-6'"),
])
def test_config_field_errors_name_the_field(edit, message):
    hf = dict(model_type="llama", vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64) | edit
    with pytest.raises(ValueError, match=message):
        ligerzoo.models.config_from_hf(hf)


def test_qwen2_sliding_layer_types_without_use_sliding_window_attend_fully():
    """transformers reads sliding_window as None without use_sliding_window, so layers typed
    "sliding_attention" attend fully: the same here, not an error."""
    hf = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, use_sliding_window=False, sliding_window=4,
              layer_types=["full_attention", "sliding_attention"])
    cfg = ligerzoo.models.config_from_hf(hf)
    assert cfg.layer_types is None and cfg.sliding_window is None


def test_dropout_in_the_config_is_reported():
    """The models have no dropout: a config that asks for it loads with a warning naming the
    fields (transformers would apply it in training); zero dropout, the norm, says nothing."""
    import warnings

    base = dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4)
    with pytest.warns(UserWarning, match="attention_dropout=0.2, resid_pdrop=0.1") as record:
        ligerzoo.models.config_from_hf(base | {"resid_pdrop": 0.1, "attention_dropout": 0.2})
    assert record[0].filename == __file__  # the caller's line, not the package's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ligerzoo.models.config_from_hf(base | {"resid_pdrop": 0.0, "attention_dropout": 0.0})


def test_the_dropout_warning_comes_once_at_loading(tmp_path):
    """save_hf reads the source's config again; the loader's warning is not repeated there."""
    import warnings

    make_hf_llama(tmp_path / "hf", attention_dropout=0.1)
    with pytest.warns(UserWarning, match="attention_dropout=0.1"):
        model = ligerzoo.from_hf(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ligerzoo.save_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention_dropout"] == 0.1
    # and without touching the warnings filters: a user's warning shown once (the "default"
    # action) stays shown once across saves (resetting the filters made Python show it again)
    def step():
        warnings.warn("a warning of the user's own training step")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for i in range(3):
            step()
            ligerzoo.save_hf(model, tmp_path / f"again{i}")
    assert sum("training step" in str(w.message) for w in record) == 1


def test_warnings_from_pseudo_files_keep_their_name(tmp_path, monkeypatch):
    """Code run from "<string>" (python -c, exec) or "<stdin>" is the user's, whatever the
    working directory: inside the package's directory it was taken for package code, and the
    warning went to the top of the stack."""
    import ligerzoo._checks

    monkeypatch.chdir(Path(ligerzoo._checks.__file__).parent)
    with pytest.warns(UserWarning, match="from exec") as record:
        exec(compile("ligerzoo._checks.warn_user('from exec')", "<string>", "exec"), {"ligerzoo": ligerzoo})
    assert record[0].filename == "<string>"


def test_from_hf_refuses_a_device_this_machine_lacks(tmp_path):
    """Checked before any file is read, with the device named (torch's own errors were a bare
    AssertionError for "cuda" on a CPU build)."""
    make_hf_llama(tmp_path / "hf")
    bad = ["no_such_device", "privateuseone"] + (
        ["cuda"] if not torch.cuda.is_available() else [f"cuda:{torch.cuda.device_count()}"])
    for device in bad:
        with pytest.raises(ValueError, match=f"device='{device}' cannot be used on this machine"):
            ligerzoo.from_hf(tmp_path / "does-not-exist", device=device)
    assert ligerzoo.from_hf(tmp_path / "hf", device=torch.device("cpu")).embed.weight.device.type == "cpu"


def test_import_ligerzoo_reaches_its_submodules():
    """The README writes ligerzoo.parallel.apply_fsdp, ligerzoo.data.pack_documents, ... after a
    plain `import ligerzoo` (a fresh interpreter: this one has imported them already)."""
    code = ("import ligerzoo; ligerzoo.parallel.apply_fsdp, ligerzoo.data.pack_documents, "
            "ligerzoo.kernels.rms_norm, ligerzoo.nn.RMSNorm, ligerzoo.models.FROM_CHECKPOINT")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_save_hf_refuses_a_dangling_link(tmp_path):
    """A link to a missing directory is refused (writing through it created its target)."""
    from tests.helpers import make_hf_llama

    make_hf_llama(tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing" / "deeper")
    for call in (lambda: ligerzoo.save_hf(model, link), lambda: ligerzoo.hub.check_save_target(link)):
        with pytest.raises(FileNotFoundError, match="which does not exist"):
            call()
    assert not (tmp_path / "missing").exists()


def test_check_save_target_refuses_a_place_without_new_directories(tmp_path):
    """A path where no directory can be created is refused up front (the demo checks --out
    with it before fine-tuning; it passed and save_hf failed at the end); a good path is
    left as it was, with no probe directory behind."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's /proc (read-only to directory creation, even for root)")
    with pytest.raises(PermissionError, match="no directory can be created in /proc"):
        ligerzoo.hub.check_save_target("/proc/ligerzoo-test/out")
    ligerzoo.hub.check_save_target(tmp_path / "new" / "out")
    assert os.listdir(tmp_path) == []
    # save_hf's temporary names are short: any name the filesystem takes can be saved to
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    ligerzoo.hub.check_save_target(tmp_path / ("y" * longest))
    for call in (ligerzoo.hub.check_save_target, lambda p: ligerzoo.save_hf(ligerzoo.CausalLM(
            ligerzoo.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                 num_attention_heads=2)), p)):
        with pytest.raises(PermissionError, match="cannot save to .*File name too long"):
            call(tmp_path / ("y" * (longest + 1)))
    assert os.listdir(tmp_path) == []
    from tests.helpers import make_hf_llama

    make_hf_llama(tmp_path / "hf")
    ligerzoo.save_hf(ligerzoo.from_hf(tmp_path / "hf"), tmp_path / ("y" * longest))
    assert (tmp_path / ("y" * longest) / "config.json").is_file()


def test_an_empty_mount_point_is_filled_from_inside_a_full_one_refused(tmp_path, monkeypatch):
    """An existing empty directory (a container's output volume, a directory whose parent is
    not writable) is written from inside: the temporary directory is made in it and its files
    moved up, nothing created next to it. A non-empty mount point cannot be replaced by a
    rename (EBUSY, after the whole save): refused up front, by check_save_target too."""
    import os

    from tests.helpers import make_hf_llama

    make_hf_llama(tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf")
    mount = tmp_path / "volume"
    mount.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(mount) or real(p))
    ligerzoo.hub.check_save_target(mount)
    made = []
    real_mkdir = Path.mkdir
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (made.append(self), real_mkdir(self, *a, **k))[1])
    ligerzoo.save_hf(model, mount)
    assert [p.parent for p in made] == [mount]  # only the temporary directory, inside
    assert sorted(os.listdir(tmp_path)) == ["hf", "volume"]
    assert sorted(os.listdir(mount)) == sorted(os.listdir(tmp_path / "hf"))
    assert torch.equal(ligerzoo.from_hf(mount).embed.weight, model.embed.weight)
    for call in (lambda: ligerzoo.hub.check_save_target(mount, overwrite=True),
                 lambda: ligerzoo.save_hf(model, mount, overwrite=True)):
        with pytest.raises(PermissionError, match="is a non-empty mount point"):
            call()
    ligerzoo.save_hf(model, mount / "ckpt")  # a new directory inside it is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    ligerzoo.save_hf(model, ".")  # an empty working directory is filled from inside too
    assert (empty / "config.json").is_file() and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="working directory"):
        ligerzoo.save_hf(model, ".", overwrite=True)  # replacing it would pull it from under the process


def test_hub_id_brings_named_chat_templates_offline(tmp_path):
    """A repo id's named templates: resolve() asks the hub for additional_chat_templates/*.jinja
    with the other tokenizer files (checked with huggingface_hub's own pattern filter), and
    load_tokenizer on the id reads them (here from a pre-filled cache, offline)."""
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    from scripts.prepare_models import prepare_smollm2

    files = ["additional_chat_templates/tool_use.jinja", "chat_template.jinja", "tokenizer.json", "config.json",
             "model-00001-of-00002.safetensors", "original/consolidated.pth"]
    assert sorted(filter_repo_objects(files, allow_patterns=list(ligerzoo.hub.SIDE_PATTERNS))) == sorted(files[:4])

    commit, env = _prefilled_cache(tmp_path, "tiny-chat")
    snap = tmp_path / "cache" / "models--tiny-org--tiny-chat" / "snapshots" / commit
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(prepare_smollm2() / name, snap / name)
    (snap / "chat_template.jinja").write_text("DEFAULT{{ messages[0].content }}")
    (snap / "additional_chat_templates").mkdir()
    (snap / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS{{ messages[0].content }}")
    code = ("import ligerzoo; t = ligerzoo.load_tokenizer('tiny-org/tiny-chat'); print(sorted(t.chat_templates)); "
            "print(t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tools=[{}], tokenize=False))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["['default', 'tool_use']", "TOOLShi"]


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def test_save_refuses_parameters_unlike_the_config(tmp_path):
    """save_hf writes config.json from model.config, so the saved tensors must be the ones
    that config describes: a head untied (or tied) in code without changing the config,
    a vocabulary resized without updating vocab_size, adapter parameters left in, or a
    model that is not a CausalLM are refused before any file is written."""
    from torch import nn

    torch.manual_seed(0)
    model = ligerzoo.CausalLM(ligerzoo.ModelConfig(**SMALL, tie_word_embeddings=True))
    model.lm_head.weight = nn.Parameter(torch.randn_like(model.embed.weight))   # untied in code
    with pytest.raises(ValueError, match="tie_word_embeddings is True, but lm_head.weight is a separate"):
        ligerzoo.save_hf(model, tmp_path / "a")
    model.config.tie_word_embeddings = False                                     # as the message says
    ligerzoo.save_hf(model, tmp_path / "a")
    back = ligerzoo.from_hf(tmp_path / "a")
    torch.testing.assert_close(back.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
    assert back.lm_head.weight is not back.embed.weight

    model = ligerzoo.CausalLM(ligerzoo.ModelConfig(**SMALL))
    model.lm_head.weight = model.embed.weight                                    # tied in code
    with pytest.raises(ValueError, match="tie_word_embeddings is False, but lm_head.weight is embed.weight"):
        ligerzoo.save_hf(model, tmp_path / "b")

    model = ligerzoo.CausalLM(ligerzoo.ModelConfig(**SMALL))
    model.embed, model.lm_head = nn.Embedding(70, 32), nn.Linear(32, 70, bias=False)   # vocab resized
    with pytest.raises(ValueError, match=re.escape("embed.weight (70, 32) (the config gives (64, 32))")):
        ligerzoo.save_hf(model, tmp_path / "c")
    model.config.vocab_size = 70
    ligerzoo.save_hf(model, tmp_path / "c")
    assert ligerzoo.from_hf(tmp_path / "c").embed.weight.shape == (70, 32)

    model = ligerzoo.CausalLM(ligerzoo.ModelConfig(**SMALL))
    model.layers[0].attn.lora_A = nn.Parameter(torch.zeros(4, 32))               # an adapter left in
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.lora_A .*merge adapters"):
        ligerzoo.save_hf(model, tmp_path / "d")
    with pytest.raises(TypeError, match="expects a ligerzoo CausalLM"):
        ligerzoo.save_hf(nn.Linear(2, 2), tmp_path / "e")
    for tied in (False, True):   # a wrapped head renames lm_head.weight: an adapter, not a tie
        model = ligerzoo.CausalLM(ligerzoo.ModelConfig(**SMALL, tie_word_embeddings=tied))
        model.lm_head = _Wrapped(model.lm_head)
        with pytest.raises(ValueError, match=r"lm_head\.lora_A.*merge adapters"):
            ligerzoo.save_hf(model, tmp_path / "f")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]


class _Wrapped(torch.nn.Module):
    """A head wrapper as peft's LoRA layers are built (the base layer kept as ``base_layer``)."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Parameter(torch.zeros(2, base.in_features))

    def forward(self, x):
        return self.base_layer(x)


def test_save_refusal_names_the_fields_as_written(tmp_path):
    """A Mistral built in code with a window but no sliding layer types cannot be written (its
    config.json would slide every layer): the message names layer_types, the field that differs."""
    cfg = ligerzoo.ModelConfig(model_type="mistral", **SMALL, sliding_window=16)
    with pytest.raises(ValueError, match=r"layer_types=None \(read back as \['sliding_attention'") as err:
        ligerzoo.save_hf(ligerzoo.CausalLM(cfg), tmp_path / "out")
    assert "sliding_window" not in str(err.value)


def test_pickled_weights_and_bad_shard_sizes_are_named(tmp_path):
    """A directory holding only pytorch_model.bin is refused with a hint that pickled weights
    are not read (and how to convert them); a max_shard_size that is not a size is refused
    by save_hf with the value it got, before any file is written."""
    make_hf_llama(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin: pickled PyTorch weights"):
        ligerzoo.from_hf(tmp_path / "hf")
    (tmp_path / "hf" / "pytorch_model.bin").rename(tmp_path / "hf" / "training_args.bin")   # a trainer's files
    (tmp_path / "hf" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="optimizer.pt") as err:
        ligerzoo.from_hf(tmp_path / "hf")
    assert "pickled PyTorch weights" not in str(err.value)
    model = ligerzoo.CausalLM(ligerzoo.ModelConfig(**SMALL))
    # None used to raise a TypeError; 0, -1, "0KB" and 1.5 were taken as one tensor per shard
    for bad in ("lots", None, 0, -1, 1.5, True, "0KB"):
        with pytest.raises(ValueError, match=f"max_shard_size must be a positive byte count.*{bad!r}"):
            ligerzoo.save_hf(model, tmp_path / "out", max_shard_size=bad)
        assert not (tmp_path / "out").exists()
    import numpy as np

    for i, good in enumerate((10**6, np.int64(10**6), 1e6, "1MB")):            # byte counts, whole floats
        ligerzoo.save_hf(model, tmp_path / f"out{i}", max_shard_size=good)


def test_numpy_and_tensor_scalars_in_configs_and_modules():
    """Sizes and epsilons given as numpy or 0-dim tensor scalars are accepted, as torch's
    modules accept them (the checks added in session 19 first refused them)."""
    import numpy as np

    import ligerzoo.nn as lnn

    cfg = ligerzoo.ModelConfig(**SMALL, rms_norm_eps=np.float32(1e-5))
    assert type(cfg.rms_norm_eps) is float and cfg.rms_norm_eps == float(np.float32(1e-5))
    assert ligerzoo.ModelConfig(**SMALL, rms_norm_eps=torch.tensor(1e-6)).rms_norm_eps == pytest.approx(1e-6)
    mlp = lnn.SwiGLUMLP(np.int64(8), torch.tensor(12))
    assert (mlp.hidden_size, mlp.intermediate_size) == (8, 12) and mlp.w_gate_up.weight.shape == (24, 8)
    assert lnn.Embedding(np.int32(10), np.int64(4)).weight.shape == (10, 4)


def test_checkpoints_transformers_loads_load_the_same(tmp_path):
    """Layouts transformers 5.x loads into its causal-LM class load here with the same logits:
    a tied checkpoint that stores only lm_head.weight (the embedding is that tensor), a
    config.json without a dtype (the stored tensors' dtype, as dtype="auto"), a base model's
    keys without the "model." prefix (LlamaModel.save_pretrained), and RoPE inv_freq buffers
    anywhere. A stored tied head also loads onto the meta device."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaModel

    from tests.helpers import TINY_LLAMA

    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 7))

    def same_as_transformers(path, dtype=torch.float32):
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        ours = ligerzoo.from_hf(path)
        assert ours.embed.weight.dtype == hf.dtype == dtype
        assert torch.equal(ours.embed.weight, hf.model.embed_tokens.weight)
        assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
        if dtype == torch.float32:  # (two bf16 computations differ by their roundings)
            with torch.no_grad():
                torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
        return ours

    tied = tmp_path / "tied"
    make_hf_llama(tied, tie_word_embeddings=True)
    tensors = load_file(tied / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    tensors["model.rotary_emb.inv_freq"] = torch.ones(6)
    save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    ours = same_as_transformers(tied)
    assert ours.lm_head.weight is ours.embed.weight and torch.equal(ours.embed.weight, tensors["lm_head.weight"])
    meta = ligerzoo.from_hf(tied, device="meta")
    assert meta.embed.weight.is_meta
    meta.to_empty(device="cpu")  # replaces Parameters one module at a time: the head comes apart
    with pytest.raises(ValueError, match=r"call model.tie_weights\(\) before loading"):
        ligerzoo.hub.load_weights(meta, tied)
    meta.tie_weights()
    ligerzoo.hub.load_weights(meta, tied)
    assert meta.lm_head.weight is meta.embed.weight and torch.equal(meta.embed.weight, ours.embed.weight)

    bf16 = tmp_path / "bf16"
    make_hf_llama(bf16, dtype=torch.bfloat16)
    cfg = json.loads((bf16 / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (bf16 / "config.json").write_text(json.dumps(cfg))
    same_as_transformers(bf16, torch.bfloat16)

    base = tmp_path / "base"
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(**(TINY_LLAMA | {"tie_word_embeddings": True}))).save_pretrained(base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(cfg | {"architectures": ["LlamaForCausalLM"]}))
    assert not any(k.startswith("model.") for k in load_file(base / "model.safetensors"))
    same_as_transformers(base)
    untied = tmp_path / "untied"
    shutil.copytree(base, untied)
    (untied / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="missing tensor.*lm_head.weight"):  # transformers would draw it at random
        ligerzoo.from_hf(untied)


def test_save_paths_and_dtypes_as_transformers(tmp_path):
    """".." in the path is resolved before saving (it used to fail at the final rename after
    writing everything); a place where nothing can be created gives save_hf the
    PermissionError check_save_target gives; without ``dtype`` each tensor keeps its own
    dtype (fp32 norms of a bf16 model stay fp32, as transformers saves them)."""
    import sys

    make_hf_llama(tmp_path / "hf")
    model = ligerzoo.from_hf(tmp_path / "hf").to(torch.bfloat16)
    model.norm.float()
    ligerzoo.save_hf(model, tmp_path / "new" / "sub" / "..")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "new"]  # (transformers also leaves new/sub)
    saved = load_file(tmp_path / "new" / "model.safetensors")
    assert saved["model.norm.weight"].dtype == torch.float32 and torch.equal(saved["model.norm.weight"], model.norm.weight)
    assert saved["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "new" / "config.json").read_text())["dtype"] == "bfloat16"
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    ligerzoo.save_hf(model, tmp_path / "link" / ".." / "ckpt")  # through the link first, then up: real/ckpt
    assert (tmp_path / "real" / "ckpt" / "config.json").is_file() and not (tmp_path / "ckpt").exists()
    assert torch.equal(ligerzoo.from_hf(tmp_path / "link" / ".." / "ckpt").embed.weight, model.embed.weight)
    ligerzoo.save_hf(model, tmp_path / "cast", dtype=torch.float16)
    assert {t.dtype for t in load_file(tmp_path / "cast" / "model.safetensors").values()} == {torch.float16}
    if sys.platform.startswith("linux"):
        with pytest.raises(PermissionError, match="no directory can be created in /proc"):
            ligerzoo.save_hf(model, "/proc/ligerzoo-test")


def test_default_dtype_of_a_checkpoint_without_one_is_the_first_shards_as_transformers(tmp_path):
    """Without a config dtype, transformers takes the dtype of the first shard by name; so
    does from_hf (shards of different dtypes, the index naming another one first)."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "hf"
    make_hf_llama(src, save_kwargs=dict(max_shard_size="40KB"))
    cfg = json.loads((src / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (src / "config.json").write_text(json.dumps(cfg))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    for i, shard in enumerate(shards):
        tensors = load_file(src / shard)
        save_file({k: v.to(torch.bfloat16 if i == 0 else torch.float16) for k, v in tensors.items()}, src / shard,
                  metadata={"format": "pt"})
    index["weight_map"] = dict(sorted(index["weight_map"].items(), key=lambda kv: kv[1] == shards[0]))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))  # the first shard named last
    assert AutoModelForCausalLM.from_pretrained(src).dtype == ligerzoo.from_hf(src).embed.weight.dtype == torch.bfloat16


def test_save_refuses_a_config_edited_after_the_model_was_built(tmp_path):
    """RoPE tables, attention scale and softcap, layer types, the activation, the RMSNorms' eps
    and offset and the experts' top-k and jitter are fixed when the model is built: a later edit of model.config (rope_theta, a YaRN rope_scaling for a
    long-context fine-tune) would make config.json describe another model, so save_hf refuses
    it; a model built from the edited config saves, and transformers runs it as ligerzoo does."""
    from ligerzoo.models.config import ModelConfig

    kw = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = ligerzoo.CausalLM(ModelConfig(**kw))
    for field, value, match in (("rope_theta", 1e6, "RoPE"),
                                ("rope_scaling", {"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 16}, "RoPE"),
                                ("hidden_act", "gelu_pytorch_tanh", "activation"),
                                ("rms_norm_eps", 0.5, "RMSNorms"),      # (session 26: were saved)
                                ("norm_offset", 1.0, "RMSNorms")):
        before = getattr(model.config, field)
        setattr(model.config, field, value)
        with pytest.raises(ValueError, match=f"changed after the model was built.*{match}"):
            ligerzoo.save_hf(model, tmp_path / field)
        assert not (tmp_path / field).exists()
        setattr(model.config, field, before)
    config = dataclasses.replace(model.config, rope_theta=1e6)
    rebuilt = ligerzoo.CausalLM(config)
    rebuilt.load_state_dict(model.state_dict())
    _saved_runs_in_transformers(rebuilt, tmp_path / "rebuilt", 40)
    moe = ligerzoo.CausalLM(ModelConfig(**{**kw, "model_type": "mixtral"}, num_local_experts=4))
    for field, value in (("num_experts_per_tok", 1), ("router_jitter_noise", 0.1)):
        before = getattr(moe.config, field)
        setattr(moe.config, field, value)
        with pytest.raises(ValueError, match="changed after the model was built.*experts"):
            ligerzoo.save_hf(moe, tmp_path / field)
        setattr(moe.config, field, before)


def test_a_longrope_model_keeps_its_built_tables_when_its_config_is_edited(tmp_path):
    """Phi3's LongRoPE: the forward picks its table by the length fixed at build, not by a
    later config.rope_scaling (cleared, it used to raise a bare TypeError); save_hf refuses such
    an edit, and a partial_rotary_factor edit (whose factor lists no longer fit: a raw
    broadcasting error before), with its ValueError; an empty sequence gives (B, 0, V) logits
    like every other family (max() of no positions raised)."""
    from ligerzoo.models.config import ModelConfig

    config = ModelConfig(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, partial_rotary_factor=0.5,
                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5],
                                       "long_factor": [2.0, 4.0], "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    model = ligerzoo.CausalLM(config)
    ids = torch.randint(0, 64, (2, 20))  # past 16 positions: the long table
    with torch.no_grad():
        want = model(ids).logits
        assert model(ids[:, :0]).logits.shape == (2, 0, 64)
        scaling = model.config.rope_scaling
        model.config.rope_scaling = None
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)
    for field, value in (("rope_scaling", None), ("partial_rotary_factor", 1.0)):
        model.config.rope_scaling, model.config.partial_rotary_factor = scaling, 0.5
        setattr(model.config, field, value)
        with pytest.raises(ValueError, match="changed after the model was built.*RoPE"):
            ligerzoo.save_hf(model, tmp_path / field)
        assert not (tmp_path / field).exists()


def test_configs_built_in_code_name_their_rope_type_and_activation_as_transformers(tmp_path):
    """A rope_scaling copied from a 4.x config.json ("type") is read as its rope_type (it used
    to run the default RoPE silently); one without a type is refused; "gelu_tanh" is stored as
    transformers' "gelu_pytorch_tanh", so the saved config.json loads in transformers."""
    from ligerzoo.models.config import ModelConfig
    from ligerzoo.models.transformer import rope_inv_freq

    kw = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4)
    legacy = ModelConfig(**kw, rope_scaling={"type": "linear", "factor": 4.0})
    named = ModelConfig(**kw, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert legacy.rope_scaling == named.rope_scaling
    assert torch.equal(rope_inv_freq(legacy)[0], rope_inv_freq(named)[0])
    assert not torch.equal(rope_inv_freq(legacy)[0], rope_inv_freq(ModelConfig(**kw))[0])
    with pytest.raises(ValueError, match="needs a 'rope_type'"):
        ModelConfig(**kw, rope_scaling={"factor": 4.0})
    torch.manual_seed(0)
    model = ligerzoo.CausalLM(ModelConfig(**kw, hidden_act="gelu_tanh"))
    assert model.config.hidden_act == "gelu_pytorch_tanh"
    _saved_runs_in_transformers(model, tmp_path / "g", 9)


def test_an_unedited_qwen2_with_any_sliding_layers_saves_its_own_config(tmp_path):
    """A Qwen2 config.json whose layer_types slide on layers that are not a suffix (which the
    family's writer cannot produce from max_window_layers) loads as transformers runs it, and an
    unedited model saves the original file back (save_hf used to generate first and refuse)."""
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=7, layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "src")
    model = ligerzoo.from_hf(tmp_path / "src", dtype=torch.float32)
    ligerzoo.save_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"] == cfg.layer_types
    _saved_runs_in_transformers(model, tmp_path / "out", 20)


def test_tokenizer_files_follow_a_relative_source_dir_across_chdir(tmp_path, monkeypatch):
    """A model loaded from a relative path keeps its source as an absolute path, so save_hf copies
    the tokenizer files from there even after the working directory changed (a review found
    them silently left out); a source directory that is gone gets a warning, not silence."""
    make_hf_llama(tmp_path / "work" / "ckpt")
    (tmp_path / "work" / "ckpt" / "tokenizer_config.json").write_text('{"model_max_length": 7}\n')
    (tmp_path / "elsewhere" / "ckpt").mkdir(parents=True)  # a decoy with the same relative name
    (tmp_path / "elsewhere" / "ckpt" / "tokenizer_config.json").write_text('{"decoy": true}\n')
    monkeypatch.chdir(tmp_path / "work")
    model = ligerzoo.from_hf("ckpt")
    assert model.source_dir == tmp_path / "work" / "ckpt" and model.source_dir.is_absolute()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ligerzoo.save_hf(model, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 7}\n'

    shutil.rmtree(tmp_path / "work" / "ckpt")
    with pytest.warns(UserWarning, match="is not a directory .* so its tokenizer and chat-template files are not copied") \
            as record:
        ligerzoo.save_hf(model, tmp_path / "out2")
    assert record[0].filename == __file__  # the caller's line, not the package's
    # the generation settings the model holds in memory are still written; the tokenizer files are not
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((tmp_path / "out2" / "generation_config.json").read_text()) == model.generation_config


def test_source_dir_after_a_link_and_dotdot_is_where_the_weights_were_read(tmp_path, monkeypatch):
    """In "link/../ckpt" the OS goes up from the link's target, so the tokenizer files must come
    from there too, not from the directory a textual ".." removal names (a review's case)."""
    make_hf_llama(tmp_path / "real" / "ckpt")
    (tmp_path / "real" / "ckpt" / "tokenizer_config.json").write_text('{"tag": "real"}\n')
    (tmp_path / "real" / "deep").mkdir()
    (tmp_path / "work" / "ckpt").mkdir(parents=True)   # what "link/../ckpt" would be as text
    (tmp_path / "work" / "ckpt" / "tokenizer_config.json").write_text('{"tag": "decoy"}\n')
    (tmp_path / "work" / "link").symlink_to(tmp_path / "real" / "deep")
    monkeypatch.chdir(tmp_path / "work")
    model = ligerzoo.from_hf("link/../ckpt")
    assert model.source_dir.is_absolute() and model.source_dir.resolve() == (tmp_path / "real" / "ckpt").resolve()
    monkeypatch.chdir(tmp_path)
    ligerzoo.save_hf(model, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"tag": "real"}\n'


def test_revision_with_a_local_directory_warns(tmp_path):
    """A revision only selects a version of a hub repo; given with a local directory (or one that
    shadows a repo id of the same name) it cannot apply, so the user is told rather than left to
    believe that version was loaded."""
    make_hf_llama(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match=r"revision='v2' is ignored: .* is a local directory") as record:
        ligerzoo.from_hf(tmp_path / "ckpt", revision="v2")
    assert record[0].filename == __file__  # points at the caller's line
    with pytest.warns(UserWarning, match="is ignored") as record:
        ligerzoo.hub.resolve(tmp_path / "ckpt", "v2")   # the public helper itself, too
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ligerzoo.from_hf(tmp_path / "ckpt")  # no revision: no warning
