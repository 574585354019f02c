"""Custom ops, their fake (meta) implementations, autograd, and the choice of backend.

Two ops, both on 2-D row-major tensors (the front end flattens leading and normalized dims):

- ``normfuse::norm_fwd(x, residual?, weight?, bias?, eps, rms, residual_out_dtype?, dropout_p,
  seed?, return_mask, xhat_dtype?, out_dtype?, rstd_dtype?) -> (out, residual_out, mean, rstd, mask)``
- ``normfuse::norm_bwd(dy, dresidual_out?, h, weight?, mean, rstd, rms, add, dropout_p, seed?,
  x_dtype, residual_dtype?, need_dx, need_dresidual, need_dweight, need_dbias)
  -> (dx, dresidual, dweight, dbias)``; a gradient not asked for comes back as an empty tensor.

Every variant is an option of these two ops and a flag of the same kernels: ``rms`` is
RMSNorm; a ``residual_out_dtype`` makes it the pre-norm step ``h = dropout(x) + residual``,
``out = norm(h)`` returning h as ``residual_out`` (the backward then takes h as its input and
adds the gradient arriving at ``residual_out``); ``xhat_dtype`` rounds x-hat before the weight
multiply, ``rstd_dtype`` rounds rstd before it multiplies (the backward takes both roundings as
the identity, as autograd does a cast, and the saved rstd is not rounded). A weight offset
(Gemma's ``1 + w``) is applied by the front end to the weight it passes in: the gradient of the
offset weight is the weight's gradient (direct CPU inference calls hand it to the kernel). The dropout mask is a
hash of ``seed`` (a 0-d int64 tensor drawn from torch's generator) and the element's position,
recomputed by the backward instead of stored (``normfuse._dropout``). Registered with ``torch.library`` so autograd,
``torch.compile(fullgraph=True)`` and the dispatcher treat them as native ops. The backward of
the backward (double backward) goes through the differentiable reference formulas.

Eager calls on plain tensors skip the dispatcher (``NormFunction``); under torch.func transforms
and forward-mode AD ``NormFunctionForTransforms`` adds what those need (``setup_context``, a
forward-mode derivative, a vmap rule folding the vmapped dim into rows).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

try:  # the frame-evaluation hook Dynamo sets while it may compile frames (None in plain eager code)
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _eval_frame_callback
except ImportError:  # a torch without it: always guard

    def _eval_frame_callback() -> object:
        return True


from normfuse import _dropout, reference
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

        if not triton_backend.available():
            # forced (use_backend, NORMFUSE_BACKEND) where the kernels cannot run: say so at once,
            # not with outputs that were never written
            raise RuntimeError(f"normfuse's Triton backend needs {triton_backend.WHERE_IT_RUNS}")
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
    if x.is_cuda and _triton_available():
        return "triton"
    key = (x.device.type, x.dtype)
    # meta tensors (shapes only: init_empty_weights, FLOP counters) lose no speed on the reference
    if key not in _warned_fallbacks and not x.is_meta:
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


_triton_usable: bool | None = None


def _triton_available() -> bool:
    # asked on every CUDA call: answered once (the import and torch.cuda's query cost microseconds)
    global _triton_usable
    if _triton_usable is None:
        try:
            from normfuse.backends import triton as triton_backend
        except ImportError:
            _triton_usable = False
        else:
            _triton_usable = triton_backend.available()
    return _triton_usable


@torch.library.custom_op("normfuse::norm_fwd", mutates_args=())
def norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
    residual_out_dtype: torch.dtype | None,
    dropout_p: float,
    seed: Tensor | None,
    return_mask: bool,
    xhat_dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
    rstd_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, residual_out, mean, rstd, mask); see ``normfuse.backends.cpu.norm_fwd``.

    Absent outputs (no residual add, no mask asked for) are empty tensors.
    """
    out, h, mean, rstd, mask = _run_fwd(
        x, residual, weight, bias, eps, rms, residual_out_dtype, dropout_p, seed, return_mask, xhat_dtype, out_dtype,
        rstd_dtype,
    )
    return out, h if h is not None else x.new_empty(0), mean, rstd, mask if mask is not None else _no_mask(x)


