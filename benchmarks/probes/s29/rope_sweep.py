"""Session 29 probe 1: rope's kernel with constexpr head/feature counts and 32-bit offsets within
a token under 1, 2, 4 and 8 warps and its own rule, against session 28's kernel (`rope_s28.py`,
its own rule) and Liger's, forward + backward in place with half tables (the model's path), for
the families' head shapes: device time under CUDA graphs, us (median; best of 2 rounds).
`PREV=<file>` adds an earlier kernel of this session under 1, 2, 4 and 8 warps: run 2 took run 1's
(`rope_a.py`: runtime head strides) beside the package's with constexpr head strides; run 3 took
run 2's (`rope_b.py`: the tables loaded first) beside the package's (the tiles loaded first).
`TABLES=` the tables ours (and session 28's kernel) read: `half` (default: fp32, R/2 columns, the
model's), `half_bf16` (bf16, R/2 columns: the bytes Liger's kernel reads of its bf16 tables; a
measurement of what the table bytes cost, not a numerics the package would use), `full` (fp32,
R columns: the full-table path and its warps). Written in session 29 for a later run; the
`TABLES` modes have not run yet."""
import importlib.util
import os
import sys
import torch, triton
from triton.testing import do_bench_cudagraph
import ligerzoo.kernels as K
R = sys.modules["ligerzoo.kernels.rope"]
import liger_kernel.ops.rope as lrope
spec = importlib.util.spec_from_file_location("rope_s28", "benchmarks/probes/s29/rope_s28.py")
OLD = importlib.util.module_from_spec(spec); spec.loader.exec_module(OLD)
PREV = None
TABLES = os.environ.get("TABLES", "half")
assert TABLES in ("half", "half_bf16", "full"), TABLES
if os.environ.get("PREV"):
    spec = importlib.util.spec_from_file_location("rope_prev", os.environ["PREV"])
    PREV = importlib.util.module_from_spec(spec); spec.loader.exec_module(PREV)

print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, f"tables: {TABLES}", flush=True)
bench = lambda fn: do_bench_cudagraph(fn, rep=40, return_mode="median")
shipped = R._num_warps
SHAPES = [  # (batch, q heads, kv heads, head_dim, rotary dim, family)
    (1, 32, 8, 128, 128, "llama-3-8b / mistral / mixtral"), (1, 28, 4, 128, 128, "qwen2.5-7b"),
    (1, 32, 32, 96, 96, "phi-3-mini"), (1, 40, 10, 128, 128, "phi-3-medium"), (1, 16, 8, 256, 256, "gemma2-9b"),
    (1, 16, 16, 256, 256, "gemma-7b"), (1, 12, 2, 128, 128, "qwen2.5-1.5b"), (1, 32, 32, 128, 128, "llama-2-7b"),
    (1, 9, 3, 64, 64, "smollm2-135m"), (1, 24, 8, 128, 96, "phi-4-mini (partial)"),
]
WARPS = (1, 2, 4, 8)
print("batch x tokens | shape | rule's warps | new: rule, " + ", ".join(f"{w}" for w in WARPS)
      + " warps | s28 kernel (its rule) | liger" + (f" | {os.environ.get('PREV')}: " + ", ".join(f"{w}" for w in WARPS)
                                                    + " warps" if PREV else "") + " (us)")
for (B, NH, NKV, D, RD, fam) in SHAPES:
    for n in (4096, 8192):
        T = n // B
        q = torch.randn(B, T, NH, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, T, NKV, D, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(T, device="cuda")[None]
        inv = 1.0 / (500000.0 ** (torch.arange(0, RD, 2, device="cuda").float() / RD))
        cos, sin = K.rope_cos_sin(pos, inv)
        hcos, hsin = K.rope_cos_sin(pos, inv, half_table=True)
        cosb, sinb = cos.bfloat16(), sin.bfloat16()
        ht = TABLES != "full"
        if TABLES == "half_bf16":
            hcos, hsin = hcos.bfloat16(), hsin.bfloat16()
        elif TABLES == "full":
            hcos, hsin = cos, sin
        qt, kt = q.transpose(1, 2), k.transpose(1, 2)
        # the two kernels agree (forward, out of place)
        a = R._launch(q, k, hcos, hsin, backward=False, half_table=ht)
        b = OLD._launch(q, k, hcos, hsin, backward=False, half_table=ht)
        same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        del a, b
        seen = {}

        def spy(*a):
            seen["w"] = shipped(*a)
            return seen["w"]

        def ours():
            R._launch(q, k, hcos, hsin, backward=False, half_table=ht, inplace=True)
            R._launch(q, k, hcos, hsin, backward=True, half_table=ht, inplace=True)

        def old():
            OLD._launch(q, k, hcos, hsin, backward=False, half_table=ht, inplace=True)
            OLD._launch(q, k, hcos, hsin, backward=True, half_table=ht, inplace=True)

        def prev(nw):
            PREV._num_warps = lambda *a: nw
            PREV._launch(q, k, hcos, hsin, backward=False, half_table=ht, inplace=True)
            PREV._launch(q, k, hcos, hsin, backward=True, half_table=ht, inplace=True)

        def liger():
            lrope.rope_forward(qt, kt, cosb, sinb)
            lrope.rope_backward(qt, kt, cosb, sinb)

        best = {}
        keys = ("rule",) + WARPS + ("old", "liger") + (tuple(f"prev{w}" for w in WARPS) if PREV else ())
        for rnd in range(2):
            for key in keys:
                if key == "liger":
                    t = bench(liger)
                elif key == "old":
                    t = bench(old)
                elif str(key).startswith("prev"):
                    t = bench(lambda nw=int(key[4:]): prev(nw))
                else:
                    R._num_warps = spy if key == "rule" else (lambda *a, nw=key: nw)
                    t = bench(ours)
                best[key] = min(best.get(key, 1e9), t * 1e3)
        R._num_warps = shipped
        print(f"{B} x {T} | {NH}/{NKV}/{D}/{RD} {fam} | {seen['w']} | "
              + " ".join(f"{best[k_]:.1f}" for k_ in keys) + ("" if same else "  (new != s28 kernel!)"), flush=True)
        del q, k, qt, kt
        torch.cuda.empty_cache()
