"""kl_div: loss and gradients (input and target) against float64 torch.nn.functional.kl_div,
through the Triton kernels (interpreter on CPU, see conftest) and the torch reference.

Tolerances: the kernels compute in fp32 from the exact input values and round once to the
output dtype, so a result is compared with the float64 one of the same inputs within a
few ulps of its dtype, relative to each element and, as a floor, to the magnitude of the
whole result (for a reduced loss: the same reduction of |elementwise loss|, which bounds
the fp32 summation error). The CPU interpreter truncates fp32 -> bf16 (up to 1 ulp).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ligerzoo.kernels.kl_div import kl_div, kl_div_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    assert_compiled_matches_eager,
    force_reference,  # noqa: F401 (fixture)
    kernel_module,
    parametrize_dtype,
    small_blocks_fixture,
)

kl_mod = kernel_module("kl_div")

N, V = 13, 1000           # odd sizes; V spans 4 blocks of 256 (the last partial)
REDUCTIONS = ["none", "sum", "mean", "batchmean"]
ULPS = {torch.float32: 64, torch.bfloat16: 2, torch.float16: 4}


_small_blocks = small_blocks_fixture(kl_mod, 256)


@pytest.fixture(autouse=True)
def _small_sum_blocks(monkeypatch):
    monkeypatch.setattr(kl_mod, "SUM_BLOCK_SIZE", 256)  # the reduced forward's loop, as MAX_BLOCK_SIZE's


def make_inputs(dtype, shape=(N, V), log_target=False, zeros=True, scale=3.0):
    """input: log-probs of random logits; target: probabilities (with exact zeros) or log-probs."""
    x = torch.log_softmax(torch.randn(shape) * scale, -1).to(dtype)
    p = torch.softmax(torch.randn(shape) * 2, -1)
    if zeros and not log_target:
        p[..., ::7] = 0.0
    t = p.log() if log_target else p
    return x, t.to(dtype)


def oracle(x, t, reduction, log_target, grad_out, need_target=False, eps=None, row_chunk=None):
    """float64: torch's own kl_div (or the explicit clamped formula for eps). -> (loss, |loss|, gx, gt).

    ``row_chunk`` (GPU sizes, no eps) evaluates the elementwise loss a block of rows at a time
    and applies the reduction's divisor at the end (sum / numel for "mean", / size(0) for
    "batchmean")."""
    size = {"none": 1, "sum": 1, "mean": x.numel(), "batchmean": x.shape[0]}[reduction]
    if row_chunk is not None:
        gx = torch.empty_like(x, dtype=torch.float64)
        total, mag, rows = 0.0, 0.0, []
        for a in range(0, x.shape[0], row_chunk):
            x64 = x[a:a + row_chunk].double().requires_grad_()
            t64 = t[a:a + row_chunk].double()
            pw = F.kl_div(x64, t64, reduction="none", log_target=log_target)
            go = grad_out[a:a + row_chunk] if reduction == "none" else grad_out / size
            (pw * go).sum().backward()
            gx[a:a + row_chunk] = x64.grad
            if reduction == "none":
                rows.append(pw.detach())
            total += float(pw.detach().sum())
            mag += float(pw.detach().abs().sum())
        if reduction == "none":
            pw = torch.cat(rows)
            return pw, pw.abs(), gx, None
        return torch.tensor(total / size, dtype=torch.float64), mag / size, gx, None
    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(need_target)
    if eps is None:
        with warnings.catch_warnings():  # torch warns that "mean" is not "batchmean"
            warnings.simplefilter("ignore", UserWarning)
            loss = F.kl_div(x64, t64, reduction=reduction, log_target=log_target)
        pw = F.kl_div(x64, t64, reduction="none", log_target=log_target)
    else:
        pw = t64 * (t64.clamp(min=eps).log() - x64)
        loss = {"none": pw, "sum": pw.sum(), "mean": pw.mean(), "batchmean": pw.sum() / x.shape[0]}[reduction]
    mag = pw.detach().abs() if reduction == "none" else pw.detach().abs().sum() / size
    (loss * grad_out).sum().backward()
    return loss.detach(), mag, x64.grad, (t64.grad if need_target else None)


def check(actual, expected, dtype, scale=None, ulps=None):
    """assert_close_ulps with this file's ULPS[dtype] budget unless ``ulps`` is given."""
    assert_close_ulps(actual, expected, dtype, ulps or ULPS[dtype], scale=scale)


