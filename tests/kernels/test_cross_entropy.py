"""cross_entropy: loss and gradient against float64 torch, Triton (interpreter) and reference paths."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from ligerzoo.kernels import _utils
from ligerzoo.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from tests.kernels.helpers import (
    assert_close_rel,
    force_reference,  # noqa: F401 (fixture)
    kernel_module,
    parametrize_dtype,
    small_blocks_fixture,
)

ce_mod = kernel_module("cross_entropy")  # the module, not the function

N, V = 13, 1000          # odd sizes; V spans 4 blocks (the last partial) with the small block
IGNORE = -100

OPTIONS = {
    "plain": dict(),
    "smooth": dict(label_smoothing=0.1),
    "zloss": dict(lse_square_scale=1e-2),
    "softcap": dict(softcap=3.0),
    "weight": dict(weight="w"),
    "all": dict(weight="w", label_smoothing=0.2, lse_square_scale=1e-2, softcap=5.0),
}


# Tests of behaviour that only the Triton path has (in-place gradient, in-place rescaling,
# the kernel itself); the whole file also passes with TRITON_INTERPRET=0 (reference path).
triton_only = pytest.mark.skipif(not _utils.use_triton(torch.empty(0)), reason="needs the Triton path: CUDA, or TRITON_INTERPRET=1 on the CPU (the test conftest sets it)")


_small_blocks = small_blocks_fixture(ce_mod, 256)


def make_inputs(dtype, n=N, v=V, scale=3.0, n_ignored=3, ignore_index=IGNORE):
    logits = (torch.randn(n, v) * scale).to(dtype)
    target = torch.randint(0, v, (n,))
    target[torch.randperm(n)[:n_ignored]] = ignore_index
    weight = torch.rand(v) + 0.5
    return logits, target, weight


def resolve(opts, weight):
    return {k: (weight if val == "w" else val) for k, val in opts.items()}


def oracle(logits, target, weight=None, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0,
           lse_square_scale=0.0, softcap=None, grad_out=None):
    """float64 torch: F.cross_entropy on the soft-capped logits plus the z-loss. -> (loss, z, dlogits)."""
    x = logits.detach().to(torch.float64).requires_grad_()
    z = softcap * torch.tanh(x / softcap) if softcap is not None else x
    w = weight.to(torch.float64) if weight is not None else None
    mask = target != ignore_index
    if reduction == "mean" and not bool(mask.any()):
        loss_ce = (z * 0).sum()  # torch gives nan here; the contract is 0
    else:
        loss_ce = F.cross_entropy(z, target, w, ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing)
    z_rows = lse_square_scale * torch.logsumexp(z, -1) ** 2 * mask
    if reduction == "none":
        z_loss = z_rows
    elif reduction == "sum":
        z_loss = z_rows.sum()
    else:
        z_loss = z_rows.sum() / mask.sum().clamp(min=1)
    loss = loss_ce + z_loss
    (loss * grad_out).sum().backward()
    return loss.detach(), z_loss.detach(), x.grad


def grad_output_for(reduction, n):
    if reduction == "none":
        return torch.randn(n, dtype=torch.float64)  # a random per-token weighting of the loss
    return torch.tensor(1.0 if reduction == "mean" else 0.7, dtype=torch.float64)  # 1.0 skips the multiply


def run(fn, logits, target, grad_out, **kw):
    x = logits.clone().requires_grad_()
    loss, z_loss = fn(x, target, return_z_loss=True, **kw)
    loss.backward(grad_out.to(loss.dtype) if loss.dim() else grad_out.to(loss.dtype).reshape(()))
    return loss.detach(), z_loss, x.grad


def tols(dtype):
    # loss: fp32 math on the exact input values -> fp32-level error even for bf16 inputs.
    # gradient: stored in the logits dtype -> a few ulps of that dtype (bf16: 2^-8 relative).
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-5, 8e-3)


def compare(fn, dtype, reduction, opts, n_ignored=3, **make_kw):
    logits, target, weight = make_inputs(dtype, n_ignored=n_ignored, **make_kw)
    kw = resolve(opts, weight)
    go = grad_output_for(reduction, logits.shape[0])
    saved = (logits.clone(), target.clone(), weight.clone())
    loss, z_loss, grad = run(fn, logits, target, go, reduction=reduction, **kw)
    ref_loss, ref_z, ref_grad = oracle(logits, target, reduction=reduction, grad_out=go, **kw)
    loss_tol, grad_tol = tols(dtype)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close_rel(loss, ref_loss, loss_tol)
    assert_close_rel(z_loss, ref_z, loss_tol, scale=float(ref_loss.abs().max()))
    assert_close_rel(grad, ref_grad, grad_tol)
    assert not z_loss.requires_grad
    # inputs unchanged after forward + backward
    for before, after in zip(saved, (logits, target, weight)):
        assert torch.equal(before, after)
    return loss, grad


# ---------------------------------------------------------------- Triton (interpreter)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_triton_fp32(reduction, opt):
    compare(cross_entropy, torch.float32, reduction, OPTIONS[opt])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_triton_bf16(reduction, opt):
    compare(cross_entropy, torch.bfloat16, reduction, OPTIONS[opt])


def test_triton_single_block(monkeypatch):
    monkeypatch.setattr(ce_mod, "MAX_BLOCK_SIZE", 16384)  # V=1000 in one masked block of 1024
    compare(cross_entropy, torch.float32, "mean", OPTIONS["all"])


def test_triton_fp16():
    compare(cross_entropy, torch.float16, "sum", OPTIONS["plain"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_all_ignored(reduction, opt):
    loss, grad = compare(cross_entropy, torch.float32, reduction, OPTIONS[opt], n_ignored=N)
    assert float(loss.abs().sum()) == 0.0
    assert float(grad.abs().sum()) == 0.0


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", ["triton", "reference"])
def test_no_classes_every_row_ignored(monkeypatch, path, reduction):
    """V = 0 with every label ignored: loss 0, an empty gradient, on both paths and through the
    fused linear loss (a (0, H) head); its x gets a zero gradient. The reference path used to
    fail in gather / scatter on the empty class dim."""
    from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    if path == "reference":
        monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    target = torch.full((4,), IGNORE)
    opts = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=0.1)
    for class_weight in (None, torch.zeros(0)):                 # a (0,) class weight too
        z = torch.randn(4, 0, requires_grad=True)
        loss = cross_entropy(z, target, weight=class_weight, **opts)
        loss.sum().backward()
        assert torch.equal(loss.detach(), torch.zeros_like(loss)) and z.grad.shape == (4, 0)
        x, w = torch.randn(4, 8, requires_grad=True), torch.randn(0, 8, requires_grad=True)
        loss = fused_linear_cross_entropy(x, w, target, ce_weight=class_weight, **opts)
        loss.sum().backward()
        assert torch.equal(loss.detach(), torch.zeros_like(loss))
        assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == (0, 8)


def confident_rows(n=16, v=100):
    """fp32 logits whose rows are confident at |z| ~ 1000: the target 10 above every other
    class, so -log p_t = log(1 + 99 e^-10) ~ 4.5e-3, while ulp(1000) = 6.1e-5."""
    z_t = 1000.0 + 0.37 * torch.arange(n, dtype=torch.float64)
    logits = (z_t[:, None] - 10.0).expand(n, v).clone()
    target = torch.arange(n) % v
    logits[torch.arange(n), target] = z_t
    return logits.float(), target


@pytest.mark.parametrize("path", ["triton", "reference", "fused_linear"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_confident_rows_keep_their_loss(monkeypatch, path, smoothing):
    """Each row's loss and gradient at |z| ~ 1000 within 1e-4 (relative) of float64: the
    kernels take log p = (z - m) - log(d) as torch's log_softmax does. Subtracting an lse
    rounded to fp32 first (until session 26) was off by up to ulp(1000) / 2 = 3e-5 in a loss
    of 4.5e-3 (0.7%), and at |z| ~ 40 it turned such losses into exactly 0. The fused linear
    loss runs on x = logits and an identity head (exact products)."""
    from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    if path == "reference":
        monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    logits, target = confident_rows()
    z = logits.clone().requires_grad_()
    opts = dict(reduction="none", label_smoothing=smoothing)
    if path == "fused_linear":
        head = torch.eye(logits.shape[1])
        loss = fused_linear_cross_entropy(z, head, target, **opts)
    else:
        loss = cross_entropy(z, target, **opts)
    go = torch.linspace(0.5, 1.5, logits.shape[0])
    loss.backward(go)
    z64 = logits.double().requires_grad_()
    ref = F.cross_entropy(z64, target, reduction="none", label_smoothing=smoothing)
    ref.backward(go.double())
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-4, atol=0.0)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6 * float(z64.grad.abs().max()))


@parametrize_dtype
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_extreme_logits(dtype, opt):
    opts = dict(OPTIONS[opt])
    if "lse_square_scale" in opts:
        opts["lse_square_scale"] = 1e-6
    if "softcap" in opts:
        opts["softcap"] = 3e4
    compare(cross_entropy, dtype, "mean", opts, scale=1e4)  # |x| up to ~4e4


def test_ignore_index_custom():
    logits, target, _ = make_inputs(torch.float32, ignore_index=7)
    go = torch.tensor(1.0, dtype=torch.float64)
    loss, _, grad = run(cross_entropy, logits, target, go, ignore_index=7)
    ref_loss, _, ref_grad = oracle(logits, target, ignore_index=7, grad_out=go)
    assert_close_rel(loss, ref_loss, 1e-5)
    assert_close_rel(grad, ref_grad, 1e-5)


@pytest.mark.parametrize("bad", [V, V + 5, -1, -101])
def test_target_out_of_range_raises(bad):
    logits, target, _ = make_inputs(torch.float32)
    target[4] = bad
    with pytest.raises(ValueError, match=rf"{bad}.*V={V}"):
        cross_entropy(logits, target)


STATS_N = 2 * ce_mod._STATS_BLOCK + 37  # three steps of the one-program target kernels, the last partial


def _stats_path(path, monkeypatch):
    """kernel: the one-program kernels (interpreter); over_max: torch ops for more targets
    than the kernels take; reference: no Triton at all."""
    if path == "reference":
        monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    if path == "over_max":
        monkeypatch.setattr(ce_mod, "_STATS_MAX_ROWS", STATS_N - 1)


@pytest.mark.parametrize("path", ["kernel", "over_max", "reference"])
@pytest.mark.parametrize("where, value", [("first", V + 3), ("last_block", -7), ("boundary", V)])
def test_target_check_names_the_first_bad_value(path, where, value, monkeypatch):
    """TargetCheck (the kernel under the interpreter, torch ops otherwise) reports the
    value of the first out-of-range row, wherever it lies, and not a later one."""
    _stats_path(path, monkeypatch)
    target = torch.randint(0, V, (STATS_N,))
    target[::9] = IGNORE
    row = {"first": 5, "last_block": STATS_N - 2, "boundary": 2 * ce_mod._STATS_BLOCK}[where]
    target[row] = value
    if where != "last_block":
        target[STATS_N - 1] = -5  # a later bad row must not be the one reported
    with pytest.raises(ValueError, match=rf"target value {value} is out of range .*V={V}"):
        ce_mod.TargetCheck(target, V, IGNORE).wait()  # off CUDA it raises at construction


@pytest.mark.parametrize("path", ["kernel", "over_max", "reference"])
@pytest.mark.parametrize("ignore_index", [IGNORE, V, 0])
def test_target_check_accepts_valid_and_ignored_targets(path, ignore_index, monkeypatch):
    """0 and V - 1 are valid, and ignore_index rows pass even when the value is outside [0, V)."""
    _stats_path(path, monkeypatch)
    target = torch.randint(0, V, (STATS_N,))
    target[::4] = ignore_index
    target[1], target[2] = 0, V - 1
    ce_mod.TargetCheck(target, V, ignore_index).wait()
    ce_mod.check_target(target, V, ignore_index)
    target[3] = V + 1 if ignore_index == V else V
    with pytest.raises(ValueError, match="out of range"):
        ce_mod.check_target(target, V, ignore_index)


def compile_target_kernels() -> None:
    """Compile the one-program target kernels for sm_90 with every int argument 1 (which
    Triton turns into a constant: N, V or ignore_index of 1); print "ok" (run in a child
    without the interpreter, which cannot compile)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {
        ce_mod._reduction_scales_kernel.fn: dict(TARGET="*i64", CLASS_W="*fp32", OUT="*fp32"),
        ce_mod._first_bad_target_kernel.fn: dict(TARGET="*i64", OUT="*i64"),
    }
    for fn, ptrs in kernels.items():
        for has_weight, is_mean in ((False, True), (True, True), (True, False)):
            consts = dict(n_rows=1, n_cols=1, ignore_index=1, HAS_WEIGHT=has_weight, IS_MEAN=is_mean,
                          BLOCK_SIZE=ce_mod._STATS_BLOCK)
            sig = {name: ptrs.get(name, "constexpr") for name in fn.arg_names}
            constexprs = {(i,): consts[name] for i, name in enumerate(fn.arg_names) if name not in ptrs}
            triton.compile(ASTSource(fn, sig, constexprs, {}), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=ce_mod._STATS_WARPS))
    print("ok")


