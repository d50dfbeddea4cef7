"""Helpers shared by the kernel tests (tests/kernels/test_*.py).

Tolerance checks (relative to each element plus, as a floor, a magnitude scale), the
float64 generalised-JSD oracle, fixtures that switch between the Triton and the torch
reference paths, and the torch.compile-vs-eager comparison.

Fixtures defined here are used by importing them into the test module
(``from tests.kernels.helpers import path``): pytest collects fixtures from module globals.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import ligerzoo.kernels._utils as kutils

# The float dtypes most kernel tests run with.
FLOAT_DTYPES = [torch.float32, torch.bfloat16]
parametrize_dtype = pytest.mark.parametrize("dtype", FLOAT_DTYPES)


def kernel_module(name: str):
    """The op module ``ligerzoo.kernels.<name>`` itself (the package re-exports functions
    under the same names, so ``from ligerzoo.kernels import rope`` would give the function)."""
    return importlib.import_module(f"ligerzoo.kernels.{name}")


# ----------------------------------------------------------------------- tolerances
def assert_close_rel(actual, expected, tol, scale=None):
    """|a - e| <= tol * (|e| + scale) elementwise, compared in float64.

    ``scale`` (the absolute floor's magnitude) defaults to max|e|; it is never below 1e-30.
    ``expected`` is moved to ``actual``'s device (a float64 CPU oracle for a GPU result).
    """
    e = expected.detach().double().to(actual.device)
    scale = float(e.abs().max()) if scale is None else float(scale)
    torch.testing.assert_close(actual.detach().double(), e, rtol=tol, atol=tol * max(scale, 1e-30))


def assert_close_ulps(actual, expected, dtype, ulps, scale=None):
    """|a - e| <= ulps * eps(dtype) * (|e| + scale), scale = max|e| by default."""
    assert_close_rel(actual, expected, ulps * torch.finfo(dtype).eps, scale=scale)


# ----------------------------------------------------------------------- dispatch paths
def force_reference_path(monkeypatch):
    """Make every ligerzoo kernel dispatch to its torch reference (``use_triton`` -> False)."""
    monkeypatch.setattr(kutils, "use_triton", lambda t: False)


@pytest.fixture
def force_reference(monkeypatch):
    """The torch-reference dispatch for the whole test."""
    force_reference_path(monkeypatch)


@pytest.fixture(params=["triton", "reference"])
def path(request, monkeypatch):
    """Runs the test twice: through the Triton kernels and through the forced reference dispatch."""
    if request.param == "reference":
        force_reference_path(monkeypatch)
    return request.param


def small_blocks_fixture(module, block_size: int):
    """An autouse fixture capping ``module.MAX_BLOCK_SIZE`` at ``block_size`` (so the small test
    vocabularies span several blocks, the last one partial). Assign it to a module global."""

    @pytest.fixture(autouse=True)
    def _small_blocks(monkeypatch):
        monkeypatch.setattr(module, "MAX_BLOCK_SIZE", block_size)

    return _small_blocks


# ----------------------------------------------------------------------- oracles
def jsd_rows64(x, y, beta):
    """float64 per-row generalised JSD from torch's kl_div (kl_div(a, b, log_target) = KL(b || a))."""
    kl = lambda inp, tgt: F.kl_div(inp, tgt, reduction="none", log_target=True).sum(-1)  # noqa: E731
    if beta == 0.0:
        return kl(x, y)                                   # KL(teacher || student)
    if beta == 1.0:
        return kl(y, x)                                   # KL(student || teacher)
    log_m = torch.logsumexp(torch.stack([y + math.log(beta), x + math.log(1 - beta)]), 0)
    return beta * kl(log_m, y) + (1 - beta) * kl(log_m, x)


# ----------------------------------------------------------------------- torch.compile
def assert_compiled_matches_eager(f, leaves, *args, grad_out=None, backend=None):
    """``f(*leaves, *args)`` compiled with fullgraph=True and run eagerly: the outputs and the
    gradients of the leaves (fresh clones requiring grad, backward with ``grad_out``) must agree
    to torch's default tolerances. -> [(out, *grads) compiled, (out, *grads) eager]."""
    kw = {} if backend is None else dict(backend=backend)
    outs = []
    for fn in (torch.compile(f, fullgraph=True, **kw), f):
        ps = [t.clone().requires_grad_() for t in leaves]
        out = fn(*ps, *args)
        out.backward(grad_out)
        outs.append((out.detach(), *[p.grad for p in ps]))
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r)
    return outs
