"""Hugging Face checkpoints in and out: ``from_hf`` and ``save_hf``.

Files come from a local directory or the hub (``huggingface_hub.snapshot_download``, which
honours ``HF_HUB_OFFLINE``, the cache and tokens). Tensors are read one at a time from the
shards the index names (never a glob) into a model built on the meta device, so host
memory peaks near one tensor, not a second copy of the model. Saving writes safetensors
shards planned by ``huggingface_hub.split_torch_state_dict_into_shards`` into a temporary
directory that is renamed into place only when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ligerzoo._checks import any_dtensor, fsdp_modules, is_int, quiet, warn_user
from ligerzoo.models import CausalLM, family
from ligerzoo.models.config import ModelConfig, dtype_from_str, with_dtype
from ligerzoo.models.keymap import KeyMap, Slot

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Files copied next to the weights on save when the model came from an HF directory.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
    "added_tokens.json",
)
# Named chat templates (<name>.jinja) beside chat_template.jinja, as transformers saves them;
# copied on save with the side files.
TEMPLATE_DIR = "additional_chat_templates"
# What resolve() fetches before the weights: every JSON file, the side files, named templates.
SIDE_PATTERNS = ("*.json", *SIDE_FILES, f"{TEMPLATE_DIR}/*.jinja")


def resolve(id_or_dir: str | os.PathLike, revision: str | None = None, weights: bool = True) -> Path:
    """A local directory holding ``id_or_dir``'s checkpoint.

    A path to an existing directory is returned as is (a ``revision`` given with it is ignored,
    with a warning). Anything else is a hub repo id,
    fetched with ``huggingface_hub.snapshot_download`` in two steps: the JSON and tokenizer
    files, then (when ``weights``) only the weight files that the index (or the single-file
    layout) names.

    Raises:
        FileNotFoundError: a local-looking path that does not exist, or a repo that is
            neither cached nor reachable (e.g. with ``HF_HUB_OFFLINE=1``).
        ValueError: the repo's ``model.safetensors.index.json`` is not valid JSON or has no
            ``weight_map``.
    """
    return _resolve(id_or_dir, revision, weights)


def _resolve(id_or_dir: str | os.PathLike, revision: str | None, weights: bool) -> Path:
    """:func:`resolve`'s body, for it and the public loaders to call."""
    path = Path(id_or_dir).expanduser()
    if path.is_dir():
        if revision is not None:  # also catches a local directory that shadows a repo id of that name
            warn_user(f"revision={revision!r} is ignored: {str(id_or_dir)!r} is a local directory, which "
                      "is read as it is (a revision selects a version of a hub repo id)")
        return path
    text = str(id_or_dir)
    if path.exists() or text.startswith((".", "/", "~")) or text.endswith("/") or text.count("/") > 1:
        raise FileNotFoundError(f"{text!r} is not a checkpoint directory (and not a hub repo id 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        snap = Path(snapshot_download(text, revision=revision, allow_patterns=list(SIDE_PATTERNS)))
        if not weights:
            return snap
        index = snap / INDEX_FILE
        weights = sorted(set(_weight_map(index).values())) if index.exists() else [SINGLE_FILE]
        return Path(snapshot_download(text, revision=revision, allow_patterns=weights))
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as e:
        at = f" at revision {revision!r}" if revision is not None else ""
        raise FileNotFoundError(
            f"could not resolve {text!r}{at}: not a local directory, and the hub snapshot is not available "
            f"({type(e).__name__}: {e})") from e


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; a ValueError naming the file when it is not one."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def _weight_map(index: Path) -> dict:
    """The ``weight_map`` (tensor name -> shard file) of the index file ``index``."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no \"weight_map\" object (tensor name -> shard file)")
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{index}: \"weight_map\" must map tensor names to shard file names, got "
                         f"{bad[0][0]!r}: {bad[0][1]!r}")
    return weight_map


def _absent(directory: Path, name: str) -> str:
    """How ``name`` in ``directory`` is absent: missing, or a link whose target is missing (a
    hub cache's blob not downloaded, say)."""
    path = directory / name
    return f"{name} (a link to the missing {os.readlink(path)})" if path.is_symlink() else name


def read_config(directory: Path) -> dict:
    """The config.json of checkpoint directory ``directory``, as a dict.

    Raises:
        FileNotFoundError: no config.json (or a link to a missing file).
        ValueError: config.json is not valid JSON or not a JSON object.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}" if not path.is_symlink()
                                else f"{_absent(Path(directory), CONFIG_FILE)} in {directory}")
    return _read_json(path)


def weight_files(directory: Path) -> list[str]:
    """The safetensors files of the checkpoint in ``directory``, as transformers picks them:
    model.safetensors when there is one (even next to an index), else the shards
    model.safetensors.index.json names, sorted by name (transformers' order: its default
    dtype comes from the first).

    Raises:
        FileNotFoundError: no model.safetensors and no index, or a shard the index names is
            absent (or a link to a missing file).
        ValueError: an index that is not valid JSON or has no ``weight_map`` of file names.
    """
    directory = Path(directory)
    index = directory / INDEX_FILE
    if (directory / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    if index.is_file():
        files = sorted(set(_weight_map(index).values()))
        absent = [_absent(directory, f) for f in files if not (directory / f).is_file()]
        if absent:
            raise FileNotFoundError(f"{INDEX_FILE} in {directory} names shard(s) that are missing: {', '.join(absent)}")
        return files
    if (directory / SINGLE_FILE).is_symlink() or index.is_symlink():
        links = [_absent(directory, n) for n in (INDEX_FILE, SINGLE_FILE) if (directory / n).is_symlink()]
        raise FileNotFoundError(f"no readable weights in {directory}: {', '.join(links)}")
    present = sorted(p.name for p in directory.iterdir())
    legacy = [n for n in present if re.fullmatch(r"(pytorch_model|model|consolidated)[\w.-]*\.(bin|pt|pth)", n)]
    hint = (f" ({', '.join(legacy)}: pickled PyTorch weights, which from_hf does not read; convert them to "
            f"safetensors, e.g. load with transformers and save_pretrained(..., safe_serialization=True))"
            if legacy else "")
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {directory}; it holds: {present}{hint}")


def _check_coverage(params: dict[str, torch.Tensor], km: KeyMap) -> None:
    """Every row of every parameter is filled by exactly one slot (else a family map is wrong)."""
    rows: dict[tuple[str, int | None], list[tuple[int, int]]] = {}
    for slot in km.slots.values():
        n = slot.view(params[slot.param]).shape[0] if slot.start is None else slot.stop
        rows.setdefault((slot.param, slot.expert), []).append((0, n) if slot.start is None else (slot.start, slot.stop))
    for name, p in params.items():
        experts = [e for (n, e) in rows if n == name]
        if experts != [None] and sorted(experts) != list(range(p.shape[0])):
            raise RuntimeError(f"internal error: the key map does not cover parameter {name}")
        for e in experts:
            spans, pos = sorted(rows[(name, e)]), 0
            for a, b in spans:
                if a != pos:
                    break
                pos = b
            if pos != (p if e is None else p[e]).shape[0]:
                raise RuntimeError(f"internal error: the key map does not cover parameter {name} exactly: {spans}")


def _named_params(model) -> dict[str, torch.Tensor]:
    """Parameters by their plain names, looking through torch.compile and activation
    checkpointing wrappers (``_orig_mod.``, ``._checkpoint_wrapped_module``)."""
    return {n.replace("_orig_mod.", "").replace("._checkpoint_wrapped_module", ""): p
            for n, p in model.named_parameters()}


def _listing(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _open(directory: Path, file: str):
    try:
        return safe_open(str(Path(directory) / file), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors' own error type for a bad header
        raise ValueError(f"cannot read {Path(directory) / file} as safetensors (truncated or not a "
                         f"safetensors file?): {e}") from e


def _file_tensors(directory: Path, km: KeyMap):
    """(where, key, shape, read) for every tensor of every file of the checkpoint in
    ``directory`` (all of a shard's tensors, listed in the index or not, as transformers
    reads them), reading nothing until ``read()`` is called. A base model's checkpoint
    (``LlamaModel``: keys without the ``model.`` prefix) gets the prefix, as transformers
    loads one into its causal-LM class."""
    files = weight_files(directory)
    keys = {}
    for file in files:
        with _open(directory, file) as f:
            keys[file] = list(f.keys())
    prefix = _base_model_prefix([k for ks in keys.values() for k in ks], km)
    for file in files:
        with _open(directory, file) as f:
            for key in keys[file]:
                name = prefix + key if prefix and not key.startswith("lm_head.") else key
                yield file, name, tuple(f.get_slice(key).get_shape()), (lambda k=key: f.get_tensor(k))


def _base_model_prefix(keys: list[str], km: KeyMap) -> str:
    """"model." when ``keys`` are a base model's (no key of ``km`` present as is, but its
    decoder keys without their "model." prefix), else ""."""
    expected = {k for k in (*km.slots, *km.alternatives) if not k.startswith("lm_head.")}
    if any(k in expected for k in keys):
        return ""
    base = {k[len("model."):] for k in expected if k.startswith("model.")}
    return "model." if any(k in base for k in keys) else ""


@torch.no_grad()
def _load(model: CausalLM, km: KeyMap, tensors, source: str, missing_hint=None) -> None:
    """Copy ``tensors`` ((where, key, shape, read) items) into their slots of ``model``;
    ``missing_hint(missing keys)`` adds to the error for missing tensors (e.g. the index's
    part in it)."""
    params = _named_params(model)
    if model.config.tie_word_embeddings and "lm_head.weight" in params:
        raise ValueError("model.config.tie_word_embeddings is True, but lm_head.weight is a separate tensor from "
                         "embed.weight (as after to_empty, which replaces Parameters one module at a time): call "
                         "model.tie_weights() before loading")
    _check_coverage(params, km)
    seen: set[str] = set()
    unexpected: list[str] = []
    alternatives_seen: list[Slot] = []
    written: list[tuple[str, Slot, str]] = []
    duplicates: list[tuple[str, tuple, torch.Tensor]] = []
    for where, key, shape, read in tensors:
        slot = km.slots.get(key)
        if slot is None and key in km.alternatives:
            slot = km.alternatives[key]
            alternatives_seen.append(slot)
        if slot is None:
            if key in km.duplicates:
                duplicates.append((key, shape, read()))  # compared once everything is loaded
            elif not km.ignored(key):
                unexpected.append(key)
            continue
        clash = next(((k, w) for k, s, w in written if s.overlaps(slot)), None)
        if clash is not None and clash[0] == key:
            raise ValueError(f"{source} stores {key!r} twice (in {clash[1]} and {where}); keep one")
        if clash is not None:
            raise ValueError(f"{source} holds {key!r} and {clash[0]!r}, two copies of the same weights "
                             f"(e.g. two checkpoint layouts mixed); keep one")
        written.append((key, slot, where))
        target = slot.view(params[slot.param])
        if shape != tuple(target.shape):
            raise ValueError(
                f"tensor {key!r} in {where} has shape {shape}, but the config expects "
                f"{tuple(target.shape)} (check config.json against the weights)")
        tensor = read()
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {key!r} in {where} is {tensor.dtype}, expected a float dtype "
                             f"(quantized or integer weights are not supported)")
        target.copy_(tensor)
        seen.add(key)
    for key, shape, tensor in duplicates:  # e.g. a tied head stored anyway: must be the same tensor
        slot = km.duplicates[key]
        target = slot.view(params[slot.param])
        if shape != tuple(target.shape):
            raise ValueError(f"tensor {key!r} in {source} has shape {shape}, but the config expects "
                             f"{tuple(target.shape)} (check config.json against the weights)")
        primary = next((k for k, s in km.slots.items() if s == slot), None)
        if primary is not None and primary not in seen:  # only the copy is stored (a tied head): it is the weight
            if not tensor.is_floating_point():
                raise ValueError(f"tensor {key!r} in {source} is {tensor.dtype}, expected a float dtype "
                                 f"(quantized or integer weights are not supported)")
            target.copy_(tensor)
            seen.add(primary)
            continue
        if target.is_meta:  # nothing loaded to compare with
            continue
        if not torch.equal(tensor.to(params[slot.param].dtype), target.cpu()):
            raise ValueError(f"{source}: config.json ties {key!r} to {slot.param!r} (tie_word_embeddings), but the "
                             f"stored {key!r} differs from it; set tie_word_embeddings to false for separate weights")
    missing = {k for k, s in km.slots.items() if k not in seen and not any(a.covers(s) for a in alternatives_seen)}
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing tensor(s): {_listing(missing)}{missing_hint(missing) if missing_hint else ''}")
        if unexpected:
            parts.append(f"unexpected tensor(s) this {model.config.model_type} config does not use: {_listing(unexpected)}")
        raise ValueError(f"{source} does not match its config: " + "; ".join(parts))


def load_weights(model: CausalLM, directory: Path, km: KeyMap | None = None) -> None:
    """Copy every tensor of the checkpoint in ``directory`` into its slot of ``model``.

    ``km`` defaults to the key map of ``model.config``'s family.

    Raises:
        ValueError: a tensor whose shape disagrees with the config (naming the tensor and
            both shapes), a non-float tensor, tensors the config does not expect, expected
            tensors that no shard holds (naming them), two layouts of the same weights, a
            stored tied head that differs from the embedding, an index without a valid
            ``weight_map``, a shard that is not readable safetensors, or a model whose config
            ties the head but whose head is untied (call ``model.tie_weights()`` first).
        FileNotFoundError: no weights, or a shard the index names is missing.
    """
    km = km or family(model.config.model_type).key_map(model.config)
    _load(model, km, _file_tensors(directory, km), f"checkpoint {directory}",
          lambda missing: _index_hint(Path(directory), missing))


def _index_hint(directory: Path, missing: set[str]) -> str:
    """Where a sharded checkpoint's index went wrong for ``missing`` tensors: those it puts in
    a shard that does not hold them, and the safetensors files it does not name (never read,
    as transformers reads only the named shards); "" when the directory has no index in use."""
    index = directory / INDEX_FILE
    if (directory / SINGLE_FILE).is_file() or not index.is_file():
        return ""
    weight_map = _weight_map(index)

    def entry(key: str) -> str | None:  # the index's name of a missing key (a base model's lacks "model.")
        base = key[len("model."):] if key.startswith("model.") else None
        return key if key in weight_map else base if base in weight_map else None

    entries = {k: entry(k) for k in missing}
    parts = []
    misplaced = sorted(e for e in entries.values() if e is not None)
    if misplaced:
        shown = ", ".join(f"{e} in {weight_map[e]}" for e in misplaced[:6])
        more = f" ... and {len(misplaced) - 6} more" if len(misplaced) > 6 else ""
        parts.append(f"{INDEX_FILE} lists {shown}{more}, which "
                     f"{'does not hold it' if len(misplaced) == 1 else 'do not hold them'}")
    unlisted = sorted(k for k, e in entries.items() if e is None)
    if unlisted:
        parts.append(f"{INDEX_FILE} does not list {_listing(unlisted, 6)}")
    named = {os.path.normpath(v) for v in weight_map.values()}  # "./model-00001-of-00002.safetensors" too
    unread = sorted(p.name for p in directory.glob("*.safetensors") if p.name not in named)
    if unread:
        parts.append(f"{_listing(unread, 6)} in the directory {'is' if len(unread) == 1 else 'are'} not named by "
                     f"the index, so {'it was' if len(unread) == 1 else 'they were'} not read")
    return " (" + "; ".join(parts) + ")" if parts else ""


def load_hf_state_dict(model: CausalLM, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy an in-memory state dict with HF names (e.g. ``transformers_model.state_dict()``)
    into ``model``, with the same checks as ``from_hf`` (shapes, missing, unexpected).

    Raises:
        ValueError: as :func:`load_weights` (wrong shapes, non-float, missing or unexpected
            tensors, a tied head that differs from the embedding).
    """
    km = family(model.config.model_type).key_map(model.config)
    items = (("state_dict", k, tuple(v.shape), (lambda v=v: v)) for k, v in state_dict.items())
    _load(model, km, items, "state_dict")


def _usable_device(device: torch.device | str | int | None) -> torch.device:
    """``device`` (default CPU) as a torch.device, checked by allocating nothing on it there:
    ValueError naming it when torch cannot (no such device type, no GPU, an index past the
    machine's), before any file is read."""
    try:
        device = torch.device("cpu" if device is None else device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ImportError) as e:  # torch raises each, by cause
        first = (str(e).strip().splitlines() or [""])[0]  # CUDA's errors run on for lines
        raise ValueError(f"device={str(device)!r} cannot be used on this machine ({type(e).__name__}: {first})") from e
    return device


def from_hf(id_or_dir: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
            device: torch.device | str | None = None, revision: str | None = None) -> CausalLM:
    """Load an HF causal-LM checkpoint (local dir or hub id) into a ligerzoo model.

    Args:
        id_or_dir: a directory with config.json and safetensors weights, or a hub repo id.
        dtype: parameter dtype; default the checkpoint's: config ``dtype``/``torch_dtype``,
            else the first floating-point tensor's (as transformers' ``dtype="auto"``),
            else float32.
        device: where the parameters live (default CPU).
        revision: hub revision (branch, tag or commit) when ``id_or_dir`` is a repo id;
            ignored, with a warning, for a local directory.

    Returns:
        ``CausalLM`` in eval mode, as transformers' ``from_pretrained`` returns it (call
        ``model.train()`` before training: Mixtral's router jitter noise is the one part that
        depends on the mode), with ``model.config`` read from config.json and
        ``model.source_dir`` the directory it came from, made absolute (``..`` kept for the OS
        to resolve; save_hf copies tokenizer and generation files from it) and
        ``model.generation_config`` its generation_config.json (a dict, {} without one;
        ``generate``'s default eos ids come from it).

    Raises:
        ValueError: unknown ``model_type`` (listing the supported ones), a config field the
            family cannot express (an activation, a rope type, a ``quantization_config``)
            or an invalid one (see :class:`ModelConfig`), a ``dtype`` other than float64 /
            float32 / bfloat16 / float16, tensors missing, unexpected, of the wrong shape
            or not floating point, a config.json / index that is not valid JSON, or a
            ``device`` this machine cannot allocate on (e.g. "cuda" without a GPU).
        FileNotFoundError: no such directory/repo, no config.json, a missing shard.
    """
    device = _usable_device(device)
    directory = _resolve(id_or_dir, revision, True)
    hf = read_config(directory)
    config = family(hf.get("model_type")).config_from_hf(hf)
    dtype = dtype_from_str(dtype) or config.dtype or _stored_dtype(directory) or torch.float32
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    load_weights(model, directory)
    # absolute, so save_hf finds it from another working directory; pathlib keeps ".." for the OS
    # to resolve (after a link, os.path.abspath's textual ".." would name another directory)
    model.source_dir = Path(directory).absolute()
    model.generation_config = _read_generation_config(Path(directory))
    return model.eval()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _stored_dtype(directory: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor of the checkpoint's first file (None
    when it has none of float64 / float32 / bfloat16 / float16), read from its header."""
    with _open(directory, weight_files(directory)[0]) as f:
        for key in f.keys():
            dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return None


def _read_generation_config(directory: Path, warn: bool = True) -> dict:
    """generation_config.json as a dict ({} when absent); a file that is not a JSON object is
    skipped with a warning, as transformers falls back to the model config then."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return _read_json(path)
    except ValueError as e:
        if warn:
            warn_user(f"ignoring {path}: {e}")
        return {}


def save_hf(model: CausalLM, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
            dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as an HF checkpoint directory that ``transformers`` loads unchanged.

    Writes config.json (the family's HF schema; the one the model was loaded from, with the
    dtype updated), safetensors shards of at most ``max_shard_size`` plus
    ``model.safetensors.index.json`` when there is more than one, tied heads omitted, and the
    tokenizer/generation files of ``model.source_dir`` if any (generation_config.json written from
    ``model.generation_config`` instead when that was set in code or edited). Everything is written to a
    temporary sibling directory and renamed into place at the end: an interruption never
    leaves a half-written checkpoint. An existing empty directory (a container's output
    volume, a directory whose parent is not writable) is filled from inside instead: the
    temporary directory is made in it and its files moved up at the end (an interruption
    during those moves can leave part of them in the directory, which held nothing).
    A ``..`` in ``save_directory`` is resolved as the OS resolves it (through any link before it).

    Args:
        model: a ``CausalLM`` (FSDP2-sharded too: see below).
        save_directory: the checkpoint directory to create (or replace, see ``overwrite``).
        max_shard_size: largest shard, in bytes (int) or as a string such as "5GB"
            (``huggingface_hub.split_torch_state_dict_into_shards``).
        dtype: dtype of every saved tensor; default each parameter's own (as transformers;
            config.json records the embedding's).
        overwrite: replace an existing non-empty ``save_directory`` that holds only
            checkpoint files (config.json, safetensors weights and their index, the
            tokenizer and generation files); a directory with anything else in it (your
            working directory, say) is refused, naming those entries, as is the current
            working directory or one above it.

    Returns:
        the checkpoint directory.

    A model sharded with FSDP2 (``ligerzoo.parallel.apply_fsdp``; DTensor parameters) is
    saved by calling ``save_hf`` on every rank: each full tensor is gathered in turn and rank
    0 writes; an error on rank 0 is raised on every rank.

    Raises:
        FileExistsError: ``save_directory`` exists, is not empty, and ``overwrite`` is False,
            or it holds other files than a checkpoint's, or it is (or holds) the working
            directory, or it (or a parent) is a file.
        FileNotFoundError: ``save_directory`` is a link to a directory that does not exist.
        ValueError: ``dtype`` is not float64 / float32 / bfloat16 / float16, the family's
            config.json cannot express the model's config (a config built in code; the
            fields are named), the parameters do not match ``model.config`` (named), or
            ``max_shard_size`` is not a positive size (checked before anything else).
        PermissionError: as :func:`check_save_target`: an existing non-empty mount point
            with ``overwrite``, or no directory can be created where the save goes.
        TypeError: ``model`` is not a ligerzoo ``CausalLM``.

    Warns:
        UserWarning: ``model.source_dir`` is set but is not a directory (moved or deleted since
            loading): its tokenizer files cannot be copied.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise TypeError(f"save_hf expects a ligerzoo CausalLM (plain, compiled, checkpointed or FSDP2-sharded), got "
                        f"{type(model).__name__}" + (" (pass its .module)" if hasattr(model, "module") else ""))
    for unit in fsdp_modules(model):  # gathered parameters left by a forward (reshard_after_forward=False) are
        unit.reshard()                # compute-dtype copies, not DTensors: back to the sharded fp32 weights
    max_shard_size = _check_shard_size(max_shard_size)
    params = _named_params(model)
    _check_model_follows_config(model)  # before anything is written (first: it builds nothing
    _check_params_fit_config(model.config, params)  # from a config whose RoPE fields no longer fit)
    sharded = any_dtensor(params.values())  # then every rank gathers each full tensor; rank 0 writes
    writer = not sharded or torch.distributed.get_rank() == 0
    given = Path(save_directory).expanduser().absolute()
    target = _save_target(given)
    problem = None
    if writer:
        problem = _save_target_problem(given, overwrite)
    if (problem := _from_writer(problem, sharded)) is not None:
        raise problem
    fam = family(model.config.model_type)
    km = fam.key_map(model.config)
    dtype = dtype_from_str(dtype)  # None: each tensor in its own dtype, as transformers saves
    hf_config = with_dtype(hf_config_for(model.config), dtype or model.embed.weight.dtype)  # checked before writing
    plan = {k: torch.empty(s.view(params[s.param]).shape, dtype=dtype or params[s.param].dtype, device="meta")
            for k, s in km.slots.items()}
    split = split_torch_state_dict_into_shards(plan, max_shard_size=max_shard_size)

    tmp, file_mode = None, _file_mode()
    if writer:
        tmp = _make_first_dir(target)
    try:
        from tqdm.auto import tqdm

        shards = split.filename_to_tensors.items()
        for file, keys in tqdm(shards, desc="save_hf", unit="shard", disable=len(shards) < 2 or not writer):
            # a sharded (FSDP2) model: every rank gathers each full tensor, in the same order
            full = {k: km.slots[k].view(_full_tensor(params[km.slots[k].param].detach(), sharded)) for k in keys}
            if writer and problem is None:
                try:
                    tensors = {k: t.to(device="cpu", dtype=dtype or t.dtype, copy=True) for k, t in full.items()}
                    save_file(tensors, str(tmp / file), metadata={"format": "pt"})
                    os.chmod(tmp / file, file_mode)  # safetensors writes 0600: as any new file instead
                except Exception as e:  # noqa: BLE001 - the other ranks still gather: raised below
                    if not sharded:
                        raise
                    problem = e
        if writer and problem is None:
            try:
                if split.is_sharded:
                    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
                    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
                (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
                source = getattr(model, "source_dir", None)
                if source is not None and not Path(source).is_dir():
                    warn_user(f"save_hf: model.source_dir {str(source)!r} is not a directory (moved or deleted "
                              "since loading?), so its tokenizer and chat-template files are not copied into "
                              "the checkpoint (generation settings are still written from "
                              "model.generation_config); point model.source_dir at a directory that holds "
                              "them, or copy them into the checkpoint afterwards")
                    source = None
                for name in SIDE_FILES if source is not None else ():
                    if (Path(source) / name).is_file():
                        shutil.copy2(Path(source) / name, tmp / name)
                for extra in sorted((Path(source) / TEMPLATE_DIR).glob("*.jinja")) if source is not None else ():
                    (tmp / TEMPLATE_DIR).mkdir(exist_ok=True)
                    shutil.copy2(extra, tmp / TEMPLATE_DIR / extra.name)
                generation = getattr(model, "generation_config", None)
                loaded = _read_generation_config(Path(source), warn=False) if source is not None else {}
                if generation and generation != loaded:
                    # set in code, or edited since loading: the dict, not the source's file
                    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
                _move_into_place(tmp, target)
            except Exception as e:  # noqa: BLE001
                if not sharded:
                    raise
                problem = e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if (problem := _from_writer(problem, sharded)) is not None:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise problem
    return given


def _check_shard_size(max_shard_size) -> int | str:
    """``max_shard_size`` as huggingface_hub takes it (an int or a size string); ValueError
    unless it is a positive byte count (an int, a numpy int or a whole float such as 5e9) or a
    size string huggingface_hub reads ("5GB", "500MB") of at least one byte."""
    from huggingface_hub.serialization._base import parse_size_to_int

    problem = f"max_shard_size must be a positive byte count or a size such as \"5GB\" or \"500MB\", got {max_shard_size!r}"
    v = max_shard_size
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not (isinstance(v, str) or is_int(v)):
        raise ValueError(problem)
    try:
        size = parse_size_to_int(v) if isinstance(v, str) else int(v)
    except ValueError as e:
        raise ValueError(problem) from e
    if size < 1:
        raise ValueError(problem)
    return v if isinstance(v, str) else size


def _check_model_follows_config(model) -> None:
    """ValueError when ``model.config`` was edited after the model was built in a way the model
    does not follow: the RoPE tables, each attention's scale and softcap, each block's layer
    type (sliding or full), the MLP activation, every RMSNorm's eps, offset and casting, and
    the experts' top-k, router jitter and activation are fixed when the model is built, so
    config.json would describe a model other than the one trained (e.g. ``rope_theta`` or a
    YaRN ``rope_scaling`` set on a loaded model for long-context fine-tuning)."""
    from ligerzoo.models.moe import MoE
    from ligerzoo.models.transformer import MLP, rope_inv_freq

    config, problems = model.config, []
    have = model._inv_freq
    try:
        want = {False: rope_inv_freq(config)}
        if (config.rope_scaling or {}).get("rope_type") == "longrope":
            want[True] = rope_inv_freq(config, long=True)
        same = set(have) == set(want) and all(torch.equal(have[k][0].cpu(), want[k][0]) and have[k][1] == want[k][1]
                                              for k in want)
    except (KeyError, TypeError, ValueError, RuntimeError, ZeroDivisionError):  # tables the edit cannot make
        same = False
    if not same:
        problems.append("the RoPE frequencies (rope_theta, rope_scaling, partial_rotary_factor, head_dim)")
    scale = config.attn_scale if config.attn_scale is not None else config.head_dim ** -0.5
    for i, layer in enumerate(model.layers):
        if (layer.attn.scale, layer.attn.softcap) != (scale, config.attn_softcap):
            problems.append(f"layer {i}'s attention scale or softcap")
        if layer.layer_type != config.layer_type(i):
            problems.append(f"layer {i}'s attention type ({layer.layer_type}; the config: {config.layer_type(i)})")
        if isinstance(layer.mlp, MLP) and layer.mlp.activation != config.activation:
            problems.append(f"layer {i}'s activation ({layer.mlp.activation}; the config: {config.activation})")
        if isinstance(layer.mlp, MoE):
            have = (layer.mlp.top_k, layer.mlp.jitter, layer.mlp.activation)
            want = (config.num_experts_per_tok, config.router_jitter_noise, config.activation)
            if have != want:
                problems.append(f"layer {i}'s experts (num_experts_per_tok, router_jitter_noise, activation: "
                                f"{have}; the config: {want})")
    norm = (config.rms_norm_eps, config.norm_offset, config.norm_casting)
    norms = [model.norm] + [n for layer in model.layers for n in (layer.attn_norm, layer.mlp_norm,
                                                                  layer.attn_post_norm, layer.mlp_post_norm)
                            if n is not None]
    if any((n.eps, n.offset, n.casting_mode) != norm for n in norms):
        problems.append(f"the RMSNorms (rms_norm_eps, norm_offset, norm casting: the config gives {norm}; "
                        f"the model has {(model.norm.eps, model.norm.offset, model.norm.casting_mode)})")
    if problems:
        raise ValueError("save_hf: model.config was changed after the model was built, and the model does not "
                         f"follow the change in {_listing(problems, 4)}: config.json would describe another model "
                         "than this one. Build a model from the edited config (ligerzoo.CausalLM(config)), load "
                         "these weights into it (load_state_dict), and save that; or undo the edit.")


def _check_params_fit_config(config, params: dict[str, torch.Tensor]) -> None:
    """ValueError unless ``params`` (by plain name) are exactly the parameters, with the
    shapes, of a ``CausalLM`` built from ``config``: the config.json that save_hf writes must
    describe the saved tensors. Catches a head untied or tied in code without changing
    ``tie_word_embeddings`` (a separate head would be dropped from the files), a vocabulary
    or layer resized without updating the config, and adapter or wrapper parameters (LoRA)
    left in the model."""
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in _named_params(CausalLM(config)).items()}
    head = "lm_head.weight"
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if config.tie_word_embeddings and unexpected == [head] and not missing:
        raise ValueError("model.config.tie_word_embeddings is True, but lm_head.weight is a separate tensor from "
                         "embed.weight, which the checkpoint would not store; set tie_word_embeddings=False in "
                         "model.config to save both, or call model.tie_weights() to share them again")
    if not config.tie_word_embeddings and missing == [head] and not unexpected:
        raise ValueError("model.config.tie_word_embeddings is False, but lm_head.weight is embed.weight (tied in "
                         "code); set tie_word_embeddings=True in model.config, or give lm_head its own weight")
    problems = []
    if missing:
        problems.append(f"missing parameter(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"parameter(s) a {config.model_type!r} model of this config does not have: "
                        f"{_listing(unexpected)} (merge adapters into the weights first, e.g. peft's "
                        f"merge_and_unload)")
    wrong = [f"{n} {tuple(params[n].shape)} (the config gives {expected[n]})"
             for n in sorted(set(expected) & set(params)) if tuple(params[n].shape) != expected[n]]
    if wrong:
        problems.append(f"shape(s) unlike the config's: {_listing(wrong, 6)} (update model.config, e.g. "
                        f"vocab_size after resizing the embedding)")
    if problems:
        raise ValueError("save_hf: the model's parameters do not match model.config, so config.json would not "
                         "describe the saved tensors: " + "; ".join(problems))


def _checkpoint_file(name: str) -> bool:
    """Whether ``name`` is a file a checkpoint directory holds (what overwrite may replace)."""
    return name in (CONFIG_FILE, INDEX_FILE, *SIDE_FILES) or name.endswith(".safetensors")


def _template_dir(path: Path) -> bool:
    """Whether ``path`` is a named-chat-template directory holding nothing but ``*.jinja`` files."""
    return (path.name == TEMPLATE_DIR and path.is_dir() and not path.is_symlink()
            and all(p.is_file() and p.suffix == ".jinja" for p in path.iterdir()))


def _save_target(given: Path) -> Path:
    """The directory save_hf writes to for the absolute path ``given``: through a link to a
    directory, and with ``..`` taken as the OS takes it (after the links before it)."""
    try:
        if ".." in given.parts:  # as the OS resolves it: through links, then up (os.makedirs, transformers)
            return Path(os.path.realpath(given))
        return given.resolve() if given.is_symlink() else given
    except OSError:  # a name too long to look up: reported by _save_target_problem
        return given


def check_save_target(save_directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Raise now the error ``save_hf(model, save_directory, overwrite=overwrite)`` would raise
    about the directory itself, so a long run can check where it will save before it starts.

    Raises:
        FileExistsError: as save_hf: a non-empty directory without ``overwrite``, one holding
            more than checkpoint files, the working directory or one above it, or a path
            that is (or lies under) a file.
        FileNotFoundError: a link to a directory that does not exist.
        PermissionError: as save_hf: an existing non-empty directory that is a mount point
            (it cannot be replaced by a rename); and no directory can be created where
            save_hf's would go (a read-only or unwritable parent, a pseudo-filesystem such as
            /proc, a name too long): checked by creating and removing the first directory
            save_hf would create (its temporary one inside an existing empty directory, else
            the path's first missing directory, or the temporary sibling of one to replace).
    """
    given = Path(save_directory).expanduser().absolute()
    if (problem := _save_target_problem(given, overwrite)) is not None:
        raise problem
    target = _save_target(given)
    _make_first_dir(target, probe=True)


def _save_target_problem(given: Path, overwrite: bool) -> Exception | None:
    """Why save_hf must not write to the absolute path ``given`` (None when it may)."""
    try:
        return _target_problem(given, overwrite)
    except OSError as e:  # a name too long to look up, say
        return PermissionError(f"cannot save to {given}: {e.strerror or e}")


def _target_problem(given: Path, overwrite: bool) -> Exception | None:
    if given.is_symlink() and not given.exists():  # writing through it would create its target
        return FileNotFoundError(f"{given} is a link to {os.readlink(given)}, which does not exist; save to an "
                                 f"existing directory or a new path")
    target = _save_target(given)
    existing = next((p for p in (target, *target.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        if existing == target:
            return FileExistsError(f"{target} is a file, not a directory; choose another path")
        return FileExistsError(f"{existing} is a file, so {target} cannot be a directory under it; choose another path")
    if not target.exists():
        return None
    if not any(target.iterdir()):  # filled from inside (a mount point, an unwritable parent, the cwd are fine)
        return None
    cwd, resolved = Path.cwd().resolve(), target.resolve()
    if cwd == resolved or resolved in cwd.parents:  # the directory is replaced: not under a running process
        return FileExistsError(f"{resolved} is the working directory or holds it; save to another directory")
    if os.path.ismount(resolved):  # save_hf renames the directory it replaces: a mount point refuses (EBUSY)
        return PermissionError(f"{resolved} is a non-empty mount point, which save_hf cannot replace (it writes "
                               f"a new directory and renames it into place); empty it, or save to a new directory "
                               f"inside it")
    if not overwrite:
        return FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    others = sorted(p.name for p in target.iterdir() if not (p.is_file() and _checkpoint_file(p.name))
                    and not _template_dir(p))
    if others:
        return FileExistsError(f"{target} holds more than a checkpoint ({_listing(others)}); overwrite=True replaces "
                               f"the whole directory, so save elsewhere or move those out first")
    return None


def _file_mode() -> int:
    """The mode a new file gets under the process umask (0644 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _full_tensor(t: torch.Tensor, sharded: bool) -> torch.Tensor:
    """``t`` itself, or the whole of a DTensor ``t`` (a collective: every rank calls it)."""
    if not sharded:
        return t
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _from_writer(problem, sharded: bool):
    """Rank 0's exception (or None), on every rank of a sharded save: all raise it together
    instead of some ranks waiting forever in a collective."""
    if not sharded:
        return problem
    box = [problem]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# Keys that config_to_hf owns in some layout: never carried over from a stale original.
_OWNED_KEYS = {"rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "layer_types", "dtype",
               "torch_dtype", "original_max_position_embeddings", "use_sliding_window", "max_window_layers"}


def hf_config_for(config) -> dict:
    """The config.json dict for ``config``: the original file's dict when ``config`` still
    describes it (so its schema, 4.x or 5.x, and every extra key survive); after an edit that
    touches no layout-dependent key (``_OWNED_KEYS``: RoPE, layer types, dtype), such as a new
    ``eos_token_id``, the original with the edited keys changed; else one generated from the
    current fields (4.x layout) plus the original's keys the family does not own.

    Raises:
        ValueError: an unknown ``model_type``, or a config the family's config.json cannot
            express (the fields are named; e.g. Llama with ``qkv_bias != o_bias``).
    """
    with quiet():  # the loader's warnings about the original (dropout, ...) were shown
        return _hf_config_for(config)


def _hf_config_for(config) -> dict:
    fam = family(config.model_type)
    original = config.hf_config
    read = fam.config_from_hf(original) if original is not None else None  # what the original file describes
    if read is not None and _same_but_dtype(read, config):
        return original  # (before generating: a layout the family's writer cannot produce still saves)
    generated = fam.config_to_hf(config)
    if original is not None:
        edited = _edit_in_place(fam, original, read, config, generated)
        if edited is not None:
            return edited
        generated = {k: v for k, v in original.items() if k not in generated and k not in _OWNED_KEYS} | generated
    _check_expressible(config, fam.config_from_hf(generated))
    return generated


def _same_but_dtype(a, b) -> bool:
    """Whether ModelConfigs ``a`` and ``b`` describe the same model up to the dtype."""
    return dataclasses.replace(a, dtype=None) == dataclasses.replace(b, dtype=None)


def _edit_in_place(fam, original: dict, read, config, generated: dict) -> dict | None:
    """``original`` (whose fields are ``read``) with the keys the edit of ``config`` changed
    (``generated`` against ``read`` written the same way), when none of them is layout-dependent
    and the result reads back as ``config``; else None."""
    try:
        before = fam.config_to_hf(dataclasses.replace(read, dtype=config.dtype))
    except ValueError:  # a layout the family's writer cannot produce
        return None
    missing = object()
    changed = {k for k in generated.keys() | before.keys() if generated.get(k, missing) != before.get(k, missing)}
    if changed & _OWNED_KEYS:
        return None
    edited = {k: v for k, v in original.items() if k not in changed or k in generated}  # the file's key order
    edited.update({k: generated[k] for k in changed if k in generated})
    try:
        return edited if _same_but_dtype(fam.config_from_hf(edited), config) else None
    except ValueError:
        return None


def _check_expressible(config, read_back) -> None:
    """Raise ValueError when the family's config.json, read back, describes another model
    than ``config`` (a config built in code with features its family's checkpoints cannot
    have, e.g. ``model_type="gemma"`` without Gemma's norm offset)."""
    mine, theirs = _effective(config), _effective(read_back)
    diff = [f.name for f in dataclasses.fields(config)
            if f.compare and f.name != "dtype" and getattr(theirs, f.name) != getattr(mine, f.name)]
    if diff:
        # named as the caller wrote them (a field equal there only differs through another one)
        named = [n for n in diff if getattr(read_back, n) != getattr(config, n)] or diff
        fields = ", ".join(f"{n}={getattr(config, n)!r} (read back as {getattr(read_back, n)!r})" for n in named)
        raise ValueError(f"a {config.model_type!r} config.json cannot express this model's config: {fields}; "
                         f"change those fields, or pick a model_type whose checkpoints have them")


def _effective(config):
    """``config`` with defaults spelled out where two values mean the same model:
    ``attn_scale=None`` is ``head_dim ** -0.5``, and without sliding layers the window is
    unused."""
    if config.attn_scale is None:
        config = dataclasses.replace(config, attn_scale=config.head_dim ** -0.5)
    if config.layer_types is None or "sliding_attention" not in config.layer_types:
        config = dataclasses.replace(config, sliding_window=None, layer_types=None)
    return config


def _side_path(target: Path, kind: str) -> Path:
    """A fresh hidden sibling of ``target`` that save_hf writes into ("tmp") or moves an
    existing ``target`` aside to ("old"); a short name, whatever ``target``'s length."""
    return target.parent / f".{kind}-{uuid.uuid4().hex[:12]}"


def _make_first_dir(target: Path, probe: bool = False) -> Path:
    """Create the directory save_hf writes into and return it: a hidden one inside an
    existing empty ``target`` (so an empty mount point or a directory whose parent is not
    writable can be filled), else a hidden sibling, after creating ``target``'s missing
    parents. ``probe``: create nothing for good, only what the first ``mkdir`` would (the
    first missing parent, or the directory itself), then remove it. PermissionError naming
    the place when it cannot be created (read-only or pseudo filesystem, name too long)."""
    inside = target.is_dir() and not any(target.iterdir())
    where = target if inside else next(p for p in (target.parent, *target.parent.parents) if p.exists())
    tmp = (target if inside else target.parent) / f".tmp-{uuid.uuid4().hex[:12]}"
    # the probe: the temporary directory inside, or the first missing directory of the path
    # (the target itself when only it is missing: its name is the one renamed into place)
    first = tmp if inside or target.exists() else where / target.parts[len(where.parts)]
    try:
        if probe:
            first.mkdir()
            first.rmdir()
            return first
        if not inside:
            target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise PermissionError(f"cannot save to {target}: no directory can be created in {where} "
                              f"({e.strerror or e})") from e
    return tmp


def _move_into_place(new: Path, target: Path) -> None:
    """Put the finished checkpoint directory ``new`` at ``target``: its entries moved up when
    ``new`` was made inside the (empty) ``target``, else ``new`` renamed to ``target``."""
    if new.parent == target:
        for entry in sorted(new.iterdir()):
            os.replace(entry, target / entry.name)
        new.rmdir()
        return
    _replace_dir(new, target)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and deleted
    only once the new directory is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    old = _side_path(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()

