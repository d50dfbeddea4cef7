"""The Mixtral MoE layer: its grouped-GEMM path (``torch._grouped_mm``, which has a CPU
implementation) and its loop path, forward and every gradient, at float32 and bf16, against
a dense float64 reference and against transformers' ``MixtralSparseMoeBlock``; odd token
counts and an expert that receives no token; the device-side grouping and the custom
autograd pieces (gradcheck); the path selection.
"""
import pytest
import torch
import torch.nn.functional as F

import ligerzoo
from ligerzoo.models.config import ModelConfig
from ligerzoo.models.moe import (MoE, _Combine, _Dispatch, experts_grouped, experts_loop, load_balancing_loss,
                                 grouped_mm_fast_path_ok, sort_by_expert)

H, I, E, K = 64, 128, 4, 2  # bf16 rows of 64 / 128 / 256 elements: 16-byte aligned for _grouped_mm

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm (added in torch 2.8): the grouped path cannot run; the expert-loop path keeps its unmarked tests")


def _config(**kw) -> ModelConfig:
    return ModelConfig(model_type="mixtral", hidden_size=H, intermediate_size=I, num_attention_heads=4,
                       num_local_experts=E, num_experts_per_tok=K, **kw)


def _params(seed=0, skip_last_expert=False):
    """float32 router (E, H), gate_up (E, 2I, H), down (E, H, I) and a matching input maker."""
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(E, H, generator=g) * 0.3
    if skip_last_expert:  # feature 0 is a constant 4 in the input: experts < E-1 get +4, the last -4
        router[:, 0] = 1.0
        router[-1, 0] = -1.0
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w_down = torch.randn(E, H, I, generator=g) * I ** -0.5
    return router, w_gate_up, w_down


def _input(B, T, seed=1, skip_last_expert=False):
    x = torch.randn(B, T, H, generator=torch.Generator().manual_seed(seed))
    if skip_last_expert:
        x[..., 0] = 4.0
    return x


def _ours(params, dtype, impl):
    m = MoE(_config()).to(dtype)
    m.impl = impl
    with torch.no_grad():
        for p, v in zip((m.router.weight, m.w_gate_up, m.w_down), params):
            p.copy_(v)
    return m


def _run_ours(m, x, dy):
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(dy)
    return y.detach(), {"x": x.grad, "router": m.router.weight.grad, "w_gate_up": m.w_gate_up.grad,
                        "w_down": m.w_down.grad}


def _reference(params, x, dy, experts=None):
    """Dense float64 Mixtral MoE (every expert on every token, then the top-k picked):
    HF's math with no grouping at all. ``experts`` (N, k) fixes the routing choice (so that
    a bf16 run and the reference agree on near-ties); the weights are still computed here."""
    router, w_gate_up, w_down = (p.double().requires_grad_() for p in params)
    xr = x.double().requires_grad_()
    xf = xr.reshape(-1, H)  # (N, H)
    probs = torch.softmax(xf @ router.T, dim=-1)  # (N, E)
    if experts is None:
        experts = torch.topk(probs, K, dim=-1).indices
    w = probs.gather(1, experts)  # (N, k)
    w = w / w.sum(-1, keepdim=True)
    gate, up = torch.einsum("nh,eoh->neo", xf, w_gate_up).chunk(2, dim=-1)  # (N, E, I) each
    o = torch.einsum("nei,ehi->neh", F.silu(gate) * up, w_down)  # (N, E, H)
    sel = o.gather(1, experts[..., None].expand(-1, -1, H))  # (N, k, H)
    y = (sel * w[..., None]).sum(1).view_as(x)
    y.backward(dy.double())
    return y.detach(), {"x": xr.grad, "router": router.grad, "w_gate_up": w_gate_up.grad, "w_down": w_down.grad}


def _routing(m, x):
    """The experts ``m`` picks for ``x`` (N, k), as its forward computes them."""
    with torch.no_grad():
        logits = m.router(x.reshape(-1, H).to(m.router.weight.dtype))
        return torch.topk(torch.softmax(logits.float(), -1), K, dim=-1).indices