def grad_out_for(reduction, shape):
    if reduction == "none":
        return torch.randn(shape, dtype=torch.float64)
    return torch.tensor(0.7 if reduction == "sum" else 1.0, dtype=torch.float64)


def compare(fn, dtype, reduction, log_target, need_target=False, eps=None, make_kw=None, x=None, t=None):
    if x is None:
        x, t = make_inputs(dtype, log_target=log_target, zeros=not need_target, **(make_kw or {}))
    saved = (x.clone(), t.clone())
    go = grad_out_for(reduction, x.shape)
    xs = x.clone().requires_grad_()
    ts = t.clone().requires_grad_(need_target)
    kw = {} if eps is None else dict(eps=eps)
    out = fn(xs, ts, reduction=reduction, log_target=log_target, **kw)
    out.backward(go.to(out.dtype))
    ref, mag, gx, gt = oracle(x, t, reduction, log_target, go, need_target, eps)
    if reduction == "none":
        assert out.dtype == dtype and out.shape == x.shape
        check(out, ref, dtype)
    else:
        assert out.dtype == torch.float32 and out.dim() == 0
        check(out, ref, torch.float32, scale=mag)
    assert xs.grad.dtype == dtype and torch.isfinite(xs.grad).all()
    check(xs.grad, gx, dtype)
    if need_target:
        assert ts.grad.dtype == dtype and torch.isfinite(ts.grad).all()
        check(ts.grad, gt, dtype)
    else:
        assert ts.grad is None
    assert torch.equal(x, saved[0]) and torch.equal(t, saved[1])
    return out, xs.grad


# ---------------------------------------------------------------- Triton (interpreter)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_triton_fp32(reduction, log_target):
    compare(kl_div, torch.float32, reduction, log_target)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_triton_bf16(reduction, log_target):
    compare(kl_div, torch.bfloat16, reduction, log_target)


def test_triton_fp16():
    compare(kl_div, torch.float16, "sum", True)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_target_gradient(reduction, log_target):
    compare(kl_div, torch.float32, reduction, log_target, need_target=True)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")
def test_target_gradient_at_zero_is_minus_inf():
    x, t = make_inputs(torch.float32)
    xs, ts = x.clone().requires_grad_(), t.clone().requires_grad_()
    kl_div(xs, ts, reduction="sum").backward()
    zero = t == 0
    assert zero.any() and bool((ts.grad[zero] == float("-inf")).all())
    assert torch.isfinite(ts.grad[~zero]).all()


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_eps_clamp(reduction):
    x, t = make_inputs(torch.float32)
    t[0, :5] = 1e-12                                          # below eps: clamped inside the log
    compare(kl_div, torch.float32, reduction, False, need_target=True, eps=1e-10, x=x, t=t.clamp(min=1e-12))


@pytest.mark.parametrize("rows,programs,splits", [(1, 8, 4), (2, 3, 2), (3, 8, 2), (5, 1, 1)])
def test_reduced_rows_split_across_programs(monkeypatch, rows, programs, splits):
    """With fewer rows than programs wanted (SUM_PROGRAMS_PER_SM per SM, 1 SM off CUDA), a
    row's sum is split over programs (4 blocks of 256 for V=1000; a split of 2 blocks leaves
    the last one 488 columns; 3 wanted splits of 4 blocks make 2 of 2)."""
    monkeypatch.setattr(kl_mod, "SUM_PROGRAMS_PER_SM", programs)
    launched = []
    real = kl_mod._kl_div_sum_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(kl_mod, "_kl_div_sum_kernel", Spy())
    for reduction, log_target in (("sum", False), ("batchmean", True), ("mean", False)):
        x, t = make_inputs(torch.float32, shape=(rows, V), log_target=log_target)
        compare(kl_div, torch.float32, reduction, log_target, x=x, t=t)
    assert launched and all(g == (rows, splits) for g in launched), launched


