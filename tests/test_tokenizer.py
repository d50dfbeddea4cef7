"""Chat templates and tokenizer files against transformers' AutoTokenizer (5.x) on the same
directory: the real SmolLM2 tokenizer.json with tokenizer configs and template files written
here, covering what real checkpoints' templates use."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ligerzoo
from scripts.prepare_models import prepare_smollm2

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! "}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SIMPLE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"


@pytest.fixture(scope="module")
def smol():
    return prepare_smollm2()


@pytest.fixture
def make_dir(smol, tmp_path):
    """A tokenizer dir: SmolLM2's tokenizer.json and tokenizer_config.json (its template dropped),
    updated with ``config`` and extra ``files`` {relative path: text}."""
    count = [0]

    def make(config=None, files=None):
        count[0] += 1
        d = tmp_path / f"tok{count[0]}"
        d.mkdir()
        shutil.copy(smol / "tokenizer.json", d)
        cfg = json.loads((smol / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        cfg.update(config or {})
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        for rel, text in (files or {}).items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
        return d

    return make


def both(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d), ligerzoo.load_tokenizer(d)


def render(tok, conv, **kwargs):
    return tok.apply_chat_template(conv, tokenize=False, **kwargs)


def test_tools_and_documents_are_none_when_not_given(make_dir):
    """transformers renders with tools=None and documents=None: `is defined` holds, `is not
    none` does not, and `tojson` gives null."""
    template = ("{% for m in messages %}{{ m.content }}{% endfor %}{% if tools is defined %}<tools>{{ tools | tojson }}"
                "</tools>{% endif %}{% if tools is not none %}TOOLS{% endif %}{% if documents is not none %}"
                "{% for d in documents %}<{{ d.title }}>{% endfor %}{% endif %}")
    ref, ours = both(make_dir({"chat_template": template}))
    for kwargs in ({}, {"tools": [WEATHER]}, {"documents": [{"title": "Paris", "text": "x"}]}):
        assert render(ours, CONV, **kwargs) == render(ref, CONV, **kwargs), kwargs
    assert "<tools>null</tools>" in render(ours, CONV)
    with pytest.raises(ValueError, match="JSON-schema dicts"):
        ours.apply_chat_template(CONV, tools=[lambda city: city])
    with pytest.raises(TypeError, match="documents must be dicts"):
        ours.apply_chat_template(CONV, documents=["just text"])


def test_none_valued_keys_are_dropped_and_reasoning_aliased(make_dir):
    """An API's `tool_calls: None` / `content: None` is dropped before rendering (else templates
    crash or print "None"); `reasoning` fills `reasoning_content` and `thinking`."""
    template = ("{% for m in messages %}[{{ m.role }}]{% if m.content is defined %}{{ m.content }}{% endif %}"
                "{% if m.tool_calls is defined %}{{ m.tool_calls | length }} calls{% endif %}"
                "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}"
                "{% endfor %}")
    ref, ours = both(make_dir({"chat_template": template}))
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": None},
            {"role": "assistant", "content": "ok", "reasoning": "because"}]
    assert render(ours, conv) == render(ref, conv) == "[user]hi[assistant][assistant]ok<think>because|because</think>"
    assert conv[1] == {"role": "assistant", "content": None, "tool_calls": None}  # the caller's messages untouched


def test_named_templates(make_dir):
    """Named templates from a list in tokenizer_config.json and from additional_chat_templates/:
    tool_use is chosen when tools are given, a name or a template can be passed, and several
    templates without a default are an error naming them."""
    named = [{"name": "default", "template": "DEFAULT" + SIMPLE}, {"name": "tool_use", "template": "TOOLS" + SIMPLE},
             {"name": "rag", "template": "RAG" + SIMPLE}]
    dirs = [make_dir({"chat_template": named}),
            make_dir(files={"chat_template.jinja": "DEFAULT" + SIMPLE,
                            "additional_chat_templates/tool_use.jinja": "TOOLS" + SIMPLE,
                            "additional_chat_templates/rag.jinja": "RAG" + SIMPLE})]
    for d in dirs:
        ref, ours = both(d)
        assert sorted(ours.chat_templates) == ["default", "rag", "tool_use"]
        for kwargs in ({}, {"tools": [WEATHER]}, {"chat_template": "rag"}, {"chat_template": "LITERAL" + SIMPLE},
                       {"chat_template": "rag", "tools": [WEATHER]}):
            assert render(ours, CONV, **kwargs) == render(ref, CONV, **kwargs), (d, kwargs)
        assert render(ours, CONV, tools=[WEATHER]).startswith("TOOLS")
    ref, ours = both(make_dir({"chat_template": named[1:]}))
    with pytest.raises(ValueError, match=r"none named 'default'.*\['rag', 'tool_use'\]"):
        ours.apply_chat_template(CONV)
    with pytest.raises(ValueError):
        ref.apply_chat_template(CONV)
    assert render(ours, CONV, tools=[WEATHER]) == render(ref, CONV, tools=[WEATHER])
    _, ours = both(make_dir())
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CONV)
    assert render(ours, CONV, chat_template=SIMPLE) == "[user]Hi[assistant]Hello! "


def test_template_file_precedence(make_dir):
    """chat_template.jinja wins over tokenizer_config.json's template, which wins over a
    processor's chat_template.json (AutoTokenizer ignores that file; we use it only as the
    last resort)."""
    proc = json.dumps({"chat_template": "PROC" + SIMPLE})
    cases = [(dict(config={"chat_template": "CONFIG" + SIMPLE}, files={"chat_template.jinja": "JINJA" + SIMPLE}),
              "JINJA"),
             (dict(config={"chat_template": "CONFIG" + SIMPLE}, files={"chat_template.json": proc}), "CONFIG")]
    for spec, prefix in cases:
        ref, ours = both(make_dir(**spec))
        assert render(ours, CONV) == render(ref, CONV)
        assert render(ours, CONV).startswith(prefix)
    _, ours = both(make_dir(files={"chat_template.json": proc}))
    assert render(ours, CONV).startswith("PROC")


def test_batched_conversations_and_tensors(make_dir):
    """A list of conversations gives a list of results; return_tensors='pt' an int64 tensor."""
    ref, ours = both(make_dir({"chat_template": SIMPLE}))
    convs = [CONV, [{"role": "user", "content": "What is the capital of France?"}]]
    assert render(ours, convs) == render(ref, convs)
    ids = ours.apply_chat_template(convs, add_generation_prompt=True)
    assert ids == [ours.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    expected = ref.apply_chat_template(convs[0], add_generation_prompt=True, return_dict=False)
    one = ours.apply_chat_template(convs[0], add_generation_prompt=True, return_tensors="pt")
    assert one.dtype == torch.long and one.tolist() == [expected]
    assert ours.apply_chat_template([CONV, CONV], return_tensors="pt").shape[0] == 2
    with pytest.raises(ValueError, match="equal token length"):
        ours.apply_chat_template(convs, return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors must be None or 'pt'"):
        ours.apply_chat_template(CONV, return_tensors="np")
    with pytest.raises(TypeError, match="chat messages must be dicts"):
        ours.apply_chat_template(["hello"])


def test_continue_final_message(make_dir):
    """Continuing a final message given as content parts (the last text part) or a named field."""
    template = ("{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}"
                "{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}{% endif %}"
                "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}{% endif %}</s>{% endfor %}")
    ref, ours = both(make_dir({"chat_template": template}))
    parts = [{"role": "user", "content": "hi"},
             {"role": "assistant", "content": [{"type": "text", "text": "One"}, {"type": "image"},
                                               {"type": "text", "text": "Sure, here"}]}]
    got = render(ours, parts, continue_final_message=True)
    assert got == render(ref, parts, continue_final_message=True) == "<user>hi</s><assistant>OneSure, here"
    assert parts[1]["content"][2]["text"] == "Sure, here"
    thinking = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "reasoning_content": "Let me"}]
    assert render(ours, thinking, continue_final_message="reasoning_content") == \
        render(ref, thinking, continue_final_message="reasoning_content")
    with pytest.raises(ValueError, match="no 'tool_calls' to continue"):
        ours.apply_chat_template(CONV, continue_final_message="tool_calls")
    with pytest.raises(ValueError, match="no text part"):
        ours.apply_chat_template([{"role": "assistant", "content": [{"type": "image"}]}], continue_final_message=True)


def test_special_tokens_and_added_tokens(make_dir):
    """Only the special tokens the tokenizer has are template variables (a missing bos_token is
    undefined, as in transformers); added_tokens_decoder entries that tokenizer.json lacks are
    added as AutoTokenizer adds them."""
    template = "{% if bos_token is defined %}BOS={{ bos_token }}{% endif %}{{ messages[0].content }}"
    ref, ours = both(make_dir({"chat_template": template, "bos_token": None}))
    assert render(ours, CONV) == render(ref, CONV) == "Hi"
    vocab = ours.vocab_size
    added = {str(vocab): {"content": "<|new|>", "special": True, "lstrip": False, "rstrip": False,
                          "normalized": False, "single_word": False}}
    ref, ours = both(make_dir({"added_tokens_decoder": added}))
    assert ours.encode("x<|new|>y") == ref.encode("x<|new|>y")
    assert ours.encode("x<|new|>y")[1] == vocab and ours.decode([vocab]) == "<|new|>"
    # an id that is not the next free one, and an existing word marked special: as AutoTokenizer
    entries = {str(vocab + 5): dict(added[str(vocab)]), "9": {"content": "there", "special": True}}
    word = ref.encode("there", add_special_tokens=False)
    ref, ours = both(make_dir({"added_tokens_decoder": entries}))
    for text in ("x<|new|>y there", "out there!"):
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert len(word) == 1 and ours.encode("there", add_special_tokens=False) == word
    for one in (ids[0], torch.tensor(ids[0]), np.int64(ids[0])):  # one id, as transformers' decode takes
        assert ours.decode(one) == ref.decode(int(one)) == ours.decode([int(one)])
    for bad in (2.5, torch.tensor(2.0), np.float64(2.0)):  # not truncated to an id
        with pytest.raises(TypeError, match="integer token ids"):
            ours.decode(bad)


def test_save_hf_keeps_named_templates(make_dir, tmp_path):
    """save_hf copies additional_chat_templates/ beside the other side files, and
    overwrite=True replaces a checkpoint directory that has one."""
    from tests.helpers import make_hf_llama

    src = tmp_path / "hf"
    make_hf_llama(src)
    tok = make_dir(files={"chat_template.jinja": "DEFAULT" + SIMPLE,
                          "additional_chat_templates/tool_use.jinja": "TOOLS" + SIMPLE})
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tok / name, src / name)
    shutil.copytree(tok / "additional_chat_templates", src / "additional_chat_templates")
    model = ligerzoo.from_hf(src)
    out = Path(ligerzoo.save_hf(model, tmp_path / "out"))
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "TOOLS" + SIMPLE
    assert render(ligerzoo.load_tokenizer(out), CONV, tools=[WEATHER]).startswith("TOOLS")
    ligerzoo.save_hf(model, out, overwrite=True)
    (out / "additional_chat_templates" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds more than a checkpoint"):
        ligerzoo.save_hf(model, out, overwrite=True)


def test_message_objects_batches_and_refused_tokenizer_arguments(make_dir):
    """Messages as dataclasses or pydantic-like objects (nested too) and conversations with
    .messages render as transformers renders them; an empty conversation inside a batch
    renders; transformers' padding/truncation arguments are refused, not passed to the template."""
    import dataclasses

    @dataclasses.dataclass
    class Call:
        name: str
        arguments: dict

    @dataclasses.dataclass
    class Message:
        role: str
        content: str
        tool_calls: list | None = None

    class Model:  # the pydantic interface transformers uses
        def __init__(self, **fields):
            self.fields = fields

        def model_dump(self):
            return dict(self.fields)

    class Conversation:
        def __init__(self, messages):
            self.messages = messages

    template = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% if m.tool_calls is defined %}"
                "{{ m.tool_calls | tojson }}{% endif %}{% endfor %}")
    ref, ours = both(make_dir({"chat_template": template}))
    conv = [Message("user", "hi"), Model(role="assistant", content="ok"),
            Message("assistant", "", [Call("f", {"x": 1})])]
    for c in (conv, tuple(conv), Conversation(conv)):
        assert render(ours, c) == render(ref, c) == '[user]hi[assistant]ok[assistant][{"name": "f", "arguments": {"x": 1}}]'
    assert render(ours, [[U := {"role": "user", "content": "a"}], []]) == render(ref, [[U], []]) == ["[user]a", ""]
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    for kwargs in ({"truncation": True, "max_length": 5}, {"padding": "max_length"}, {"return_dict": True}):
        with pytest.raises(TypeError, match="tokenizer arguments"):
            ours.apply_chat_template(CONV, **kwargs)
    # return_dict=False asks for the plain ids this returns anyway; without tokenizing it does not apply
    assert ours.apply_chat_template(CONV, return_dict=False) == ref.apply_chat_template(CONV, return_dict=False)
    for flag in (True, False, None):
        assert render(ours, CONV, return_dict=flag) == render(ref, CONV, return_dict=flag)

    def get_weather(city: str):
        """Get the weather.

        Args:
            city: the city
        """

    with pytest.raises(ValueError, match="got the function 'get_weather': transformers.utils.get_json_schema"):
        ours.apply_chat_template(CONV, tools=[get_weather])
    with pytest.raises(ValueError, match="tools must be JSON-schema dicts, got str"):  # a class is not "the function"
        ours.apply_chat_template(CONV, tools=[dict])
    with pytest.raises(TypeError, match="must be a list of messages"):
        ours.apply_chat_template({"role": "user", "content": "hi"})


