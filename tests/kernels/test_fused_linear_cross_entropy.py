"""fused_linear_cross_entropy: loss and grads of x, weight, bias against float64 torch."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ligerzoo.kernels.fused_linear_cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from tests.kernels.helpers import (
    assert_close_rel,
    assert_compiled_matches_eager,
    force_reference,  # noqa: F401 (fixture)
    kernel_module,
    parametrize_dtype,
    small_blocks_fixture,
)

ce_mod = kernel_module("cross_entropy")  # the module, not the function

N, H, V = 37, 123, 1000
CHUNK = 8                 # 5 chunks, the last one partial (5 rows)
IGNORE = -100

OPTIONS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "smooth": dict(label_smoothing=0.1),
    "zloss": dict(lse_square_scale=1e-2),
    "softcap": dict(softcap=3.0),
    "ce_weight": dict(ce_weight=True),
    "all": dict(bias=True, ce_weight=True, label_smoothing=0.2, lse_square_scale=1e-2, softcap=5.0),
}


_small_blocks = small_blocks_fixture(ce_mod, 256)  # V=1000 spans 4 blocks, the last partial


def make_inputs(dtype, n=N, h=H, v=V, n_ignored=4, x_scale=1.0, w_scale=0.3):
    x = (torch.randn(n, h) * x_scale).to(dtype)
    w = (torch.randn(v, h) * w_scale).to(dtype)
    b = torch.randn(v).to(dtype)
    target = torch.randint(0, v, (n,))
    target[torch.randperm(n)[:n_ignored]] = IGNORE
    ce_weight = torch.rand(v) + 0.5
    return x, w, b, target, ce_weight


def oracle(x, w, b, target, ce_weight=None, reduction="mean", label_smoothing=0.0, lse_square_scale=0.0,
           softcap=None, grad_out=None, round_logits=None):
    """float64 torch: F.cross_entropy on logits from float64 x, weight (and bias), plus z-loss.

    ``round_logits=dtype`` rounds the logits to that dtype in the forward only (a straight-through
    rounding, as the op computes logits in x's dtype): needed where the logits are so large
    that one bf16 ulp changes the softmax (|logits| ~ 1e4 has a bf16 ulp of 64).
    """
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    b64 = b.detach().double().requires_grad_() if b is not None else None
    logits = x64 @ w64.T + (b64 if b64 is not None else 0)
    if round_logits is not None:
        logits = logits + (logits.detach().to(round_logits).double() - logits.detach())
    z = softcap * torch.tanh(logits / softcap) if softcap is not None else logits
    mask = target != IGNORE
    cw = ce_weight.double() if ce_weight is not None else None
    if reduction == "mean" and not bool(mask.any()):
        loss = (z * 0).sum()
    else:
        loss = F.cross_entropy(z, target, cw, ignore_index=IGNORE, reduction=reduction,
                               label_smoothing=label_smoothing)
    z_rows = lse_square_scale * torch.logsumexp(z, -1) ** 2 * mask
    z_loss = {"none": z_rows, "sum": z_rows.sum(), "mean": z_rows.sum() / mask.sum().clamp(min=1)}[reduction]
    loss = loss + z_loss
    (loss * grad_out).sum().backward()
    return loss.detach(), z_loss.detach(), x64.grad, w64.grad, (b64.grad if b64 is not None else None)


def grad_output_for(reduction, n):
    if reduction == "none":
        return torch.randn(n, dtype=torch.float64)
    return torch.tensor(1.0 if reduction == "mean" else 0.7, dtype=torch.float64)


def tols(dtype):
    """(loss tol, grad tol). bf16: logits are rounded to bf16 before the fp32 loss (as in HF),
    dlogits and the outputs are bf16: a few bf16 ulps (2^-8) of the magnitude."""
    return (2e-5, 2e-5) if dtype == torch.float32 else (1e-2, 2e-2)


def compare(fn, dtype, reduction, opts, n_ignored=4, chunk_size=CHUNK, requires=(True, True, True),
            make_kw=None, extra=None, round_logits=None):
    x, w, b, target, cw = make_inputs(dtype, n_ignored=n_ignored, **(make_kw or {}))
    use_bias = opts.get("bias", False)
    kw = {k: v for k, v in opts.items() if k not in ("bias", "ce_weight")}
    if opts.get("ce_weight"):
        kw["ce_weight"] = cw
    saved = [t.clone() for t in (x, w, b, target, cw)]
    go = grad_output_for(reduction, x.shape[0])
    xs = x.clone().requires_grad_(requires[0])
    ws = w.clone().requires_grad_(requires[1])
    bs = b.clone().requires_grad_(requires[2]) if use_bias else None
    loss, z_loss = fn(xs, ws, target, bs, reduction=reduction, return_z_loss=True, chunk_size=chunk_size,
                      **kw, **(extra or {}))
    loss.backward(go.float() if reduction == "none" else go.float().reshape(()))
    ref = oracle(x, w, b if use_bias else None, target, reduction=reduction, grad_out=go,
                 round_logits=round_logits, **kw)
    ref_loss, ref_z, ref_gx, ref_gw, ref_gb = ref
    loss_tol, grad_tol = tols(dtype)
    assert loss.dtype == torch.float32 and not z_loss.requires_grad
    assert_close_rel(loss.detach(), ref_loss, loss_tol)
    assert_close_rel(z_loss, ref_z, loss_tol, scale=float(ref_loss.abs().max()))
    for t, r, req in ((xs, ref_gx, requires[0]), (ws, ref_gw, requires[1]), (bs, ref_gb, requires[2])):
        if t is None:
            continue
        if not req:
            assert t.grad is None
            continue
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()
        assert_close_rel(t.grad, r, grad_tol)
    for before, after in zip(saved, (x, w, b, target, cw)):
        assert torch.equal(before, after)
    return loss.detach(), xs.grad, ws.grad, (bs.grad if bs is not None else None)


# ---------------------------------------------------------------- Triton (interpreter)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
@parametrize_dtype
def test_triton(dtype, opt, reduction):
    compare(fused_linear_cross_entropy, dtype, reduction, OPTIONS[opt])


@pytest.mark.parametrize("opt", ["bias", "smooth", "zloss", "softcap", "ce_weight"])
def test_triton_each_option(opt):
    compare(fused_linear_cross_entropy, torch.float32, "mean", OPTIONS[opt])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction):
    loss, gx, gw, gb = compare(fused_linear_cross_entropy, torch.float32, reduction, OPTIONS["all"], n_ignored=N)
    assert float(loss.abs().sum()) == 0.0
    for g in (gx, gw, gb):
        assert float(g.abs().sum()) == 0.0


@pytest.mark.parametrize("chunk_size", [1, 64, None])
def test_chunk_sizes(chunk_size):
    compare(fused_linear_cross_entropy, torch.float32, "sum", OPTIONS["bias"], chunk_size=chunk_size)


def test_default_chunk_size():
    assert default_chunk_size(8192, 4096, 128256) == 2048  # chunk ~ half of W (0.5 GB bf16)
    assert default_chunk_size(65536, 4096, 32000) == 16384  # chunk ~ size of x
    assert default_chunk_size(37, 123, 1000) == 37           # never more than N
    assert default_chunk_size(1000, 16, 100000) == 8
    assert default_chunk_size(1, 8, 100000) == 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("requires", [(True, False, False), (False, True, True)])
def test_partial_requires_grad(reduction, requires):
    compare(fused_linear_cross_entropy, torch.float32, reduction, OPTIONS["bias"], requires=requires)


def test_accum_dtype_bf16():
    compare(fused_linear_cross_entropy, torch.bfloat16, "mean", OPTIONS["plain"],
            extra=dict(accum_dtype=torch.bfloat16))


@parametrize_dtype
def test_extreme_logits(dtype):
    # logits = x @ W.T with |logits| ~ 1e4
    compare(fused_linear_cross_entropy, dtype, "mean", dict(label_smoothing=0.1, lse_square_scale=1e-6),
            make_kw=dict(x_scale=30.0, w_scale=30.0), round_logits=dtype)


def test_no_grad_computes_only_the_loss():
    x, w, b, target, cw = make_inputs(torch.float32)
    ref_loss = oracle(x, w, b, target, grad_out=torch.tensor(1.0, dtype=torch.float64))[0]
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(xs, ws, target, b, chunk_size=CHUNK)
    assert_close_rel(loss, ref_loss, 2e-5)
    loss = fused_linear_cross_entropy(x, w, target, b, chunk_size=CHUNK)  # nothing requires grad
    assert not loss.requires_grad
    assert_close_rel(loss, ref_loss, 2e-5)


@pytest.mark.parametrize("bad", [V, -1])
def test_target_out_of_range_raises(bad):
    x, w, b, target, _ = make_inputs(torch.float32)
    target[5] = bad
    with pytest.raises(ValueError, match=rf"{bad}.*V={V}"):
        fused_linear_cross_entropy(x, w, target)


def test_bad_arguments_raise():
    x, w, b, target, cw = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="same dtype"):
        fused_linear_cross_entropy(x, w.bfloat16(), target)
    with pytest.raises(ValueError, match="H differs"):
        fused_linear_cross_entropy(x[:, :-1], w, target)
    with pytest.raises(ValueError, match="2-D"):
        fused_linear_cross_entropy(x[None], w, target)
    with pytest.raises(ValueError, match="target must have shape"):
        fused_linear_cross_entropy(x, w, target[:-1])
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_cross_entropy(x, w, target, b[:-1])
    with pytest.raises(ValueError, match="bias must match"):
        fused_linear_cross_entropy(x, w, target, b.double())
    with pytest.raises(ValueError, match="class weight"):
        fused_linear_cross_entropy(x, w, target, ce_weight=cw[:-2])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(x, w, target, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer"):        # 2.5 used to be truncated
        fused_linear_cross_entropy(x, w, target, chunk_size=2.5)
    with pytest.raises(ValueError, match="ignore_index must be an integer"):
        fused_linear_cross_entropy(x, w, target, ignore_index=1.5)
    with pytest.raises(ValueError, match="softcap must be a finite number"):
        fused_linear_cross_entropy(x, w, target, softcap=float("inf"))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(x, w, target, reduction="batchmean")


def test_float64_runs_the_torch_reference():
    """float64 inputs give a float64 loss equal to torch's float64 cross entropy of the full
    logits (it used to come back fp32, 1e-7 off), differentiable like any torch graph:
    gradcheck passes and a second backward works."""
    x, w, b, target, cw = (t.double() if t.is_floating_point() else t for t in make_inputs(torch.float32))
    x.requires_grad_(), w.requires_grad_()
    loss = fused_linear_cross_entropy(x, w, target, b, ce_weight=cw, label_smoothing=0.1, softcap=5.0)
    z = 5.0 * torch.tanh(F.linear(x, w, b) / 5.0)
    want = F.cross_entropy(z, target, weight=cw, label_smoothing=0.1)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, atol=1e-12, rtol=1e-12)
    loss.backward(retain_graph=True)
    loss.backward()
    xs = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0, 6, -100, 3, 3])
    assert torch.autograd.gradcheck(lambda a, c: fused_linear_cross_entropy(a, c, ts, softcap=3.0), (xs, ws))


def test_non_contiguous_inputs():
    x, w, b, target, _ = make_inputs(torch.float32)
    go = torch.tensor(1.0, dtype=torch.float64)
    ref_loss, _, ref_gx, ref_gw, _ = oracle(x, w, None, target, grad_out=go)
    xt = x.t().contiguous().requires_grad_()
    wt = w.t().contiguous().requires_grad_()
    loss = fused_linear_cross_entropy(xt.t(), wt.t(), target, chunk_size=CHUNK)
    loss.backward()
    assert_close_rel(loss.detach(), ref_loss, 2e-5)
    assert_close_rel(xt.grad.t(), ref_gx, 2e-5)
    assert_close_rel(wt.grad.t(), ref_gw, 2e-5)


def test_torch_compile_fullgraph():
    x, w, b, target, cw = make_inputs(torch.float32)

    def f(x, w, b, t):
        return fused_linear_cross_entropy(x, w, t, b, ce_weight=cw, reduction="none", label_smoothing=0.1,
                                          softcap=4.0, lse_square_scale=1e-3, chunk_size=CHUNK)

    go = torch.randn(N)
    assert_compiled_matches_eager(f, (x, w, b), target, grad_out=go, backend="aot_eager")


# ----------------------------------------------------------------------- reference path
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
@parametrize_dtype
def test_reference_function(dtype, opt, reduction):
    compare(fused_linear_cross_entropy_reference, dtype, reduction, OPTIONS[opt])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
@parametrize_dtype
def test_public_function_reference_dispatch(force_reference, dtype, opt, reduction):
    """Without Triton the public function runs the same chunked loop with a torch row engine."""
    compare(fused_linear_cross_entropy, dtype, reduction, OPTIONS[opt])


def test_reference_dispatch_all_ignored_and_extreme(force_reference):
    loss, gx, gw, gb = compare(fused_linear_cross_entropy, torch.float32, "mean", OPTIONS["all"], n_ignored=N)
    assert float(loss.abs()) == 0.0 and float(gx.abs().sum() + gw.abs().sum() + gb.abs().sum()) == 0.0
    compare(fused_linear_cross_entropy, torch.bfloat16, "none", dict(label_smoothing=0.1),
            make_kw=dict(x_scale=30.0, w_scale=30.0), round_logits=torch.bfloat16)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@parametrize_dtype
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_gpu_real_size(dtype, reduction, opt):
    n, h, v = 8192, 4096, 128256
    x = torch.randn(n, h, device="cuda").to(dtype)
    w = (torch.randn(v, h, device="cuda") * 0.02).to(dtype)
    b = (torch.randn(v, device="cuda") * 0.1).to(dtype)
    target = torch.randint(0, v, (n,), device="cuda")
    target[::5] = IGNORE
    cw = torch.rand(v, device="cuda") + 0.5
    opts = dict(OPTIONS[opt])
    use_bias = opts.pop("bias", False)
    if opts.pop("ce_weight", False):
        opts["ce_weight"] = cw
    go = grad_output_for(reduction, n).cuda()
    ps = [x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()]
    loss = fused_linear_cross_entropy(ps[0], ps[1], target, ps[2] if use_bias else None, reduction=reduction,
                                      **opts)
    loss.backward(go.float() if reduction == "none" else go.float().reshape(()))
    ref_loss, _, ref_gx, ref_gw, ref_gb = oracle(x, w, b if use_bias else None, target, reduction=reduction,
                                                 grad_out=go, **opts)
    loss_tol, grad_tol = tols(dtype)
    assert_close_rel(loss.detach(), ref_loss, loss_tol)
    assert_close_rel(ps[0].grad, ref_gx, grad_tol)
    assert_close_rel(ps[1].grad, ref_gw, grad_tol)
    if use_bias:
        assert_close_rel(ps[2].grad, ref_gb, grad_tol)


@pytest.mark.gpu
@gpu
def test_gpu_compile_matches_eager():
    n, h, v = 2048, 1024, 32000
    x = torch.randn(n, h, device="cuda").bfloat16()
    w = (torch.randn(v, h, device="cuda") * 0.05).bfloat16()
    target = torch.randint(0, v, (n,), device="cuda")
    target[::3] = IGNORE

    def f(x, w, t):
        return fused_linear_cross_entropy(x, w, t, reduction="sum", label_smoothing=0.1, softcap=30.0) * 0.5

    assert_compiled_matches_eager(f, (x, w), target)


@pytest.mark.parametrize("vocab,hidden", [(301, 513), (7, 5), (2, 1), (1, 3), (64, 4096)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_grad_accumulator_narrows_in_place_exactly(vocab, hidden, out_dtype):
    """The fp32 dW accumulator split in two halves and narrowed into its own storage gives
    exactly ``sum.to(out_dtype)``, for odd sizes and more than the first 2^16-element block."""
    from ligerzoo.kernels.fused_linear_cross_entropy import _WeightGradAccumulator

    g = torch.Generator().manual_seed(vocab * hidden)
    acc = _WeightGradAccumulator(vocab, hidden, torch.float32, out_dtype, "cpu")
    want = torch.zeros(vocab, hidden, dtype=torch.float32)
    for c in (3, 5):
        a = torch.randn(c, vocab, generator=g).t()  # (V, c), transposed strides as in the chunk loop
        b = torch.randn(c, hidden, generator=g)
        acc.add_mm(a, b)
        want += a @ b
    accumulated = torch.cat([p.clone() for p in acc.parts])  # (V, H) fp32, before narrowing
    torch.testing.assert_close(accumulated, want, atol=1e-5, rtol=1e-5)
    got = acc.finish()
    assert got.shape == (vocab, hidden) and got.dtype == out_dtype
    torch.testing.assert_close(got, accumulated.to(out_dtype), atol=0, rtol=0)  # narrowing is exact
    if out_dtype != torch.float32 and vocab >= 2:  # the result lives in the accumulator's first allocation
        assert got.untyped_storage().nbytes() <= vocab * hidden * got.element_size() + 4


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_weight_grad_accumulator_never_reads_its_uninitialised_buffer(out_dtype):
    """The accumulator is allocated without a fill: the first add_mm writes every element
    (garbage in the buffer never reaches the result), and with nothing added finish() gives
    zeros."""
    from ligerzoo.kernels.fused_linear_cross_entropy import _WeightGradAccumulator

    g = torch.Generator().manual_seed(0)
    vocab, hidden = 37, 11
    acc = _WeightGradAccumulator(vocab, hidden, torch.float32, out_dtype, "cpu")
    for part in acc.parts:
        part.fill_(float("nan"))
    a, b = torch.randn(4, vocab, generator=g).t(), torch.randn(4, hidden, generator=g)
    acc.add_mm(a, b)
    acc.add_mm(a, b)
    torch.testing.assert_close(acc.finish(), (2 * (a @ b)).to(out_dtype), atol=1e-5, rtol=1e-5)
    empty = _WeightGradAccumulator(vocab, hidden, torch.float32, out_dtype, "cpu")
    for part in empty.parts:
        part.fill_(float("nan"))
    assert torch.equal(empty.finish(), torch.zeros(vocab, hidden, dtype=out_dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_accumulate_mm_write_equals_adding_to_zeros(dtype):
    """_accumulate_mm(write=True) into a NaN-filled fp32 buffer gives exactly what adding the
    product to zeros gives."""
    from ligerzoo.kernels.fused_linear_cross_entropy import _accumulate_mm

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 9, generator=g).to(dtype).t(), torch.randn(6, 5, generator=g).to(dtype)
    want = torch.zeros(9, 5)
    _accumulate_mm(want, a, b)
    got = torch.full((9, 5), float("nan"))
    _accumulate_mm(got, a, b, write=True)
    assert torch.equal(got, want)


def test_sum_variant_writes_dx_over_x_and_matches_the_op():
    from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_sum_

    torch.manual_seed(3)
    x = torch.randn(37, 24)
    w = torch.randn(53, 24) * 0.2
    t = torch.randint(0, 53, (37,))
    t[::4] = IGNORE
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = fused_linear_cross_entropy(xl, wl, t, reduction="sum", softcap=4.0, chunk_size=8)
    ref.backward()
    buf = x.clone()
    loss, gw = fused_linear_cross_entropy_sum_(buf, w, t, softcap=4.0)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(buf, xl.grad, atol=1e-5, rtol=1e-5)  # dx, written over the input
    torch.testing.assert_close(gw, wl.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        fused_linear_cross_entropy_sum_(x.t().contiguous().t(), w, t)
    with pytest.raises(ValueError, match="out of range"):
        fused_linear_cross_entropy_sum_(x.clone(), w, torch.full((37,), 53))


@pytest.mark.parametrize("scale", [0.25, "tensor", "tensor_1"])
def test_sum_variant_folds_a_scale_into_the_loss_and_both_gradients(scale):
    """``scale`` (a float, a 0-d or a one-element tensor: a caller's 1 / count) multiplies the
    loss, dx and dW exactly as multiplying the summed loss would (float64 reference); a
    tensor of more than one element is refused."""
    from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_sum_

    torch.manual_seed(4)
    x, w = torch.randn(29, 24), torch.randn(41, 24) * 0.3
    t = torch.randint(0, 41, (29,))
    t[::5] = IGNORE
    factor = 1 / 23
    s = {"tensor": torch.tensor(factor), "tensor_1": torch.tensor([factor])}.get(scale, scale)
    factor = s if isinstance(s, float) else float(s)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(torch.tanh(xd @ wd.t() / 4.0) * 4.0, t, ignore_index=IGNORE,
                                            reduction="sum") * factor
    ref.backward()
    buf = x.clone()
    loss, gw = fused_linear_cross_entropy_sum_(buf, w, t, softcap=4.0, scale=s)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf.double(), xd.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw.double(), wd.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="one-element"):
        fused_linear_cross_entropy_sum_(x.clone(), w, t, scale=torch.ones(2))


def test_sum_variant_scale_in_fp16_does_not_underflow_and_is_a_constant():
    """fp16 with a large count's scale (1/65536): the scale is applied after the kernels, so the
    per-row gradients are not flushed to zero before they are summed into dW (float64
    reference); a scale that requires grad is taken as a constant (no graph on the loss)."""
    from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_sum_

    torch.manual_seed(8)
    n, h, v = 64, 32, 512
    x, w = torch.randn(n, h), torch.randn(v, h) * 0.2
    t = torch.randint(0, v, (n,))
    scale = torch.tensor(1 / 65536, requires_grad=True)
    buf = x.half()
    loss, gw = fused_linear_cross_entropy_sum_(buf, w.half(), t, scale=scale)
    assert not loss.requires_grad
    xd, wd = x.half().double().requires_grad_(), w.half().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(xd @ wd.t(), t, reduction="sum") / 65536
    ref.backward()
    assert ((gw.double() - wd.grad).norm() / wd.grad.norm()).item() < 5e-3
    # dx itself is about 1e-6, among fp16's subnormals (spaced 6e-8): 2e-2 is their resolution
    # (scaled inside the kernels this was about 1e-1)
    assert ((buf.double() - xd.grad).norm() / xd.grad.norm()).item() < 2e-2
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-3)


@pytest.mark.gpu
@gpu
def test_gpu_accumulator_write_equals_adding_to_zeros():
    """On CUDA the first chunk's GEMM writes the fp32 accumulator (mm with out_dtype, beta = 0):
    the same values as adding the product to zeros (within fp32 rounding, should cuBLAS pick
    another algorithm), with nothing read from the uninitialised buffer."""
    from ligerzoo.kernels.fused_linear_cross_entropy import _accumulate_mm

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(2048, 4000, device="cuda", generator=g).bfloat16().t()  # (V, C), transposed as in the loop
    b = torch.randn(2048, 1024, device="cuda", generator=g).bfloat16()
    want = torch.zeros(4000, 1024, device="cuda")
    _accumulate_mm(want, a, b)
    got = torch.full((4000, 1024), float("nan"), device="cuda")
    _accumulate_mm(got, a, b, write=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_autocast_casts_the_inputs_as_a_linear_layer():
    """Mixed precision (fp32 weights, bf16 activations under torch.autocast): the loss and the
    fp32 weight's gradient are those of torch's linear + cross entropy under the same
    autocast (bf16 logits), where a dtype mismatch used to be refused."""
    from ligerzoo import kernels as K

    torch.manual_seed(0)
    lin, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 37, bias=True)
    x, t = torch.randn(9, 16), torch.randint(0, 37, (9,))
    grads = []
    for fn in (lambda h: K.fused_linear_cross_entropy(h, head.weight, t, head.bias),
               lambda h: F.cross_entropy(head(h).float(), t)):
        lin.zero_grad(), head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = lin(x)
            assert h.dtype == torch.bfloat16 and head.weight.dtype == torch.float32
            loss = fn(h)
        loss.backward()
        grads.append((loss.detach(), head.weight.grad.clone(), head.bias.grad.clone(), lin.weight.grad.clone()))
    for got, want in zip(*grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    with torch.no_grad():
        s, te = lin(x), torch.randn(9, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the JSD's pairs too: as cast by hand
            loss = K.fused_linear_jsd(s, head.weight, te, head.weight * 0.5)
        bf = torch.bfloat16
        want = K.fused_linear_jsd(s.to(bf), head.weight.to(bf), te.to(bf), (head.weight * 0.5).to(bf))
    assert loss.dtype == torch.float32 and torch.equal(loss, want)


def _check_minus_inf_bias(reduction, n, h, v, masked, device, dtype, w_scale, loss_tol, grad_tol):
    """A bias of -inf on the first ``masked`` of ``v`` tokens: torch's loss and gradients
    (float64 on the same values), never NaN. Gradients within ``grad_tol`` of max |grad|."""
    torch.manual_seed(0)
    x = torch.randn(n, h, device=device).to(dtype)
    w = (torch.randn(v, h, device=device) * w_scale).to(dtype)
    b = torch.zeros(v, device=device, dtype=dtype)
    b[:masked] = float("-inf")
    target = torch.randint(masked, v, (n,), device=device)
    target[3] = -100
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(xs, ws, target, b, reduction=reduction)
    go = torch.rand(n, device=device) if reduction == "none" else torch.tensor(1.0, device=device)
    loss.backward(go)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.cross_entropy(F.linear(x64, w64, b.double()), target, reduction=reduction)
    ref.backward(go.double())
    assert torch.isfinite(loss).all() and torch.isfinite(xs.grad).all() and torch.isfinite(ws.grad).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=loss_tol, atol=loss_tol)
    assert_close_rel(xs.grad, x64.grad, grad_tol)
    assert_close_rel(ws.grad, w64.grad, grad_tol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bias_of_minus_inf_over_the_leading_blocks(reduction):
    """fp32, blocks of 256: the first 600 tokens masked (two whole blocks and part of one)."""
    _check_minus_inf_bias(reduction, N, H, V, 600, "cpu", torch.float32, 0.1, 1e-5, 1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_bias_of_minus_inf_over_most_of_the_vocabulary(reduction):
    """bf16, hidden 4096, vocab 128256, the first 100000 tokens masked."""
    _check_minus_inf_bias(reduction, 512, 4096, 128256, 100000, "cuda", torch.bfloat16, 0.02, 2e-3, 2e-2)
