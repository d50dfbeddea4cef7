"""cross_entropy on Hopper's resident-row kernel (``cross_entropy_sm90``).

Triton's interpreter cannot run Gluon, so on the CPU the kernel is compiled for sm_90
(every option set, each dtype size: catches API and shared-memory regressions without a
GPU); on an sm_90 GPU its values are checked against float64 torch and against the
portable row kernel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ligerzoo.kernels import cross_entropy_sm90 as sm90
from ligerzoo.kernels.cross_entropy import cross_entropy, launch_cross_entropy_rows, reduction_scales
from tests.kernels.helpers import assert_close_rel
from tests.kernels.test_cross_entropy import IGNORE, OPTIONS, grad_output_for, oracle, resolve, tols

FLAGS = ("HAS_WEIGHT", "HAS_SOFTCAP", "HAS_SMOOTHING", "HAS_ZLOSS", "COMPUTE_LOSS", "HAS_ROW_SCALE", "HAS_GUARD")
SM90_SHARED_LIMIT = 227 * 1024


def compile_for_sm90(dtype: str, n_cols: int, **flags):
    """Compile the kernel for sm_90 on this machine (no GPU): -> Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    eb = {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    nbox, nch, ns = sm90.settings(n_cols, eb)
    fn = sm90._cross_entropy_resident_kernel.fn  # the Gluon function inside DirectLaunch
    layout = (f"NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth={eb * 8}, rank=3, transposed=False, "
              "fp4_padded=False, cga_layout=[])")
    ptrs = dict(X=dtype, DX=dtype, TARGET="i64", CLASS_W="fp32", LOSS="fp32", ZLOSS="fp32", LSE="fp32",
                SCALES="fp32", ROW_SCALE="fp32", GUARD="i64")
    consts = dict(NCH=nch, NS=ns, NBOX=nbox, BOX_=sm90.BOX, VEC_=sm90.VEC, **{f: flags.get(f, True) for f in FLAGS})
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name == "desc":
            sig[name] = f"tensordesc<{dtype}[1, {nbox}, {sm90.BOX}],{layout}>"
        elif name in ptrs:
            sig[name], attrs[(i,)] = "*" + ptrs[name], [["tt.divisibility", 16]]
        elif name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
        elif name in ("label_smoothing", "lse_square_scale", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = GluonASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=sm90.NUM_WARPS))


VARIANTS = [(dtype, n_cols, options) for dtype, n_cols in [("bf16", 128256), ("fp32", 128256), ("fp16", 65536)]
            for options in ("all", "plain", "grad_only")]


def compile_variants() -> None:
    """Compile every variant; print one JSON line each (run in a child without the interpreter)."""
    for dtype, n_cols, options in VARIANTS:
        flags = {f: True for f in FLAGS}
        if options != "all":
            flags.update(HAS_WEIGHT=False, HAS_SOFTCAP=False, HAS_SMOOTHING=False, HAS_ZLOSS=False,
                         HAS_ROW_SCALE=False, HAS_GUARD=False)
        if options == "grad_only":  # no loss rows wanted
            flags["COMPUTE_LOSS"] = False
        kernel = compile_for_sm90(dtype, n_cols, **flags)
        print(json.dumps(dict(variant=[dtype, n_cols, options], shared=kernel.metadata.shared,
                              tma="cp.async.bulk.tensor" in kernel.asm["ptx"])), flush=True)


