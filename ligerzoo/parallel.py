"""Training-time wrappers applied from outside the model (as torchtitan does): activation
checkpointing per decoder block and FSDP2 sharding. The model code knows nothing of them."""
from __future__ import annotations

import torch
from torch import nn

from ligerzoo._checks import is_int


def apply_activation_checkpointing(model: nn.Module, *, every: int = 1) -> nn.Module:
    """Recompute decoder blocks' activations in backward instead of storing them
    (``torch.utils.checkpoint``, non-reentrant). In place; returns ``model``.

    ``every=1`` (full checkpointing) wraps every block: activation memory drops from O(layers)
    blocks to one block plus the block inputs, for one extra forward of compute. ``every=k``
    wraps blocks 0, k, 2k, ... only (torchtitan's selective layer checkpointing): about 1/k of
    the saving for 1/k of the recompute.

    A wrapped block recomputes its forward less its last matmul in dense blocks without
    post-norms: it is marked ``Block.checkpointed``, which runs its down projection as a plain
    op, so that the checkpoint's recomputation stops before it (Gemma2's post-norm and MoE
    layers save tensors after their last matmul, so they recompute the whole block). The mark
    also makes the model add the residual before the block, which then keeps one (B, T, H)
    input rather than two. Blocks with Mixtral's router jitter preserve the RNG state, so the
    recomputation draws the same noise.

    Args:
        model: a :class:`ligerzoo.CausalLM` (what is used is its ``layers`` ModuleList of
            decoder blocks).
        every: an int >= 1: checkpoint one block in ``every``.

    Raises:
        AttributeError: ``model`` has no ``layers``.
        ValueError: ``every`` not an int >= 1.
    """
    if not (is_int(every) and every >= 1):
        raise ValueError(f"every must be an int >= 1 (1 checkpoints every block), got {every!r}")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        if i % int(every):
            continue
        block.checkpointed = True
        # The recomputed forward must draw the same random numbers (Mixtral's router jitter).
        random = any(getattr(m, "jitter", 0) > 0 for m in block.modules())
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=random)
    return model


def apply_fsdp(model: nn.Module, mesh=None, *, mp_dtype: torch.dtype | None = torch.bfloat16,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard with FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder block is one
    unit, then the root (embedding, final norm, head). ``mp_dtype`` sets the parameter dtype
    for compute, and gradients are then reduced in fp32 (with ``mp_dtype=None`` parameters,
    compute and reduction keep the parameters' own dtype). Forward inputs are not cast: the
    fp32 RoPE tables each block receives stay fp32 and a float ``num_items_in_batch`` keeps
    its value, so a sharded model computes what the same model computes in ``mp_dtype`` on
    one process (FSDP2's default ``cast_forward_inputs`` would round both). Call after ``torch.distributed`` is
    initialised (e.g. under ``torchrun``). ``model.generate`` then works on the sharded model
    (every rank calls it), and ``ligerzoo.save_hf`` gathers the full weights (every rank
    calls it; rank 0 writes). In place; returns model.

    Args:
        model: a :class:`ligerzoo.CausalLM` (its ``layers`` are sharded one by one).
        mesh: the ``DeviceMesh`` to shard over; None: FSDP2's default, all ranks of the
            default process group.
        mp_dtype: compute dtype of the parameters (bf16 by default), or None.
        reshard_after_forward: free the gathered parameters after each unit's forward (and
            gather them again in backward), as ``fully_shard``'s option.

    Raises:
        ValueError: ``mp_dtype`` neither None nor a floating dtype (checked before any
            sharding); from ``torch.distributed`` when no process group is initialised and
            ``fully_shard`` cannot initialise one from the environment (``RANK`` etc.
            unset).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if mp_dtype is not None and not (isinstance(mp_dtype, torch.dtype) and mp_dtype.is_floating_point):
        raise ValueError(f"mp_dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {mp_dtype!r}")
    mp = (MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
          if mp_dtype else MixedPrecisionPolicy(cast_forward_inputs=False))
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # generate() and hidden_states() reach the root's parameters outside forward(): they gather them too
    register_fsdp_forward_method(model, "generate")
    register_fsdp_forward_method(model, "hidden_states")
    return model
