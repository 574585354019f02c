"""Functional API: torch's argument contract and error messages, then one custom op.

Every check runs before any kernel, in the order torch runs them, and raises torch's
exception type with torch's text, so code written against ``torch.nn.functional`` sees no
difference.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Sequence

import torch
import torch.fx._symbolic_trace as _fx_trace
from torch import Tensor

from normfuse import _dropout, ops
from normfuse._dtypes import KERNEL_DTYPES, acc_dtype

__all__ = ["add_layer_norm", "add_rms_norm", "layer_norm", "rms_norm"]

# c10's ScalarType names, which torch's error messages use.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}
_LOW_PRECISION = frozenset({torch.float16, torch.bfloat16})


def _autocast_fp32_devices(op: str) -> frozenset[str]:
    """Device types whose autocast runs torch's ``op`` in float32 (read from torch's dispatcher)."""
    devices = set()
    for device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla"):
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "Autocast" + device_type.upper()):
                devices.add(device_type)
        except RuntimeError:  # a dispatch key this torch does not have
            pass
    return frozenset(devices)


# Under autocast on CUDA, XPU and MPS, torch runs its norms with the "fp32" cast policy: fp16 and
# bf16 tensor arguments are cast to float32, and the output is float32. CPU autocast leaves them
# alone. normfuse does the same, so that swapping a norm changes no dtype in a mixed-precision
# model; the table comes from torch's dispatcher, not from a list copied here.
_AUTOCAST_FP32 = {op: _autocast_fp32_devices(op) for op in ("layer_norm", "rms_norm")}


def _autocasts_to_fp32(op: str, x: object) -> bool:
    """Whether torch's ``op`` would run in float32 on x under the autocast active now."""
    if not (_any_autocast() and isinstance(x, Tensor)):
        return False  # the usual answer, in 0.05 us (x.device alone takes 0.3)
    device_type = x.device.type
    return device_type in _AUTOCAST_FP32[op] and torch.is_autocast_enabled(device_type)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _fp32(t: Tensor | None) -> Tensor | None:
    """autocast's cast: fp16/bf16 to float32, anything else as it is."""
    return t.float() if t is not None and t.dtype in _LOW_PRECISION else t


# --- nested tensors ------------------------------------------------------------------------------
# A jagged nested tensor (B, j, *rest) keeps its rows in one dense (sum of lengths, *rest) tensor,
# ``values()``; a norm over trailing dims of rest is a norm of those rows, as torch computes it
# too. normfuse runs its kernels on the values and gives them the input's ragged structure back
# (differentiably: values() and nested_tensor_from_jagged are views for autograd). A norm over the
# ragged dim, and the older strided layout, have no kernel here: torch's own function computes
# them (with a warning, once).


def _jagged_rows_normalizable(x: Tensor, normalized_shape: tuple[int, ...]) -> bool:
    """A jagged nested tensor whose normalized dims all lie after its ragged dim."""
    return x.layout == torch.jagged and len(normalized_shape) <= x.dim() - x._ragged_idx - 1


def _like_nested(values: Tensor | None, like: Tensor) -> Tensor | None:
    """values, rows of like's values(), as a nested tensor with like's ragged structure."""
    if values is None or values.dim() == 0:
        return values
    return torch.nested.nested_tensor_from_jagged(
        values, like.offsets(), lengths=like.lengths(), jagged_dim=like._ragged_idx,
        # the cached bounds, where known (torch 2.5 has no _maybe_* attributes: none kept)
        min_seqlen=getattr(like, "_maybe_min_seqlen", None), max_seqlen=getattr(like, "_maybe_max_seqlen", None),
    )  # fmt: skip


def _values(t: Tensor | None) -> Tensor | None:
    return t.values() if t is not None else None


def _check_nested_add(fn: str, x: Tensor, residual: object, shape: tuple[int, ...], residual_dtype: object) -> None:
    """A nested x of the add+norm ops: jagged, normalized after its ragged dim, a residual like it."""
    if not (x.layout == torch.jagged and x.dim() > 2 and _jagged_rows_normalizable(x, shape)):
        raise NotImplementedError(
            f"{fn}(): a nested x must have the jagged layout and more than 2 dims, and be normalized over dims "
            "after its ragged one"
        )
    _check_residual(fn, x, residual, residual_dtype)  # the same shape: the same ragged structure too
    if residual is not None and not residual.is_nested:
        raise RuntimeError(f"{fn}(): residual must be a nested tensor like x")


_warned_nested: set[str] = set()


def _torch_computes(fn: str) -> None:
    if fn not in _warned_nested:
        _warned_nested.add(fn)
        warnings.warn(
            f"normfuse.{fn}: no kernel for this nested tensor (the strided layout, or a norm over the ragged "
            "dim); torch's own function computes it",
            RuntimeWarning,
            stacklevel=3,
        )


# --- DTensor (tensor and sequence parallelism) ----------------------------------------------------
# A DTensor sharded only over rows (batch or sequence dims, the usual sequence-parallel layout of
# a norm's input) with replicated parameters is normalized shard by shard: each rank runs the
# kernels on its local rows. The parameters' gradients are then partial sums over the ranks that
# hold different rows (``grad_placements``), which DTensor reduces where they are needed. Any
# other layout (a sharded normalized dim, sharded parameters) is left to torch's own function
# and its DTensor sharding rules.


def _dtensor_class():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


_DTENSOR = _dtensor_class()


def _is_dtensor(t: object) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def _shards_rows_only(x: Tensor, normalized_shape: tuple[int, ...], params: tuple) -> bool:
    """x sharded (or replicated) over dims before the normalized ones; parameters replicated."""
    first_normalized = x.dim() - len(normalized_shape)
    if not all(p.is_replicate() or (p.is_shard() and p.dim % x.dim() < first_normalized) for p in x.placements):
        return False
    return all(
        p is None or (_is_dtensor(p) and p.device_mesh == x.device_mesh and all(q.is_replicate() for q in p.placements))
        for p in params
    )