def _close(got, ref, dtype, what):
    got, ref = got.double(), ref.double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")
    else:  # bf16 everywhere (inputs, weights, GEMMs, activation): errors ~ a few 2^-8 of the scale
        err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
        assert err <= 3e-2 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("shape,skip_last", [((1, 13), False), ((3, 7), False), ((2, 9), True), ((1, 1), False)])
def test_mixtral_moe_matches_float64_reference(dtype, impl, shape, skip_last):
    params = _params(skip_last_expert=skip_last)
    x = _input(*shape, skip_last_expert=skip_last)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    m = _ours([p.to(dtype) for p in params], dtype, impl)
    y, grads = _run_ours(m, x.to(dtype), dy.to(dtype))
    experts = _routing(m, x.to(dtype))
    # Reference on the same rounded inputs and weights, the same routing choice.
    y_ref, ref = _reference([p.to(dtype) for p in params], x.to(dtype), dy.to(dtype), experts)
    if dtype == torch.float32:
        assert torch.equal(experts, torch.topk((x.reshape(-1, H).double() @ params[0].double().T), K).indices)
    assert y.dtype == dtype and y.shape == x.shape
    _close(y, y_ref, dtype, "y")
    for name in ref:
        assert grads[name].dtype == dtype
        _close(grads[name], ref[name], dtype, name)
    if skip_last:
        assert not (experts == E - 1).any()
        assert not grads["w_gate_up"][-1].any() and not grads["w_down"][-1].any()  # exactly zero


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skip_last", [False, True])
def test_mixtral_moe_grouped_equals_loop(dtype, skip_last):
    """On the CPU both paths run the same per-group matmuls: same bits."""
    params = _params(seed=3, skip_last_expert=skip_last)
    x = _input(2, 11, seed=4, skip_last_expert=skip_last).to(dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    y_g, g_g = _run_ours(_ours(params, dtype, "grouped"), x, dy)
    y_l, g_l = _run_ours(_ours(params, dtype, "loop"), x, dy)
    torch.testing.assert_close(y_g, y_l, atol=0, rtol=0)
    for name in g_g:
        torch.testing.assert_close(g_g[name], g_l[name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def _hf_block(params, dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                        router_jitter_noise=0.0, hidden_act="silu")
    cfg._experts_implementation = "eager"  # HF's own per-expert loop, the reference math
    block = MixtralSparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        for p, v in zip((block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj), params):
            p.copy_(v)
    return block


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("skip_last", [False, True])
def test_mixtral_moe_matches_transformers_block(dtype, impl, skip_last):
    params = _params(seed=6, skip_last_expert=skip_last)
    x = _input(3, 5, seed=7, skip_last_expert=skip_last).to(dtype)  # 15 tokens
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    y, grads = _run_ours(_ours(params, dtype, impl), x, dy)

    hf = _hf_block(params, dtype)
    xh = x.clone().requires_grad_()
    y_hf = hf(xh)
    y_hf.backward(dy)
    ref = {"x": xh.grad, "router": hf.gate.weight.grad, "w_gate_up": hf.experts.gate_up_proj.grad,
           "w_down": hf.experts.down_proj.grad}
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_hf, atol=2e-6, rtol=1e-5)
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    else:  # HF rounds silu(gate) and the product separately; ours rounds once: ~1 bf16 ulp apart
        _close(y, y_hf, dtype, "y")
        for name in ref:
            _close(grads[name], ref[name], dtype, name)
    if skip_last:
        assert not grads["w_gate_up"][-1].any() and not grads["w_down"][-1].any()


@needs_grouped_mm
def test_mixtral_moe_causal_lm_grouped_matches_transformers(tmp_path):
    """The whole tiny Mixtral model with every MoE layer forced onto the grouped path."""
    from tests.models.test_families import _fused_expert_grads_match, _grads_match, make_hf

    hf = make_hf("mixtral", tmp_path / "hf")
    ours = ligerzoo.from_hf(tmp_path / "hf")
    for layer in ours.layers:
        layer.mlp.impl = "grouped"
    ids = torch.randint(3, 151, (2, 13))
    ref = hf(input_ids=ids, labels=ids)
    ref.loss.backward()
    out = ours(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-5)
    _fused_expert_grads_match(hf, ours)
    assert _grads_match(hf, ours) > 0


def test_mixtral_moe_sort_by_expert():
    experts = torch.tensor([[2, 0], [0, 2], [3, 2], [2, 0], [0, 3]])  # (N=5, k=2); expert 1 gets nothing
    order, token, inv, offs = sort_by_expert(experts, 5)
    flat = experts.reshape(-1)
    assert offs.dtype == torch.int32
    assert offs.tolist() == torch.bincount(flat, minlength=5).cumsum(0).tolist() == [4, 4, 8, 10, 10]
    assert torch.equal(flat[order], flat.sort(stable=True).values)
    assert torch.equal(order[inv], torch.arange(10)) and torch.equal(inv[order], torch.arange(10))
    assert torch.equal(token, order // 2)
    assert token[:4].tolist() == [0, 1, 3, 4]  # stable: token order kept inside a group


def test_mixtral_moe_dispatch_and_combine_gradcheck():
    N, k, h = 5, 2, 3
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(N)])
    _, token, inv, _ = sort_by_expert(experts, 4)
    x = torch.randn(N, h, dtype=torch.float64, generator=g, requires_grad=True)
    torch.autograd.gradcheck(lambda x: _Dispatch.apply(x, token, inv, k), (x,))
    out = torch.randn(N * k, h, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(N * k, dtype=torch.float64, generator=g, requires_grad=True)
    torch.autograd.gradcheck(lambda o, w: _Combine.apply(o, w, token, inv, k, (N, h)), (out, w))
    # Combine is the weighted adjoint of dispatch: y[n] = sum over the rows of token n.
    y = _Combine.apply(out, w, token, inv, k, (N, h))
    ref = torch.zeros(N, h, dtype=torch.float64).index_add_(0, token, out * w[:, None])
    torch.testing.assert_close(y, ref)


def test_mixtral_moe_combine_rounds_like_transformers():
    """bf16 rows times fp32 weights: product rounded to bf16 once, then the per-token sum."""
    N, k, h = 6, 2, 32
    g = torch.Generator().manual_seed(1)
    experts = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(N)])
    _, token, inv, _ = sort_by_expert(experts, 4)
    out = torch.randn(N * k, h, generator=g).bfloat16()
    w = torch.rand(N * k, generator=g)
    y = _Combine.apply(out, w, token, inv, k, (N, h))
    ref = torch.zeros(N, h, dtype=torch.bfloat16)
    for s in range(N * k):  # HF: (bf16 * fp32).to(bf16), then index_add_ in bf16
        ref.index_add_(0, token[s:s + 1], (out[s:s + 1] * w[s]).to(torch.bfloat16))
    assert torch.equal(y, ref)


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixtral_moe_experts_functions_agree(dtype):
    g = torch.Generator().manual_seed(9)
    offs = torch.tensor([3, 3, 10, 11], dtype=torch.int32)  # expert 1 empty, expert 3 one row
    xs = torch.randn(11, H, generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * 0.1).to(dtype)
    a = experts_grouped(xs, w1, w2, offs, "silu")
    b = experts_loop(xs, w1, w2, offs, "silu")
    assert a.shape == (11, H) and torch.equal(a, b)


