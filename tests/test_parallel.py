"""Activation checkpointing changes memory, not math: same loss and gradients."""
import pytest
import torch

import ligerzoo
from ligerzoo.parallel import apply_activation_checkpointing


def test_activation_checkpointing_same_loss_and_grads():
    cfg = ligerzoo.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    torch.manual_seed(0)
    a = ligerzoo.CausalLM(cfg)
    b = ligerzoo.CausalLM(cfg)
    b.load_state_dict(a.state_dict())
    apply_activation_checkpointing(b)
    ids = torch.randint(0, 97, (2, 9))
    la, lb = a(ids, labels=ids).loss, b(ids, labels=ids).loss
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("every", [2, 3, 9])
def test_checkpointing_every_kth_block_same_loss_and_grads_and_recomputes_only_those(every):
    """every=k wraps blocks 0, k, 2k, ... (mixed with plain blocks: the residual hand-off
    differs between the two kinds); the loss and gradients equal the plain model's, and backward
    recomputes 3 matmuls per wrapped block only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    mm = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.out}

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in mm
            return func(*args, **(kwargs or {}))

    cfg = ligerzoo.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    ids = torch.randint(0, 97, (2, 9))
    losses, grads, counts = [], [], []
    for k in (None, every):
        torch.manual_seed(0)
        model = ligerzoo.CausalLM(cfg)
        if k is not None:
            apply_activation_checkpointing(model, every=k)
            wrapped = [getattr(layer, "checkpointed", False) for layer in model.layers]
            assert wrapped == [i % k == 0 for i in range(cfg.num_hidden_layers)]
        loss = model(ids, labels=ids).loss
        with CountMatmuls() as c:
            loss.backward()
        losses.append(loss)
        grads.append([(n, p.grad) for n, p in model.named_parameters()])  # wrapping keeps the order
        counts.append(c.n)
    torch.testing.assert_close(losses[0], losses[1])
    for (n, g), (m, h) in zip(*grads, strict=True):
        assert m.replace("._checkpoint_wrapped_module", "") == n
        torch.testing.assert_close(h, g, msg=lambda e: f"{n}: {e}")
    assert counts[1] - counts[0] == 3 * len(range(0, cfg.num_hidden_layers, every))
    for bad in (0, -1, 1.0, True, None):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            apply_activation_checkpointing(ligerzoo.CausalLM(cfg), every=bad)


def test_checkpointed_blocks_skip_the_last_matmul_when_recomputing():
    """In backward, a checkpointed block recomputes its forward up to its last saved tensor.
    The blocks end with a plain down projection whose input is saved before its matmul runs,
    so each block recomputes 3 of its 4 projection matmuls (qkv, o, gate|up), as a plain
    transformers layer does; and the model hands each block one input (the residual sum)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    mm = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.out}

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func in mm
            return func(*args, **(kwargs or {}))

    cfg = ligerzoo.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 64, (2, 8))
    counts, inputs = [], []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = ligerzoo.CausalLM(cfg)
        if checkpoint:
            apply_activation_checkpointing(model)
            assert all(layer.checkpointed for layer in model.layers)
            model.layers[1].register_forward_pre_hook(lambda mod, args: inputs.append(args[5]))  # delta
        loss = model(ids, labels=ids).loss
        with CountMatmuls() as c:
            loss.backward()
        counts.append(c.n)
    assert counts[1] - counts[0] == 3 * cfg.num_hidden_layers
    assert inputs == [None]


def test_save_hf_sees_through_checkpoint_wrappers(tmp_path):
    from tests.helpers import make_hf_llama, read_safetensors_dir

    make_hf_llama(tmp_path / "hf")
    model = apply_activation_checkpointing(ligerzoo.from_hf(tmp_path / "hf"))
    ligerzoo.save_hf(model, tmp_path / "out")
    src, out = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "out")
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)