@pytest.mark.skipif(not _utils.HAS_TRITON, reason="needs Triton")
def test_target_kernels_compile_with_constant_ints():
    """The interpreter passes ints as values; a GPU compile makes an int of 1 a constant, on
    which tensor methods fail: compile for sm_90 (no GPU needed) in a child process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    code = "from tests.kernels.test_cross_entropy import compile_target_kernels; compile_target_kernels()"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["plain", "weight", "all_ignored", "out_of_range_weighted", "empty"])
@pytest.mark.parametrize("path", ["kernel", "over_max", "reference"])
def test_reduction_scales_against_float64(reduction, case, path, monkeypatch):
    """[ce factor, z-loss factor, sum of class weights] from the one-program kernel and from
    the torch ops, against float64: 1 / sum of the kept rows' class weights and
    1 / kept-row count for "mean" (0 when nothing is kept), 1 otherwise."""
    _stats_path(path, monkeypatch)
    n = 0 if case == "empty" else STATS_N
    target = torch.randint(0, V, (n,))
    target[::5] = IGNORE
    weight = None if case in ("plain", "empty") else torch.rand(V) * 2 + 0.25
    if case == "all_ignored":
        target.fill_(IGNORE)
    if case == "out_of_range_weighted":  # refused by the check; the factors read clamped weights
        target[3], target[8] = V + 4, -7
    got = ce_mod.reduction_scales(target, weight, IGNORE, reduction, V)
    assert got.dtype == torch.float32 and got.shape == (3,)
    keep = target != IGNORE
    w = weight.double() if weight is not None else torch.ones(V, dtype=torch.float64)
    w_kept = w[target.clamp(0, V - 1)][keep].sum().item()
    count = int(keep.sum())
    if reduction == "mean":
        expected = [1 / w_kept if w_kept else 0.0, 1 / count if count else 0.0, w.sum().item()]
    else:
        expected = [1.0, 1.0, w.sum().item()]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-6, atol=0)


def test_target_out_of_range_raises_reference_path(force_reference):
    logits, target, _ = make_inputs(torch.float32)
    target[2] = V
    with pytest.raises(ValueError, match=rf"{V}.*V={V}"):
        cross_entropy(logits, target)


def test_bad_arguments_raise():
    logits, target, weight = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        cross_entropy(logits[None], target)
    with pytest.raises(ValueError, match="target must have shape"):
        cross_entropy(logits, target[:-1])
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match="class weight"):
        cross_entropy(logits, target, weight=weight[:-1])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, target, softcap=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=1.5)
    for scale in (-1.0, float("nan")):  # nan used to pass and give a nan loss
        with pytest.raises(ValueError, match="lse_square_scale must be >= 0"):
            cross_entropy(logits, target, lse_square_scale=scale)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=float("nan"))
    for cap in (float("inf"), 1e308):                                          # used to give a nan loss
        with pytest.raises(ValueError, match="softcap must be a finite number"):
            cross_entropy(logits, target, softcap=cap)
    for bad in (1.5, True, torch.tensor([-100, 0]), 2**70):                    # 1.5 used to pass silently
        with pytest.raises(ValueError, match="ignore_index must be an integer"):
            cross_entropy(logits, target, ignore_index=bad)
    for name in ("label_smoothing", "lse_square_scale", "softcap"):  # "0.1" and True used to pass
        for bad in ("0.1", True, torch.tensor([0.1])):
            with pytest.raises(ValueError, match=f"{name} must be a real number"):
                cross_entropy(logits, target, **{name: bad})


def test_ignore_index_as_a_0d_tensor():
    """A 0-dim integer tensor is a valid ignore_index (it used to fail inside the kernel launch)."""
    logits, target, _ = make_inputs(torch.float32, n_ignored=0)
    target[::3] = 7
    want = F.cross_entropy(logits.double(), target, ignore_index=7)
    torch.testing.assert_close(cross_entropy(logits, target, ignore_index=torch.tensor(7)).double(), want,
                               atol=1e-5, rtol=1e-5)


@triton_only
def test_inplace_guard_writes_nothing_on_a_bad_target():
    """The in-place op's ``guard`` (the label check's answer on the device: the first bad row,
    or N) makes the kernel write nothing when it names a row, so the logits stay intact
    without the host waiting for the check before the launch; with N it writes the gradient
    (float64 oracle)."""
    from ligerzoo.kernels._utils import ops

    n, v = 5, 37
    logits, target = torch.randn(n, v), torch.randint(0, v, (n,))
    _, _, ref_grad = oracle(logits, target, grad_out=torch.tensor(1.0, dtype=torch.float64))
    for first, writes in ((0, False), (3, False), (n, True)):
        x = logits.clone()
        ops.cross_entropy_inplace(x, target, None, IGNORE, "mean", 0.0, 0.0, None, torch.tensor([first]))
        if writes:
            assert_close_rel(x, ref_grad, 1e-5)
        else:
            assert torch.equal(x, logits)


@triton_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_writes_gradient_over_logits(reduction):
    logits, target, weight = make_inputs(torch.float32)
    opts = resolve(OPTIONS["all"], weight)
    go = grad_output_for(reduction, N)
    ref_loss, _, ref_grad = oracle(logits, target, reduction=reduction, grad_out=go, **opts)
    base = logits.clone().requires_grad_()
    x = base * 1.0                                   # a non-leaf buffer the caller gives up
    loss = cross_entropy(x, target, reduction=reduction, inplace=True, **opts)
    assert_close_rel(loss.detach(), ref_loss, 1e-5)
    loss.backward(go.float() if reduction == "none" else go.float().reshape(()))
    assert_close_rel(base.grad, ref_grad, 1e-5)
    assert_close_rel(x.detach(), ref_grad, 1e-5)                # the buffer now holds the gradient
    # a leaf (or a view of one) is left alone: its memory would become its own .grad, which
    # its next use would overwrite (two accumulated steps then gave 2 g1 instead of g0 + g1)
    for view in (False, True):
        leaf = logits.clone().requires_grad_()
        x = leaf.view(logits.shape) if view else leaf
        loss = cross_entropy(x, target, reduction=reduction, inplace=True, **opts)
        loss.backward(go.float() if reduction == "none" else go.float().reshape(()))
        assert_close_rel(leaf.grad, ref_grad, 1e-5)
        assert torch.equal(leaf.detach(), logits) and leaf.grad.data_ptr() != leaf.data_ptr()
    leaf = torch.empty_like(logits).requires_grad_()   # one buffer refilled for two micro-batches
    grads = []
    for step in range(2):
        with torch.no_grad():
            leaf.copy_(logits * (1 + step))
        cross_entropy(leaf, target, reduction=reduction, inplace=True, **opts).backward(
            go.float() if reduction == "none" else go.float().reshape(()))
        grads.append(oracle(logits * (1 + step), target, reduction=reduction, grad_out=go, **opts)[2])
    assert_close_rel(leaf.grad, grads[0] + grads[1], 1e-5)


@pytest.mark.parametrize("layout", ["expanded", "overlapping_rows"])
def test_inplace_with_overlapping_logits_uses_a_fresh_buffer(layout):
    """Logits whose rows share memory (stride 0, or rows closer than V apart) must not be
    overwritten: later rows still read what the first row's gradient would replace.
    inplace=True then gives torch's loss and gradient and leaves the logits unchanged."""
    logits, target, _ = make_inputs(torch.float32, n=4, v=300, n_ignored=1)
    storage = logits.reshape(-1)[:600].clone()
    view = {"expanded": lambda b: b[:300].expand(4, 300),
            "overlapping_rows": lambda b: b.as_strided((4, 300), (100, 1))}[layout]
    ref_storage = storage.double().requires_grad_()
    ref = F.cross_entropy(view(ref_storage), target, ignore_index=IGNORE)
    ref.backward()
    base = storage.clone().requires_grad_()
    buf = base * 1.0                                 # a non-leaf buffer the caller gives up
    loss = cross_entropy(view(buf), target, inplace=True)
    loss.backward()
    assert_close_rel(loss.detach(), ref.detach(), 1e-5)
    assert_close_rel(base.grad, ref_storage.grad, 1e-5)
    assert torch.equal(buf.detach(), storage)        # not written


