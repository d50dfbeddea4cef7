"""LayerNorm against float64 references (torch's own ``F.layer_norm`` in float64), through
the Triton kernels (interpreter on CPU, see conftest) and through the forced
torch-reference dispatch.

Tolerances: statistics and affine are fp32 and every output is rounded once to its dtype,
so outputs and gradients are compared with the float64 result of the same inputs within a
few ulps of the output dtype, relative to each element and, as a floor, to the largest
element (the sums cancel). The CPU interpreter truncates fp32 -> bf16 (up to 1 ulp
instead of 1/2), which the bf16 budget covers.
"""

import pytest
import torch
import torch.nn.functional as F

from ligerzoo.kernels.layer_norm import layer_norm, layer_norm_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

ln_mod = kernel_module("layer_norm")

H = 123  # not a power of two


ULPS = {torch.float32: 64, torch.bfloat16: 2}


def _inputs(shape, dtype, shift=1.5, param_dtype=None):
    x = (3.0 * torch.randn(shape) + shift).to(dtype)
    pd = param_dtype or dtype
    w = (1.0 + 0.3 * torch.randn(shape[-1])).to(pd)
    b = (0.5 * torch.randn(shape[-1])).to(pd)
    return x, w, b


def _torch64(x, w, b, dy, eps=1e-5):
    """float64 F.layer_norm output and the gradients of every given (non-None) input."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = F.layer_norm(leaves[0], (x.shape[-1],), leaves[1], leaves[2], eps)
    y.backward(dy.double())
    return y.detach(), [t.grad if t is not None else None for t in leaves]


AFFINE = ["weight_bias", "weight_only", "bias_only", "none"]


def _affine(w, b, affine):
    return (w if affine in ("weight_bias", "weight_only") else None,
            b if affine in ("weight_bias", "bias_only") else None)


@parametrize_dtype
@pytest.mark.parametrize("affine", AFFINE)
def test_layer_norm_matches_float64(path, dtype, affine):
    x, w, b = _inputs((3, 13, H), dtype)
    w, b = _affine(w, b, affine)
    originals = [t.clone() if t is not None else None for t in (x, w, b)]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = layer_norm(*leaves, eps=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)

    y64, grads64 = _torch64(x, w, b, dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_ulps(y, y64, dtype, ULPS[dtype])
    for leaf, g64 in zip(leaves, grads64):
        if leaf is None:
            continue
        assert leaf.grad.dtype == dtype
        assert_close_ulps(leaf.grad, g64, dtype, ULPS[dtype])
    # inputs untouched by forward + backward
    for t, t0, leaf in zip((x, w, b), originals, leaves):
        if t is not None:
            assert torch.equal(t, t0) and torch.equal(leaf.detach(), t0)


def test_reference_equals_torch_in_float64():
    x, w, b = (t.double() for t in _inputs((5, H), torch.float32))
    for args in ((w, b), (w, None), (None, b), (None, None)):
        torch.testing.assert_close(layer_norm_reference(x, *args, eps=1e-6),
                                   F.layer_norm(x, (H,), *args, eps=1e-6), rtol=1e-13, atol=1e-13)


def test_layer_norm_matches_torch_bf16():
    """Against torch's own bf16 layer norm (fp32 statistics, one rounding)."""
    x, w, b = _inputs((4, 9, H), torch.bfloat16)
    assert_close_ulps(layer_norm(x, w, b), F.layer_norm(x, (H,), w, b), torch.bfloat16, 2)


def test_layer_norm_large_mean():
    """Variance from centred values, not E[x^2] - mean^2 (which loses ~mean^2/var * eps)."""
    x = torch.randn(7, H) + 100.0
    w, b = 1.0 + 0.3 * torch.randn(H), torch.randn(H)
    y64, _ = _torch64(x, w, b, torch.zeros(7, H))
    assert_close_ulps(layer_norm(x, w, b), y64, torch.float32, 128)


