"""The gated activations SwiGLU (silu(gate) * up) and GeGLU (tanh-approximate gelu(gate) *
up), each as separate gate/up and as a fused gate|up tensor, against float64 references
written from their definitions, through the Triton kernels (interpreter on CPU, see
conftest; both ops share swiglu.py's kernels) and through the forced torch-reference
dispatch.

Tolerances: every output element is computed in fp32 from its inputs and rounded once, so
it is compared with the float64 result of the same inputs within a few ulps of the output
dtype (relative, with the largest element as a floor). The CPU interpreter truncates
fp32 -> bf16 (up to 1 ulp instead of 1/2).
"""
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from ligerzoo.kernels.geglu import geglu, geglu_fused, geglu_fused_reference, geglu_reference
from ligerzoo.kernels.swiglu import swiglu, swiglu_fused, swiglu_fused_reference, swiglu_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

swiglu_mod = kernel_module("swiglu")  # owns the kernels of both ops and their block size

I = 37  # intermediate size, odd
ULPS = {torch.float32: 16, torch.bfloat16: 2}


def _silu64(a):
    return a * torch.sigmoid(a)


def _gelu_tanh64(a):
    """The tanh GELU written out from its definition, in float64."""
    return 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))


@dataclass(frozen=True)
class Gated:
    name: str
    split: Callable           # op(gate, up)
    fused: Callable           # op(gate_up)
    reference: Callable       # the library's torch reference of op(gate, up)
    fused_reference: Callable
    act64: Callable           # the activation from its definition, float64

    def ref64(self, gate_up, dy):
        """float64 output and (..., 2I) gradient of act(gate) * up from the definition."""
        gu64 = gate_up.detach().double().requires_grad_()
        half = gu64.shape[-1] // 2
        gate, up = gu64[..., :half], gu64[..., half:]  # (split() of a zero width gives one piece)
        y64 = self.act64(gate) * up
        y64.backward(dy.double())
        return y64.detach(), gu64.grad


OPS = {
    "swiglu": Gated("swiglu", swiglu, swiglu_fused, swiglu_reference, swiglu_fused_reference, _silu64),
    "geglu": Gated("geglu", geglu, geglu_fused, geglu_reference, geglu_fused_reference, _gelu_tanh64),
}


@pytest.fixture(params=list(OPS))
def op(request) -> Gated:
    return OPS[request.param]


@parametrize_dtype
@pytest.mark.parametrize("layout", ["separate", "halves_of_fused"])
def test_split_matches_float64(path, op, dtype, layout):
    """op(gate, up) and its gradients within a few ulps of float64; gate and up as separate
    tensors or as strided halves of one fused tensor (read in place). Inputs unchanged."""
    gu = (3 * torch.randn(3, 7, 2 * I)).to(dtype)
    gu0 = gu.clone()
    if layout == "separate":
        gate = gu[..., :I].clone().requires_grad_()
        up = gu[..., I:].clone().requires_grad_()
        leaves = (gate, up)
    else:  # strided views of one fused tensor (row stride 2I)
        leaf = gu.clone().requires_grad_()
        gate, up = leaf[..., :I], leaf[..., I:]
        leaves = (leaf,)
    y = op.split(gate, up)
    assert y.shape == (3, 7, I) and y.dtype == dtype
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    dgate, dup = (grads[0], grads[1]) if layout == "separate" else (grads[0][..., :I], grads[0][..., I:])

    y64, dgu64 = op.ref64(gu, dy)
    assert_close_ulps(y, y64, dtype, ULPS[dtype])
    assert_close_ulps(dgate, dgu64[..., :I], dtype, ULPS[dtype])
    assert_close_ulps(dup, dgu64[..., I:], dtype, ULPS[dtype])
    assert dgate.dtype == dtype and dup.dtype == dtype
    assert torch.equal(gu, gu0)
    assert torch.equal(gate.detach(), gu0[..., :I]) and torch.equal(up.detach(), gu0[..., I:])


