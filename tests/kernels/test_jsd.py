"""jsd (generalised Jensen-Shannon divergence): loss and gradients (student and teacher)
against an independent float64 oracle built from torch.nn.functional.kl_div, through the
Triton kernel (interpreter on CPU, see conftest) and the torch reference.

Tolerances: fp32 math on the exact input values, the loss compared within fp32 ulps of
the mean |row loss| (bounds the summation error), gradients within a few ulps of their
dtype relative to each element plus, as a floor, the largest element. The CPU interpreter
truncates fp32 -> bf16 (up to 1 ulp).
"""
from __future__ import annotations


import pytest
import torch

from ligerzoo.kernels import _utils
from ligerzoo.kernels.jsd import jsd, jsd_reference
from tests.kernels.helpers import (
    assert_close_ulps,
    assert_compiled_matches_eager,
    force_reference,  # noqa: F401 (fixture)
    jsd_rows64,
    kernel_module,
    parametrize_dtype,
    small_blocks_fixture,
)

jsd_mod = kernel_module("jsd")

N, V = 13, 1000          # odd sizes; V spans 4 blocks of 256 (the last partial)
IGNORE = -100
BETAS = [0.0, 0.3, 0.5, 1.0]
ULPS = {torch.float32: 64, torch.bfloat16: 2, torch.float16: 4}


_small_blocks = small_blocks_fixture(jsd_mod, 256)


def make_inputs(dtype, shape=(N, V), scale=2.0, n_ignored=3, ignore_index=IGNORE):
    s = torch.log_softmax(torch.randn(shape) * scale, -1).to(dtype)
    t = torch.log_softmax(torch.randn(shape) * scale, -1).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignored]] = ignore_index
    return s, t, labels


def oracle(s, t, labels, beta, ignore_index=IGNORE, grad_out=1.0, row_chunk=None):
    """-> (loss, mean |row loss|, grad student, grad teacher), float64. Rows are independent, so
    ``row_chunk`` evaluates them a block at a time (GPU sizes) and divides by the count at the end."""
    v = s.shape[-1]
    s2, t2 = s.reshape(-1, v), t.reshape(-1, v)
    keep = (labels.reshape(-1) != ignore_index) if labels is not None else torch.ones(
        s2.shape[0], dtype=torch.bool, device=s.device)
    count = max(int(keep.sum()), 1)
    total, mag = 0.0, 0.0
    gs, gt = torch.empty_like(s2, dtype=torch.float64), torch.empty_like(t2, dtype=torch.float64)
    step = row_chunk or s2.shape[0]
    for a in range(0, s2.shape[0], step):
        x = s2[a:a + step].double().requires_grad_()
        y = t2[a:a + step].double().requires_grad_()
        rows = jsd_rows64(x, y, beta) * keep[a:a + step]
        (rows.sum() * grad_out / count).backward()
        total += float(rows.detach().sum())
        mag += float(rows.detach().abs().sum())
        gs[a:a + step], gt[a:a + step] = x.grad, y.grad
    loss = torch.tensor(total / count, dtype=torch.float64)
    return loss, mag / count, gs.view(s.shape), gt.view(t.shape)


def check(actual, expected, dtype, scale=None, ulps=None):
    """assert_close_ulps with this file's ULPS[dtype] budget unless ``ulps`` is given."""
    assert_close_ulps(actual, expected, dtype, ulps or ULPS[dtype], scale=scale)


def compare(fn, dtype, beta, use_labels=True, need_teacher=False, grad_out=1.0, n_ignored=3,
            ignore_index=IGNORE, inputs=None, **make_kw):
    s, t, labels = inputs or make_inputs(dtype, n_ignored=n_ignored, ignore_index=ignore_index, **make_kw)
    labels = labels if use_labels else None
    saved = [x.clone() for x in (s, t)]
    ss = s.clone().requires_grad_()
    ts = t.clone().requires_grad_(need_teacher)
    kw = {} if ignore_index == IGNORE else dict(ignore_index=ignore_index)
    loss = fn(ss, ts, labels, beta, **kw)
    (loss * grad_out).backward()
    ref, mag, gs, gt = oracle(s, t, labels, beta, ignore_index, grad_out)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    check(loss, ref, torch.float32, scale=mag)
    assert ss.grad.dtype == dtype and torch.isfinite(ss.grad).all()
    check(ss.grad, gs, dtype)
    if need_teacher:
        assert ts.grad.dtype == t.dtype and torch.isfinite(ts.grad).all()
        check(ts.grad, gt, t.dtype)
    else:
        assert ts.grad is None
    assert torch.equal(s, saved[0]) and torch.equal(t, saved[1])
    return loss.detach(), ss.grad, ts.grad


