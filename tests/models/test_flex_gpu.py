"""GPU tier: packed documents and sliding windows through flex_attention block masks
(models/flex.py) against transformers (eager attention, use_cache=False) on the same
weights, fp32 with TF32 off; bf16 and torch.compile against ligerzoo's dense-mask path.
Run on a CUDA machine: ``TRITON_INTERPRET=0 python -m pytest -m gpu tests/models/test_flex_gpu.py``.
"""
import pytest
import torch

import ligerzoo
from ligerzoo.models import flex
from tests.models.test_families import _step_matches_transformers, make_hf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              # the compiled flex_attention must never fall back to its eager form (the (T, S)
              # scores in memory), as it does past torch.compile's recompile limit
              pytest.mark.filterwarnings("error:flex_attention called without torch.compile")]

# head_dim 64 (GQA 4/2), and each family's own trait: Gemma MQA, Gemma2 head_dim 256 with softcaps,
# Phi3 head_dim 96, sliding windows shorter than the sequence
SIZES = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048, initializer_range=0.05)
EXTRA = {"llama": {}, "mixtral": {}, "qwen2": dict(sliding_window=200), "mistral": dict(sliding_window=200, head_dim=64),
         "gemma": dict(num_key_value_heads=1, head_dim=64), "phi3": dict(
    hidden_size=384, original_max_position_embeddings=256, rope_parameters={  # head_dim 96, rotary 48: 24 factors each
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
        "short_factor": [1.0 + i / 24 for i in range(24)], "long_factor": [2.0 + i / 6 for i in range(24)]}),
         "gemma2": dict(sliding_window=200, head_dim=256, initializer_range=0.3)}


def _packed_positions(B: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        row = []
        while len(row) < T:
            row += range(int(torch.randint(1, 400, (), generator=g)))
        rows.append(torch.tensor(row[:T]))
    return torch.stack(rows)


@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_block_masks_match_transformers_on_cuda(tmp_path, name, no_tf32, monkeypatch):
    """fp32, 2 x 700 tokens (6 tiles of 128), packed and plain rows: loss, logits and every
    gradient equal transformers'; the masks are flex block masks, never dense."""
    built = []
    real = flex.block_mask
    # (T, document, window, device): count the masks built for documents or a window
    monkeypatch.setattr(flex, "block_mask", lambda *a, **k: built.append(a[1] is not None or a[2] is not None)
                        or real(*a, **k))
    hf = make_hf(name, tmp_path / "hf", **(SIZES | EXTRA[name])).cuda()
    ours = ligerzoo.from_hf(tmp_path / "hf", device="cuda")
    B, T = 2, 700
    ids = torch.randint(3, hf.config.vocab_size, (B, T), device="cuda")
    for pos in (_packed_positions(B, T, 0).cuda(), torch.arange(T, device="cuda").expand(B, T)):
        window = ours.config.sliding_window
        if pos[0, -1] == T - 1 and not (window and T > window):
            continue  # plain causal rows without a window need no mask: SDPA's is_causal
        labels = ids.masked_fill(pos == 0, -100)
        built.clear()
        ref = _step_matches_transformers(hf, ours, name, ids, pos, labels, atol=1e-5)
        assert any(built), "the flex path was not taken"
        with torch.no_grad():
            torch.testing.assert_close(ours(ids, position_ids=pos).logits, ref.logits, atol=1e-4, rtol=1e-4)


def test_bf16_block_masks_agree_with_the_dense_path_and_compile(monkeypatch, no_tf32):
    """Llama, bf16, 2 x 1000 packed tokens: the block-mask path's loss and gradients are within
    bf16 rounding of the dense-mask path's (both against the fp32 dense path); the block mask's
    tensors are the same under torch.compile; the compiled model (which keeps the dense mask)
    gives the eager loss; three other lengths run in one process (flex recompiles
    for new shapes without reaching the recompile limit)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    config = ligerzoo.models.config_from_hf(cfg.to_dict())
    with torch.device("cuda"):
        model = ligerzoo.CausalLM(config)
    B, T = 2, 1000
    ids = torch.randint(0, 1000, (B, T), device="cuda")
    pos = _packed_positions(B, T, 1).cuda()
    labels = ids.masked_fill(pos == 0, -100)

    def run(m, enabled):
        monkeypatch.setattr(flex, "ENABLED", enabled)
        m.zero_grad()
        loss = m(ids, labels=labels, position_ids=pos).loss
        loss.backward()
        return loss.detach().float(), [p.grad.float() for p in m.parameters()]

    ref_loss, ref_grads = run(model, False)  # fp32, dense mask
    bf16 = ligerzoo.CausalLM(config).cuda().to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    errs = {}
    for enabled in (True, False):
        loss, grads = run(bf16, enabled)
        errs[enabled] = (abs(loss - ref_loss).item(),
                         max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)))
    assert errs[True][0] <= 2 * errs[False][0] + 1e-3 and errs[True][1] <= 2 * errs[False][1] + 1e-3, errs

    monkeypatch.setattr(flex, "ENABLED", True)
    from ligerzoo.models.transformer import packed_documents

    def tiles(p):  # the block mask's tensors, eager and compiled (inductor's sort on the GPU)
        m = flex.block_mask(T, packed_documents(p), 300, "cuda")
        return m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices, m.q_num_blocks, m.q_indices
    for a, b in zip(tiles(pos), torch.compile(tiles)(pos)):
        assert torch.equal(a, b)
    with torch.no_grad():  # compiled: the dense mask (flex.applies)
        eager = model(ids, labels=labels, position_ids=pos).loss
        compiled = torch.compile(model)(ids, labels=labels, position_ids=pos).loss
    print(f"fp32 loss: dense {ref_loss.item():.7f}, flex eager {eager.item():.7f}, compiled {compiled.item():.7f}")
    torch.testing.assert_close(eager, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled, ref_loss, atol=1e-5, rtol=1e-5)
    for t in (640, 900, 1300):
        p = _packed_positions(1, t, t).cuda()
        x = torch.randint(0, 1000, (1, t), device="cuda")
        want = torch.cat([model(x[:, p0:p1]).logits for p0, p1 in _spans(p[0])], dim=1)
        torch.testing.assert_close(model(x, position_ids=p).logits, want, atol=1e-4, rtol=1e-4)


def _spans(row: torch.Tensor) -> list[tuple[int, int]]:
    starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
    return list(zip(starts[:-1], starts[1:]))


def test_a_head_dim_flex_cannot_take_falls_back_to_the_dense_mask():
    """head_dim 12 (not a multiple of 16): the dense-mask SDPA path, same result as per
    document."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ligerzoo.CausalLM(ligerzoo.models.config_from_hf(cfg.to_dict()))
    assert not flex.applies(torch.device("cuda"), False, None, model.config.head_dim)
    p = _packed_positions(1, 300, 3).cuda()
    x = torch.randint(0, 100, (1, 300), device="cuda")
    want = torch.cat([model(x[:, a:b]).logits for a, b in _spans(p[0])], dim=1)
    torch.testing.assert_close(model(x, position_ids=p).logits, want, atol=1e-5, rtol=1e-5)


def test_gemma2_under_torch_compile_gives_the_eager_loss(tmp_path, no_tf32):
    """Gemma2 (softcap through flex_attention) compiled whole by the caller, fp32, 2 x 700
    tokens with a window of 200, packed and plain rows: inductor lowers the flex call (a dense
    or causal mask while compiling) and the loss and logits equal eager's."""
    make_hf("gemma2", tmp_path / "hf", **(SIZES | EXTRA["gemma2"]))
    model = ligerzoo.from_hf(tmp_path / "hf", device="cuda")
    compiled = torch.compile(model)
    B, T = 2, 700
    ids = torch.randint(3, model.config.vocab_size, (B, T), device="cuda")
    for pos in (_packed_positions(B, T, 4).cuda(), torch.arange(T, device="cuda").expand(B, T)):
        with torch.no_grad():
            want = model(ids, labels=ids, position_ids=pos)
            got = compiled(ids, labels=ids, position_ids=pos)
        torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)


