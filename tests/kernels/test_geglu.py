"""GeGLU (separate gate/up and fused gate|up) against float64 references, through the
Triton kernels (interpreter on CPU, see conftest; shared with SwiGLU) and through the
forced torch-reference dispatch.

Tolerances: every output element is computed in fp32 from its inputs and rounded once, so
it is compared with the float64 result of the same inputs within a few ulps of the output
dtype (relative, with the largest element as a floor). The CPU interpreter truncates
fp32 -> bf16 (up to 1 ulp instead of 1/2).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ligerzoo.kernels.geglu import geglu, geglu_fused, geglu_fused_reference, geglu_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    check_gated_empty,
    check_gated_fused,
    check_gated_split,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

swiglu_mod = kernel_module("swiglu")  # owns the shared kernels / block size

I = 37  # intermediate size, odd


ULPS = {torch.float32: 16, torch.bfloat16: 2}


def _gelu_tanh64(a):
    """The tanh GELU written out from its definition, in float64."""
    return 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))


def _ref64(gate_up, dy):
    """float64 output and (..., 2I) gradient of gelu_tanh(gate) * up from the definition."""
    gu64 = gate_up.detach().double().requires_grad_()
    half = gu64.shape[-1] // 2
    gate, up = gu64[..., :half], gu64[..., half:]  # (split() of a zero width gives one piece)
    y64 = _gelu_tanh64(gate) * up
    y64.backward(dy.double())
    return y64.detach(), gu64.grad


@parametrize_dtype
@pytest.mark.parametrize("layout", ["separate", "halves_of_fused"])
def test_geglu_matches_float64(path, dtype, layout):
    check_gated_split(geglu, _ref64, dtype, layout, I, ULPS[dtype])


@parametrize_dtype
def test_geglu_fused_matches_float64(path, dtype):
    check_gated_fused(geglu, geglu_fused, _ref64, dtype, I, ULPS[dtype])


def test_geglu_reference_is_torch_gelu_tanh():
    gu = 3 * torch.randn(4, 2 * I, dtype=torch.float64)
    torch.testing.assert_close(geglu_fused_reference(gu), _gelu_tanh64(gu[:, :I]) * gu[:, I:],
                               rtol=1e-14, atol=1e-14)


def test_geglu_matches_hf_gelu_pytorch_tanh():
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    gate, up = (3 * torch.randn(2, 2, 5, I)).to(torch.bfloat16).unbind(0)
    act = ACT2FN["gelu_pytorch_tanh"]
    y64, _ = _ref64(torch.cat((gate, up), -1), torch.zeros(2, 5, I))
    assert_close_ulps(geglu(gate, up), y64, torch.bfloat16, 2)
    # HF rounds gelu to bf16 before the product: within 2 bf16 roundings of ours
    assert_close_ulps(geglu(gate, up), act(gate) * up, torch.bfloat16, 4)
    x = 3 * torch.randn(5, I)
    torch.testing.assert_close(geglu(x, torch.ones_like(x)), act(x), rtol=1e-6, atol=1e-6)


def test_geglu_multi_block_and_non_contiguous(monkeypatch):
    """Rows longer than one block; inputs whose rows cannot be merged (copied) or are
    slices of a wider tensor (read in place); a non-contiguous incoming gradient."""
    monkeypatch.setattr(swiglu_mod, "_MAX_BLOCK", 16)
    assert swiglu_mod._settings(I)[0] == 16
    wide = torch.randn(11, 2 * I + 10, requires_grad=True)
    gate_up = wide[:, 3:3 + 2 * I]                                # row stride 2I + 10
    y = geglu_fused(gate_up)
    dy = torch.randn(I, 11).t()                                   # transposed gradient
    (dwide,) = torch.autograd.grad(y, wide, dy)
    y64, dgu64 = _ref64(gate_up, dy)
    assert_close_ulps(y, y64, torch.float32, 16)
    assert_close_ulps(dwide[:, 3:3 + 2 * I], dgu64, torch.float32, 16)
    assert torch.count_nonzero(dwide[:, :3]) == 0 and torch.count_nonzero(dwide[:, 3 + 2 * I:]) == 0

    gate = torch.randn(I, 5, 3).permute(1, 2, 0).requires_grad_()  # (5, 3, I), unit last stride, unmergeable
    up = torch.randn(5, 3, I, requires_grad=True)
    y = geglu(gate, up)
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    y64, dgu64 = _ref64(torch.cat((gate, up), -1), dy)
    assert_close_ulps(y, y64, torch.float32, 16)
    assert_close_ulps(dgate, dgu64[..., :I], torch.float32, 16)
    assert_close_ulps(dup, dgu64[..., I:], torch.float32, 16)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_geglu_extreme_values():
    """Large |gate| saturates GELU (a^3 and exp overflow in fp32) without inf/NaN."""
    vals = [-3.0e38, -1e20, -1e4, -100.0, -20.0, -5.0, -0.75, -1e-3, 0.0, 1e-3, 0.75, 5.0, 20.0, 100.0, 1e4,
            1e20, 3.0e38]
    gate = torch.tensor([vals], requires_grad=True)
    up = torch.tensor([[1.0 if abs(v) > 1e19 else 2.0 for v in vals]], requires_grad=True)
    y = geglu(gate, up)
    dy = torch.ones_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    assert torch.isfinite(y).all() and torch.isfinite(dgate).all() and torch.isfinite(dup).all()
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    y64 = geglu_reference(g64, u64)
    y64.backward(dy.double())
    # Elementwise (values span 0 .. 3e38); the absolute floor covers the O(1) derivative
    # where its two terms cancel (its zero near the GELU minimum, gate = -0.75).
    eps = torch.finfo(torch.float32).eps
    for a, e in ((y, y64), (dgate, g64.grad), (dup, u64.grad)):
        torch.testing.assert_close(a.detach().double(), e.detach(), rtol=16 * eps, atol=16 * eps)


def test_geglu_errors():
    with pytest.raises(ValueError, match="same shape"):
        geglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="dtype"):
        geglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="even"):
        geglu_fused(torch.randn(2, 7))
    with pytest.raises(ValueError, match="floating point"):
        geglu_fused(torch.ones(2, 8, dtype=torch.int64))
    assert geglu_fused(torch.empty(0, 8)).shape == (0, 4)
    assert geglu(torch.empty(3, 0), torch.empty(3, 0)).shape == (3, 0)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("lead,inter", [((3,), 0), ((2, 3), 0), ((), 0), ((0,), 4), ((2, 0), 4)])
def test_geglu_empty_inputs(lead, inter):
    """Zero-width (I = 0) and zero-row inputs run forward and backward, as torch does."""
    check_gated_empty(geglu, geglu_fused, _ref64, "geglu", lead, inter)


def test_geglu_opcheck_and_compile():
    from torch.library import opcheck

    gu = torch.randn(4, 10, requires_grad=True)
    opcheck(torch.ops.ligerzoo.geglu, (gu[:, :5], gu[:, 5:]))
    opcheck(torch.ops.ligerzoo.geglu_fused, (gu,))
    opcheck(torch.ops.ligerzoo.geglu_backward, (torch.randn(4, 5), gu.detach()[:, :5], gu.detach()[:, 5:]))
    opcheck(torch.ops.ligerzoo.geglu_fused_backward, (torch.randn(4, 5), gu.detach()))

    w = torch.randn(10, 6)

    def f(x):
        return geglu_fused(x @ w.t()).sum() + geglu(x[:, :3], x[:, 3:]).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, requires_grad=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(f(x), x)[0])


# ----------------------------------------------------------------------------- GPU
@parametrize_dtype
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_geglu(dtype):
    torch.manual_seed(0)
    N, inter = 8192, 14336
    gu = (3 * torch.randn(N, 2 * inter, device="cuda")).to(dtype)
    leaf = gu.clone().requires_grad_()
    y = geglu_fused(leaf)
    dy = torch.randn_like(y)
    (dgu,) = torch.autograd.grad(y, leaf, dy)
    y64, dgu64 = _ref64(gu, dy)
    ulps = {torch.float32: 16, torch.bfloat16: 1}[dtype]
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(dgu, dgu64, dtype, ulps)
    del y64, dgu64
    ys = geglu(leaf[:, :inter], leaf[:, inter:])
    dg, du = torch.autograd.grad(ys, (leaf,), dy)[0].split(inter, -1)
    torch.testing.assert_close(ys, y, rtol=0, atol=0)
    torch.testing.assert_close(dg, dgu[:, :inter], rtol=0, atol=0)
    torch.testing.assert_close(du, dgu[:, inter:], rtol=0, atol=0)
    assert torch.equal(leaf.detach(), gu)
    # torch's own tanh GELU in the same dtype: one extra rounding (gelu before the product)
    ref = F.gelu(gu[:, :inter], approximate="tanh") * gu[:, inter:]
    assert_close_ulps(y, ref, dtype, 2 * ulps if dtype == torch.bfloat16 else 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_geglu_past_2_31_elements_and_compile():
    inter = 8192
    N = (1 << 31) // inter + 16                                   # y has > 2^31 elements
    gu = torch.randn(N, 2 * inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = geglu_fused(gu)
    (dgu,) = torch.autograd.grad(y, gu, torch.ones_like(y))
    tail = slice(N - 32, N)
    y64, dgu64 = _ref64(gu.detach()[tail], torch.ones(32, inter, device="cuda"))
    assert_close_ulps(y[tail], y64, torch.bfloat16, 1)
    assert_close_ulps(dgu[tail], dgu64, torch.bfloat16, 1)
    del y, dgu, gu
    torch.cuda.empty_cache()

    x = torch.randn(4096, 2 * 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = lambda t: geglu_fused(t).float().square().sum()  # noqa: E731
    torch.testing.assert_close(torch.autograd.grad(torch.compile(f, fullgraph=True)(x), x)[0],
                               torch.autograd.grad(f(x), x)[0])
