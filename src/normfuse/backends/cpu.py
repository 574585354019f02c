"""CPU backend: numba kernels for the normalization forward and backward.

One kernel source serves every variant: ``rms`` drops the mean (RMSNorm), and the storage
dtype (float32, float64, bf16 as uint16 bits, fp16 as int16 bits) is picked at compile time
by the helpers in ``_numba_bits``. Arithmetic is float32 for fp32/bf16/fp16 and float64 for
fp64.

Forward, per row (a row of a few thousand features stays in L1/L2 after the first read, so
the three loops below cost one read of memory):
  1. ``m1 = sum(x) / n``, a rough mean (fp32 lanes, vectorized).
  2. ``d = x - m1``; ``c = sum(d) / n`` corrects ``m1``, ``var = sum(d^2)/n - c^2``. This is the
     corrected two-pass algorithm: its error does not grow with the row's mean, unlike
     ``E[x^2] - E[x]^2`` which loses every digit at a mean of 1e4 in fp32.
  3. ``y = ((x - m1) - c) * rstd * w + b``.

Backward, per row, with ``xhat = (x - mean) * rstd`` and ``g = dy * w``:
  ``dx = rstd * (g - xhat * mean(xhat * g) - mean(g))``, ``dw += dy * xhat``, ``db += dy``.
  ``xhat`` is recomputed centered (and the fp32-rounded saved mean is corrected by
  ``mean(x - mean)``), so dx does not degrade with the row's mean. dw/db accumulate in the
  accumulation type (fp32 for bf16/fp16) into one partial row per fixed-size chunk of rows,
  and the partial rows are summed in chunk order: the result is bitwise the same whatever
  the number of threads.

This module imports nothing from the front end; it takes 2-D row-major tensors.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from normfuse.backends._numba_bits import acc_scalar, load, store

# reassoc lets LLVM split the row sums across SIMD lanes (deterministic: fixed at compile
# time); contract allows FMA. No nnan/ninf: NaN and Inf must propagate as in torch.
_FASTMATH = {"reassoc", "contract"}

# Below this many elements a thread pool costs more than it saves.
_PARALLEL_MIN_ELEMENTS = 1 << 15


@njit(fastmath=_FASTMATH, inline="always")
def _fwd_row(x, w, b, out, mean, rstd, eps, rms, i):
    n = x.shape[1]
    inv_n = acc_scalar(x, 1.0 / n)
    m1 = acc_scalar(x, 0.0)
    if not rms:
        s = acc_scalar(x, 0.0)
        for j in range(n):
            s += load(x, i, j)
        m1 = s * inv_n
    sd = acc_scalar(x, 0.0)
    sdd = acc_scalar(x, 0.0)
    for j in range(n):
        d = load(x, i, j) - m1
        sd += d
        sdd += d * d
    c = acc_scalar(x, 0.0) if rms else sd * inv_n
    var = sdd * inv_n - c * c
    if var < 0:
        var = acc_scalar(x, 0.0)
    r = acc_scalar(x, 1.0) / np.sqrt(var + eps)
    mean[i] = m1 + c
    rstd[i] = r
    for j in range(n):
        store(out, i, j, ((load(x, i, j) - m1) - c) * r * w[j] + b[j])


@njit(fastmath=_FASTMATH, cache=True)
def _fwd_serial(x, w, b, out, mean, rstd, eps, rms):
    for i in range(x.shape[0]):
        _fwd_row(x, w, b, out, mean, rstd, eps, rms, i)


@njit(fastmath=_FASTMATH, cache=True, parallel=True)
def _fwd_parallel(x, w, b, out, mean, rstd, eps, rms, rows_per_block):
    n_rows = x.shape[0]
    n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
    for k in prange(n_blocks):
        for i in range(k * rows_per_block, min(n_rows, (k + 1) * rows_per_block)):
            _fwd_row(x, w, b, out, mean, rstd, eps, rms, i)


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_rows(dy, x, w, mean, rstd, dx, dw_acc, db_acc, rms, need_dx, need_dw, need_db, r0, r1):
    """Rows [r0, r1): write dx, add dy*xhat and dy into the chunk's partial rows dw_acc, db_acc."""
    n = x.shape[1]
    inv_n = acc_scalar(x, 1.0 / n)
    for i in range(r0, r1):
        m = mean[i]
        r = rstd[i]
        sd = acc_scalar(x, 0.0)
        sdg = acc_scalar(x, 0.0)
        sg = acc_scalar(x, 0.0)
        for j in range(n):
            d = load(x, i, j) - m
            g = load(dy, i, j) * w[j]
            sd += d
            sdg += d * g
            sg += g
        # RMSNorm has no mean: nothing to correct and no mean(g) term.
        cm = acc_scalar(x, 0.0) if rms else sd * inv_n
        mean_g = acc_scalar(x, 0.0) if rms else sg * inv_n
        mean_xhat_g = r * (sdg - cm * sg) * inv_n
        for j in range(n):
            xhat = ((load(x, i, j) - m) - cm) * r
            dyj = load(dy, i, j)
            if need_dx:
                store(dx, i, j, r * (dyj * w[j] - xhat * mean_xhat_g - mean_g))
            if need_dw:
                dw_acc[j] += dyj * xhat
            if need_db:
                db_acc[j] += dyj