@parametrize_dtype
def test_fused_matches_float64(path, op, dtype):
    """op(gate_up) and its (..., 2I) gradient within a few ulps of float64, exactly equal to
    the split entry point's output."""
    gu = (3 * torch.randn(2, 9, 2 * I)).to(dtype)
    gu0 = gu.clone()
    leaf = gu.clone().requires_grad_()
    y = op.fused(leaf)
    assert y.shape == (2, 9, I) and y.dtype == dtype
    dy = torch.randn_like(y)
    (dgu,) = torch.autograd.grad(y, leaf, dy)
    assert dgu.shape == gu.shape and dgu.dtype == dtype and dgu.is_contiguous()
    y64, dgu64 = op.ref64(gu, dy)
    assert_close_ulps(y, y64, dtype, ULPS[dtype])
    assert_close_ulps(dgu, dgu64, dtype, ULPS[dtype])
    assert torch.equal(gu, gu0) and torch.equal(leaf.detach(), gu0)
    torch.testing.assert_close(op.split(gu[..., :I], gu[..., I:]), op.fused(gu), rtol=0, atol=0)


def test_references_are_the_definitions(op):
    gu = 3 * torch.randn(4, 2 * I, dtype=torch.float64)
    expected = op.act64(gu[:, :I]) * gu[:, I:]
    torch.testing.assert_close(op.fused_reference(gu), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(op.reference(gu[:, :I], gu[:, I:]), expected, rtol=1e-14, atol=1e-14)


def test_geglu_matches_hf_gelu_pytorch_tanh():
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    gate, up = (3 * torch.randn(2, 2, 5, I)).to(torch.bfloat16).unbind(0)
    act = ACT2FN["gelu_pytorch_tanh"]
    y64, _ = OPS["geglu"].ref64(torch.cat((gate, up), -1), torch.zeros(2, 5, I))
    assert_close_ulps(geglu(gate, up), y64, torch.bfloat16, 2)
    # HF rounds gelu to bf16 before the product: within 2 bf16 roundings of ours
    assert_close_ulps(geglu(gate, up), act(gate) * up, torch.bfloat16, 4)
    x = 3 * torch.randn(5, I)
    torch.testing.assert_close(geglu(x, torch.ones_like(x)), act(x), rtol=1e-6, atol=1e-6)


def test_multi_block_and_non_contiguous(op, monkeypatch):
    """Rows longer than one block; inputs whose rows cannot be merged (copied) or are
    slices of a wider tensor (read in place); a non-contiguous incoming gradient."""
    monkeypatch.setattr(swiglu_mod, "_MAX_BLOCK", 16)
    assert swiglu_mod._settings(I)[0] == 16
    wide = torch.randn(11, 2 * I + 10, requires_grad=True)
    gate_up = wide[:, 3:3 + 2 * I]                                # row stride 2I + 10
    y = op.fused(gate_up)
    dy = torch.randn(I, 11).t()                                   # transposed gradient
    (dwide,) = torch.autograd.grad(y, wide, dy)
    y64, dgu64 = op.ref64(gate_up, dy)
    assert_close_ulps(y, y64, torch.float32, 16)
    assert_close_ulps(dwide[:, 3:3 + 2 * I], dgu64, torch.float32, 16)
    assert torch.count_nonzero(dwide[:, :3]) == 0 and torch.count_nonzero(dwide[:, 3 + 2 * I:]) == 0

    gate = torch.randn(I, 5, 3).permute(1, 2, 0).requires_grad_()  # (5, 3, I), unit last stride, unmergeable
    up = torch.randn(5, 3, I, requires_grad=True)
    y = op.split(gate, up)
    dy = torch.randn_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    y64, dgu64 = op.ref64(torch.cat((gate, up), -1), dy)
    assert_close_ulps(y, y64, torch.float32, 16)
    assert_close_ulps(dgate, dgu64[..., :I], torch.float32, 16)
    assert_close_ulps(dup, dgu64[..., I:], torch.float32, 16)


# Gates that saturate the activation (exp, and GeGLU's a^3, overflow in fp32), with the
# absolute floor of the elementwise comparison: GeGLU's O(1) derivative has a zero near the
# GELU minimum (gate = -0.75), where its two terms cancel.
_EXTREME = {
    "swiglu": ([-3.0e38, -1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 3.0e38], 1e-30),
    "geglu": ([-3.0e38, -1e20, -1e4, -100.0, -20.0, -5.0, -0.75, -1e-3, 0.0, 1e-3, 0.75, 5.0, 20.0, 100.0, 1e4,
               1e20, 3.0e38], 16 * torch.finfo(torch.float32).eps),
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_extreme_values(op):
    """Large |gate| saturates the activation without inf/NaN."""
    vals, atol = _EXTREME[op.name]
    gate = torch.tensor([vals], requires_grad=True)
    up = torch.tensor([[1.0 if abs(v) > 1e19 else 2.0 for v in vals]], requires_grad=True)
    y = op.split(gate, up)
    dy = torch.ones_like(y)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    assert torch.isfinite(y).all() and torch.isfinite(dgate).all() and torch.isfinite(dup).all()
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    y64 = op.reference(g64, u64)
    y64.backward(dy.double())
    for a, e in ((y, y64), (dgate, g64.grad), (dup, u64.grad)):  # elementwise: values span 0 .. 3e38
        torch.testing.assert_close(a.detach().double(), e.detach(), rtol=16 * torch.finfo(torch.float32).eps,
                                   atol=atol)


def test_errors(op):
    with pytest.raises(ValueError, match="same shape"):
        op.split(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="dtype"):
        op.split(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="even"):
        op.fused(torch.randn(2, 7))
    with pytest.raises(ValueError, match="floating point"):
        op.fused(torch.ones(2, 8, dtype=torch.int64))
    assert op.fused(torch.empty(0, 8)).shape == (0, 4)
    assert op.split(torch.empty(3, 0), torch.empty(3, 0)).shape == (3, 0)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("lead,inter", [((3,), 0), ((2, 3), 0), ((), 0), ((0,), 4), ((2, 0), 4)])
def test_empty_inputs(op, lead, inter):
    """Inputs with no elements (I = 0, or no rows; ``lead`` the leading dims) run forward and
    backward, as torch does: both entry points and the in-place backward ops
    ``ligerzoo::<name>_fused_backward_*`` give empty results shaped like float64 torch's."""
    gu, dy = torch.randn(*lead, 2 * inter), torch.randn(*lead, inter)
    y64, dgu64 = op.ref64(gu, dy)
    assert y64.shape == dy.shape and dgu64.shape == gu.shape

    leaf = gu.clone().requires_grad_()
    y = op.fused(leaf)
    (dgu,) = torch.autograd.grad(y, leaf, dy)
    assert y.shape == y64.shape and dgu.shape == dgu64.shape and dgu.dtype == gu.dtype

    gate, up = gu[..., :inter].clone().requires_grad_(), gu[..., inter:].clone().requires_grad_()
    y = op.split(gate, up)
    dgate, dup = torch.autograd.grad(y, (gate, up), dy)
    assert y.shape == y64.shape and dgate.shape == gate.shape and dup.shape == up.shape

    lib = torch.ops.ligerzoo
    getattr(lib, f"{op.name}_fused_backward_")(dy.clone(), gu.clone())
    getattr(lib, f"{op.name}_fused_backward_recompute_")(dy.clone(), gu.clone())
    assert getattr(lib, f"{op.name}_fused_backward_recompute")(dy.clone(), gu).shape == gu.shape


@pytest.mark.usefixtures("path")
@parametrize_dtype
def test_inplace_backward(op, dtype):
    """inplace=True: the same gradients bit for bit, written over the saved inputs (gate and
    up, also as the two halves of one tensor, or gate_up) and returned as views of them; out
    of place (inputs untouched) for leaves, views of leaves and inputs that need no gradient,
    and when the memory cannot be overwritten: rows that need a copy, an incoming gradient
    that shares memory with an input."""
    torch.manual_seed(5)
    triton_path = swiglu_mod._utils.triton_ok(torch.empty(1, dtype=dtype))
    # the kernels give bit-equal results; torch's CPU math may round strided views differently
    # (within the file's ulps of the dtype, the largest element as a floor, as assert_close_ulps)
    tol = ULPS[dtype] * torch.finfo(dtype).eps
    same = torch.equal if triton_path else (
        lambda a, b: torch.allclose(a.detach(), b.detach(), rtol=tol, atol=tol * float(b.detach().abs().max())))
    gu = (3 * torch.randn(6, 2 * I)).to(dtype)
    dy = torch.randn(6, I).to(dtype)
    want_y, want = op.fused(gu.clone().requires_grad_()), None
    leaf = gu.clone().requires_grad_()
    want = torch.autograd.grad(op.fused(leaf), leaf, dy)[0]
    y64, dgu64 = op.ref64(gu, dy)
    assert_close_ulps(want, dgu64, dtype, ULPS[dtype])

    # separate gate and up, as an MLP's two projections make them
    gate = gu[:, :I].clone().requires_grad_()
    up = gu[:, I:].clone().requires_grad_()
    g_in, u_in = gate * 1, up * 1  # non-leaves the op may overwrite
    y = op.split(g_in, u_in, inplace=True)
    assert same(y, want_y)
    dgate, dup = torch.autograd.grad(y, (g_in, u_in), dy)
    assert same(dgate, want[:, :I]) and same(dup, want[:, I:])
    if triton_path:
        assert dgate.data_ptr() == g_in.data_ptr() and dup.data_ptr() == u_in.data_ptr()
        assert same(g_in.detach(), want[:, :I])  # the inputs now hold their gradients
    # the fused tensor
    g_in = gu.clone().requires_grad_() * 1
    y = op.fused(g_in, inplace=True)
    (dgu,) = torch.autograd.grad(y, g_in, dy)
    assert same(dgu, want)
    if triton_path:
        assert dgu.data_ptr() == g_in.data_ptr()
        # a second backward would read gradients as inputs: autograd's version check refuses it
        x = gu.clone().requires_grad_()
        y = op.fused(x * 1, inplace=True)
        torch.autograd.grad(y, x, dy, retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(y, x, dy)
    # the halves of one tensor (interleaved, disjoint): overwritten too
    halves = gu.clone().requires_grad_() * 1
    dgate, dup = torch.autograd.grad(op.split(halves[:, :I], halves[:, I:], inplace=True), (halves,), dy)[0].split(I, -1)
    assert same(dgate, want[:, :I]) and same(dup, want[:, I:])
    if triton_path:
        assert same(halves.detach(), want)
    # not overwritten: leaves, views of leaves, inputs that need no gradient
    gate, up = gu[:, :I].clone().requires_grad_(), gu[:, I:].clone().requires_grad_()
    dgate, dup = torch.autograd.grad(op.split(gate, up, inplace=True), (gate, up), dy)
    assert same(dgate, want[:, :I]) and same(dup, want[:, I:])
    assert torch.equal(gate.detach(), gu[:, :I]) and torch.equal(up.detach(), gu[:, I:])
    leaf = gu.clone().requires_grad_()
    (d,) = torch.autograd.grad(op.split(leaf[:, :I], leaf[:, I:], inplace=True), leaf, dy)
    assert same(d, want) and torch.equal(leaf.detach(), gu)
    (d,) = torch.autograd.grad(op.fused(leaf, inplace=True), leaf, dy)
    assert same(d, want) and torch.equal(leaf.detach(), gu)
    const_up = gu[:, I:].clone()
    g_in = gu[:, :I].clone().requires_grad_() * 1
    (dgate,) = torch.autograd.grad(op.split(g_in, const_up, inplace=True), g_in, dy)
    assert same(dgate, want[:, :I]) and torch.equal(const_up, gu[:, I:])
    # cannot overwrite: rows that need a copy, dy aliasing an input
    padded = torch.zeros(3, 2, 2 * I + 3).to(dtype)
    padded[..., : 2 * I] = gu.view(2, 3, 2 * I).transpose(0, 1)
    wide = padded.requires_grad_() * 1                          # (3, 2, 2I + 3)
    unmergeable = wide[..., : 2 * I].transpose(0, 1)            # (2, 3, 2I) = gu's rows, which need a copy
    (d,) = torch.autograd.grad(op.fused(unmergeable, inplace=True), wide, dy.view(2, 3, I))
    assert same(d[..., : 2 * I].transpose(0, 1).reshape(6, 2 * I), want)
    assert same(wide.detach()[..., : 2 * I], padded.detach()[..., : 2 * I])  # not written
    both = torch.cat((gu, dy), -1).requires_grad_() * 1         # dy shares gate_up's buffer
    g_view, dy_view = both[:, : 2 * I], both[:, 2 * I:]
    y = op.fused(g_view, inplace=True)
    (d,) = torch.autograd.grad(y, both, dy_view)
    assert same(d[:, : 2 * I], want)


def test_opcheck_and_compile(op):
    from torch.library import opcheck

    lib = torch.ops.ligerzoo
    gu = torch.randn(4, 10, requires_grad=True)
    for inplace in (False, True):
        opcheck(getattr(lib, op.name), (gu[:, :5], gu[:, 5:], inplace))
        opcheck(getattr(lib, f"{op.name}_fused"), (gu, inplace))
    opcheck(getattr(lib, f"{op.name}_backward_"), (torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)))
    opcheck(getattr(lib, f"{op.name}_backward"), (torch.randn(4, 5), gu.detach()[:, :5], gu.detach()[:, 5:]))
    opcheck(getattr(lib, f"{op.name}_fused_backward"), (torch.randn(4, 5), gu.detach()))

    w = torch.randn(10, 6)

    def f(x):
        return (op.fused(x @ w.t()).sum() + op.split(x[:, :3], x[:, 3:]).sum()
                + op.fused(x @ w.t(), inplace=True).square().sum()    # traced: out of place
                + op.split(x[:, :3] * 1, x[:, 3:] * 1, inplace=True).square().sum())

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 6, requires_grad=True)
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(f(x), x)[0])


