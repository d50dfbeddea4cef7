"""The nn.Module wrappers against their torch counterparts (CPU; Triton under the interpreter)."""
import pytest
import torch
import torch.nn.functional as F

import ligerzoo.nn as lnn


def test_norm_modules_match_torch():
    x = torch.randn(3, 5, 37)
    ln = lnn.LayerNorm(37)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.normal_()
    torch.testing.assert_close(ln(x), F.layer_norm(x, (37,), ln.weight, ln.bias, 1e-5), atol=1e-5, rtol=1e-5)
    gn = lnn.GroupNorm(6, 3)
    y = torch.randn(2, 6, 7)
    torch.testing.assert_close(gn(y), F.group_norm(y, 3, gn.weight, gn.bias, 1e-5), atol=1e-5, rtol=1e-5)
    rms = lnn.RMSNorm(37, eps=1e-6)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms(x), ref, atol=1e-5, rtol=1e-5)
    r = torch.randn_like(x)
    normed, res = rms(x, r)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(normed, rms(x + r), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        lnn.GroupNorm(5, 3)
    for channels, groups in ((8, 0), (0, 2), (8, -2), (8.0, 2)):  # (8, 0) raised ZeroDivisionError
        with pytest.raises(ValueError, match="must be a positive int"):
            lnn.GroupNorm(channels, groups)


@pytest.mark.parametrize("cls,act", [(lnn.SwiGLUMLP, F.silu), (lnn.GeGLUMLP, lambda a: F.gelu(a, approximate="tanh"))])
def test_gated_mlps_match_torch(cls, act):
    m = cls(24, 40)
    x = torch.randn(2, 3, 24)
    gate, up = m.w_gate_up(x).split(40, dim=-1)
    torch.testing.assert_close(m(x), m.w_down(act(gate) * up), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls,act,name", [(lnn.SwiGLUMLP, F.silu, "swiglu"),
                                          (lnn.GeGLUMLP, lambda a: F.gelu(a, approximate="tanh"), "geglu")])
def test_gated_mlps_backward_over_the_projection_output(cls, act, name, monkeypatch):
    """The gradients match torch's; the activation's backward writes d(gate_up) over the plain
    projection's output (the in-place op runs), but not over an output a forward hook has seen."""
    from ligerzoo.kernels._utils import ops, triton_ok

    torch.manual_seed(0)
    m = cls(24, 40)
    x = torch.randn(2, 3, 24, requires_grad=True)
    calls = []
    real = getattr(ops, f"{name}_fused_backward_")
    monkeypatch.setattr(ops, f"{name}_fused_backward_", lambda *a: (calls.append(1), real(*a))[1], raising=False)
    seen = []
    for hooked in (False, True):
        if hooked:
            m.w_gate_up.register_forward_hook(lambda mod, i, o: seen.append((o, o.detach().clone())))
        m.zero_grad()
        got = torch.autograd.grad(m(x).square().sum(), (x, m.w_gate_up.weight, m.w_down.weight))
        gate, up = m.w_gate_up(x).split(40, dim=-1)
        want = torch.autograd.grad(m.w_down(act(gate) * up).square().sum(), (x, m.w_gate_up.weight, m.w_down.weight))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
        assert len(calls) == (1 if triton_ok(x) else 0)  # only the unhooked call ran in place
    out, copy = seen[0]
    assert torch.equal(out, copy)


def test_losses_match_torch():
    logits, target = torch.randn(9, 50), torch.randint(0, 50, (9,))
    target[2] = -100
    torch.testing.assert_close(lnn.CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target))
    x, w = torch.randn(9, 16), torch.randn(50, 16)
    torch.testing.assert_close(lnn.FusedLinearCrossEntropyLoss()(w, x, target), F.cross_entropy(x @ w.T, target),
                               atol=1e-5, rtol=1e-5)
    logp, q = F.log_softmax(torch.randn(9, 50), -1), F.softmax(torch.randn(9, 50), -1)
    torch.testing.assert_close(lnn.KLDivLoss(reduction="batchmean")(logp, q), F.kl_div(logp, q, reduction="batchmean"))
    s, t = F.log_softmax(torch.randn(9, 50), -1), F.log_softmax(torch.randn(9, 50), -1)
    # beta = 0 is forward KL(teacher || student), averaged over rows
    ref = F.kl_div(s, t, reduction="sum", log_target=True) / 9
    torch.testing.assert_close(lnn.JSD(beta=0.0)(s, t), ref, atol=1e-5, rtol=1e-5)
    xs, xt, ws, wt = torch.randn(9, 16), torch.randn(9, 12), torch.randn(50, 16), torch.randn(50, 12)
    ref = lnn.JSD(beta=0.5)(F.log_softmax(xs @ ws.T, -1), F.log_softmax(xt @ wt.T, -1))
    torch.testing.assert_close(lnn.FusedLinearJSD(beta=0.5)(xs, ws, xt, wt), ref, atol=1e-5, rtol=1e-5)


