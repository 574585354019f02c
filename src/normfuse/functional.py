"""Functional API: torch's argument contract and error messages, then one custom op.

Every check runs before any kernel, in the order torch runs them, and raises torch's
exception type with torch's text, so code written against ``torch.nn.functional`` sees no
difference.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from normfuse import ops
from normfuse._dtypes import KERNEL_DTYPES

__all__ = ["layer_norm"]

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


def _scalar_type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape_list(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _check_int_tuple(fn: str, value: object, position: int) -> tuple[int, ...]:
    """torch's argument parser for an ``int[]`` named ``normalized_shape``."""
    prefix = f"{fn}(): argument 'normalized_shape' (position {position}) must be tuple of ints"
    if not isinstance(value, (tuple, list, torch.Size)):
        raise TypeError(f"{prefix}, not {type(value).__name__}")
    for pos, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, torch.SymInt, Tensor)):
            raise TypeError(f"{prefix}, but found element of type {type(item).__name__} at pos {pos}")
    return tuple(int(item) for item in value)


def _check_optional_tensor(fn: str, name: str, value: object, position: int) -> None:
    if value is not None and not isinstance(value, Tensor):
        raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be Tensor, not {type(value).__name__}")


def _check_eps(fn: str, eps: object, position: int) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{fn}(): argument 'eps' (position {position}) must be float, not {type(eps).__name__}")


def _check_layer_norm_inputs(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None
) -> None:
    """Device, dtype and shape checks in the order ATen's CPU layer_norm makes them."""
    x_is_cpu = x.is_cpu  # cheap test first: building device objects costs a microsecond each
    for param in (weight, bias):
        if param is not None and not (x_is_cpu and param.is_cpu) and param.device != x.device:
            raise RuntimeError(f"Tensor on device {param.device} is not on the expected device {x.device}!")
    params = [p for p in (weight, bias) if p is not None]
    mixed = len(params) > 0 and params[0].dtype != x.dtype
    if mixed:
        # a bf16/fp16 input may take fp32 parameters; nothing else may differ
        if x.dtype not in (torch.float32, *_LOW_PRECISION):
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        if any(p.dtype != torch.float32 for p in params):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
    if len(normalized_shape) < 1:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one element, "
            f"but got normalized_shape = {_shape_list(normalized_shape)}"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != normalized_shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{_shape_list(param.shape)} and normalized_shape = {_shape_list(normalized_shape)}"
            )
    k = len(normalized_shape)
    if x.dim() < k or x.shape[x.dim() - k :] != normalized_shape:
        raise RuntimeError(
            f"Given normalized_shape={_shape_list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(str(s) for s in normalized_shape)}], but got input of size{_shape_list(x.shape)}"
        )
    if x.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f'"LayerNormKernelImpl" not implemented for \'{_scalar_type_name(x.dtype)}\'')
    if not mixed:
        for param in params:
            if param.dtype != x.dtype:
                raise RuntimeError(
                    f"expected scalar type {_scalar_type_name(x.dtype)} but found {_scalar_type_name(param.dtype)}"
                )


def _needs_autograd(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _normalize(
    x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float, rms: bool
) -> Tensor:
    """View x as (rows, n) row-major, run the forward, give the result x's shape."""
    n = math.prod(normalized_shape)
    rows = math.prod(x.shape[: x.dim() - len(normalized_shape)])
    if not x.is_contiguous():
        x = x.contiguous()
    w = weight.reshape(n) if weight is not None and weight.dim() != 1 else weight
    b = bias.reshape(n) if bias is not None and bias.dim() != 1 else bias
    if type(x) is Tensor and not torch.compiler.is_compiling():
        # Eager, plain tensors: skip the dispatcher, whose round trip costs more than the whole
        # op on a few rows (token-at-a-time decoding). Inference calls the kernel directly.
        if not _needs_autograd(x, weight, bias):
            return ops.backend_for(x).norm_fwd_inference(x, rows, n, w, b, float(eps), rms)
        return ops.NormFunction.apply(x.view(rows, n), w, b, float(eps), rms).view(x.shape)
    return torch.ops.normfuse.norm_fwd(x.view(rows, n), w, b, float(eps), rms)[0].view(x.shape)


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
    shape = _check_int_tuple("layer_norm", normalized_shape, 2)
    _check_optional_tensor("layer_norm", "weight", weight, 3)
    _check_optional_tensor("layer_norm", "bias", bias, 4)
    _check_eps("layer_norm", eps, 5)
    _check_layer_norm_inputs(input, shape, weight, bias)
    return _normalize(input, shape, weight, bias, eps, rms=False)