@triton_only
def test_inplace_detects_upstream_saved_tensor():
    """Overwriting logits that another op saved for its backward is an error, never silent."""
    logits, target, _ = make_inputs(torch.float32)
    base = logits.clone().requires_grad_()
    x = torch.exp(base / 10)                         # exp saves its output
    loss = cross_entropy(x, target, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_not_inplace_keeps_upstream_saved_tensor():
    logits, target, _ = make_inputs(torch.float32)
    base = logits.clone().requires_grad_()
    loss = cross_entropy(torch.exp(base / 10), target)
    loss.backward()
    base64 = logits.double().requires_grad_()
    ref = F.cross_entropy(torch.exp(base64 / 10), target)
    ref.backward()
    assert_close_rel(base.grad, base64.grad, 1e-5)


@triton_only
def test_second_backward_is_not_silently_wrong():
    logits, target, _ = make_inputs(torch.float32)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target) * 0.5
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


@pytest.mark.parametrize("layout", ["row_stride", "transposed"])
def test_non_contiguous(layout):
    logits, target, _ = make_inputs(torch.float32)
    go = torch.tensor(1.0, dtype=torch.float64)
    ref_loss, _, ref_grad = oracle(logits, target, grad_out=go, label_smoothing=0.1)
    if layout == "row_stride":
        wide = torch.zeros(N, V + 7)
        wide[:, 3:V + 3] = logits
        src = wide.requires_grad_()
        x = src[:, 3:V + 3]
    else:
        src = logits.t().contiguous().requires_grad_()
        x = src.t()
    assert not x.is_contiguous()
    loss = cross_entropy(x, target, label_smoothing=0.1)
    loss.backward()
    assert_close_rel(loss.detach(), ref_loss, 1e-5)
    g = src.grad[:, 3:V + 3] if layout == "row_stride" else src.grad.t()
    assert_close_rel(g, ref_grad, 1e-5)


