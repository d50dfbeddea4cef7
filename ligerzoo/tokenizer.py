"""A checkpoint's own tokenizer (``tokenizers``) and chat template (Jinja, as transformers
renders it), without depending on transformers."""
from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import sys
import types
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer

from ligerzoo._checks import is_int


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode with ``tokenizer.json`` and render the chat template.

    Usually made by :func:`load_tokenizer`. Args: ``tokenizer``, a ``tokenizers.Tokenizer``
    (truncation and padding stored in its file are switched off, as transformers switches them
    off for every call that does not ask for them: ``encode`` returns every id of the text);
    ``tokenizer_config``, the tokenizer_config.json dict (special tokens, ``chat_template``);
    ``chat_template``, a template string, a {name: template} dict or tokenizer_config.json's
    list of {"name", "template"} dicts, taking priority over the config's.

    Raises:
        ValueError: a list of chat templates with an entry that is not a {"name", "template"} dict.

    Attributes:
        bos_token / eos_token / pad_token / unk_token: special token strings from
            tokenizer_config.json (None when absent).
        special_tokens: {name: token} of every named special token the config has: those
            four and sep / cls / mask, then other ``*_token`` keys and ``extra_special_tokens``
            names, as transformers 5 reads them; chat templates see these names. (Making them
            special added tokens of ``tokenizer`` is :func:`load_tokenizer`'s part: a Tokenizer
            built directly uses ``tokenizer`` as given.)
        bos_token_id / eos_token_id / pad_token_id: their ids (None when absent).
        chat_template: the default chat template's Jinja source, or None.
        chat_templates: every named template ({"default": ..., "tool_use": ...}); a checkpoint
            with a single template has it under "default".
        vocab_size: ids in the vocabulary, added tokens included.
    """

    def __init__(self, tokenizer: _HFTokenizer, tokenizer_config: dict | None = None,
                 chat_template: str | dict | list | None = None):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        cfg = _as_transformers_reads(tokenizer_config or {})
        named = {**{name: cfg.get(name) for name in _SPECIAL_TOKENS}, **cfg.get(_MODEL_SPECIFIC, {})}
        self.special_tokens = {name: text for name, spec in named.items() if (text := _token_text(spec)) is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.unk_token = self.special_tokens.get("unk_token")
        template = chat_template if chat_template is not None else cfg.get("chat_template")
        if isinstance(template, list):  # tokenizer_config.json: [{"name": "default", "template": ...}, ...]
            bad = [t for t in template if not (isinstance(t, Mapping) and {"name", "template"} <= set(t))]
            if bad:
                raise ValueError(f"a list of chat templates holds {{'name': ..., 'template': ...}} dicts, got "
                                 f"{bad[0]!r}"[:300])
            template = {t["name"]: t["template"] for t in template}
        self.chat_templates = dict(template) if isinstance(template, dict) else (
            {"default": template} if template else {})
        self.chat_template = self.chat_templates.get("default")

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Size of the vocabulary including added tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids (a list of ints) of ``text``; the tokenizer's post-processor adds BOS
        etc. when ``add_special_tokens``.

        Raises:
            TypeError: ``text`` is not a ``str`` (a batch is encoded one text at a time).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; encode a batch one text at a time")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str | list[str]:
        """Text of token ids, as transformers' ``decode`` takes them: one id (an int, a 0-d
        tensor or array), a sequence of ids (a list, a 1-D tensor or array) -> a string; a batch
        of sequences (a 2-D tensor or array, e.g. what ``generate`` returns, or a list of lists)
        -> a list of strings; a mapping with ``input_ids`` (a tokenizer's output) -> its ids'
        text. Special tokens are kept unless ``skip_special_tokens`` (transformers' default).

        Raises:
            TypeError: ids that are not integers (floats, strings, bools, a float tensor).
            ValueError: a tensor or array of more than 2 dimensions.
        """
        if isinstance(ids, Mapping) and "input_ids" in ids:
            ids = ids["input_ids"]
        if getattr(ids, "ndim", None) is not None:  # a tensor or an array: ints only, up to 2-D
            integral = (not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
                        if isinstance(ids, torch.Tensor) else ids.dtype.kind in ("i", "u"))
            if not integral:
                raise TypeError(f"decode takes integer token ids, got a {ids.dtype} {type(ids).__name__}")
            if ids.ndim > 2:
                raise ValueError(f"decode takes one id, a sequence of ids or a batch (2-D) of them, got "
                                 f"{ids.ndim} dimensions")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode takes integer token ids, got {type(ids).__name__} {ids!r}")
        ids = [ids] if isinstance(ids, numbers.Number) else list(ids)
        if ids and all(isinstance(row, (list, tuple)) or getattr(row, "ndim", 0) == 1 for row in ids):
            return [self.decode(row, skip_special_tokens) for row in ids]  # a batch, as transformers 5
        ids = [one.item() if getattr(one, "ndim", None) == 0 else one for one in ids]  # 0-d tensors, numpy ints
        bad = [one for one in ids if not is_int(one)]
        if bad:
            raise TypeError(f"decode takes integer token ids (or rows of them), got {bad[0]!r}")
        return self.tokenizer.decode([int(one) for one in ids], skip_special_tokens=skip_special_tokens)

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The Jinja source ``apply_chat_template`` renders with, chosen as transformers does:
        ``chat_template`` names one of :attr:`chat_templates` or is a template itself; by
        default the "tool_use" template when ``tools`` are given and the checkpoint has one,
        else the "default" one.

        Raises:
            ValueError: no template given and the checkpoint has none, or only named ones
                without a "default" (the message lists their names).
        """
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is not None:
            return self.chat_template
        if self.chat_templates:
            raise ValueError(f"this tokenizer has several chat templates and none named 'default': pass "
                             f"chat_template= one of {sorted(self.chat_templates)}")
        raise ValueError("this tokenizer has no chat template (chat_template.jinja, tokenizer_config.json or "
                         "chat_template.json); pass chat_template= a Jinja template")

    def apply_chat_template(self, conversation: list, *, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                            tokenize: bool = True, return_tensors: str | None = None, **kwargs):
        """Render a conversation ([{"role", "content", ...}, ...]) with the chat template.

        Rendering follows transformers' ``apply_chat_template`` (5.x): sandboxed Jinja with
        ``trim_blocks``/``lstrip_blocks``, loop controls, ``{% generation %}`` blocks rendered
        as their body, a ``tojson`` filter taking ``ensure_ascii``/``indent``/``separators``/
        ``sort_keys``, ``raise_exception`` and ``strftime_now`` globals; the template sees
        ``messages``, ``tools`` and ``documents`` (None when not given), ``add_generation_prompt``,
        the special tokens the tokenizer has (``bos_token``, ``eos_token``, ...) and any extra
        keyword arguments (e.g. ``enable_thinking``), which override the special tokens.
        Message keys whose value is None are dropped first (an API's ``tool_calls: None``), as
        transformers does; the caller's messages are never edited.

        Args:
            conversation: one conversation, or a list of them (then a list of results; an
                empty one in a batch renders as the template gives it). Messages may be
                dicts, dataclasses or pydantic models (converted to dicts, nested values
                too), and a conversation an object with ``.messages``, as in transformers.
            tools: JSON-schema dicts of the tools the model may call. (transformers also
                converts Python functions to schemas; here that is a ValueError.)
            documents: dicts (e.g. {"title", "text"}) for retrieval-augmented templates.
            chat_template: the name of one of :attr:`chat_templates`, or a Jinja template.
            add_generation_prompt: append the header of a new assistant turn (for generation).
            continue_final_message: end the text right after the final message's content
                instead (for the model to continue it); with list-of-parts content, after
                its last text part. A string names the message field to continue.
            tokenize: return token ids (no extra special tokens: the template writes them),
                else the text.
            return_tensors: None (lists) or "pt": an int64 tensor (1, T), or (B, T) for a
                batch of conversations that tokenize to equal lengths.

        Raises:
            ValueError: no usable template (see :meth:`get_chat_template`), an empty
                conversation, both ``add_generation_prompt`` and ``continue_final_message``,
                a final message without the field to continue or whose content does not
                survive rendering, tools that are not dicts, ``return_tensors`` other than
                None/"pt" (or "pt" with ``tokenize=False`` or ragged lengths).
            TypeError: a conversation that is not a list, a message or document that is
                not a dict, or one of transformers' tokenizer arguments (``padding``,
                ``truncation``, ``max_length``, ``return_dict``, ...), which would otherwise
                reach the template unnoticed.
            jinja2.TemplateError: the template's own ``raise_exception`` (e.g. a role it
                does not accept).
        """
        if "return_dict" in kwargs and (not kwargs["return_dict"] or not tokenize):
            del kwargs["return_dict"]  # plain ids, or text (which transformers returns whatever return_dict says)
        unsupported = sorted(set(kwargs) & _TOKENIZER_ONLY)
        if unsupported:
            raise TypeError(f"apply_chat_template does not take transformers' tokenizer arguments {unsupported}: "
                            f"it returns plain token ids (truncate or pad them yourself)")
        template = self.get_chat_template(chat_template, tools)
        conversation = getattr(conversation, "messages", conversation)  # a Conversation-like object
        if not isinstance(conversation, (list, tuple)):
            raise TypeError(f"conversation must be a list of messages (or a list of conversations), got "
                            f"{type(conversation).__name__}")
        if not conversation:
            raise ValueError("cannot apply the chat template to an empty conversation")
        conversation = _plain([getattr(c, "messages", c) for c in conversation], messages=True)
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt starts a new assistant turn and continue_final_message "
                             "continues the last one: set one of them")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if return_tensors is not None and not tokenize:
            raise ValueError("return_tensors='pt' needs tokenize=True")
        if tools is not None:
            for tool in tools:
                if isinstance(tool, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
                    raise ValueError(f"tools must be JSON-schema dicts, got the function "
                                     f"{getattr(tool, '__name__', tool)!r}: transformers.utils.get_json_schema turns "
                                     f"a typed, documented function into one")
            tools = _plain(tools)
            for tool in tools:
                if not isinstance(tool, Mapping):
                    raise ValueError(f"tools must be JSON-schema dicts, got {type(tool).__name__} {tool!r} "
                                     f"(transformers.utils.get_json_schema turns a typed, documented function "
                                     f"into one)")
            tools = [dict(t) for t in tools]
        if documents is not None:
            documents = _plain(documents)
            for doc in documents:
                if not isinstance(doc, Mapping):
                    raise TypeError(f"documents must be dicts (e.g. with 'title' and 'text'), got {doc!r}")
            documents = [dict(d) for d in documents]
        batched = isinstance(conversation[0], (list, tuple))
        context = {**self.special_tokens, **_plain(kwargs)}
        texts = [self._render(template, chat, tools, documents, add_generation_prompt, continue_final_message,
                              context) for chat in (conversation if batched else [conversation])]
        if not tokenize:
            return texts if batched else texts[0]
        ids = [self.encode(text, add_special_tokens=False) for text in texts]
        if return_tensors == "pt":
            import torch

            if len({len(row) for row in ids}) > 1:
                raise ValueError(f"return_tensors='pt' needs conversations of equal token length, got "
                                 f"{[len(row) for row in ids]}; tokenize them as lists and pad them")
            return torch.tensor(ids, dtype=torch.long)
        return ids if batched else ids[0]

    @staticmethod
    def _render(template: str, conversation, tools, documents, add_generation_prompt: bool,
                continue_final_message: bool | str, context: dict) -> str:
        """One conversation's text (see :meth:`apply_chat_template`)."""
        messages = []
        for m in conversation:
            if not isinstance(m, Mapping):
                raise TypeError(f"chat messages must be dicts (or dataclasses / pydantic models) like "
                                f"{{'role': 'user', 'content': '...'}}, got {m!r}")
            message = {key: value for key, value in m.items() if value is not None}
            reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
            if reasoning is not None:  # transformers 5 aliases the reasoning text's older names
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            messages.append(message)
        if continue_final_message:
            if not messages:
                raise ValueError("continue_final_message: the conversation is empty")
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = messages[-1].get(field)
            if final is None:
                raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
            if isinstance(final, (list, tuple)):  # content parts: continue the last one with text
                parts = [dict(part) if isinstance(part, Mapping) else part for part in final]
                last = next((part for part in reversed(parts) if isinstance(part, dict) and "text" in part), None)
                if last is None:
                    raise ValueError("continue_final_message: the final message has no text part to continue")
                final, last["text"] = last["text"], last["text"] + _CONTINUE_TAG
                messages[-1][field] = parts
            elif isinstance(final, str):
                # the reasoning text sits under several names: tag each copy, whichever the template reads
                fields = [f for f in _REASONING_FIELDS if messages[-1].get(f) == final] \
                    if field in _REASONING_FIELDS else [field]
                for f in fields:
                    messages[-1][f] = final + _CONTINUE_TAG
            else:
                raise ValueError(f"continue_final_message: the final message's {field!r} must be a string or a list "
                                 f"of parts, got {type(final).__name__}")
        text = _compile(template).render(messages=messages, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **context)
        if continue_final_message:
            at = text.rfind(_CONTINUE_TAG.strip())
            if at < 0 or final.strip() not in text:
                raise ValueError("continue_final_message: the chat template does not render the final message's "
                                 "content as given")
            # the template may trim the trailing space of the tag (and of the message): then so do we
            text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
        return text


# transformers' apply_chat_template arguments that tokenize differently (padding, truncation,
# BatchEncoding outputs): refused rather than passed to the template as variables.
_TOKENIZER_ONLY = frozenset({"padding", "truncation", "max_length", "return_dict", "return_assistant_tokens_mask",
                             "tokenizer_kwargs", "sanitize_control_tokens"})


def _plain(value, messages: bool = False):
    """What a chat template sees of the caller's data (messages, tools, documents, keyword
    arguments), rebuilt from plain JSON types as transformers 5 rebuilds it: templates come
    from the hub and run sandboxed, but the sandbox does not know which methods of arbitrary
    objects are harmful (an array's ``tofile`` writes a file). None, str, int, float and bool
    stay; subclasses (str enums, numpy scalars) become their base type's value; mappings become
    dicts, lists lists and tuples tuples, recursively; dataclasses and pydantic models (``model_dump``)
    dicts; anything else (an image, a tensor, an array) a placeholder naming its type,
    ``"<Tensor>"``. With ``messages`` (the conversation level), an object that is not one of
    those is kept, for apply_chat_template's error to name it."""
    numpy = sys.modules.get("numpy")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item, messages) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item, messages) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if numpy is not None and isinstance(value, numpy.generic):
        return _plain(value.item())
    for base in (str, int, float):  # the base type's own conversion: a str enum's value, not its str()
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    return value if messages else f"<{type(value).__name__}>"


