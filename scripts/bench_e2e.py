"""End-to-end training step benchmark (GPU): ligerzoo vs transformers eager (SDPA) vs
transformers + Liger Kernel vs transformers + torch.compile, each variant in its own process.

A step = forward, backward, fused AdamW step, bf16 weights, the same batch for every variant;
the transformers variants share their random weights, ligerzoo draws its own (same shapes and
distribution, another order), which dense models' step times do not depend on. The step time is
the mean of the timed steps (one timer around them).
Reports tokens/s, model TFLOP/s (matmul FLOPs of the linear layers and attention, not the
embedding lookup: 6 * N_matmul * tokens + 12 * layers * hidden_q * T * tokens / 2 for causal
attention), MFU against the bf16 matmul rate measured in the same run (8192^3, median, when
the run starts; each variant's process also measures the rate right after its steps, on the
warmed GPU, and prints the MFU against that too), and peak memory. Writes <out>/e2e.csv
(model, batch, seq_len, variant, checkpointing, tokens_per_s, tflops, mfu, peak_gib, gpu,
date) and <out>/e2e.png.

Usage:
  python scripts/bench_e2e.py                              # the default suite
  python scripts/bench_e2e.py --models llama3-8b-8l --shapes 8x4096 --variants ligerzoo,liger
  python scripts/bench_e2e.py --longest llama3-8b-8l       # longest seq_len at batch 1 (doubling from 4096)
  python scripts/bench_e2e.py --packed 1024 --shapes 8x4096 --variants ligerzoo,ligerzoo-dense,liger
      # packed documents (lengths uniform in 1..2047, position_ids restarting, the first token of
      # each document unlabelled): writes e2e_packed.csv; ligerzoo-dense = the dense-mask SDPA path
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # HF config kwargs (model_type, fields); layers cut down from the real checkpoints
    "llama3-8b-8l": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, num_hidden_layers=8, vocab_size=128256,
                                   max_position_embeddings=262144, rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2.5-7b-4l": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                    num_key_value_heads=4, num_hidden_layers=4, vocab_size=152064,
                                    max_position_embeddings=131072, rope_theta=1e6, tie_word_embeddings=False)),
    "gemma2-9b-4l": ("gemma2", dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
                                    num_key_value_heads=8, head_dim=256, num_hidden_layers=4, vocab_size=256000,
                                    max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256)),
    "mixtral-8x7b-2l": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                        num_key_value_heads=8, num_hidden_layers=2, vocab_size=32000,
                                        num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
                                        max_position_embeddings=32768)),
}
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM")}


def matmul_rate() -> float:
    """bf16 matmul TFLOP/s on random 8192^3 operands (median of do_bench)."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def packed_positions(B: int, T: int, mean: int) -> torch.Tensor:
    """(B, T) position_ids of rows packed with documents of lengths uniform in 1..2 mean - 1
    (seeded: every variant gets the same rows)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(B):
        row = []
        while len(row) < T:
            row.extend(range(int(torch.randint(1, 2 * mean, (), generator=g))))
        rows.append(row[:T])
    return torch.tensor(rows)


def _attention_pairs(length: int, window: int | None) -> float:
    """(query, key) pairs of causal attention over ``length`` tokens, counted as half the square
    (the usual convention); with a sliding ``window``, each query sees at most ``window`` keys
    (HF's sliding window: keys t - window < s <= t), so past the window the count grows linearly."""
    if window is None or length <= window:
        return length * length / 2
    return window * window / 2 + (length - window) * window


def _layer_windows(cfg) -> list:
    """Each layer's sliding window (None: full attention), from transformers' ``layer_types``
    (Gemma2 alternates, sliding first) or, in configs without them (transformers 4.x),
    ``sliding_window`` on every layer unless ``use_sliding_window`` is False, and then only
    from layer ``max_window_layers`` on (Qwen2's rule)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types[:cfg.num_hidden_layers]]
    if not getattr(cfg, "use_sliding_window", True):
        window = None
    first = getattr(cfg, "max_window_layers", 0) if hasattr(cfg, "use_sliding_window") else 0
    return [window if i >= first else None for i in range(cfg.num_hidden_layers)]


def model_flops(cfg, B: int, T: int, pos: torch.Tensor | None = None) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward); attention within
    each document when packed ``pos`` (B, T) are given, and within each layer's sliding window
    (Gemma2's every other layer; past the window, fewer keys than the causal half)."""
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    experts = getattr(cfg, "num_experts_per_tok", 1) if getattr(cfg, "num_local_experts", 0) else 1
    per_layer = H * (q + 2 * kv) + q * H + 3 * H * cfg.intermediate_size * experts
    linear = L * per_layer + V * H  # the LM head; the embedding is a lookup
    if pos is None:
        lengths = [T] * B
    else:  # per document
        starts = [(row == 0).nonzero().flatten().tolist() + [T] for row in pos]
        lengths = [b - a for st in starts for a, b in zip(st[:-1], st[1:])]
    # forward: QK^T and PV, 2 * q FLOPs each per (query, key) pair
    attention = 4 * q * sum(_attention_pairs(n, w) for w in _layer_windows(cfg) for n in lengths)
    return 6 * linear * B * T + 3 * attention


def run_variant(model: str, variant: str, B: int, T: int, ckpt: bool, steps: int, warmup: int,
                packed: int = 0) -> dict:
    import transformers

    model_type, fields = MODELS[model]
    cfg_cls, cls = HF_CLASSES[model_type]
    cfg = getattr(transformers, cfg_cls)(**fields)
    cfg._attn_implementation = "eager" if model_type == "gemma2" and variant != "ligerzoo" else "sdpa"
    torch.manual_seed(0)
    pos = packed_positions(B, T, packed).cuda() if packed else None
    if variant.startswith("ligerzoo"):
        sys.path.insert(0, str(ROOT))
        import ligerzoo
        from ligerzoo.parallel import apply_activation_checkpointing

        if os.environ.get("LZ_CHUNK_ROWS"):  # experiment: fixed fused-linear-CE chunk rows
            import ligerzoo.kernels.fused_linear_cross_entropy as flce

            flce.default_chunk_size = lambda n, h, v: min(int(os.environ["LZ_CHUNK_ROWS"]), n)
        if os.environ.get("LZ_NO_TARGET_CHECK"):  # experiment: the step without the label-range check
            import types                              # (its kernel, pinned copy and the host's wait for it)

            import ligerzoo.kernels.fused_linear_cross_entropy as flce

            flce.TargetCheck = lambda *args: types.SimpleNamespace(wait=lambda: None)
        if os.environ.get("LZ_UNFUSED"):  # experiment: the plain block composition
            import ligerzoo.models.fused

            ligerzoo.models.fused.ENABLED = False
        if os.environ.get("LZ_FLEX_DEFAULTS"):  # experiment: torch's own flex_attention tiles everywhere
            import ligerzoo.models.flex

            ligerzoo.models.flex.SM90_HEAD256_OPTIONS = None
        if variant == "ligerzoo-dense":  # packed documents / windows as dense SDPA masks
            import ligerzoo.models.flex

            ligerzoo.models.flex.ENABLED = False
        config = ligerzoo.models.config_from_hf(cfg.to_dict())
        with torch.device("cuda"):
            m = ligerzoo.CausalLM(config).to(torch.bfloat16)
        if ckpt:  # LZ_CKPT_EVERY=k (experiment): selective layer checkpointing, one block in k
            apply_activation_checkpointing(m, every=int(os.environ.get("LZ_CKPT_EVERY", 1)))
        fwd = lambda ids, labels: m(ids, labels=labels, position_ids=pos).loss  # noqa: E731
    else:
        if variant == "liger":
            from liger_kernel.transformers import _apply_liger_kernel

            _apply_liger_kernel(model_type)
        with torch.device("cuda"):
            m = getattr(transformers, cls)(cfg).to(torch.bfloat16)
        if ckpt:
            m.gradient_checkpointing_enable()
        call = torch.compile(m) if variant == "compile" else m
        fwd = lambda ids, labels: call(input_ids=ids, labels=labels, position_ids=pos, use_cache=False).loss  # noqa: E731
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    labels = ids if pos is None else ids.masked_fill(pos == 0, -100)  # no target across documents

    def step():
        loss = fwd(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    if os.environ.get("MEMTRACE"):  # one more step with the allocator's history: what is live at the peak
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        step()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        print_peak_allocations(snap, base, int(os.environ["MEMTRACE"]))
    if os.environ.get("PROFILE"):  # one more step under the profiler: where the time goes
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            w0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - w0) * 1e3
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=int(os.environ["PROFILE"])),
              file=sys.stderr, flush=True)
        try:
            print_gaps(prof, wall_ms)
        except Exception as e:  # diagnostics only
            print(f"gap analysis failed: {e!r}", file=sys.stderr)
    try:  # the rate again on the GPU the steps have just warmed (clocks drop under sustained load)
        hot_rate = matmul_rate()
    except torch.OutOfMemoryError:
        hot_rate = None
    return dict(tokens_per_s=B * T / dt, tflops=model_flops(cfg, B, T, pos) / dt / 1e12,
                peak_gib=peak, loss=loss.item(), hot_rate=hot_rate)


