"""Qwen2-VL multimodal RoPE: cos/sin tables against float64 and against Hugging Face's own
Qwen2VLRotaryEmbedding / apply_rotary_pos_emb, through the Triton kernel (interpreter on
CPU, see conftest) and through the forced torch-reference dispatch; the rotation (rope.py's
kernels) and its gradients against float64.

Tolerances: the table entry for frequency j is cos/sin of ONE fp32 number,
``float32(pos) * inv_freq[j]`` (HF's definition), so the float64 expectation takes that
same fp32 angle and evaluates cos/sin in float64; fp32 cos/sin implementations (torch,
numpy in the interpreter, libdevice on the GPU) are within ~1 ulp of it. The torch
reference path reproduces HF's ops in HF's order, so it is compared bit for bit.
"""

import pytest
import torch

import ligerzoo.kernels._utils as kutils
from ligerzoo.kernels.mrope import mrope, mrope_cos_sin, mrope_cos_sin_reference
from ligerzoo.kernels.rope import rope_cos_sin, rope_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

# The op module itself (the package re-exports functions under the same names).
mrope_mod = kernel_module("mrope")


ULPS = {torch.float32: 16, torch.bfloat16: 2}


def _inv_freq(rotary_dim, theta=1_000_000.0):
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def _mm_positions(B, T, seed=0):
    """(3, B, T) ids that differ per axis: a text run, an image grid (t, h, w), text again,
    one row shifted far out (long context)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.zeros(3, B, T, dtype=torch.int64)
    for b in range(B):
        start = [0, 70_000, 5][b % 3]
        n_text = min(2, T)
        pos[:, b, :n_text] = start + torch.arange(n_text)
        nxt = start + n_text
        n_img = max(0, T - n_text - 1)
        if n_img:
            hh, ww = torch.meshgrid(torch.arange(n_img), torch.arange(n_img), indexing="ij")
            pos[0, b, n_text:n_text + n_img] = nxt + torch.randint(0, 3, (n_img,), generator=g)
            pos[1, b, n_text:n_text + n_img] = nxt + hh.flatten()[:n_img] % 4
            pos[2, b, n_text:n_text + n_img] = nxt + ww.flatten()[:n_img] % 5
            nxt = int(pos[:, b, : n_text + n_img].max()) + 1
        pos[:, b, n_text + n_img:] = nxt + torch.arange(T - n_text - n_img)
    return pos


def _expected_f64(pos, inv_freq, section, scaling=1.0):
    """HF 4.x formulation: cat(freqs, freqs) per axis, split by mrope_section * 2, chunk i
    from axis i % 3; cos/sin of the fp32 angle evaluated in float64."""
    freqs = pos.float()[..., None] * inv_freq.float()                     # (3, B, T, R/2) fp32
    emb = torch.cat((freqs, freqs), dim=-1).double()                       # (3, B, T, R)
    chunks = emb.split(list(section) * 2, dim=-1)
    mixed = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)    # (B, T, R)
    return mixed.cos() * scaling, mixed.sin() * scaling


SECTIONS = {
    "qwen2vl_128": [16, 24, 24],
    "small": [2, 3, 3],
    "odd": [3, 1, 5],        # R/2 = 9, not a power of two
    "empty_t": [0, 4, 2],    # a zero-size section
}


@pytest.mark.parametrize("scaling", [1.0, 0.75])
@pytest.mark.parametrize("name", list(SECTIONS))
def test_mrope_cos_sin_matches_float64(path, name, scaling):
    section = SECTIONS[name]
    inv = _inv_freq(2 * sum(section))
    pos = _mm_positions(3, 7)
    pos0 = pos.clone()
    cos, sin = mrope_cos_sin(pos, inv, section, scaling)
    assert cos.shape == (3, 7, 2 * sum(section)) and cos.dtype == torch.float32 and cos.is_contiguous()
    c64, s64 = _expected_f64(pos, inv, section, scaling)
    assert_close_ulps(cos, c64, torch.float32, 4)
    assert_close_ulps(sin, s64, torch.float32, 4)
    assert torch.equal(pos, pos0)
    # the two RoPE halves are the same table
    h = sum(section)
    assert torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:])


def test_mrope_cos_sin_many_blocks_and_layouts(monkeypatch):
    """Several token and frequency blocks per launch; strided / int32 / float ids."""
    monkeypatch.setattr(mrope_mod, "_MAX_BLOCK_R", 4)
    monkeypatch.setattr(mrope_mod, "_TILE_ELEMS", 8)
    section = [3, 4, 4]
    inv = _inv_freq(22)
    pos = _mm_positions(2, 9, seed=1)
    c64, s64 = _expected_f64(pos, inv, section)
    variants = [
        pos,
        pos.permute(1, 0, 2).contiguous().permute(1, 0, 2),   # (B, 3, T) buffer seen as (3, B, T)
        pos.transpose(1, 2).contiguous().transpose(1, 2),     # time-major buffer
        pos.to(torch.int32),
        pos.to(torch.float64),
    ]
    for p in variants:
        cos, sin = mrope_cos_sin(p, inv, section)
        assert_close_ulps(cos, c64, torch.float32, 4)
        assert_close_ulps(sin, s64, torch.float32, 4)
    # inv_freq given in another dtype is used in fp32
    cos, _ = mrope_cos_sin(pos, inv.double(), section)
    assert_close_ulps(cos, c64, torch.float32, 4)


def test_mrope_cos_sin_matches_hf(path):
    pytest.importorskip("transformers")
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    section = [4, 6, 6]
    cfg = Qwen2VLTextConfig(
        hidden_size=64, num_attention_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
    )
    rot = Qwen2VLRotaryEmbedding(cfg)
    pos = _mm_positions(3, 8)
    cos_hf, sin_hf = rot(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = mrope_cos_sin(pos, rot.inv_freq, rot.mrope_section, rot.attention_scaling)
    assert cos.shape == cos_hf.shape == (3, 8, 32)
    if path == "reference":  # same torch ops in the same order
        assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)
    else:
        assert_close_ulps(cos, cos_hf, torch.float32, 4)
        assert_close_ulps(sin, sin_hf, torch.float32, 4)
    # HF's own text-only broadcast of (B, T) ids
    text = pos[0]
    c_hf, s_hf = rot(torch.zeros(1, dtype=torch.float32), text)
    c, s = mrope_cos_sin(text, rot.inv_freq, section)
    assert_close_ulps(c, c_hf, torch.float32, 4)
    assert_close_ulps(s, s_hf, torch.float32, 4)


def test_mrope_matches_hf_apply_rotary_pos_emb(path):
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    B, T, Hq, Hk, D = 2, 6, 4, 2, 16
    section = [2, 3, 3]
    cos, sin = mrope_cos_sin(_mm_positions(B, T), _inv_freq(D), section)
    q, k = torch.randn(B, T, Hq, D), torch.randn(B, T, Hk, D)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)   # BTHD layout
    qo, ko = mrope(q, k, cos, sin)
    torch.testing.assert_close(qo, q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko, k_hf, rtol=1e-6, atol=1e-6)


def test_mrope_text_only_is_rope(path):
    B, T, D = 3, 7, 16
    section = [2, 3, 3]
    inv = _inv_freq(D)
    text = torch.stack([torch.arange(T) + s for s in (0, 8190, 123_456)])
    c_rope, s_rope = rope_cos_sin(text, inv)
    for p in (text[None].expand(3, B, T), text[None].repeat(3, 1, 1), text):
        c, s = mrope_cos_sin(p, inv, section)
        if path == "reference":
            assert torch.equal(c, c_rope) and torch.equal(s, s_rope)
        else:
            assert_close_ulps(c, c_rope, torch.float32, 4)
            assert_close_ulps(s, s_rope, torch.float32, 4)
    c1, _ = mrope_cos_sin(torch.arange(T), inv, section)     # (T,) -> batch of one
    assert c1.shape == (1, T, D)
    q, k = torch.randn(B, T, 4, D), torch.randn(B, T, 1, D)
    qo, ko = mrope(q, k, *mrope_cos_sin(text, inv, section))
    qr, kr = rope_reference(q.double(), k.double(), c_rope.double(), s_rope.double())
    assert_close_ulps(qo, qr, torch.float32, ULPS[torch.float32])
    assert_close_ulps(ko, kr, torch.float32, ULPS[torch.float32])


@parametrize_dtype
def test_mrope_rotation_and_grads_float64(path, dtype):
    """Forward and both input gradients of the rotation with M-RoPE tables, on head views
    of a fused qkv projection (strided input)."""
    B, T, Hq, Hk, D = 2, 7, 3, 1, 20
    section = [3, 4, 3]
    cos, sin = mrope_cos_sin(_mm_positions(B, T), _inv_freq(D), section)
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D).to(dtype).requires_grad_()
    heads = qkv.view(B, T, Hq + 2 * Hk, D)
    q, k = heads[:, :, :Hq], heads[:, :, Hq:Hq + Hk]
    qkv0, cos0 = qkv.detach().clone(), cos.clone()
    qo, ko = mrope(q, k, cos, sin)
    assert qo.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    (dqkv,) = torch.autograd.grad((qo, ko), qkv, (gq, gk))
    dheads = dqkv.view(B, T, Hq + 2 * Hk, D)

    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    qo64, ko64 = rope_reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((qo64, ko64), (gq.double(), gk.double()))
    u = ULPS[dtype]
    assert_close_ulps(qo, qo64, dtype, u)
    assert_close_ulps(ko, ko64, dtype, u)
    assert_close_ulps(dheads[:, :, :Hq], q64.grad, dtype, u)
    assert_close_ulps(dheads[:, :, Hq:Hq + Hk], k64.grad, dtype, u)
    assert torch.count_nonzero(dheads[:, :, Hq + Hk:]) == 0
    assert torch.equal(qkv.detach(), qkv0) and torch.equal(cos, cos0)


def test_mrope_errors():
    inv = _inv_freq(16)
    pos = _mm_positions(2, 5)
    with pytest.raises(ValueError, match="position_ids"):
        mrope_cos_sin(torch.zeros(4, 2, 5, dtype=torch.long), inv, [2, 3, 3])
    with pytest.raises(ValueError, match="position_ids"):
        mrope_cos_sin(torch.zeros(3, 1, 2, 5, dtype=torch.long), inv, [2, 3, 3])
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_cos_sin(pos, inv, [2, 3, 4])
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_cos_sin(pos, inv, [4, 4])
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_cos_sin(pos, inv, [-1, 5, 4])
    with pytest.raises(ValueError, match="inv_freq"):
        mrope_cos_sin(pos, inv[None], [2, 3, 3])
    with pytest.raises(ValueError, match="inv_freq"):
        mrope_cos_sin(pos, torch.arange(8), [2, 3, 3])
    with pytest.raises(ValueError, match="rotary dim"):
        c, s = mrope_cos_sin(pos, inv, [2, 3, 3])
        mrope(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 1, 8), c, s)


def test_mrope_cos_sin_empty_and_reference_dispatch(monkeypatch):
    c, s = mrope_cos_sin(torch.zeros(3, 2, 0, dtype=torch.long), _inv_freq(8), [1, 2, 1])
    assert c.shape == (2, 0, 8) and s.shape == (2, 0, 8)

    def no_kernel(*args):
        raise AssertionError("the Triton launcher ran on the reference path")

    monkeypatch.setattr(kutils, "use_triton", lambda t: False)
    monkeypatch.setattr(mrope_mod, "_launch", no_kernel)
    pos = _mm_positions(2, 5)
    c, s = mrope_cos_sin(pos, _inv_freq(8), [1, 2, 1])
    cr, sr = mrope_cos_sin_reference(pos, _inv_freq(8), [1, 2, 1])
    assert torch.equal(c, cr) and torch.equal(s, sr)


def test_mrope_cos_sin_opcheck_and_compile():
    from torch.library import opcheck

    pos = _mm_positions(2, 5)
    inv = _inv_freq(16)
    opcheck(torch.ops.ligerzoo.mrope_cos_sin, (pos, inv, [2, 3, 3], 1.0))

    def f(pos):
        c, s = mrope_cos_sin(pos, inv, [2, 3, 3])
        return c * 2 + s

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(pos), f(pos))


# ----------------------------------------------------------------------------- GPU
def _gpu_positions(B, T):
    """Long multimodal rows: text, a 1 x 64 x 96 image grid, text, with a far offset."""
    pos = torch.zeros(3, B, T, dtype=torch.int64)
    for b in range(B):
        start = b * 100_000
        pos[:, b, :100] = start + torch.arange(100)
        hh, ww = torch.meshgrid(torch.arange(64), torch.arange(96), indexing="ij")
        n = 64 * 96
        pos[0, b, 100:100 + n] = start + 100
        pos[1, b, 100:100 + n] = start + 100 + hh.flatten()
        pos[2, b, 100:100 + n] = start + 100 + ww.flatten()
        rest = T - 100 - n
        pos[:, b, 100 + n:] = start + 196 + torch.arange(rest)
    return pos.cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mrope_cos_sin():
    B, T, section = 2, 8192, [16, 24, 24]
    pos = _gpu_positions(B, T)
    inv = _inv_freq(128).cuda()
    cos, sin = mrope_cos_sin(pos, inv, section)
    c64, s64 = _expected_f64(pos, inv, section)
    assert_close_ulps(cos, c64, torch.float32, 4)
    assert_close_ulps(sin, s64, torch.float32, 4)
    cr, sr = mrope_cos_sin_reference(pos, inv, section)   # HF's torch ops on the GPU
    assert_close_ulps(cos, cr, torch.float32, 4)
    assert_close_ulps(sin, sr, torch.float32, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@parametrize_dtype
def test_gpu_mrope_rotation(dtype):
    torch.manual_seed(0)
    B, T, Hq, Hk, D = 2, 8192, 28, 4, 128      # Qwen2-VL-7B attention shapes
    cos, sin = mrope_cos_sin(_gpu_positions(B, T), _inv_freq(D).cuda(), [16, 24, 24])
    q = torch.randn(B, T, Hq, D, device="cuda").to(dtype).requires_grad_()
    k = torch.randn(B, T, Hk, D, device="cuda").to(dtype).requires_grad_()
    qo, ko = mrope(q, k, cos, sin)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    qo64, ko64 = rope_reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((qo64, ko64), (gq.double(), gk.double()))
    u = ULPS[dtype]
    assert_close_ulps(qo, qo64, dtype, u)
    assert_close_ulps(ko, ko64, dtype, u)
    assert_close_ulps(dq, q64.grad, dtype, u)
    assert_close_ulps(dk, k64.grad, dtype, u)


def test_mrope_section_must_hold_integers_and_tables_run_on_meta():
    """A float or string section is refused (was truncated by int()); the tables, like
    rope_cos_sin's, take meta tensors (shape inference), where autocast does not exist."""
    for section in ([1.5, 1, 1.5], "112", [1.0, 1, 2]):
        with pytest.raises(ValueError, match="mrope_section"):
            mrope_cos_sin(torch.arange(3), torch.ones(4), section)
    pos, inv = torch.arange(5, device="meta"), torch.ones(4, device="meta")
    for cos, sin in (mrope_cos_sin(pos, inv, [1, 1, 2]), rope_cos_sin(pos, inv)):
        assert cos.shape == sin.shape == (1, 5, 8) and cos.device.type == "meta"
