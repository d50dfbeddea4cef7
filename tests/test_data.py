"""ligerzoo.data: the real-text corpus and the LM batches cut from it."""

import re
from collections import Counter

import numpy as np
import pytest
import torch

from ligerzoo.data import (
    pack_documents,
    load_text_corpus,
    markdown_play_to_text,
    num_batches,
    split_tokens,
    token_batches,
    tokenize,
)

COMMON = set(
    "the and to of a i you my that in is not it with me for be his your he this but have as "
    "thou him will so what her all do no by shall if are we our on or".split()
)


@pytest.fixture(scope="module")
def corpus():
    return load_text_corpus()


def positions(text):
    """An 'encoder' whose ids are character positions: every id is unique, so a window's ids
    say exactly which part of the token stream it came from."""
    return list(range(len(text)))


def chars(text):
    return [ord(c) for c in text]


# --------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------


def test_corpus_is_real_english_text(corpus):
    assert isinstance(corpus, str)
    assert len(corpus) > 4_000_000  # ~5.0 M characters, far above the 200 KB floor
    words = re.findall(r"[a-z]+", corpus.lower())
    assert len(words) > 800_000
    counts = Counter(words)
    # running English: function words make up a large share of all words ...
    share = sum(counts[w] for w in COMMON) / len(words)
    assert share > 0.35, share
    # ... every one of them occurs often, and so do content words
    assert all(counts[w] > 1000 for w in COMMON)
    assert counts["love"] > 1500 and counts["king"] > 1500
    # sentences, not a word list: punctuation and line structure of real text
    assert corpus.count(".") > 30_000 and corpus.count(",") > 80_000
    assert corpus.count("\n\n") > 30_000
    # known passages, intact
    assert "To be, or not to be: that is the question:" in corpus
    assert "Now is the winter of our discontent" in corpus
    assert "HAMLET:\n" in corpus and "ROMEO:\n" in corpus


def test_corpus_is_plain_text(corpus):
    assert "**" not in corpus and "_" not in corpus and "\\" not in corpus
    assert not re.search(r"^#", corpus, re.M)
    assert not re.search(r"[ \t]+$", corpus, re.M)  # no Markdown line-break spaces
    assert "\n\n\n" not in corpus
    assert sum(c.isascii() for c in corpus) / len(corpus) > 0.9999


def test_corpus_is_cached_and_stable(corpus):
    assert load_text_corpus() is corpus
    assert corpus.startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens.")


def test_markdown_play_to_text():
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post. Enter to him\n"
        "BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n\n**FRANCISCO**  \nNay, answer me:  \n"
        "__\\[Aside]_  \nstand,'\\--and unfold yourself. &amp; c.\n"
    )
    assert markdown_play_to_text(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post. Enter to him\nBERNARDO\n\n"
        "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me:\n[Aside]\nstand,'--and unfold yourself. & c.\n"
    )


# --------------------------------------------------------------------------------------
# Tokens and splits
# --------------------------------------------------------------------------------------


def test_tokenize():
    ids = tokenize(chars, "Hi!")
    assert ids.dtype == torch.long and ids.shape == (3,)
    assert ids.tolist() == [72, 105, 33]
    assert tokenize(lambda s: torch.tensor([[1, 2]], dtype=torch.int32), "x").tolist() == [1, 2]
    two_d = tokenize(lambda s: np.array([[1, 2, 3]]), "x")  # a numpy array is flattened like a tensor (was 2-D)
    assert two_d.shape == (3,) and two_d.dtype == torch.long
    assert tokenize(lambda s: [[1, 2], [3, 4]], "x").tolist() == [1, 2, 3, 4]  # nested lists too (were 2-D)
    assert tokenize(lambda s: {"input_ids": [[5, 6]], "attention_mask": [[1, 1]]}, "x").tolist() == [5, 6]
    for empty in ([], np.array([]), torch.tensor([])):  # an empty text: no ids, still long
        assert tokenize(lambda s: empty, "").dtype == torch.long and tokenize(lambda s: empty, "").numel() == 0
    for bad in ([1.5, 2.0], np.array([0.5]), [True, False], ["a", "b"], "ab", [[1, 2], [3]], [1, None]):  # not ids
        with pytest.raises(TypeError, match="integer token ids"):
            tokenize(lambda s: bad, "x")


