"""RMSNorm / fused add + RMSNorm against float64 references, through the Triton kernels
(interpreter on CPU, see conftest) and through the forced torch-reference dispatch.

Tolerances: the kernels accumulate in fp32 and round once (or at the documented casting
points) to the output dtype, so outputs and gradients are compared with the float64 result
of the same inputs within a few ulps of the output dtype, relative to each element and,
as a floor, to the largest element (sums cancel). The CPU Triton interpreter truncates
fp32 -> bf16 instead of rounding to nearest, i.e. up to 1 ulp per rounding instead of 1/2:
the bf16 budgets below cover that.
"""
import pytest
import torch

from ligerzoo.kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)
from tests.kernels.helpers import (
    assert_close_ulps,
    kernel_module,
    parametrize_dtype,
    path,  # noqa: F401 (fixture)
)

rms_mod = kernel_module("rms_norm")

H = 123  # not a power of two


ULPS = {torch.float32: 64, torch.bfloat16: 2}


def _inputs(shape, dtype, offset):
    x = torch.randn(shape, dtype=torch.float32).mul_(3.0).to(dtype)
    base = 0.0 if offset else 1.0  # gemma-style weights live around 0
    w = (base + 0.2 * torch.randn(shape[-1])).to(dtype)
    return x, w


def _f64_grads(fn, inputs, grads):
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    outs = fn(*inputs64)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.double() for g in grads])
    return [o.detach() for o in outs], [t.grad for t in inputs64]


MODES = [("llama", 0.0), ("gemma", 1.0), ("none", 0.0), ("llama", 1.0), ("gemma", 0.0)]


@parametrize_dtype
@pytest.mark.parametrize("mode,offset", MODES)
def test_rms_norm_matches_float64(path, dtype, mode, offset):
    x, w = _inputs((3, 13, H), dtype, offset)
    x0, w0 = x.clone(), w.clone()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xr, wr, 1e-6, offset, mode)
    dy = torch.randn_like(y)
    y.backward(dy)

    (y64,), (dx64, dw64) = _f64_grads(lambda a, b: rms_norm_reference(a, b, 1e-6, offset, mode), [x, w], [dy])
    ulps = ULPS[dtype] * (2 if mode == "none" else 1)  # "none" rounds ~6 times in the forward
    assert y.dtype == dtype and y.shape == x.shape
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(xr.grad, dx64, dtype, ulps)
    assert_close_ulps(wr.grad, dw64, dtype, ulps)
    assert xr.grad.dtype == dtype and wr.grad.dtype == dtype
    # inputs untouched by forward + backward
    assert torch.equal(x, x0) and torch.equal(w, w0) and torch.equal(xr.detach(), x0)


def test_rms_norm_triton_agrees_with_reference_fp32():
    """Same dtype, same roundings: Triton and the torch reference agree to fp32 noise."""
    x, w = _inputs((2, 7, H), torch.float32, 0.0)
    for mode in ("llama", "gemma", "none"):
        torch.testing.assert_close(rms_norm(x, w, 1e-5, 0.0, mode), rms_norm_reference(x, w, 1e-5, 0.0, mode),
                                   rtol=1e-6, atol=1e-6)


def test_rms_norm_mixed_weight_dtype():
    """bf16 activations with an fp32 weight (mixed precision): output bf16, dweight fp32."""
    x, _ = _inputs((2, 9, H), torch.bfloat16, 0.0)
    w = 1.0 + 0.2 * torch.randn(H)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xr, wr)
    dy = torch.randn_like(y)
    y.backward(dy)
    (y64,), (dx64, dw64) = _f64_grads(lambda a, b: rms_norm_reference(a, b), [x, w], [dy])
    assert y.dtype == torch.bfloat16 and wr.grad.dtype == torch.float32
    assert_close_ulps(y, y64, torch.bfloat16, 2)
    assert_close_ulps(xr.grad, dx64, torch.bfloat16, 2)
    assert_close_ulps(wr.grad, dw64, torch.bfloat16, 2)  # fp32 result, bf16 xhat rounding inside