def _local_params(x: Tensor, params: tuple) -> tuple:
    """The parameters' local tensors; their gradients are partial sums wherever x is sharded."""
    from torch.distributed.tensor import Partial, Replicate

    grads = [Partial() if p.is_shard() else Replicate() for p in x.placements]
    return tuple(None if p is None else p.to_local(grad_placements=grads) for p in params)


def _like_dtensor(local: Tensor | None, x: Tensor) -> Tensor | None:
    """A local result with x's rows, as a DTensor laid out like x (contiguous)."""
    if local is None or local.dim() == 0:
        return local
    strides = torch.empty(x.shape, device="meta").stride()
    return _DTENSOR.from_local(local, x.device_mesh, x.placements, shape=x.shape, stride=strides)


def _local(t: Tensor | None) -> Tensor | None:
    return t.to_local() if t is not None else None


def _check_dtensor_add(fn: str, x: Tensor, residual: object, shape: tuple[int, ...], params: tuple) -> None:
    """A DTensor x of the add+norm ops: sharded over rows only, a residual laid out the same."""
    same_layout = residual is None or (
        _is_dtensor(residual) and residual.device_mesh == x.device_mesh and residual.placements == x.placements
        and residual.shape == x.shape
    )  # fmt: skip
    if not (same_layout and _shards_rows_only(x, shape, params)):
        raise NotImplementedError(
            f"{fn}(): a DTensor x must be sharded over dims before the normalized ones, with replicated "
            "parameters and a residual DTensor of the same shape and placements"
        )


def _scalar_type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape_list(shape: Sequence[int]) -> str:
    return "[" + ", ".join(_dim_text(s) for s in shape) + "]"


def _dim_text(size: object) -> str:
    """A size as torch prints it: a nested tensor's ragged size is a symbol (j1) with no int value."""
    if isinstance(size, torch.SymInt) and size.node.is_nested_int():
        return str(size)
    return str(int(size))


def _check_int_tuple(fn: str, value: object, position: int) -> tuple[int, ...]:
    """torch's argument parser for an ``int[]`` named ``normalized_shape``."""
    if type(value) is tuple and all(type(item) is int for item in value):
        return value  # the common case, without the general checks' cost (token-sized calls)
    prefix = f"{fn}(): argument 'normalized_shape' (position {position}) must be tuple of ints"
    if not isinstance(value, (tuple, list, torch.Size)):
        raise TypeError(f"{prefix}, not {_type_name(value)}")
    shape = []
    for pos, item in enumerate(value):
        size = _shape_item(item)
        if size is None:
            raise TypeError(f"{prefix}, but found element of type {_type_name(item)} at pos {pos}")
        shape.append(size)
    return tuple(shape)


def _shape_item(item: object) -> int | torch.SymInt | None:
    """An element of an ``int[]`` as torch's parser takes it, or None where it refuses it: an
    int or SymInt (not a bool), an integer tensor of one element, anything with ``__index__``
    (numpy's integers; not numpy's bool)."""
    if isinstance(item, bool):
        return None
    if isinstance(item, (int, torch.SymInt)):
        return int(item)
    if isinstance(item, Tensor):
        if item.numel() != 1 or item.is_floating_point() or item.is_complex():
            return None
        if item.dtype == torch.bool:  # the parser takes it; the conversion refuses it
            raise RuntimeError(
                "Expected scalar.isIntegral( false) to be true, but got false.  (Could this error message be "
                "improved?  If so, please report an enhancement request to PyTorch.)"
            )
        return int(item)
    try:
        return operator.index(item)
    except TypeError:
        return None


def _type_name(value: object) -> str:
    """A type's name as torch's errors print it (CPython's ``tp_name``): a class defined in Python
    by its name, a builtin by its name, a C extension's type with its module (``numpy.ndarray``)."""
    cls = type(value)
    if cls.__flags__ & _HEAP_TYPE or cls.__module__ == "builtins":
        return cls.__name__
    return f"{cls.__module__}.{cls.__name__}"


_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE


def _check_tensor(fn: str, name: str, value: object, position: int) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be Tensor, not {_type_name(value)}")


def _check_optional_tensor(fn: str, name: str, value: object, position: int) -> None:
    if value is not None:
        _check_tensor(fn, name, value, position)


def _is_torch_double(value: object) -> bool:
    """Whether torch's argument parser takes ``value`` for a ``float`` argument: a Python int or
    float (bool included), a numpy scalar, a SymInt/SymFloat, or a 0-dim tensor that does not
    require grad (read with ``float()``, which raises as torch does for a complex value with an
    imaginary part and for a meta tensor)."""
    if isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        return True
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.requires_grad
    # numpy's scalars (numpy's bool is no numbers.Number), without importing numpy here
    return type(value).__module__ == "numpy" and (isinstance(value, numbers.Number) or type(value).__name__ == "bool")


def _check_eps(fn: str, eps: object, position: int) -> None:
    if type(eps) is float:
        return
    if not _is_torch_double(eps):
        raise TypeError(f"{fn}(): argument 'eps' (position {position}) must be float, not {_type_name(eps)}")


def _check_same_device(x: Tensor, param: Tensor | None) -> None:
    # cheap tests first (device indexes are ints; building device objects costs a microsecond each)
    if param is not None and not (x.is_cpu and param.is_cpu) and not (
        x.is_cuda and param.is_cuda and x.get_device() == param.get_device()
    ) and param.device != x.device:
        raise RuntimeError(f"Tensor on device {param.device} is not on the expected device {x.device}!")


def _check_normalized_shape(normalized_shape: tuple[int, ...], params: tuple[tuple[str, Tensor | None], ...]) -> None:
    """ATen's shared checks: a non-empty normalized_shape, and parameters of exactly that shape."""
    if len(normalized_shape) < 1:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, "
            f"but got normalized_shape = {_shape_list(normalized_shape)}"
        )
    for name, param in params:
        if param is not None and param.shape != normalized_shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{_shape_list(param.shape)} and normalized_shape = {_shape_list(normalized_shape)}"
            )


