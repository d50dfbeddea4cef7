"""A checkpoint's own tokenizer (``tokenizers``) and chat template (Jinja, as transformers
renders it), without depending on transformers."""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode with ``tokenizer.json`` and render the chat template.

    Attributes:
        bos_token / eos_token / pad_token: special token strings from tokenizer_config.json.
        bos_token_id / eos_token_id / pad_token_id: their ids (None when absent).
        chat_template: the Jinja source, or None.
    """

    def __init__(self, tokenizer: _HFTokenizer, tokenizer_config: dict | None = None,
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        cfg = tokenizer_config or {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.pad_token = _token_text(cfg.get("pad_token"))
        self.unk_token = _token_text(cfg.get("unk_token"))
        template = chat_template or cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        self.chat_template = template

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
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (the tokenizer's post-processor adds BOS etc. when asked)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids; special tokens are kept unless ``skip_special_tokens`` (the
        default of transformers' ``decode``)."""
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True, **kwargs):
        """Render ``messages`` ([{"role", "content"}, ...]) with the checkpoint's chat template.

        Rendering follows transformers' ``apply_chat_template`` (sandboxed Jinja with
        ``trim_blocks``/``lstrip_blocks``, loop controls, ``{% generation %}`` blocks rendered
        as their body, a ``tojson`` filter taking ``ensure_ascii``/``indent``/``separators``/
        ``sort_keys``, ``raise_exception`` and ``strftime_now`` globals, special tokens as
        variables; extra keyword arguments, e.g. ``tools``, go to the template).
        ``add_generation_prompt`` appends the header of a new assistant turn (for generation);
        ``continue_final_message`` ends the text right after the final message's content
        instead (for the model to continue it). Returns the token ids (no extra special
        tokens: the template writes them) or, with ``tokenize=False``, the text.

        Raises:
            ValueError: the checkpoint has no chat template, ``messages`` is empty, both
                ``add_generation_prompt`` and ``continue_final_message`` are set, or the
                final message's content does not survive rendering.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt starts a new assistant turn and continue_final_message "
                             "continues the last one: set one of them")
        messages = [dict(m) for m in messages]  # the caller's messages are never edited
        if continue_final_message:
            final = messages[-1].get("content")
            if not isinstance(final, str):
                raise ValueError("continue_final_message needs the final message's content as a string")
            messages[-1]["content"] = final + _CONTINUE_TAG
        text = _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "", unk_token=self.unk_token or "",
            **kwargs)
        if continue_final_message:
            at = text.rfind(_CONTINUE_TAG.strip())
            if at < 0 or final.strip() not in text:
                raise ValueError("continue_final_message: the chat template does not render the final message's "
                                 "content as given")
            # the template may trim the trailing space of the tag (and of the message): then so do we
            text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text


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
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def load_tokenizer(id_or_dir: str | os.PathLike, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory or hub repo (``tokenizer.json`` required).

    Raises:
        FileNotFoundError: no tokenizer.json in the checkpoint.
    """
    from ligerzoo.hub import resolve

    directory = Path(resolve(id_or_dir, revision))
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    template_path = directory / "chat_template.jinja"
    template = template_path.read_text() if template_path.is_file() else None
    if template is None and (directory / "chat_template.json").is_file():
        template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    return Tokenizer(_HFTokenizer.from_file(str(path)), cfg, template)
