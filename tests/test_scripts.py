"""The scripts refuse bad arguments up front, before any model or corpus work."""
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in a script look their module up
    spec.loader.exec_module(module)
    return module


def _refused(main, argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_never_replaces_a_non_empty_out_unasked(tmp_path, capsys):
    demo = _load("demo")
    (tmp_path / "important.txt").write_text("keep")
    _refused(demo.main, ["--out", str(tmp_path)], capsys, "pass --overwrite")
    assert (tmp_path / "important.txt").read_text() == "keep"
    _refused(demo.main, ["--steps", "0"], capsys, "--steps must be at least 1")
    _refused(demo.main, ["--seq-len", "1"], capsys, "--seq-len must be at least 2")
    for lr in ("-1", "nan", "0"):  # 0 cannot lower the held-out loss, which the demo checks
        _refused(demo.main, ["--lr", lr], capsys, "--lr must be a finite number > 0")


def test_demo_sh_reads_out_relative_to_the_callers_directory(tmp_path):
    """scripts/demo.sh run from another directory: a relative --out names a directory there
    (here a non-empty one, refused), not under the repository."""
    import subprocess

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("keep")
    r = subprocess.run(["bash", str(SCRIPTS / "demo.sh"), "--out", "ckpt", "--device", "tpu"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and f"{tmp_path / 'ckpt'} exists and is not empty" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("argv,message", [
    (["--families", "foo"], "unknown families ['foo']"),
    (["--dtypes", "fp16"], "unsupported dtypes ['fp16']"),
    (["--families", "mixtral", "--dtypes", "bfloat16"], "nothing to run"),
    (["--steps", "0", "--device", "cpu"], "--steps must be at least 1"),
])
def test_convergence_arguments(argv, message, capsys):
    _refused(_load("convergence").main, argv, capsys, message)


def test_every_script_has_help(capsys):
    for path in sorted(SCRIPTS.glob("*.py")):
        module = _load(path.stem)
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0, path.name
        assert "usage" in capsys.readouterr().out, path.name


def test_demo_refuses_bad_out_and_device_up_front(tmp_path, capsys):
    """--out and --device problems are argparse errors before any work, not failures after
    the fine-tune (save_hf's own checks, through ligerzoo.hub.check_save_target)."""
    demo = _load("demo")
    (tmp_path / "notes.txt").write_text("keep")
    _refused(demo.main, ["--out", str(tmp_path), "--overwrite"], capsys, "holds more than a checkpoint")
    _refused(demo.main, ["--out", str(tmp_path / "notes.txt")], capsys, "is a file")
    _refused(demo.main, ["--out", str(tmp_path / "notes.txt" / "sub")], capsys, "is a file")
    _refused(demo.main, ["--device", "tpu"], capsys, "--device")
    import torch

    if not torch.cuda.is_available():
        _refused(demo.main, ["--device", "cuda"], capsys, "no CUDA GPU")
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_prepare_refuses_a_directory_holding_another_model(tmp_path):
    """A complete checkpoint of another model at the output path is refused by name, never
    returned as the requested model."""
    from scripts.prepare_models import _REQUIRED, is_prepared, prepare_qwen2_coder, prepare_smollm2

    smol = prepare_smollm2()
    other = tmp_path / "smol"
    other.mkdir()
    for name in _REQUIRED:
        (other / name).write_bytes((smol / name).read_bytes())
    (other / "model.safetensors").symlink_to(smol / "model.safetensors")
    assert is_prepared(other) and is_prepared(other, "LlamaForCausalLM")
    assert not is_prepared(other, "Qwen2ForCausalLM")
    assert prepare_smollm2(other) == other
    with pytest.raises(FileExistsError, match=r"holds another model \(\[.LlamaForCausalLM.\]\)"):
        prepare_qwen2_coder(other)


def test_model_flops_counts_sliding_windows_and_documents():
    """bench_e2e's model FLOPs: 6 x linear weights per token + 3 x the causal attention forward
    (4 q FLOPs per (query, key) pair, half the square), within each document, and within each
    layer's sliding window (a hand count)."""
    from types import SimpleNamespace

    import torch

    flops = _load("bench_e2e").model_flops
    H, L, V, I, nh, nkv, hd = 64, 4, 100, 96, 4, 2, 16
    q = nh * hd
    linear = L * (H * (q + 2 * nkv * hd) + q * H + 3 * H * I) + V * H
    base = dict(hidden_size=H, num_hidden_layers=L, vocab_size=V, intermediate_size=I,
                num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd)
    B, T, W = 2, 10, 4
    full = SimpleNamespace(**base)
    assert flops(full, B, T) == 6 * linear * B * T + 3 * 4 * q * L * B * T * T / 2
    # Gemma2's layout: every other layer slides over W = 4 keys: W^2/2 + (T - W) W pairs
    gemma2 = SimpleNamespace(**base, sliding_window=W,
                             layer_types=["sliding_attention", "full_attention"] * (L // 2))
    pairs = L // 2 * (T * T / 2) + L // 2 * (W * W / 2 + (T - W) * W)
    assert flops(gemma2, B, T) == 6 * linear * B * T + 3 * 4 * q * B * pairs
    # no layer_types: the window on every layer, unless use_sliding_window is False (Qwen2)
    assert flops(SimpleNamespace(**base, sliding_window=W), B, T) == \
        6 * linear * B * T + 3 * 4 * q * B * L * (W * W / 2 + (T - W) * W)
    assert flops(SimpleNamespace(**base, sliding_window=W, use_sliding_window=False), B, T) == flops(full, B, T)
    assert flops(SimpleNamespace(**base, sliding_window=T), B, T) == flops(full, B, T)  # a window past T
    # Qwen2 on transformers 4.x: the window only from layer max_window_layers on
    qwen2 = SimpleNamespace(**base, sliding_window=W, use_sliding_window=True, max_window_layers=3)
    assert flops(qwen2, B, T) == 6 * linear * B * T + 3 * 4 * q * B * (3 * T * T / 2 + (W * W / 2 + (T - W) * W))
    # packed documents of 3 and 7 tokens in one row, 10 in the other
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6], list(range(10))])
    assert flops(full, B, T, pos) == 6 * linear * B * T + 3 * 4 * q * L * (9 + 49 + 100) / 2


def test_bench_kernels_hands_in_place_ops_activations():
    """bench_kernels' rope, GLU and cross-entropy rows hand every variant its inputs as an
    upstream op's output (``_Upstream``: the leaf's memory, no leaf): ours with
    ``inplace=True`` then writes over them, as Liger's kernels do, and the leaf gets no
    gradient. Checked on the values against float64 torch."""
    import torch
    import torch.nn.functional as F

    from ligerzoo import kernels as K

    bk = _load("bench_kernels")
    assert bk.UPSTREAM == {"rope", "swiglu", "geglu", "cross_entropy"}
    torch.manual_seed(0)
    # cross entropy: the gradient lands in the logits' memory
    z, t = torch.randn(3, 37, requires_grad=True), torch.tensor([1, 5, 36])
    z0 = z.detach().clone().double().requires_grad_()
    bk._after_upstream(lambda z: K.cross_entropy(z, t, inplace=True))(z).backward()
    F.cross_entropy(z0, t).backward()
    assert z.grad is None
    torch.testing.assert_close(z.detach().double(), z0.grad, rtol=1e-5, atol=1e-7)
    # rope: q and k rotated over themselves
    q, k = torch.randn(1, 5, 4, 8, requires_grad=True), torch.randn(1, 5, 2, 8, requires_grad=True)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).double() / 8)
    cos, sin = K.rope_cos_sin(torch.arange(5)[None], inv.float(), half_table=True)
    q0, k0 = q.detach().double(), k.detach().double()
    ang = torch.arange(5).double()[:, None] * inv  # (T, D/2)
    c, s = torch.cat([ang.cos()] * 2, -1)[None, :, None], torch.cat([ang.sin()] * 2, -1)[None, :, None]

    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return x * c + torch.cat([-x2, x1], -1) * s
    ref_q, ref_k = rot(q0), rot(k0)
    oq, ok = bk._after_upstream(lambda q, k: K.rope(q, k, cos, sin, inplace=True, half_table=True))(q, k)
    assert oq.data_ptr() == q.data_ptr() and ok.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q.detach().double(), ref_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.detach().double(), ref_k, rtol=1e-5, atol=1e-6)
    # swiglu: the backward writes d(gate), d(up) over gate and up
    g, u = torch.randn(4, 19, requires_grad=True), torch.randn(4, 19, requires_grad=True)
    g0, u0 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    y = bk._after_upstream(lambda g, u: K.swiglu(g, u, inplace=True))(g, u)
    dy = torch.randn(4, 19)
    y.backward(dy)
    (F.silu(g0) * u0).backward(dy.double())
    assert g.grad is None and u.grad is None
    torch.testing.assert_close(g.detach().double(), g0.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u.detach().double(), u0.grad, rtol=1e-5, atol=1e-6)


def test_bench_kernels_specs_on_another_device():
    """op_specs(device=...) makes the inputs there (the CPU host-overhead probe's use), and its
    variants compute the op: rms_norm at 3 tokens, ours and the torch variant against float64."""
    import torch

    bk = _load("bench_kernels")
    (x, w), variants = bk.op_specs(torch.float32, device="cpu")["rms_norm"][1](3)
    assert x.device.type == "cpu" and x.shape == (3, 4096) and w.shape == (4096,)
    x64, w64 = x.detach().double(), w.detach().double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    for v in ("ligerzoo", "torch"):
        torch.testing.assert_close(variants[v](x, w).detach().double(), want, rtol=1e-5, atol=1e-5)