@njit(fastmath=_FASTMATH, cache=True, parallel=True)
def _bwd_parallel(dy, x, w, mean, rstd, dx, dw_part, db_part, rms, need_dx, need_dw, need_db, rows_per_chunk):
    n_rows = x.shape[0]
    n_chunks = dw_part.shape[0]
    for k in prange(n_chunks):
        r0 = k * rows_per_chunk
        r1 = min(n_rows, r0 + rows_per_chunk)
        _bwd_rows(dy, x, w, mean, rstd, dx, dw_part[k], db_part[k], rms, need_dx, need_dw, need_db, r0, r1)


@njit(fastmath=_FASTMATH, cache=True)
def _bwd_serial(dy, x, w, mean, rstd, dx, dw_part, db_part, rms, need_dx, need_dw, need_db, rows_per_chunk):
    n_rows = x.shape[0]
    for k in range(dw_part.shape[0]):
        r0 = k * rows_per_chunk
        r1 = min(n_rows, r0 + rows_per_chunk)
        _bwd_rows(dy, x, w, mean, rstd, dx, dw_part[k], db_part[k], rms, need_dx, need_dw, need_db, r0, r1)


@njit(cache=True, parallel=True)
def _sum_chunks(part, out, cols_per_block):
    """out[j] = part[0, j] + part[1, j] + ... in chunk order (fixed, whatever the thread count)."""
    n_chunks, n = part.shape
    n_blocks = (n + cols_per_block - 1) // cols_per_block
    for blk in prange(n_blocks):
        j0 = blk * cols_per_block
        j1 = min(n, j0 + cols_per_block)
        for j in range(j0, j1):
            out[j] = part[0, j]
        for k in range(1, n_chunks):
            for j in range(j0, j1):
                out[j] += part[k, j]


def rows_per_chunk(n_rows: int) -> int:
    """Rows per dweight/dbias partial sum: a function of the row count only, never of threads."""
    return max(16, -(-n_rows // 128))


_STORAGE_VIEW = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.bfloat16: torch.uint16,
    torch.float16: torch.int16,
}

SUPPORTED_DTYPES = frozenset(_STORAGE_VIEW)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().view(_STORAGE_VIEW[t.dtype]).numpy()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _param_or_fill(p: torch.Tensor | None, n: int, fill: float, dtype: torch.dtype) -> np.ndarray:
    if p is None:
        return np.full(n, fill, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return p.detach().to(dtype).contiguous().numpy()


def norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of LayerNorm (or RMSNorm when ``rms``) over the last dim of a 2-D tensor.

    x: (M, N) row-major, float32/float64/bfloat16/float16. weight, bias: (N,) or None.
    Returns out (M, N) in x's dtype, mean and rstd (M,) in the accumulation dtype
    (float64 for float64 input, else float32); mean is 0 for ``rms``.
    """
    n_rows, n = x.shape
    acc = _acc_dtype(x.dtype)
    out = torch.empty_like(x)
    mean = torch.empty(n_rows, dtype=acc)
    rstd = torch.empty(n_rows, dtype=acc)
    if n_rows == 0 or n == 0:
        mean.zero_()
        rstd.fill_(math.nan)
        return out, mean, rstd
    w = _param_or_fill(weight, n, 1.0, acc)
    b = _param_or_fill(bias, n, 0.0, acc)
    eps_acc = np.float64(eps) if acc == torch.float64 else np.float32(eps)
    args = (_as_numpy(x), w, b, _as_numpy(out), mean.numpy(), rstd.numpy(), eps_acc, bool(rms))
    if n_rows * n < _PARALLEL_MIN_ELEMENTS or n_rows == 1:
        _fwd_serial(*args)
    else:
        # blocks of rows of about 64 KiB keep the scheduler's overhead small and balance well
        _fwd_parallel(*args, max(1, min(64, (1 << 14) // n)))
    return out, mean, rstd


def norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused backward: dx (M, N) in x's dtype, dweight and dbias (N,) in the accumulation dtype.

    dy and x: (M, N) row-major, same dtype. mean, rstd: what ``norm_fwd`` returned.
    Gradients not asked for are not computed and come back as None.
    """
    n_rows, n = x.shape
    acc = _acc_dtype(x.dtype)
    dx = torch.empty_like(x) if need_dx else None
    dweight = torch.zeros(n, dtype=acc) if need_dweight else None
    dbias = torch.zeros(n, dtype=acc) if need_dbias else None
    if n_rows == 0 or n == 0:
        return dx, dweight, dbias
    w = _param_or_fill(weight, n, 1.0, acc)
    chunk = rows_per_chunk(n_rows)
    n_chunks = -(-n_rows // chunk)
    np_acc = np.float64 if acc == torch.float64 else np.float32
    dw_part = np.empty((n_chunks, n) if need_dweight else (n_chunks, 0), dtype=np_acc)
    db_part = np.empty((n_chunks, n) if need_dbias else (n_chunks, 0), dtype=np_acc)
    dw_part[...] = 0
    db_part[...] = 0
    dx_np = _as_numpy(dx) if need_dx else _as_numpy(torch.empty((0, 0), dtype=x.dtype))
    args = (
        _as_numpy(dy), _as_numpy(x), w, mean.numpy(), rstd.numpy(), dx_np, dw_part, db_part,
        bool(rms), need_dx, need_dweight, need_dbias, chunk,
    )  # fmt: skip
    if n_chunks == 1:
        _bwd_serial(*args)
    else:
        _bwd_parallel(*args)
    cols = max(256, -(-n // 64))
    if need_dweight:
        _sum_chunks(dw_part, dweight.numpy(), cols)
    if need_dbias:
        _sum_chunks(db_part, dbias.numpy(), cols)
    return dx, dweight, dbias


def num_threads() -> int:
    return numba.get_num_threads()