@pytest.mark.skipif(not sm90.HAS_GLUON, reason="needs Triton with Gluon")
def test_compiles_for_sm90():
    """Every option set and dtype size compiles for sm_90 within its shared memory, loading
    through TMA. In a child process: with TRITON_INTERPRET=1 (this suite's setting) the
    kernels are interpreted functions, which cannot be compiled."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    code = "from tests.kernels.test_cross_entropy_sm90 import compile_variants; compile_variants()"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [tuple(r["variant"]) for r in lines] == VARIANTS
    for r in lines:
        assert 0 < r["shared"] <= SM90_SHARED_LIMIT, r
        assert r["tma"], r  # the rows come in through TMA


def test_settings():
    # Llama-3 vocabulary in bf16: 501 boxes of 256 -> 8 chunks of 64 boxes, 7 of them resident
    assert sm90.settings(128256, 2) == (64, 8, 7)
    # a row that fits: every chunk resident, no reload
    assert sm90.settings(65536, 2) == (64, 4, 4)
    assert sm90.settings(128256, 4) == (32, 16, 7)


def test_not_used_on_cpu():
    x = torch.zeros(4, 128256)
    assert not sm90.supported(x, x)


# ----------------------------------------------------------------------------- GPU
hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and sm90.HAS_GLUON),
    reason="needs an sm_90 GPU and Triton with Gluon")

# (rows, vocab, row stride): Llama-3 (one chunk reloaded per row), Qwen2.5 (reloads), a
# row that fits (every chunk resident; a ring of whole rows), an odd vocabulary in a padded
# buffer (plain loads for the last partial box), Gemma's 256000 (most chunks reloaded), one row.
SHAPES = [(300, 128256, None), (200, 152064, None), (1000, 65536, None), (90, 50257 + 49152, 99416),
          (40, 256000, None), (1, 128256, None)]


def make(n, v, stride, dtype, scale=3.0):
    buf = (torch.randn(n, stride or v, device="cuda") * scale).to(dtype)
    logits = buf[:, :v]
    if n > 3:
        big = torch.randn(v, device="cuda") * 1e4                    # |x| ~ 1e4: no inf or nan
        logits[3] = big.clamp(-6e4, 6e4).to(dtype)                   # (fp16 tops out at 65504)
    target = torch.randint(0, v, (n,), device="cuda")
    target[::7] = IGNORE
    logits[0, 5] = 100.0   # row 0 is ignored: exp(100 - 0) overflows fp32, its gradient must still be 0
    weight = torch.rand(v, device="cuda") + 0.5
    return buf, logits, target, weight


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("opt", ["plain", "all"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_float64(dtype, shape, opt, reduction):
    n, v, stride = shape
    buf, logits, target, weight = make(n, v, stride, dtype)
    assert sm90.supported(logits, logits)
    opts = resolve(OPTIONS[opt], weight)
    go = grad_output_for(reduction, n).cuda()
    saved = buf.clone()
    x = logits.clone().requires_grad_()
    loss, z_loss = cross_entropy(x, target, reduction=reduction, return_z_loss=True, **opts)
    loss.backward(go.float() if reduction == "none" else go.float().reshape(()))
    ref_loss, ref_z, ref_grad = oracle(logits, target, reduction=reduction, grad_out=go, **opts)
    loss_tol, grad_tol = tols(dtype)
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert_close_rel(loss.detach(), ref_loss, loss_tol)
    assert_close_rel(z_loss, ref_z, loss_tol, scale=float(ref_loss.abs().max()))
    assert_close_rel(x.grad, ref_grad, grad_tol)
    assert torch.equal(buf, saved)


@pytest.mark.gpu
@hopper
def test_confident_rows_keep_their_loss():
    """fp32 rows of 128256 columns, confident at |z| ~ 1000 (the target 17 above the rest):
    each row's loss and gradient within 5e-4 (relative) of float64, from this kernel. It takes
    log p = (z - m) - log(d); with an lse rounded to fp32 first (until session 26) the losses
    of about 5.3e-3 were off by up to ulp(1000) / 2 = 3e-5 (0.6%). What is left is the fp32
    sum d = 1.0053 of 128256 terms: measured 1.3e-4 of log(d) (6.9e-7, six ulps of d)."""
    n, v = 16, 128256
    z_t = 1000.0 + 0.37 * torch.arange(n, dtype=torch.float64, device="cuda")
    logits = (z_t[:, None] - 17.0).expand(n, v).contiguous()
    target = torch.arange(n, device="cuda") * 7919
    logits[torch.arange(n, device="cuda"), target] = z_t
    logits = logits.float()
    assert sm90.supported(logits, logits)
    x = logits.clone().requires_grad_()
    go = torch.linspace(0.5, 1.5, n, device="cuda")
    loss = cross_entropy(x, target, reduction="none")
    loss.backward(go)
    z64 = logits.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(z64, target, reduction="none")
    ref.backward(go.double())
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=5e-4, atol=0.0)
    torch.testing.assert_close(x.grad.double(), z64.grad, rtol=5e-4, atol=1e-6 * float(z64.grad.abs().max()))


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("zloss", [0.0, 1e-4])
def test_ignored_row_of_minus_inf_gets_a_zero_gradient(zloss):
    """An ignored row whose 128256 logits are all -inf (a masked-out position), through this
    kernel: loss over the other rows as float64 torch, a zero gradient there and no nan
    anywhere. (Its d is 0: exp2(-inf + inf) was nan, times a zero coefficient still nan,
    until session 26's review.)"""
    n, v = 8, 128256
    logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, v, (n,), device="cuda")
    logits[2] = float("-inf")
    target[2] = IGNORE
    assert sm90.supported(logits, logits)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, lse_square_scale=zloss)
    loss.backward()
    keep = target != IGNORE
    z = logits[keep].double()
    ref = torch.nn.functional.cross_entropy(z, target[keep]) + zloss * torch.logsumexp(z, -1).square().mean()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and not x.grad[2].any()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0.0)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_as_portable_kernel_with_row_scale(dtype, monkeypatch):
    """Through the engine the fused linear cross entropy uses (per-row factor, gradient over
    the logits), against the portable kernel: same lse and loss to fp32 rounding, gradient
    to one rounding of the dtype."""
    n, v = 257, 128256
    _, logits, target, weight = make(n, v, None, dtype)
    scales = reduction_scales(target, weight, IGNORE, "mean", v)
    row_scale = torch.rand(n, device="cuda")
    outs = []
    for enabled in (True, False):
        monkeypatch.setattr(sm90, "ENABLED", enabled)
        x = logits.clone()
        lse, loss, z = (torch.empty(n, device="cuda") for _ in range(3))
        launch_cross_entropy_rows(x, target, weight, scales, lse, loss, z, x, row_scale, IGNORE, 0.1, 1e-4, 30.0)
        outs.append((lse, loss, z, x))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
    assert_close_rel(outs[0][3], outs[1][3], 2 * torch.finfo(dtype).eps)


