"""Kernel benchmark: ligerzoo vs torch eager vs torch.compile vs Liger Kernel (when importable).

For each op at Llama-3-8B sizes (hidden 4096, intermediate 14336, vocab 128256, 32/8 heads
of 128) and a sweep of token counts: median time (``triton.testing.do_bench``) of the
forward and of forward + backward (backward = the difference), the best of ``ROUNDS``
(default 3) rounds that interleave the variants (``PAIRED=1``: their calls interleaved
within each round, see ``paired_ms``), and the peak memory of one forward +
backward above what the inputs already hold. rope, the GLUs and cross entropy get their
inputs as the output of an upstream op (``_Upstream``), as in a model, so that Liger's
kernels and ours with ``inplace=True`` both write over them. Writes ``benchmarks/kernels.csv``
(op, mode, variant, x_name, x, ms, peak_mib, gpu, date) and ``benchmarks/kernels_<op>.png``.

Usage (GPU): python scripts/bench_kernels.py [--ops rms_norm,cross_entropy] [--tokens 4096,8192,16384]
             [--dtype bfloat16] [--out benchmarks]
       [--graph]   # also device time under a CUDA graph (mode full_graph)
       [--graph-only]   # only peak memory and the full_graph rows (no plain timings: quick sweeps
                        # of device time, e.g. of ops whose steps take seconds)
       (CPU): python scripts/bench_kernels.py --plot benchmarks/kernels.csv   # PNGs from a CSV
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

H, I, V, NH, NKV, D = 4096, 14336, 128256, 32, 8, 128


def _liger(name):
    try:
        return importlib.import_module(name)
    except Exception:  # not installed / incompatible: the variant is skipped
        return None


class _Upstream(torch.autograd.Function):
    """Stands for the op that made an activation (a projection, the LM head): returns its
    input's memory as a new non-leaf tensor and drops the gradient it gets, as a projection's
    backward consumes its output's gradient. It costs no kernel.

    Why: a training step hands rope, the GLUs and cross entropy such activations, never leaves.
    Liger's kernels write over their inputs either way. ``inplace=True`` in ours does so only
    for non-leaves; on the harness's leaves it would allocate. Every variant of the ops in
    ``UPSTREAM`` gets its inputs through this function."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()  # the same memory, a tensor that is no leaf once autograd records it

    @staticmethod
    def backward(ctx, g):
        return None


# ops whose inputs are activations in a model (see _Upstream)
UPSTREAM = frozenset({"rope", "swiglu", "geglu", "cross_entropy"})


def _after_upstream(fn):
    """``fn`` called on ``_Upstream`` outputs of its grad-requiring tensor inputs."""
    def call(*inputs):
        return fn(*(_Upstream.apply(t) if isinstance(t, torch.Tensor) and t.requires_grad else t
                    for t in inputs))
    return call


def _torch_rms(x, w, eps=1e-6):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _torch_rope(q, k, cos, sin):
    def rot(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((-t2, t1), dim=-1)
    c, s = cos[:, :, None].to(q.dtype), sin[:, :, None].to(q.dtype)
    return q * c + rot(q) * s, k * c + rot(k) * s


def _torch_flce(x, w, t):
    return F.cross_entropy((x @ w.T).float(), t)


def _chunk_ce_grads(x, w, t, n_total):
    """One chunk of rows of the linear cross entropy, gradients by hand (compiled below):
    -> (summed loss / n_total, dx (C, H) in x.dtype, dw (V, H) fp32)."""
    z = (x @ w.T).float()                                                  # (C, V)
    lse = torch.logsumexp(z, dim=-1)                                       # (C,)
    loss = (lse - z.gather(1, t[:, None]).squeeze(1)).sum() / n_total
    d = torch.exp(z - lse[:, None])
    d = d - F.one_hot(t, z.shape[1]).to(d.dtype)
    d = (d / n_total).to(x.dtype)                                          # (C, V)
    return loss, d @ w, (d.T @ x).float()


class _CompiledChunkedCE(torch.autograd.Function):
    """torch.compile's chunked linear cross entropy, the baseline issue 3 names: the rows go
    through ``_chunk_ce_grads`` (compiled by torch.compile) one chunk at a time, gradients
    are taken in the forward (dW accumulated in fp32), the logits are never whole."""

    fn = None

    @staticmethod
    def forward(ctx, x, w, t, chunk):
        if _CompiledChunkedCE.fn is None:
            _CompiledChunkedCE.fn = torch.compile(_chunk_ce_grads, dynamic=False)
        n = x.shape[0]
        dx = torch.empty_like(x)
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, n, chunk):
            lc, gx, gw = _CompiledChunkedCE.fn(x[s:s + chunk], w, t[s:s + chunk], n)
            loss += lc
            dx[s:s + chunk] = gx
            dw += gw
        ctx.save_for_backward(dx, dw.to(w.dtype))
        return loss

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        return dx * g.to(dx.dtype), dw * g.to(dw.dtype), None, None


