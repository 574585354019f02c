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

import functools
import math
import os

# numba's OpenMP thread pool is a second pool beside torch's (torch bundles its own libgomp).
# With OpenMP's default spin-waiting, numba's idle workers would keep spinning after each
# kernel and steal the cores torch's next op needs (and 2-3x slower torch ops were measured
# here, interleaved). Passive waiting for numba's pool only: this libgomp is loaded after
# torch's and reads the variable then; torch's pool is not affected. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch
from numba import carray, njit, prange
from numba.extending import overload

from normfuse._dtypes import acc_dtype
from normfuse.backends._numba_bits import acc_scalar, address_as_pointer, load, store, store_not_nan

# reassoc lets LLVM split the row sums across SIMD lanes (deterministic: fixed at compile
# time); contract allows FMA. No nnan/ninf: NaN and Inf must propagate as in torch.
_FASTMATH = {"reassoc", "contract"}

# Below this many elements (1 MiB of fp32) the kernels stay on the calling thread: waking
# numba's pool, which shares two cores with torch's, cost more than it saved on the demo's
# 1024x128 activations (measured with `normfuse demo`: tokens/s level with torch this way).
_PARALLEL_MIN_ELEMENTS = 1 << 18


@njit(fastmath=_FASTMATH, inline="always")
def _fwd_row(x, w, b, out, mean, rstd, eps, rms, store_stats, params_finite, i):
    """Row i of the forward: three loops over the row, the last two hit L1/L2."""
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
    if store_stats:
        mean[i] = m1 + c
        rstd[i] = r
    if params_finite and np.isfinite(m1 + c) and np.isfinite(r):
        # x is finite (else m1 is not), so no output can be NaN: the vectorizable store
        for j in range(n):
            store_not_nan(out, i, j, ((load(x, i, j) - m1) - c) * r * w[j] + b[j])
    else:
        for j in range(n):
            store(out, i, j, ((load(x, i, j) - m1) - c) * r * w[j] + b[j])


@njit(fastmath=_FASTMATH)
def _all_finite(v):
    # v * 0 is NaN exactly for NaN and Inf: a branch-free, vectorizable test
    s = v[0] * 0
    for j in range(v.shape[0]):
        s += v[j] * 0
    return s == 0


@njit
def _view(address, n_rows, n, kind):
    return carray(address_as_pointer(address, kind), (n_rows, n))


def _widen(p, like):
    """A (1, n) parameter view as an (n,) array of like's dtype (the view itself when it is one)."""


@overload(_widen)
def _widen_overload(p, like):
    if p.dtype == like.dtype:
        return lambda p, like: p[0]

    def impl(p, like):
        out = np.empty(p.shape[1], dtype=like.dtype)
        for j in range(p.shape[1]):
            out[j] = load(p, 0, j)
        return out

    return impl


@njit(fastmath=_FASTMATH, cache=True, parallel=True)
def _fwd(x_at, w_at, b_at, out_at, mean_at, rstd_at, n_rows, n, eps, rms, store_stats, x_kind, w_kind, rows_per_block):
    """Rows are independent: blocks of rows go to the threads (one block: no thread pool)."""
    x = _view(x_at, n_rows, n, x_kind)
    out = _view(out_at, n_rows, n, x_kind)
    mean = _view(mean_at, 1, n_rows, eps)[0]
    rstd = _view(rstd_at, 1, n_rows, eps)[0]
    w = _widen(_view(w_at, 1, n, w_kind), mean)
    b = _widen(_view(b_at, 1, n, w_kind), mean)
    # only bf16/fp16 stores treat NaN apart (a float32/float64 store is exact either way)
    params_finite = x.itemsize > 2 or (_all_finite(w) and _all_finite(b))
    n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
    if n_blocks == 1:
        for i in range(n_rows):
            _fwd_row(x, w, b, out, mean, rstd, eps, rms, store_stats, params_finite, i)
    else:
        for k in prange(n_blocks):
            for i in range(k * rows_per_block, min(n_rows, (k + 1) * rows_per_block)):
                _fwd_row(x, w, b, out, mean, rstd, eps, rms, store_stats, params_finite, i)


@njit(fastmath=_FASTMATH, inline="always")
def _xhat(x, i, j, m, cm, r):
    return ((load(x, i, j) - m) - cm) * r


