"""Checkpoint load time: ``ligerzoo.from_hf`` against ``transformers.from_pretrained`` on the
same multi-GB safetensors checkpoint, same dtype and device, same process, alternating
(files read once beforehand, so both read from the page cache).

Without ``--dir`` (or with an empty one) a checkpoint is made first: random weights of a
``scripts/bench_e2e.py`` shape (default llama3-8b-8l: 2.8 B parameters, 5.6 GB in bf16),
saved by transformers as sharded safetensors.

Writes <out>/load.csv (loader, seconds_min, seconds_median, repeats, checkpoint_gb, device,
gpu, date).

Usage:
  python scripts/bench_load.py --device cuda --repeats 3
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def make_checkpoint(directory: Path, model: str) -> None:
    import transformers
    from bench_e2e import HF_CLASSES, MODELS

    model_type, fields = MODELS[model]
    cfg_cls, cls = HF_CLASSES[model_type]
    cfg = getattr(transformers, cfg_cls)(**fields)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        m = getattr(transformers, cls)(cfg).to(torch.bfloat16)
    m.save_pretrained(directory)
    del m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--model", default="llama3-8b-8l")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    import transformers

    import ligerzoo

    directory = Path(args.dir or tempfile.mkdtemp(prefix="lz_load_"))
    if not any(directory.glob("*.safetensors")):
        t0 = time.perf_counter()
        make_checkpoint(directory, args.model)
        print(f"made {args.model} checkpoint in {directory} ({time.perf_counter() - t0:.0f} s)", flush=True)
    files = sorted(directory.glob("*.safetensors"))
    gb = sum(f.stat().st_size for f in files) / 1e9
    for f in files:  # into the page cache, for both loaders alike
        with open(f, "rb") as fh, open(os.devnull, "wb") as null:
            shutil.copyfileobj(fh, null, 1 << 26)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    loaders = {
        "ligerzoo.from_hf": lambda: ligerzoo.from_hf(directory, dtype=torch.bfloat16, device=args.device),
        "transformers.from_pretrained": lambda: transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.bfloat16, device_map=args.device),
    }
    times = {name: [] for name in loaders}
    for _ in range(args.repeats):
        for name, load in loaders.items():
            sync()
            t0 = time.perf_counter()
            m = load()
            sync()
            times[name].append(time.perf_counter() - t0)
            del m
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = [dict(loader=n, seconds_min=round(min(t), 3), seconds_median=round(statistics.median(t), 3),
                 repeats=len(t), checkpoint_gb=round(gb, 2), device=args.device, gpu=gpu,
                 date=datetime.date.today().isoformat()) for n, t in times.items()]
    for r in rows:
        print(f"{r['loader']:30s} min {r['seconds_min']:.2f} s  median {r['seconds_median']:.2f} s  "
              f"({r['checkpoint_gb']} GB, {r['device']})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "load.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