def test_continue_final_message_on_reasoning_read_as_thinking(make_dir):
    """continue_final_message="reasoning_content" tags every copy of the reasoning text, so a
    template that reads `thinking` continues it too, as transformers does."""
    template = "{% for m in messages %}{{ m.content }}|{% if m.thinking %}{{ m.thinking }}{% endif %}{% endfor %}"
    ref, ours = both(make_dir({"chat_template": template}))
    conv = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "", "reasoning_content": "let me think"}]
    kwargs = {"continue_final_message": "reasoning_content"}
    assert render(ours, conv, **kwargs) == render(ref, conv, **kwargs) == "Hello||let me think"


def test_truncation_and_padding_stored_in_tokenizer_json_are_off_as_in_transformers(smol, tmp_path):
    """A tokenizer saved by transformers after a truncating, padding call keeps those settings in
    tokenizer.json; transformers switches them off for calls that do not ask for them, and so
    does load_tokenizer: encode and the chat template return every id, unpadded."""
    from transformers import AutoTokenizer

    for call, name in ((dict(truncation=True, max_length=16), "trunc"), (dict(padding="max_length", max_length=64),
                                                                          "pad")):
        tok = AutoTokenizer.from_pretrained(smol)
        tok.pad_token = tok.pad_token or tok.eos_token
        tok(["some text", "x"], **call)
        tok.save_pretrained(tmp_path / name)
        assert json.loads((tmp_path / name / "tokenizer.json").read_text())["truncation" if name == "trunc" else
                                                                             "padding"] is not None
        ref, ours = both(tmp_path / name)
        text = "To be, or not to be, that is the question. " * 8
        assert len(ref.encode(text)) > 64
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode("Hi") == ref.encode("Hi")
        assert ours.apply_chat_template(CONV) == ref.apply_chat_template(CONV, tokenize=True, return_dict=False)