@njit(fastmath=_FASTMATH, inline="always")
def _dx(dy, x, w, i, j, m, cm, r, mean_xhat_g, mean_g):
    return r * (load(dy, i, j) * w[j] - _xhat(x, i, j, m, cm, r) * mean_xhat_g - mean_g)


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_rows(dy, x, w, w_finite, mean, rstd, dx, dw_acc, db_acc, rms, need_dx, need_dw, need_db, r0, r1):
    """Rows [r0, r1): write dx, set dw_acc, db_acc to the chunk's sums of dy*xhat and dy."""
    n = x.shape[1]
    inv_n = acc_scalar(x, 1.0 / n)
    dw_acc[:] = 0
    db_acc[:] = 0
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
        # finite statistics and weights: dx cannot be NaN, the vectorizable store is exact
        not_nan = w_finite and np.isfinite(m) and np.isfinite(r) and np.isfinite(mean_xhat_g + mean_g + cm)
        if need_dx and need_dw and need_db and not_nan:
            # the training case: one branch-free loop for all three gradients
            for j in range(n):
                store_not_nan(dx, i, j, _dx(dy, x, w, i, j, m, cm, r, mean_xhat_g, mean_g))
                dw_acc[j] += load(dy, i, j) * _xhat(x, i, j, m, cm, r)
                db_acc[j] += load(dy, i, j)
            continue
        # otherwise one loop per gradient asked for, each branch-free so that it vectorizes
        if need_dx:
            if not_nan:
                for j in range(n):
                    store_not_nan(dx, i, j, _dx(dy, x, w, i, j, m, cm, r, mean_xhat_g, mean_g))
            else:
                for j in range(n):
                    store(dx, i, j, _dx(dy, x, w, i, j, m, cm, r, mean_xhat_g, mean_g))
        if need_dw:
            for j in range(n):
                dw_acc[j] += load(dy, i, j) * _xhat(x, i, j, m, cm, r)
        if need_db:
            for j in range(n):
                db_acc[j] += load(dy, i, j)


@njit(fastmath=_FASTMATH, cache=True, parallel=True)
def _bwd(
    dy_at, x_at, w_at, mean_at, rstd_at, dx_at, dw_part_at, db_part_at, n_rows, n,
    rms, need_dx, need_dw, need_db, rows_per_chunk, n_chunks, x_kind, w_kind, acc_kind, min_parallel_elements,
):  # fmt: skip
    """Chunk k of rows_per_chunk rows writes row k of the partial sums of dw and db; chunks in parallel."""
    dy = _view(dy_at, n_rows, n, x_kind)
    x = _view(x_at, n_rows, n, x_kind)
    dx = _view(dx_at, n_rows if need_dx else 0, n, x_kind)
    mean = _view(mean_at, 1, n_rows, acc_kind)[0]
    rstd = _view(rstd_at, 1, n_rows, acc_kind)[0]
    w = _widen(_view(w_at, 1, n, w_kind), mean)
    w_finite = x.itemsize > 2 or _all_finite(w)
    dw_part = _view(dw_part_at, n_chunks, n if need_dw else 0, acc_kind)
    db_part = _view(db_part_at, n_chunks, n if need_db else 0, acc_kind)
    if n_rows * n < min_parallel_elements:
        # small: the same chunks in order on this thread, no thread pool
        for k in range(n_chunks):
            r0 = k * rows_per_chunk
            _bwd_rows(
                dy, x, w, w_finite, mean, rstd, dx, dw_part[k], db_part[k],
                rms, need_dx, need_dw, need_db, r0, min(n_rows, r0 + rows_per_chunk),
            )  # fmt: skip
        return
    for k in prange(n_chunks):
        r0 = k * rows_per_chunk
        r1 = min(n_rows, r0 + rows_per_chunk)
        _bwd_rows(
            dy, x, w, w_finite, mean, rstd, dx, dw_part[k], db_part[k],
            rms, need_dx, need_dw, need_db, r0, r1,
        )  # fmt: skip


@njit
def _sum_chunk_columns(part, out, j0, j1):
    for j in range(j0, j1):
        out[j] = part[0, j]
    for k in range(1, part.shape[0]):
        for j in range(j0, j1):
            out[j] += part[k, j]


@njit(cache=True, parallel=True)
def _sum_chunks(part_at, out_at, n_chunks, n, cols_per_block, acc_kind):
    """out[j] = part[0, j] + part[1, j] + ... in chunk order (fixed, whatever the thread count)."""
    part = _view(part_at, n_chunks, n, acc_kind)
    out = _view(out_at, 1, n, acc_kind)[0]
    n_blocks = (n + cols_per_block - 1) // cols_per_block
    if n_blocks == 1:
        _sum_chunk_columns(part, out, 0, n)
        return
    for blk in prange(n_blocks):
        _sum_chunk_columns(part, out, blk * cols_per_block, min(n, (blk + 1) * cols_per_block))


