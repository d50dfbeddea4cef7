"""Every launch of a package kernel must be one DirectLaunch can relaunch directly: runtime values
by position, then every compile-time parameter by keyword (ligerzoo.kernels._utils.DirectLaunch
hands any other call to Triton's per-call binding: in session 29 that made rope's host-bound
benchmark step about a quarter slower, 1.10-1.17x Liger's instead of 0.87-0.90x). The
root conftest checks every launch the suite makes in its own process (the interpreter's
included; not those of workers started with mp.spawn, nor GPU-only paths on a CPU run), so a
launcher that passes a constexpr by position, leaves one to its default, or passes a tensor by
keyword fails the tests of its op."""
from __future__ import annotations

import functools
import inspect

import torch

_PARAMS: dict = {}


def python_fn(kernel):
    """The Python function under a JITFunction / InterpretedFunction (None for anything else)."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn if inspect.isfunction(fn) else None


def slow_path_reason(fn, args: tuple, kwargs: dict) -> str | None:
    """Why a launch of kernel ``fn`` with these arguments would miss DirectLaunch's relaunch (or,
    for a tensor by keyword, be refused by it on the GPU), or None."""
    if fn not in _PARAMS:
        params = inspect.signature(fn).parameters.values()
        names = [p.name for p in params]
        constexpr = ["constexpr" in str(p.annotation) for p in params]
        _PARAMS[fn] = (names, constexpr.index(True) if True in constexpr else len(names))
    names, n_runtime = _PARAMS[fn]
    tensors = [n for n, v in kwargs.items() if isinstance(v, torch.Tensor)]
    if tensors:
        return f"tensors by keyword (DirectLaunch raises TypeError for them on the GPU): {tensors}"
    if len(args) > n_runtime:
        return f"{len(args)} arguments by position, past its {n_runtime} run-time parameters ({names[n_runtime]} ...)"
    missing = [n for n in names[len(args):] if n not in kwargs]
    if missing:
        return f"parameters neither by position nor by keyword: {missing}"
    return None


def install() -> None:
    """Wraps DirectLaunch.__getitem__ so that a slow-path launch of a ligerzoo kernel raises."""
    from ligerzoo.kernels._utils import DirectLaunch

    if getattr(DirectLaunch.__getitem__, "_checked", False):
        return
    original = DirectLaunch.__getitem__

    @functools.wraps(original)
    def getitem(self, grid):
        launch = original(self, grid)
        fn = python_fn(self.fn)
        if fn is None or not fn.__module__.startswith("ligerzoo."):
            return launch

        def checked(*args, **kwargs):
            reason = slow_path_reason(fn, args, kwargs)
            if reason is not None:
                raise AssertionError(f"{fn.__module__}.{fn.__name__} launched off DirectLaunch's fast path: {reason}")
            return launch(*args, **kwargs)
        return checked

    getitem._checked = True
    DirectLaunch.__getitem__ = getitem