def op_specs(dtype, device="cuda"):
    """op -> (x_name, make(n_tokens) -> (inputs, {variant: fn(*inputs) -> output or tensors})),
    the inputs made on ``device`` (a CPU host-overhead probe uses "cpu")."""
    from ligerzoo import kernels as K

    fl = importlib.import_module("ligerzoo.kernels.fused_linear_cross_entropy")
    lf = _liger("liger_kernel.transformers.functional")
    dev = device

    def rnd(*shape, grad=True, scale=1.0):
        return (torch.randn(*shape, device=dev, dtype=dtype) * scale).requires_grad_(grad)

    specs = {}

    def rms(n):
        x, w = rnd(n, H), rnd(H)
        v = {"ligerzoo": lambda x, w: K.rms_norm(x, w, 1e-6), "torch": _torch_rms}
        if lf:
            v["liger"] = lambda x, w: lf.liger_rms_norm(x, w, 1e-6, in_place=False)
        return (x, w), v
    specs["rms_norm"] = ("tokens", rms)

    def add_rms(n):
        x, r, w = rnd(n, H), rnd(n, H), rnd(H)

        def torch_add_rms(x, r, w):
            s = x + r
            return _torch_rms(s, w), s
        v = {"ligerzoo": lambda x, r, w: K.fused_add_rms_norm(x, r, w, 1e-6), "torch": torch_add_rms}
        if lf:
            v["liger"] = lambda x, r, w: lf.liger_fused_add_rms_norm(x, r, w, 1e-6, in_place=False)
        return (x, r, w), v
    specs["fused_add_rms_norm"] = ("tokens", add_rms)

    def rope(n):
        q, k = rnd(1, n, NH, D), rnd(1, n, NKV, D)
        pos = torch.arange(n, device=dev)[None]
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
        cos, sin = K.rope_cos_sin(pos, inv)
        hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)  # the first halves (the model's layout)
        # in place both ways, as Liger's rope always is (q and k come through _Upstream, as a
        # projection's output); half_table: read only the first half of the tables, which
        # Liger's kernel also does
        v = {"ligerzoo": lambda q, k: K.rope(q, k, hcos, hsin, inplace=True, backward_inplace=True,
                                             half_table=True),
             "torch": lambda q, k: _torch_rope(q, k, cos, sin)}
        if lf:  # Liger takes (B, H, T, D): transposed views of (B, T, H, D), as transformers hands it
            # (no copies; it rotates them in place, which changes the values, not the timing)
            v["liger"] = lambda q, k: lf.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos.to(dtype), sin.to(dtype))
        return (q, k), v
    specs["rope"] = ("tokens", rope)

    def glu(act):
        def make(n):
            # gate and up as two contiguous tensors for every variant, as transformers' MLP makes
            # them (slices of one fused tensor, ligerzoo's model layout, cost Liger copies: NOTES,
            # session 23's benchmark review)
            g, u = rnd(n, I), rnd(n, I)
            ours = K.swiglu if act == "silu" else importlib.import_module("ligerzoo.kernels.geglu").geglu
            tf = F.silu if act == "silu" else (lambda a: F.gelu(a, approximate="tanh"))
            # ours with the backward over its inputs, as Liger's always is (gate and up come
            # through _Upstream, as a projection's output)
            v = {"ligerzoo": lambda g, u: ours(g, u, inplace=True), "torch": lambda g, u: tf(g) * u}
            if lf:
                v["liger"] = lf.liger_swiglu if act == "silu" else lf.liger_geglu
            return (g, u), v
        return make
    specs["swiglu"] = ("tokens", glu("silu"))
    specs["geglu"] = ("tokens", glu("gelu"))

    def swiglu_fused(n):
        # gate and up concatenated in one (n, 2I) tensor (ligerzoo's fused projection), against
        # Liger's op for that layout (LigerFusedGateUpSiLUMulFunction, no copies either)
        gu = rnd(n, 2 * I)
        # both out of place (Liger's fused op defaults to in_place=False)
        v = {"ligerzoo": K.swiglu_fused, "torch": lambda gu: F.silu(gu[:, :I]) * gu[:, I:]}
        lops = _liger("liger_kernel.ops.swiglu")
        if lops is not None and hasattr(lops, "LigerFusedGateUpSiLUMulFunction"):
            v["liger"] = lambda gu: lops.LigerFusedGateUpSiLUMulFunction.apply(gu)
        return (gu,), v
    specs["swiglu_fused"] = ("tokens", swiglu_fused)

    def ce(n):
        logits, t = rnd(n, V), torch.randint(0, V, (n,), device=dev)
        # ours with the gradient written over the logits, as Liger's always is (the logits come
        # through _Upstream, as the LM head's output)
        v = {"ligerzoo": lambda z: K.cross_entropy(z, t, inplace=True), "torch": lambda z: F.cross_entropy(z.float(), t)}
        if lf:
            # Liger writes the gradient over its input, as it does in a training loss: no clone
            # (later calls see gradients as logits, which changes the values, not the timing)
            v["liger"] = lambda z: lf.liger_cross_entropy(z, t)
        return (logits,), v
    specs["cross_entropy"] = ("tokens", ce)

    def flce(n):
        x, w, t = rnd(n, H), rnd(V, H, scale=0.02), torch.randint(0, V, (n,), device=dev)
        v = {"ligerzoo": lambda x, w: fl.fused_linear_cross_entropy(x, w, t),
             "torch": lambda x, w: _torch_flce(x, w, t)}
        v["compile_chunked"] = lambda x, w: _CompiledChunkedCE.apply(x, w, t, 2048)
        if lf:
            v["liger"] = lambda x, w: lf.liger_fused_linear_cross_entropy(x, w, t, accum_dtype=torch.float32)
        return (x, w), v
    specs["fused_linear_cross_entropy"] = ("tokens", flce)

    def lnorm(n):
        x, w, b = rnd(n, H), rnd(H), rnd(H)
        v = {"ligerzoo": lambda x, w, b: K.layer_norm(x, w, b, 1e-5) if hasattr(K, "layer_norm")
             else importlib.import_module("ligerzoo.kernels.layer_norm").layer_norm(x, w, b, 1e-5),
             "torch": lambda x, w, b: F.layer_norm(x, (H,), w, b, 1e-5)}
        if lf:
            v["liger"] = lambda x, w, b: lf.liger_layer_norm(x, w, b, 1e-5)
        return (x, w, b), v
    specs["layer_norm"] = ("tokens", lnorm)

    def gnorm_on(x, G=32):  # x (N, C, *): group_norm with G groups, the three variants
        C = x.shape[1]
        w, b = rnd(C), rnd(C)
        v = {"ligerzoo": lambda x, w, b: K.group_norm(x, G, w, b, 1e-5),
             "torch": lambda x, w, b: F.group_norm(x, G, w, b, 1e-5)}
        if lf:
            v["liger"] = lambda x, w, b: lf.liger_group_norm(x, w, b, C, G, 1e-5)
        return (x, w, b), v

    # (batch, channels, length) = (n / 128, 4096, 128): n x 4096 elements, 32 groups
    specs["group_norm"] = ("tokens", lambda n: gnorm_on(rnd(max(n // 128, 1), H, 128)))
    # (tokens, channels) = (n, 4096), 32 groups of 128 channels (small groups)
    specs["group_norm_2d"] = ("tokens", lambda n: gnorm_on(rnd(n, H)))

    def embed(n):
        w = rnd(V, H)
        ids = torch.randint(0, V, (n,), device=dev)
        v = {"ligerzoo": lambda w: K.embedding(ids, w), "torch": lambda w: F.embedding(ids, w)}
        lops = _liger("liger_kernel.ops")
        if lops is not None and hasattr(lops, "LigerEmbeddingFunction"):
            v["liger"] = lambda w: lops.LigerEmbeddingFunction.apply(w, ids)
        return (w,), v
    specs["embedding"] = ("tokens", embed)

    def kl(n):
        x = torch.log_softmax(torch.randn(n, V, device=dev, dtype=dtype), -1).requires_grad_()
        y = torch.softmax(torch.randn(n, V, device=dev, dtype=dtype), -1)
        klmod = importlib.import_module("ligerzoo.kernels.kl_div")
        v = {"ligerzoo": lambda x: klmod.kl_div(x, y), "torch": lambda x: F.kl_div(x, y, reduction="batchmean")}
        if lf:
            v["liger"] = lambda x: lf.liger_kl_div(x, y, reduction="batchmean")
        return (x,), v
    specs["kl_div"] = ("tokens", kl)

    def jsd_(n):
        s = torch.log_softmax(torch.randn(n, V, device=dev, dtype=dtype), -1).requires_grad_()
        t = torch.log_softmax(torch.randn(n, V, device=dev, dtype=dtype), -1)
        jm = importlib.import_module("ligerzoo.kernels.jsd")

        def torch_jsd(s):
            m = torch.logsumexp(torch.stack([s.float(), t.float()]) + math.log(0.5), 0)
            return 0.5 * (F.kl_div(m, s.float(), reduction="sum", log_target=True)
                          + F.kl_div(m, t.float(), reduction="sum", log_target=True)) / n
        v = {"ligerzoo": lambda s: jm.jsd(s, t), "torch": torch_jsd}
        if lf:
            v["liger"] = lambda s: lf.liger_jsd(s, t)
        return (s,), v
    specs["jsd"] = ("tokens", jsd_)

    def fljsd(n):
        xs, ws = rnd(n, H), rnd(V, H, scale=0.02)
        xt, wt = rnd(n, H, grad=False), rnd(V, H, grad=False, scale=0.02)

        def torch_fljsd(xs, ws):
            s = torch.log_softmax((xs @ ws.T).float(), -1)
            t = torch.log_softmax((xt @ wt.T).float(), -1)
            m = torch.logsumexp(torch.stack([s, t]) + math.log(0.5), 0)
            return 0.5 * (F.kl_div(m, s, reduction="sum", log_target=True)
                          + F.kl_div(m, t, reduction="sum", log_target=True)) / n
        v = {"ligerzoo": lambda xs, ws: K.fused_linear_jsd(xs, ws, xt, wt), "torch": torch_fljsd}
        if lf:
            v["liger"] = lambda xs, ws: lf.liger_fused_linear_jsd(xs, ws, xt, wt, accum_dtype=torch.float32)
        return (xs, ws), v
    specs["fused_linear_jsd"] = ("tokens", fljsd)
    return specs


def full_step(fn, inputs):
    """The "full" mode: one forward of ``fn(*inputs)`` and a backward with all-ones output
    gradients, the inputs' ``.grad`` cleared afterwards (so repeated calls never accumulate)."""
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def full():
        out = fn(*inputs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for g in grads:
            g.grad = None

    return full


def _step(fn, inputs, mode):
    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    return fwd if mode == "forward" else full_step(fn, inputs)


def time_ms(fn, inputs, mode):
    """Median milliseconds of one call (``triton.testing.do_bench``: L2 flushed before each)."""
    from triton.testing import do_bench

    return do_bench(_step(fn, inputs, mode), warmup=25, rep=100, return_mode="median")


def paired_ms(chosen, inputs, mode, reps=200, warmup=20):
    """Median milliseconds of one call of each variant, their calls interleaved (A B C, B C
    A, ... with the L2 flushed before each, as ``do_bench`` does for one): steps bound by
    the host CPU, whose speed drifts within a run, then meet the same drift, where
    back-to-back ``do_bench`` calls each meet their own. {variant: ms}.

    Each call starts on an idle GPU (a synchronize before its flush). Without it, a variant
    whose device time exceeds its host time (torch eager's rope: 2.1 ms of kernels) leaves
    queued work behind, and the host-bound variant timed next issues its launches while the
    GPU is still busy, so its events read only its device time (session 26: Liger's rope at
    16384 tokens, timed right after torch's in three of every four calls, read 0.243 ms against ours at
    0.552, while Liger's host issued a step in 0.73-0.82 ms and ours in 0.64-0.70)."""
    import statistics

    from triton import runtime

    cache = runtime.driver.active.get_empty_cache_for_benchmark()
    steps = {v: _step(fn, inputs, mode) for v, fn in chosen.items()}
    for f in steps.values():
        for _ in range(warmup):
            f()
    names = list(steps)
    events = {v: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
              for v in names}
    torch.cuda.synchronize()
    for r in range(reps):
        k = r % len(names)
        for v in names[k:] + names[:k]:
            torch.cuda.synchronize()
            runtime.driver.active.clear_cache(cache)
            start, end = events[v][r]
            start.record()
            steps[v]()
            end.record()
    torch.cuda.synchronize()
    return {v: statistics.median(a.elapsed_time(b) for a, b in events[v]) for v in names}


def graph_ms(fn, inputs):
    """Device time of one forward + backward (ms): ``triton.testing.do_bench_cudagraph``'s
    median over replays of a CUDA graph of unrolled calls. The host's launch cost, which
    bounds the plain timings of small steps on a slow host, is gone; the L2 is not flushed
    between calls."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(full_step(fn, inputs), rep=100, return_mode="median")


def peak_mib(fn, inputs, mode):
    """MiB allocated at the call's peak above what was allocated before it."""
    f = _step(fn, inputs, mode)
    f()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    f()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def plot(rows, ops, out: Path) -> None:
    """One PNG per op (forward + backward time and peak memory against the token count)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: CSV only, no PNG")
        return
    for op in ops:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for variant in sorted({r["variant"] for r in rows if r["op"] == op}):
            pts = sorted((r for r in rows if r["op"] == op and r["variant"] == variant and r["mode"] == "full"),
                         key=lambda r: int(r["x"]))
            ax[0].plot([int(r["x"]) for r in pts], [float(r["ms"]) for r in pts], "o-", label=variant)
            ax[1].plot([int(r["x"]) for r in pts], [float(r["peak_mib"]) for r in pts], "o-", label=variant)
        times = [float(r["ms"]) for r in rows if r["op"] == op and r["mode"] == "full" and float(r["ms"]) > 0]
        if times and max(times) > 50 * min(times):  # variants orders of magnitude apart
            ax[0].set_yscale("log")
        ax[0].set(title=f"{op}: forward+backward", xlabel="tokens", ylabel="ms (median)")
        ax[1].set(title=f"{op}: peak memory", xlabel="tokens", ylabel="MiB above inputs")
        ax[0].legend()
        fig.tight_layout()
        fig.savefig(out / f"kernels_{op}.png", dpi=80)
        plt.close(fig)


FIELDS = ["op", "mode", "variant", "x_name", "x", "ms", "peak_mib", "gpu", "date"]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
# PAIRED=1: the variants' calls interleaved within each round (paired_ms) instead of one
# do_bench per variant; the fastest round's median kept as well.
PAIRED = os.environ.get("PAIRED", "0") == "1"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=None)
    ap.add_argument("--tokens", default="2048,4096,8192,16384")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", default="ligerzoo,torch,compile,compile_chunked,liger")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--plot", metavar="CSV", help="only draw the PNGs from an existing kernels.csv (no GPU needed)")
    ap.add_argument("--graph", action="store_true",
                    help="also time forward + backward under a CUDA graph (rows of mode full_graph: device "
                         "time without the host's launch cost; a variant that cannot be captured is skipped)")
    ap.add_argument("--graph-only", action="store_true",
                    help="only the full_graph rows and peak memory, no plain do_bench timings")
    args = ap.parse_args(argv)
    args.graph = args.graph or args.graph_only
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        with open(args.plot, newline="") as f:
            rows = list(csv.DictReader(f))
        plot(rows, sorted({r["op"] for r in rows}), out)
        return
    dtype = getattr(torch, args.dtype)
    specs = op_specs(dtype)
    ops = args.ops.split(",") if args.ops else list(specs)
    gpu, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    path = out / "kernels.csv"
    rows = []
    with open(path, "w", newline="") as f:  # rows are written as they come: a cut-short run keeps them
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for op in ops:
            x_name, make = specs[op]
            for n in map(int, args.tokens.split(",")):
                inputs, variants = make(n)
                if "compile" in args.variants.split(","):
                    variants["compile"] = torch.compile(variants["torch"])
                chosen = {v: fn for v, fn in variants.items() if v in args.variants.split(",")}
                if op in UPSTREAM:
                    chosen = {v: _after_upstream(fn) for v, fn in chosen.items()}
                # Timings in ROUNDS interleaved rounds (every variant once per round), the
                # fastest round's median kept: the small ops are bound by the host CPU,
                # whose speed drifts during a run.
                res = {v: {"forward": [float("inf"), 0.0], "full": [float("inf"), 0.0]} for v in chosen}
                for v, fn in list(chosen.items()):
                    try:
                        for m in ("forward", "full"):
                            res[v][m][1] = peak_mib(fn, inputs, m)
                    except Exception as e:  # OOM or an unsupported variant: recorded, not fatal
                        print(f"{op:28s} {v:9s} {n:6d}  failed: {type(e).__name__}: {str(e)[:80]}")
                        torch.cuda.empty_cache()
                        del chosen[v], res[v]
                for _ in range(0 if args.graph_only else ROUNDS):
                    for m in ("forward", "full"):
                        times = (paired_ms(chosen, inputs, m) if PAIRED
                                 else {v: time_ms(fn, inputs, m) for v, fn in chosen.items()})
                        for v, ms in times.items():
                            res[v][m][0] = min(res[v][m][0], ms)
                for v in chosen:
                    r = res[v]
                    r["backward"] = (r["full"][0] - r["forward"][0], float("nan"))
                    if args.graph:
                        try:
                            r["full_graph"] = (graph_ms(chosen[v], inputs), r["full"][1])
                        except Exception as e:  # host syncs, compiled graphs: not capturable
                            print(f"{op:28s} {v:9s} {n:6d}  no CUDA graph: {type(e).__name__}: {str(e)[:80]}")
                            torch.cuda.synchronize()
                    for mode, (ms, mib) in r.items():
                        if args.graph_only and mode != "full_graph":  # no plain timings taken
                            continue
                        row = dict(op=op, mode=mode, variant=v, x_name=x_name, x=n, ms=round(ms, 4),
                                   peak_mib=round(mib, 2), gpu=gpu, date=date)
                        rows.append(row)
                        writer.writerow(row)
                    f.flush()
                    graph = f"  graph {r['full_graph'][0]:8.3f} ms" if "full_graph" in r else ""
                    plain = "" if args.graph_only else f"  fwd {r['forward'][0]:8.3f} ms  full {r['full'][0]:8.3f} ms"
                    print(f"{op:28s} {v:9s} {n:6d}{plain}{graph}  peak {r['full'][1]:9.2f} MiB", flush=True)
                del inputs, variants
                torch.cuda.empty_cache()
    if not args.graph_only:  # the PNGs draw the plain full rows
        plot(rows, ops, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