def _not_traced(fn):
    """fn run outside Dynamo's sight, even where a frame Dynamo compiles calls it eagerly (vmap of
    a compiled function; forward-mode AD falling back from torch.compile to eager): traced,
    numba's and Triton's Python would fail. Inside compiled graphs the launchers run as the custom
    ops' implementations, which Dynamo never traces. Where no Dynamo frame callback is set (plain
    eager code) fn is called without the guard. ``torch.compiler.disable`` is applied at the first
    guarded call: it imports Dynamo, which would add about 1.2 s to ``import normfuse``.
    """
    guarded = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal guarded
        # Plain eager code (no Dynamo callback set, the common case) has nothing to hide fn from:
        # it runs without Dynamo's wrapper, whose Python costs tens of microseconds a call once a
        # large kernel has evicted it from cache. Traced, ``is_compiling`` is True and the test
        # stops there.
        if not torch.compiler.is_compiling() and _eval_frame_callback() is None:
            return fn(*args, **kwargs)
        if guarded is None:
            guarded = torch.compiler.disable(fn)
        return guarded(*args, **kwargs)

    return call


@_not_traced
def _run_fwd(x, residual, weight, bias, eps, rms, residual_out_dtype, dropout_p, seed, return_mask, xhat_dtype,
             out_dtype, rstd_dtype=None):  # fmt: skip
    """The chosen backend's forward, taking norm_fwd's arguments; absent outputs are None."""
    return backend_for(x).norm_fwd(
        x, weight, bias, eps, rms, residual=residual, residual_out_dtype=residual_out_dtype,
        dropout_p=dropout_p, seed=_seed_value(seed), return_mask=return_mask, xhat_dtype=xhat_dtype,
        out_dtype=out_dtype, rstd_dtype=rstd_dtype,
    )  # fmt: skip


def _seed_value(seed: Tensor | None) -> int:
    return int(seed) if seed is not None else 0


def _no_mask(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.bool)


@norm_fwd.register_fake
def _norm_fwd_fake(x, residual, weight, bias, eps, rms, residual_out_dtype, dropout_p, seed, return_mask, xhat_dtype, out_dtype,
                   rstd_dtype=None):  # fmt: skip
    h_dtype = residual_out_dtype or x.dtype
    acc = acc_dtype(h_dtype)
    rows = x.shape[0]
    return (
        torch.empty_like(x, dtype=out_dtype or x.dtype),
        torch.empty_like(x, dtype=residual_out_dtype) if residual_out_dtype is not None else x.new_empty(0),
        x.new_empty(rows, dtype=acc),
        x.new_empty(rows, dtype=acc),
        torch.empty_like(x, dtype=torch.bool) if return_mask and residual_out_dtype is not None else _no_mask(x),
    )


@torch.library.custom_op("normfuse::norm_bwd", mutates_args=())
def norm_bwd(
    dy: Tensor,
    dresidual_out: Tensor | None,
    h: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    rms: bool,
    add: bool,
    dropout_p: float,
    seed: Tensor | None,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
    need_dx: bool,
    need_dresidual: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused gradients (dx, dresidual, dweight, dbias); see ``normfuse.backends.cpu.norm_bwd``.

    A gradient not asked for comes back as an empty tensor.
    """
    dx, dres, dweight, dbias = _run_bwd(
        dy, dresidual_out, h, weight, mean, rstd, rms, add, dropout_p, seed, x_dtype, residual_dtype,
        need_dx, need_dresidual, need_dweight, need_dbias,
    )  # fmt: skip
    acc = acc_dtype(h.dtype)
    return (
        dx if dx is not None else h.new_empty(0, dtype=x_dtype),
        dres if dres is not None else h.new_empty(0, dtype=residual_dtype or h.dtype),
        dweight if dweight is not None else h.new_empty(0, dtype=acc),
        dbias if dbias is not None else h.new_empty(0, dtype=acc),
    )


@norm_bwd.register_fake
def _norm_bwd_fake(
    dy, dresidual_out, h, weight, mean, rstd, rms, add, dropout_p, seed, x_dtype, residual_dtype,
    need_dx, need_dresidual, need_dweight, need_dbias,
):  # fmt: skip
    acc = acc_dtype(h.dtype)
    n = h.shape[1]
    return (
        torch.empty_like(h, dtype=x_dtype) if need_dx else h.new_empty(0, dtype=x_dtype),
        torch.empty_like(h, dtype=residual_dtype) if add and need_dresidual else h.new_empty(0, dtype=residual_dtype or h.dtype),
        h.new_empty(n if need_dweight else 0, dtype=acc),
        h.new_empty(n if need_dbias else 0, dtype=acc),
    )


def _folds(in_dims, dropout_p: float) -> bool:
    """Whether a vmap can run as one call over more rows: the weight, the bias and the dropout
    seed are shared by every sample (in_dims[2], [3], [8]) and no dropout mask depends on a
    row's index (a sample's mask must be the one it gets alone)."""
    return in_dims[2] is None and in_dims[3] is None and in_dims[8] is None and dropout_p == 0.0


def _per_sample(fn, batch: int, in_dims, args) -> tuple:
    """fn called on each sample's slice of the vmapped arguments, the outputs stacked."""
    results = [fn(*(a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims))) for i in range(batch)]
    return tuple(torch.stack(column) if column[0] is not None else None for column in zip(*results))