def print_peak_allocations(snap: dict, base: int, top: int) -> None:
    """From an allocator snapshot taken over one step: the moment of most allocated bytes and
    what is live then (allocations made during the step, grouped by the innermost frame in
    ligerzoo, the benchmark or transformers; ``base`` = bytes allocated before the step)."""
    events = [e for trace in snap["device_traces"] for e in trace]
    live, cur, peak, peak_i = {}, 0, 0, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
        if cur > peak:
            peak, peak_i = cur, i
    live = {}
    for e in events[: peak_i + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)

    def where(e):
        frames = e.get("frames") or []
        for f in frames:
            if any(k in f["filename"] for k in ("ligerzoo", "bench_e2e", "transformers", "liger_kernel")):
                return f"{Path(f['filename']).name}:{f['line']} {f['name']}"
        return f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"

    groups = {}
    for e in live.values():
        key = where(e)
        n, b = groups.get(key, (0, 0))
        groups[key] = (n + 1, b + e["size"])
    print(f"memory peak in the step: {(base + peak) / 2**30:.2f} GiB = {base / 2**30:.2f} before the step "
          f"+ {peak / 2**30:.2f} allocated in it; live at the peak (GiB, count, where):", file=sys.stderr)
    for key, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {b / 2**30:7.3f} GiB  {n:4d}  {key}", file=sys.stderr)
    last = events[peak_i]
    print(f"  (the peak's last allocation: {last['size'] / 2**30:.3f} GiB at {where(last)})", file=sys.stderr)