@pytest.mark.gpu
@hopper
def test_inplace_padding_all_ignored_and_deterministic():
    n, v, stride = 600, 99409, 99416
    buf, logits, target, _ = make(n, v, stride, torch.bfloat16)
    pad = buf[:, v:].clone()
    ref_loss, _, ref_grad = oracle(logits, target, grad_out=torch.tensor(1.0, dtype=torch.float64, device="cuda"))
    grads = []
    for _ in range(2):
        leaf = buf.clone().requires_grad_()
        b = leaf * 1                                # a non-leaf padded buffer (inplace leaves leaves alone)
        x = b[:, :v]
        loss = cross_entropy(x, target, inplace=True)
        loss.backward()
        assert_close_rel(loss.detach(), ref_loss, 1e-5)
        assert_close_rel(leaf.grad[:, :v], ref_grad, 8e-3)
        assert_close_rel(b.detach()[:, :v], ref_grad, 8e-3)   # written over the logits
        assert torch.equal(b.detach()[:, v:], pad)  # columns past the vocabulary untouched
        grads.append(leaf.grad[:, :v].clone())
    assert torch.equal(grads[0], grads[1])         # one row per CTA at a time: bit-reproducible
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, torch.full((n,), IGNORE, device="cuda"))
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()


@pytest.mark.gpu
@hopper
def test_dispatch():
    big = torch.zeros(8, 128256, device="cuda", dtype=torch.bfloat16)
    small = torch.zeros(8, 32000, device="cuda", dtype=torch.bfloat16)
    assert sm90.supported(big, big)
    assert not sm90.supported(big, None)           # loss only: one read either way
    assert not sm90.supported(small, small)        # 62.5 KB rows: the portable kernel is faster
    assert not sm90.supported(big[:, 1:], big[:, 1:])   # 2-byte offset rows: no TMA