@pytest.mark.parametrize("layout", ["row_slice", "transposed", "expanded_weight"])
def test_rms_norm_non_contiguous(path, layout):
    big = torch.randn(37, H + 40)
    w = 1.0 + 0.2 * torch.randn(H)
    if layout == "row_slice":      # rows with a stride > H: read in place
        x = big[:, 5:5 + H]
    elif layout == "transposed":   # last dim not unit-stride: copied internally
        x = torch.randn(H, 5, 7).permute(1, 2, 0)
    else:                          # weight as a strided view
        x = big[:, :H]
        w = torch.randn(2 * H)[::2] + 1.0
    x0 = x.clone()
    xv, wv = x.detach().requires_grad_(), w.detach().requires_grad_()  # the strided tensors themselves
    y = rms_norm(xv, wv, 1e-6, 0.0, "gemma")
    dy = torch.randn_like(y)
    y.backward(dy)
    (y64,), (dx64, dw64) = _f64_grads(lambda a, b: rms_norm_reference(a, b, 1e-6, 0.0, "gemma"), [x, w], [dy])
    assert_close_ulps(y, y64, torch.float32, 64)
    assert_close_ulps(xv.grad, dx64, torch.float32, 64)
    assert_close_ulps(wv.grad, dw64, torch.float32, 64)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("block_rows,programs", [(4, 3), (1, 5), (16, 1)])
def test_rms_norm_row_blocking(monkeypatch, block_rows, programs):
    """Several rows per forward program and several row blocks per backward program."""
    monkeypatch.setattr(rms_mod, "_MAX_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(rms_mod, "_BWD_PROGRAMS_CPU", programs)
    x, w = _inputs((37, H), torch.float32, 0.0)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xr, wr)
    dy = torch.randn_like(y)
    y.backward(dy)
    (y64,), (dx64, dw64) = _f64_grads(lambda a, b: rms_norm_reference(a, b), [x, w], [dy])
    assert_close_ulps(y, y64, torch.float32, 64)
    assert_close_ulps(xr.grad, dx64, torch.float32, 64)
    assert_close_ulps(wr.grad, dw64, torch.float32, 64)


@parametrize_dtype
def test_rms_norm_inplace_backward(dtype):
    """inplace=True writes dx over the incoming gradient buffer; values are unchanged."""
    x, w = _inputs((3, 11, H), dtype, 0.0)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    dy = torch.randn(3, 11, H, dtype=dtype)
    dx_ref, dw_ref = torch.autograd.grad(rms_norm(xr, wr), (xr, wr), dy.clone())
    dy_buf = dy.clone()
    dx, dw = torch.autograd.grad(rms_norm(xr, wr, inplace=True), (xr, wr), dy_buf)
    assert dx.data_ptr() == dy_buf.data_ptr()  # reused the caller's buffer (opt-in)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
    torch.testing.assert_close(dw, dw_ref, rtol=0, atol=0)
    assert torch.equal(xr.detach(), x)
    # a non-contiguous incoming gradient falls back to a fresh buffer
    g = torch.randn(H, 11, 3, dtype=dtype).permute(2, 1, 0)
    dx2, _ = torch.autograd.grad(rms_norm(xr, wr, inplace=True), (xr, wr), g)
    dx2_ref, _ = torch.autograd.grad(rms_norm(xr, wr), (xr, wr), g)
    torch.testing.assert_close(dx2, dx2_ref, rtol=0, atol=0)