def _check_trailing_shape(x: Tensor, normalized_shape: tuple[int, ...], star: str) -> None:
    """x must end in normalized_shape; ``star`` is how the message writes the leading dims
    (layer_norm says ``[*, 4]``, rms_norm ``[*4]``)."""
    k = len(normalized_shape)
    if x.dim() < k or x.shape[x.dim() - k :] != normalized_shape:
        raise RuntimeError(
            f"Given normalized_shape={_shape_list(normalized_shape)}, expected input with shape "
            f"[{star}{', '.join(str(s) for s in normalized_shape)}], but got input of size{_shape_list(x.shape)}"
        )


def _check_layer_norm_inputs(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None
) -> None:
    """Device, dtype and shape checks in the order ATen's CPU layer_norm makes them."""
    _check_same_device(x, weight)
    _check_same_device(x, bias)
    dtype = x.dtype
    k = len(normalized_shape)
    if (
        k > 0 and dtype in KERNEL_DTYPES
        and (weight is None or (weight.dtype is dtype and weight.shape == normalized_shape))
        and (bias is None or (bias.dtype is dtype and bias.shape == normalized_shape))
        and x.shape[x.dim() - k :] == normalized_shape
    ):  # fmt: skip
        return  # the common case, in half the time of the checks below (token-sized calls)
    params = [p for p in (weight, bias) if p is not None]
    mixed = len(params) > 0 and params[0].dtype != x.dtype
    if mixed:
        # a bf16/fp16 input may take fp32 parameters; nothing else may differ
        if x.dtype not in (torch.float32, *_LOW_PRECISION):
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        if any(p.dtype != torch.float32 for p in params):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
    _check_normalized_shape(normalized_shape, (("weight", weight), ("bias", bias)))
    _check_trailing_shape(x, normalized_shape, "*, ")
    if x.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f'"LayerNormKernelImpl" not implemented for \'{_scalar_type_name(x.dtype)}\'')
    if not mixed:
        for param in params:
            if param.dtype != x.dtype:
                raise RuntimeError(
                    f"expected scalar type {_scalar_type_name(x.dtype)} but found {_scalar_type_name(param.dtype)}"
                )


def _check_rms_norm_inputs(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None) -> None:
    """Shape, dtype and device checks in the order ATen's rms_norm makes them."""
    _check_normalized_shape(normalized_shape, (("weight", weight),))
    k = len(normalized_shape)
    if x.dim() < k:
        raise ValueError(f"Input tensor must have at least {k} dimensions, but got {x.dim()}")
    _check_trailing_shape(x, normalized_shape, "*")
    if not (x.is_floating_point() or x.is_complex()):
        raise NotImplementedError(f'"rms_norm" not implemented for \'{_scalar_type_name(x.dtype)}\'')
    _check_same_device(x, weight)


def _check_residual(fn: str, x: Tensor, residual: Tensor | None, residual_dtype: object) -> None:
    """The residual stream's checks, before any kernel: same shape and device as x, a float dtype."""
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"{fn}(): argument 'residual' must be Tensor or None, not {_type_name(residual)}")
        if residual.shape != x.shape:
            raise RuntimeError(
                f"{fn}(): residual of shape {_shape_list(residual.shape)} does not match x of shape "
                f"{_shape_list(x.shape)}"
            )
        if residual.device != x.device:
            raise RuntimeError(
                f"{fn}(): residual is on device {residual.device} but x is on device {x.device}"
            )
        if not _residual_dtype_ok(x.dtype, residual.dtype):
            raise RuntimeError(
                f"{fn}(): residual of dtype {residual.dtype} does not go with x of dtype {x.dtype} "
                "(expected the same dtype, or float32 with a bfloat16/float16 x)"
            )
    if residual_dtype is not None:
        if not isinstance(residual_dtype, torch.dtype) or not residual_dtype.is_floating_point:
            raise TypeError(f"{fn}(): residual_dtype must be a floating point torch.dtype, got {residual_dtype!r}")
        if not _residual_dtype_ok(x.dtype, residual_dtype):
            raise RuntimeError(
                f"{fn}(): residual_dtype {residual_dtype} does not go with x of dtype {x.dtype} "
                "(expected x's dtype, or float32 with a bfloat16/float16 x)"
            )


def _residual_dtype_ok(x_dtype: torch.dtype, residual_dtype: torch.dtype) -> bool:
    # the kernels accumulate in float32 except for float64, which stays float64 throughout
    return residual_dtype == x_dtype or (x_dtype in _LOW_PRECISION and residual_dtype == torch.float32)


def _check_dropout_p(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, not {type(p).__name__}")
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def _fx_node(fn, args: tuple, **kwargs):
    """Under ``torch.fx.symbolic_trace``: a node calling ``fn`` (the GraphModule calls normfuse at
    run time), or None where nothing is traced. A Proxy stands for a tensor whose values, shape
    and dtype are unknown, so normfuse's checks cannot run on it; torch records its own norms as
    calls in the same way. Callers read ``_fx_trace._is_fx_tracing_flag`` first, so that the
    eager path pays one attribute lookup (torch.export sets the flag too: compiling is left to
    the custom ops)."""
    if torch.compiler.is_compiling():
        return None
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.fx.Proxy):
            return a.tracer.create_proxy("call_function", fn, args, kwargs)
    return None


# --- the direct paths: token-sized inference, eager training ------------------------------------
# Decoding one token at a time calls each norm on a few rows: there the front end's checks, made
# one function at a time, cost more than the kernel (LayerNorm at 1x4096 fp32: 3.55x torch's
# latency before this path, 1.48x with it; ``benchmarks/bench_cpu.py``). The common case is tested here
# in one go: plain CPU tensors (nn.Parameter included) of a kernel dtype, one normalized dim,
# parameters of the input's shape and dtype (or both float32 for bf16/fp16 input: torch's
# mixed-dtype case, which took 12.8 us a call at 1x4096 the general way against 8.7 with bf16
# parameters), no autocast, nested tensor or fx trace. Every one of
# these is a check the general path makes and passes, so a call that fails any of them (a wrong
# shape, say) takes the general path and gets torch's error there. With nothing requiring grad the
# call goes to the CPU kernel; with something that does, to ``ops.NormFunction`` as the general
# path would, without its checks: in training the Python before a kernel runs with caches that
# the last kernel's rows have emptied, where each check costs several times its warm cost.