def test_load_tokenizer_of_a_hub_id_fetches_no_weights(smol, tmp_path, monkeypatch):
    """load_tokenizer("org/name") asks the hub for the tokenizer and config files only; from_hf
    asks for the weight shards the index names as well."""
    import huggingface_hub

    snap = tmp_path / "snap"
    snap.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / name, snap / name)
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append(allow_patterns)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert ligerzoo.load_tokenizer("org/name").encode("Hi", add_special_tokens=False)
    assert calls == [list(ligerzoo.hub.SIDE_PATTERNS)]
    calls.clear()
    assert ligerzoo.hub.resolve("org/name") == snap and calls[-1] == ["model-1.safetensors"]


def test_str_enums_and_tuples_reach_templates_as_in_transformers(make_dir):
    """A (str, Enum) role is its value ("user"), not "Role.USER" (which silently dropped the
    turn from templates comparing roles); tuples stay tuples, as transformers 5 renders them."""
    import enum

    class Role(str, enum.Enum):
        USER = "user"

    template = ("{% for m in messages %}{% if m.role == 'user' %}[user]{{ m.content }}{% endif %}{% endfor %}"
                "|{{ x }}|{{ x | tojson }}|{{ pair }}")
    ref, ours = both(make_dir({"chat_template": template}))
    conv = [{"role": Role.USER, "content": "Hi"}]
    kwargs = dict(x=Role.USER, pair=(1, 2))
    assert render(ours, conv, **kwargs) == render(ref, conv, **kwargs) == '[user]Hi|user|"user"|(1, 2)'