@norm_fwd.register_vmap
def _norm_fwd_vmap(info, in_dims, x, residual, weight, bias, *rest):
    # the custom op under vmap, in compiled graphs (eager transforms take NormFunctionForTransforms)
    args = (x, residual, weight, bias, *rest)
    batch = info.batch_size
    if not _folds(in_dims, rest[3]):
        outputs = _per_sample(torch.ops.normfuse.norm_fwd, batch, in_dims, args)
        return outputs, (0,) * len(outputs)
    xs = _batch_first(x, in_dims[0], batch)
    rs = _batch_first(residual, in_dims[1], batch)
    _, rows, n = xs.shape
    out, h, mean, rstd, mask = torch.ops.normfuse.norm_fwd(
        xs.view(batch * rows, n), rs.view(batch * rows, n) if rs is not None else None, weight, bias, *rest
    )
    # absent outputs (no residual add, no mask) are empty, shared by all samples
    h_dim, mask_dim = (0 if t.dim() == 2 else None for t in (h, mask))
    return (
        out.view(batch, rows, n), h.view(batch, rows, n) if h_dim == 0 else h, mean.view(batch, rows),
        rstd.view(batch, rows), mask.view(batch, rows, n) if mask_dim == 0 else mask,
    ), (0, h_dim, 0, 0, mask_dim)  # fmt: skip


# inputs of norm_fwd after x, residual, weight, bias: none of them differentiable
_N_NONDIFF_ARGS = 9


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, residual_out_dtype, dropout_p, seed, *_ = inputs
    _, h, mean, rstd, mask = output
    ctx.add = residual_out_dtype is not None
    ctx.rows_n = None  # the (rows, n) view of the saved input, where it has another shape
    ctx.save_for_backward(h if ctx.add else x, weight, mean, rstd, seed)
    ctx.eps = eps
    ctx.rms = rms
    ctx.dropout_p = dropout_p
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(*(t for t in (mean, rstd, mask) if t is not None))


def _gradients(ctx, dout: Tensor, dresidual_out: Tensor | None, fused_bwd, differentiable: bool = False) -> tuple:
    """The backward shared by the custom op and the autograd.Functions: (dx, dresidual, dweight,
    dbias), None where not asked for; the caller appends its non-differentiable inputs.

    ``differentiable`` (or grad mode, or gradients batched by a vmap) takes the differentiable
    torch formulas instead of the fused kernel: vmap's batched tensors have no storage for a
    kernel to read."""
    h, weight, mean, rstd, seed = ctx.saved_tensors
    if ctx.rows_n is not None and h.shape != ctx.rows_n:
        h = h.view(ctx.rows_n)
    need_dx, need_dresidual, need_dweight, need_dbias = ctx.needs_input_grad[:4]
    need_dresidual = need_dresidual and ctx.add
    if dresidual_out is not None and dresidual_out.numel() == 0:
        dresidual_out = None
    if dout is None:
        # NormFunction leaves unused outputs' gradients unmaterialized: here only residual_out
        # was used (a rare case: the norm's output went nowhere)
        dout = torch.zeros_like(h)
    # Without dropout between them, the gradients of x and of the residual are the same values
    # (residual_out = x + residual): where they share a dtype one tensor serves both, as torch's
    # own add backward returns one, and the kernel writes one tensor less
    share = need_dx and need_dresidual and ctx.dropout_p == 0 and ctx.x_dtype == ctx.residual_dtype
    batched = _vmapped(dout) or (dresidual_out is not None and _vmapped(dresidual_out))
    if differentiable or torch.is_grad_enabled() or batched:
        # create_graph=True, or a vmap over the backward (batched gradients: torch.func, or
        # autograd.grad's is_grads_batched): gradients that are themselves differentiable, in
        # torch ops
        dx, dres, dweight, dbias = _differentiable_gradients(ctx, dout, dresidual_out, h, weight, seed)
    else:
        dx, dres, dweight, dbias = fused_bwd(
            dout.contiguous(), dresidual_out, h, weight, mean, rstd, ctx.rms, ctx.add, ctx.dropout_p, seed,
            ctx.x_dtype, ctx.residual_dtype, need_dx, need_dresidual and not share, need_dweight, need_dbias,
        )  # fmt: skip
        if share:
            dres = dx
        if ctx.rms and h.shape[-1] == 1 and (need_dx or need_dresidual):
            dx, dres = _one_feature_rms_gradients(ctx, dout, dresidual_out, h, weight, rstd, seed)
    # a no-op where the backend already rounded the sums to the parameter's dtype (tested in
    # Python: a dispatcher call, even one that returns its input, costs more)
    if need_dweight and dweight.dtype != weight.dtype:
        dweight = dweight.to(weight.dtype)
    if need_dbias and dbias.dtype != ctx.bias_dtype:
        dbias = dbias.to(ctx.bias_dtype)
    return (
        dx if need_dx else None,
        dres if need_dresidual else None,
        dweight if need_dweight else None,
        dbias if need_dbias else None,
    )