_PARAM_TYPES = (Tensor, torch.nn.Parameter)
_SHAPE_TYPES = (tuple, torch.Size)


_GENERAL, _INFERENCE, _TRAINING = 0, 1, 2


def _direct_path(x: object, shape: object, weight: object, bias: object) -> int:
    """``_INFERENCE`` (nothing requires grad) or ``_TRAINING`` (something does) where the call is
    the common case described above, else ``_GENERAL``."""
    if not (
        type(x) is Tensor and type(shape) in _SHAPE_TYPES and len(shape) == 1 and type(shape[0]) is int
        and shape[0] > 0 and not _fx_trace._is_fx_tracing_flag and not _any_autocast() and not x.is_nested
    ):  # fmt: skip
        return _GENERAL
    dtype = x.dtype
    if not (x.is_cpu and dtype in KERNEL_DTYPES and x.shape[-1:] == shape and x.is_contiguous()):
        return _GENERAL
    grad = torch.is_grad_enabled()
    needs_grad = grad and x.requires_grad
    param_dtype = None
    for p in (weight, bias):
        if p is not None:
            if not (type(p) in _PARAM_TYPES and p.is_cpu and p.shape == shape):
                return _GENERAL
            if param_dtype is None:
                param_dtype = p.dtype
                if not (param_dtype is dtype or (param_dtype is torch.float32 and dtype in _LOW_PRECISION)):
                    return _GENERAL
            elif p.dtype is not param_dtype:  # torch's "mixed dtype" error, the general way
                return _GENERAL
            needs_grad = needs_grad or (grad and p.requires_grad)
    return _TRAINING if needs_grad else _INFERENCE


def _direct_call(
    x: Tensor, n: int, weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool, path: int,
    residual: Tensor | None = None, family: tuple = ops.NO_FAMILY, weight_offset: float = 0.0,
):  # fmt: skip
    """The norm (with a residual: ``(out, residual_out)``) through the direct path ``path`` (not
    ``_GENERAL``), or None where the call must go the general way after all
    (``ops.cpu_inference_direct``, ``ops.cpu_add_inference_direct``, ``ops.eager_training_direct``).
    ``family``: (xhat_dtype, out_dtype, rstd_dtype), from ``_direct_family``; ``weight_offset``:
    inference only (training passes the offset weight, an autograd op)."""
    if path == _TRAINING:
        return ops.eager_training_direct(x, n, weight, bias, eps, rms, residual=residual, family=family)
    if residual is None:
        return ops.cpu_inference_direct(x, n, weight, bias, eps, rms, family, weight_offset)
    return ops.cpu_add_inference_direct(x, residual, n, weight, bias, eps, rms, family, weight_offset)


def _direct_family(
    x: Tensor, weight: Tensor | None, weight_offset: object, xhat_dtype: object, rstd_dtype: object, path: int
) -> tuple[Tensor | None, tuple, float] | None:
    """For a direct RMSNorm call: (the weight to pass, the model-family options as
    ``_direct_call`` takes them, the offset the kernel adds to that weight), or None where an
    option is not of a kind the general path accepts (it raises there, in its words).

    The patched Llama norms (``xhat_dtype``) of token-at-a-time decoding take this way: at
    1x4096, 9.1 us a call the general way and 6.9 this way in float32, 11.3 and 8.8 in bf16
    (torch's formula: 6.0, 7.3). Inference leaves Gemma's ``1 + w`` to the kernel (10.9 us a
    1x4096 fp32 call with the op that forms it, about 7 without); training forms it by a torch
    op, whose gradient is the weight's."""
    if type(weight_offset) is not float or not (
        _kernel_dtype_or_none(xhat_dtype) and _kernel_dtype_or_none(rstd_dtype)
    ):
        return None
    if weight_offset == 0.0 and xhat_dtype is None and rstd_dtype is None:
        return weight, ops.NO_FAMILY, 0.0
    family = (xhat_dtype, _family_out_dtype(x, weight, xhat_dtype), rstd_dtype)
    if path == _INFERENCE and weight is not None:
        return weight, family, weight_offset
    if weight_offset != 0.0 and weight is not None and not ops.eager_untransformed():
        # the training call would decline (compiled, transformed, traced): no op of the offset
        # weight here besides the general path's own (torch.jit.trace checks the graphs alike)
        return None
    return _rms_weight(x, weight, weight_offset), family, 0.0


def _direct_add_path(
    x: object, residual: object, shape: object, weight: object, bias: object, dropout_p: object, training: object,
    residual_dtype: object, return_mask: object,
) -> int:
    """``_direct_path`` for the add+norm ops: also a residual of x's shape, dtype and layout, the
    residual output in that dtype, no dropout (p = 0 or eval) and no mask asked for."""
    if not (
        residual_dtype is None and return_mask is False and type(dropout_p) is float and 0.0 <= dropout_p <= 1.0
        and (dropout_p == 0.0 or not training) and type(residual) is Tensor
    ):  # fmt: skip
        return _GENERAL
    path = _direct_path(x, shape, weight, bias)
    if path == _GENERAL or not (
        not residual.is_nested and residual.is_cpu and residual.dtype is x.dtype and residual.shape == x.shape
        and residual.is_contiguous()
    ):  # fmt: skip
        return _GENERAL
    return _TRAINING if path == _TRAINING or (residual.requires_grad and torch.is_grad_enabled()) else _INFERENCE


# the kernel dtypes' eps=None, read without ``torch.finfo``'s cost (``_rms_eps``)
_RMS_DEFAULT_EPS = {dtype: torch.finfo(acc_dtype(dtype)).eps for dtype in KERNEL_DTYPES}