def _zero_subnormal_and_negative_targets(device):
    x = torch.log_softmax(torch.randn(3, V), -1).to(device)
    t = torch.softmax(torch.randn(3, V), -1)
    t[0, :6] = torch.tensor([0.0, 1e-40, 3e-39, 1e-45, 2.0 ** -126, 1e-30])
    t = t.to(device)
    got = kl_div(x, t, reduction="none")
    want = F.kl_div(x.double(), t.double(), reduction="none")
    t64, x64 = t.double(), x.double()
    size = (torch.xlogy(t64, t64).abs() + (t64 * x64).abs())  # the terms' magnitude (cancellation)
    assert ((got.double() - want).abs() <= 1e-6 * size + 1e-44).all()
    assert got[0, 0] == 0 and got[0, 1] != 0
    torch.testing.assert_close(kl_div(x, t, reduction="sum").double(), want.sum(), rtol=1e-5, atol=0)
    tg = t.clone().requires_grad_()
    kl_div(x, tg, reduction="sum").backward()  # d/dp = log p + 1 - x, subnormal p included
    gwant = torch.log(t64[:, 1:]) + 1 - x64[:, 1:]
    assert ((tg.grad[:, 1:].double() - gwant).abs() <= 1e-6 * gwant.abs() + 1e-6).all()
    assert tg.grad[0, 0] == float("-inf")
    t[2, 7] = -0.25
    assert torch.isnan(kl_div(x, t, reduction="none")[2, 7]) and torch.isnan(F.kl_div(x, t, reduction="none")[2, 7])
    assert torch.isnan(kl_div(x, t, reduction="batchmean"))


def test_zero_subnormal_and_negative_targets_as_torch():
    """The kernels' log keeps subnormal targets (no flush to zero), gives 0 for a zero target
    and NaN for a negative one, as torch's xlogy (float64 torch on the same fp32 values); the
    target gradient's log too."""
    _zero_subnormal_and_negative_targets("cpu")


def test_reduced_op_over_zero_columns_is_zero():
    from ligerzoo.kernels._utils import ops

    for reduced in (True, False):
        out = ops.kl_div(torch.randn(4, 0), torch.rand(4, 0), reduced, 1.0, False, None)
        assert (out.shape, float(out.sum())) == (((), 0.0) if reduced else ((4, 0), 0.0))


def test_single_block(monkeypatch):
    monkeypatch.setattr(kl_mod, "MAX_BLOCK_SIZE", 4096)       # V=1000 in one masked block of 1024
    compare(kl_div, torch.float32, "batchmean", False)


@parametrize_dtype
def test_extreme_inputs(dtype):
    # log-probs down to ~ -1e4 and probabilities that underflow
    compare(kl_div, dtype, "sum", True, make_kw=dict(scale=3e3))
    compare(kl_div, dtype, "none", False, make_kw=dict(scale=3e3))


def test_3d_batchmean_divides_by_first_dim():
    """(B, T, V): "batchmean" divides by B (torch's convention), "mean" by every element."""
    compare(kl_div, torch.float32, "batchmean", False, make_kw=dict(shape=(3, 5, 37)))
    compare(kl_div, torch.float32, "mean", True, make_kw=dict(shape=(3, 5, 37)))
    compare(kl_div, torch.float32, "none", False, make_kw=dict(shape=(3, 5, 37)))


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")
def test_non_contiguous_and_expanded_grad():
    x, t = make_inputs(torch.float32)
    xt = x.t().contiguous().requires_grad_()
    tt = t.t().contiguous().requires_grad_()
    out = kl_div(xt.t(), tt.t(), reduction="none")
    out.sum().backward()                               # incoming gradient: an expanded (stride 0) tensor
    go = torch.ones(N, V, dtype=torch.float64)
    ref, _, gx, gt = oracle(x, t, "none", False, go, need_target=False)
    check(out, ref, torch.float32)
    check(xt.grad.t(), gx, torch.float32)
    assert tt.grad is not None                         # zeros in t: -inf there, finite elsewhere
    assert torch.isfinite(tt.grad.t()[t > 0]).all()


def test_transposed_incoming_grad(monkeypatch):
    """reduction="none" with an incoming gradient whose column stride is not 0 or 1 (the
    gradient of a transposed loss): copied to rows before the kernel, whose column offsets
    are 32-bit (a column stride of N tokens would pass 2^31 at V = 128256, N >= 16744)."""
    launched = []
    kernel = kl_mod._kl_div_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(args[6])                        # stride_go1
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kl_mod, "_kl_div_bwd_kernel", Spy())
    x, t = make_inputs(torch.float32)
    x.requires_grad_()
    out = kl_div(x, t, reduction="none")
    go = torch.randn(V, N).t()                                  # (N, V), strides (1, N)
    out.backward(go)
    assert launched == [1]
    ref, _, gx, _ = oracle(x.detach(), t, "none", False, go.double(), need_target=False)
    check(out, ref, torch.float32)
    check(x.grad, gx, torch.float32)


