"""The block fusions (ligerzoo/models/fused.py) against the plain composition in float64,
and the activation memory they save, counted with saved-tensor hooks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ligerzoo.models import fused
from ligerzoo.models.config import ModelConfig
from ligerzoo.models.transformer import Block, rope_cos_sin, rope_inv_freq
from ligerzoo.nn import RMSNorm

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _rms(x, w, eps, offset):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_linear_matches_float64(dtype, residual, bias):
    torch.manual_seed(0)
    H, O = 72, 40  # not powers of two
    norm, lin = RMSNorm(H, 1e-5, casting_mode="none" if dtype == torch.float32 else "llama"), nn.Linear(H, O, bias=bias)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm, lin = norm.to(dtype), lin.to(dtype)
    x = torch.randn(3, 5, H, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 5, H, dtype=dtype, requires_grad=True) if residual else None
    params = [norm.weight, lin.weight] + ([lin.bias] if bias else [])
    y, s = fused.norm_linear(x, r, norm, lin)
    # the fused function returns the sum it normalised; mix both outputs into the loss
    out = torch.cat([y, s[..., :O]], -1)
    got = _grads(out, [x] + ([r] if residual else []) + params)

    x64 = x.detach().double().requires_grad_()
    r64 = r.detach().double().requires_grad_() if residual else None
    p64 = [p.detach().double().requires_grad_() for p in params]
    s64 = x64 + r64 if residual else x64
    y64 = F.linear(_rms(s64, p64[0], 1e-5, 0.0), p64[1], p64[2] if bias else None)
    out64 = torch.cat([y64, s64[..., :O]], -1)
    want = _grads(out64, [x64] + ([r64] if residual else []) + p64)
    torch.testing.assert_close(out.double(), out64, **TOL[dtype])
    for a, b in zip(got, want):
        scale = b.abs().max().clamp(min=1)
        torch.testing.assert_close(a.double() / scale, b / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_down_matches_float64(dtype, activation):
    torch.manual_seed(1)
    inter, H = 50, 24
    down = nn.Linear(inter, H, bias=True).to(dtype)
    gu = torch.randn(2, 7, 2 * inter, dtype=dtype) * 2
    gu_leaf = gu.clone().requires_grad_()
    y = fused.gated_down(gu_leaf * 1, down, activation)  # the function owns (and overwrites) its input
    got = _grads(y, [gu_leaf, down.weight, down.bias])

    gu64 = gu.double().requires_grad_()
    p64 = [down.weight.detach().double().requires_grad_(), down.bias.detach().double().requires_grad_()]
    g, u = gu64.chunk(2, -1)
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    y64 = F.linear(act * u, *p64)
    want = _grads(y64, [gu64] + p64)
    torch.testing.assert_close(y.double(), y64, **TOL[dtype])
    for a, b in zip(got, want):
        scale = b.abs().max().clamp(min=1)
        torch.testing.assert_close(a.double() / scale, b / scale, **TOL[dtype])


def test_gated_down_inplace_consumes_its_input_and_refuses_a_second_backward():
    down = nn.Linear(16, 8)
    gu = torch.randn(4, 32, requires_grad=True)
    y = fused.gated_down(gu * 1, down, "silu", inplace=True)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_gated_down_default_leaves_the_callers_tensor_alone():
    down = nn.Linear(16, 8)
    gu = torch.randn(4, 32, requires_grad=True)
    before = gu.detach().clone()
    y = fused.gated_down(gu, down, "silu")
    y.sum().backward(retain_graph=True)
    first = gu.grad.clone()
    y.sum().backward()
    assert torch.equal(gu.detach(), before)
    torch.testing.assert_close(gu.grad, 2 * first)


def test_second_order_gradients_are_refused():
    torch.manual_seed(4)
    norm, lin, down = RMSNorm(16), nn.Linear(16, 32), nn.Linear(16, 16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y, _ = fused.norm_linear(x, None, norm, lin)
    out = fused.gated_down(y, down, "silu")
    with pytest.raises(RuntimeError, match="second-order"):  # never a silently wrong second derivative
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    # also when the incoming gradient is a constant (a gradient penalty on a plain sum)
    y, _ = fused.norm_linear(x, None, norm, lin)
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(y.sum(), [x], create_graph=True)
    target = torch.randint(0, 32, (2, 3))
    loss = fused.norm_linear_cross_entropy(x, None, norm, lin.weight, target)
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(loss, [x], create_graph=True)


def test_no_grad_evaluation_computes_no_gradients(monkeypatch):
    """Evaluating the loss without grad mode runs the plain loss (no dX / dW work)."""
    import importlib

    flce = importlib.import_module("ligerzoo.kernels.fused_linear_cross_entropy")  # the module, not the function
    calls = []
    real = flce._chunk_loop
    monkeypatch.setattr(flce, "_chunk_loop", lambda *a, **k: (calls.append(a[16:19]), real(*a, **k))[1])
    model, ids = _tiny_model()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert calls == [(False, False, False)] and torch.isfinite(loss)


def test_hooks_on_norms_and_projections_see_and_keep_their_tensors():
    """A hook on the final norm changes the labels-path loss as it changes the logits; the
    outputs a hook captured from wqkv and w_gate_up are never overwritten."""
    model, ids = _tiny_model()
    captured = {}
    # the final norm also adds the residual: it returns (normed, sum)
    model.norm.register_forward_hook(lambda m, i, o: (o[0] * 2, o[1]) if isinstance(o, tuple) else o * 2)
    model.layers[0].attn.wqkv.register_forward_hook(lambda m, i, o: captured.__setitem__("qkv", (o, o.clone())))
    model.layers[0].mlp.w_gate_up.register_forward_hook(lambda m, i, o: captured.__setitem__("gu", (o, o.clone())))
    logits = model(ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 64).float(), ids[:, 1:].reshape(-1))
    loss = model(ids, labels=ids).loss
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    loss.backward()
    for name, (seen, copy) in captured.items():
        assert torch.equal(seen, copy), name


def test_bad_arguments_raise_clear_errors():
    norm, lin = RMSNorm(16), nn.Linear(16, 8)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="residual must match x"):
        fused.norm_linear(x, torch.randn(2, 3, 8), norm, lin)
    with pytest.raises(ValueError, match="residual must match x"):
        fused.norm_linear(x, torch.randn(1, 3, 16), norm, lin)  # no silent broadcast
    with pytest.raises(ValueError, match="even last dim"):
        fused.gated_down(torch.randn(2, 17), nn.Linear(8, 4), "silu")
    with pytest.raises(ValueError, match="activation must be"):
        fused.gated_down(torch.randn(2, 16), nn.Linear(8, 4), "relu")
    cos = sin = torch.ones(1, 3, 8)
    with pytest.raises(ValueError):
        fused.rope_qkv_(torch.randn(1, 5, 4 * 8), cos, sin, 2, 1)  # tables for T=3, qkv with T=5
    with pytest.raises(ValueError, match="qkv must be"):
        fused.rope_qkv_(torch.randn(1, 5, 30), torch.ones(1, 5, 8), torch.ones(1, 5, 8), 2, 1)


def test_rope_qkv_backward_does_not_write_into_a_shared_gradient():
    """The gradient reaching the in-place RoPE may be shared with another branch (here an add
    passes the same buffer to both summands): rotating it in place would corrupt the other."""
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    a = torch.randn(1, 4, 32, requires_grad=True)
    b = torch.randn(1, 4, 32, requires_grad=True)
    qkv = a * 1
    q, k, v = fused.rope_qkv_(qkv, cos, sin, 2, 1)
    out = qkv + b  # d(out)/d(qkv) and d(out)/db are the same buffer
    out.backward(torch.ones_like(out))
    assert torch.equal(b.grad, torch.ones_like(b))


def test_hooked_or_wrapped_projections_are_called_not_bypassed():
    """A forward hook (or an adapter module in place of nn.Linear) on a projection changes
    the model exactly as it does on the plain composition."""
    model, ids = _tiny_model()
    base = model(ids, labels=ids).loss
    fired = []
    for name in ("wqkv", "w_gate_up", "w_down"):
        module = getattr(model.layers[0].attn if name == "wqkv" else model.layers[0].mlp, name)
        module.register_forward_hook(lambda mod, inp, out, n=name: (fired.append(n), out * 1.5)[1])
    hooked = model(ids, labels=ids).loss
    assert sorted(fired) == ["w_down", "w_gate_up", "wqkv"]
    try:
        fused.ENABLED = False
        plain = model(ids, labels=ids).loss
    finally:
        fused.ENABLED = True
    assert not torch.allclose(hooked, base)
    torch.testing.assert_close(hooked, plain)


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_autocast_runs_like_the_plain_composition(model_type):
    """fp32 weights under bf16 autocast: the fused functions step aside (autocast casts per op)
    and a bf16 branch output is promoted into the fp32 residual stream, as `x + a` does."""
    import ligerzoo

    extra = dict(num_local_experts=4, num_experts_per_tok=2) if model_type == "mixtral" else {}
    cfg = ModelConfig(model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, **extra)
    torch.manual_seed(0)
    model = ligerzoo.CausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8))
    losses = []
    for enabled in (True, False):
        fused.ENABLED = enabled
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses.append(model(ids, labels=ids).loss)
        finally:
            fused.ENABLED = True
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1])


def test_rope_qkv_backward_inplace_matches_and_reuses_the_gradient_buffer(monkeypatch):
    """With ``backward_inplace`` (what the model's attention passes) the gradient equals the
    out-of-place one, and the backward rotates the incoming buffer instead of allocating."""
    torch.manual_seed(3)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    base = torch.randn(2, 5, 4 * 8 + 2 * 2 * 8)
    g = torch.randn(2, 5, 4 * 8 + 2 * 2 * 8)
    grads, out_of_place = [], []
    real = fused.ops.rope_qkv
    monkeypatch.setattr(fused.ops, "rope_qkv", lambda *a: (out_of_place.append(1), real(*a))[1], raising=False)
    for backward_inplace in (False, True):
        leaf = base.clone().requires_grad_()
        q, k, v = fused.rope_qkv_(leaf * 1, cos, sin, 4, 2, backward_inplace=backward_inplace)
        torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1).backward(g)
        grads.append(leaf.grad)
    assert out_of_place == [1]  # only the default backward allocated a new buffer
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_rope_qkv_matches_out_of_place_rope():
    torch.manual_seed(2)
    B, T, nh, nkv, hd = 2, 6, 4, 2, 8
    cfg = ModelConfig(vocab_size=10, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd)
    inv, scale = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), inv, scale)
    qkv0 = torch.randn(B, T, (nh + 2 * nkv) * hd, dtype=torch.float64)
    qkv_leaf = qkv0.float().requires_grad_()
    q, k, v = fused.rope_qkv_(qkv_leaf * 1, cos, sin, nh, nkv)
    out = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)
    (dq,) = _grads(out, [qkv_leaf])

    def rot(x):  # HF half-split rotation in float64
        x1, x2 = x.chunk(2, -1)
        return x * cos[:, :, None].double() + torch.cat([-x2, x1], -1) * sin[:, :, None].double()

    x64 = qkv0.clone().requires_grad_()
    q64, k64, v64 = x64.split([nh * hd, nkv * hd, nkv * hd], -1)
    out64 = torch.cat([rot(q64.view(B, T, nh, hd)).flatten(2), rot(k64.view(B, T, nkv, hd)).flatten(2), v64], -1)
    (dq64,) = _grads(out64, [x64])
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dq.double(), dq64, atol=1e-5, rtol=1e-5)


def _tiny_model():
    """A 2-layer GQA Llama (H 32, 4/2 heads of 8, I 48, V 64) and a (2, 8) batch of ids."""
    import ligerzoo

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    return ligerzoo.CausalLM(cfg), torch.randint(0, 64, (2, 8))


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves while running fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_block_saves_fewer_activations_than_the_plain_composition(monkeypatch):
    """A Llama block at B*T = 64 tokens, H = 64, nh = 4, nkv = 2, I = 128 (fp32): the fused block
    keeps x, x + a, qkv, the attention output and gate_up (plus rstd, lse and weights); the plain
    composition also keeps both normalised inputs, rotated q and k, and act(gate) * up."""
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    block = Block(cfg, 0)
    B, T, H = 2, 32, 64
    inv, scale = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), inv, scale, half_table=True)  # the model's layout
    x = torch.randn(B, T, H, requires_grad=True)
    masks = {"full_attention": None}
    fused_bytes = _saved_bytes(lambda: block(x, cos, sin, masks))
    monkeypatch.setattr(fused, "ENABLED", False)  # the plain composition, still on our kernels
    plain_bytes = _saved_bytes(lambda: block(x, cos, sin, masks))
    per_token = 4 * B * T  # bytes of one fp32 feature over all tokens
    # normalised inputs (2 H) + rotated q, k ((nh + nkv) hd = 96) + act output (I = 128)
    assert plain_bytes - fused_bytes >= per_token * (2 * H + 96 + 128)


def test_compiled_model_matches_eager():
    """torch.compile(fullgraph=True) traces the fused blocks (custom autograd functions over
    torch.library ops, one of them mutating its input) and gives eager's loss and gradients."""
    model, ids = _tiny_model()
    loss = model(ids, labels=ids).loss
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    loss_c = compiled(ids, labels=ids).loss
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():  # no autograd nodes: the in-place RoPE runs as the bare op
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled(ids, labels=ids).loss, loss, atol=1e-6, rtol=1e-6)