def test_layer_norm_mixed_param_dtype(path):
    """bf16 activations with fp32 weight / bias: output bf16, parameter gradients fp32."""
    x, w, b = _inputs((2, 9, H), torch.bfloat16, param_dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = layer_norm(*leaves)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, grads64 = _torch64(x, w, b, dy)
    assert y.dtype == torch.bfloat16
    assert [t.grad.dtype for t in leaves] == [torch.bfloat16, torch.float32, torch.float32]
    assert_close_ulps(y, y64, torch.bfloat16, 2)
    assert_close_ulps(leaves[0].grad, grads64[0], torch.bfloat16, 2)
    for leaf, g64 in zip(leaves[1:], grads64[1:]):  # fp32 results of fp32 sums
        assert_close_ulps(leaf.grad, g64, torch.float32, 64)


@pytest.mark.parametrize("block_rows,programs", [(4, 3), (1, 5), (16, 1)])
def test_layer_norm_row_blocking(monkeypatch, block_rows, programs):
    """Several rows per forward program, several row blocks per backward program,
    ragged last blocks."""
    monkeypatch.setattr(ln_mod, "_MAX_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(ln_mod, "_BWD_PROGRAMS_CPU", programs)
    x, w, b = _inputs((37, H), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = layer_norm(*leaves)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, grads64 = _torch64(x, w, b, dy)
    assert_close_ulps(y, y64, torch.float32, 64)
    for leaf, g64 in zip(leaves, grads64):
        assert_close_ulps(leaf.grad, g64, torch.float32, 64)


@pytest.mark.parametrize("layout", ["row_slice", "transposed", "strided_params"])
def test_layer_norm_non_contiguous(path, layout):
    big = 3 * torch.randn(37, H + 40) + 1.0
    w, b = 1.0 + 0.2 * torch.randn(H), torch.randn(H)
    if layout == "row_slice":      # rows with a stride > H: read in place
        x = big[:, 5:5 + H]
    elif layout == "transposed":   # last dim not unit-stride: copied internally
        x = torch.randn(H, 5, 7).permute(1, 2, 0)
    else:                          # weight / bias as strided views
        x = big[:, :H]
        w, b = torch.randn(2 * H)[::2] + 1.0, torch.randn(H, 3)[:, 1]
    x0 = x.clone()
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]  # the strided tensors themselves
    y = layer_norm(*leaves, eps=1e-6)
    dy = torch.randn(y.shape[::-1]).permute(*reversed(range(y.dim())))  # non-contiguous gradient
    y.backward(dy)
    y64, grads64 = _torch64(x, w, b, dy, eps=1e-6)
    assert_close_ulps(y, y64, torch.float32, 64)
    for leaf, g64 in zip(leaves, grads64):
        assert_close_ulps(leaf.grad, g64, torch.float32, 64)
    assert torch.equal(x, x0)


def test_layer_norm_partial_requires_grad(path):
    """Frozen parameters get no gradient; a frozen input still gives parameter gradients."""
    x, w, b = _inputs((5, H), torch.float32)
    xr = x.clone().requires_grad_()
    y = layer_norm(xr, w, b)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, (xr,), dy)
    y64, grads64 = _torch64(x, w, b, dy)
    assert_close_ulps(dx, grads64[0], torch.float32, 64)

    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    dw, db = torch.autograd.grad(layer_norm(x, wr, br), (wr, br), dy)
    assert_close_ulps(dw, grads64[1], torch.float32, 64)
    assert_close_ulps(db, grads64[2], torch.float32, 64)


def test_layer_norm_empty_and_errors():
    w = torch.ones(H)
    assert layer_norm(torch.empty(0, H), w, w).shape == (0, H)
    xe = torch.empty(0, 4, H, requires_grad=True)
    we = w.clone().requires_grad_()
    layer_norm(xe, we).sum().backward()
    assert xe.grad.shape == xe.shape and torch.equal(we.grad, torch.zeros(H))
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm(torch.randn(2, H), torch.ones(H + 1))
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm(torch.randn(2, H), w, torch.ones(2, H))
    with pytest.raises(ValueError, match="floating-point"):
        layer_norm(torch.ones(2, H, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="floating point"):
        layer_norm(torch.randn(2, H), torch.ones(H, dtype=torch.int64))
    with pytest.raises(ValueError, match="exceeds"):
        layer_norm(torch.randn(1, 65537))


def test_layer_norm_opcheck_and_compile():
    from torch.library import opcheck

    x = torch.randn(5, 13, requires_grad=True)
    w = torch.randn(13, requires_grad=True)
    b = torch.randn(13, requires_grad=True)
    opcheck(torch.ops.ligerzoo.layer_norm, (x, w, b, 1e-5))
    opcheck(torch.ops.ligerzoo.layer_norm, (x, None, None, 1e-5))
    _, mean, rstd = torch.ops.ligerzoo.layer_norm(x.detach(), w.detach(), b.detach(), 1e-5)
    dy = torch.randn(5, 13)
    opcheck(torch.ops.ligerzoo.layer_norm_backward, (dy, x.detach(), w.detach(), mean, rstd, True, True, torch.float32))
    opcheck(torch.ops.ligerzoo.layer_norm_backward, (dy, x.detach(), None, mean, rstd, False, False, torch.float32))

    g = torch.randn(5, 13)

    def f(x, w, b):
        return (layer_norm(x, w, b) * g).sum() + layer_norm(x * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    want = torch.autograd.grad(f(x, w, b), (x, w, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------- GPU
@parametrize_dtype
@pytest.mark.parametrize("shape", [(8192, 4096), (4, 2048, 123), (64, 65536)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_norm(dtype, shape):
    torch.manual_seed(0)
    x = (3 * torch.randn(shape, device="cuda") + 1.5).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device="cuda")).to(dtype)
    b = (0.5 * torch.randn(shape[-1], device="cuda")).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = layer_norm(*leaves)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, grads64 = _torch64(x, w, b, dy)
    ulps = {torch.float32: 64, torch.bfloat16: 2}[dtype]
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(leaves[0].grad, grads64[0], dtype, ulps)
    for leaf, g64 in zip(leaves[1:], grads64[1:]):  # sums over 8192 rows
        assert_close_ulps(leaf.grad, g64, dtype, 4 * ulps if dtype == torch.float32 else ulps)
    assert torch.equal(leaves[0].detach(), x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_norm_past_2_31_elements():
    """Rows beyond element 2^31 are addressed with 64-bit offsets."""
    rows, h = (1 << 31) // 4096 + 64, 4096
    x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.2 * torch.randn(h, device="cuda")).to(torch.bfloat16).requires_grad_()
    b = torch.randn(h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer_norm(x, w, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    tail = slice(rows - 200, rows)
    xt = x.detach()[tail].double().requires_grad_()
    y64 = F.layer_norm(xt, (h,), w.detach().double(), b.detach().double())
    y64.backward(dy[tail].double())
    assert_close_ulps(y[tail], y64, torch.bfloat16, 2)
    assert_close_ulps(x.grad[tail], xt.grad, torch.bfloat16, 2)
    assert torch.isfinite(w.grad.float()).all() and torch.isfinite(b.grad.float()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layer_norm_compile():
    x = torch.randn(4, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.zeros(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(x, w, b):
        return (layer_norm(x, w, b) * x).float().sum()

    compiled = torch.compile(f, fullgraph=True)
    gc = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    ge = torch.autograd.grad(f(x, w, b), (x, w, b))
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)
