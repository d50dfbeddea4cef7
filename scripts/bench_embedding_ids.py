"""Embedding backward against the distribution of the ids (GPU benchmark).

The sorted segment-sum backward of ``ligerzoo.kernels.embedding`` writes each tile of dW
in one program per column block; tiles holding many ids go to its hot-tile kernel, and the
rows of dW from the middle of the table on where the sort keys were kept (the "scratch
rows") to its scan kernel, so its time depends on how often an id repeats and where that
id lies; Liger Kernel's atomic scatter does not. This times forward + backward (all-ones
output gradient, median of ``triton.testing.do_bench``, best of ``ROUNDS`` interleaved
rounds) of ligerzoo, Liger Kernel 0.8.5 (when importable; it has no ``padding_idx``, so
its rows ignore it) and torch's ``F.embedding`` at Llama 3 sizes (V 128256, H 4096) for:

- ``uniform``: ids drawn uniformly from [0, V);
- ``pad25`` / ``pad75``: one id (the pad token, 7) on a random 25% / 75% of the positions;
- ``tail25``: the same with the id V - 5 (Llama 3's and Qwen2's special tokens lie in the
  last rows);
- ``mid25``: the same with the id V / 2 + 2, among the scratch rows;
- ``pad25_pidx`` / ``pad75_pidx``: the same with ``padding_idx=7`` (ligerzoo and torch drop
  those rows from the gradient);
- ``one_id``: every position the same id.

Before timing, ligerzoo's weight gradient is checked against torch's fp32 ``index_add_``
sum (max error relative to its largest entry; the bf16 rounding of the result is ~4e-3).

Writes ``<out>/embedding_ids.csv`` (kind, tokens, variant, ms, max_rel_err, gpu, date).

Usage (GPU): python scripts/bench_embedding_ids.py [--tokens 8192,32768] [--kinds uniform,pad25]
             [--variants ligerzoo,liger,torch] [--out benchmarks]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

V, H, PAD = 128256, 4096, 7
KINDS = ("uniform", "pad25", "pad25_pidx", "pad75", "pad75_pidx", "tail25", "mid25", "one_id")
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def make_ids(kind: str, n: int, device) -> tuple[torch.Tensor, int | None]:
    """(ids (n,) int64, padding_idx or None) for one kind of batch."""
    ids = torch.randint(0, V, (n,), device=device)
    if kind.startswith("pad"):
        ids[torch.rand(n, device=device) < (0.25 if kind.startswith("pad25") else 0.75)] = PAD
    elif kind in ("tail25", "mid25"):
        ids[torch.rand(n, device=device) < 0.25] = V - 5 if kind == "tail25" else V // 2 + 2
    elif kind == "one_id":
        ids.fill_(PAD)
    return ids, (PAD if kind.endswith("_pidx") else None)


def variants(ids: torch.Tensor, padding_idx: int | None) -> dict:
    from ligerzoo import kernels as K

    out = {"ligerzoo": lambda w: K.embedding(ids, w, padding_idx),
           "torch": lambda w: F.embedding(ids, w, padding_idx)}
    lops = _optional_module("liger_kernel.ops")
    if lops is not None and hasattr(lops, "LigerEmbeddingFunction"):
        out["liger"] = lambda w: lops.LigerEmbeddingFunction.apply(w, ids)
    return out


def _optional_module(name: str):
    """The module, or None when it is not installed or fails to import (its variant is
    then left out of the run)."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def full_step(fn, w):
    def step():
        y = fn(w)
        y.backward(torch.ones_like(y))
        w.grad = None
    return step


def max_rel_err(ids, w, padding_idx, g) -> float:
    """ligerzoo's dW against an fp32 index_add_ of the kept rows."""
    from ligerzoo import kernels as K

    w.grad = None
    K.embedding(ids, w, padding_idx).backward(g)
    keep = ids != (padding_idx if padding_idx is not None else -1)
    ref = torch.zeros(w.shape, dtype=torch.float32, device=w.device).index_add_(0, ids[keep], g[keep].float())
    err = (w.grad.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
    w.grad = None
    return err.item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--variants", default="ligerzoo,liger,torch")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_embedding_ids.py needs a CUDA GPU")
    from triton.testing import do_bench

    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"unknown kinds {unknown}; expected some of {list(KINDS)}")
    wanted = args.variants.split(",")
    torch.manual_seed(0)
    gpu, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    rows = []
    w = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for n in [int(t) for t in args.tokens.split(",")]:
        g = torch.randn(n, H, device="cuda", dtype=torch.bfloat16)
        for kind in kinds:
            ids, pidx = make_ids(kind, n, "cuda")
            err = max_rel_err(ids, w, pidx, g)
            steps = {v: full_step(f, w) for v, f in variants(ids, pidx).items() if v in wanted}
            best = {v: float("inf") for v in steps}
            for _ in range(ROUNDS):
                for v, step in steps.items():
                    best[v] = min(best[v], do_bench(step))
            for v, ms in best.items():
                rows.append({"kind": kind, "tokens": n, "variant": v, "ms": round(ms, 4),
                             "max_rel_err": f"{err:.1e}" if v == "ligerzoo" else "", "gpu": gpu, "date": date})
                print(f"{kind:11s} {n:6d} {v:9s} {ms:8.3f} ms" + (f"  (dW max rel err {err:.1e})" if v == "ligerzoo" else ""),
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "embedding_ids.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {out / 'embedding_ids.csv'}")


if __name__ == "__main__":
    main()
