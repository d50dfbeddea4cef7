"""RoPE (HF half-split layout) against float64 references, through the Triton kernel
(interpreter on CPU, see conftest) and through the forced torch-reference dispatch; cos/sin
tables against Hugging Face's rotary embedding, bit for bit.

Tolerances: the kernel computes each output element in fp32 from the input and the fp32
cos/sin and rounds once, so it is compared with the float64 result of the same inputs and
tables within a few ulps of the output dtype (relative, with the largest element as a
floor). The CPU interpreter truncates fp32 -> bf16 (up to 1 ulp instead of 1/2).
"""
import pytest
import torch

from ligerzoo.kernels.rope import rope, rope_cos_sin, rope_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

rope_mod = kernel_module("rope")


ULPS = {torch.float32: 16, torch.bfloat16: 2}


def _inv_freq(rotary_dim, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def _positions(B, T):
    """Rows with different positions: from 0, past 8192, and far out (left-padded/packed)."""
    starts = [0, 8190, 123_456, 7][:B]
    return torch.stack([torch.arange(T) + s for s in starts])


def _check(q, k, cos, sin, dtype, q_ref=None, k_ref=None, half_table=False):
    """rope(q, k) and its gradients against the float64 reference of the same values.

    q_ref / k_ref: contiguous copies with the same values (when q/k are strided views)."""
    q_ref = q if q_ref is None else q_ref
    k_ref = k if k_ref is None else k_ref
    qo, ko = rope(q, k, cos, sin, half_table=half_table)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype and ko.dtype == dtype
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))

    q64, k64 = q_ref.detach().double().requires_grad_(), k_ref.detach().double().requires_grad_()
    qo64, ko64 = rope_reference(q64, k64, cos.double(), sin.double(), half_table=half_table)
    torch.autograd.backward((qo64, ko64), (gq.double(), gk.double()))
    ulps = ULPS[dtype]
    assert_close_ulps(qo, qo64, dtype, ulps)
    assert_close_ulps(ko, ko64, dtype, ulps)
    assert_close_ulps(dq, q64.grad, dtype, ulps)
    assert_close_ulps(dk, k64.grad, dtype, ulps)
    return dq, dk


CONFIGS = {
    # name: (B, T, Hq, Hk, D, R)
    "gqa_full": (2, 5, 4, 2, 16, 16),
    "mqa_hk1": (3, 7, 5, 1, 16, 16),
    "partial_rotary": (2, 6, 3, 3, 20, 12),   # phi-4-mini style: rotate R < D dims
    "mha_odd_half": (2, 3, 2, 2, 14, 10),     # R/2 = 5, not a power of two
}


@parametrize_dtype
@pytest.mark.parametrize("name", list(CONFIGS))
def test_rope_matches_float64(path, dtype, name):
    B, T, Hq, Hk, D, R = CONFIGS[name]
    cos, sin = rope_cos_sin(_positions(B, T), _inv_freq(R, 500000.0))
    q = torch.randn(B, T, Hq, D).to(dtype)
    k = torch.randn(B, T, Hk, D).to(dtype)
    q0, k0, c0 = q.clone(), k.clone(), cos.clone()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    _check(qr, kr, cos, sin, dtype)
    if R < D:  # pass-through dims are copied bit for bit, and their gradient too
        qo, _ = rope(q, k, cos, sin)
        assert torch.equal(qo[..., R:], q[..., R:])
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(cos, c0)
    assert torch.equal(qr.detach(), q0) and torch.equal(kr.detach(), k0)