def test_templates_see_plain_data_as_in_transformers(make_dir, tmp_path):
    """What a template sees is rebuilt from JSON types as transformers 5 rebuilds it: an array
    in a message becomes "<ndarray>" (its methods, tofile among them, out of the template's
    reach), numpy scalars become numbers in tool arguments and keyword arguments, a tensor
    "<Tensor>"; namespace() refuses underscore-prefixed attributes."""
    import jinja2

    target = tmp_path / "written"
    evil = ("{% for m in messages %}{% for p in m.content %}{% if p.type == 'image' %}"
            "{{ p.image.tofile('" + str(target) + "') }}{% endif %}{% endfor %}{% endfor %}ok")
    ref, ours = both(make_dir({"chat_template": SIMPLE}))
    conv = [{"role": "user", "content": [{"type": "image", "image": np.zeros(4, np.uint8)}, {"type": "text",
                                                                                              "text": "?"}]}]
    with pytest.raises(jinja2.exceptions.UndefinedError):
        render(ours, conv, chat_template=evil)
    assert not target.exists()
    show = "{{ messages[0].content[0].image }}|{{ n | tojson }}|{{ flag | tojson }}|{{ t }}|{{ messages[1].a | tojson }}"
    conv = conv + [{"role": "assistant", "content": "x", "a": {"n": np.int64(3), "f": np.float32(0.5)}}]
    kwargs = dict(chat_template=show, n=np.int64(3), flag=np.bool_(False), t=torch.tensor(3))
    assert render(ours, conv, **kwargs) == render(ref, conv, **kwargs) == '<ndarray>|3|false|<Tensor>|{"n": 3, "f": 0.5}'
    for template in ("{% set ns = namespace(_x=1) %}{{ ns._x }}", "{% set ns = namespace(a=1) %}{% set ns._b = 2 %}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            render(ref, CONV, chat_template=template)
        with pytest.raises(jinja2.exceptions.SecurityError):
            render(ours, CONV, chat_template=template)
    ok = "{% set ns = namespace(a=1) %}{% set ns.a = 2 %}{{ ns.a }}{{ dict(b=3).b }}"
    assert render(ours, CONV, chat_template=ok) == render(ref, CONV, chat_template=ok) == "23"


def test_decode_takes_what_transformers_decode_takes(make_dir):
    """One id, a sequence, a 2-D batch (what generate returns: a list of strings, as
    transformers 5), a list of rows, a tokenizer's output mapping; floats, strings, bools and
    float tensors are refused rather than truncated to ids."""
    ref, ours = both(make_dir())
    ids = ref.encode("Hello world, again", add_special_tokens=False)
    batch = torch.tensor([ids[:3], ids[1:4]])
    for value in (ids, torch.tensor(ids), np.array(ids), batch, batch.numpy(), batch.tolist(), [torch.tensor(ids)],
                  ids[0], torch.tensor(ids[0]), ref("Hello world")):
        assert ours.decode(value) == ref.decode(value), value
    assert isinstance(ours.decode(batch), list) and len(ours.decode(batch)) == 2
    for bad in ([9.5, 1.0], torch.tensor([1.0, 2.0]), np.array([1.0]), ["12"], "12", [True], [1, [2]]):
        with pytest.raises(TypeError, match="integer token ids"):
            ours.decode(bad)
    with pytest.raises(ValueError, match="3 dimensions"):
        ours.decode(torch.zeros(1, 1, 2, dtype=torch.long))


def test_named_and_extra_special_tokens_are_special_as_in_transformers(smol, make_dir):
    """Special tokens named in tokenizer_config.json but not listed as added in tokenizer.json
    are made special added tokens, as transformers 5 does: one in the vocabulary keeps its id
    and is matched whole and skipped by skip_special_tokens; a new one (an eos or an extra
    special token the vocabulary lacks) takes the next id."""
    d = make_dir({"eos_token": "</s>", "extra_special_tokens": ["<|tool|>", "<tool_call>"], "pad_token": "<|pad|>"})
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_end|>"]
    data["added_tokens"].append(dict(data["added_tokens"][-1], id=len(data["model"]["vocab"]) + 50,
                                     content="<tool_call>", special=False))  # added, not special: stays so
    (d / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["bos_token"] = "<|im_end|>"  # in the vocabulary, no longer an added token
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref, ours = both(d)
    for text in ("Hello<|im_end|> there</s><|tool|><|pad|>", "x <|im_end|>", "a <tool_call>{}</tool_call>"):
        ids = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                        ref.pad_token_id)
    assert ours.vocab_size == len(ref) and ours.eos_token_id is not None


def test_model_specific_special_tokens_and_special_tokens_map_as_in_transformers(smol, make_dir):
    """transformers 5 makes other *_token keys (image_token) and an extra_special_tokens dict's
    entries named special tokens, which templates see and encode matches whole; and an older
    checkpoint's special_tokens_map.json (no added_tokens_decoder in the config) sets its
    special tokens (ours ignored both: empty template variables, no eos id)."""
    template = "[{{ image_token }}][{{ tool_token }}]{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}" \
               "{% endfor %}"
    d = make_dir({"image_token": "<image>", "extra_special_tokens": {"tool_token": "<tool>"}, "chat_template": template})
    conv = [{"role": "user", "content": "a <image> b <tool>"}]
    ref, ours = both(d)
    assert render(ours, conv) == render(ref, conv) and "[<image>][<tool>]" in render(ours, conv)
    ids = ref.encode("a <image> b <tool>", add_special_tokens=False)
    assert ours.encode("a <image> b <tool>", add_special_tokens=False) == ids and len(ids) == 6
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)

    d = make_dir()
    cfg = {"chat_template": template}  # an older config: no added_tokens_decoder, no named tokens
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False}, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))
    ref, ours = both(d)
    conv = [{"role": "user", "content": "hi"}]
    assert render(ours, conv) == render(ref, conv) == "[][]<|im_start|>hi<|im_end|>"
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                        ref.pad_token_id) == (1, 2, 2)
    # AddedToken dicts for model-specific names (the map's plain ones, the config's "__type" ones),
    # and a name in both files: the config's wins
    added = {"content": "<image>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    for config_extra, stmap in (({}, {"image_token": added}), ({"image_token": {"__type": "AddedToken", **added}}, {}),
                                ({"image_token": "<image>"}, {"image_token": "<img>", "eos_token": "<|im_end|>"})):
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ image_token }}"} | config_extra))
        (d / "special_tokens_map.json").write_text(json.dumps(stmap))
        ref, ours = both(d)
        assert ours.special_tokens["image_token"] == ref.special_tokens_map["image_token"] == "<image>", stmap
        ids = ref.encode("a<image> <img>", add_special_tokens=False)
        assert ours.encode("a<image> <img>", add_special_tokens=False) == ids and ours.vocab_size == len(ref)
        assert render(ours, conv) == render(ref, conv) == "<image>"
    cfg = json.loads((smol / "tokenizer_config.json").read_text())  # with added_tokens_decoder: the map is not read
    cfg["eos_token"] = "<|endoftext|>"
    cfg["added_tokens_decoder"] = {"0": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                                         "rstrip": False, "single_word": False, "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref, ours = both(d)
    assert ours.eos_token == ref.eos_token == "<|endoftext|>" and ours.eos_token_id == ref.eos_token_id


@pytest.mark.parametrize("name", ["eos_token", "image_token"])
def test_a_named_token_listed_as_not_special_is_marked_special_as_in_transformers(make_dir, name):
    """transformers marks every named special token special again, also one tokenizer.json
    lists as a plain added token: skip_special_tokens drops it (ours kept it)."""
    d = make_dir({name: "<file_sep>"})
    data = json.loads((d / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        if token["content"] == "<file_sep>":
            token["special"] = False
    (d / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("added_tokens_decoder", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref, ours = both(d)
    ids = ref.encode("a<file_sep>b", add_special_tokens=False)
    assert ours.encode("a<file_sep>b", add_special_tokens=False) == ids
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=True) == "ab"


def test_reading_a_config_as_transformers_twice_changes_nothing():
    from ligerzoo.tokenizer import _as_transformers_reads

    cfg = {"eos_token": "a", "image_token": "<i>", "extra_special_tokens": {"tool_token": "<t>"}}
    stmap = {"additional_special_tokens": ["<x>"], "image_token": "<img>", "audio_token": {"content": "<a>"}}
    once = _as_transformers_reads(cfg, stmap)
    assert _as_transformers_reads(once) == once
    assert once["model_specific_special_tokens"] == {"audio_token": {"content": "<a>"}, "image_token": "<i>",
                                                     "tool_token": "<t>"}
    assert once["extra_special_tokens"] == ["<x>"] and cfg["image_token"] == "<i>"  # the caller's dict untouched


def test_a_template_list_entry_without_a_name_is_a_clear_error(make_dir):
    with pytest.raises(ValueError, match="'name'"):
        ligerzoo.load_tokenizer(make_dir({"chat_template": [{"template": "x"}]}))


def test_a_slow_tokenizers_files_are_named_when_tokenizer_json_is_missing(make_dir):
    d = make_dir()
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in .*; it holds tokenizer.model: a slow .*"
                                                r"save_pretrained\(other_dir\)"):
        ligerzoo.load_tokenizer(d)


def test_unreadable_tokenizer_json_is_named(make_dir):
    """A tokenizer.json the tokenizers library cannot parse: a ValueError naming the file (the
    library raises a bare Exception that names nothing)."""
    d = make_dir()
    (d / "tokenizer.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a tokenizer\.json the tokenizers library can read"):
        ligerzoo.load_tokenizer(d)


def test_encode_takes_one_str_and_matches_transformers(make_dir):
    """encode gives transformers' ids for a text, and anything but a str (a batch, bytes, None) is
    refused by name instead of with the tokenizers library's "TextInputSequence must be str"."""
    hf, ours = both(make_dir())
    text = "The capital of France is Paris."
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for bad in (["a", "b"], b"ab", None):
        with pytest.raises(TypeError, match=f"encode takes one str, got {type(bad).__name__}"):
            ours.encode(bad)