# Names a message's reasoning text goes by (the first one present wins); templates read
# "reasoning_content" or "thinking" (transformers 5 fills both).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# The named special tokens a template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# A slow tokenizer's files (named when tokenizer.json is missing).
_SLOW_TOKENIZER_FILES = frozenset({"tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model"})
# Where _as_transformers_reads keeps a config's other named special tokens ({name: token}).
_MODEL_SPECIFIC = "model_specific_special_tokens"


def _as_transformers_reads(cfg: dict, special_tokens_map: dict | None = None) -> dict:
    """A copy of tokenizer_config.json's dict with its special tokens arranged as transformers 5
    arranges them when it loads a tokenizer (``PreTrainedTokenizerBase.from_pretrained``):
    ``additional_special_tokens`` is ``extra_special_tokens`` when that is absent; other
    top-level keys ending in ``_token`` that hold a token (a string or an AddedToken dict, e.g.
    ``image_token``) and the entries of an ``extra_special_tokens`` dict are named special
    tokens, collected under ``_MODEL_SPECIFIC``; and, for a config without
    ``added_tokens_decoder`` (an older checkpoint), ``special_tokens_map.json``'s entries
    (``special_tokens_map``) replace the config's standard ones and add named ones the config
    lacks, extra lists merged. Applying it twice changes nothing."""
    def model_specific(d: dict) -> dict:  # other *_token keys holding a token (a string or an AddedToken dict)
        return {key: d.pop(key) for key in list(d) if key.endswith("_token") and key not in _SPECIAL_TOKENS
                and isinstance(_token_text(d[key]), str)}

    cfg = dict(cfg)
    if "additional_special_tokens" in cfg and not cfg.get("extra_special_tokens"):
        cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")
    named = {**cfg.pop(_MODEL_SPECIFIC, {}), **model_specific(cfg)}
    if isinstance(cfg.get("extra_special_tokens"), Mapping):
        named.update(cfg.pop("extra_special_tokens"))
    if special_tokens_map and "added_tokens_decoder" not in cfg:
        special_tokens_map = dict(special_tokens_map)
        # the config's own named tokens win over the map's (transformers passes them explicitly)
        named = {**model_specific(special_tokens_map), **named}
        for key, value in special_tokens_map.items():
            if key == "extra_special_tokens" and isinstance(value, list):
                existing = list(cfg.get("extra_special_tokens") or [])
                seen = {_token_text(t) for t in existing}
                value = existing + [t for t in value if _token_text(t) not in seen]
            cfg[key] = value
        if isinstance(cfg.get("extra_special_tokens"), Mapping):
            named.update(cfg.pop("extra_special_tokens"))
        if "additional_special_tokens" in cfg and not cfg.get("extra_special_tokens"):
            cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")
    if named:
        cfg[_MODEL_SPECIFIC] = named
    return cfg