def _attention_f64(q, k, v, scale, softcap):
    """Causal softcapped GQA attention in float64 from its definition (the reference)."""
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale  # (B, H, T, T)
    s = softcap * torch.tanh(s / softcap)
    T = q.shape[2]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the tiles are chosen for sm90 only (elsewhere both runs would take torch's)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head256_tiles_are_as_exact_as_torchs(monkeypatch, dtype):
    """Heads of 256 features (Gemma2), 16-bit, softcap 50, causal GQA 4/2 over 2 x 700 tokens:
    the output and every gradient under the tiles flex.py passes on sm90 (SM90_HEAD256_OPTIONS)
    are as close to float64 attention as under torch's default tiles (within 2x of their error)."""
    B, H, KV, T, D = 2, 4, 2, 700, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, n, T, D, device="cuda", generator=g).to(dtype) for n in (H, KV, KV, H))
    scale, cap = D ** -0.5 * 4, 50.0  # scores of standard deviation 4, up to about 15 (bent by about 3%)
    want = _attention_f64(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), scale, cap)
    want_grads = torch.autograd.grad(want, (q, k, v), do.double())
    assert flex._kernel_options(q, (128, 128)) is flex.SM90_HEAD256_OPTIONS

    def errors():
        out = flex.attention(q, k, v, None, scale, cap)
        grads = torch.autograd.grad(out, (q, k, v), do)
        return [((a.double() - b).norm() / b.norm()).item() for a, b in zip((out, *grads), (want, *want_grads))]
    tuned = errors()
    monkeypatch.setattr(flex, "SM90_HEAD256_OPTIONS", None)
    default = errors()
    print(f"relative errors (out, dq, dk, dv): tuned {tuned}, torch's tiles {default}")
    assert all(e < 0.02 for e in tuned), tuned
    assert all(a <= 2 * b + 1e-4 for a, b in zip(tuned, default)), (tuned, default)