def test_mixtral_moe_path_selection():
    w = torch.empty(E, 2 * I, H, dtype=torch.bfloat16)
    assert grouped_mm_fast_path_ok(w.transpose(-2, -1), torch.empty(E, H, I, dtype=torch.bfloat16).mT)
    assert grouped_mm_fast_path_ok(torch.empty(10, H, dtype=torch.bfloat16))
    assert not grouped_mm_fast_path_ok(w.float().transpose(-2, -1))  # the fast kernel is bf16 only
    assert not grouped_mm_fast_path_ok(torch.empty(E, 2 * I, 60, dtype=torch.bfloat16).mT)  # 120-byte rows
    assert not grouped_mm_fast_path_ok(torch.empty(E * 2 * I * H + 4, dtype=torch.bfloat16)[4:].view(E, 2 * I, H))
    assert not grouped_mm_fast_path_ok(w[..., ::2].transpose(-2, -1))  # no unit stride
    padded = torch.empty(E, 2 * I * H + 4, dtype=torch.bfloat16)[:, :2 * I * H].unflatten(1, (2 * I, H))
    assert not grouped_mm_fast_path_ok(padded.mT)  # expert matrices 8 bytes apart from 16-byte alignment
    assert grouped_mm_fast_path_ok(w[:, ::2].transpose(-2, -1))  # every other row: strides still fine
    m = MoE(_config()).bfloat16()
    x = torch.empty(3, H, dtype=torch.bfloat16)
    assert not m.use_grouped(x)  # auto: CUDA only
    m.impl = "grouped"
    assert m.use_grouped(x)
    m.impl = "loop"
    assert not m.use_grouped(x)
    m.impl = "fast"
    with pytest.raises(ValueError):
        m.use_grouped(x)