def _vmapped(t: Tensor) -> bool:
    """A batched tensor of vmap (torch.func's, or the one autograd.grad's is_grads_batched uses):
    a plain Tensor by type, with no storage (tensor subclasses such as DTensor are not)."""
    return type(t) is Tensor and not torch._C._has_storage(t)


def _differentiable_gradients(ctx, dout, dresidual_out, h, weight, seed):
    # in the accumulation dtype, as the kernels compute (bf16/fp16 formulas would lose digits)
    acc = acc_dtype(h.dtype)
    dh, dweight, dbias = reference.norm_bwd_differentiable(dout.to(acc), h.to(acc), weight, ctx.eps, ctx.rms)
    return (*_input_gradients(ctx, dh, dresidual_out, h, seed), dweight, dbias)


def _input_gradients(ctx, dh, dresidual_out, h, seed) -> tuple[Tensor, Tensor | None]:
    """(dx, dresidual) from the gradient dh of the normalized input, in torch ops, as the kernels
    give them: dh plus the gradient arriving at residual_out, then the forward's dropout mask."""
    if not ctx.add:
        return dh.to(ctx.x_dtype), None
    if dresidual_out is not None:
        dh = dh + dresidual_out.to(dh.dtype)
    dres = dh.to(ctx.residual_dtype) if ctx.residual_dtype is not None else None
    dx = dh
    if ctx.dropout_p > 0:
        keep = _dropout.keep_mask(seed, ctx.dropout_p, *h.shape, device=h.device)
        dx = torch.where(keep, dh * _dropout.scale(ctx.dropout_p), 0.0)
    return dx.to(ctx.x_dtype), dres


def _one_feature_rms_gradients(ctx, dout, dresidual_out, h, weight, rstd, seed) -> tuple[Tensor, Tensor | None]:
    """(dx, dresidual) of an RMSNorm over one feature. The kernels' r * (g - xhat * mean(xhat g))
    is there r * g * (1 - xhat^2), which cancels to a residue of rounding (xhat is about +-1);
    1 - xhat^2 is eps * r^2 exactly, so dh = g * eps * r^3, with g = dout * weight."""
    acc = acc_dtype(h.dtype)
    g = dout.to(acc) if weight is None else dout.to(acc) * weight.to(acc)
    dh = g * (ctx.eps * rstd.to(acc).view(-1, 1) ** 3)
    # an infinite input gives NaN, as the general form does (and torch): its r is 0
    dh = torch.where(h.isinf(), torch.nan, dh)
    return _input_gradients(ctx, dh, dresidual_out, h, seed)


def _backward(ctx, dout, dresidual_out, _dmean, _drstd, _dmask):
    return _gradients(ctx, dout, dresidual_out, torch.ops.normfuse.norm_bwd) + (None,) * _N_NONDIFF_ARGS


norm_fwd.register_autograd(_backward, setup_context=_setup_context)