def test_no_grad_and_frozen_input():
    x, t = make_inputs(torch.float32)
    ref = oracle(x, t, "batchmean", False, torch.tensor(1.0, dtype=torch.float64))[0]
    with torch.no_grad():
        out = kl_div(x.clone().requires_grad_(), t)
    assert not out.requires_grad
    check(out, ref, torch.float32, scale=abs(float(ref)))
    out = kl_div(x, t)                                 # nothing requires grad
    assert not out.requires_grad
    check(out, ref, torch.float32, scale=abs(float(ref)))


def test_second_backward_through_graph():
    """The backward recomputes from saved inputs, so a retained graph can be reused."""
    x, t = make_inputs(torch.float32)
    xs = x.clone().requires_grad_()
    loss = kl_div(xs, t, reduction="sum")
    loss.backward(retain_graph=True)
    g1 = xs.grad.clone()
    loss.backward()
    check(xs.grad, 2 * g1, torch.float32)


def test_bad_arguments_raise():
    x, t = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        kl_div(x, t[:-1])
    with pytest.raises(ValueError, match="reduction"):
        kl_div(x, t, reduction="avg")
    with pytest.raises(ValueError, match="float"):
        kl_div(x, (t > 0).long())
    with pytest.raises(ValueError, match="eps"):
        kl_div(x, t, eps=0.0)
    with pytest.raises(ValueError, match="eps must be a real number"):  # was float()'s bare message
        kl_div(x, t, eps="a")
    with pytest.raises(ValueError, match="at least one dimension"):
        kl_div(x[0, 0], t[0, 0])


def test_torch_compile_fullgraph():
    x, t = make_inputs(torch.float32, log_target=True)

    def f(a, b):
        return kl_div(a, b, reduction="none", log_target=True)

    go = torch.randn(N, V)
    assert_compiled_matches_eager(f, (x, t), grad_out=go, backend="aot_eager")


# ----------------------------------------------------------------------- reference path
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@parametrize_dtype
def test_reference_function(dtype, reduction, log_target):
    compare(kl_div_reference, dtype, reduction, log_target)
    compare(kl_div_reference, dtype, reduction, log_target, need_target=True)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_public_function_reference_dispatch(force_reference, reduction, log_target):
    compare(kl_div, torch.float32, reduction, log_target)


def test_reference_dispatch_eps_and_extreme(force_reference):
    x, t = make_inputs(torch.float32)
    compare(kl_div, torch.float32, "sum", False, need_target=True, eps=1e-10, x=x, t=t.clamp(min=1e-12))
    compare(kl_div, torch.bfloat16, "none", True, make_kw=dict(scale=3e3))


def test_float64_runs_reference():
    x, t = make_inputs(torch.float64)
    out = kl_div(x, t, reduction="batchmean")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.kl_div(x, t, reduction="batchmean"))


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@parametrize_dtype
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_gpu_real_size(dtype, reduction, log_target):
    n, v = 8192, 128256
    x = torch.log_softmax(torch.randn(n, v, device="cuda") * 3, -1).to(dtype)
    t = torch.softmax(torch.randn(n, v, device="cuda") * 2, -1)
    t = (t.log() if log_target else t).to(dtype)
    saved = (x.clone(), t.clone())
    xs = x.clone().requires_grad_()
    out = kl_div(xs, t, reduction=reduction, log_target=log_target)
    go = grad_out_for(reduction, x.shape).cuda()
    out.backward(go.to(out.dtype))
    ref, mag, gx, _ = oracle(x, t, reduction, log_target, go, row_chunk=1024)
    check(out, ref, dtype if reduction == "none" else torch.float32, scale=None if reduction == "none" else mag)
    check(xs.grad, gx, dtype)
    assert torch.equal(saved[0], x) and torch.equal(saved[1], t)