@parametrize_dtype
def test_rope_fused_qkv_views(path, dtype):
    """q and k as head views of one fused (B, T, (Hq + 2Hk) * D) projection output."""
    B, T, Hq, Hk, D = 2, 5, 4, 2, 16
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D).to(dtype).requires_grad_()
    heads = qkv.view(B, T, Hq + 2 * Hk, D)
    q, k = heads[:, :, :Hq], heads[:, :, Hq:Hq + Hk]
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = rope_cos_sin(_positions(B, T), _inv_freq(D))
    qkv0 = qkv.detach().clone()
    qo, ko = rope(q, k, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    (dqkv,) = torch.autograd.grad((qo, ko), qkv, (gq, gk))
    dheads = dqkv.view(B, T, Hq + 2 * Hk, D)

    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    qo64, ko64 = rope_reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((qo64, ko64), (gq.double(), gk.double()))
    assert_close_ulps(qo, qo64, dtype, ULPS[dtype])
    assert_close_ulps(ko, ko64, dtype, ULPS[dtype])
    assert_close_ulps(dheads[:, :, :Hq], q64.grad, dtype, ULPS[dtype])
    assert_close_ulps(dheads[:, :, Hq:Hq + Hk], k64.grad, dtype, ULPS[dtype])
    assert torch.count_nonzero(dheads[:, :, Hq + Hk:]) == 0  # v receives nothing
    assert torch.equal(qkv.detach(), qkv0)


class _LaunchSpy:
    """Stands in for a kernel and records the keyword arguments of each launch."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("one_tile", [True, False])
def test_rope_head_blocks_and_cos_layouts(monkeypatch, one_tile, wide):
    """All heads in one tile, or several head blocks per token (a tile limit below the heads'
    size); cos/sin as (1, T, R) and (T, R) broadcast over batch; 32-bit offsets within a token,
    or the 64-bit ones that heads past element 2^31 of their token need (forced here)."""
    if not one_tile:
        monkeypatch.setattr(rope_mod, "_MAX_BLOCK_HEADS", 2)
        monkeypatch.setattr(rope_mod, "_TILE_ELEMS", 16)
    if wide:
        monkeypatch.setattr(rope_mod, "_WIDE_AT", 1)
    if rope_mod.HAS_TRITON:
        spy = _LaunchSpy(rope_mod._rope_kernel)
        monkeypatch.setattr(rope_mod, "_rope_kernel", spy)
    B, T, Hq, Hk, D = 3, 4, 5, 3, 12
    cos3, sin3 = rope_cos_sin(torch.arange(T) + 9000, _inv_freq(D))   # (1, T, R)
    for cos, sin in ((cos3, sin3), (cos3[0], sin3[0]), (cos3.expand(B, T, D), sin3.expand(B, T, D))):
        q = torch.randn(B, T, Hq, D, requires_grad=True)
        k = torch.randn(B, T, Hk, D, requires_grad=True)
        _check(q, k, cos, sin, torch.float32)
    # partial rotary (R = 8 of D = 12): the pass-through copy
    pcos, psin = rope_cos_sin(torch.arange(T), _inv_freq(8))
    _check(torch.randn(B, T, Hq, D, requires_grad=True), torch.randn(B, T, Hk, D, requires_grad=True), pcos, psin,
           torch.float32)
    # BHTD buffers viewed as BTHD (head stride T*D): strides honoured
    q = torch.randn(B, Hq, T, D, requires_grad=True).transpose(1, 2)
    k = torch.randn(B, Hk, T, D, requires_grad=True).transpose(1, 2)
    _check(q, k, cos3, sin3, torch.float32)
    if rope_mod.HAS_TRITON:
        assert spy.kwargs and all(kw["WIDE"] is wide and kw["ONE_TILE"] is one_tile for kw in spy.kwargs)


@pytest.mark.skipif(not rope_mod.HAS_TRITON,
                    reason="checks the flags of the Triton kernel's launches; without Triton rope runs the torch reference")
def test_rope_head_strides_compile_time_only_when_dense(monkeypatch):
    """Heads contiguous within a token (head stride D, a model's layouts): the head strides are
    compile-time constants. A (B, H, T, D) buffer seen as (B, T, H, D) (head stride T D) has them
    read at run time, so another sequence length launches with the same constants (no new
    compile). A lone head's stride is never used: one past 2^31 is fine (a review's case)."""
    spy = _LaunchSpy(rope_mod._rope_kernel)
    monkeypatch.setattr(rope_mod, "_rope_kernel", spy)
    B, Hq, Hk, D = 2, 3, 2, 8
    for T in (3, 5):
        cos, sin = rope_cos_sin(torch.arange(T), _inv_freq(D))
        _check(torch.randn(B, T, Hq, D, requires_grad=True), torch.randn(B, T, Hk, D, requires_grad=True),
               cos, sin, torch.float32)
        assert all(kw["DENSE_HEADS"] is True for kw in spy.kwargs)
        spy.kwargs.clear()
    constants = []
    for T in (3, 5):
        cos, sin = rope_cos_sin(torch.arange(T), _inv_freq(D))
        q = torch.randn(B, Hq, T, D, requires_grad=True).transpose(1, 2)
        k = torch.randn(B, Hk, T, D, requires_grad=True).transpose(1, 2)
        _check(q, k, cos, sin, torch.float32)
        # the forward reads the strided buffers; the backward gets contiguous gradients
        assert [kw["DENSE_HEADS"] for kw in spy.kwargs] == [False, True]
        constants.append([tuple(sorted(kw.items())) for kw in spy.kwargs])
        spy.kwargs.clear()
    assert constants[0] == constants[1]
    # one k head whose stride (never used) is 2^31: (B, 1, T, D) viewed as (B, T, 1, D) with T D >= 2^31
    T = 3
    cos, sin = rope_cos_sin(torch.arange(T), _inv_freq(D))
    q = torch.randn(B, T, Hq, D)
    k = torch.randn(B * T * D).as_strided((B, T, 1, D), (T * D, D, 1 << 31, 1))
    qo, ko = rope(q, k, cos, sin)
    want = rope_reference(q.double(), k.double(), cos.double(), sin.double())
    assert_close_ulps(qo, want[0], torch.float32, ULPS[torch.float32])
    assert_close_ulps(ko, want[1], torch.float32, ULPS[torch.float32])
    assert spy.kwargs[-1]["DENSE_HEADS"] is True and spy.kwargs[-1]["WIDE"] is False


def test_rope_grad_of_unused_output(path):
    B, T, Hq, Hk, D = 2, 3, 2, 1, 8
    cos, sin = rope_cos_sin(_positions(B, T), _inv_freq(D))
    q = torch.randn(B, T, Hq, D, requires_grad=True)
    k = torch.randn(B, T, Hk, D, requires_grad=True)
    qo, _ = rope(q, k, cos, sin)
    g = torch.randn_like(qo)
    qo.backward(g)
    q64 = q.detach().double().requires_grad_()
    qo64, _ = rope_reference(q64, k.detach().double(), cos.double(), sin.double())
    qo64.backward(g.double())
    assert_close_ulps(q.grad, q64.grad, torch.float32, 16)
    assert k.grad is None or torch.count_nonzero(k.grad) == 0


def test_rope_is_inverted_by_negative_angle():
    """rotate(+theta) then rotate(-theta) is the identity (the backward's math)."""
    B, T, H, D = 2, 5, 3, 16
    cos, sin = rope_cos_sin(_positions(B, T), _inv_freq(D))
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, 1, D)
    qo, ko = rope(q, k, cos, sin)
    qb, kb = rope(qo, ko, cos, -sin)
    torch.testing.assert_close(qb, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kb, k, rtol=1e-5, atol=1e-5)


def test_rope_cos_sin_matches_hf_bitwise():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    rot = LlamaRotaryEmbedding(cfg)
    pos = _positions(3, 6)
    x = torch.zeros(1, dtype=torch.float32)
    cos_hf, sin_hf = rot(x, pos)
    cos, sin = rope_cos_sin(pos, rot.inv_freq, rot.attention_scaling)
    assert cos.dtype == torch.float32 and cos.shape == (3, 6, 16)
    assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)
    # 1-D position ids give a batch of one
    c1, s1 = rope_cos_sin(torch.arange(6), rot.inv_freq)
    c1_hf, s1_hf = rot(x, torch.arange(6)[None])
    assert c1.shape == (1, 6, 16) and torch.equal(c1, c1_hf) and torch.equal(s1, s1_hf)
    # scaling multiplies both tables
    c2, s2 = rope_cos_sin(pos, rot.inv_freq, 1.19)
    assert torch.equal(c2, cos * 1.19) and torch.equal(s2, sin * 1.19)


