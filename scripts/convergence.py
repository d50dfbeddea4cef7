"""Convergence of every family against transformers (GPU): the same tiny model (4 layers,
hidden 512, 8 heads / 2 KV heads, the SmolLM2 tokenizer's vocabulary) trained 30 AdamW
steps with ligerzoo and with transformers from the same weights on the same Shakespeare
batches. Reports the loss at every step, the final parameters and the top-20 log-probs on a
held-out batch, against the tolerances of Liger Kernel's convergence tests
(reference/kernels.md §3): bf16 loss (atol 1e-2, rtol 5e-2), log-probs (0.1, 1e-2), params
(1e-2, 1e-2); Mixtral and Gemma2 in fp32 (their bf16 runs are known to be flaky upstream).

Usage: python scripts/convergence.py [--families llama,gemma2] [--steps 30] [--out benchmarks]
Writes <out>/convergence.csv (family, dtype, step, loss_ligerzoo, loss_transformers).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ligerzoo  # noqa: E402
from ligerzoo.data import load_text_corpus, token_batches, tokenize  # noqa: E402
from ligerzoo.hub import load_hf_state_dict  # noqa: E402
from scripts.prepare_models import prepare_smollm2  # noqa: E402

MINI = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=64)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                             output_router_logits=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=64)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=64, sliding_window=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}
FP32_ONLY = {"mixtral", "gemma2"}
TOL = {torch.bfloat16: dict(loss=(1e-2, 5e-2), logprobs=(1e-1, 1e-2), params=(1e-2, 1e-2)),
       torch.float32: dict(loss=(1e-5, 2e-5), logprobs=(5e-3, 1e-5), params=(5e-3, 1e-5))}


def run(name, vocab, batches, held, steps, dtype, device):
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**(MINI | extra), vocab_size=vocab)
    cfg._attn_implementation = "eager" if name == "gemma2" else "sdpa"
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).to(device=device, dtype=dtype)
    config = ligerzoo.models.config_from_hf(cfg.to_dict())
    with torch.device("meta"):
        ours = ligerzoo.CausalLM(config)
    ours.to(dtype).to_empty(device=device)
    ours.tie_weights()
    load_hf_state_dict(ours, hf.state_dict())
    hf.train(), ours.train()
    lr = 1e-5 if dtype == torch.bfloat16 else 1e-4
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in (hf, ours)]
    losses = []
    for ids, labels in itertools.islice(batches, steps):
        ids, labels = ids.to(device), labels.to(device)
        step = []
        for m, opt, is_hf in ((hf, opts[0], True), (ours, opts[1], False)):
            loss = (m(input_ids=ids, labels=labels) if is_hf else m(ids, labels=labels)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step.append(loss.item())
        losses.append(step)
    hf.eval(), ours.eval()
    with torch.no_grad():
        ids = held.to(device)
        lp_hf = torch.log_softmax(hf(input_ids=ids).logits.float(), -1)
        lp_ours = torch.log_softmax(ours(ids).logits.float(), -1)
        top = lp_hf.topk(20, dim=-1).indices
        lp_gap = (lp_hf.gather(-1, top) - lp_ours.gather(-1, top)).abs()
    km = ligerzoo.models.family(name).key_map(ours.config)
    params, hf_params = dict(ours.named_parameters()), dict(hf.named_parameters())
    worst_param = 0.0
    for key, slot in km.slots.items():
        if key in hf_params:
            a, b = slot.view(params[slot.param]).float(), hf_params[key].float()
            worst_param = max(worst_param, ((a - b).abs() / (TOL[dtype]["params"][0] + TOL[dtype]["params"][1]
                                                                * b.abs())).max().item())
    tol = TOL[dtype]
    loss_ok = all(abs(a - b) <= tol["loss"][0] + tol["loss"][1] * abs(a) for a, b in losses)
    lp_ok = bool((lp_gap <= tol["logprobs"][0] + tol["logprobs"][1] * lp_hf.gather(-1, top).abs()).all())
    gap = max(abs(a - b) for a, b in losses)
    return losses, dict(max_loss_gap=gap, max_logprob_gap=lp_gap.max().item(), param_tol_ratio=worst_param,
                        ok=loss_ok and lp_ok and worst_param <= 1.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokenizer", default=None, help="checkpoint dir with tokenizer.json (default: SmolLM2)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args(argv)
    families, dtypes = args.families.split(","), args.dtypes.split(",")
    if unknown := [f for f in families if f not in FAMILIES]:
        ap.error(f"unknown families {unknown}; choose from {sorted(FAMILIES)}")
    if unknown := [d for d in dtypes if d not in ("bfloat16", "float32")]:
        ap.error(f"unsupported dtypes {unknown}; choose from ['bfloat16', 'float32']")
    if not any(d == "float32" or f not in FP32_ONLY for f in families for d in dtypes):
        ap.error(f"nothing to run: {sorted(FP32_ONLY)} run in float32 only")
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda, but CUDA is not available; pass --device cpu")
    tok = ligerzoo.load_tokenizer(args.tokenizer or prepare_smollm2())
    tokens = tokenize(tok.encode, load_text_corpus())
    held = next(token_batches(None, tokens, args.seq_len, 4, split="heldout"))[0]
    rows = []
    print(f"{'family':8s} {'dtype':9s} {'max|loss gap|':>14s} {'max|logprob gap|':>17s} {'param err/tol':>14s}  ok")
    for name in families:
        for dtype in [getattr(torch, d) for d in dtypes]:
            if dtype == torch.bfloat16 and name in FP32_ONLY:
                continue
            batches = token_batches(None, tokens, args.seq_len, args.batch_size, split="train", epochs=None)
            losses, r = run(name, tok.vocab_size, batches, held, args.steps, dtype, args.device)
            for i, (a, b) in enumerate(losses):
                rows.append(dict(family=name, dtype=str(dtype)[6:], step=i, loss_ligerzoo=b, loss_transformers=a))
            print(f"{name:8s} {str(dtype)[6:]:9s} {r['max_loss_gap']:14.2e} {r['max_logprob_gap']:17.2e} "
                  f"{r['param_tol_ratio']:14.2f}  {r['ok']}  (loss {losses[0][0]:.3f} -> {losses[-1][0]:.3f})",
                  flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "convergence.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
