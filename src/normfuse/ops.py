"""Custom ops, their fake (meta) implementations, autograd, and the choice of backend.

Two ops, both on 2-D row-major tensors (the front end flattens leading and normalized dims):

- ``normfuse::norm_fwd(x, weight?, bias?, eps, rms) -> (out, mean, rstd)``
- ``normfuse::norm_bwd(dy, x, weight?, mean, rstd, rms, need_dx, need_dweight, need_dbias)
  -> (dx, dweight, dbias)``; a gradient not asked for comes back as an empty tensor.

``rms`` selects RMSNorm in the same kernels. Registered with ``torch.library`` so autograd,
``torch.compile(fullgraph=True)`` and the dispatcher treat them as native ops. The backward of
the backward (double backward) goes through the differentiable reference formulas.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from normfuse import reference
from normfuse._dtypes import KERNEL_DTYPES, acc_dtype

BACKENDS = ("cpu", "triton", "reference")

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("normfuse_backend", default=None)
_warned_fallbacks: set[tuple[str, torch.dtype]] = set()


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend (``"cpu"``, ``"triton"`` or ``"reference"``) inside the block.

    ``None`` restores automatic choice. Overrides the ``NORMFUSE_BACKEND`` environment variable
    (which is read once, when normfuse is imported).
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown normfuse backend {name!r}; expected one of {', '.join(BACKENDS)}")
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


_loaded_backends: dict[str, ModuleType] = {}


def _load_backend(name: str) -> ModuleType:
    module = _loaded_backends.get(name)
    if module is None:
        module = _loaded_backends[name] = _import_backend(name)
    return module


def _import_backend(name: str) -> ModuleType:
    if name == "cpu":
        from normfuse.backends import cpu

        return cpu
    if name == "triton":
        from normfuse.backends import triton as triton_backend

        return triton_backend
    return reference


# Read once, at import, like numba's and torch's own environment settings: looking it up on
# every call would cost a sizeable share of a small op's latency.
_ENV_BACKEND = os.environ.get("NORMFUSE_BACKEND") or None


def _forced_name() -> str | None:
    name = _forced_backend.get() or _ENV_BACKEND
    if name is not None and name not in BACKENDS:
        raise ValueError(f"NORMFUSE_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def backend_name(x: Tensor) -> str:
    """The backend that will run for a tensor like ``x``: forced, else by device and dtype."""
    forced = _forced_name()
    if forced is not None:
        return forced
    if x.is_cpu and x.dtype in KERNEL_DTYPES:
        return "cpu"
    if x.device.type == "cuda" and _triton_available():
        return "triton"
    key = (x.device.type, x.dtype)
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        warnings.warn(
            f"normfuse has no kernel for {x.dtype} tensors on {x.device.type}; "
            "using the (slower) plain-torch reference implementation",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def backend_for(x: Tensor) -> ModuleType:
    return _load_backend(backend_name(x))


def _triton_available() -> bool:
    try:
        from normfuse.backends import triton as triton_backend
    except ImportError:
        return False
    return triton_backend.available()


@torch.library.custom_op("normfuse::norm_fwd", mutates_args=())
def norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """x (M, N) row-major -> out (M, N) in x's dtype, mean and rstd (M,) fp32 (fp64 for fp64)."""
    return backend_for(x).norm_fwd(x, weight, bias, eps, rms)


@norm_fwd.register_fake
def _norm_fwd_fake(x, weight, bias, eps, rms):
    acc = acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=acc), x.new_empty(x.shape[0], dtype=acc)


@torch.library.custom_op("normfuse::norm_bwd", mutates_args=())
def norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused gradients: dx (M, N) in x's dtype; dweight, dbias (N,) in the accumulation dtype."""
    dx, dweight, dbias = backend_for(x).norm_bwd(dy, x, weight, mean, rstd, rms, need_dx, need_dweight, need_dbias)
    empty = x.new_empty(0)
    acc_empty = x.new_empty(0, dtype=acc_dtype(x.dtype))
    return (
        dx if dx is not None else empty,
        dweight if dweight is not None else acc_empty,
        dbias if dbias is not None else acc_empty.clone(),
    )


@norm_bwd.register_fake
def _norm_bwd_fake(dy, x, weight, mean, rstd, rms, need_dx, need_dweight, need_dbias):
    acc = acc_dtype(x.dtype)
    n = x.shape[1]
    return (
        torch.empty_like(x) if need_dx else x.new_empty(0),
        x.new_empty(n if need_dweight else 0, dtype=acc),
        x.new_empty(n if need_dbias else 0, dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, rms = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.eps = eps
    ctx.rms = rms
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _gradients(ctx, dout: Tensor, fused_bwd) -> tuple:
    """The backward shared by the custom op and the eager autograd.Function."""
    x, weight, mean, rstd = ctx.saved_tensors
    need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        # create_graph=True: return gradients that are themselves differentiable
        dx, dweight, dbias = reference.norm_bwd_differentiable(dout, x, weight, ctx.eps, ctx.rms)
    else:
        dx, dweight, dbias = fused_bwd(
            dout.contiguous(), x, weight, mean, rstd, ctx.rms, need_dx, need_dweight, need_dbias
        )
    return (
        dx if need_dx else None,
        dweight.to(weight.dtype) if need_dweight else None,
        dbias.to(ctx.bias_dtype) if need_dbias else None,
        None,
        None,
    )


def _backward(ctx, dout, _dmean, _drstd):
    return _gradients(ctx, dout, torch.ops.normfuse.norm_bwd)


norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class NormFunction(torch.autograd.Function):
    """The eager path for plain tensors: the same kernels and backward as the custom ops,
    without the dispatcher's round trips (about 70 us a call on the CPU here, more than the
    whole op on small inputs). Compiled graphs, tensor subclasses (DTensor, FSDP) and exports
    go through ``torch.ops.normfuse``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool) -> Tensor:
        out, mean, rstd = backend_for(x).norm_fwd(x, weight, bias, eps, rms)
        _setup_context(ctx, (x, weight, bias, eps, rms), (out, mean, rstd))
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        def fused_bwd(*args):
            return backend_for(args[1]).norm_bwd(*args)

        return _gradients(ctx, dout, fused_bwd)
