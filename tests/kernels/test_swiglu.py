"""SwiGLU (separate gate/up and fused gate|up) against float64 references, through the
Triton kernels (interpreter on CPU, see conftest) and through the forced torch-reference
dispatch.

Tolerances: every output element is computed in fp32 from its inputs and rounded once, so
it is compared with the float64 result of the same inputs within a few ulps of the output
dtype (relative, with the largest element as a floor). The CPU interpreter truncates
fp32 -> bf16 (up to 1 ulp instead of 1/2).
"""
import pytest
import torch

from ligerzoo.kernels.swiglu import swiglu, swiglu_fused, swiglu_fused_reference, swiglu_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    check_gated_empty,
    check_gated_fused,
    check_gated_split,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

swiglu_mod = kernel_module("swiglu")

I = 37  # intermediate size, odd


ULPS = {torch.float32: 16, torch.bfloat16: 2}


def _ref64(gate_up, dy):
    gu64 = gate_up.detach().double().requires_grad_()
    y64 = swiglu_fused_reference(gu64)
    y64.backward(dy.double())
    return y64.detach(), gu64.grad


@parametrize_dtype
@pytest.mark.parametrize("layout", ["separate", "halves_of_fused"])
def test_swiglu_matches_float64(path, dtype, layout):
    check_gated_split(swiglu, _ref64, dtype, layout, I, ULPS[dtype])


@parametrize_dtype
def test_swiglu_fused_matches_float64(path, dtype):
    check_gated_fused(swiglu, swiglu_fused, _ref64, dtype, I, ULPS[dtype])


def test_swiglu_multi_block_and_non_contiguous(monkeypatch):
    """Rows longer than one block; inputs whose rows cannot be merged (copied) or are
    slices of a wider tensor (read in place); a non-contiguous incoming gradient."""
    monkeypatch.setattr(swiglu_mod, "_MAX_BLOCK", 16)
    wide = torch.randn(11, 2 * I + 10, requires_grad=True)
    gate_up = wide[:, 3:3 + 2 * I]                                # row stride 2I + 10
    y = swiglu_fused(gate_up)
    dy = torch.randn(I, 11).t()                                   # transposed gradient
    (dwide,) = torch.autograd.grad(y, wide, dy)
    y64, dgu64 = _ref64(gate_up, dy)
    assert_close_ulps(y, y64, torch.float32, 16)
    assert_close_ulps(dwide[:, 3:3 + 2 * I], dgu64, torch.float32, 16)
    assert torch.count_nonzero(dwide[:, :3]) == 0 and torch.count_nonzero(dwide[:, 3 + 2 * I:]) == 0

    gate = torch.randn(I, 5, 3).permute(1, 2, 0).requires_grad_()  # (5, 3, I), unit last stride, unmergeable
    up = torch.randn(5, 3, I, requires_grad=True)
    y = swiglu(gate, up)
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    y64, dgu64 = _ref64(torch.cat((gate, up), -1), dy)
    assert_close_ulps(y, y64, torch.float32, 16)
    assert_close_ulps(dgate, dgu64[..., :I], torch.float32, 16)
    assert_close_ulps(dup, dgu64[..., I:], torch.float32, 16)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy, in the interpreter
def test_swiglu_extreme_values():
    """Large |gate| saturates the sigmoid without inf/NaN (exp overflow in fp32)."""
    gate = torch.tensor([[-3.0e38, -1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 3.0e38]], requires_grad=True)
    up = torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0]], requires_grad=True)
    y = swiglu(gate, up)
    dy = torch.ones_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    assert torch.isfinite(y).all() and torch.isfinite(dgate).all() and torch.isfinite(dup).all()
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    y64 = swiglu_reference(g64, u64)
    y64.backward(dy.double())
    for a, e in ((y, y64), (dgate, g64.grad), (dup, u64.grad)):  # elementwise: values span 1e-44 .. 3e38
        torch.testing.assert_close(a.detach().double(), e.detach(), rtol=16 * torch.finfo(torch.float32).eps,
                                   atol=1e-30)


def test_swiglu_errors():
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="dtype"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="even"):
        swiglu_fused(torch.randn(2, 7))
    with pytest.raises(ValueError, match="floating point"):
        swiglu_fused(torch.ones(2, 8, dtype=torch.int64))
    assert swiglu_fused(torch.empty(0, 8)).shape == (0, 4)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("lead,inter", [((3,), 0), ((2, 3), 0), ((), 0), ((0,), 4), ((2, 0), 4)])
def test_swiglu_empty_inputs(lead, inter):
    """Zero-width (I = 0) and zero-row inputs run forward and backward, as torch does."""
    check_gated_empty(swiglu, swiglu_fused, _ref64, "swiglu", lead, inter)


def test_swiglu_opcheck_and_compile():
    from torch.library import opcheck

    gu = torch.randn(4, 10, requires_grad=True)
    opcheck(torch.ops.ligerzoo.swiglu, (gu[:, :5], gu[:, 5:]))
    opcheck(torch.ops.ligerzoo.swiglu_fused, (gu,))
    opcheck(torch.ops.ligerzoo.swiglu_backward, (torch.randn(4, 5), gu.detach()[:, :5], gu.detach()[:, 5:]))
    opcheck(torch.ops.ligerzoo.swiglu_fused_backward, (torch.randn(4, 5), gu.detach()))

    w = torch.randn(10, 6)

    def f(x):
        return swiglu_fused(x @ w.t()).sum() + swiglu(x[:, :3], x[:, 3:]).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, requires_grad=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(f(x), x)[0])


# ----------------------------------------------------------------------------- GPU
@parametrize_dtype
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_swiglu(dtype):
    torch.manual_seed(0)
    N, inter = 8192, 14336
    gu = (3 * torch.randn(N, 2 * inter, device="cuda")).to(dtype)
    leaf = gu.clone().requires_grad_()
    y = swiglu_fused(leaf)
    dy = torch.randn_like(y)
    (dgu,) = torch.autograd.grad(y, leaf, dy)
    y64, dgu64 = _ref64(gu, dy)
    ulps = {torch.float32: 16, torch.bfloat16: 1}[dtype]
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(dgu, dgu64, dtype, ulps)
    ys = swiglu(leaf[:, :inter], leaf[:, inter:])
    dg, du = torch.autograd.grad(ys, (leaf,), dy)[0].split(inter, -1)
    torch.testing.assert_close(ys, y, rtol=0, atol=0)
    torch.testing.assert_close(dg, dgu[:, :inter], rtol=0, atol=0)
    torch.testing.assert_close(du, dgu[:, inter:], rtol=0, atol=0)
    assert torch.equal(leaf.detach(), gu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_swiglu_past_2_31_elements_and_compile():
    inter = 8192
    N = (1 << 31) // inter + 16                                   # y has > 2^31 elements
    gu = torch.randn(N, 2 * inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = swiglu_fused(gu)
    (dgu,) = torch.autograd.grad(y, gu, torch.ones_like(y))
    tail = slice(N - 32, N)
    y64, dgu64 = _ref64(gu.detach()[tail], torch.ones(32, inter, device="cuda"))
    assert_close_ulps(y[tail], y64, torch.bfloat16, 1)
    assert_close_ulps(dgu[tail], dgu64, torch.bfloat16, 1)
    del y, dgu, gu
    torch.cuda.empty_cache()

    x = torch.randn(4096, 2 * 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = lambda t: swiglu_fused(t).float().square().sum()  # noqa: E731
    torch.testing.assert_close(torch.autograd.grad(torch.compile(f, fullgraph=True)(x), x)[0],
                               torch.autograd.grad(f(x), x)[0])