# Appended to the final message's content to find where it ends in the rendered text
# (transformers does the same).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """The compiled chat template (compiled once per template source)."""
    return _environment().from_string(template)


@functools.lru_cache(maxsize=1)
def _environment():
    """The sandboxed Jinja environment chat templates render in (as transformers'), built once."""
    import jinja2.utils
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for masks): the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` refusing underscore-prefixed attributes (no reach into internals)."""

        def __init__(*args, **kwargs):  # noqa: N805 (jinja's own signature: namespace(self=...) works)
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a chat template may not set the underscore-prefixed attribute {name!r} on a "
                                    f"namespace")

    def make_dict(*args, **kwargs):  # dict(...) without the type object itself
        return dict(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.globals["namespace"] = Namespace
    env.globals["dict"] = make_dict
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def load_tokenizer(id_or_dir: str | os.PathLike, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory or hub repo (``tokenizer.json`` required).

    Chat templates are read as transformers' ``AutoTokenizer`` reads them: ``chat_template.jinja``
    (the default) and ``additional_chat_templates/<name>.jinja`` take priority over
    ``tokenizer_config.json``'s ``chat_template`` (a string or a list of named templates);
    ``chat_template.json`` (a processor's file, which AutoTokenizer ignores) is used only when
    none of those exists. Special tokens too: ``special_tokens_map.json`` (an older checkpoint's)
    replaces the config's entries when the config has no ``added_tokens_decoder``, and other
    ``*_token`` keys and ``extra_special_tokens`` names are named special tokens the template
    sees (see :func:`_as_transformers_reads`).

    Raises:
        FileNotFoundError: no tokenizer.json in the checkpoint, or (from
            :func:`ligerzoo.hub.resolve`) no such directory or reachable repo.
        ValueError: tokenizer_config.json, special_tokens_map.json or chat_template.json that
            is not valid JSON, or a tokenizer.json the tokenizers library cannot read.
    """
    from ligerzoo.hub import TEMPLATE_DIR, _read_json, _resolve

    directory = Path(_resolve(id_or_dir, revision, False))
    path = directory / "tokenizer.json"
    if not path.is_file():
        legacy = sorted(p.name for p in directory.iterdir()
                        if p.name in _SLOW_TOKENIZER_FILES or p.suffix == ".tiktoken") if directory.is_dir() else []
        hint = (f"; it holds {', '.join(legacy)}: a slow (SentencePiece, vocab/merges or tiktoken) tokenizer's files, "
                f"which load_tokenizer does not read (transformers' AutoTokenizer.from_pretrained(dir)"
                f".save_pretrained(other_dir) writes a tokenizer.json into other_dir; copy the checkpoint there, "
                f"never save into a hub cache's snapshot)" if legacy else "")
        raise FileNotFoundError(f"no tokenizer.json in {directory}{hint}")
    cfg_path = directory / "tokenizer_config.json"
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    map_path = directory / "special_tokens_map.json"  # an older checkpoint's special tokens
    cfg = _as_transformers_reads(cfg, _read_json(map_path) if map_path.is_file() else None)
    templates = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for extra in sorted((directory / TEMPLATE_DIR).glob("*.jinja")):
        templates[extra.name.removesuffix(".jinja")] = extra.read_text(encoding="utf-8")
    template = templates or None
    if template is None and not cfg.get("chat_template") and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    try:
        tokenizer = _HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read: {e}") from e
    _add_config_tokens(tokenizer, cfg.get("added_tokens_decoder") or {})
    _add_special_tokens(tokenizer, cfg)
    return Tokenizer(tokenizer, cfg, template)


def _add_special_tokens(tokenizer: _HFTokenizer, cfg: dict) -> None:
    """Make the named special tokens of ``cfg`` (a config as :func:`_as_transformers_reads`
    gives it: ``bos_token``, ``eos_token``, ..., and the model-specific ones) and its extra ones
    (``extra_special_tokens``) special added tokens, as transformers 5 does when it loads a
    tokenizer: one that tokenizer.json does not list as an added token is matched whole and
    skipped by ``skip_special_tokens``; one it lists keeps its flags, except that a named one it
    lists as not special is marked special (its other flags kept), as transformers marks it; a
    word of the vocabulary keeps its id, a new one takes the next free id (which the model's
    embedding may not have: the model then refuses the id)."""
    from tokenizers import AddedToken

    extra = cfg.get("extra_special_tokens") or []  # (cfg as _as_transformers_reads gives it)
    named = [cfg.get(name) for name in _SPECIAL_TOKENS] + list(cfg.get(_MODEL_SPECIFIC, {}).values())
    specs = [(spec, True) for spec in named] + [
        (spec, False) for spec in (extra.values() if isinstance(extra, Mapping) else extra)]
    listed = {t.content: t for t in tokenizer.get_added_tokens_decoder().values()}  # as transformers: these stay
    have, new = set(listed), []
    for spec, is_named in specs:
        content = _token_text(spec)
        if not isinstance(content, str):
            continue
        token = listed.get(content)
        if token is not None and is_named and not token.special:
            new.append(AddedToken(content, special=True, normalized=token.normalized, lstrip=token.lstrip,
                                  rstrip=token.rstrip, single_word=token.single_word))
            listed[content] = new[-1]
        if content in have:
            continue
        options = {k: spec[k] for k in ("single_word", "lstrip", "rstrip") if k in spec} if isinstance(spec, dict) else {}
        new.append(AddedToken(content, special=True, normalized=spec.get("normalized", False)
                              if isinstance(spec, dict) else False, **options))
        have.add(content)
    if new:
        tokenizer.add_special_tokens(new)


def _add_config_tokens(tokenizer: _HFTokenizer, added: dict) -> None:
    """Add the ``added_tokens_decoder`` entries of tokenizer_config.json that tokenizer.json
    does not list as added tokens, in id order, as transformers' AutoTokenizer does: a word
    already in the vocabulary keeps its id (and becomes an added, maybe special, token); a
    new one takes the next free id, whatever id the config gives it (as in transformers)."""
    from tokenizers import AddedToken

    have = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for _, spec in sorted(((int(i), spec) for i, spec in added.items()), key=lambda item: item[0]):
        content = spec.get("content") if isinstance(spec, dict) else None
        if content is None or content in have:
            continue
        options = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
        (tokenizer.add_special_tokens if spec.get("special") else tokenizer.add_tokens)([AddedToken(content, **options)])
        have.add(content)
