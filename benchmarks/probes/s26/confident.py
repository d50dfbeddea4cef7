"""Session 26's check of the loss kernels' log-probs on the H200: fp32 rows of 128256 logits confident
at |z| ~ 1000 through cross_entropy (the Hopper kernel), the largest relative error of each row's
loss and of the target's gradient against float64. Run against a given package:
    mkdir -p /tmp/old && git archive e175fda ligerzoo | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python3 benchmarks/probes/s26/confident.py old   # 2.72e-03 in session 26
    PYTHONPATH=$PWD python3 benchmarks/probes/s26/confident.py new       # 1.30e-04
"""
import sys, torch
from ligerzoo.kernels.cross_entropy import cross_entropy
n, v = 16, 128256
z_t = 1000.0 + 0.37 * torch.arange(n, dtype=torch.float64, device="cuda")
logits = (z_t[:, None] - 17.0).expand(n, v).contiguous()
target = torch.arange(n, device="cuda") * 7919
logits[torch.arange(n, device="cuda"), target] = z_t
logits = logits.float()
x = logits.clone().requires_grad_()
go = torch.linspace(0.5, 1.5, n, device="cuda")
loss = cross_entropy(x, target, reduction="none"); loss.backward(go)
z64 = logits.double().requires_grad_()
ref = torch.nn.functional.cross_entropy(z64, target, reduction="none"); ref.backward(go.double())
le = ((loss.detach().double() - ref) / ref).abs().max().item()
tg = x.grad.double()[torch.arange(n), target]; rg = z64.grad[torch.arange(n), target]
ge = ((tg - rg) / rg).abs().max().item()
print(f"{sys.argv[1]}: loss max rel err {le:.2e}, target-grad max rel err {ge:.2e}")