# ---------------------------------------------------------------- Triton (interpreter)
@pytest.mark.parametrize("use_labels", [True, False])
@pytest.mark.parametrize("beta", BETAS)
def test_triton_fp32(beta, use_labels):
    compare(jsd, torch.float32, beta, use_labels, need_teacher=True)


@pytest.mark.parametrize("beta", BETAS)
def test_triton_bf16(beta):
    compare(jsd, torch.bfloat16, beta)


def test_triton_fp16_and_mixed_dtypes():
    compare(jsd, torch.float16, 0.5)
    s, t, labels = make_inputs(torch.bfloat16)
    compare(jsd, torch.bfloat16, 0.3, need_teacher=True, inputs=(s, t.float(), labels))  # fp32 teacher


def test_odd_rows_and_single_block(monkeypatch):
    compare(jsd, torch.float32, 0.5, shape=(37, 1000))
    monkeypatch.setattr(jsd_mod, "MAX_BLOCK_SIZE", 4096)     # V=1000 in one masked block of 1024
    compare(jsd, torch.float32, 0.3, need_teacher=True)


def test_beta_end_points_are_the_two_kl_directions():
    s, t, _ = make_inputs(torch.float32)
    p, q = t.exp(), s.exp()
    fwd = (p * (t - s)).sum(-1).mean()          # KL(teacher || student)
    rev = (q * (s - t)).sum(-1).mean()          # KL(student || teacher)
    torch.testing.assert_close(jsd(s, t, beta=0.0), fwd)
    torch.testing.assert_close(jsd(s, t, beta=1.0), rev)
    m = 0.5 * (p + q)                            # the symmetric JSD at beta = 0.5
    sym = 0.5 * ((p * (t - m.log())).sum(-1) + (q * (s - m.log())).sum(-1)).mean()
    torch.testing.assert_close(jsd(s, t, beta=0.5), sym)


@pytest.mark.parametrize("fn", [jsd, jsd_reference], ids=["triton", "reference"])
def test_identical_and_tied_inputs(fn):
    """Student == teacher gives loss 0; bf16 inputs with many exactly equal entries (x == y,
    where the mixture formulas switch branch) get the right gradients."""
    s, t, labels = make_inputs(torch.bfloat16)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = fn(a, b, labels, 0.5)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-7                   # the float64 oracle is noise here
    assert float(a.grad.abs().max()) < 1e-7 and float(b.grad.abs().max()) < 1e-7
    t = torch.where(torch.rand(s.shape) < 0.5, s, t)          # half the entries tied
    for beta in (0.3, 1.0):
        compare(fn, torch.bfloat16, beta, need_teacher=True, inputs=(s, t, labels))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_all_ignored(beta):
    loss, gs, gt = compare(jsd, torch.float32, beta, need_teacher=True, n_ignored=N)
    assert float(loss) == 0.0 and float(gs.abs().sum()) == 0.0 and float(gt.abs().sum()) == 0.0