def print_gaps(prof, wall_ms: float, top: int = 12) -> None:
    """Where the GPU sat idle during the profiled step: total idle time between consecutive
    device operations and the largest gaps with the operations on either side."""
    dev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    if not dev:
        return
    gaps = []
    end, prev = dev[0].time_range.end, dev[0].name
    for e in dev[1:]:
        if e.time_range.start > end:
            gaps.append((e.time_range.start - end, prev, e.name))
        if e.time_range.end > end:
            end, prev = e.time_range.end, e.name
    busy_span = (end - dev[0].time_range.start) / 1e3
    idle = sum(g for g, _, _ in gaps) / 1e3
    print(f"GPU span {busy_span:.1f} ms of a {wall_ms:.1f} ms step; idle inside the span {idle:.1f} ms "
          f"over {len(gaps)} gaps", file=sys.stderr)
    for g, a, b in sorted(gaps, reverse=True)[:top]:
        print(f"  gap {g / 1e3:7.3f} ms  after {a[:60]!r}  before {b[:60]!r}", file=sys.stderr)


def child(args) -> int:
    try:
        r = run_variant(args.model, args.variant, args.batch, args.seq_len, args.ckpt, args.steps, args.warmup,
                        args.packed)
    except torch.OutOfMemoryError:
        r = {"oom": True}
    print("RESULT " + json.dumps(r), flush=True)
    return 0


