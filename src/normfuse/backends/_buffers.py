"""The tensors a backend's forward and backward return, allocated as the backend contract says.

Shared by every kernel backend (numba, Triton): which outputs exist, their dtypes and devices,
and what they hold for an empty input, depend on the contract, not on the kernels.
"""

from __future__ import annotations

import math

import torch

from normfuse._dtypes import acc_dtype


def fwd_buffers(
    x: torch.Tensor,
    residual_out_dtype: torch.dtype | None,
    dropping: bool,
    return_mask: bool,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(out, h, mask, mean, rstd) on x's device for an (M, N) x.

    h (the residual output) exists with a residual add, the keep-mask when asked for (all True
    when nothing is dropped); mean and rstd are in the accumulation dtype of the normalized
    input. For an empty x they already hold their final values (mean 0, rstd NaN).
    """
    n_rows, n = x.shape
    add = residual_out_dtype is not None
    h_dtype = residual_out_dtype if add else x.dtype
    acc = acc_dtype(h_dtype)
    out = torch.empty((n_rows, n), dtype=out_dtype or x.dtype, device=x.device)
    h = torch.empty((n_rows, n), dtype=h_dtype, device=x.device) if add else None
    mask = torch.empty((n_rows, n), dtype=torch.bool, device=x.device) if add and return_mask else None
    if mask is not None and not dropping:
        mask.fill_(True)
    mean = torch.empty(n_rows, dtype=acc, device=x.device)
    rstd = torch.empty(n_rows, dtype=acc, device=x.device)
    if n_rows == 0 or n == 0:
        mean.zero_()
        rstd.fill_(math.nan)
    return out, h, mask, mean, rstd


def bwd_buffers(
    h: torch.Tensor,
    add: bool,
    need_dx: bool,
    need_dresidual: bool,
    x_dtype: torch.dtype | None,
    residual_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx, dresidual) for an (M, N) normalized input h, None where not asked for."""
    dx = torch.empty(h.shape, dtype=x_dtype if add else h.dtype, device=h.device) if need_dx else None
    dres = torch.empty(h.shape, dtype=residual_dtype, device=h.device) if add and need_dresidual else None
    return dx, dres


def sums_over_no_rows(
    n: int, acc: torch.dtype, device: torch.device, need_dweight: bool, need_dbias: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dweight and dbias of an input with no rows: zeros (the sums over no rows)."""
    zeros = torch.zeros(n, dtype=acc, device=device)
    return zeros if need_dweight else None, zeros.clone() if need_dbias else None


def rounded(total: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """A parameter gradient summed in the accumulation dtype, rounded once to ``dtype`` (None: kept)."""
    if total is None or dtype is None or total.dtype == dtype:
        return total
    return total.to(dtype)