@parametrize_dtype
@pytest.mark.parametrize("mode,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_fused_add_rms_norm_matches_float64(path, dtype, mode, offset):
    x, w = _inputs((2, 19, H), dtype, offset)
    r = torch.randn(2, 19, H).to(dtype)
    x0, r0, w0 = x.clone(), r.clone(), w.clone()
    xr, rr, wr = (t.clone().requires_grad_() for t in (x, r, w))
    y, s = fused_add_rms_norm(xr, rr, wr, 1e-6, offset, mode)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward((y, s), (dy, ds))

    # The kernel rounds x + r to x's dtype (as torch's bf16 add does); the float64
    # reference does not: one more rounding in the bf16 budget.
    def ref(a, b, c):
        return fused_add_rms_norm_reference(a, b, c, 1e-6, offset, mode)

    (y64, s64), (dx64, dr64, dw64) = _f64_grads(ref, [x, r, w], [dy, ds])
    ulps = ULPS[dtype] * (2 if dtype == torch.bfloat16 else 1)  # one more rounding (the sum)
    assert y.dtype == dtype and s.dtype == dtype
    assert_close_ulps(s, s64, dtype, ulps)
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(xr.grad, dx64, dtype, ulps)
    assert_close_ulps(rr.grad, dr64, dtype, ulps)
    assert_close_ulps(wr.grad, dw64, dtype, ulps)
    assert torch.equal(x, x0) and torch.equal(r, r0) and torch.equal(w, w0)
    # normed is exactly rms_norm of the returned (rounded) residual sum
    assert torch.equal(y.detach(), rms_norm(s.detach(), w, 1e-6, offset, mode))


def test_fused_add_rms_norm_only_normed_used(path):
    x, w = _inputs((13, H), torch.float32, 0.0)
    r = torch.randn(13, H)
    xr, rr, wr = (t.clone().requires_grad_() for t in (x, r, w))
    y, _ = fused_add_rms_norm(xr, rr, wr)
    dy = torch.randn_like(y)
    y.backward(dy)
    _, (dx64, dr64, dw64) = _f64_grads(lambda a, b, c: fused_add_rms_norm_reference(a, b, c)[0], [x, r, w], [dy])
    assert_close_ulps(xr.grad, dx64, torch.float32, 64)
    assert_close_ulps(rr.grad, dr64, torch.float32, 64)
    assert_close_ulps(wr.grad, dw64, torch.float32, 64)


def test_matches_hf_llama_and_gemma_rmsnorm():
    pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = (3 * torch.randn(4, 9, H)).to(torch.bfloat16)
    llama = LlamaRMSNorm(H, eps=1e-5)
    gemma = GemmaRMSNorm(H, eps=1e-6)
    with torch.no_grad():
        llama.weight.copy_(1 + 0.2 * torch.randn(H))
        gemma.weight.copy_(0.2 * torch.randn(H))
    llama, gemma = llama.to(torch.bfloat16), gemma.to(torch.bfloat16)
    with torch.no_grad():
        ours = rms_norm(x, llama.weight, 1e-5, 0.0, "llama")
        theirs = llama(x)
        assert ours.dtype == theirs.dtype
        assert_close_ulps(ours, theirs, torch.bfloat16, 1)
        ours = rms_norm(x, gemma.weight, 1e-6, 1.0, "gemma")
        theirs = gemma(x)
        assert_close_ulps(ours, theirs, torch.bfloat16, 1)


def test_rms_norm_empty_and_errors():
    w = torch.ones(H)
    assert rms_norm(torch.empty(0, H), w).shape == (0, H)
    with pytest.raises(ValueError, match="casting_mode"):
        rms_norm(torch.randn(2, H), w, casting_mode="fp32")
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.randn(2, H), torch.ones(H + 1))
    with pytest.raises(ValueError, match="floating-point"):
        rms_norm(torch.ones(2, H, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="residual must match"):
        fused_add_rms_norm(torch.randn(2, H), torch.randn(3, H), w)
    with pytest.raises(ValueError, match="residual must match"):
        fused_add_rms_norm(torch.randn(2, H), torch.randn(2, H, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="exceeds"):
        rms_norm(torch.randn(1, 65537), torch.ones(65537))


def test_rms_norm_opcheck_and_compile():
    from torch.library import opcheck

    x = torch.randn(5, 13, requires_grad=True)
    w = torch.randn(13, requires_grad=True)
    r = torch.randn(5, 13, requires_grad=True)
    opcheck(torch.ops.ligerzoo.rms_norm, (x, w, 1e-6, 0.0, "llama", False))
    opcheck(torch.ops.ligerzoo.fused_add_rms_norm, (x, r, w, 1e-6, 1.0, "gemma"))
    y, rstd = torch.ops.ligerzoo.rms_norm(x.detach(), w.detach(), 1e-6, 0.0, "none", False)
    dy = torch.randn(5, 13)
    opcheck(torch.ops.ligerzoo.rms_norm_backward, (dy, x.detach(), w.detach(), rstd, 0.0, "none", dy.clone()))
    opcheck(torch.ops.ligerzoo.rms_norm_backward_inplace, (dy.clone(), x.detach(), w.detach(), rstd, 0.0, "llama"))

    g = torch.randn(5, 13)

    def f(x, w):
        return (rms_norm(x, w, inplace=True) * g).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    gx, gw = torch.autograd.grad(compiled(x, w), (x, w))
    ex, ew = torch.autograd.grad(f(x, w), (x, w))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


# ----------------------------------------------------------------------------- GPU
@parametrize_dtype
@pytest.mark.parametrize("mode,offset", [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)])
@pytest.mark.parametrize("shape", [(8192, 4096), (4, 2048, 123)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rms_norm(dtype, mode, offset, shape):
    torch.manual_seed(0)
    x = (3 * torch.randn(shape, device="cuda")).to(dtype)
    w = ((0.0 if offset else 1.0) + 0.2 * torch.randn(shape[-1], device="cuda")).to(dtype)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xr, wr, 1e-6, offset, mode)
    dy = torch.randn_like(y)
    y.backward(dy)
    (y64,), (dx64, dw64) = _f64_grads(lambda a, b: rms_norm_reference(a, b, 1e-6, offset, mode), [x, w], [dy])
    ulps = {torch.float32: 64, torch.bfloat16: 2}[dtype] * (2 if mode == "none" else 1)
    assert_close_ulps(y, y64, dtype, ulps)
    assert_close_ulps(xr.grad, dx64, dtype, ulps)
    assert_close_ulps(wr.grad, dw64, dtype, 4 * ulps if dtype == torch.float32 else ulps)
    assert torch.equal(xr.detach(), x)


@parametrize_dtype
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_add_rms_norm(dtype):
    torch.manual_seed(0)
    x = torch.randn(8192, 4096, device="cuda").to(dtype)
    r = (4 * torch.randn(8192, 4096, device="cuda")).to(dtype)
    w = (1 + 0.2 * torch.randn(4096, device="cuda")).to(dtype)
    xr, rr, wr = (t.clone().requires_grad_() for t in (x, r, w))
    y, s = fused_add_rms_norm(xr, rr, wr)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward((y, s), (dy, ds))
    (y64, s64), (dx64, dr64, dw64) = _f64_grads(fused_add_rms_norm_reference, [x, r, w], [dy, ds])
    ulps = {torch.float32: 64, torch.bfloat16: 2}[dtype]
    for a, e in ((s, s64), (y, y64), (xr.grad, dx64), (rr.grad, dr64), (wr.grad, dw64)):
        assert_close_ulps(a, e, dtype, ulps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rms_norm_past_2_31_elements():
    """Rows beyond element 2^31 are addressed with 64-bit offsets (Liger issue #803)."""
    rows, h = (1 << 31) // 4096 + 64, 4096
    x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.2 * torch.randn(h, device="cuda")).to(torch.bfloat16)
    xr, wr = x.requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xr, wr)
    dy = torch.randn_like(y)
    y.backward(dy)
    tail = slice(rows - 200, rows)
    xt = x.detach()[tail].double().requires_grad_()
    y64 = rms_norm_reference(xt, wr.detach().double())
    y64.backward(dy[tail].double())
    assert_close_ulps(y[tail], y64, torch.bfloat16, 2)
    assert_close_ulps(xr.grad[tail], xt.grad, torch.bfloat16, 2)
    assert torch.isfinite(wr.grad.float()).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rms_norm_compile():
    x = torch.randn(4, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def f(x, w):
        y, s = fused_add_rms_norm(x, x * 2, w)
        return (rms_norm(y, w) * s).float().sum()

    compiled = torch.compile(f, fullgraph=True)
    gc = torch.autograd.grad(compiled(x, w), (x, w))
    ge = torch.autograd.grad(f(x, w), (x, w))
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)