def test_no_grad_and_frozen_logits():
    logits, target, weight = make_inputs(torch.float32)
    opts = resolve(OPTIONS["all"], weight)
    ref_loss, ref_z, _ = oracle(logits, target, grad_out=torch.tensor(1.0, dtype=torch.float64), **opts)
    with torch.no_grad():
        loss, z = cross_entropy(logits.clone().requires_grad_(), target, return_z_loss=True, **opts)
    assert_close_rel(loss, ref_loss, 1e-5)
    assert_close_rel(z, ref_z, 1e-5, scale=float(ref_loss))
    loss = cross_entropy(logits, target, **opts)      # logits does not require grad
    assert not loss.requires_grad
    assert_close_rel(loss, ref_loss, 1e-5)


def test_return_z_loss_off_returns_tensor():
    logits, target, _ = make_inputs(torch.float32)
    out = cross_entropy(logits, target, lse_square_scale=1e-3)
    assert isinstance(out, torch.Tensor) and out.dim() == 0


def test_torch_compile_fullgraph():
    logits, target, weight = make_inputs(torch.float32)
    opts = resolve(OPTIONS["all"], weight)

    def f(x, t):
        return cross_entropy(x, t, reduction="none", **opts)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    go = torch.randn(N)
    x1 = logits.clone().requires_grad_()
    out = compiled(x1, target)
    out.backward(go)
    x2 = logits.clone().requires_grad_()
    ref = f(x2, target)
    ref.backward(go)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)


