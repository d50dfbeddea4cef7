"""Session 33: this session's model-level changes on a CUDA GPU (their CPU tests ran on the CPU).

- from_hf(device=DEV) through the new device check; a device index past the machine's is a
  ValueError naming it;
- generate against transformers on the GPU: greedy with the checkpoint's eos, an explicit
  eos_token_id=None (never stops, as transformers), pad_token_id=None (the first eos id);
  sampling at temperature 1e-300 equals greedy (float64 division);
- apply_activation_checkpointing(every=2) in fp32 (TF32 off): the loss and gradients of the plain model.
Asserts; prints what it compared."""
import sys
import tempfile

import torch
import transformers

sys.path.insert(0, ".")
import ligerzoo  # noqa: E402
from ligerzoo.parallel import apply_activation_checkpointing  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU (TRITON_INTERPRET=1) only to try the script
print(torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch.__version__, transformers.__version__, flush=True)
d = tempfile.mkdtemp()
cfg = transformers.LlamaConfig(vocab_size=301, hidden_size=256, intermediate_size=384, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, eos_token_id=[7, 11], pad_token_id=None,
                               bos_token_id=1)
torch.manual_seed(0)
hf = transformers.LlamaForCausalLM(cfg).eval()
hf.save_pretrained(d)
hf = hf.to(DEV)
ours = ligerzoo.from_hf(d, device=DEV)
assert ours.embed.weight.device.type == DEV
try:
    ligerzoo.from_hf(d, device=f"cuda:{torch.cuda.device_count()}" if DEV == "cuda" else "cuda")
    raise AssertionError("no error for a device index past the machine's")
except ValueError as e:
    print("refused:", str(e)[:160])

ids = torch.randint(12, 301, (3, 9), device=DEV, generator=torch.Generator(DEV).manual_seed(1))
with torch.no_grad():
    free = ours.generate(ids, 24, eos_token_id=[])
    for kwargs in ({}, dict(eos_token_id=None, pad_token_id=0), dict(pad_token_id=None)):
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          **({"pad_token_id": 0} if not kwargs else kwargs))
        got = ours.generate(ids, 24, **kwargs)
        same = got.tolist() == ref.tolist()
        print(f"generate {kwargs or 'defaults'}: {tuple(got.shape)} equal to transformers: {same}", flush=True)
        assert same
    assert ours.generate(ids, 24, eos_token_id=None, pad_token_id=0).tolist() == free.tolist()
    tiny = ours.generate(ids, 24, eos_token_id=[], temperature=1e-300, generator=torch.Generator(DEV).manual_seed(0))
    print("temperature 1e-300 equals greedy:", tiny.tolist() == free.tolist(), flush=True)
    assert tiny.tolist() == free.tolist()

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
labels = torch.randint(0, 301, (2, 64), device=DEV)
out = []
for every in (None, 2):
    torch.manual_seed(0)
    m = ligerzoo.from_hf(d, device=DEV).train()
    if every:
        apply_activation_checkpointing(m, every=every)
    loss = m(labels, labels=labels).loss
    loss.backward()
    out.append((loss.detach(), [p.grad.float() for p in m.parameters()]))
(l0, g0), (l1, g1) = out
err = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() for a, b in zip(g0, g1))
print(f"checkpointing every 2nd block, fp32: loss {l0.item():.6f} / {l1.item():.6f}, largest relative gradient "
      f"difference {err:.2e}", flush=True)
assert torch.allclose(l0, l1, rtol=1e-5) and err < 1e-4
print("gpu_smoke: all passed")