def test_compiled_model_takes_new_sequence_lengths():
    """A second sequence length makes torch.compile trace T as a symbol; the attention's
    causal flag used to depend on T (``T > 1``), a SymBool that SDPA refuses, so fullgraph
    failed from the second length on. Loss and gradients equal eager's at each length."""
    model, _ = _tiny_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for T in (16, 12, 9):
        ids = torch.randint(0, 64, (2, T))
        grads = []
        for m in (model, compiled):
            model.zero_grad()
            loss = m(ids, labels=ids).loss
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-6)
        for n in grads[0][1]:
            torch.testing.assert_close(grads[1][1][n], grads[0][1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_compiled_model_masks_packed_documents_as_eager():
    """Under torch.compile the document mask is built whenever position_ids are given (no
    data-dependent branch); packed and unpacked rows give eager's loss and gradients."""
    model, _ = _tiny_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 12))
    for pos in (torch.arange(12).expand(2, 12), torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)):
        grads = []
        for m in (model, compiled):
            model.zero_grad()
            loss = m(ids, labels=ids, position_ids=pos).loss
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-6)
        for n in grads[0][1]:
            torch.testing.assert_close(grads[1][1][n], grads[0][1][n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual,softcap", [(True, None), (False, 3.0)])
def test_norm_linear_cross_entropy_matches_float64(dtype, residual, softcap):
    """Final norm + LM head + summed CE, with 1/3 of the targets ignored, against float64."""
    torch.manual_seed(5)
    H, V, N = 40, 75, 18
    norm = RMSNorm(H, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    w = (torch.randn(V, H) * 0.3).to(dtype).requires_grad_()
    x = torch.randn(2, N // 2, H, dtype=dtype, requires_grad=True)
    r = torch.randn(2, N // 2, H, dtype=dtype, requires_grad=True) if residual else None
    target = torch.randint(0, V, (2, N // 2))
    target[:, ::3] = -100
    loss = fused.norm_linear_cross_entropy(x, r, norm, w, target, -100, softcap)
    leaves = [x] + ([r] if residual else []) + [norm.weight, w]
    got = torch.autograd.grad(loss * 0.5, leaves)  # a non-unit incoming gradient

    l64 = [t.detach().double().requires_grad_() for t in leaves]
    s64 = l64[0] + l64[1] if residual else l64[0]
    logits = F.linear(_rms(s64, l64[-2], 1e-5, 0.0), l64[-1])
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss64 = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="sum")
    want = torch.autograd.grad(loss64 * 0.5, l64)
    torch.testing.assert_close(loss.double(), loss64, **TOL[dtype])
    for a, b in zip(got, want):
        scale = b.abs().max().clamp(min=1)
        torch.testing.assert_close(a.double() / scale, b / scale, **TOL[dtype])


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("scale", [1 / 7, "tensor", "tensor_1"])
def test_norm_linear_cross_entropy_scale_matches_float64(scale, enabled, monkeypatch):
    """``scale`` (float, 0-d or one-element tensor) multiplies the loss and every gradient, with
    a further incoming gradient of 0.5, against float64, fused and in the plain composition
    (0-d fp32 loss either way); a tensor of more elements is refused."""
    monkeypatch.setattr(fused, "ENABLED", enabled)
    torch.manual_seed(7)
    H, V = 40, 75
    norm = RMSNorm(H, 1e-5)
    w = (torch.randn(V, H) * 0.3).requires_grad_()
    x, r = (torch.randn(2, 9, H, requires_grad=True) for _ in range(2))
    target = torch.randint(0, V, (2, 9))
    target[:, ::4] = -100
    s = {"tensor": torch.tensor(1 / 7, dtype=torch.float64), "tensor_1": torch.tensor([1 / 7])}.get(scale, scale)
    loss = fused.norm_linear_cross_entropy(x, r, norm, w, target, -100, None, scale=s)
    assert loss.shape == () and loss.dtype == torch.float32
    with pytest.raises(ValueError, match="one-element"):
        fused.norm_linear_cross_entropy(x, r, norm, w, target, -100, None, scale=torch.ones(3))
    leaves = [x, r, norm.weight, w]
    got = torch.autograd.grad(loss * 0.5, leaves)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    logits = F.linear(_rms(l64[0] + l64[1], l64[2], 1e-5, 0.0), l64[3])
    loss64 = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="sum") / 7
    want = torch.autograd.grad(loss64 * 0.5, l64)
    torch.testing.assert_close(loss.double(), loss64, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-6, rtol=1e-5)


def test_the_models_loss_backward_rescales_nothing(monkeypatch):
    """The model divides its summed loss by the target count inside the fused loss (its
    ``scale``), so a plain ``loss.backward()`` hands the precomputed gradients a factor of
    exactly 1 (a kernel that returns at once) instead of 1 / count (a pass over dx and dW)."""
    factors = []
    real = fused.scale_saved_grad
    monkeypatch.setattr(fused, "scale_saved_grad",
                        lambda g, go, per_row: factors.append(float(go)) or real(g, go, per_row))
    model, ids = _tiny_model()
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    out.loss.backward()
    assert factors and all(f == 1.0 for f in factors), factors
    with torch.no_grad():  # the value: the mean over the 10 counted targets, from the logits
        logits = model(ids).logits
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    assert int((targets != -100).sum()) == 10
    want = F.cross_entropy(logits.reshape(-1, 64).double(), targets.reshape(-1), reduction="sum") / 10
    torch.testing.assert_close(out.loss.double(), want, atol=1e-5, rtol=1e-5)


def test_a_float64_models_loss_keeps_float64_precision():
    """float64 (the plain composition): the 1 / count the loss is scaled by is taken in float64,
    so the loss equals the float64 mean over the counted targets to float64 rounding."""
    model, ids = _tiny_model()
    model = model.double()
    labels = ids.clone()
    labels[0, :2] = -100
    loss = model(ids, labels=labels).loss
    with torch.no_grad():
        logits = model(ids).logits
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    want = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), reduction="sum") / (targets != -100).sum()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, atol=0, rtol=1e-14)


def test_norm_linear_cross_entropy_keeps_one_buffer_and_leaves_a_frozen_head_alone():
    torch.manual_seed(6)
    H, V = 64, 96
    norm, w = RMSNorm(H), torch.randn(V, H) * 0.1  # frozen head: no gradient asked for it
    x = torch.randn(4, 16, H, requires_grad=True)
    r = torch.randn(4, 16, H, requires_grad=True)
    target = torch.randint(0, V, (4, 16))
    fused_bytes = _saved_bytes(lambda: fused.norm_linear_cross_entropy(x, r, norm, w, target))
    (gx,) = torch.autograd.grad(fused.norm_linear_cross_entropy(x, r, norm, w, target), [x])
    fused.ENABLED = False
    try:
        plain_bytes = _saved_bytes(lambda: fused.norm_linear_cross_entropy(x, r, norm, w, target))
        (gx_plain,) = torch.autograd.grad(fused.norm_linear_cross_entropy(x, r, norm, w, target), [x])
    finally:
        fused.ENABLED = True
    torch.testing.assert_close(gx, gx_plain, atol=1e-5, rtol=1e-5)
    one = 4 * 4 * 16 * H  # one fp32 (B, T, H) tensor
    assert fused_bytes <= one + 4 * H + 64  # d(x + r) and the norm weight's gradient
    assert plain_bytes >= 2 * one  # the plain composition keeps the norm input and d(normed)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_down_without_recompute_inplace_matches_float64(activation):
    """The checkpointed blocks' path (``recompute=False``, ``inplace=True``): plain down
    projection, and the activation's backward writes d(gate_up) over the saved gate_up."""
    torch.manual_seed(5)
    inter, H = 40, 16
    down = nn.Linear(inter, H, bias=False)
    gu = torch.randn(3, 5, 2 * inter) * 2
    leaf = gu.clone().requires_grad_()
    owned = leaf * 1
    y = fused.gated_down(owned, down, activation, recompute=False, inplace=True)
    got = _grads(y, [leaf, down.weight])
    assert not torch.equal(owned, gu)  # the buffer now holds its gradient

    gu64 = gu.double().requires_grad_()
    w64 = down.weight.detach().double().requires_grad_()
    g, u = gu64.chunk(2, -1)
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    want = _grads(F.linear(act * u, w64), [gu64, w64])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL[torch.float32])


def test_embedding_output_is_recomputed_not_saved(monkeypatch):
    """The first block saves the embedding output as ids + table (one (B, T, H) tensor less
    from the forward to the end of the backward); the gradients are those of saving it."""
    from ligerzoo.models import transformer

    model, ids = _tiny_model()
    replaced, recomputed = [], []
    real_pack, real_unpack = transformer._RecomputedEmbedding._pack, transformer._RecomputedEmbedding._unpack

    def pack(self, t):
        out = real_pack(self, t)
        replaced.append(out[0] is not t)
        return out

    def unpack(self, p):
        recomputed.append(p[0] is self)
        return real_unpack(self, p)

    monkeypatch.setattr(transformer._RecomputedEmbedding, "_pack", pack)
    monkeypatch.setattr(transformer._RecomputedEmbedding, "_unpack", unpack)
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert sum(replaced) == 1 and sum(recomputed) == 1

    model.zero_grad()
    import contextlib

    monkeypatch.setattr(transformer._RecomputedEmbedding, "hooks", lambda self: contextlib.nullcontext())
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_embedding_recompute_refuses_a_table_changed_in_place():
    model, ids = _tiny_model()
    loss = model(ids, labels=ids).loss
    with torch.no_grad():
        model.embed.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="embedding table was modified in place"):
        loss.backward()