def _fsdp_worker(rank, world, port, src, out, results):
    """One rank of test_fsdp_generate_and_save_hf (gloo on the CPU)."""
    import torch.distributed as dist

    from ligerzoo.parallel import apply_fsdp

    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=60))  # a rank left waiting fails the test
    try:
        model = ligerzoo.from_hf(src)
        prompts = torch.randint(3, model.config.vocab_size, (world, 2, 5), generator=torch.Generator().manual_seed(0))
        ids = prompts[0]
        plain = model.generate(ids, 4, eos_token_id=[])
        # ranks that stop at different steps: rank 0's first new token is the eos
        eos = int(model.generate(prompts[0, :1], 1, eos_token_id=[])[0, -1])
        plain_stop = model.generate(prompts[rank, :1], 4, eos_token_id=eos)
        apply_fsdp(model, mp_dtype=None)
        sharded = model.generate(ids, 4, eos_token_id=[])
        sharded_stop = model.generate(prompts[rank, :1], 4, eos_token_id=eos)
        try:
            model.generate(ids, (0, 3)[rank], eos_token_id=[])  # rank 0 would return at once
            uneven = "no error"
        except ValueError as e:
            uneven = str(e)
        saved = ligerzoo.save_hf(model, out, max_shard_size="40KB")
        try:
            ligerzoo.save_hf(model, out)  # not empty: every rank raises rank 0's error
            again = "no error"
        except FileExistsError as e:
            again = str(e)
        torch.save(dict(plain=plain, sharded=sharded, plain_stop=plain_stop, sharded_stop=sharded_stop,
                        uneven=uneven, saved=str(saved), again=again), f"{results}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_generate_and_save_hf(tmp_path):
    """A model sharded with FSDP2 over 2 CPU ranks (gloo) generates what the plain model
    does, also when one rank's rows stop early (it keeps stepping with the others: each
    forward is a collective; it used to leave the other rank waiting), refuses different
    max_new_tokens on every rank, and saves the same checkpoint (rank 0 writes the gathered
    tensors, bit for bit); an error on rank 0 reaches every rank instead of leaving them in a
    collective."""
    import socket

    import torch.multiprocessing as mp

    from tests.helpers import make_hf_llama, read_safetensors_dir

    make_hf_llama(tmp_path / "src")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "results").mkdir()
    mp.spawn(_fsdp_worker, args=(2, port, str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "results")),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / "results" / f"{r}.pt") for r in range(2)]
    assert ranks[0]["plain_stop"].shape[1] == 6 and ranks[1]["plain_stop"].shape[1] > 6  # they stop apart
    for r in ranks:
        assert torch.equal(r["sharded"], r["plain"])
        assert torch.equal(r["sharded_stop"], r["plain_stop"])
        assert "same max_new_tokens on every rank" in r["uneven"]
        assert r["saved"] == str(tmp_path / "out")
        assert "exists and is not empty" in r["again"]
    src, out = read_safetensors_dir(tmp_path / "src"), read_safetensors_dir(tmp_path / "out")
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # sharded files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "results", "src"]  # no temp dir left


def _fsdp_mixed_precision_worker(rank, world, port, src, results):
    """One rank of test_fsdp_bf16_computes_what_one_process_does (gloo on the CPU)."""
    import copy

    import torch.distributed as dist

    from ligerzoo.parallel import apply_fsdp

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        model = ligerzoo.from_hf(src).train()
        plain = copy.deepcopy(model).to(torch.bfloat16)
        sharded = apply_fsdp(copy.deepcopy(model))                       # mp_dtype=torch.bfloat16
        seen = []
        sharded.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[1].dtype))  # (x, cos, sin, ...)
        ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        pos = (torch.arange(12) + 8000)[None].expand(2, 12)               # where bf16 tables would be coarse
        with torch.no_grad():
            out = dict(
                plain=plain(ids, labels=ids, position_ids=pos).loss,
                sharded=sharded(ids, labels=ids, position_ids=pos).loss,
                count_int=sharded(ids, labels=ids, num_items_in_batch=4099).loss,
                count_float=sharded(ids, labels=ids, num_items_in_batch=torch.tensor(4099.0)).loss,
                cos_dtype=str(seen[0]))
        torch.save(out, f"{results}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_bf16_computes_what_one_process_does(tmp_path):
    """apply_fsdp's bf16 mixed precision casts the parameters only: the fp32 RoPE tables
    reach each block in fp32 and a float num_items_in_batch is not rounded to bf16, so the
    sharded model's loss is the plain bf16 model's (1 rank, gloo)."""
    import socket

    import torch.multiprocessing as mp

    from tests.helpers import make_hf_llama

    make_hf_llama(tmp_path / "src", max_position_embeddings=16384)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "results").mkdir()
    mp.spawn(_fsdp_mixed_precision_worker, args=(1, port, str(tmp_path / "src"), str(tmp_path / "results")),
             nprocs=1, join=True)
    r = torch.load(tmp_path / "results" / "0.pt")
    assert r["cos_dtype"] == "torch.float32"
    torch.testing.assert_close(r["sharded"], r["plain"], rtol=1e-6, atol=0)
    assert torch.equal(r["count_float"], r["count_int"])


