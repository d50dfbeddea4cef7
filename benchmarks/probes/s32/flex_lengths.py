"""Session 32: does flex.attention train (forward + backward, softcap 50, causal GQA 4/2) over a
run of lengths in one process, as a model with variable batches calls it? 16-bit heads of 256
(sm90 tiles) and of 128 (torch's tiles), and 256 with torch's tiles (SM90_HEAD256_OPTIONS None)."""
import sys
import torch
from ligerzoo.models import flex

for D, tiles in ((256, True), (128, True), (256, False)):
    if not tiles:
        flex.SM90_HEAD256_OPTIONS = None
    for T in (700, 900, 1300, 2048):
        q, k, v = (torch.randn(2, n, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (4, 2, 2))
        try:
            flex.attention(q, k, v, None, D ** -0.5, 50.0).float().square().sum().backward()
            print(f"D {D} tiles {tiles} T {T}: ok", flush=True)
        except Exception as e:
            print(f"D {D} tiles {tiles} T {T}: {type(e).__name__}: {str(e)[:200]}", flush=True)
sys.exit(0)