def test_embedding_output_is_freed_after_the_first_block():
    """Nothing keeps the embedding output alive once the first block has run (the recipe
    saved in its place does not reference it)."""
    import weakref

    from ligerzoo.models import transformer

    model, ids = _tiny_model()
    refs = []
    real = transformer.CausalLM._embed

    def embed(self, input_ids):
        x = real(self, input_ids)
        refs.append(weakref.ref(x))
        return x

    transformer.CausalLM._embed, saved = embed, transformer.CausalLM._embed
    try:
        loss = model(ids, labels=ids).loss
    finally:
        transformer.CausalLM._embed = saved
    assert refs[0]() is None  # freed before the backward
    loss.backward()


def test_embedding_recipe_keeps_autograds_checks_and_stands_aside():
    """Inside the first block's recipe hooks, tensors modified in place between the forward
    and the backward still raise (as autograd's own version check does); reused ids do not
    change the recomputed embedding; a hooked embedding (e.g. noise added by a forward hook)
    or the caller's own saved-tensor hooks turn the recipe off."""
    model, ids = _tiny_model()
    loss = model(ids, labels=ids).loss
    with torch.no_grad():
        model.layers[0].attn.wqkv.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    model, ids = _tiny_model()
    model.embed.weight.requires_grad_(False)
    reference = {n: g for n, g in zip(*_param_grads(model, ids.clone()))}
    buf = ids.clone()
    loss = model(buf, labels=ids).loss
    buf.copy_(torch.randint(0, 64, ids.shape))  # a reused input buffer
    model.zero_grad()
    loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, reference[n]), n

    from ligerzoo.models import transformer

    model, ids = _tiny_model()
    assert transformer._RecomputedEmbedding.applies(model)
    handle = model.embed.register_forward_hook(lambda m, i, o: o * 1.5)
    assert not transformer._RecomputedEmbedding.applies(model)
    handle.remove()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not transformer._RecomputedEmbedding.applies(model)


def _param_grads(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    return names, [p.grad.clone() for n, p in model.named_parameters() if p.grad is not None]


def test_second_backward_through_the_first_block_raises():
    """A retain_graph second backward through the first block (whose saved tensors pass
    through the recipe hooks) raises, because its MLP backward consumed its saved gate_up;
    it never returns gradients computed from an overwritten buffer."""
    import ligerzoo

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model, ids = ligerzoo.CausalLM(cfg), torch.randint(0, 64, (2, 8))
    loss = F.cross_entropy(model(ids).logits.flatten(0, 1).float(), ids.flatten())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
