"""Thin ``nn.Module`` front ends: parameters and state like torch's, math in ``functional``."""

from __future__ import annotations

import torch
from torch import Tensor

from normfuse import functional

__all__ = ["LayerNorm"]


class LayerNorm(torch.nn.LayerNorm):
    r"""``torch.nn.LayerNorm`` computed by normfuse's fused kernels.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias``: ``weight`` (gamma, initialized to ones)
    and ``bias`` (beta, zeros) are learnable, of shape ``normalized_shape``.

    Same constructor, parameters, ``reset_parameters()``, ``extra_repr()`` and ``state_dict()`` keys
    as ``torch.nn.LayerNorm`` (it is a subclass, so ``isinstance(m, torch.nn.LayerNorm)`` holds and
    code that, say, exempts LayerNorm weights from weight decay keeps working). State dicts load
    both ways.

    Input: (*, *normalized_shape); output: same shape and dtype.
    """

    def forward(self, input: Tensor) -> Tensor:
        return functional.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

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