def _needs_autograd(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows_n(x: Tensor, normalized_shape: tuple[int, ...]) -> tuple[int, int]:
    n = math.prod(normalized_shape)
    return (x.numel() // n if n else math.prod(x.shape[: x.dim() - len(normalized_shape)])), n


def _flat(p: Tensor | None, n: int) -> Tensor | None:
    return p.reshape(n) if p is not None and p.dim() != 1 else p


def _normalize(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
    xhat_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
) -> Tensor:
    """View x as (rows, n) row-major, run the forward, give the result x's shape."""
    rows, n = _rows_n(x, normalized_shape)
    if not x.is_contiguous():
        x = x.contiguous()
    w = _flat(weight, n)
    b = _flat(bias, n)
    compiling = torch.compiler.is_compiling()
    transforms = not compiling and ops.transforms_active()  # (compiled code: the custom op's rules)
    if transforms and (_needs_autograd(x, weight, bias) or ops.forward_ad_active()):
        return ops.NormFunctionForTransforms.apply(
            x, None, w, b, float(eps), rms, None, 0.0, None, False, xhat_dtype, out_dtype, rstd_dtype, (rows, n)
        )[0]
    # (a vmap with nothing to differentiate takes the custom op and its vmap rule, below: lighter)
    if type(x) is Tensor and not transforms and not compiling and not torch._C._is_tracing():
        # Eager, plain tensors: skip the dispatcher, whose round trip costs more than the whole
        # op on a few rows (token-at-a-time decoding). Inference calls the kernel directly.
        # (torch.jit.trace records dispatcher ops only: it takes the custom op below.)
        if not _needs_autograd(x, weight, bias):
            return ops.backend_for(x).norm_fwd_inference(
                x, rows, n, w, b, float(eps), rms, xhat_dtype, out_dtype, rstd_dtype
            )
        return ops.NormFunction.apply(
            x, None, w, b, float(eps), rms, None, 0.0, None, False, xhat_dtype, out_dtype, rstd_dtype, (rows, n)
        )[0]
    if ops.onnx_exporting():
        args = (float(eps), rms, None, 0.0, False, xhat_dtype, out_dtype, rstd_dtype)
        return ops.norm_fwd_torch_ops(x, None, normalized_shape, w, b, *args)[0]
    ops.refuse_forward_ad()
    out = torch.ops.normfuse.norm_fwd(
        x.view(rows, n), None, w, b, float(eps), rms, None, 0.0, None, False, xhat_dtype, out_dtype, rstd_dtype
    )[0]
    return out.view(x.shape)


def _add_normalize(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    rms: bool,
    dropout_p: float,
    residual_dtype: torch.dtype | None,
    return_mask: bool,
    xhat_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
) -> tuple[Tensor, ...]:
    """The pre-norm step over (rows, n) views of x: (out, residual_out[, mask]) in x's shape."""
    rows, n = _rows_n(x, normalized_shape)
    h_dtype = residual_dtype or (residual.dtype if residual is not None else x.dtype)
    xc = x.contiguous()
    rc = residual.contiguous() if residual is not None else None
    seed = _dropout.draw_seed() if dropout_p > 0.0 else None
    params = (_flat(weight, n), _flat(bias, n), float(eps), rms, h_dtype, dropout_p, seed, return_mask, xhat_dtype,
              out_dtype, rstd_dtype)  # fmt: skip
    compiling = torch.compiler.is_compiling()
    transforms = not compiling and ops.transforms_active()
    if transforms and (_needs_autograd(x, residual, weight, bias) or ops.forward_ad_active()):
        out, h, mask = ops.NormFunctionForTransforms.apply(xc, rc, *params, (rows, n))[:3]
    elif (
        type(x) is Tensor and (residual is None or type(residual) is Tensor) and not transforms and not compiling
        and not torch._C._is_tracing()
    ):  # fmt: skip
        if _needs_autograd(x, residual, weight, bias):
            out, h, mask = ops.NormFunction.apply(xc, rc, *params, (rows, n))
        else:
            # inference calls the backend directly, as ``_normalize`` does: autograd.Function's
            # apply cost 4x the kernel at 1x4096 (add_rms_norm 3.7-4.3x the unfused torch pair)
            out, h, _, _, mask = ops.backend_for(xc).norm_fwd(
                xc.view(rows, n), params[0], params[1], params[2], rms, residual=rc.view(rows, n) if rc is not None
                else None, residual_out_dtype=h_dtype, dropout_p=dropout_p, seed=int(seed) if seed is not None else 0,
                return_mask=return_mask, xhat_dtype=xhat_dtype, out_dtype=out_dtype, rstd_dtype=rstd_dtype,
            )  # fmt: skip
            out, h = out.view(x.shape), h.view(x.shape)
            mask = mask.view(x.shape) if mask is not None else None
    else:
        if ops.onnx_exporting():  # x's shape kept: no view to a row count fixed at export
            out, h, mask = ops.norm_fwd_torch_ops(
                xc, rc, normalized_shape, weight, bias, float(eps), rms, h_dtype, dropout_p, return_mask, xhat_dtype,
                out_dtype, rstd_dtype,
            )  # fmt: skip
            return (out, h, mask) if return_mask else (out, h)
        ops.refuse_forward_ad()
        r2 = rc.view(rows, n) if rc is not None else None
        out, h, _, _, mask = torch.ops.normfuse.norm_fwd(xc.view(rows, n), r2, *params)
        out, h, mask = out.view(x.shape), h.view(x.shape), mask.view(x.shape) if return_mask else mask
    return (out, h, mask) if return_mask else (out, h)


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.layer_norm``.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias`` with the biased variance, per row.

    Args:
        input: (*, *normalized_shape), float32/float64/bfloat16/float16, any strides.
        normalized_shape: the trailing shape to normalize over (a list, tuple or ``torch.Size``).
        weight, bias: ``normalized_shape``-shaped, input's dtype (or float32 for bf16/fp16 input), or None.
        eps: added to the variance.

    Returns:
        A new contiguous tensor of input's shape and dtype. Statistics and the reductions of
        the backward are computed in float32 (float64 for float64 input).
    """
    if (
        type(eps) is float and (path := _direct_path(input, normalized_shape, weight, bias))
        and (out := _direct_call(input, normalized_shape[0], weight, bias, eps, False, path)) is not None
    ):  # fmt: skip
        return out
    if _fx_trace._is_fx_tracing_flag and (
        node := _fx_node(layer_norm, (input, normalized_shape, weight, bias, eps))
    ) is not None:  # fmt: skip
        return node
    _check_tensor("layer_norm", "input", input, 1)
    if input.is_nested and not all(isinstance(d, int) for d in normalized_shape):
        _torch_computes("layer_norm")  # a norm over the ragged dim (its size is a symbol, j1)
        return torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps)
    shape = _check_int_tuple("layer_norm", normalized_shape, 2)
    _check_optional_tensor("layer_norm", "weight", weight, 3)
    _check_optional_tensor("layer_norm", "bias", bias, 4)
    _check_eps("layer_norm", eps, 5)
    if input.is_nested:
        # torch's checks on nested tensors first (its dims, the batch dim), then the values'
        if input.layout == torch.jagged and input.dim() > 2 and _jagged_rows_normalizable(input, shape):
            return _like_nested(layer_norm(input.values(), shape, weight, bias, eps), input)
        _torch_computes("layer_norm")
        return torch.nn.functional.layer_norm(input, shape, weight, bias, eps)
    if _is_dtensor(input):
        if _shards_rows_only(input, shape, (weight, bias)):
            local = layer_norm(input.to_local(), shape, *_local_params(input, (weight, bias)), eps)
            return _like_dtensor(local, input)
        return torch.nn.functional.layer_norm(input, shape, weight, bias, eps)  # DTensor's own rules
    if _autocasts_to_fp32("layer_norm", input):
        input, weight, bias = _fp32(input), _fp32(weight), _fp32(bias)
    _check_layer_norm_inputs(input, shape, weight, bias)
    return _normalize(input, shape, weight, bias, eps, rms=False)


def _rms_eps(x: Tensor, eps: float | None) -> float:
    """eps=None: the machine epsilon of the computation dtype (float32 for fp16/bf16/fp32)."""
    if eps is not None:
        return float(eps)
    default = _RMS_DEFAULT_EPS.get(x.dtype)
    return torch.finfo(acc_dtype(x.dtype)).eps if default is None else default


def _check_rms_eps(fn: str, eps: object, position: int) -> None:
    if eps is not None:
        _check_eps(fn, eps, position)


def _rms_weight(x: Tensor, weight: Tensor | None, weight_offset: float) -> Tensor | None:
    """The weight the kernels multiply by, computed as torch does: in the computation dtype.

    A weight of another dtype than x is converted to the computation dtype (torch's rule for
    every mix: the product is taken there, then rounded to x's dtype); ``weight_offset`` adds
    a constant in that dtype (Gemma's ``1 + w``, in float32). Both are differentiable torch ops,
    so the weight's gradient flows through them.
    """
    if weight is None:
        return None
    acc = acc_dtype(x.dtype)
    if weight_offset != 0.0:
        return weight.to(acc) + weight_offset
    if weight.dtype != x.dtype and weight.dtype != acc:
        return weight.to(acc)
    return weight


def _check_family_options(fn: str, weight_offset: object, xhat_dtype: object, rstd_dtype: object = None) -> None:
    if isinstance(weight_offset, bool) or not isinstance(weight_offset, numbers.Real):
        raise TypeError(f"{fn}(): weight_offset must be a float, not {type(weight_offset).__name__}")
    for name, dtype in (("xhat_dtype", xhat_dtype), ("rstd_dtype", rstd_dtype)):
        if not _kernel_dtype_or_none(dtype):
            raise TypeError(
                f"{fn}(): {name} must be None or one of torch.float32, torch.float64, torch.bfloat16, "
                f"torch.float16, got {dtype!r}"
            )


def _kernel_dtype_or_none(dtype: object) -> bool:
    """Whether a family option's dtype is None or one the kernels compute in."""
    return dtype is None or (isinstance(dtype, torch.dtype) and dtype in KERNEL_DTYPES)


def _family_out_dtype(x: Tensor, weight: Tensor | None, xhat_dtype: torch.dtype | None) -> torch.dtype | None:
    """Llama/T5 style (``xhat_dtype`` given): ``weight * xhat.to(xhat_dtype)``, so torch's type
    promotion of the two decides the output dtype. Otherwise x's dtype (None)."""
    if xhat_dtype is None:
        return None
    return torch.promote_types(xhat_dtype, weight.dtype) if weight is not None else xhat_dtype


def rms_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    weight_offset: float = 0.0,
    xhat_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""RMS normalization over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.rms_norm``.

    ``y = x / sqrt(mean(x^2) + eps) * weight`` per row, computed in float32 for
    fp32/bf16/fp16 input (float64 for float64) and rounded once to the input's dtype.

    Args:
        input: (*, *normalized_shape), float32/float64/bfloat16/float16, any strides (complex:
            computed by torch itself, normfuse has no complex kernels).
        normalized_shape: the trailing shape to normalize over.
        weight: ``normalized_shape``-shaped, or None. Any dtype: like torch, it is converted to
            the computation dtype (float32 for a bf16/fp16/fp32 input).
        eps: added to the mean square; None means ``torch.finfo`` of the computation dtype.

    Keyword-only options reproducing the formulas of model families (defaults: torch's):
        weight_offset: the scale is ``weight_offset + weight``, formed in the computation dtype.
            Gemma 1-3 (and Qwen3-Next) use ``1.0``: their weight is stored as an offset from 1.
        xhat_dtype: round ``x * rstd`` to this dtype *before* multiplying by the weight, and let
            torch's type promotion of ``xhat_dtype`` and the weight's dtype decide the output
            dtype. The Llama family (Mistral, Qwen2/3, Phi-3, Granite, ...) uses the input's
            dtype (``weight * xhat.to(input.dtype)``; an fp32 weight with bf16 input gives an
            fp32 output); T5 uses the weight's dtype when it is fp16/bf16, else float32.
            None (torch, Gemma, OLMo-2): multiply in the computation dtype, then round to the
            input's dtype.
        rstd_dtype: round ``rstd = 1 / sqrt(mean(x^2) + eps)`` to this dtype before it
            multiplies x; the output dtype is unchanged. DeepSeek-V4's and GLM-5 Next's
            unweighted norms use the input's dtype (``x * rsqrt(...).to(x.dtype)``: a bf16 x
            times a bf16 rstd, rounded once to bf16). The backward takes the rounding as the
            identity, as autograd does a cast.

    Returns:
        A new contiguous tensor of input's shape; input's dtype (or the promoted dtype above).
    """
    if (
        (eps is None or type(eps) is float) and (path := _direct_path(input, normalized_shape, weight, None))
        and (direct := _direct_family(input, weight, weight_offset, xhat_dtype, rstd_dtype, path)) is not None
        and (out := _direct_call(
            input, normalized_shape[0], direct[0], None, _rms_eps(input, eps), True, path, None, *direct[1:]
        )) is not None
    ):  # fmt: skip
        return out
    if _fx_trace._is_fx_tracing_flag and (node := _fx_node(
        rms_norm, (input, normalized_shape, weight, eps), weight_offset=weight_offset, xhat_dtype=xhat_dtype,
        rstd_dtype=rstd_dtype,
    )) is not None:  # fmt: skip
        return node
    _check_tensor("rms_norm", "input", input, 1)
    shape = _check_int_tuple("rms_norm", normalized_shape, 2)
    _check_optional_tensor("rms_norm", "weight", weight, 3)
    _check_rms_eps("rms_norm", eps, 4)
    _check_family_options("rms_norm", weight_offset, xhat_dtype, rstd_dtype)
    family = weight_offset != 0.0 or xhat_dtype is not None or rstd_dtype is not None
    if input.is_nested:
        if input.layout == torch.jagged:
            if not _jagged_rows_normalizable(input, shape):
                raise ValueError("rms_norm(): Normalization over the ragged dim not supported for nested tensors")
            _check_rms_norm_inputs(input, shape, weight)  # torch's messages show the nested shape
            out = rms_norm(
                input.values(), shape, weight, eps, weight_offset=weight_offset, xhat_dtype=xhat_dtype,
                rstd_dtype=rstd_dtype,
            )  # fmt: skip
            return _like_nested(out, input)
        if family:
            raise NotImplementedError(
                "normfuse.rms_norm: weight_offset, xhat_dtype and rstd_dtype need a jagged nested tensor"
            )
        _torch_computes("rms_norm")
        return torch.rms_norm(input, list(shape), weight, eps)
    if _is_dtensor(input):
        if _shards_rows_only(input, shape, (weight,)):
            (local_weight,) = _local_params(input, (weight,))
            local = rms_norm(
                input.to_local(), shape, local_weight, eps, weight_offset=weight_offset, xhat_dtype=xhat_dtype,
                rstd_dtype=rstd_dtype,
            )  # fmt: skip
            return _like_dtensor(local, input)
        if family:
            raise NotImplementedError(
                "normfuse.rms_norm: weight_offset, xhat_dtype and rstd_dtype need a DTensor sharded over rows"
            )
        return torch.rms_norm(input, list(shape), weight, eps)  # DTensor's own rules
    if not family and _autocasts_to_fp32("rms_norm", input):
        # torch's formula only: the family formulas are written with casts of their own
        input, weight = _fp32(input), _fp32(weight)
    _check_rms_norm_inputs(input, shape, weight)
    if input.is_complex():
        if family:
            raise NotImplementedError("normfuse.rms_norm: weight_offset, xhat_dtype and rstd_dtype need a real input")
        return torch.rms_norm(input, list(shape), weight, eps)
    out_dtype = _family_out_dtype(input, weight, xhat_dtype)
    w = _rms_weight(input, weight, float(weight_offset))
    return _normalize(input, shape, w, None, _rms_eps(input, eps), True, xhat_dtype, out_dtype, rstd_dtype)


def add_layer_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    residual_dtype: torch.dtype | None = None,
    return_dropout_mask: bool = False,
) -> tuple[Tensor, ...]:
    r"""The pre-norm block's step, fused: ``residual_out = dropout(x) + residual``, ``out = layer_norm(residual_out)``.

    Args:
        x: (*, *normalized_shape), the block's output (float32/float64/bfloat16/float16).
        residual: x's shape, or None (then ``residual_out = dropout(x)``). Same dtype as x, or
            float32 with a bf16/fp16 x (a float32 residual stream).
        normalized_shape, weight, bias, eps: as ``layer_norm``.
        dropout_p: probability of zeroing an element of x; kept ones are scaled by 1/(1-p).
            The mask comes from torch's default generator (``torch.manual_seed`` reproduces it)
            and the backward recomputes exactly the forward's.
        training: dropout only when True (as ``torch.nn.functional.dropout``).
        residual_dtype: dtype of ``residual_out`` (default: the residual's dtype, else x's).
        return_dropout_mask: also return the boolean keep-mask (all True without dropout).

    Returns:
        ``(out, residual_out)`` or ``(out, residual_out, mask)``: out in x's dtype, normalized
        from ``residual_out`` as rounded to ``residual_dtype``. Gradients flow through both.
    """
    if (
        type(eps) is float
        and (path := _direct_add_path(
            x, residual, normalized_shape, weight, bias, dropout_p, training, residual_dtype, return_dropout_mask
        ))
        and (outs := _direct_call(x, normalized_shape[0], weight, bias, eps, False, path, residual)) is not None
    ):  # fmt: skip
        return outs
    if _fx_trace._is_fx_tracing_flag and (node := _fx_node(
        add_layer_norm, (x, residual, normalized_shape, weight, bias, eps), dropout_p=dropout_p, training=training,
        residual_dtype=residual_dtype, return_dropout_mask=return_dropout_mask,
    )) is not None:  # fmt: skip
        return node
    _check_tensor("add_layer_norm", "x", x, 1)
    shape = _check_int_tuple("add_layer_norm", normalized_shape, 3)
    _check_optional_tensor("add_layer_norm", "weight", weight, 4)
    _check_optional_tensor("add_layer_norm", "bias", bias, 5)
    _check_eps("add_layer_norm", eps, 6)
    p = _check_dropout_p(dropout_p)
    if x.is_nested:
        _check_nested_add("add_layer_norm", x, residual, shape, residual_dtype)
        outs = add_layer_norm(
            x.values(), _values(residual), shape, weight, bias, eps, dropout_p=p, training=training,
            residual_dtype=residual_dtype, return_dropout_mask=return_dropout_mask,
        )  # fmt: skip
        return tuple(_like_nested(o, x) for o in outs)
    if _is_dtensor(x):
        _check_dtensor_add("add_layer_norm", x, residual, shape, (weight, bias))
        outs = add_layer_norm(
            x.to_local(), _local(residual), shape, *_local_params(x, (weight, bias)), eps, dropout_p=p,
            training=training, residual_dtype=residual_dtype, return_dropout_mask=return_dropout_mask,
        )  # fmt: skip
        return tuple(_like_dtensor(o, x) for o in outs)
    out_dtype = None
    if _autocasts_to_fp32("layer_norm", x):
        # as ``x + residual`` (no autocast) and then torch's layer_norm under autocast
        weight, bias, out_dtype = _fp32(weight), _fp32(bias), _autocast_out_dtype(x, residual, residual_dtype)
    _check_layer_norm_inputs(x, shape, weight, bias)
    _check_residual("add_layer_norm", x, residual, residual_dtype)
    return _add_normalize(
        x, residual, shape, weight, bias, float(eps), False, p if training else 0.0, residual_dtype,
        return_dropout_mask, None, out_dtype,
    )  # fmt: skip


def _autocast_out_dtype(x: Tensor, residual: object, residual_dtype: object) -> torch.dtype | None:
    """The output dtype of torch's norm under fp32 autocast of the residual sum: float32 (the sum
    cast to it), or None where the sum is float64 (autocast leaves float64 alone)."""
    h_dtype = residual_dtype or (residual.dtype if isinstance(residual, Tensor) else x.dtype)
    return None if h_dtype == torch.float64 else torch.float32


def add_rms_norm(
    x: Tensor,
    residual: Tensor | None,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    residual_dtype: torch.dtype | None = None,
    return_dropout_mask: bool = False,
    weight_offset: float = 0.0,
    xhat_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
) -> tuple[Tensor, ...]:
    r"""``add_layer_norm`` with RMSNorm: ``residual_out = dropout(x) + residual``, ``out = rms_norm(residual_out)``.

    Arguments as ``add_layer_norm`` and ``rms_norm`` (``weight_offset``, ``xhat_dtype``,
    ``rstd_dtype``: the model-family options, with x-hat rounded to ``xhat_dtype`` and the
    output dtype promoted as there). eps=None: ``torch.finfo`` of the computation dtype.
    """
    if (
        (eps is None or type(eps) is float)
        and (path := _direct_add_path(
            x, residual, normalized_shape, weight, None, dropout_p, training, residual_dtype, return_dropout_mask
        ))
        and (direct := _direct_family(x, weight, weight_offset, xhat_dtype, rstd_dtype, path)) is not None
        and (outs := _direct_call(
            x, normalized_shape[0], direct[0], None, _rms_eps(x, eps), True, path, residual, *direct[1:]
        )) is not None
    ):  # fmt: skip
        return outs
    if _fx_trace._is_fx_tracing_flag and (node := _fx_node(
        add_rms_norm, (x, residual, normalized_shape, weight, eps), dropout_p=dropout_p, training=training,
        residual_dtype=residual_dtype, return_dropout_mask=return_dropout_mask, weight_offset=weight_offset,
        xhat_dtype=xhat_dtype, rstd_dtype=rstd_dtype,
    )) is not None:  # fmt: skip
        return node
    _check_tensor("add_rms_norm", "x", x, 1)
    shape = _check_int_tuple("add_rms_norm", normalized_shape, 3)
    _check_optional_tensor("add_rms_norm", "weight", weight, 4)
    _check_rms_eps("add_rms_norm", eps, 5)
    _check_family_options("add_rms_norm", weight_offset, xhat_dtype, rstd_dtype)
    p = _check_dropout_p(dropout_p)
    if x.is_nested:
        _check_nested_add("add_rms_norm", x, residual, shape, residual_dtype)
        outs = add_rms_norm(
            x.values(), _values(residual), shape, weight, eps, dropout_p=p, training=training,
            residual_dtype=residual_dtype, return_dropout_mask=return_dropout_mask, weight_offset=weight_offset,
            xhat_dtype=xhat_dtype, rstd_dtype=rstd_dtype,
        )  # fmt: skip
        return tuple(_like_nested(o, x) for o in outs)
    if _is_dtensor(x):
        _check_dtensor_add("add_rms_norm", x, residual, shape, (weight,))
        outs = add_rms_norm(
            x.to_local(), _local(residual), shape, *_local_params(x, (weight,)), eps, dropout_p=p, training=training,
            residual_dtype=residual_dtype, return_dropout_mask=return_dropout_mask, weight_offset=weight_offset,
            xhat_dtype=xhat_dtype, rstd_dtype=rstd_dtype,
        )  # fmt: skip
        return tuple(_like_dtensor(o, x) for o in outs)
    autocast_out_dtype = None
    if weight_offset == 0.0 and xhat_dtype is None and rstd_dtype is None and _autocasts_to_fp32("rms_norm", x):
        weight, autocast_out_dtype = _fp32(weight), _autocast_out_dtype(x, residual, residual_dtype)
    _check_rms_norm_inputs(x, shape, weight)
    if x.is_complex():
        raise NotImplementedError('"add_rms_norm" not implemented for complex inputs')
    _check_residual("add_rms_norm", x, residual, residual_dtype)
    out_dtype = autocast_out_dtype or _family_out_dtype(x, weight, xhat_dtype)
    w = _rms_weight(x, weight, float(weight_offset))
    return _add_normalize(
        x, residual, shape, w, None, _rms_eps(x, eps), True, p if training else 0.0, residual_dtype,
        return_dropout_mask, xhat_dtype, out_dtype, rstd_dtype,
    )  # fmt: skip
