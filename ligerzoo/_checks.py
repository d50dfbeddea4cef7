"""Argument checks shared by the data pipeline and the models."""
from __future__ import annotations

import numbers

import torch


def is_int(v) -> bool:
    """Whether ``v`` is an integer and not a bool: a Python or numpy int
    (``numbers.Integral``) or a 0-dim integer tensor."""
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