@pytest.mark.parametrize("bad", [torch.int64, "bfloat16"])
def test_fsdp_refuses_a_non_float_mp_dtype_before_sharding(bad):
    """It used to shard, then fail at the first forward."""
    from ligerzoo.parallel import apply_fsdp

    model = ligerzoo.CausalLM(ligerzoo.ModelConfig(model_type="llama", vocab_size=32, hidden_size=16,
                                                   intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="mp_dtype must be a floating torch.dtype"):
        apply_fsdp(model, mp_dtype=bad)


def _ddp_and_fsdp_gathered_worker(rank, world, port, src, out, results):
    """One rank of test_ddp_static_graph_and_fsdp_without_resharding (gloo on the CPU)."""
    import copy
    import datetime

    import torch.distributed as dist

    from ligerzoo.parallel import apply_fsdp

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = ligerzoo.from_hf(src)
        ids = torch.randint(3, model.config.vocab_size, (2 * world, 9), generator=torch.Generator().manual_seed(1))
        ref = copy.deepcopy(model)
        ref(ids, labels=ids).loss.backward()  # one process, the whole batch
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model), static_graph=True)
        ddp(ids[2 * rank: 2 * rank + 2], labels=ids[2 * rank: 2 * rank + 2]).loss.backward()
        ddp_err = max((p.grad - q.grad).abs().max().item() for p, q in zip(ddp.module.parameters(), ref.parameters()))
        with torch.no_grad():  # FSDP's bf16 compute is the bf16 model's on one process
            plain_h = copy.deepcopy(model).to(torch.bfloat16).hidden_states(ids[:2]).float()
        apply_fsdp(model, mp_dtype=torch.bfloat16, reshard_after_forward=False)
        model.generate(ids[:1, :4], 2, eos_token_id=[])  # leaves the root's parameters gathered, in bf16
        with torch.no_grad():
            sharded_h = model.hidden_states(ids[:2])  # registered as an FSDP forward method
        ligerzoo.save_hf(model, out)
        torch.save(dict(ddp_err=ddp_err, h_err=((sharded_h.float() - plain_h).norm() / plain_h.norm()).item()),
                   f"{results}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_static_graph_and_fsdp_without_resharding(tmp_path):
    """DDP with static_graph=True finds the loss inside CausalLMOutput (a pytree node) and
    all-reduces: the gradients equal one process's on the whole batch (they used to stay each
    rank's own). With reshard_after_forward=False a forward leaves bf16 gathered parameters
    behind; save_hf reshards first and writes the fp32 weights once, bit for bit (every rank
    used to write bf16 copies, one failing). hidden_states runs on the sharded model."""
    import socket

    import torch.multiprocessing as mp

    from tests.helpers import make_hf_llama, read_safetensors_dir

    make_hf_llama(tmp_path / "src")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "results").mkdir()
    mp.spawn(_ddp_and_fsdp_gathered_worker,
             args=(2, port, str(tmp_path / "src"), str(tmp_path / "out"), str(tmp_path / "results")),
             nprocs=2, join=True)
    for r in range(2):
        res = torch.load(tmp_path / "results" / f"{r}.pt")
        assert res["ddp_err"] < 1e-6, res
        assert res["h_err"] < 1e-3, res  # against the bf16 model on one process (norm-wise)
    src, out = read_safetensors_dir(tmp_path / "src"), read_safetensors_dir(tmp_path / "out")
    assert sorted(src) == sorted(out) and all(torch.equal(src[k], out[k]) for k in src)
