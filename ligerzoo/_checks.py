"""Argument checks shared by the data pipeline, the models and the kernels, and the one way
the package warns its user."""
from __future__ import annotations

import contextlib
import contextvars
import numbers
import os
import sys
import warnings

import torch
from torch import nn


def is_int(v) -> bool:
    """Whether ``v`` is an integer and not a bool: a Python or numpy int
    (``numbers.Integral``) or a 0-dim integer tensor."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_QUIET = contextvars.ContextVar("ligerzoo_quiet", default=False)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside the ligerzoo package: the user's
    line that called into it, however deep inside the package the warning is raised (Python
    3.12's ``skip_file_prefixes``, for 3.11). Nothing inside :func:`quiet`."""
    if _QUIET.get():
        return
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn_user's caller

    def inside(f) -> bool:
        name = f.f_code.co_filename  # "<string>", "<stdin>": never the package's, whatever the cwd
        return not name.startswith("<") and os.path.abspath(name).startswith(_PACKAGE_DIR)

    while frame is not None and inside(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@contextlib.contextmanager
def quiet():
    """No :func:`warn_user` warnings inside (this thread or task only; the warnings filters,
    which are process-wide, are left alone): for the package's own second reading of something
    the user was already warned about."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def any_dtensor(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor (a model sharded by FSDP2 or tensor
    parallelism: its forward is a collective that every rank must run)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in tensors)


def fsdp_modules(model) -> list:
    """The FSDP2 units (``fully_shard``-ed modules) in ``model``; [] without torch.distributed."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_real(v) -> bool:
    """Whether ``v`` is a real number and not a bool: a Python or numpy int or float
    (``numbers.Real``) or a 0-dim real tensor."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_real(name: str, v) -> float:
    """``v`` as a Python float; ValueError naming ``name`` for anything that is not a real
    number (a string, a bool, None, a tensor of more than 0 dims)."""
    if not is_real(v):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    return float(v)


def _no_hooks(module: nn.Module) -> bool:
    """Whether no forward (pre-)hook, the module's own or a global one, sees ``module``'s call."""
    return not (module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is exactly an ``nn.Linear`` with no hooks, so that calling it is the
    same as ``x W^T + b`` and its output is not seen by anyone else; anything else (a LoRA or
    quantised wrapper, a forward hook, a ``forward`` replaced on the instance, as accelerate's
    hooks do) is called as a module instead of being fused, and its output is never
    overwritten."""
    return type(module) is nn.Linear and _no_hooks(module) and "forward" not in module.__dict__
