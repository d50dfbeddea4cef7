"""The op registration shared by every kernel (``_utils.KernelOp``) and the device-side
gradient scaling shared by the losses (``cross_entropy.scale_saved_grad``)."""
from __future__ import annotations

import pytest
import torch

import ligerzoo.kernels._utils as kutils
from ligerzoo.kernels import cross_entropy, rms_norm
from tests.kernels.helpers import kernel_module

ce_mod = kernel_module("cross_entropy")


def _count_dispatcher_calls(monkeypatch, name):
    """Count calls that go through the torch.library op ``ligerzoo::<name>``."""
    op = kutils._REGISTRY[name]
    calls = []
    real = op._packet
    monkeypatch.setattr(op, "_packet", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def test_every_op_is_registered_with_torch_library():
    for name, op in kutils._REGISTRY.items():
        assert getattr(torch.ops.ligerzoo, name) is op._packet
    assert kutils.ops.rms_norm is kutils._REGISTRY["rms_norm"]
    with pytest.raises(AttributeError, match="no ligerzoo kernel op named 'nope'"):
        kutils.ops.nope
    with pytest.raises(ValueError, match="already registered"):
        kutils.KernelOp("rms_norm", lambda x: x)


def test_eager_path_skips_the_dispatcher_and_matches_it(monkeypatch):
    """Plain tensors run the body directly (forward and backward); the result and the
    gradients equal the torch.library op's."""
    x = torch.randn(3, 5, 40, requires_grad=True)
    w = (1 + 0.1 * torch.randn(40)).requires_grad_()
    calls = _count_dispatcher_calls(monkeypatch, "rms_norm")
    bwd_calls = _count_dispatcher_calls(monkeypatch, "rms_norm_backward")
    y = rms_norm(x, w)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    assert calls == [] and bwd_calls == []

    y_op, _ = torch.ops.ligerzoo.rms_norm(x, w, 1e-6, 0.0, "llama", False)
    gx_op, gw_op = torch.autograd.grad(y_op, (x, w), gy)
    assert torch.equal(y, y_op) and torch.equal(gx, gx_op) and torch.equal(gw, gw_op)


def test_tensor_subclasses_and_tracing_go_through_the_dispatcher(monkeypatch):
    calls = _count_dispatcher_calls(monkeypatch, "rms_norm")

    class Sub(torch.Tensor):
        pass

    x = torch.randn(2, 40).as_subclass(Sub)
    rms_norm(x, torch.ones(40))
    assert calls == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    rms_norm(torch.randn(2, 40), torch.ones(40))
    assert calls == [1, 1]


def test_eager_mutation_bumps_the_version_counter():
    """A tensor saved for backward and then overwritten by a mutating op is caught, as it
    is through the dispatcher."""
    dy = torch.randn(4, 40)
    x = torch.randn(4, 40)
    w = torch.ones(40)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    before = dy._version
    kutils.ops.rms_norm_backward_inplace(dy, x, w, rstd, 0.0, "llama", None)
    assert dy._version > before

    a = torch.randn(4, 40, requires_grad=True)
    saved = a * 1.0
    out = saved.exp()  # exp saves its output for backward
    kutils.ops.rms_norm_backward_inplace(out.detach(), x, w, rstd, 0.0, "llama", None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_eager_backward_refuses_second_order():
    x = torch.randn(4, 40, requires_grad=True)
    y = rms_norm(x, torch.ones(40))
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


# Without Triton (CPU with the interpreter off) the ops run their plain-torch references, which
# torch.func handles, so there is no failure to name; CI runs with the interpreter on.
@pytest.mark.skipif(not kutils.use_triton(torch.empty(0)),
                    reason="ops run their torch references here, which torch.func supports")
def test_torch_func_transforms_are_refused_by_name():
    """torch.func.grad / vmap over an op fail with a message naming the op, not torch's internals."""
    w = torch.ones(40)
    x = torch.randn(3, 40)
    for transform in (lambda: torch.func.grad(lambda a: rms_norm(a, w).sum())(x),
                      lambda: torch.func.vmap(lambda a: rms_norm(a, w))(x[None].expand(2, 3, 40).clone())):
        with pytest.raises(RuntimeError, match=r"ligerzoo::rms_norm does not support torch.func"):
            transform()


def test_unused_auxiliary_outputs_get_no_zero_filled_gradient(monkeypatch):
    """The loss's backward receives None, not a zero tensor, for its non-differentiable
    outputs (a zero-filled (N, V) gradient would cost a full pass over the logits)."""
    seen = []
    real = ce_mod._backward

    def spy(ctx, *grads):
        seen.append([g is None for g in grads])
        return real(ctx, *grads)

    monkeypatch.setattr(kutils._REGISTRY["cross_entropy"]._function, "backward",
                        staticmethod(lambda ctx, *g: spy(ctx, *g)))
    logits = torch.randn(6, 37, requires_grad=True)
    cross_entropy(logits, torch.randint(0, 37, (6,))).backward()
    assert seen == [[False, True, True, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factor", [1.0, 0.25, -3.0])
def test_scale_saved_grad_on_the_device(dtype, factor):
    """In place, fp32 math, one rounding (within one ulp of bf16: Triton's interpreter
    rounds toward zero): equals torch's ``grad.mul_(factor)``; a factor of exactly 1 leaves
    the buffer bit-identical. The version counter moves either way."""
    g = torch.randn(5, 9001, dtype=dtype)  # six blocks of the scale kernel over its four CPU programs
    orig = g.clone()
    expected = g.double() * factor
    before = g._version
    out = ce_mod.scale_saved_grad(g, torch.tensor(factor), per_row=False)
    assert out is g and g._version > before
    if factor == 1.0:
        assert torch.equal(g, orig)
    else:
        torch.testing.assert_close(g.double(), expected, rtol=torch.finfo(dtype).eps, atol=0)


def test_scale_saved_grad_per_row():
    g = torch.randn(4, 300)
    s = torch.tensor([1.0, 0.5, -2.0, 0.0])
    expected = g * s[:, None]
    ce_mod.scale_saved_grad(g, s, per_row=True)
    torch.testing.assert_close(g, expected, rtol=0, atol=0)


def test_loss_gradient_scaled_by_the_incoming_factor():
    """cross_entropy's precomputed gradient times a non-unit incoming gradient (e.g. a loss
    divided by the accumulation steps) against float64 torch."""
    logits = torch.randn(5, 33, dtype=torch.float32, requires_grad=True)
    t = torch.randint(0, 33, (5,))
    (0.125 * cross_entropy(logits, t)).backward()
    l64 = logits.detach().double().requires_grad_()
    (0.125 * torch.nn.functional.cross_entropy(l64, t)).backward()
    torch.testing.assert_close(logits.grad.double(), l64.grad, rtol=1e-5, atol=1e-7)


def _second_backward_cases():
    from ligerzoo.kernels import fused_linear_cross_entropy, jsd

    t = torch.randint(0, 37, (6,))
    yield "cross_entropy", lambda z: cross_entropy(z, t), (6, 37)
    yield "cross_entropy", lambda z: cross_entropy(z * 1, t, inplace=True), (6, 37)
    w = torch.randn(37, 8)
    yield "fused_linear_cross_entropy", lambda x: fused_linear_cross_entropy(x, w, t), (6, 8)
    teacher = torch.log_softmax(torch.randn(6, 37), -1)
    yield "jsd", lambda s: jsd(torch.log_softmax(s, -1), teacher), (6, 37)
    from ligerzoo.kernels import fused_linear_jsd

    xt, wt = torch.randn(6, 8), torch.randn(37, 8)
    yield "fused_linear_jsd", lambda x: fused_linear_jsd(x, w, xt, wt), (6, 8)


@pytest.mark.parametrize("with_hooks", [False, True])
def test_second_backward_through_precomputed_gradients_raises(with_hooks):
    """The losses hand out the gradients they computed in the forward: a second backward
    through the same graph raises a clear error, with or without saved-tensor hooks (which
    bypass autograd's version check), never rescaled gradients."""
    import contextlib

    for name, f, shape in _second_backward_cases():
        z = torch.randn(*shape, requires_grad=True)
        ctx = torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x) if with_hooks else contextlib.nullcontext()
        with ctx:
            loss = f(z)
        (0.5 * loss).backward(retain_graph=True)
        with pytest.raises(RuntimeError, match=f"{name}: a second backward"):
            (0.5 * loss).backward()


def test_dispatch_modes_and_tracing_see_the_op():
    """make_fx (a dispatch mode) records the custom op, not the kernel launch inside it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    w = torch.ones(40)
    gm = make_fx(lambda x: rms_norm(x, w))(torch.randn(3, 40))
    assert any("ligerzoo.rms_norm" in str(n.target) for n in gm.graph.nodes)


def test_missing_argument_gets_the_dispatchers_error():
    with pytest.raises(RuntimeError, match="missing value for argument .eps."):
        kutils.ops.rms_norm(torch.randn(2, 8), torch.ones(8))


def test_cross_entropy_single_column_with_odd_strides():
    z = torch.randn(1, 2)[:, ::2].requires_grad_()  # (1, 1), column stride 2
    loss = cross_entropy(z, torch.tensor([0]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(z.grad, torch.zeros(1, 1))


def _opcheck(op, args):
    from torch.library import opcheck

    result = opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_loss_ops_pass_opcheck():
    """The loss ops' schemas, fake (meta) functions and autograd registrations, checked by
    torch.library.opcheck (the norms, RoPE, GLUs, embedding and int2 matmul have theirs in
    their own test files)."""
    ops = torch.ops.ligerzoo
    torch.manual_seed(0)
    n, v = 5, 37
    logits = torch.randn(n, v, requires_grad=True)
    target = torch.randint(0, v, (n,))
    target[1] = -100
    w = torch.rand(v)
    _opcheck(ops.cross_entropy, (logits, target, w, -100, "mean", 0.1, 1e-4, 30.0, True))
    _opcheck(ops.cross_entropy, (logits.detach(), target, None, -100, "none", 0.0, 0.0, None, False))
    s = torch.randn(n, v).log_softmax(-1).requires_grad_()
    t = torch.randn(n, v).log_softmax(-1)
    _opcheck(ops.kl_div, (s, t.exp(), True, 1.0 / n, False, None))
    _opcheck(ops.kl_div, (s, t, False, 1.0, True, None))
    _opcheck(ops.kl_div_backward, (torch.tensor(1.0), s.detach(), t.exp(), True, 0.2, False, None, True, True))
    _opcheck(ops.jsd, (s.detach(), t, target, 0.3, -100, True, True))
    x, lm_head, b = torch.randn(n, 8, requires_grad=True), torch.randn(v, 8, requires_grad=True), torch.randn(v)
    _opcheck(ops.fused_linear_cross_entropy,
             (x, lm_head, target, b, w, -100, "mean", 0.1, 1e-4, 30.0, torch.float32, 2, True, True, True))
    _opcheck(ops.fused_linear_cross_entropy_backward,
             (torch.randn(n), x.detach(), lm_head.detach(), target, b, w, -100, 0.0, 0.0, None, torch.float32, 2,
              True, True, True))
    _opcheck(ops.fused_linear_jsd, (x, lm_head, torch.randn(n, 6), torch.randn(v, 6), target, 0.5, -100, 2.0, 2,
                                    True, True))


def _inplace_cases():
    """(name, inputs requiring grad, fn) for every public op with a differentiable output."""
    from ligerzoo import kernels as K

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    V, H, N = 37, 16, 6
    t = torch.randint(0, V, (N,), generator=g)
    lp = lambda *s: torch.log_softmax(r(*s), -1)  # noqa: E731
    cos, sin = K.rope_cos_sin(torch.arange(5)[None], 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    p, teacher_lp, teacher_x, teacher_w = torch.softmax(r(N, V), -1), lp(N, V), r(N, H), r(V, H)
    return [
        ("rms_norm", [r(N, H), 1 + 0.1 * r(H)], lambda x, w: K.rms_norm(x, w)),
        ("fused_add_rms_norm", [r(N, H), r(N, H), 1 + 0.1 * r(H)], lambda x, res, w: K.fused_add_rms_norm(x, res, w)[0]),
        ("layer_norm", [r(N, H), 1 + 0.1 * r(H), r(H)], lambda x, w, b: K.layer_norm(x, w, b)),
        ("group_norm", [r(2, 8, 5), 1 + 0.1 * r(8), r(8)], lambda x, w, b: K.group_norm(x, 4, w, b)),
        ("rope", [r(1, 5, 2, 8), r(1, 5, 2, 8)], lambda q, k: K.rope(q, k, cos, sin)[0]),
        ("swiglu", [r(N, H), r(N, H)], lambda a, b: K.swiglu(a, b)),
        ("geglu", [r(N, H), r(N, H)], lambda a, b: K.geglu(a, b)),
        ("cross_entropy", [r(N, V)], lambda x: K.cross_entropy(x, t)),
        ("cross_entropy none", [r(N, V)], lambda x: K.cross_entropy(x, t, reduction="none")),
        ("cross_entropy inplace", [r(N, V)], lambda x: K.cross_entropy(x * 1.0, t, inplace=True)),
        ("fused_linear_cross_entropy", [r(N, H), r(V, H)], lambda x, w: K.fused_linear_cross_entropy(x, w, t)),
        ("kl_div", [lp(N, V)], lambda x: K.kl_div(x, p)),
        ("jsd", [lp(N, V)], lambda x: K.jsd(x, teacher_lp)),
        ("fused_linear_jsd", [r(N, H), r(V, H)], lambda x, w: K.fused_linear_jsd(x, w, teacher_x, teacher_w)),
        ("embedding", [r(V, H)], lambda w: K.embedding(t[None], w)),
    ]


@pytest.mark.parametrize("case", range(len(_inplace_cases())))
def test_outputs_can_be_modified_in_place_as_torch_outputs_can(case):
    """``loss /= accumulation_steps`` or ``h *= scale`` on an op's output works in eager mode
    as on torch's ops (an output built as a view inside the autograd function used to refuse
    it), and the gradient follows the modification."""
    name, inputs, fn = _inplace_cases()[case]
    plain = [x.clone().requires_grad_() for x in inputs]
    (fn(*plain) * 0.5).sum().backward()
    edited = [x.clone().requires_grad_() for x in inputs]
    out = fn(*edited)
    out /= 2
    out.sum().backward()
    for a, b in zip(edited, plain):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{name}: {m}")