# ----------------------------------------------------------------------- reference path
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
@parametrize_dtype
def test_reference_function(reduction, opt, dtype):
    compare(cross_entropy_reference, dtype, reduction, OPTIONS[opt])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_public_function_reference_dispatch(force_reference, reduction, opt):
    compare(cross_entropy, torch.float32, reduction, OPTIONS[opt])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_dispatch_all_ignored_and_extreme(force_reference, reduction):
    loss, grad = compare(cross_entropy, torch.float32, reduction, OPTIONS["all"], n_ignored=N)
    assert float(loss.abs().sum()) == 0.0 and float(grad.abs().sum()) == 0.0
    compare(cross_entropy, torch.bfloat16, reduction, dict(label_smoothing=0.1), scale=1e4)


@triton_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_rows_twin_matches_kernel(reduction):
    """The plain-torch row engine (used by FLCE without Triton) equals the Triton kernel."""
    logits, target, weight = make_inputs(torch.float32)
    row_scale = torch.randn(N)
    outs = []
    for fn in (ce_mod.launch_cross_entropy_rows, ce_mod.torch_cross_entropy_rows):
        scales = ce_mod.reduction_scales(target, weight, IGNORE, reduction, V)
        lse, loss_rows, z_rows = torch.empty(N), torch.empty(N), torch.empty(N)
        grad = torch.empty(N, V)
        fn(logits, target, weight, scales, lse, loss_rows, z_rows, grad,
           row_scale if reduction == "none" else None, IGNORE, 0.1, 1e-2, 4.0)
        grad2 = torch.empty(N, V)  # the gradient alone (no loss), as the fused loss's "none" backward runs it
        fn(logits, target, weight, scales, torch.empty(N), None, None, grad2,
           row_scale if reduction == "none" else None, IGNORE, 0.1, 1e-2, 4.0)
        torch.testing.assert_close(grad2, grad, rtol=0.0, atol=0.0)
        outs.append((lse, loss_rows, z_rows, grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@parametrize_dtype
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_gpu_real_size(dtype, reduction, opt):
    n, v = 8192, 128256
    logits = (torch.randn(n, v, device="cuda") * 3).to(dtype)
    target = torch.randint(0, v, (n,), device="cuda")
    target[::7] = IGNORE
    weight = torch.rand(v, device="cuda") + 0.5
    opts = resolve(OPTIONS[opt], weight)
    go = grad_output_for(reduction, n).cuda()
    saved = logits.clone()
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, reduction=reduction, **opts)
    loss.backward(go.float() if reduction == "none" else go.float().reshape(()))
    ref_loss, _, ref_grad = oracle(logits, target, reduction=reduction, grad_out=go, **opts)
    loss_tol, grad_tol = tols(dtype)
    assert_close_rel(loss.detach(), ref_loss, loss_tol)
    assert_close_rel(x.grad, ref_grad, grad_tol)
    assert torch.equal(saved, logits)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("grad", [True, False])  # the Hopper kernel (with a gradient) and the portable one
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_leading_minus_inf_logits(grad, dtype):
    """A vocabulary of 128256 masked to its last 28256 tokens (-inf before them), and one row
    keeping a single token: torch's loss and gradient, never NaN."""
    n, v = 256, 128256
    logits = (torch.randn(n, v, device="cuda") * 3).to(dtype)
    logits[:, :100000] = float("-inf")
    logits[7, :-1] = float("-inf")
    target = torch.randint(100000, v, (n,), device="cuda")
    target[7] = v - 1
    target[9] = IGNORE
    x = logits.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        loss = cross_entropy(x, target)
    want, _, gx = oracle(logits, target, grad_out=torch.tensor(1.0, dtype=torch.float64, device="cuda"))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    if grad:
        loss.backward()
        assert torch.isfinite(x.grad).all()
        assert_close_rel(x.grad, gx, tols(dtype)[1])


@pytest.mark.gpu
@gpu
def test_gpu_inplace_and_compile():
    n, v = 4096, 128256
    logits = (torch.randn(n, v, device="cuda") * 3).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), device="cuda")
    go = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    ref_loss, _, ref_grad = oracle(logits, target, grad_out=go)
    x = logits.clone().requires_grad_()
    z = x * 1                                        # a non-leaf, as the LM head's output
    loss = cross_entropy(z, target, inplace=True)
    loss.backward()
    assert_close_rel(loss.detach(), ref_loss, 1e-5)
    assert_close_rel(x.grad, ref_grad, 8e-3)
    assert_close_rel(z.detach(), ref_grad, 8e-3)    # written over the logits
    y = logits.clone().requires_grad_()
    loss = torch.compile(cross_entropy, fullgraph=True)(y, target)
    loss.backward()
    assert_close_rel(loss.detach(), ref_loss, 1e-5)
    assert_close_rel(y.grad, ref_grad, 8e-3)


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture():
    """cross_entropy (in place on a non-leaf, and not) and the fused linear loss, forward and
    backward, captured in one CUDA graph (the target check, a host sync, is skipped while
    capturing) and replayed on new logits and targets: the replay's loss and gradients are
    the new inputs' (float64 oracle)."""
    from ligerzoo.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    n, v, h = 2048, 128256, 256
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_()
    hx = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")

    def step():
        a = cross_entropy(x * 1, t, inplace=True)    # on a non-leaf, as on the LM head's output
        b = cross_entropy(x, t)
        c = fused_linear_cross_entropy(hx, w, t)
        (a + 2 * b + c).backward()
        return a, b, c

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                    # warm-up (compiles the kernels) off the graph
        step()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = hx.grad = w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        losses = step()
    with torch.no_grad():                            # new inputs in the captured buffers
        x.copy_(torch.randn_like(x) * 3)
        hx.copy_(torch.randn_like(hx))
        t.copy_(torch.randint(0, v, (n,), device="cuda"))
        t[::7] = IGNORE
    graph.replay()
    torch.cuda.synchronize()
    one = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    ref, _, ref_grad = oracle(x.detach(), t, grad_out=one)
    for loss in losses[:2]:
        assert_close_rel(loss.detach(), ref, 1e-5)
    assert_close_rel(x.grad, 3 * ref_grad, 8e-3)
    z = (hx.detach().double() @ w.detach().double().T).requires_grad_()
    ref_c = F.cross_entropy(z, t, ignore_index=IGNORE)
    ref_c.backward()
    assert_close_rel(losses[2].detach(), ref_c.detach(), 1e-3)
    assert_close_rel(hx.grad, z.grad @ w.detach().double(), 2e-2)
    assert_close_rel(w.grad, z.grad.T @ hx.detach().double(), 2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_target_check_raises_after_the_launch():
    """On CUDA the label check finishes after the kernels are queued: a bad target still
    raises (naming the first bad value) from cross_entropy, its in-place form (checked before
    the logits are overwritten: they stay intact) and the fused linear losses, and the next
    valid call is unaffected."""
    from ligerzoo.kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy, fused_linear_cross_entropy_sum_)

    n, v, h = 4096, 128256, 256
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, v, (n,), device="cuda")
    bad = target.clone()
    bad[3000], bad[4000] = v + 2, -3
    match = rf"target value {v + 2} is out of range .*V={v}"
    x = logits.clone().requires_grad_()
    with pytest.raises(ValueError, match=match):
        cross_entropy(x, bad)
    assert x.grad is None
    z = logits.clone().requires_grad_() * 1          # a non-leaf: inplace=True would write over it
    with pytest.raises(ValueError, match=match):
        cross_entropy(z, bad, inplace=True)
    assert torch.equal(z.detach(), logits)
    hx = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(hx, w, bad)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy_sum_(hx.detach().clone(), w.detach(), bad)
    loss = cross_entropy(x, target)
    loss.backward()
    ref_loss, _, ref_grad = oracle(logits, target, grad_out=torch.tensor(1.0, dtype=torch.float64, device="cuda"))
    assert_close_rel(loss.detach(), ref_loss, 1e-5)
    assert_close_rel(x.grad, ref_grad, 8e-3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("n_rows", [8192, 64 * 4096 + 1])   # the one-program kernel, and torch ops
def test_gpu_target_check_on_another_device(n_rows):
    """A target on a GPU that is not the current one, behind queued work there: the check's
    answer is waited for on that GPU's stream (valid targets pass, the first bad one is named)."""
    torch.cuda.set_device(0)
    target = torch.randint(5, 1000, (n_rows,), device="cuda:1")
    busy = torch.randn(8192, 8192, device="cuda:1")
    for _ in range(20):  # keep cuda:1 busy while the check is queued behind this work
        busy = busy @ busy
        busy = busy / busy.norm()
    ce_mod.TargetCheck(target, 1000, IGNORE).wait()
    target[-1], target[-2] = 1007, -3
    for _ in range(20):
        busy = busy @ busy
        busy = busy / busy.norm()
    with pytest.raises(ValueError, match="target value -3 is out of range"):
        ce_mod.TargetCheck(target, 1000, IGNORE).wait()
    logits = torch.randn(n_rows, 1000, device="cuda:1", requires_grad=True)
    with pytest.raises(ValueError, match="target value -3 is out of range"):
        cross_entropy(logits, target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dispatch", ["triton", "reference", "torch_rows"])
def test_ignored_row_of_minus_inf_contributes_nothing(reduction, dispatch, monkeypatch):
    """An ignored row whose logits are all -inf (a masked-out position): torch's loss over
    the other rows, and a zero gradient there, on every path (the reference gave nan)."""
    if dispatch == "triton" and not _utils.use_triton(torch.empty(0)):
        pytest.skip("needs the Triton path: CUDA, or TRITON_INTERPRET=1 on the CPU (the suite sets it)")
    if dispatch == "reference":
        monkeypatch.setattr(_utils, "use_triton", lambda t: False)
    logits, target, _ = make_inputs(torch.float32, n_ignored=0)
    logits[1] = float("-inf")
    target[1] = IGNORE
    keep = target != IGNORE
    ref = F.cross_entropy(logits[keep].double(), target[keep], reduction=reduction)
    if dispatch == "torch_rows":
        n, v = logits.shape
        scales = ce_mod.reduction_scales(target, None, IGNORE, reduction, v)
        lse, rows, grad = torch.empty(n), torch.empty(n), torch.empty(n, v)
        ce_mod.torch_cross_entropy_rows(logits, target, None, scales, lse, rows, None, grad, None,
                                        IGNORE, 0.0, 0.0, None)
        assert torch.isfinite(rows).all() and rows[1] == 0 and not grad[1].any() and torch.isfinite(grad).all()
        torch.testing.assert_close(rows[keep].double(), F.cross_entropy(logits[keep].double(), target[keep],
                                                                        reduction="none"))
        return
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    expected = ref if reduction != "none" else torch.zeros(len(target), dtype=torch.float64).masked_scatter(keep, ref)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(x.grad).all() and not x.grad[1].any()


@pytest.mark.parametrize("opt", ["plain", "softcap", "all"])
def test_leading_blocks_of_minus_inf_logits(opt):
    """Rows whose first blocks of logits are all -inf (a vocabulary masked down to a few
    allowed tokens): torch's loss and gradient, never NaN. The running max used to start at
    -inf, and a whole block of -inf then gave exp(-inf - -inf) = NaN."""
    logits, target, weight = make_inputs(torch.float32, n_ignored=2)
    logits[:, :600] = float("-inf")            # blocks 0-1 of 256 and part of block 2
    logits[3, :999] = float("-inf")            # one row keeps only its last column
    target[target >= 0] = torch.randint(600, V, (int((target >= 0).sum()),))
    target[3] = 999
    kwargs = resolve(OPTIONS[opt], weight)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, **kwargs)
    loss.backward()
    want, _, gx = oracle(logits, target, grad_out=torch.tensor(1.0, dtype=torch.float64), **kwargs)
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-6)
