"""Session 29 probe 2 (CPU, no GPU): compile rope's kernel for sm_90 with Triton's own compiler and
ptxas from the wheel, for eight configurations (with the alignment hints a launch on contiguous
tensors gets), and write their PTX to OUT/. With `--compare DIR`,
compare each with DIR's PTX of the same name as a multiset of instructions (register numbers and
parameter indices left out), which tells whether two kernel versions compute the same thing the
same way up to instruction order. Also compiles the strided path (run-time head strides) in both
offset widths. Usage (repository root, any Triton version that has ASTSource):
    .venv/bin/python benchmarks/probes/s29/ptx_rope.py OUT [--compare DIR]
Session 29: OUT from commit 42348db (constexpr head strides, runs 4-5's kernel) against the
DENSE_HEADS kernel: the same instructions in all eight."""
import os
import re
import sys
from collections import Counter

os.environ["TRITON_INTERPRET"] = "0"
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ligerzoo.kernels.rope  # noqa: E402,F401

R = sys.modules["ligerzoo.kernels.rope"]
fn = R._rope_kernel.fn
names = fn.arg_names


def build(const, num_warps, ints):
    """PTX of the kernel with these constexprs; ``ints``: the run-time integers' values, which
    (with the pointers, 16-byte aligned) get Triton's divisibility-by-16 hint as a real launch
    would give them."""
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const:
            sig[n] = "constexpr"
        elif n in ("Q", "K", "QO", "KO", "COS", "SIN"):
            sig[n] = "*bf16" if n in ("Q", "K", "QO", "KO") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "i32"
            if ints[n] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    const = {k: v for k, v in const.items() if k in names}
    src = ASTSource(fn, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


def instructions(ptx):
    out = []
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line.startswith((".loc", ".file", ".param", "//", "$L__", ".section", ".b8", ".b32", ".b64")) \
                or "debug" in line:
            continue
        line = re.sub(r"_param_\d+", "_param_N", line)
        out.append(re.sub(r"%(r|rd|rs|f|p|fd|h|hh)\d+", r"%\1", line))
    return Counter(out)


CASES = {  # name: (n_qh, n_kh, half, n_pass, one_tile, block_hq, block_hk, has_pass, backward, half_table, warps)
    "llama3_w1": (32, 8, 64, 0, True, 32, 8, False, False, True, 1),
    "llama3_bwd_w1": (32, 8, 64, 0, True, 32, 8, False, True, True, 1),
    "llama2_w8": (32, 32, 64, 0, True, 32, 32, False, False, True, 8),
    "smollm2_w1": (9, 3, 32, 0, True, 16, 4, False, False, True, 1),
    "phi3mini_w2": (32, 32, 48, 0, True, 32, 32, False, False, True, 2),
    "phi4_partial_pass_w2": (24, 8, 48, 32, True, 32, 8, True, False, True, 2),
    "full_table_w4": (32, 8, 64, 0, True, 32, 8, False, False, False, 4),
    "blocks_w4": (128, 8, 64, 0, False, 16, 8, False, False, True, 4),
}
out = sys.argv[1]
other = sys.argv[sys.argv.index("--compare") + 1] if "--compare" in sys.argv else None
os.makedirs(out, exist_ok=True)
for name, (nq, nk, half, npass, one, bq, bk, hp, bw, ht, nw) in CASES.items():
    D = 2 * half + npass
    const = dict(N_QH=nq, N_KH=nk, HALF=half, N_PASS=npass, BACKWARD=bw, HALF_TABLE=ht, ONE_TILE=one,
                 BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_R=triton.next_power_of_2(half),
                 BLOCK_P=triton.next_power_of_2(npass) if npass else 1, HAS_PASS=hp, WIDE=False,
                 SQ_H=D, SK_H=D, SQO_H=D, SKO_H=D, DENSE_HEADS=True)  # the names this kernel version has
    T = 8192  # one sequence, contiguous (B, T, H, D) tensors, tables (1, T, R or R/2)
    ints = dict(sq_b=T * nq * D, sq_t=nq * D, sq_h=D, sk_b=T * nk * D, sk_t=nk * D, sk_h=D, sqo_b=T * nq * D,
                sqo_t=nq * D, sqo_h=D, sko_b=T * nk * D, sko_t=nk * D, sko_h=D, sc_b=0, sc_t=half if ht else 2 * half,
                ss_b=0, ss_t=half if ht else 2 * half, seq_len=T)
    ptx = build(const, nw, ints)
    open(f"{out}/{name}.ptx", "w").write(ptx)
    verdict = ""
    if other:
        a, b = instructions(open(f"{other}/{name}.ptx").read()), instructions(ptx)
        verdict = "the same instructions" if a == b else f"DIFFERENT: {dict(a - b)} against {dict(b - a)}"
    print(f"{name}: compiled {verdict}", flush=True)
if "DENSE_HEADS" in names:
    for wide in (False, True):
        const = dict(N_QH=16, N_KH=2, HALF=64, N_PASS=0, BACKWARD=False, HALF_TABLE=True, ONE_TILE=True,
                     BLOCK_HQ=16, BLOCK_HK=2, BLOCK_R=64, BLOCK_P=1, HAS_PASS=False, WIDE=wide, DENSE_HEADS=False)
        T = 4096  # a (B, H, T, D) buffer seen as (B, T, H, D)
        ints = dict(sq_b=16 * T * 128, sq_t=128, sq_h=T * 128, sk_b=2 * T * 128, sk_t=128, sk_h=T * 128,
                    sqo_b=16 * T * 128, sqo_t=16 * 128, sqo_h=128, sko_b=2 * T * 128, sko_t=2 * 128, sko_h=128,
                    sc_b=0, sc_t=64, ss_b=0, ss_t=64, seq_len=T)
        build(const, 1, ints)
        print(f"strided head strides, WIDE={wide}: compiled", flush=True)
