"""Plain-torch float64 oracle: the definition every kernel and every test is held to.

Forward and backward are written out explicitly (no autograd), computed in float64 whatever
the input dtype. ``rms=True`` is RMSNorm: no mean, no bias term in the backward.

The 2-D functions ``norm_fwd`` / ``norm_bwd`` have the same contract as the kernels of
``normfuse.backends`` so the reference also serves as a backend (``use_backend("reference")``).
"""

from __future__ import annotations

import math

import torch

from normfuse import _dropout
from normfuse._dtypes import acc_dtype

__all__ = [
    "add_residual",
    "layer_norm",
    "layer_norm_backward",
    "norm_fwd",
    "norm_fwd_inference",
    "norm_bwd",
    "norm_bwd_differentiable",
]


def _stats(x64: torch.Tensor, eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean (0 for RMSNorm) and 1/sqrt(var + eps) of a float64 (M, N) tensor."""
    if rms:
        mean = torch.zeros(x64.shape[:-1] + (1,), dtype=x64.dtype, device=x64.device)
    else:
        mean = x64.mean(dim=-1, keepdim=True)
    var = (x64 - mean).square().mean(dim=-1, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(-1, n)


def _round_to(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype).to(t.dtype)


def add_residual(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    residual_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dropout(x) + residual`` in float64 with the given keep-mask, rounded once to ``residual_dtype``
    (default: the residual's dtype, else x's), returned in that dtype: the residual stream."""
    dtype = residual_dtype or (residual.dtype if residual is not None else x.dtype)
    h = x.to(torch.float64)
    if keep is not None:
        h = torch.where(keep, h * _dropout.scale(dropout_p), 0.0)
    if residual is not None:
        h = h + residual.to(torch.float64)
    return h.to(dtype)


def layer_norm(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    rms: bool = False,
    xhat_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm (RMSNorm with ``rms``) over the trailing ``normalized_shape`` dims, in float64.

    x: (*, *normalized_shape), any float dtype; weight, bias: normalized_shape or None.
    ``xhat_dtype`` rounds x-hat to that dtype before the weight multiply (Llama-style models);
    ``rstd_dtype`` rounds 1/sqrt(var + eps) to that dtype before it multiplies (DeepSeek-V4's
    unweighted norm). Returns a float64 tensor of x's shape.
    """
    n = math.prod(normalized_shape)
    x64 = _rows(x.to(torch.float64), n)
    mean, rstd = _stats(x64, eps, rms)
    y = _round_to((x64 - mean) * _round_to(rstd, rstd_dtype), xhat_dtype)
    if weight is not None:
        y = y * weight.to(torch.float64).reshape(n)
    if bias is not None:
        y = y + bias.to(torch.float64).reshape(n)
    return y.reshape(x.shape)


def layer_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit float64 gradients (dx, dweight, dbias) of ``layer_norm`` for ``grad_out``.

    dx has x's shape; dweight and dbias have normalized_shape (dbias is zeros for ``rms``).
    """
    n = math.prod(normalized_shape)
    x64 = _rows(x.to(torch.float64), n)
    dy = _rows(grad_out.to(torch.float64), n)
    w = torch.ones(n, dtype=torch.float64) if weight is None else weight.to(torch.float64).reshape(n)
    dx, dw, db = _explicit_backward(dy, x64, w, eps, rms)
    return dx.reshape(x.shape), dw.reshape(normalized_shape), db.reshape(normalized_shape)


def _explicit_backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, rstd = _stats(x, eps, rms)
    xhat = (x - mean) * rstd
    g = dy * w
    if rms and x.shape[-1] == 1:
        # over one feature g - xhat * (xhat * g) is g * (1 - xhat^2) = g * eps * rstd^2 exactly,
        # which the general form below leaves as a residue of rounding
        dx = torch.where(x.isinf(), torch.nan, g * (eps * rstd**3))  # an infinite x: NaN, as below
    else:
        mean_xhat_g = (xhat * g).mean(dim=-1, keepdim=True)
        dx = g - xhat * mean_xhat_g
        if not rms:
            dx = dx - g.mean(dim=-1, keepdim=True)
        dx = dx * rstd
    dw = (dy * xhat).sum(dim=0)
    db = dy.sum(dim=0) if not rms else torch.zeros_like(dw)
    return dx, dw, db


# --- the backend contract (2-D, row-major), see normfuse.backends.cpu -------------------------


def norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    *,
    residual: torch.Tensor | None = None,
    residual_out_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    return_mask: bool = False,
    xhat_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backends' forward contract (see ``normfuse.backends.cpu.norm_fwd``), float64 math."""
    add = residual_out_dtype is not None
    mask = None
    if add:
        keep = _dropout.keep_mask(seed, dropout_p, *x.shape, device=x.device) if dropout_p > 0 else None
        h = add_residual(x, residual, keep, dropout_p, residual_out_dtype)
        if return_mask:
            mask = keep if keep is not None else torch.ones(x.shape, dtype=torch.bool, device=x.device)
    else:
        h = x
    acc = acc_dtype(h.dtype)
    h64 = h.to(torch.float64)
    mean, rstd = _stats(h64, eps, rms)
    y = _round_to((h64 - mean) * _round_to(rstd, rstd_dtype), xhat_dtype)
    if weight is not None:
        y = y * weight.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    out = y.to(out_dtype or x.dtype)
    return out, h if add else None, mean.reshape(-1).to(acc), rstd.reshape(-1).to(acc), mask


def norm_fwd_inference(
    x: torch.Tensor,
    n_rows: int,
    n: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    xhat_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The plain forward's output alone, in x's shape (the backend contract's inference entry)."""
    out = norm_fwd(
        x.reshape(n_rows, n), weight, bias, eps, rms, xhat_dtype=xhat_dtype, out_dtype=out_dtype, rstd_dtype=rstd_dtype
    )[0]
    return out.view(x.shape)


def norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
    *,
    add: bool = False,
    dresidual_out: torch.Tensor | None = None,
    need_dresidual: bool = False,
    x_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    dweight_dtype: torch.dtype | None = None,
    dbias_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backends' backward contract (see ``normfuse.backends.cpu.norm_bwd``), float64 math."""
    acc = acc_dtype(h.dtype)
    h64 = h.to(torch.float64)
    dy64 = dy.to(torch.float64)
    w = torch.ones(h.shape[1], dtype=torch.float64, device=h.device) if weight is None else weight.to(torch.float64)
    mean64 = mean.to(torch.float64).reshape(-1, 1)
    rstd64 = rstd.to(torch.float64).reshape(-1, 1)
    # recentre: the saved mean was rounded to the accumulation dtype
    centred = h64 - mean64
    if not rms:
        centred = centred - centred.mean(dim=-1, keepdim=True)
    xhat = centred * rstd64
    g = dy64 * w
    dh = g - xhat * (xhat * g).mean(dim=-1, keepdim=True)
    if not rms:
        dh = dh - g.mean(dim=-1, keepdim=True)
    dh = dh * rstd64
    dx = dres = None
    if add:
        if dresidual_out is not None:
            dh = dh + dresidual_out.to(torch.float64)
        if need_dresidual:
            dres = dh.to(residual_dtype)
        if need_dx:
            if dropout_p > 0:
                keep = _dropout.keep_mask(seed, dropout_p, *h.shape, device=h.device)
                dh = torch.where(keep, dh * _dropout.scale(dropout_p), 0.0)
            dx = dh.to(x_dtype)
    elif need_dx:
        dx = dh.to(h.dtype)
    # the kernels' rounding: the sums in the accumulation dtype, then to the parameters' dtypes
    dweight = (dy64 * xhat).sum(dim=0).to(acc).to(dweight_dtype or acc) if need_dweight else None
    dbias = dy64.sum(dim=0).to(acc).to(dbias_dtype or acc) if need_dbias else None
    return dx, dres, dweight, dbias


def norm_bwd_differentiable(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients as a differentiable function of (dy, x, weight), for double backward.

    Statistics are recomputed from x so that second derivatives see their dependence on x.
    Computed in x's dtype (float64 under gradgradcheck); dweight/dbias in x's dtype.
    """
    w = torch.ones(x.shape[1], dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    return _explicit_backward(dy.to(x.dtype), x, w, eps, rms)
