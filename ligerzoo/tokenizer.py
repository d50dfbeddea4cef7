"""A checkpoint's own tokenizer (``tokenizers``) and chat template (Jinja, as transformers
renders it), without depending on transformers."""
from __future__ import annotations

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

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tokenize: bool = True, **kwargs):
        """Render ``messages`` ([{"role", "content"}, ...]) with the checkpoint's chat template.

        Rendering follows transformers' ``apply_chat_template`` (sandboxed Jinja with
        ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and ``strftime_now`` globals,
        special tokens as variables). Returns the token ids (no extra special tokens: the
        template writes them) or, with ``tokenize=False``, the text.

        Raises:
            ValueError: the checkpoint has no chat template.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "", unk_token=self.unk_token or "",
            **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


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