def test_mixtral_moe_float64_runs_loop_path():
    params = _params(seed=10)
    m = _ours(params, torch.float64, "auto")
    x = _input(1, 9, seed=11).double()
    dy = torch.randn(x.shape, dtype=torch.float64)
    y, grads = _run_ours(m, x, dy)
    y_ref, ref = _reference(params, x, dy)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-12, rtol=1e-10)


def test_mixtral_moe_forced_grouped_path_with_unaligned_sizes_says_why():
    from ligerzoo.models.config import ModelConfig
    from ligerzoo.models.moe import MoE

    cfg = ModelConfig(model_type="mixtral", hidden_size=17, intermediate_size=20, num_attention_heads=1, head_dim=8,
                      num_local_experts=4, num_experts_per_tok=2)
    m = MoE(cfg)
    m.impl = "grouped"
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        m(torch.randn(1, 3, 17))


def test_mixtral_model_can_be_deep_copied_after_a_training_forward():
    import copy

    import ligerzoo
    from ligerzoo.models.config import ModelConfig

    cfg = ModelConfig(model_type="mixtral", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                      output_router_logits=True)
    model = ligerzoo.CausalLM(cfg)
    ids = torch.randint(0, 32, (2, 5))
    model(ids, labels=ids).loss.backward()
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(ids, labels=ids).loss, model(ids, labels=ids).loss)


def test_mixtral_router_jitter_under_activation_checkpointing_gives_the_same_gradients():
    import ligerzoo
    from ligerzoo.models.config import ModelConfig
    from ligerzoo.parallel import apply_activation_checkpointing

    cfg = ModelConfig(model_type="mixtral", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=4,
                      router_jitter_noise=0.3)
    ids = torch.randint(0, 32, (2, 5))
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = ligerzoo.CausalLM(cfg)
        if checkpoint:
            apply_activation_checkpointing(model)
        torch.manual_seed(1)
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_mixtral_aux_loss_of_a_batch_without_tokens_is_zero():
    """An empty batch, or one whose every position is padding, has no routing to balance:
    aux loss 0 and a finite loss (HF's formula divides 0 by 0; it used to give nan here)."""
    import ligerzoo

    cfg = ModelConfig(model_type="mixtral", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                      output_router_logits=True, router_aux_loss_coef=0.02)
    model = ligerzoo.CausalLM(cfg)
    empty = torch.zeros(0, 5, dtype=torch.long)
    out = model(empty, labels=empty)
    assert out.aux_loss.item() == 0.0 and out.loss.item() == 0.0
    ids = torch.randint(0, 32, (2, 5))
    mask = torch.zeros_like(ids)
    mask[:, 0] = 1    # a query needs one visible key: padding everywhere but the first position
    logits = [torch.randn(10, 4)] * 2
    assert load_balancing_loss(logits, 4, 2, torch.zeros(2, 5)).item() == 0.0
    assert torch.isfinite(load_balancing_loss(logits, 4, 2, mask))