def test_rope_matches_hf_apply_rotary_pos_emb_partial():
    """HF Phi-3 apply_rotary_pos_emb (rotary_dim = cos.shape[-1]) in the BTHD layout."""
    pytest.importorskip("transformers")
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    B, T, Hq, Hk, D, R = 2, 5, 4, 2, 16, 12
    cos, sin = rope_cos_sin(_positions(B, T), _inv_freq(R))
    q, k = torch.randn(B, T, Hq, D), torch.randn(B, T, Hk, D)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    qo, ko = rope(q, k, cos, sin)
    torch.testing.assert_close(qo, q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko, k_hf, rtol=1e-6, atol=1e-6)


def test_rope_errors():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 2, 8)
    cos, sin = rope_cos_sin(torch.arange(3), _inv_freq(8))
    with pytest.raises(ValueError, match="BTHD"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="must match q"):
        rope(q, torch.randn(2, 3, 2, 6), cos, sin)
    with pytest.raises(ValueError, match="rotary dim"):
        rope(q, k, cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="rotary dim"):
        rope(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    with pytest.raises(ValueError, match=r"\(B, T, R\)"):
        rope(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="detached"):
        rope(q, k, cos.requires_grad_(), sin)
    with pytest.raises(ValueError, match="position_ids"):
        rope_cos_sin(torch.zeros(1, 2, 3), _inv_freq(8))


@parametrize_dtype
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("one_tile", [True, False])
def test_half_table_equals_the_full_table(path, dtype, name, one_tile, monkeypatch):
    """half_table=True with the first half of HF's tables gives the full tables' results bit
    for bit (the same products), forward and backward, in place and not, and matches float64."""
    if not one_tile:
        monkeypatch.setattr(rope_mod, "_MAX_BLOCK_HEADS", 1)
        monkeypatch.setattr(rope_mod, "_TILE_ELEMS", 8)
    B, T, Hq, Hk, D, R = CONFIGS[name]
    pos, inv = _positions(B, T), _inv_freq(R, 500000.0)
    cos, sin = rope_cos_sin(pos, inv)
    hcos, hsin = rope_cos_sin(pos, inv, half_table=True)
    assert hcos.shape == (B, T, R // 2)
    assert torch.equal(hcos, cos[..., : R // 2]) and torch.equal(hsin, sin[..., : R // 2])
    q = torch.randn(B, T, Hq, D).to(dtype).requires_grad_()
    k = torch.randn(B, T, Hk, D).to(dtype).requires_grad_()
    gq, gk = torch.randn(B, T, Hq, D).to(dtype), torch.randn(B, T, Hk, D).to(dtype)
    full = rope(q, k, cos, sin)
    dfull = torch.autograd.grad(full, (q, k), (gq, gk))
    for backward_inplace in (False, True):
        half = rope(q, k, hcos, hsin, backward_inplace, half_table=True)
        dhalf = torch.autograd.grad(half, (q, k), (gq.clone(), gk.clone()))
        for a, b in zip(full + dfull, half + dhalf):
            assert torch.equal(a, b)
    # and against float64 on its own (the reference expands the half table)
    q64, k64 = q.detach().double(), k.detach().double()
    want = rope_reference(q64, k64, cos.double(), sin.double())
    got = rope_reference(q64, k64, hcos.double(), hsin.double(), half_table=True)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert_close_ulps(full[0], want[0], dtype, ULPS[dtype])


def test_half_table_argument_errors():
    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 1, 8)
    cos, sin = rope_cos_sin(torch.arange(3), _inv_freq(8), half_table=True)   # (1, 3, 4)
    with pytest.raises(ValueError, match="half_table"):
        rope(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1), half_table=True)  # R = 16 > 8
    with pytest.raises(ValueError, match="half_table"):
        rope(q, k, cos[..., :0], sin[..., :0], half_table=True)
    qo, ko = rope(q, k, cos[..., :3], sin[..., :3], half_table=True)  # R = 6 < 8: partial rotary
    want = rope_reference(q, k, torch.cat((cos[..., :3],) * 2, -1), torch.cat((sin[..., :3],) * 2, -1))
    torch.testing.assert_close(qo, want[0])
    torch.testing.assert_close(ko, want[1])


def test_rope_backward_inplace_leaves_a_shared_gradient_alone():
    """backward_inplace with q and k concatenated and added to another tensor: the add hands
    one gradient buffer to the cat (whose backward splits it into interleaved dq and dk) and
    to the other input, so it must not be rotated in place."""
    B, T, Hq, Hk, D = 2, 3, 4, 2, 8
    cos, sin = rope_cos_sin(_positions(B, T), _inv_freq(D))
    q = torch.randn(B, T, Hq, D, requires_grad=True)
    k = torch.randn(B, T, Hk, D, requires_grad=True)
    other = torch.randn(B, T, Hq + Hk, D, requires_grad=True)
    w = torch.randn(B, T, Hq + Hk, D)

    def grads(backward_inplace):  # the add's gradient buffer is autograd's own (from the * w)
        y = torch.cat(rope(q, k, cos, sin, backward_inplace=backward_inplace), 2) + other
        return torch.autograd.grad((y * w).sum(), (q, k, other))

    want, got = grads(False), grads(True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "expanded", "shared"])
def test_rope_backward_inplace(layout):
    """backward_inplace=True: the same gradients, written over the incoming output
    gradients when they can be (unit last-dim stride, no overlapping elements); expanded
    gradients (stride 0) are never written."""
    B, T, Hq, Hk, D, R = 2, 5, 4, 2, 16, 12
    cos, sin = rope_cos_sin(_positions(B, T), _inv_freq(R))
    q = torch.randn(B, T, Hq, D, requires_grad=True)
    k = torch.randn(B, T, Hk, D, requires_grad=True)
    if layout == "contiguous":
        gq, gk = torch.randn(B, T, Hq, D), torch.randn(B, T, Hk, D)
    elif layout == "transposed":  # what attention's backward hands back: (B, H, T, D) storage
        gq, gk = torch.randn(B, Hq, T, D).transpose(1, 2), torch.randn(B, Hk, T, D).transpose(1, 2)
    elif layout == "expanded":
        gq, gk = torch.randn(1, 1, 1, D).expand(B, T, Hq, D), torch.randn(1, T, 1, D).expand(B, T, Hk, D)
    else:  # two views of one buffer (what autograd hands over when the outputs meet in a reshape)
        k = torch.randn(B, T, Hq, D, requires_grad=True)
        g = torch.randn(B, T, Hq, D)
        gq, gk = g.view(B, T, Hq, D), g.view(B, T, Hq, D)
    gq0, gk0 = gq.clone(), gk.clone()
    expected = torch.autograd.grad(rope(q, k, cos, sin), (q, k), (gq.clone(), gk.clone()))
    dq, dk = torch.autograd.grad(rope(q, k, cos, sin, backward_inplace=True), (q, k), (gq, gk))
    torch.testing.assert_close(dq, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(dk, expected[1], rtol=0, atol=0)
    if layout in ("expanded", "shared"):
        assert torch.equal(gq, gq0) and torch.equal(gk, gk0)
    else:
        assert dq.data_ptr() == gq.data_ptr() and dk.data_ptr() == gk.data_ptr()


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("half_table", [False, True])
def test_rope_inplace(half_table):
    """inplace=True: q and k (here head views of one fused projection, as a model makes them)
    rotated over themselves and returned, with the out-of-place op's bits and gradients;
    refused for leaves that require grad and for overlapping memory."""
    torch.manual_seed(4)
    B, T, Hq, Hk, D, R = 2, 5, 4, 2, 16, 12
    cos, sin = rope_cos_sin(_positions(B, T), _inv_freq(R), half_table=half_table)
    qkv0 = torch.randn(B, T, (Hq + 2 * Hk) * D)
    gq, gk = torch.randn(B, T, Hq, D), torch.randn(B, T, Hk, D)

    def heads(t):
        h = t.view(B, T, Hq + 2 * Hk, D)
        return h[:, :, :Hq], h[:, :, Hq:Hq + Hk]

    leaf = qkv0.clone().requires_grad_()
    want = rope(*heads(leaf), cos, sin, half_table=half_table)
    (dwant,) = torch.autograd.grad(want, leaf, (gq, gk))
    triton_path = rope_mod._utils.triton_ok(leaf)
    for backward_inplace in (False, True):
        leaf = qkv0.clone().requires_grad_()
        proj = leaf * 1                                    # a projection's fresh output
        q, k = heads(proj)
        qo, ko = rope(q, k, cos, sin, backward_inplace, half_table=half_table, inplace=True)
        assert torch.equal(qo, want[0]) and torch.equal(ko, want[1])
        if triton_path:
            assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
            assert torch.equal(heads(proj)[0], want[0])      # written into the projection itself
        (d,) = torch.autograd.grad((qo, ko), leaf, (gq.clone(), gk.clone()))
        assert torch.equal(d, dwant)
    # separate q and k (not views): one Function and one launch for both
    q_leaf, k_leaf = (h.detach().clone().requires_grad_() for h in heads(qkv0))
    q, k = q_leaf * 1, k_leaf * 1
    qo, ko = rope(q, k, cos, sin, half_table=half_table, inplace=True)
    assert torch.equal(qo, want[0]) and torch.equal(ko, want[1])
    dq, dk = torch.autograd.grad((qo, ko), (q_leaf, k_leaf), (gq, gk))
    dheads = dwant.view(B, T, Hq + 2 * Hk, D)
    assert torch.equal(dq, dheads[:, :, :Hq]) and torch.equal(dk, dheads[:, :, Hq:Hq + Hk])
    if triton_path:
        assert qo.data_ptr() == q.data_ptr() and type(qo.grad_fn).__name__.startswith("_RopeInplace")
    with torch.no_grad():                                  # no autograd: the plain op
        q, k = heads(qkv0.clone())
        qo, ko = rope(q, k, cos, sin, half_table=half_table, inplace=True)
        assert torch.equal(qo, want[0]) and torch.equal(ko, want[1])
    if triton_path:
        q, k = torch.randn(B, T, Hq, D, requires_grad=True), torch.randn(B, T, Hk, D)
        q0, k0 = q.detach().clone(), k.clone()
        with pytest.raises(RuntimeError, match="leaf"):  # refused before any write
            rope(q, k, cos, sin, half_table=half_table, inplace=True)
        assert torch.equal(q.detach(), q0) and torch.equal(k, k0)
        leaf = qkv0.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="leaf"):  # views of a leaf too
            rope(*heads(leaf), cos, sin, half_table=half_table, inplace=True)
        assert torch.equal(leaf.detach(), qkv0)
        for separate in (False, True):  # one Function per view, or one for both
            leaf = qkv0.clone().requires_grad_()
            q, k = heads(leaf * 1) if not separate else (h * 1 for h in heads(leaf))
            qo, ko = rope(q, k, cos, sin, half_table=half_table, inplace=True)
            with pytest.raises(RuntimeError, match="second-order"):
                torch.autograd.grad((qo, ko), leaf, (gq, gk), create_graph=True)
        bhtd = torch.randn(B, Hq + Hk, T, D)   # head slices of one (B, H, T, D) buffer
        q, k = bhtd[:, :Hq].transpose(1, 2), bhtd[:, Hq:].transpose(1, 2)
        ref = rope(q, k, cos, sin, half_table=half_table)
        qo, ko = rope(q, k, cos, sin, half_table=half_table, inplace=True)
        assert torch.equal(qo, ref[0]) and torch.equal(ko, ref[1]) and qo.data_ptr() == q.data_ptr()
        shared = torch.randn(B, T, Hq, D)
        with pytest.raises(ValueError, match="no memory shared"):
            rope(shared, shared[:, :, :Hk], cos, sin, half_table=half_table, inplace=True)
        with pytest.raises(ValueError, match="unit last-dim"):
            rope(torch.randn(B, T, Hq, 2 * D)[..., ::2], torch.randn(B, T, Hk, D), cos, sin,
                 half_table=half_table, inplace=True)


def test_non_overlapping():
    from ligerzoo.kernels._utils import non_overlapping

    t = torch.randn(2, 3, 4, 5)
    assert non_overlapping(t) and non_overlapping(t.transpose(1, 2)) and non_overlapping(t[:, :, ::2])
    assert not non_overlapping(torch.randn(1, 5).expand(3, 5))
    assert not non_overlapping(torch.randn(10).as_strided((3, 4), (2, 1)))
    assert non_overlapping(torch.randn(1, 1, 3).expand(1, 1, 3))  # size-1 dims do not count


def test_disjoint():
    from ligerzoo.kernels._utils import disjoint

    t = torch.randn(4, 6)
    assert disjoint(t[:2], t[2:]) and disjoint(t, torch.randn(3)) and disjoint(t[:0], t)
    assert not disjoint(t, t.view(24))
    # interleaved slices of one buffer: the column halves, or the q and k heads of a fused qkv
    assert disjoint(t[:, :3], t[:, 3:]) and disjoint(t[:, 3:], t[:, :3]) and not disjoint(t[:, :4], t[:, 3:])
    B, T, Hq, Hk, D = 2, 3, 4, 2, 5
    heads = torch.randn(B, T, (Hq + 2 * Hk) * D).view(B, T, Hq + 2 * Hk, D)
    q, k, v = heads[:, :, :Hq], heads[:, :, Hq:Hq + Hk], heads[:, :, Hq + Hk:]
    assert disjoint(q, k) and disjoint(k, v) and disjoint(q, v)
    assert not disjoint(heads[:, :, :Hq + 1], k) and not disjoint(q, heads[:, :, 1:Hq + 1])
    # head slices of one (B, H, T, D) buffer seen as (B, T, H, D): the heads interleave with T
    bhtd = torch.randn(B, Hq + Hk, T, D)
    assert disjoint(bhtd[:, :Hq].transpose(1, 2), bhtd[:, Hq:].transpose(1, 2))
    assert not disjoint(bhtd[:, :Hq + 1].transpose(1, 2), bhtd[:, Hq:].transpose(1, 2))
    # equal strides whose leading step does not move past both spans: elements 3 and 6 shared
    x = torch.randn(20)
    assert not disjoint(x.as_strided((3, 2), (3, 1)), x.as_strided((3, 2), (3, 1), 2))
    assert disjoint(x.as_strided((3, 2), (4, 1)), x.as_strided((3, 2), (4, 1), 2))
    # brute force over small strided pairs of one buffer: disjoint() never says True wrongly
    torch.manual_seed(0)
    buf = torch.arange(64.0)
    interleaved_found = 0
    for i in range(1500):
        dims = 2 + i % 3                                                # 2-D to 4-D
        shape = tuple(int(v) for v in torch.randint(1, 4, (dims,)))
        stride = tuple(int(v) for v in torch.randint(1, 6, (dims,)))
        offs = [int(v) for v in torch.randint(0, 20, (2,))]
        other = list(shape)
        other[i % dims] = 1 + i % 3                                     # sizes may differ in one dim
        a, b = buf.as_strided(shape, stride, offs[0]), buf.as_strided(other, stride, offs[1])
        shared = bool(set(a.flatten().tolist()) & set(b.flatten().tolist()))
        assert not (disjoint(a, b) and shared), (shape, stride, offs)
        spans_meet = not disjoint(a, b, interleaved=False)
        interleaved_found += spans_meet and disjoint(a, b)
    assert interleaved_found >= 10  # the interleaved test is exercised (17 pairs), not only the span test


def test_rope_opcheck_and_compile():
    from torch.library import opcheck

    q = torch.randn(2, 3, 4, 8, requires_grad=True)
    k = torch.randn(2, 3, 1, 8, requires_grad=True)
    cos, sin = rope_cos_sin(_positions(2, 3), _inv_freq(6))
    opcheck(torch.ops.ligerzoo.rope, (q, k, cos, sin, False, False))
    opcheck(torch.ops.ligerzoo.rope, (q, k, cos, sin, True, False))
    opcheck(torch.ops.ligerzoo.rope_backward, (q.detach(), k.detach(), cos, sin, False))
    half = (cos[..., :3].contiguous(), sin[..., :3].contiguous())
    opcheck(torch.ops.ligerzoo.rope, (q, k, *half, True, True))
    opcheck(torch.ops.ligerzoo.rope_backward, (q.detach(), k.detach(), *half, True))
    opcheck(torch.ops.ligerzoo.rope_, (q.detach().clone(), k.detach().clone(), *half, False, True))
    opcheck(torch.ops.ligerzoo.rope_, (q.detach().clone(), k.detach().clone(), cos, sin, True, False))

    def f(q, k):
        qo, ko = rope(q, k, cos, sin)
        return (qo * 2).sum() + (ko * 3).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gc = torch.autograd.grad(compiled(q, k), (q, k))
    ge = torch.autograd.grad(f(q, k), (q, k))
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)

    # half tables and the in-place forward on a projection's head views, traced whole
    hcos, hsin = rope_cos_sin(_positions(2, 3), _inv_freq(6), half_table=True)
    qkv = torch.randn(2, 3, 6 * 8, requires_grad=True)

    def g(qkv):
        heads = (qkv * 1).view(2, 3, 6, 8)                 # a fresh (non-leaf) projection output
        qo, ko = rope(heads[:, :, :4], heads[:, :, 4:5], hcos, hsin, True, half_table=True, inplace=True)
        return (qo * 2).square().sum() + (ko * 3).sum() + heads[:, :, 5:].sum()

    gc = torch.autograd.grad(torch.compile(g, fullgraph=True, backend="aot_eager")(qkv), qkv)[0]
    torch.testing.assert_close(gc, torch.autograd.grad(g(qkv), qkv)[0])


