"""Training-step time and peak memory with a LoRA-wrapped LM head (CUDA only).

A head that is not a bare ``nn.Linear`` cannot go through the fused linear cross entropy;
``ligerzoo.models.transformer.head_cross_entropy`` then runs it a chunk of rows at a time
under activation checkpointing. This compares, per shape: the bare head (fused loss), the
wrapped head with chunks of at least F logits for several floors F (0 = the
``default_chunk_size`` rows alone; ``HEAD_CHUNK_LOGITS`` is the shipped floor), and the
wrapped head on the whole (N, V) logits at once (``HEAD_CHUNK_LOGITS = None``).

Each row: forward + backward of the loss (no optimizer), median of 5 steps after one warm-up,
peak = max allocated during the steps minus allocated before them. The LoRA update starts at
zero (as peft's), so every variant's loss equals the bare head's.

    python scripts/bench_head_loss.py --out benchmarks/head_loss.csv
"""
import argparse
import csv
import datetime
import time

import torch

import ligerzoo
from ligerzoo.models import transformer

SHAPES = [(512, 1, (4, 2048)), (4096, 2, (4, 2048)), (4096, 2, (8, 4096))]  # hidden, layers, (B, T)
FLOORS = [0, 2**26, 2**27, 2**28]


class LoRAHead(torch.nn.Module):
    """``base(x) + x A^T B^T`` (rank r), B zero at the start as in peft."""

    def __init__(self, base: torch.nn.Linear, rank: int = 16):
        super().__init__()
        self.base = base
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, **kw) * 0.01)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, **kw))

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


def measure(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return loss.item(), 1e3 * sorted(times)[2], peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/head_loss.csv")
    args = ap.parse_args(argv)
    gpu, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    shipped = transformer.HEAD_CHUNK_LOGITS
    rows = []
    torch.manual_seed(0)
    for hidden, layers, shape in SHAPES:
        config = ligerzoo.ModelConfig(
            vocab_size=128256, hidden_size=hidden, intermediate_size=2 * hidden if hidden == 512 else 14336,
            num_hidden_layers=layers, num_attention_heads=8 if hidden == 512 else 32, num_key_value_heads=8,
            tie_word_embeddings=False)
        model = ligerzoo.CausalLM(config).cuda().to(torch.bfloat16)
        ids = torch.randint(0, config.vocab_size, shape, device="cuda")
        variants = [("bare head (fused)", None, False)] + [
            (f"LoRA head, chunks of >= {f} logits", f, True) for f in FLOORS] + [("LoRA head, whole logits", None, True)]
        for name, floor, lora in variants:
            if lora and not isinstance(model.lm_head, LoRAHead):
                model.lm_head = LoRAHead(model.lm_head)
            transformer.HEAD_CHUNK_LOGITS = max(floor, 1) if floor is not None else None
            loss, ms, peak = measure(model, ids)
            print(f"hidden {hidden} layers {layers} {shape} {name:34s} loss {loss:.5f} step {ms:8.2f} ms "
                  f"peak +{peak:.3f} GiB", flush=True)
            rows.append(dict(hidden=hidden, layers=layers, batch=shape[0], seq_len=shape[1], variant=name,
                             ms=round(ms, 3), peak_gib=round(peak, 3), loss=round(loss, 5), gpu=gpu, date=date))
        transformer.HEAD_CHUNK_LOGITS = shipped
        del model
        torch.cuda.empty_cache()
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