@_not_traced
def _run_bwd(dy, dresidual_out, h, weight, mean, rstd, rms, add, dropout_p, seed, x_dtype, residual_dtype,
             need_dx, need_dresidual, need_dweight, need_dbias, dweight_dtype=None, dbias_dtype=None):  # fmt: skip
    """The chosen backend's backward, taking norm_bwd's arguments; gradients not asked for are None.

    dweight_dtype / dbias_dtype: the dtypes the sums are rounded to (default: the accumulation
    dtype, as the custom op returns them).
    """
    return backend_for(h).norm_bwd(
        dy, h, weight, mean, rstd, rms, need_dx, need_dweight, need_dbias, add=add,
        dresidual_out=dresidual_out, need_dresidual=need_dresidual, x_dtype=x_dtype,
        residual_dtype=residual_dtype, dropout_p=dropout_p, seed=_seed_value(seed),
        dweight_dtype=dweight_dtype, dbias_dtype=dbias_dtype,
    )  # fmt: skip


class NormFunction(torch.autograd.Function):
    """The eager path for plain tensors: the same kernels and backward as the custom ops,
    without the dispatcher's round trips (about 70 us a call on the CPU here, more than the
    whole op on small inputs). Compiled graphs, tensor subclasses (DTensor, FSDP) and exports
    go through ``torch.ops.normfuse``.

    Arguments are ``norm_fwd``'s, then ``rows_n``: x (and the residual) may have any shape of
    ``rows * n`` contiguous elements; the (rows, n) views are taken here, out of autograd's sight,
    so the graph holds this one node instead of two more view nodes (each costs a node's
    bookkeeping in forward and backward: a sizeable share of a small op's time). Outputs
    (out, residual_out, mask) have x's shape, None where absent.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms, residual_out_dtype, dropout_p, seed, return_mask,
                xhat_dtype, out_dtype, rstd_dtype, rows_n):  # fmt: skip
        shape = x.shape
        # views only where the shape changes: each view is a dispatcher call
        reshaped = shape != rows_n
        out, h, mean, rstd, mask = _run_fwd(
            x.view(rows_n) if reshaped else x, residual.view(rows_n) if residual is not None and reshaped else residual,
            weight, bias, eps, rms, residual_out_dtype, dropout_p, seed, return_mask, xhat_dtype, out_dtype, rstd_dtype,
        )  # fmt: skip
        if reshaped:
            out = out.view(shape)
            h = h.view(shape) if h is not None else None
            mask = mask.view(shape) if mask is not None else None
        # saves x (an input) or h (an output) themselves, not views taken here: a double
        # backward differentiates through them
        _setup_context(ctx, (x, residual, weight, bias, eps, rms, residual_out_dtype, dropout_p, seed), (out, h, mean, rstd, mask))
        ctx.shape = shape
        ctx.rows_n = rows_n
        # an unused output's gradient stays None, not a tensor of zeros to fill and read (a
        # post-norm block uses the norm's output alone, not residual_out)
        ctx.set_materialize_grads(False)
        return out, h, mask

    @staticmethod
    def backward(ctx, dout, dresidual_out, _dmask):
        def fused_bwd(*args):
            return _run_bwd(*args, dweight_dtype=ctx.weight_dtype, dbias_dtype=ctx.bias_dtype)

        return _shaped_gradients(ctx, dout, dresidual_out, fused_bwd)


def _shaped_gradients(ctx, dout, dresidual_out, fused_bwd, differentiable: bool | None = None) -> tuple:
    """``_gradients`` for the autograd.Functions, whose tensors have x's shape: the incoming
    gradients viewed as (rows, n), dx and dresidual given x's shape back, then a None for each
    non-differentiable input and for rows_n."""
    rows_n = ctx.rows_n
    shape = ctx.shape
    reshaped = shape != rows_n  # (reshapes only then: each is a dispatcher call)
    if dout is None and dresidual_out is None:
        return (None,) * (4 + _N_NONDIFF_ARGS + 1)
    if reshaped:
        dout = dout.reshape(rows_n) if dout is not None else None
        if dresidual_out is not None:
            dresidual_out = dresidual_out.reshape(rows_n)
    dx, dres, dweight, dbias = _gradients(ctx, dout, dresidual_out, fused_bwd, differentiable)
    if reshaped:
        dx = dx.reshape(shape) if dx is not None else None
        dres = dres.reshape(shape) if dres is not None else None
    return (dx, dres, dweight, dbias) + (None,) * (_N_NONDIFF_ARGS + 1)


# --- exporters that translate torch's own ops (ONNX) -------------------------------------------


def onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is running (the TorchScript-based exporter or the one built on
    torch.export). ONNX has no normfuse op: the front end then writes the forward in torch's own ops
    (``norm_fwd_torch_ops``), which the exporter translates to ONNX's. ``torch.onnx`` is imported by
    an export, not by ``import torch``: until then this is one dictionary lookup."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def norm_fwd_torch_ops(x, residual, normalized_shape, weight, bias, eps, rms, residual_out_dtype, dropout_p,
                       return_mask, xhat_dtype, out_dtype, rstd_dtype=None):  # fmt: skip
    """``norm_fwd``'s (out, residual_out, mask) in torch's standard ops, for exporters: no
    statistics (an exported graph runs inference) and dropout from torch's generator (ONNX's
    random ops) instead of normfuse's hash. The same roundings as the kernels: the residual sum
    once to its dtype, statistics and the affine step in the accumulation dtype, x-hat rounded to
    ``xhat_dtype`` and rstd to ``rstd_dtype`` where asked, the output once to its dtype. x (and the residual) keep their
    shapes, normalized over the trailing ``normalized_shape`` dims, so that the exported graph
    holds no reshape to a row count fixed at export (the TorchScript-based exporter would bake
    it in and break dynamic batch sizes).
    """
    h, mask = x, None
    if residual_out_dtype is not None:
        s = x.to(acc_dtype(residual_out_dtype))
        if dropout_p > 0.0:
            keep = torch.rand_like(s) >= dropout_p
            s = torch.where(keep, s * _dropout.scale(dropout_p), 0.0)
        if residual is not None:
            s = s + residual.to(s.dtype)
        h = s.to(residual_out_dtype)
        if return_mask:
            mask = keep if dropout_p > 0.0 else torch.ones_like(x, dtype=torch.bool)
    acc = acc_dtype(h.dtype)
    hf = h.to(acc)
    w = weight.to(acc).reshape(normalized_shape) if weight is not None else None
    b = bias.to(acc).reshape(normalized_shape) if bias is not None else None
    h_out = h if residual_out_dtype is not None else None
    out_dtype = out_dtype or x.dtype
    if not rms and xhat_dtype is None and rstd_dtype is None:
        # one op, which exporters translate to ONNX's LayerNormalization
        return torch.nn.functional.layer_norm(hf, normalized_shape, w, b, eps).to(out_dtype), h_out, mask
    if rms or rstd_dtype is not None:
        dims = tuple(range(-len(normalized_shape), 0))
        centred = hf if rms else hf - hf.mean(dim=dims, keepdim=True)
        rstd = torch.rsqrt(centred.square().mean(dim=dims, keepdim=True) + eps)
        if rstd_dtype is not None:
            rstd = rstd.to(rstd_dtype).to(acc)
        y = centred * rstd
    else:
        y = torch.nn.functional.layer_norm(hf, normalized_shape, None, None, eps)
    if xhat_dtype is not None:
        y = y.to(xhat_dtype).to(acc)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.to(out_dtype), h_out, mask


# --- torch.func transforms and forward-mode AD ------------------------------------------------


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) or a forward-mode AD level is active.

    The kernels cannot be called directly then (functorch's wrapper tensors have no storage to
    read), and the custom op's autograd serves neither (its generated wrapper has no
    ``setup_context``, which functorch asks for, pytorch#170834, and no forward-mode formula, so a
    tangent would silently come out as zero): calls go through ``NormFunctionForTransforms``, or,
    with nothing to differentiate (a vmap alone), through the custom op and its vmap rule.
    """
    return torch._C._are_functorch_transforms_active() or forward_ad_active()


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is active (torch.func.jvp and jacfwd open one too)."""
    return _forward_ad._current_level >= 0


def eager_untransformed() -> bool:
    """Whether the call is plain eager code: none of torch.compile, a torch.func transform,
    forward-mode AD or ``torch.jit.trace`` active (each reads the call differently)."""
    return not (
        torch.compiler.is_compiling()  # first: the rest is not for Dynamo to trace
        or torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0 or torch._C._is_tracing()
    )  # fmt: skip


def _direct_call_allowed() -> bool:
    """Whether an eager call may go straight to the CPU kernel: plain eager code
    (``eager_untransformed``) and no backend forced."""
    return eager_untransformed() and _forced_backend.get() is None and _ENV_BACKEND is None


# the model-family options of a direct call, (xhat_dtype, out_dtype, rstd_dtype): torch's formula
NO_FAMILY = (None, None, None)


def cpu_inference_direct(
    x: Tensor, n: int, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, family: tuple = NO_FAMILY,
    weight_offset: float = 0.0,
):  # fmt: skip
    """The forward's output straight from the CPU kernel, or None where the call must go the
    general way (``_direct_call_allowed``).

    For the front end's token-sized path: x is a contiguous CPU tensor of (*, n), weight and bias
    (n,) in its dtype (or both float32 for bf16/fp16 x) or None, nothing requires grad (the caller
    checked); ``family``: (xhat_dtype, out_dtype, rstd_dtype), checked by the caller too;
    ``weight_offset``: added to the weight inside the kernel (Gemma's ``1 + w`` without the op
    that forms it).
    """
    if not _direct_call_allowed():
        return None
    cpu = _loaded_backends.get("cpu") or _load_backend("cpu")
    return cpu.norm_fwd_inference(x, x.numel() // n, n, weight, bias, eps, rms, *family, weight_offset)


def eager_training_direct(
    x: Tensor, n: int, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, residual: Tensor | None = None,
    family: tuple = NO_FAMILY,
):  # fmt: skip
    """The forward's output (with a residual: ``(out, residual_out)``, no dropout) through
    ``NormFunction``, recorded for autograd, straight from the front end's training check; or None
    where the call must go the general way: torch.compile, a torch.func transform, forward-mode AD
    or ``torch.jit.trace`` (each reads the call differently).

    x (and the residual) is a contiguous CPU tensor of (*, n), weight and bias (n,) in its dtype
    (or both float32 for bf16/fp16 x) or None, something requires grad (the caller checked). A
    forced backend is honoured by ``NormFunction`` itself. ``family`` as ``cpu_inference_direct``.
    """
    if not eager_untransformed():
        return None
    h_dtype = None if residual is None else x.dtype
    outs = NormFunction.apply(x, residual, weight, bias, eps, rms, h_dtype, 0.0, None, False, *family, (x.numel() // n, n))
    return outs[0] if residual is None else outs[:2]


def cpu_add_inference_direct(
    x: Tensor, residual: Tensor, n: int, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool,
    family: tuple = NO_FAMILY, weight_offset: float = 0.0,
):  # fmt: skip
    """``(out, residual_out)`` of the add+norm forward straight from the CPU kernel, no dropout,
    or None as ``cpu_inference_direct``; the residual is x's shape and dtype, contiguous."""
    if not _direct_call_allowed():
        return None
    cpu = _loaded_backends.get("cpu") or _load_backend("cpu")
    return cpu.add_norm_fwd_inference(x, residual, x.numel() // n, n, weight, bias, eps, rms, *family, weight_offset)


def refuse_forward_ad() -> None:
    """Raise where the custom op would meet forward-mode AD (inside torch.compile, or with tensor
    subclasses): it has no forward-mode formula, and torch would hand back a zero tangent.

    Dynamo reads the level at trace time, so compiled code without forward AD traces through
    this with no graph break.
    """
    if forward_ad_active():
        raise NotImplementedError(
            "normfuse: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
            "supported inside torch.compile or on tensor subclasses; apply the transform outside torch.compile"
        )


class NormFunctionForTransforms(torch.autograd.Function):
    """``NormFunction`` under torch.func transforms and forward-mode AD.

    The same kernels forward; backward by the differentiable formulas (functorch takes its
    gradients with ``create_graph``); a ``jvp`` (forward-mode derivative) and a ``vmap`` rule
    that folds the vmapped dimension into the rows, so that ``vmap`` runs one kernel call.
    Calling it costs about 35 us more than ``NormFunction`` (``apply`` binds the arguments to
    ``forward``'s signature), hence only under a transform and with something to differentiate
    (inputs that require grad, or forward-mode AD); a vmap alone takes the custom op, whose vmap
    rule (``_norm_fwd_vmap``) folds the same way.

    Arguments are ``NormFunction``'s; outputs (out, residual_out, mask, mean, rstd), the first
    three in x's shape (None where absent), mean and rstd (rows,).
    """

    @staticmethod
    def forward(x, residual, weight, bias, eps, rms, residual_out_dtype, dropout_p, seed, return_mask, xhat_dtype,
                out_dtype, rstd_dtype, rows_n):  # fmt: skip
        shape = x.shape
        out, h, mean, rstd, mask = _run_fwd(
            x.view(rows_n), residual.view(rows_n) if residual is not None else None, weight, bias, eps, rms,
            residual_out_dtype, dropout_p, seed, return_mask, xhat_dtype, out_dtype, rstd_dtype,
        )  # fmt: skip
        return (
            out.view(shape), h.view(shape) if h is not None else None, mask.view(shape) if mask is not None else None,
            mean, rstd,
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, xhat_dtype, rows_n = inputs[0], inputs[10], inputs[13]
        out, h, mask, mean, rstd = output
        _setup_context(ctx, inputs[:9], (out, h, mean, rstd, mask))
        ctx.save_for_forward(h if ctx.add else x, inputs[2], mean, rstd, inputs[8])
        ctx.shape = x.shape
        ctx.rows_n = rows_n
        ctx.xhat_dtype = xhat_dtype
        ctx.out_dtype = out.dtype

    @staticmethod
    def backward(ctx, dout, dresidual_out, _dmask, _dmean, _drstd):
        return _shaped_gradients(ctx, dout, dresidual_out, None, differentiable=True)

    @staticmethod
    def jvp(ctx, tx, tresidual, tweight, tbias, *_):
        out_tangent, h_tangent = _tangents(ctx, tx, tresidual, tweight, tbias)
        return out_tangent, h_tangent, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, residual, weight, bias, *rest):
        args = (x, residual, weight, bias, *rest)
        dropout_p, rows_n = rest[3], rest[-1]
        batch = info.batch_size
        if _folds(in_dims, dropout_p):
            # rows are independent: the vmapped dim becomes more rows of one call
            rows, n = rows_n
            out, h, mask, mean, rstd = NormFunctionForTransforms.apply(
                _batch_first(x, in_dims[0], batch), _batch_first(residual, in_dims[1], batch), weight, bias,
                *rest[:-1], (batch * rows, n),
            )  # fmt: skip
            outputs = (out, h, mask, mean.view(batch, rows), rstd.view(batch, rows))
        else:
            # a call per sample (rows_n, a tuple, comes with a tuple of Nones as its in_dim)
            outputs = _per_sample(NormFunctionForTransforms.apply, batch, in_dims, args)
        return outputs, tuple(0 if t is not None else None for t in outputs)


def _batch_first(t: Tensor | None, dim: int | None, batch: int) -> Tensor | None:
    """t with the vmapped dim first (expanded to it when t is not vmapped), contiguous."""
    if t is None:
        return None
    t = t.expand(batch, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.contiguous()


def _tangents(ctx, tx, tresidual, tweight, tbias) -> tuple[Tensor | None, Tensor | None]:
    """Forward-mode derivatives (of out, of residual_out) from the inputs' tangents (None: zero).

    With x-hat = (h - mean) * rstd and u = th - mean(th) (u = th for RMSNorm), the tangent of
    x-hat is ``rstd * (u - xhat * mean(xhat * u))``; out's is that times the weight, plus
    ``xhat * tweight + tbias``. Computed in the accumulation dtype from the saved statistics.
    """
    h, weight, mean, rstd, seed = ctx.saved_tensors
    rows_n = ctx.rows_n
    acc = mean.dtype
    th = None
    if tx is not None:
        th = tx.reshape(rows_n).to(acc)
        if ctx.add and ctx.dropout_p > 0:
            keep = _dropout.keep_mask(seed, ctx.dropout_p, *rows_n, device=h.device)
            th = torch.where(keep, th * _dropout.scale(ctx.dropout_p), 0.0)
    if ctx.add and tresidual is not None:
        tr = tresidual.reshape(rows_n).to(acc)
        th = tr if th is None else th + tr
    xhat = (h.reshape(rows_n).to(acc) - mean[:, None]) * rstd[:, None]
    tout = None
    if th is not None:
        u = th if ctx.rms else th - th.mean(dim=-1, keepdim=True)
        tout = rstd[:, None] * (u - xhat * (xhat * u).mean(dim=-1, keepdim=True))
        if weight is not None:
            tout = tout * weight.to(acc)
    if tweight is not None:
        xhat_rounded = xhat if ctx.xhat_dtype is None else xhat.to(ctx.xhat_dtype).to(acc)
        term = xhat_rounded * tweight.to(acc)
        tout = term if tout is None else tout + term
    if tbias is not None:
        tout = tbias.to(acc).expand(rows_n) if tout is None else tout + tbias.to(acc)
    shape = ctx.shape
    out_tangent = tout.to(ctx.out_dtype).reshape(shape) if tout is not None else None
    h_tangent = th.to(h.dtype).reshape(shape) if ctx.add and th is not None else None
    return out_tangent, h_tangent