# ----------------------------------------------------------------------------- GPU
@parametrize_dtype
@pytest.mark.parametrize("rotary_dim", [128, 96])
@pytest.mark.parametrize("half_table", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rope(dtype, rotary_dim, half_table):
    torch.manual_seed(0)
    B, T, Hq, Hk, D = 2, 8192, 32, 8, 128
    pos = torch.stack([torch.arange(T), torch.arange(T) + 100_000]).cuda()
    cos, sin = rope_cos_sin(pos, _inv_freq(rotary_dim, 500000.0), half_table=half_table)
    q = torch.randn(B, T, Hq, D, device="cuda").to(dtype).requires_grad_()
    k = torch.randn(B, T, Hk, D, device="cuda").to(dtype).requires_grad_()
    _check(q, k, cos, sin, dtype, half_table=half_table)


@pytest.mark.parametrize("half_table", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rope_head_blocks(half_table):
    """128 query heads of 128 (Llama-3-405B's shape): more than one tile, the heads in blocks."""
    torch.manual_seed(0)
    B, T, Hq, Hk, D = 1, 1024, 128, 8, 128
    assert Hq * D // 2 > rope_mod._TILE_ELEMS
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda") + 7, _inv_freq(D, 500000.0), half_table=half_table)
    q = torch.randn(B, T, Hq, D, device="cuda").bfloat16().requires_grad_()
    k = torch.randn(B, T, Hk, D, device="cuda").bfloat16().requires_grad_()
    _check(q, k, cos, sin, torch.bfloat16, half_table=half_table)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rope_fused_qkv_and_compile():
    torch.manual_seed(0)
    B, T, Hq, Hk, D = 4, 4096, 32, 8, 128
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda"), _inv_freq(D, 500000.0))

    def f(qkv):
        heads = qkv.view(B, T, Hq + 2 * Hk, D)
        qo, ko = rope(heads[:, :, :Hq], heads[:, :, Hq:Hq + Hk], cos, sin)
        return qo.float().square().sum() + ko.float().sum()

    gc = torch.autograd.grad(torch.compile(f, fullgraph=True)(qkv), qkv)[0]
    ge = torch.autograd.grad(f(qkv), qkv)[0]
    torch.testing.assert_close(gc, ge)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rope_past_2_31_elements():
    """Tokens beyond element 2^31 of q are addressed with 64-bit offsets."""
    B, T, Hq, Hk, D = 1, (1 << 31) // (16 * 128) + 8, 16, 2, 128
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda"), _inv_freq(D))
    qo, ko = rope(q, k, cos, sin)
    tail = slice(T - 64, T)
    qo64, ko64 = rope_reference(q[:, tail].double(), k[:, tail].double(), cos[:, tail].double(), sin[:, tail].double())
    assert_close_ulps(qo[:, tail], qo64, torch.bfloat16, 2)
    assert_close_ulps(ko[:, tail], ko64, torch.bfloat16, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("wide", [True, False])
def test_gpu_rope_head_offsets_past_2_31(monkeypatch, wide):
    """A (B, H, T, D) buffer viewed as (B, T, H, D), whose last heads start past element 2^31
    (head offsets need 64 bits), rotated out of place and in place; and the 32-bit branch at its
    edge: the largest T it takes (its last head starts 2048 elements under 2^31)."""
    Hq, Hk, D = 16, 2, 128
    if wide:
        T = (1 << 31) // ((Hq - 1) * D) + 8
    else:  # the launcher's bound: 15 T D + D + 64 must stay under 2^31 - 1
        T = (rope_mod._WIDE_AT - D - 64) // ((Hq - 1) * D)
        assert (Hq - 1) * (T + 1) * D + D + 64 >= rope_mod._WIDE_AT  # one token more would go wide
    spy = _LaunchSpy(rope_mod._rope_kernel)
    monkeypatch.setattr(rope_mod, "_rope_kernel", spy)
    q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # (1, T, Hq, D)
    k = torch.randn(1, Hk, T, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda"), _inv_freq(D), half_table=True)
    rows = torch.tensor([0, 1, T // 2, T - 2, T - 1], device="cuda")
    want = rope_reference(q[:, rows].double(), k[:, rows].double(), *(torch.cat((c, c), -1)[:, rows].double()
                                                                     for c in (cos, sin)))
    qo, ko = rope(q, k, cos, sin, half_table=True)
    assert_close_ulps(qo[:, rows], want[0], torch.bfloat16, 2)
    assert_close_ulps(ko[:, rows], want[1], torch.bfloat16, 2)
    del qo, ko
    rope(q, k, cos, sin, half_table=True, inplace=True)
    assert [kw["WIDE"] for kw in spy.kwargs] == [wide, wide]
    assert_close_ulps(q[:, rows], want[0], torch.bfloat16, 2)
    assert_close_ulps(k[:, rows], want[1], torch.bfloat16, 2)