def spawn(model, variant, B, T, ckpt, steps, warmup, timeout=int(os.environ.get("SPAWN_TIMEOUT", 900)),
          packed: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--variant", variant, "--batch", str(B),
           "--seq-len", str(T), "--steps", str(steps), "--warmup", str(warmup), "--packed", str(packed)] + (
        ["--ckpt"] if ckpt else [])
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    print(f"  ({variant} {B}x{T} ckpt={ckpt}: {time.perf_counter() - t0:.0f} s wall)", flush=True)
    if os.environ.get("PROFILE") or os.environ.get("MEMTRACE"):  # the child's reports
        print(r.stderr[-30000:], flush=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {"error": r.stderr[-800:]}


def plot(rows: list[dict], png: Path) -> None:
    """Bar chart of tokens/s per (model, shape, checkpointing), one bar per variant
    (skipped with a message when matplotlib is missing; OOM rows are bars of 0)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: CSV only, no PNG")
        return
    key = lambda r: (r["model"], int(r["batch"]), int(r["seq_len"]), str(r["checkpointing"]) == "True")  # noqa: E731
    labels = sorted({key(r) for r in rows})
    variants = sorted({r["variant"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        ys = [next((float(r["tokens_per_s"]) for r in rows if key(r) == lab and r["variant"] == v), 0) for lab in labels]
        ax.bar([i + j * width for i in range(len(labels))], ys, width, label=v)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{m}\n{b}x{t}{' ckpt' if c else ''}" for m, b, t, c in labels], fontsize=7)
    ax.set_ylabel("tokens/s (bf16 training step, H200)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="llama3-8b-8l")
    ap.add_argument("--variant", default="ligerzoo")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--models", default="llama3-8b-8l,qwen2.5-7b-4l,gemma2-9b-4l,mixtral-8x7b-2l")
    ap.add_argument("--shapes", default="8x4096,4x2048")
    ap.add_argument("--variants", default="ligerzoo,hf,liger,compile")
    ap.add_argument("--checkpointing", default="off,on")
    ap.add_argument("--longest", default=None, help="model to search the longest batch-1 sequence for")
    ap.add_argument("--longest-from", type=int, default=4096, help="first seq_len of the doubling search")
    ap.add_argument("--packed", type=int, default=0, metavar="MEAN",
                    help="pack rows with documents of mean length MEAN (0: one sequence per row)")
    ap.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 10)))
    ap.add_argument("--warmup", type=int, default=int(os.environ.get("WARMUP", 3)))
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--plot", default=None, help="only redraw the PNG of an existing CSV")
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.plot:
        with open(args.plot) as f:
            plot(list(csv.DictReader(f)), Path(args.plot).with_suffix(".png"))
        return 0
    rate = matmul_rate()
    gpu, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    print(f"bf16 matmul rate (8192^3, median): {rate:.0f} TFLOP/s", flush=True)
    rows = []

    def record(model, B, T, variant, ckpt, r):
        row = dict(model=model, batch=B, seq_len=T, variant=variant, checkpointing=ckpt,
                   **({"packed_mean": args.packed} if args.packed else {}),
                   tokens_per_s=round(r.get("tokens_per_s", 0)), tflops=round(r.get("tflops", 0), 1),
                   mfu=round(r.get("tflops", 0) / rate, 3), peak_gib=round(r.get("peak_gib", 0), 2), gpu=gpu, date=date)
        rows.append(row)
        status = "OOM" if r.get("oom") else r.get("error", "")[-200:]
        print(f"{model:16s} {B}x{T:<7d} {variant:9s} ckpt={ckpt!s:5s} {row['tokens_per_s']:>8d} tok/s "
              f"{row['tflops']:6.1f} TFLOP/s mfu {row['mfu']:.3f} peak {row['peak_gib']:6.2f} GiB "
              f"loss {r.get('loss', float('nan')):.4f} {status}", flush=True)
        if r.get("hot_rate"):  # a diagnostic beside the MFU (which uses the run's starting rate)
            print(f"{'':16s} matmul rate right after the steps {r['hot_rate']:.0f} TFLOP/s: "
                  f"mfu {r['tflops'] / r['hot_rate']:.3f} against it", flush=True)

    if args.longest:
        for variant in args.variants.split(","):
            T = args.longest_from
            while True:
                r = spawn(args.longest, variant, 1, T, False, 2, 1, packed=args.packed)
                record(args.longest, 1, T, variant, False, r)
                if "tokens_per_s" not in r or T >= 1 << 20:
                    break
                T *= 2
    else:
        for model in args.models.split(","):
            for shape in args.shapes.split(","):
                B, T = map(int, shape.split("x"))
                for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
                    for variant in args.variants.split(","):
                        record(model, B, T, variant, ckpt, spawn(model, variant, B, T, ckpt, args.steps, args.warmup,
                                                                 packed=args.packed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (("e2e_longest" if args.longest else "e2e") + ("_packed" if args.packed else "") + ".csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