@pytest.mark.gpu
@gpu
def test_gpu_compile_and_target_grad():
    n, v = 4096, 128256
    x = torch.log_softmax(torch.randn(n, v, device="cuda") * 3, -1).bfloat16()
    t = torch.log_softmax(torch.randn(n, v, device="cuda") * 2, -1).bfloat16()

    def f(a, b):
        return kl_div(a, b, reduction="batchmean", log_target=True)

    outs = assert_compiled_matches_eager(f, (x, t))
    ref, mag, gx, gt = oracle(x, t, "batchmean", True, torch.tensor(1.0, dtype=torch.float64, device="cuda"),
                              need_target=True)
    check(outs[1][0], ref, torch.float32, scale=mag)
    check(outs[1][1], gx, torch.bfloat16)
    check(outs[1][2], gt, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_zero_subnormal_and_negative_targets():
    """The same on the GPU (libdevice's logf, not the interpreter's numpy log), and the
    table log of bf16 targets with lg2.approx for the special values."""
    _zero_subnormal_and_negative_targets("cuda")
    _check_bf16_log_table("cuda")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_last_dim(reduction):
    """A (..., 0) input, as torch: 0 for sum / batchmean, NaN for mean, an empty "none"."""
    x = torch.zeros(3, 2, 0, requires_grad=True)
    t = torch.zeros(3, 2, 0)
    got = kl_div(x, t, reduction=reduction)
    want = F.kl_div(x.detach(), t, reduction=reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, equal_nan=True)
    got.sum().backward()
    assert x.grad.shape == x.shape


def _check_bf16_log_table(device):
    """The table log of the reduced forward (_log_of_bf16) on every bf16 bit pattern: within
    1.5 ulp of float64 torch's log for positive finite values (subnormals included), and
    -inf / inf / NaN where torch gives them. On the CPU, bf16 subnormals are left out: the
    Triton interpreter's bf16 -> fp32 conversion does not keep them (9.2e-41 loads as 0)."""
    import triton
    import triton.language as tl

    @triton.jit
    def log_kernel(Y, OUT, T, n, APPROX_SPECIALS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        y = tl.load(Y + offs, mask=offs < n, other=1.0).to(tl.float32)
        tl.store(OUT + offs, kl_mod._log_of_bf16(y, T, APPROX_SPECIALS), mask=offs < n)

    y = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(device)
    if device == "cpu":
        y = y[(y.float().abs() >= 2.0 ** -126) | (y == 0) | y.isnan()]
    out = torch.empty(y.shape, dtype=torch.float32, device=device)
    log_kernel[(triton.cdiv(y.numel(), 1024),)](y, out, kl_mod._bf16_log_table(y.device), y.numel(),
                                                 APPROX_SPECIALS=y.is_cuda, BLOCK=1024)
    want = torch.log(y.double())
    finite = torch.isfinite(want)
    w = want[finite]
    ulp = torch.exp2((torch.floor(torch.log2(w.abs().clamp_min(2.0 ** -126))) - 23))  # fp32's, at want
    err = ((out[finite].double() - w).abs() / ulp).where(w != 0, out[finite].double().abs())
    assert err.max() <= 1.5, (err.max(), y[finite][err.argmax()])
    torch.testing.assert_close(out[~finite].double(), want[~finite], equal_nan=True)


def test_bf16_log_table_on_every_bf16_value():
    _check_bf16_log_table("cpu")


def test_eps_outside_fp32_range():
    """An eps below fp32's smallest subnormal means max(p, 2**-149) for every fp32 p (it used
    to round to 0 in the kernel, whose log made 0 * log 0 = NaN); one above fp32's largest
    value is refused."""
    x = torch.log_softmax(torch.randn(2, 100), -1)
    t = torch.softmax(torch.randn(2, 100), -1)
    t[0, 3] = 0.0
    for eps in (1e-46, 1e-50):
        got = kl_div(x, t, "sum", eps=eps)
        want = (t.double() * (torch.log(t.double().clamp(min=eps)) - x.double())).sum()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="at most fp32's largest value"):
        kl_div(x, t, "sum", eps=1e39)


@pytest.mark.gpu
@gpu
def test_gpu_table_under_cudagraph_trees(monkeypatch):
    """torch.compile(mode="reduce-overhead") on a fresh table cache: no table outlives a call
    in the cudagraph trees' pool (a device table cached during their warmup failed their pool
    check), and every replay gives eager's value."""
    monkeypatch.setattr(kl_mod, "_LOG_TABLES", {})
    x = torch.log_softmax(torch.randn(64, 4096, device="cuda"), -1)
    t = torch.softmax(torch.randn(64, 4096, device="cuda"), -1).to(torch.bfloat16)
    f = torch.compile(lambda a, b: kl_div(a, b, reduction="batchmean"), mode="reduce-overhead")
    outs = [f(x, t).clone() for _ in range(4)]
    want = kl_div(x, t)
    for out in outs:
        torch.testing.assert_close(out, want, rtol=0, atol=0)

