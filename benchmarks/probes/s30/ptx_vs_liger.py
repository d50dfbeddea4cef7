"""Session 30 probe (CPU, no GPU): rope's kernel and Liger's compiled for sm_90 by Triton's compiler
(the wheel's ptxas), for Qwen2.5-7B's, Llama-3's and Gemma2's heads under 1 and 4 warps; prints each
PTX's count of loads and stores (by width), conversions and arithmetic, and writes the PTX to OUT/.
Liger's package is imported from LIGER_PATH (default /tmp/lk: the liger-kernel 0.8.5 wheel
unzipped). Usage: .venv/bin/python benchmarks/probes/s30/ptx_vs_liger.py OUT"""
import os, re, sys
from collections import Counter
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.environ.get("LIGER_PATH", "/tmp/lk"))
OUT = sys.argv[1]
os.makedirs(OUT, exist_ok=True)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import ligerzoo.kernels.rope
R = sys.modules["ligerzoo.kernels.rope"]
import liger_kernel.ops.rope as L

def comp(fn, sig, const, attrs, nw):
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
    return k.asm["ptx"], k.asm.get("sass"), k.n_regs if hasattr(k, "n_regs") else None

def ours(nq, nk, half, bq, bk, nw, T=8192, bw=False):
    fn = R._rope_kernel.fn; names = fn.arg_names; D = 2 * half
    const = dict(N_QH=nq, N_KH=nk, HALF=half, N_PASS=0, BACKWARD=bw, HALF_TABLE=True, ONE_TILE=True,
                 BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_R=triton.next_power_of_2(half), BLOCK_P=1, HAS_PASS=False, WIDE=False,
                 SQ_H=D, SK_H=D, SQO_H=D, SKO_H=D, DENSE_HEADS=True)
    ints = dict(sq_b=T*nq*D, sq_t=nq*D, sq_h=D, sk_b=T*nk*D, sk_t=nk*D, sk_h=D, sqo_b=T*nq*D, sqo_t=nq*D, sqo_h=D,
                sko_b=T*nk*D, sko_t=nk*D, sko_h=D, sc_b=0, sc_t=half, ss_b=0, ss_t=half, seq_len=T)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const: sig[n] = "constexpr"
        elif n in ("Q", "K", "QO", "KO", "COS", "SIN"):
            sig[n] = "*bf16" if n in ("Q", "K", "QO", "KO") else "*fp32"; attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "i32"
            if ints[n] % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
    return comp(fn, sig, {k: v for k, v in const.items() if k in names}, attrs, nw)

def liger(nq, nk, hd, nw, T=8192, bw=False):
    fn = L._triton_rope; names = fn.arg_names
    p = triton.next_power_of_2
    const = dict(bs=1, cos_bs=1, n_qh=nq, n_kh=nk, hd=hd, pad_n_qh=p(nq), pad_n_kh=p(nk), pad_hd=p(hd), pad_rd=p(hd),
                 rd=hd, BLOCK_SIZE=max(p(nq), p(nk)), BACKWARD_PASS=bw)
    ints = dict(q_row_stride=nq*hd, k_row_stride=nk*hd, cos_row_stride=hd, sin_row_stride=hd, sl=T)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in const: sig[n] = "constexpr"
        elif n in ("q_ptr", "k_ptr", "cos", "sin"):
            sig[n] = "*bf16"; attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "i32"
            if ints[n] % 16 == 0: attrs[(i,)] = [["tt.divisibility", 16]]
    return comp(fn, sig, const, attrs, nw)

def summary(ptx):
    c = Counter()
    for line in ptx.splitlines():
        line = line.strip()
        m = re.match(r"(@!?%p\d+\s+)?([a-z][\w.]*)", line)
        if not m or line.startswith((".", "//", "$")): continue
        op = m.group(2)
        if op.startswith(("ld.global", "st.global", "cvt", "fma", "mul", "sub", "add", "mad", "setp", "selp", "mov", "shl", "and", "or", "bar")):
            key = op if op.startswith(("ld.", "st.")) else op.split(".")[0]
            c[key + (" (pred)" if m.group(1) else "")] += 1
    return dict(sorted(c.items()))

for name, (nq, nk, half, bq, bk) in {"qwen7b": (28, 4, 64, 32, 4), "llama3": (32, 8, 64, 32, 8), "gemma2": (16, 8, 128, 16, 8)}.items():
    for nw in (1, 4):
        p1, *_ = ours(nq, nk, half, bq, bk, nw)
        p2, *_ = liger(nq, nk, 2 * half, nw)
        print(f"== {name} {nw} warps\n ours : {summary(p1)}\n liger: {summary(p2)}", flush=True)
        open(f"{OUT}/{name}_w{nw}_ours.ptx", "w").write(p1); open(f"{OUT}/{name}_w{nw}_liger.ptx", "w").write(p2)
