"""Thin ``nn.Module`` front ends: parameters and state like torch's, math in ``functional``."""

from __future__ import annotations

import torch
from torch import Tensor

from normfuse import functional

__all__ = ["LayerNorm", "RMSNorm"]


def _prenorm_extras(module: torch.nn.Module, dropout_p: float, residual_dtype: torch.dtype | None) -> None:
    # checked here so that a bad value fails at construction, not at the first forward
    functional._check_dropout_p(dropout_p)
    if residual_dtype is not None and (
        not isinstance(residual_dtype, torch.dtype) or not residual_dtype.is_floating_point
    ):
        raise TypeError(f"residual_dtype must be a floating point torch.dtype, got {residual_dtype!r}")
    module.dropout_p = float(dropout_p)
    module.residual_dtype = residual_dtype


def _prenorm_repr(module: torch.nn.Module) -> str:
    # torch's repr unchanged unless the extras are set
    extras = ""
    if module.dropout_p:
        extras += f", dropout_p={module.dropout_p}"
    if module.residual_dtype is not None:
        extras += f", residual_dtype={module.residual_dtype}"
    return extras


def not_scriptable(module: torch.nn.Module) -> torch.nn.Module:
    """``__prepare_scriptable__`` of normfuse's modules (and of the classes ``patch`` generates).

    ``torch.jit.script`` (deprecated in torch) compiles a module's Python source, and normfuse's
    front end is not TorchScript; without this the error would point at a type annotation deep
    in ``functional``. (Returning torch's own module instead is no way out: torch.jit.script puts
    what this returns into the parent module's children, so the eager model would lose normfuse.)
    """
    raise RuntimeError(
        f"{type(module).__name__} (normfuse) cannot be compiled by torch.jit.script, which is deprecated in torch: "
        "use torch.compile or torch.export (both keep normfuse's kernels), or torch.jit.trace, which records "
        "normfuse's custom op; for a model patched with normfuse.patch, normfuse.unpatch(model) restores its "
        "original modules"
    )


class LayerNorm(torch.nn.LayerNorm):
    r"""``torch.nn.LayerNorm`` computed by normfuse's fused kernels.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias``: ``weight`` (gamma, initialized to ones)
    and ``bias`` (beta, zeros) are learnable, of shape ``normalized_shape``.

    Same constructor, parameters, ``reset_parameters()``, ``extra_repr()`` and ``state_dict()`` keys
    as ``torch.nn.LayerNorm`` (it is a subclass, so ``isinstance(m, torch.nn.LayerNorm)`` holds and
    code that, say, exempts LayerNorm weights from weight decay keeps working). State dicts load
    both ways.

    ``forward(x)`` is torch's; ``forward(x, residual=r)`` is the pre-norm block's step
    ``residual_out = dropout(x) + r``, ``out = norm(residual_out)`` and returns
    ``(out, residual_out)`` (see ``normfuse.add_layer_norm``). The keyword-only ``dropout_p``
    (applied in training mode only) and ``residual_dtype`` apply to that path alone.

    Input: (*, *normalized_shape); output: same shape and dtype.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        dropout_p: float = 0.0,
        residual_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        _prenorm_extras(self, dropout_p, residual_dtype)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None:
            return functional.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return functional.add_layer_norm(
            input, residual, self.normalized_shape, self.weight, self.bias, self.eps,
            dropout_p=self.dropout_p, training=self.training, residual_dtype=self.residual_dtype,
        )  # fmt: skip

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return super().extra_repr() + _prenorm_repr(self)

    @classmethod
    def from_torch(cls, module: torch.nn.LayerNorm) -> LayerNorm:
        """A normfuse LayerNorm computing what ``module`` computes, sharing its Parameter objects.

        Device, dtype and values are kept because the parameters are the same objects (an
        optimizer holding them, or a weight tied to them, keeps working).
        """
        if not isinstance(module, torch.nn.LayerNorm):
            raise TypeError(f"from_torch expects a torch.nn.LayerNorm, got {type(module).__name__}")
        new = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            device="meta",
        )
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        return new


class RMSNorm(torch.nn.RMSNorm):
    r"""``torch.nn.RMSNorm`` computed by normfuse's fused kernels.

    ``y = x / sqrt(mean(x^2) + eps) * weight``: ``weight`` (gamma, initialized to ones) is
    learnable, of shape ``normalized_shape``; ``eps=None`` means ``torch.finfo`` of the
    computation dtype. Same constructor, parameter, ``reset_parameters()``, ``extra_repr()`` and
    ``state_dict()`` keys as ``torch.nn.RMSNorm`` (a subclass); state dicts load both ways.

    ``forward(x, residual=r)`` returns ``(out, residual_out)`` as in ``LayerNorm``, with the
    keyword-only extras ``dropout_p`` and ``residual_dtype`` (see ``normfuse.add_rms_norm``).
    """

    def __init__(
        self,
        normalized_shape,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        dropout_p: float = 0.0,
        residual_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        _prenorm_extras(self, dropout_p, residual_dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None:
            return functional.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return functional.add_rms_norm(
            x, residual, self.normalized_shape, self.weight, self.eps,
            dropout_p=self.dropout_p, training=self.training, residual_dtype=self.residual_dtype,
        )  # fmt: skip

    __prepare_scriptable__ = not_scriptable

    def extra_repr(self) -> str:
        return super().extra_repr() + _prenorm_repr(self)

    @classmethod
    def from_torch(cls, module: torch.nn.RMSNorm) -> RMSNorm:
        """A normfuse RMSNorm computing what ``module`` computes, sharing its Parameter object."""
        if not isinstance(module, torch.nn.RMSNorm):
            raise TypeError(f"from_torch expects a torch.nn.RMSNorm, got {type(module).__name__}")
        new = cls(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine, device="meta")
        new.weight = module.weight
        new.train(module.training)
        return new