def test_custom_ignore_index():
    compare(jsd, torch.float32, 0.5, ignore_index=7, n_ignored=5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_extreme_logits(beta):
    # log-probs down to ~ -1e4: most probabilities underflow, log m must stay finite
    compare(jsd, torch.float32, beta, need_teacher=True, scale=3e3)


def test_extreme_logits_bf16():
    compare(jsd, torch.bfloat16, 0.3, scale=3e3)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # -inf - -inf in unselected lanes
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("path", ["triton", "reference"])
def test_masked_vocab_minus_inf(monkeypatch, path, beta):
    """-inf log-probs (classes masked in both models) contribute 0: the loss equals the JSD over
    the other classes, their gradients are 0, nothing is NaN."""
    if path == "reference":
        monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    s, t, labels = make_inputs(torch.float32)
    cut = torch.zeros(V, dtype=torch.bool)
    cut[::5] = True
    sub = lambda z: torch.log_softmax(z[:, ~cut], -1)  # noqa: E731
    s_sub, t_sub = sub(s), sub(t)
    s_m = torch.full_like(s, float("-inf"))
    t_m = torch.full_like(t, float("-inf"))
    s_m[:, ~cut], t_m[:, ~cut] = s_sub, t_sub
    ss, ts = s_m.clone().requires_grad_(), t_m.clone().requires_grad_()
    loss = jsd(ss, ts, labels, beta)
    loss.backward()
    ref, mag, gs, gt = oracle(s_sub, t_sub, labels, beta)
    check(loss, ref, torch.float32, scale=mag)
    check(ss.grad[:, ~cut], gs, torch.float32)
    check(ts.grad[:, ~cut], gt, torch.float32)
    assert float(ss.grad[:, cut].abs().sum()) == 0.0 and float(ts.grad[:, cut].abs().sum()) == 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # -inf - -inf in unselected lanes
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("path", ["triton", "reference", "reference64"])
def test_kl_of_a_missing_class_is_inf(monkeypatch, path, beta):
    """beta 0 (KL(teacher || student)) with a student log-prob of -inf where the teacher has
    mass, and beta 1 mirrored: the loss is inf on every path, and the gradient of the
    zero-probability side there is -p of the other (d/dx of p (y - x)), never 0 or NaN; the
    finite rows' gradients are the oracle's. (The reference path used to clamp -inf to -1e30:
    a finite 3e29 loss and a zero gradient.) With that row ignored, it gets zero gradients."""
    if path != "triton":
        monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    dt = torch.float64 if path == "reference64" else torch.float32
    s, t, _ = make_inputs(dt, n_ignored=0)
    zero, other = (s, t) if beta == 0.0 else (t, s)   # the side given a zero probability, the other
    zero[0, 7] = float("-inf")
    zero[0] = torch.log_softmax(zero[0], -1)           # still a distribution
    ss, ts = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = jsd(ss, ts, None, beta)
    loss.backward()
    assert float(loss) == float("inf")
    g_zero = (ss if beta == 0.0 else ts).grad
    torch.testing.assert_close(g_zero[0, 7], -other[0, 7].exp() / N)
    _, _, gs, gt = oracle(s[1:], t[1:], None, beta)
    torch.testing.assert_close(ss.grad[1:].double(), gs * (N - 1) / N, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ts.grad[1:].double(), gt * (N - 1) / N, rtol=1e-5, atol=1e-9)
    # the same row ignored: it adds nothing and gets zero gradients (not 0 * inf = NaN), and
    # the others are the oracle's
    labels = torch.arange(N) % V
    labels[0] = IGNORE
    ss, ts = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = jsd(ss, ts, labels, beta)
    loss.backward()
    ref, _, gs, gt = oracle(s[1:], t[1:], labels[1:], beta)      # the same count of rows
    assert torch.isfinite(loss.detach()) and torch.isfinite(ss.grad).all() and torch.isfinite(ts.grad).all()
    assert float(ss.grad[0].abs().sum()) == 0.0 and float(ts.grad[0].abs().sum()) == 0.0
    torch.testing.assert_close(loss.detach().double(), ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(ss.grad[1:].double(), gs, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ts.grad[1:].double(), gt, rtol=1e-5, atol=1e-9)


def test_grad_output_scaling_and_second_backward():
    compare(jsd, torch.float32, 0.3, need_teacher=True, grad_out=0.7)
    s, t, labels = make_inputs(torch.float32)
    ss = s.clone().requires_grad_()
    loss = jsd(ss, t, labels) * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):       # the saved gradient was consumed in place: never silent
        loss.backward()


def test_3d_and_non_contiguous():
    s, t, labels = make_inputs(torch.float32, shape=(2, 7, V))
    ref, mag, gs, gt = oracle(s, t, labels, 0.3)
    st = s.transpose(1, 2).contiguous().requires_grad_()      # (B, V, T) storage, (B, T, V) view
    tt = t.transpose(1, 2).contiguous().requires_grad_()
    loss = jsd(st.transpose(1, 2), tt.transpose(1, 2), labels, 0.3)
    loss.backward()
    check(loss, ref, torch.float32, scale=mag)
    check(st.grad.transpose(1, 2), gs, torch.float32)
    check(tt.grad.transpose(1, 2), gt, torch.float32)


def test_no_grad_and_frozen_inputs():
    s, t, labels = make_inputs(torch.float32)
    ref, mag, _, _ = oracle(s, t, labels, 0.5)
    with torch.no_grad():
        loss = jsd(s.clone().requires_grad_(), t, labels)
    assert not loss.requires_grad
    check(loss, ref, torch.float32, scale=mag)
    loss = jsd(s, t, labels)
    assert not loss.requires_grad
    check(loss, ref, torch.float32, scale=mag)


def test_bad_arguments_raise():
    s, t, labels = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        jsd(s, t[:, :-1])
    with pytest.raises(ValueError, match="beta"):
        jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        jsd(s, t, labels[:-1])
    with pytest.raises(ValueError, match="integer"):
        jsd(s, t, labels.float())
    with pytest.raises(ValueError, match="float"):
        jsd(s, t.long())
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        jsd(s[0], t[0])
    for bad in (0.5, "x", True):  # 0.5 used to run as ignore_index=0
        with pytest.raises(ValueError, match="ignore_index must be an integer"):
            jsd(s, t, labels, ignore_index=bad)
    with pytest.raises(ValueError, match="beta must be a real number"):
        jsd(s, t, beta="0.5")


def test_torch_compile_fullgraph():
    s, t, labels = make_inputs(torch.float32)

    def f(a, b):
        return jsd(a, b, labels, beta=0.3) * 2.0

    assert_compiled_matches_eager(f, (s, t), backend="aot_eager")


# ----------------------------------------------------------------------- reference path
@pytest.mark.parametrize("beta", BETAS)
@parametrize_dtype
def test_reference_function(dtype, beta):
    compare(jsd_reference, dtype, beta, need_teacher=True)
    compare(jsd_reference, dtype, beta, use_labels=False)


@pytest.mark.parametrize("beta", BETAS)
def test_public_function_reference_dispatch(force_reference, beta):
    compare(jsd, torch.float32, beta, need_teacher=True)


def test_reference_dispatch_all_ignored_and_extreme(force_reference):
    loss, gs, gt = compare(jsd, torch.float32, 0.5, need_teacher=True, n_ignored=N)
    assert float(loss) == 0.0 and float(gs.abs().sum()) == 0.0 and float(gt.abs().sum()) == 0.0
    compare(jsd, torch.bfloat16, 0.3, scale=3e3)


def test_pointwise_twin_matches_kernel():
    """The explicit torch formulas (used by fused_linear_jsd without Triton) equal the oracle."""
    s, t, _ = make_inputs(torch.float64)
    for beta in BETAS:
        loss, gx, gy = jsd_mod.jsd_pointwise_torch(s, t, beta)
        x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
        rows = jsd_rows64(x, y, beta)
        rows.sum().backward()
        torch.testing.assert_close(loss.sum(-1), rows.detach())
        torch.testing.assert_close(gx, x.grad)
        torch.testing.assert_close(gy, y.grad)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@parametrize_dtype
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gpu_real_size(dtype, beta):
    n, v = 8192, 128256
    s = torch.log_softmax(torch.randn(n, v, device="cuda") * 2, -1).to(dtype)
    t = torch.log_softmax(torch.randn(n, v, device="cuda") * 2, -1).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::7] = IGNORE
    saved = (s.clone(), t.clone())
    ss = s.clone().requires_grad_()
    loss = jsd(ss, t, labels, beta)
    loss.backward()
    ref, mag, gs, _ = oracle(s, t, labels, beta, row_chunk=1024)
    check(loss, ref, torch.float32, scale=mag)
    check(ss.grad, gs, dtype)
    assert torch.equal(saved[0], s) and torch.equal(saved[1], t)


@pytest.mark.gpu
@gpu
def test_gpu_compile_matches_eager():
    n, v = 4096, 128256
    s = torch.log_softmax(torch.randn(n, v, device="cuda") * 2, -1).bfloat16()
    t = torch.log_softmax(torch.randn(n, v, device="cuda") * 2, -1).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::3] = IGNORE

    def f(a, b):
        return jsd(a, b, labels, beta=0.3) * 0.5

    assert_compiled_matches_eager(f, (s, t))


def test_empty_last_dim():
    """Rows of zero classes: every row's divergence is 0 (an empty sum), gradients empty."""
    s = torch.zeros(3, 0, requires_grad=True)
    t = torch.zeros(3, 0, requires_grad=True)
    loss = jsd(s, t)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.shape == s.shape and t.grad.shape == t.shape


def test_jsd_reference_takes_an_empty_last_dim():
    for dtype in (torch.float64, torch.float32):
        assert jsd_reference(torch.zeros(3, 0, dtype=dtype), torch.zeros(3, 0, dtype=dtype)).item() == 0.0