# ----------------------------------------------------------------------------- GPU
@parametrize_dtype
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gated(op, dtype):
    """Llama-3-8B sizes (8192 tokens, intermediate 14336): within 1 ulp (bf16) of float64;
    the split and fused entry points agree exactly; the input is left unchanged."""
    torch.manual_seed(0)
    N, inter = 8192, 14336
    gu = (3 * torch.randn(N, 2 * inter, device="cuda")).to(dtype)
    leaf = gu.clone().requires_grad_()
    y = op.fused(leaf)
    dy = torch.randn_like(y)
    (dgu,) = torch.autograd.grad(y, leaf, dy)
    y64, dgu64 = op.ref64(gu, dy)
    ulps = {torch.float32: 16, torch.bfloat16: 1}[dtype]
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(dgu, dgu64, dtype, ulps)
    del y64, dgu64
    ys = op.split(leaf[:, :inter], leaf[:, inter:])
    dg, du = torch.autograd.grad(ys, (leaf,), dy)[0].split(inter, -1)
    torch.testing.assert_close(ys, y, rtol=0, atol=0)
    torch.testing.assert_close(dg, dgu[:, :inter], rtol=0, atol=0)
    torch.testing.assert_close(du, dgu[:, inter:], rtol=0, atol=0)
    assert torch.equal(leaf.detach(), gu)
    # inplace=True on separate gate and up (an MLP's two projections): the same bits
    g_in, u_in = gu[:, :inter].clone().requires_grad_(), gu[:, inter:].clone().requires_grad_()
    yi = op.split(g_in * 1, u_in * 1, inplace=True)
    dgi, dui = torch.autograd.grad(yi, (g_in, u_in), dy)
    torch.testing.assert_close(yi, y, rtol=0, atol=0)
    torch.testing.assert_close(dgi, dgu[:, :inter], rtol=0, atol=0)
    torch.testing.assert_close(dui, dgu[:, inter:], rtol=0, atol=0)
    if op.name == "geglu":
        # torch's own tanh GELU in the same dtype: one extra rounding (gelu before the product)
        ref = F.gelu(gu[:, :inter], approximate="tanh") * gu[:, inter:]
        assert_close_ulps(y, ref, dtype, 2 * ulps if dtype == torch.bfloat16 else 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gated_past_2_31_elements_and_compile(op):
    inter = 8192
    N = (1 << 31) // inter + 16                                   # y has > 2^31 elements
    gu = torch.randn(N, 2 * inter, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = op.fused(gu)
    (dgu,) = torch.autograd.grad(y, gu, torch.ones_like(y))
    tail = slice(N - 32, N)
    y64, dgu64 = op.ref64(gu.detach()[tail], torch.ones(32, inter, device="cuda"))
    assert_close_ulps(y[tail], y64, torch.bfloat16, 1)
    assert_close_ulps(dgu[tail], dgu64, torch.bfloat16, 1)
    del y, dgu, gu
    torch.cuda.empty_cache()

    x = torch.randn(4096, 2 * 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = lambda t: op.fused(t).float().square().sum()  # noqa: E731
    torch.testing.assert_close(torch.autograd.grad(torch.compile(f, fullgraph=True)(x), x)[0],
                               torch.autograd.grad(f(x), x)[0])