def test_token_batches_names_what_it_was_given_without_an_encoder():
    import ligerzoo.data

    assert "pack_documents" in ligerzoo.data.__all__
    for encode in (None, lambda s: [1, 2, 3]):  # with an encoder the list was encoded as if it were text
        with pytest.raises(ValueError, match=r"or pre-tokenized ids a 1-D tensor or numpy array .*; got list"):
            next(token_batches(encode, list(range(100)), 4, 2))
    with pytest.raises(ValueError, match="text needs an encode callable"):
        next(token_batches(None, "some text", 4, 2))


def test_split_tokens_is_contiguous_and_complete():
    t = torch.arange(1000)
    tr, ho = split_tokens(t, "train", 0.1), split_tokens(t, "heldout", 0.1)
    assert tr.tolist() == list(range(900)) and ho.tolist() == list(range(900, 1000))
    assert split_tokens(t, "val", 0.25).numel() == 250
    with pytest.raises(ValueError):
        split_tokens(t, "test")
    with pytest.raises(ValueError):
        split_tokens(t, "train", 1.0)
    assert torch.equal(split_tokens(t, "heldout", torch.tensor(0.1)), ho)  # a 0-d tensor (was a TypeError)
    for bad in ("0.1", None, True):
        with pytest.raises(ValueError, match="holdout_fraction must be a real number"):
            split_tokens(t, "train", bad)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def test_batches_shapes_and_labels(corpus):
    text = corpus[:100_000]
    seq_len, bs = 37, 5
    batches = list(token_batches(chars, text, seq_len, bs))
    n_train = len(text) - round(len(text) * 0.1)
    assert len(batches) == num_batches(n_train, seq_len, bs) == (n_train // seq_len) // bs
    for input_ids, labels in batches:
        assert input_ids.shape == (bs, seq_len) and labels.shape == (bs, seq_len)
        assert input_ids.dtype == torch.long and labels.dtype == torch.long
        assert torch.equal(input_ids, labels)
        assert labels.data_ptr() != input_ids.data_ptr()  # a loss may modify one safely
    # rows are real text: decoding one gives a substring of the corpus
    row = "".join(map(chr, batches[0][0][0].tolist()))
    assert row in text


def test_heldout_is_disjoint_from_train():
    text = "x" * 10_000
    n_train = 10_000 - 2_000
    seq_len, bs = 16, 4
    train = torch.cat([x.reshape(-1) for x, _ in token_batches(positions, text, seq_len, bs, "train", 0.2)])
    held = torch.cat([x.reshape(-1) for x, _ in token_batches(positions, text, seq_len, bs, "heldout", 0.2)])
    assert train.max() < n_train <= held.min()
    assert not set(train.tolist()) & set(held.tolist())
    # each window is a contiguous run of the stream, windows never overlap
    for x, _ in token_batches(positions, text, seq_len, bs, "train", 0.2):
        assert torch.all(x[:, 1:] - x[:, :-1] == 1) and torch.all(x[:, 0] % seq_len == 0)
    assert train.unique().numel() == train.numel()
    # every full batch of the split is used: (8000 // 16) // 4 = 125 batches
    assert train.numel() == 125 * bs * seq_len


def test_order_shuffle_and_epochs():
    ids = torch.arange(4096)

    def firsts(**kw):
        return [x[:, 0].tolist() for x, _ in token_batches(None, ids, 8, 4, **kw)]

    assert firsts(seed=0) == firsts(seed=0)
    assert firsts(seed=0) != firsts(seed=1)
    assert sorted(sum(firsts(seed=3), [])) == list(range(0, 8 * (3686 // 8 // 4) * 4, 8))
    # held-out: text order, unshuffled, the same every time
    held = sum(firsts(split="heldout"), [])
    assert held == sorted(held) and held[0] == 3686
    # epochs: each epoch reshuffles with seed + epoch; None repeats forever
    two = firsts(epochs=2)
    assert len(two) == 2 * len(firsts())
    assert two[: len(two) // 2] == firsts(seed=0)
    gen = token_batches(None, ids, 8, 4, epochs=None)
    assert len([next(gen) for _ in range(3 * len(two))]) == 3 * len(two)


def test_bad_arguments_raise_at_the_call():
    """Errors come from token_batches() itself, before any batch is asked for."""
    with pytest.raises(ValueError, match="too few"):
        token_batches(chars, "short text", 8, 4)
    with pytest.raises(ValueError, match="encode callable"):
        token_batches(None, "text without an encoder", 2, 1)
    with pytest.raises(ValueError, match="1-D"):
        token_batches(None, torch.arange(64).reshape(8, 8), 2, 1)   # not flattened silently
    with pytest.raises(ValueError, match="split must be"):
        token_batches(None, torch.arange(64), 2, 1, split="test")
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        token_batches(None, torch.arange(64), 0, 1)
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        token_batches(None, torch.arange(64), 1, 1)                  # one token per row: no target
    with pytest.raises(ValueError, match="seed must be an int"):
        token_batches(None, torch.arange(64), 2, 1, seed=0.5)        # at the call, not the first batch
    with pytest.raises(ValueError, match="seed must be an int"):
        token_batches(None, torch.arange(64), 2, 1, seed=None)
    with pytest.raises(ValueError, match=">= 1"):
        num_batches(100, 0, 1)
    with pytest.raises(ValueError, match="integer tensor"):
        token_batches(None, torch.arange(64) + 0.7, 2, 1)            # not truncated silently
    with pytest.raises(ValueError, match="epochs must be"):
        token_batches(None, torch.arange(64), 2, 1, epochs=-1)       # not an empty iterator
    with pytest.raises(ValueError, match="shuffle must be"):
        token_batches(None, torch.arange(64), 2, 1, shuffle="no")    # a truthy string would shuffle
    with pytest.raises(ValueError, match="seq_len must be an int"):
        token_batches(None, torch.arange(64), 2.5, 1)
    with pytest.raises(ValueError, match="n_tokens must be an int >= 0"):
        num_batches(-5, 1, 1)


def test_numpy_and_tensor_ints_are_ints():
    np = pytest.importorskip("numpy")
    ids = torch.arange(64)
    ref = list(token_batches(None, ids, 8, 2, epochs=2, seed=3))
    got = list(token_batches(None, ids, np.int64(8), np.int32(2), epochs=np.int64(2), seed=np.int64(3)))
    assert len(got) == len(ref) == 6   # 58 training tokens: 7 windows of 8, 3 batches of 2, two epochs
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref, got))
    assert num_batches(np.int64(100), torch.tensor(8), 2) == 6
    from_numpy = list(token_batches(None, np.arange(64), 8, 2, epochs=2, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref, from_numpy))


def test_largest_seed_runs_every_epoch():
    """Epoch e seeds seed + e modulo 2**64 (2**64 - 1 + 1 overflowed torch's seed range)."""
    batches = list(token_batches(None, torch.arange(64), 8, 2, seed=2**64 - 1, epochs=3))
    assert len(batches) == 9
    first_of_epoch_1 = list(token_batches(None, torch.arange(64), 8, 2, seed=0, epochs=1))
    assert torch.equal(batches[3][0], first_of_epoch_1[0][0])  # epoch 1 of seed 2**64-1 is seed 0's order


def test_pack_documents_rows_pieces_and_labels():
    """Documents (+ eos) laid end to end in rows; a document cut by a row's end continues as a
    new piece with positions from 0; labels drop each piece's first token and the padding."""
    docs = [[1, 2, 3], torch.tensor([4, 5, 6, 7, 8], dtype=torch.int32), [], np.array([9, 10])]
    ids, labels, pos = pack_documents(docs, 4, eos_token_id=0)
    assert ids.dtype == labels.dtype == pos.dtype == torch.long and ids.shape == (3, 4)
    assert ids.flatten().tolist() == [1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 9, 10]  # the trailing eos row is dropped
    assert pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert labels.tolist() == [[-100, 2, 3, 0], [-100, 5, 6, 7], [-100, 0, -100, 10]]
    ids, labels, pos = pack_documents(docs, 5, pad_token_id=99)  # 10 ids: two rows, no pad
    assert ids.shape == (2, 5) and pos.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    ids, labels, pos = pack_documents([[1, 2, 3]], 5, pad_token_id=99)
    assert ids.tolist() == [[1, 2, 3, 99, 99]] and labels.tolist() == [[-100, 2, 3, -100, -100]]
    assert pos.tolist() == [[0, 1, 2, 0, 1]]
    with pytest.raises(ValueError, match="fewer than seq_len"):
        pack_documents([[1, 2, 3]], 5)
    for bad, match in (([[1.5, 2.0]], "integer ids"), ([[[1, 2]]], "1-D"), ([[True]], "integer ids"),
                       (["abc"], "document 0 must be 1-D integer ids, got str"), ([[[1, 2], [3]]], "integer ids")):
        with pytest.raises(ValueError, match=match):
            pack_documents(bad, 4)
    with pytest.raises(ValueError, match="the documents hold no tokens$"):  # padding cannot help
        pack_documents([[], []], 4, eos_token_id=None, pad_token_id=9)
    with pytest.raises(ValueError, match="seq_len must be"):
        pack_documents([[1, 2]], 1)
    with pytest.raises(ValueError, match="eos_token_id must be"):
        pack_documents([[1, 2]], 2, eos_token_id=1.0)
    # negative ids are refused here, not by the model later (-100 is the labels' value, not an id)
    for kwargs, match in ((dict(eos_token_id=-1), "eos_token_id must be a token id >= 0, got -1"),
                          (dict(pad_token_id=-100), "pad_token_id must be a token id >= 0, got -100")):
        with pytest.raises(ValueError, match=match):
            pack_documents([[5, 6, 7], [8, 9]], 4, **kwargs)
    with pytest.raises(ValueError, match=r"document 1 holds a negative id \(-6\)"):
        pack_documents([[5, 6], np.array([7, -6])], 2)


def test_packed_rows_train_each_piece_as_if_alone():
    """Through the model, each piece of a packed row gives the logits it gives alone, and the
    row's loss is the mean over every labelled token of the pieces' own losses."""
    import ligerzoo

    cfg = ligerzoo.ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = ligerzoo.CausalLM(cfg)
    docs = [torch.randint(1, 50, (n,)).tolist() for n in (5, 9, 3, 7)]
    ids, labels, pos = pack_documents(docs, 8, eos_token_id=0, pad_token_id=49)
    total, count = 0.0, 0
    with torch.no_grad():
        logits = model(ids, position_ids=pos).logits
        for r in range(ids.shape[0]):
            starts = (pos[r] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for a, b in zip(starts[:-1], starts[1:]):
                alone = model(ids[r:r + 1, a:b]).logits[0]
                torch.testing.assert_close(logits[r, a:b], alone, atol=1e-5, rtol=1e-5)
                keep = labels[r, a + 1:b] != -100
                if keep.any():
                    nll = torch.nn.functional.cross_entropy(alone[:-1].double(), ids[r, a + 1:b], reduction="none")
                    total, count = total + nll[keep].sum().item(), count + int(keep.sum())
        loss = model(ids, labels=labels, position_ids=pos).loss
    torch.testing.assert_close(loss.double(), torch.tensor(total / count, dtype=torch.float64), atol=1e-5, rtol=1e-5)