def test_embedding_matches_torch():
    e = lnn.Embedding(30, 8, padding_idx=0)
    ids = torch.tensor([[0, 3, 3, 29]])
    torch.testing.assert_close(e(ids), F.embedding(ids, e.weight))
    e(ids).sum().backward()
    assert not e.weight.grad[0].any() and torch.equal(e.weight.grad[3], torch.full((8,), 2.0))


def test_modules_refuse_bad_options_at_construction():
    """Options a module keeps are checked when it is built, not at its first call."""
    import pytest

    import ligerzoo.nn as lnn

    for build, message in [
        (lambda: lnn.RMSNorm(8, casting_mode="bf16"), "casting_mode"),
        (lambda: lnn.CrossEntropyLoss(reduction="avg"), "reduction"),
        (lambda: lnn.CrossEntropyLoss(label_smoothing=1.5), "label_smoothing"),
        (lambda: lnn.FusedLinearCrossEntropyLoss(softcap=0.0), "softcap"),
        (lambda: lnn.KLDivLoss(reduction="avg"), "reduction"),
        (lambda: lnn.JSD(beta=1.5), "beta"),
        (lambda: lnn.FusedLinearJSD(temperature=0.0), "temperature"),
        (lambda: lnn.JSD(beta=None), "beta must be a real number"),                  # was a TypeError
        (lambda: lnn.FusedLinearJSD(beta="x"), "beta must be a real number"),
        (lambda: lnn.FusedLinearJSD(temperature=None), "temperature must be a real number"),
        (lambda: lnn.FusedLinearJSD(temperature=float("inf")), "finite"),           # was accepted: loss 0
        (lambda: lnn.Embedding(10, 4, padding_idx=10), "padding_idx"),
        (lambda: lnn.Embedding(2.5, 4), "num_embeddings must be a positive int"),
        (lambda: lnn.SwiGLUMLP(0, 4), "hidden_size must be a positive int"),            # used to build
        (lambda: lnn.GeGLUMLP(8, -1), "intermediate_size must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=message):
            build()
    loss = lnn.FusedLinearCrossEntropyLoss(ignore_index=3, reduction="sum", chunk_size=2)  # explicit signature
    assert loss.ignore_index == 3 and loss.reduction == "sum" and loss.chunk_size == 2
    x, w, t = torch.randn(3, 8), torch.randn(10, 8), torch.randint(0, 10, (3,))
    with pytest.raises(ValueError, match="were the two swapped"):     # torch's (input, weight) order
        loss(x, w, t)
    want = F.cross_entropy((x @ w.T).double(), t, reduction="sum", ignore_index=3).float()
    torch.testing.assert_close(loss(w, x, t), want, atol=1e-5, rtol=1e-5)


def test_kl_div_loss_defaults_match_torch():
    """KLDivLoss() is a drop-in torch.nn.KLDivLoss(): same defaults, same value (float64 torch)."""
    ours, theirs = lnn.KLDivLoss(), torch.nn.KLDivLoss()
    assert (ours.reduction, ours.log_target) == (theirs.reduction, theirs.log_target) == ("mean", False)
    logp, q = F.log_softmax(torch.randn(4, 23), -1), F.softmax(torch.randn(4, 23), -1)
    with pytest.warns(UserWarning, match="mean"):  # torch warns that "mean" is not the per-sample KL
        ref = theirs(logp.double(), q.double())
    torch.testing.assert_close(ours(logp, q), ref.float())


def _kl_rows(s, t):
    """float64 KL(teacher || student) per row, from log-probs."""
    s, t = s.double(), t.double()
    return (t.exp() * (t - s)).sum(-1)


def test_loss_options_are_attributes_read_at_the_call():
    """As on torch's loss modules: options are attributes, and assigning one changes the result."""
    logits, target = torch.randn(9, 50), torch.randint(0, 50, (9,))
    target[2] = 7
    ce = lnn.CrossEntropyLoss()
    assert (ce.ignore_index, ce.reduction, ce.label_smoothing) == (-100, "mean", 0.0)
    ce.reduction, ce.ignore_index, ce.label_smoothing = "sum", 7, 0.1
    ref = F.cross_entropy(logits.double(), target, reduction="sum", ignore_index=7, label_smoothing=0.1)
    torch.testing.assert_close(ce(logits, target), ref.float())
    ce.reduction = "avg"
    with pytest.raises(ValueError, match="reduction"):
        ce(logits, target)

    x, w = torch.randn(9, 16), torch.randn(50, 16)
    flce = lnn.FusedLinearCrossEntropyLoss()
    flce.ignore_index, flce.reduction, flce.chunk_size = 7, "none", 4
    ref = F.cross_entropy(x.double() @ w.double().T, target, ignore_index=7, reduction="none")
    torch.testing.assert_close(flce(w, x, target), ref.float(), atol=1e-5, rtol=1e-5)

    logp, q = F.log_softmax(torch.randn(9, 50), -1), F.log_softmax(torch.randn(9, 50), -1)
    kl = lnn.KLDivLoss()
    kl.reduction, kl.log_target = "sum", True
    torch.testing.assert_close(kl(logp, q), _kl_rows(logp, q).sum().float(), atol=1e-5, rtol=1e-5)

    s, t = F.log_softmax(torch.randn(9, 50), -1), F.log_softmax(torch.randn(9, 50), -1)
    js = lnn.JSD()
    js.beta, js.ignore_index = 0.0, 7                 # forward KL over the rows not labelled 7
    keep = target != 7
    torch.testing.assert_close(js(s, t, target), _kl_rows(s, t)[keep].mean().float(), atol=1e-5, rtol=1e-5)

    xs, xt, ws, wt = torch.randn(9, 16), torch.randn(9, 12), torch.randn(50, 16), torch.randn(50, 12)
    fj = lnn.FusedLinearJSD()
    fj.beta, fj.temperature, fj.chunk_size = 0.0, 2.0, 4
    student, teacher = (F.log_softmax(a.double() @ b.double().T / 2, -1) for a, b in ((xs, ws), (xt, wt)))
    ref = _kl_rows(student, teacher)
    torch.testing.assert_close(fj(xs, ws, xt, wt), ref.mean().float(), atol=1e-5, rtol=1e-5)


def test_norm_modules_name_the_size_they_were_built_for():
    """A wrong channel count or last dim is reported against the module's own size."""
    gn = lnn.GroupNorm(num_channels=6, num_groups=3)
    for shape in [(2, 4, 5), (2, 9, 5)]:
        with pytest.raises(ValueError, match=rf"num_channels=6 .*\(N, 6, \*\).*{shape[1]} channels"):
            gn(torch.randn(shape))
    with pytest.raises(ValueError, match="num_channels=6"):
        lnn.GroupNorm(6, 3, affine=False)(torch.randn(2, 9))
    for norm in (lnn.LayerNorm(8), lnn.RMSNorm(8)):
        with pytest.raises(ValueError, match=r"built for inputs \(\.\.\., 8\).*\(3, 5\)"):
            norm(torch.randn(3, 5))
        with pytest.raises(ValueError, match="hidden_size=8"):
            norm(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        lnn.RMSNorm(8)(torch.randn(3, 5), torch.randn(3, 5))


def test_module_reprs_show_their_options():
    for module, text in [
        (lnn.LayerNorm(33), "LayerNorm((33,), eps=1e-05)"),
        (lnn.LayerNorm(8, elementwise_affine=False), "LayerNorm((8,), eps=1e-05, elementwise_affine=False)"),
        (lnn.LayerNorm(8, bias=False), "LayerNorm((8,), eps=1e-05, bias=False)"),
        (lnn.RMSNorm(8, offset=1.0, casting_mode="gemma"),
         "RMSNorm((8,), eps=1e-06, offset=1.0, casting_mode='gemma')"),
        (lnn.GroupNorm(6, 3), "GroupNorm(num_channels=6, num_groups=3, eps=1e-05)"),
        (lnn.Embedding(10, 6, padding_idx=-1), "Embedding(10, 6, padding_idx=9)"),
        (lnn.CrossEntropyLoss(ignore_index=5, label_smoothing=0.1),
         "CrossEntropyLoss(ignore_index=5, reduction='mean', label_smoothing=0.1)"),
        (lnn.FusedLinearCrossEntropyLoss(chunk_size=4),
         "FusedLinearCrossEntropyLoss(ignore_index=-100, reduction='mean', chunk_size=4)"),
        (lnn.KLDivLoss(log_target=True), "KLDivLoss(reduction='mean', log_target=True)"),
        (lnn.JSD(beta=0.2), "JSD(beta=0.2, ignore_index=-100)"),
        (lnn.FusedLinearJSD(temperature=2.0), "FusedLinearJSD(beta=0.5, ignore_index=-100, temperature=2.0)"),
    ]:
        assert repr(module) == text
    assert "hidden_size=4, intermediate_size=6" in repr(lnn.SwiGLUMLP(4, 6))


def test_embedding_negative_padding_idx_counts_from_the_end():
    e, ref = lnn.Embedding(10, 6, padding_idx=-1), torch.nn.Embedding(10, 6, padding_idx=-1)
    assert e.padding_idx == ref.padding_idx == 9 and not e.weight[9].any()
    ids = torch.tensor([[9, 3, 9, 0]])
    e(ids).sum().backward()
    w64 = e.weight.detach().double().requires_grad_()
    F.embedding(ids, w64, padding_idx=9).sum().backward()
    torch.testing.assert_close(e.weight.grad, w64.grad.float())
    for bad in (-11, 10):
        with pytest.raises(ValueError, match=r"padding_idx must be an integer row index within \[-10, 10\)"):
            lnn.Embedding(10, 6, padding_idx=bad)


def test_modules_take_device_and_dtype_like_torch():
    builds = [lambda **kw: lnn.RMSNorm(8, **kw), lambda **kw: lnn.LayerNorm(8, **kw),
              lambda **kw: lnn.GroupNorm(6, 3, **kw), lambda **kw: lnn.SwiGLUMLP(8, 12, bias=True, **kw),
              lambda **kw: lnn.GeGLUMLP(8, 12, **kw), lambda **kw: lnn.Embedding(10, 8, padding_idx=0, **kw)]
    for build in builds:
        params = list(build(dtype=torch.float64).parameters())
        assert params and all(p.dtype == torch.float64 for p in params)
        assert all(p.device.type == "meta" for p in build(device="meta").parameters())
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    norm = lnn.RMSNorm(8, dtype=torch.bfloat16)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert norm.weight.dtype == torch.bfloat16
    # a bf16 output against the float64 result rounded to bf16: at most one bf16 step apart (the
    # interpreter truncates where CUDA rounds), 0.0078 at 1 and 0.0156 at 2
    torch.testing.assert_close(norm(x), ref.to(torch.bfloat16), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kwargs", [dict(elementwise_affine=False), dict(bias=False), dict()])
def test_layer_norm_affine_flags_match_torch(kwargs):
    ours, theirs = lnn.LayerNorm(37, **kwargs), torch.nn.LayerNorm(37, **kwargs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert (ours.weight is None, ours.bias is None) == (theirs.weight is None, theirs.bias is None)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    w = ours.weight.double() if ours.weight is not None else None
    b = ours.bias.double() if ours.bias is not None else None
    x = torch.randn(3, 5, 37)
    ref = F.layer_norm(x.double(), (37,), w, b, 1e-5)
    torch.testing.assert_close(ours(x), ref.float(), atol=1e-5, rtol=1e-5)


def test_norms_take_normalized_shape_as_torch():
    """LayerNorm / RMSNorm accept H as torch's one-dim normalized_shape ((H,), [H], a Size),
    as torch.nn.LayerNorm does; a multi-dim shape is refused (last dim only)."""
    x = torch.randn(3, 8)
    ref = torch.nn.LayerNorm((8,))
    for shape in (8, (8,), [8], x.shape[-1:]):
        ln = lnn.LayerNorm(shape)
        assert ln.normalized_shape == (8,)
        torch.testing.assert_close(ln(x), ref(x), atol=1e-5, rtol=1e-5)
        assert lnn.RMSNorm(shape).normalized_shape == (8,)
    for bad in ((4, 8), (), 0, 8.0):
        with pytest.raises(ValueError, match="last dim only|positive int"):
            lnn.LayerNorm(bad)
        with pytest.raises(ValueError, match="last dim only|positive int"):
            lnn.RMSNorm(bad)


def test_reset_parameters_after_meta_init_as_torch():
    """Built on the meta device, moved with ``to_empty`` (uninitialised memory) and reset
    module by module (the FSDP / torchtitan recipe), the modules get torch's initial values:
    norm weights 1 (RMSNorm 1 - offset), biases 0, the embedding's padding row 0."""
    from ligerzoo import nn as L

    with torch.device("meta"):
        mods = [L.RMSNorm(8), L.RMSNorm(8, offset=1.0), L.LayerNorm(8), L.GroupNorm(8, 2), L.Embedding(10, 8, 3)]
    for m in mods:
        m.to_empty(device="cpu")
        for p in m.parameters():
            p.data.fill_(float("nan"))
        m.reset_parameters()
    assert torch.equal(mods[0].weight, torch.ones(8)) and torch.equal(mods[1].weight, torch.zeros(8))
    for norm, ref in ((mods[2], torch.nn.LayerNorm(8)), (mods[3], torch.nn.GroupNorm(2, 8))):
        assert torch.equal(norm.weight, ref.weight) and torch.equal(norm.bias, ref.bias)
    emb = mods[4].weight
    assert torch.isfinite(emb).all() and torch.equal(emb[3], torch.zeros(8)) and emb.std() > 0.5


def test_embedding_from_pretrained_and_padding_idx_type_as_torch():
    from ligerzoo import nn as L

    table = torch.randn(10, 4)
    ids = torch.tensor([[1, 3, 3, 9]])
    for freeze in (True, False):
        ours, ref = L.Embedding.from_pretrained(table, freeze, 3), torch.nn.Embedding.from_pretrained(table, freeze, 3)
        assert ours.weight.requires_grad is ref.weight.requires_grad is not freeze
        assert torch.equal(ours(ids), ref(ids)) and ours.padding_idx == 3
        assert ours.weight.data_ptr() != table.data_ptr()  # a copy, as torch's
    with pytest.raises(ValueError, match="2-D float tensor"):
        L.Embedding.from_pretrained(torch.zeros(10, dtype=torch.long))
    for bad in (1.5, True, "2"):
        with pytest.raises(ValueError, match="padding_idx must be an int"):
            L.Embedding(8, 2, padding_idx=bad)
    assert L.Embedding(8, 2, padding_idx=torch.tensor(-1)).padding_idx == 7  # a 0-d int tensor, stored as an int
    assert L.LayerNorm(8, 1e-5, False).weight is None  # torch's positional order
    assert L.LayerNorm(8, 1e-5, True, False).bias is None


def test_modules_run_on_the_meta_device():
    """Shape inference on meta tensors (no values): the id and target range checks stand aside."""
    from ligerzoo import nn as L

    with torch.device("meta"):
        ids, t = torch.zeros(2, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)
        assert L.Embedding(10, 8)(ids).shape == (2, 3, 8)
        assert L.CrossEntropyLoss()(torch.randn(4, 10), t).shape == ()
        assert L.FusedLinearCrossEntropyLoss()(torch.randn(10, 8), torch.randn(4, 8), t).shape == ()


def test_a_model_runs_on_the_meta_device():
    """A CausalLM built on meta runs a forward (shape inference, FLOP counting): the RoPE
    tables skip autocast, which meta does not have; with labels, the loss is a 0-d meta tensor."""
    import ligerzoo

    cfg = ligerzoo.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = ligerzoo.CausalLM(cfg)
        ids = torch.zeros(2, 5, dtype=torch.long)
        assert model(ids).logits.shape == (2, 5, 64)
        assert model(ids, labels=ids).loss.shape == ()