def rows_per_chunk(n_rows: int) -> int:
    """Rows per dweight/dbias partial sum: a function of the row count only, never of threads."""
    return max(16, -(-n_rows // 128))


# numba element type of each torch dtype: bf16 and fp16 travel as their bits
_KIND = {
    torch.float32: np.float32(0),
    torch.float64: np.float64(0),
    torch.bfloat16: np.uint16(0),
    torch.float16: np.int16(0),
}


@functools.lru_cache(maxsize=64)
def _filled(n: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    """Ones for a missing weight, zeros for a missing bias (read-only, cached per size)."""
    return torch.full((n,), value, dtype=dtype)


def _param(p: torch.Tensor | None, n: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
    if p is None:
        return _filled(n, fill, dtype)
    return p if p.is_contiguous() else p.contiguous()


def _rows_per_block(n_rows: int, n: int) -> int:
    if n_rows * n < _PARALLEL_MIN_ELEMENTS:
        return n_rows
    # blocks of about 64 KiB of fp32 keep the scheduler's overhead small and balance well
    return max(1, min(64, (1 << 14) // n))


def _launch_fwd(x, out, mean, rstd, weight, bias, n_rows, n, eps, rms):
    # Lean on purpose: on a token-sized input this function is most of the op's latency.
    if weight is not None and bias is not None and weight.is_contiguous() and bias.is_contiguous():
        w, b = weight, bias  # same dtype: the front end guarantees it when both are given
    else:
        param_dtype = weight.dtype if weight is not None else bias.dtype if bias is not None else acc_dtype(x.dtype)
        w = _param(weight, n, 1.0, param_dtype)
        b = _param(bias, n, 0.0, param_dtype)
    x_dtype = x.dtype
    if mean is None:
        mean_at = rstd_at = 0
        store_stats = False
    else:
        mean_at, rstd_at = mean.data_ptr(), rstd.data_ptr()
        store_stats = True
    _fwd(
        x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), mean_at, rstd_at, n_rows, n,
        np.float64(eps) if x_dtype is torch.float64 else np.float32(eps), bool(rms), store_stats,
        _KIND[x_dtype], _KIND[w.dtype], _rows_per_block(n_rows, n),
    )  # fmt: skip


def norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of LayerNorm (or RMSNorm when ``rms``) over the last dim of a 2-D tensor.

    x: (M, N) row-major, float32/float64/bfloat16/float16. weight, bias: (N,) in x's dtype or
    float32, or None. Returns out (M, N) in x's dtype, mean and rstd (M,) in the accumulation
    dtype (float64 for float64 input, else float32); mean is 0 for ``rms``.
    """
    n_rows, n = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x)
    mean = torch.empty(n_rows, dtype=acc)
    rstd = torch.empty(n_rows, dtype=acc)
    if n_rows == 0 or n == 0:
        mean.zero_()
        rstd.fill_(math.nan)
        return out, mean, rstd
    _launch_fwd(x, out, mean, rstd, weight, bias, n_rows, n, eps, rms)
    return out, mean, rstd


def norm_fwd_inference(
    x: torch.Tensor, n_rows: int, n: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, rms: bool
) -> torch.Tensor:
    """The forward's output alone, in x's shape, for a row-major x of n_rows rows of n; nothing saved."""
    out = torch.empty_like(x)
    if n_rows and n:
        _launch_fwd(x, out, None, None, weight, bias, n_rows, n, eps, rms)
    return out


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
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x) if need_dx else None
    if n_rows == 0 or n == 0:
        # zeros: the sums over no rows
        zeros = torch.zeros(n, dtype=acc)
        return dx, zeros if need_dweight else None, zeros.clone() if need_dbias else None
    w = _param(weight, n, 1.0, acc)
    chunk = rows_per_chunk(n_rows)
    n_chunks = -(-n_rows // chunk)
    # one partial row per chunk; with a single chunk the partial row is the result
    dw_part = torch.empty((n_chunks, n), dtype=acc) if need_dweight else None
    db_part = torch.empty((n_chunks, n), dtype=acc) if need_dbias else None
    _bwd(
        dy.data_ptr(), x.data_ptr(), w.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        dx.data_ptr() if need_dx else 0,
        dw_part.data_ptr() if need_dweight else 0, db_part.data_ptr() if need_dbias else 0,
        n_rows, n, bool(rms), bool(need_dx), bool(need_dweight), bool(need_dbias), chunk, n_chunks,
        _KIND[x.dtype], _KIND[w.dtype], _KIND[acc], _PARALLEL_MIN_ELEMENTS,
    )  # fmt: skip
    return dx, _total(dw_part, n_chunks, n, acc), _total(db_part, n_chunks, n, acc)


def _total(part: torch.Tensor | None, n_chunks: int, n: int, acc: torch.dtype) -> torch.Tensor | None:
    if part is None:
        return None
    if n_chunks == 1:
        return part[0]
    total = torch.empty(n, dtype=acc)
    # one block of columns (no thread pool) when the partial sums are small
    cols_per_block = n if n_chunks * n < _PARALLEL_MIN_ELEMENTS else max(256, -(-n // 64))
    _sum_chunks(part.data_ptr(), total.data_ptr(), n_chunks, n, cols_per_block, _KIND[acc])
    return total
