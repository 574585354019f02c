"""Triton backend: LayerNorm / RMSNorm forward and backward kernels for CUDA GPUs.

Same contract as ``normfuse.backends.cpu`` (2-D row-major tensors; statistics and reductions in
fp32, fp64 for fp64 input). Runs on CPU tensors too under ``TRITON_INTERPRET=1``, which is how
the tests check the kernels' logic on a machine without a GPU.

Kernels, one per pass (after Triton's layer-norm tutorial):

- ``_fwd_rows``: a block of ``BLOCK_M`` rows of up to ``BLOCK_N`` features per program, the whole
  row in registers: mean, then the centred sum of squares (two passes over registers, with the
  corrected two-pass term), then the output. Masked lanes are zeroed *after* centring, so they
  never leak into the variance at widths that are not a power of 2.
- ``_fwd_looped``: rows wider than ``max_fused_n()``: one program per row walks the row in
  ``BLOCK_N`` chunks twice: statistics (per-chunk exact moments merged with Chan's formula),
  then the output, from the row's end backwards.
- ``_bwd_rows``: rows of up to ``MAX_FUSED_N_BWD`` features: each program takes a contiguous
  range of rows, writes dx and accumulates its own partial dweight/dbias row in fp32 registers.
- Wider rows, split (the default): ``_bwd_row_sums`` walks each row once for its three
  coefficients of dx, then ``_bwd_cols`` runs a 2-D grid of column blocks and row groups, each
  program writing dx for its tile and keeping its partial dweight/dbias columns in registers.
  ``_bwd_looped`` (one program per range of rows, its partial row kept in memory) stays as the
  alternative that ``TUNING["bwd_wide"]`` selects; the split one is 1.3-2.9x faster on an H200.
- ``_sum_partials`` adds the partial rows in a fixed order and rounds once to the parameters'
  dtype. No atomics: the same inputs give the same bits on every run.
"""

# No ``from __future__ import annotations`` here: the interpreter of Triton 3.2 (and older) finds
# a kernel's constexpr parameters by their evaluated annotations, where the string "tl.constexpr"
# does not count, and then hands the kernel its block sizes as tensors.

import functools
import os
from typing import NamedTuple

import torch

from normfuse import _dropout
from normfuse._dtypes import acc_dtype
from normfuse.backends._buffers import bwd_buffers, fwd_buffers, rounded, sums_over_no_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# Widest row kept whole in registers; wider rows take the looped kernels. The backward holds
# x, dy, the weight and two accumulators per element, so its limit is lower. A forward row of
# 4-byte elements is held up to 32768 features (32 warps: 90% of copy bandwidth on an H200 against
# 74% looped); bf16 rows of 32768 ran at 71% held against 74% looped (sweep_triton.py --fwd).
MAX_FUSED_N = 16384
MAX_FUSED_N_FP32 = 32768
MAX_FUSED_N_BWD = 8192


def max_fused_n(elem_bytes: int) -> int:
    """Widest forward row held whole in registers for elements of ``elem_bytes`` bytes."""
    return MAX_FUSED_N_FP32 if elem_bytes == 4 else MAX_FUSED_N

# Launch settings, chosen by measurement (benchmarks/sweep_triton.py prints the candidates
# side by side on a GPU; benchmarks/RESULTS.md records which won). Plain numbers, not
# autotuning: the same settings on every run keep the results bitwise reproducible across
# processes. ``bwd_warps``/``fwd_warps`` of None mean the size-based rule in the config functions.
TUNING = {
    # forward, rows wider than max_fused_n(): chunk of a row per loop step, and warps
    # (sweep_triton.py --fwd on an H200, seventh session, with the output sweep backwards: 80% of
    # copy for bf16 at 32768 features, 67-71% at 65536, against 69% and 63-65% with 4096 over 8)
    "loop_block_n": 16384,
    "loop_warps": 16,
    # backward, rows wider than MAX_FUSED_N_BWD: "split" (_bwd_row_sums, then _bwd_cols over a
    # 2-D grid of column blocks and row groups) or "looped" (_bwd_looped, one program per row range)
    "bwd_wide": "split",
    "sums_block_n": 4096,
    "sums_warps": 8,
    # sweep_triton.py --wide on an H200: 53-55% of copy for bf16 and fp32 at 16K-64K features
    # (looped: 19-40%); bf16 needs 1024 columns over 4 warps (8 elements, 16 bytes a thread)
    "split_block_m": 8,
    "split_block_n": 1024,
    "split_warps": 4,
    "split_programs_per_sm": 8,
    "bwd_loop_block_n": 8192,
    "bwd_loop_warps": 16,
    "bwd_programs_per_sm": None,
    "bwd_warps": None,
    "fwd_warps": None,
    # elements per program step for narrow rows (several rows a tile); a bf16 tile of 2048 holds
    # half the bytes of an fp32 one, which may be too few in flight (sweep_triton.py --narrow)
    "fwd_tile": 2048,
    "bwd_tile": 2048,
    # sweep_triton.py --narrow on an H200 (sixth session): fp32 rows of up to 256 features reach
    # 84% of copy in the backward with 4096-element tiles against 61% with 2048; bf16 rows of 256
    # fall from 82% to 59% with 4096, and every other width does best at 2048
    "bwd_tile_fp32_256": 4096,
}


# Where the kernels can run, for the errors and skips of the places that ask ``available()``.
WHERE_IT_RUNS = (
    "triton and a CUDA GPU, or TRITON_INTERPRET=1 with an interpreter that runs the kernels on CPU tensors "
    "(Triton 3.2 or newer; Triton 3.5's with NumPy before 2.4)"
)


def available() -> bool:
    """True where the kernels can run: triton imports and a CUDA device (or an interpreter that
    runs them on CPU tensors)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or (interpreting() and interpreter_runs_on_cpu_tensors())


@functools.lru_cache(maxsize=None)
def interpreter_runs_on_cpu_tensors() -> bool:
    """Whether this Triton's interpreter runs the kernels on CPU tensors, tried once on a small
    kernel with what older interpreters got wrong (seen here): Triton 3.1's ran a kernel on host
    copies and copied them back to GPU tensors only, so a CPU tensor came back unchanged; Triton
    3.5's, with NumPy 2.4, failed on a loop bound computed in the kernel (the backward's row
    loop), converting a one-element array to an int, which NumPy 2.4 refuses."""
    out = torch.zeros(4)
    try:
        _interpreter_probe[(1,)](out, 4, BLOCK=2)
    except Exception:  # the interpreter's own error, whatever its kind
        return False
    return torch.equal(out, torch.arange(1.0, 5.0))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_rounds_bf16_like_gpus() -> bool:
    """Make Triton's interpreter round fp32 -> bf16 casts to nearest even, as GPUs do; True where
    it now does.

    The interpreter (Triton 3.x) casts fp32 to bf16 by dropping the low 16 bits, where a GPU's
    downcast rounds to nearest even (torch's rule too): kernels run in it differ from the GPU by
    a bf16 ulp, and after a cancellation (rows far from zero) by more. The test suite and
    ``benchmarks/fuzz_vs_torch.py`` call this so that without a GPU they check the bits a GPU
    gives. It patches the interpreter's builder for the process; nothing calls it on a GPU, and
    where the interpreter's internals are not the ones known here it changes nothing (False).
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast_impl = getattr(builder, "cast_impl", None)
    if cast_impl is None or not hasattr(interpreter, "TensorHandle"):
        return False
    if getattr(cast_impl, "rounds_bf16_like_gpus", False):
        return True

    def rounding_cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    rounding_cast_impl.rounds_bf16_like_gpus = True
    builder.cast_impl = rounding_cast_impl
    return True



if triton is not None:

    @triton.jit
    def _interpreter_probe(OUT, n, BLOCK: tl.constexpr):
        end = tl.minimum(tl.program_id(0) + n, n)  # a bound computed in the kernel, as _bwd_rows's
        for start in range(tl.program_id(0), end, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(OUT + cols, cols.to(tl.float32) + 1.0, mask=cols < n)

    @triton.jit
    def _fmix32(h):
        # murmur3's 32-bit finalizer (normfuse._dropout): uint32 arithmetic wraps
        h ^= h >> 16
        h *= 0x85EBCA6B
        h ^= h >> 13
        h *= 0xC2B2AE35
        h ^= h >> 16
        return h

    @triton.jit
    def _row_keys(rows, seed_lo, seed_hi):
        inner = tl.cast(rows, tl.uint32) * 0x9E3779B1 + tl.cast(seed_hi, tl.uint32)
        return _fmix32(tl.cast(seed_lo, tl.uint32) ^ _fmix32(inner))

    @triton.jit
    def _kept(row_key, cols, threshold):
        """Dropout's keep decision for (row, column) pairs: the same bits as every backend."""
        h = _fmix32(row_key ^ (cols.to(tl.uint32) * 0x85EBCA77))
        return (h >> 8) < tl.cast(threshold, tl.uint32)

    @triton.jit
    def _residual_sum(X, RES, H, MASK, offs, mask, row_key, cols, threshold, scale,
                      HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, STORE_MASK: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
        """h = dropout(x) + residual, stored rounded to H's dtype; returns the rounded h in ACC."""
        v = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        if DROPOUT:
            keep = _kept(row_key, cols, threshold)
            v = tl.where(keep, v * scale, 0.0)
            if STORE_MASK:
                tl.store(MASK + offs, keep.to(tl.int8), mask=mask)
        if HAS_RES:
            v += tl.load(RES + offs, mask=mask, other=0.0).to(ACC)
        h = v.to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        return h.to(ACC)

    @triton.jit
    def _fwd_rows(
        X, RES, H, MASK, W, B, Y, MEAN, RSTD, n_rows, n, eps, seed_lo, seed_hi, threshold, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr, STORE_STATS: tl.constexpr,
        ADD: tl.constexpr, HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, STORE_MASK: tl.constexpr,
        XHAT: tl.constexpr, RSTD_ROUND: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        col_ok = cols < n
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * n + cols[None, :]
        if ADD:
            row_key = _row_keys(rows, seed_lo, seed_hi)[:, None] if DROPOUT else 0
            x = _residual_sum(X, RES, H, MASK, offs, mask, row_key, cols[None, :], threshold, scale,
                              HAS_RES, DROPOUT, STORE_MASK, ACC)  # fmt: skip
        else:
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        if RMS:
            m1 = tl.zeros((BLOCK_M,), dtype=ACC)
        else:
            m1 = tl.sum(x, axis=1) / n
        # centre, then zero the padding lanes: they must not enter the variance
        d = tl.where(mask, x - m1[:, None], 0.0)
        if RMS:
            c = tl.zeros((BLOCK_M,), dtype=ACC)
        else:
            c = tl.sum(d, axis=1) / n
        sum_sq = tl.sum(d * d, axis=1) / n
        # A finite row whose squares overflow (|x - mean| past 1.8e19 in float32) keeps an
        # infinite variance, so rstd is 0 as in torch; c * c can overflow too there, and
        # inf - inf clamped to 0 would scale the row by 1 / sqrt(eps) instead
        var = tl.where(sum_sq < float("inf"), tl.maximum(sum_sq - c * c, 0.0), sum_sq)
        rstd = 1.0 / tl.sqrt(var + eps)
        if STORE_STATS:
            tl.store(MEAN + rows, m1 + c, mask=row_ok)
            tl.store(RSTD + rows, rstd, mask=row_ok)
        if RSTD_ROUND is not None:  # after the store: the backward takes the rstd unrounded
            rstd = rstd.to(RSTD_ROUND).to(ACC)
        y = (d - c[:, None]) * rstd[:, None]
        if XHAT is not None:
            y = y.to(XHAT).to(ACC)
        if HAS_W:
            y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _fwd_looped(
        X, RES, H, MASK, W, B, Y, MEAN, RSTD, n, eps, seed_lo, seed_hi, threshold, scale,
        BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
        STORE_STATS: tl.constexpr, ADD: tl.constexpr, HAS_RES: tl.constexpr, DROPOUT: tl.constexpr,
        STORE_MASK: tl.constexpr, XHAT: tl.constexpr, RSTD_ROUND: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        base = tl.cast(row, tl.int64) * n
        cols = tl.arange(0, BLOCK_N)
        n_chunks = tl.cdiv(n, BLOCK_N)
        row_key = _row_keys(row, seed_lo, seed_hi) if DROPOUT else 0
        # One sweep for the statistics: each chunk's exact mean and centred sum of squares
        # (two passes over registers), merged into the running ones with Chan et al.'s
        # pairwise formula, as robust as two passes over the whole row; the row is then read
        # once more for the output (two sweeps instead of three). With a residual add the
        # first sweep also writes h, which the second reads.
        mean = tl.zeros((), dtype=ACC)
        m2 = tl.zeros((), dtype=ACC)
        for start in range(0, n, BLOCK_N):
            ok = start + cols < n
            if ADD:
                x = _residual_sum(X, RES, H, MASK, base + start + cols, ok, row_key, start + cols, threshold, scale,
                                  HAS_RES, DROPOUT, STORE_MASK, ACC)  # fmt: skip
            else:
                x = tl.load(X + base + start + cols, mask=ok, other=0.0).to(ACC)
            if RMS:
                m2 += tl.sum(x * x, axis=0)
            else:
                seen = tl.cast(start, ACC)
                count = tl.cast(tl.minimum(n - start, BLOCK_N), ACC)
                chunk_mean = tl.sum(x, axis=0) / count
                d = tl.where(ok, x - chunk_mean, 0.0)
                total = seen + count
                delta = chunk_mean - mean
                mean += delta * (count / total)
                # the weight before the second delta: on the first chunk it is 0, and a delta
                # past 1.8e19 (a chunk mean that large) squared first is inf, inf * 0 NaN
                m2 += tl.sum(d * d, axis=0) + delta * (seen * count / total) * delta
        rstd = 1.0 / tl.sqrt(tl.maximum(m2 / n, 0.0) + eps)
        if STORE_STATS:
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, rstd)
        if RSTD_ROUND is not None:
            rstd = rstd.to(RSTD_ROUND).to(ACC)
        SRC = H if ADD else X
        # The output sweep starts from the row's end, the bytes read last and the likeliest
        # to be in L2 still: up to 15 points of copy bandwidth (9 at the median) at 32768-65536
        # features on an H200 (sweep_triton.py --fwd; a grid of fewer programs than rows, each
        # taking every grid-th row to keep fewer rows in flight, was slower there)
        for i in range(0, n_chunks):
            start = (n_chunks - 1 - i) * BLOCK_N
            ok = start + cols < n
            x = tl.load(SRC + base + start + cols, mask=ok, other=0.0).to(ACC)
            y = (x - mean) * rstd
            if XHAT is not None:
                y = y.to(XHAT).to(ACC)
            if HAS_W:
                y = y * tl.load(W + start + cols, mask=ok, other=0.0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + start + cols, mask=ok, other=0.0).to(ACC)
            tl.store(Y + base + start + cols, y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def _store_input_grads(dh, DH_OUT, DRES, DX, offs, mask, row_key, cols, threshold, scale,
                           HAS_DH_OUT: tl.constexpr, NEED_DRES: tl.constexpr, NEED_DX: tl.constexpr,
                           DROPOUT: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
        """dh (the norm's gradient) plus the gradient arriving at the residual output: dres gets
        it, dx gets it through the forward's dropout mask."""
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + offs, mask=mask, other=0.0).to(ACC)
        if NEED_DRES:
            tl.store(DRES + offs, dh.to(DRES.dtype.element_ty), mask=mask)
        if NEED_DX:
            if DROPOUT:
                dh = tl.where(_kept(row_key, cols, threshold), dh * scale, 0.0)
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_rows(
        DY, X, W, MEAN, RSTD, DH_OUT, DRES, DX, PART, n_rows, n, rows_per_prog, width, db_offset,
        seed_lo, seed_hi, threshold, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, HAS_DH_OUT: tl.constexpr,
        NEED_DRES: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Rows [pid * rows_per_prog, ...) in tiles of BLOCK_M rows: dx (and dres), and this
        program's partial [dw | db] row (PART row pid, ``width`` wide, db from ``db_offset``).
        X is the normalized input (the residual output h with a residual add)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < n
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
        else:
            w = tl.where(col_ok, 1.0, 0.0).to(ACC)
        # partial sums per (row lane, column) of the tile, summed over the lanes once, after the
        # loop: summing over the tile's rows at every step costs a round of cross-warp traffic
        # and a barrier per tile, which held narrow bf16 rows to 15-26% of copy on an H200
        dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        db = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        row_start = pid * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, n_rows)
        for tile in range(row_start, row_end, BLOCK_M):
            rows = tile + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None].to(tl.int64) * n + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
            m = tl.load(MEAN + rows, mask=row_ok, other=0.0).to(ACC)
            r = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(ACC)
            d = tl.where(mask, x - m[:, None], 0.0)
            # The select also keeps the compiler from fusing this product into the subtraction
            # of mean(g) below (an FMA there leaves the product's rounding error behind, and a
            # single feature would get dx = rstd * that error instead of exactly 0).
            g = tl.where(mask, dy * w[None, :], 0.0)
            # the three row sums in one reduction tree (one round of cross-warp traffic)
            sd, sdg, sg = tl.reduce((d, d * g, g), 1, _add3)
            if RMS:
                xhat = d * r[:, None]
                mean_xhat_g = r * sdg / n
                mean_g = tl.zeros_like(mean_xhat_g)
            else:
                cm = sd / n  # corrects the rounding of the saved mean
                xhat = tl.where(mask, (d - cm[:, None]) * r[:, None], 0.0)
                mean_xhat_g = r * (sdg - cm * sg) / n
                mean_g = sg / n
            if NEED_DX or NEED_DRES:
                dh = r[:, None] * (g - xhat * mean_xhat_g[:, None] - mean_g[:, None])
                row_key = _row_keys(rows, seed_lo, seed_hi)[:, None] if DROPOUT else 0
                _store_input_grads(dh, DH_OUT, DRES, DX, offs, mask, row_key, cols[None, :], threshold, scale,
                                   HAS_DH_OUT, NEED_DRES, NEED_DX, DROPOUT, ACC)  # fmt: skip
            if NEED_DW:
                dw += dy * xhat
            if NEED_DB:
                db += dy
        if NEED_DW:
            tl.store(PART + pid * width + cols, tl.sum(dw, axis=0), mask=col_ok)
        if NEED_DB:
            tl.store(PART + pid * width + db_offset + cols, tl.sum(db, axis=0), mask=col_ok)

    @triton.jit
    def _dx_coefficients(DY, X, W, base, n, m, r, cols, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr,
                         RMS: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
        """One sweep over a wide row (from ``base``, in BLOCK_N chunks): the row's coefficients
        of dx, (cm, mean(xhat * g), mean(g)), where cm corrects the rounding of the saved mean
        (0 for RMSNorm, as is mean(g))."""
        acc_d = tl.zeros((BLOCK_N,), dtype=ACC)
        acc_dg = tl.zeros((BLOCK_N,), dtype=ACC)
        acc_g = tl.zeros((BLOCK_N,), dtype=ACC)
        for start in range(0, n, BLOCK_N):
            ok = start + cols < n
            x = tl.load(X + base + start + cols, mask=ok, other=0.0).to(ACC)
            dy = tl.load(DY + base + start + cols, mask=ok, other=0.0).to(ACC)
            if HAS_W:
                g = tl.where(ok, dy * tl.load(W + start + cols, mask=ok, other=0.0).to(ACC), 0.0)
            else:
                g = dy
            d = tl.where(ok, x - m, 0.0)
            acc_d += d
            acc_dg += d * g
            acc_g += g
        sd, sdg, sg = tl.reduce((acc_d, acc_dg, acc_g), 0, _add3)
        if RMS:
            cm = tl.zeros((), dtype=ACC)
            mean_g = tl.zeros((), dtype=ACC)
        else:
            cm = sd / n
            mean_g = sg / n
        return cm, r * (sdg - cm * sg) / n, mean_g

    @triton.jit
    def _bwd_looped(
        DY, X, W, MEAN, RSTD, DH_OUT, DRES, DX, PART, n_rows, n, rows_per_prog, width, db_offset,
        seed_lo, seed_hi, threshold, scale,
        BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, HAS_DH_OUT: tl.constexpr,
        NEED_DRES: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Wide rows: as ``_bwd_rows``, walking each row in chunks; the program's partial
        [dw | db] row lives in its own slot of PART (read and written by this program only)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        slot = PART + pid * width
        row_start = pid * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, n_rows)
        for start in range(0, n, BLOCK_N):
            ok = start + cols < n
            if NEED_DW:
                tl.store(slot + start + cols, tl.zeros((BLOCK_N,), dtype=ACC), mask=ok)
            if NEED_DB:
                tl.store(slot + db_offset + start + cols, tl.zeros((BLOCK_N,), dtype=ACC), mask=ok)
        for row in range(row_start, row_end):
            base = tl.cast(row, tl.int64) * n
            m = tl.load(MEAN + row).to(ACC)
            r = tl.load(RSTD + row).to(ACC)
            cm, mean_xhat_g, mean_g = _dx_coefficients(DY, X, W, base, n, m, r, cols, BLOCK_N, HAS_W, RMS, ACC)
            row_key = _row_keys(row, seed_lo, seed_hi) if DROPOUT else 0
            for start in range(0, n, BLOCK_N):
                ok = start + cols < n
                x = tl.load(X + base + start + cols, mask=ok, other=0.0).to(ACC)
                dy = tl.load(DY + base + start + cols, mask=ok, other=0.0).to(ACC)
                xhat = tl.where(ok, ((x - m) - cm) * r, 0.0)
                if NEED_DX or NEED_DRES:
                    if HAS_W:
                        # a select, not a bare product: see _bwd_rows
                        g = tl.where(ok, dy * tl.load(W + start + cols, mask=ok, other=0.0).to(ACC), 0.0)
                    else:
                        g = dy
                    dh = r * (g - xhat * mean_xhat_g - mean_g)
                    _store_input_grads(dh, DH_OUT, DRES, DX, base + start + cols, ok, row_key, start + cols,
                                       threshold, scale, HAS_DH_OUT, NEED_DRES, NEED_DX, DROPOUT, ACC)  # fmt: skip
                if NEED_DW:
                    p = slot + start + cols
                    tl.store(p, tl.load(p, mask=ok, other=0.0) + dy * xhat, mask=ok)
                if NEED_DB:
                    p = slot + db_offset + start + cols
                    tl.store(p, tl.load(p, mask=ok, other=0.0) + dy, mask=ok)

    @triton.jit
    def _bwd_row_sums(
        DY, X, W, MEAN, RSTD, ROWSTAT, n, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr,
        ACC: tl.constexpr,
    ):  # fmt: skip
        """Wide rows, split backward, first pass: one program per row walks it once and stores
        the row's three coefficients of dx (ROWSTAT[row] = cm, mean(xhat*g), mean(g))."""
        row = tl.program_id(0)
        base = tl.cast(row, tl.int64) * n
        cols = tl.arange(0, BLOCK_N)
        m = tl.load(MEAN + row).to(ACC)
        r = tl.load(RSTD + row).to(ACC)
        cm, mean_xhat_g, mean_g = _dx_coefficients(DY, X, W, base, n, m, r, cols, BLOCK_N, HAS_W, RMS, ACC)
        tl.store(ROWSTAT + row * 3, cm)
        tl.store(ROWSTAT + row * 3 + 1, mean_xhat_g)
        tl.store(ROWSTAT + row * 3 + 2, mean_g)

    @triton.jit
    def _bwd_cols(
        DY, X, W, MEAN, RSTD, ROWSTAT, DH_OUT, DRES, DX, PART, n_rows, n, rows_per_prog, width, db_offset,
        seed_lo, seed_hi, threshold, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, HAS_DH_OUT: tl.constexpr,
        NEED_DRES: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    ):  # fmt: skip
        """Wide rows, split backward, second pass: program (j, k) takes columns
        [j * BLOCK_N, ...) of rows [k * rows_per_prog, ...) in tiles of BLOCK_M rows: dx (and
        dres) from the row coefficients, and its own partial [dw | db] columns in PART row k,
        held in registers: a wide row's partial sums never round-trip through memory."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
        else:
            w = tl.where(col_ok, 1.0, 0.0).to(ACC)
        dw = tl.zeros((BLOCK_N,), dtype=ACC)
        db = tl.zeros((BLOCK_N,), dtype=ACC)
        part = tl.program_id(1)
        row_start = part * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, n_rows)
        for tile in range(row_start, row_end, BLOCK_M):
            rows = tile + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None].to(tl.int64) * n + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
            m = tl.load(MEAN + rows, mask=row_ok, other=0.0).to(ACC)
            r = tl.load(RSTD + rows, mask=row_ok, other=0.0).to(ACC)
            cm = tl.load(ROWSTAT + rows * 3, mask=row_ok, other=0.0)
            mean_xhat_g = tl.load(ROWSTAT + rows * 3 + 1, mask=row_ok, other=0.0)
            mean_g = tl.load(ROWSTAT + rows * 3 + 2, mask=row_ok, other=0.0)
            xhat = tl.where(mask, ((x - m[:, None]) - cm[:, None]) * r[:, None], 0.0)
            if NEED_DX or NEED_DRES:
                # a select, not a bare product: see _bwd_rows
                g = tl.where(mask, dy * w[None, :], 0.0)
                dh = r[:, None] * (g - xhat * mean_xhat_g[:, None] - mean_g[:, None])
                row_key = _row_keys(rows, seed_lo, seed_hi)[:, None] if DROPOUT else 0
                _store_input_grads(dh, DH_OUT, DRES, DX, offs, mask, row_key, cols[None, :], threshold, scale,
                                   HAS_DH_OUT, NEED_DRES, NEED_DX, DROPOUT, ACC)  # fmt: skip
            if NEED_DW:
                dw += tl.sum(dy * xhat, axis=0)
            if NEED_DB:
                db += tl.sum(dy, axis=0)
        if NEED_DW:
            tl.store(PART + part * width + cols, dw, mask=col_ok)
        if NEED_DB:
            tl.store(PART + part * width + db_offset + cols, db, mask=col_ok)

    @triton.jit
    def _sum_partials(PART, OUT_W, OUT_B, n_parts, width, db_offset, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """Column j of sum over k of PART[k, :], BLOCK_P parts at a time in a fixed order, in PART's
        (accumulation) dtype; columns before ``db_offset`` go to OUT_W, the others to OUT_B (two
        tensors, no copy), each rounded once to its own dtype by the store."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < width
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=PART.dtype.element_ty)
        for p0 in range(0, n_parts, BLOCK_P):
            parts = p0 + tl.arange(0, BLOCK_P)
            mask = (parts < n_parts)[:, None] & col_ok[None, :]
            acc += tl.load(PART + parts[:, None].to(tl.int64) * width + cols[None, :], mask=mask, other=0.0)
        total = tl.sum(acc, axis=0)
        tl.store(OUT_W + cols, total.to(OUT_W.dtype.element_ty), mask=cols < db_offset)
        tl.store(OUT_B + cols - db_offset, total.to(OUT_B.dtype.element_ty), mask=col_ok & (cols >= db_offset))


def _tl_acc(dtype: torch.dtype):
    """The Triton type of ``acc_dtype(dtype)``."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


# Warps for rows held in registers, by (block, element size), from sweep_triton.py --fwd on an
# H200 (seventh session, fraction of copy bandwidth): fewer warps, more elements a thread, won at
# 4096-16384 (bf16 8192: 93.5% with 4 warps, 84.5% with 8, 80.6% with 16; fp32 16384: 86.6%
# with 4, 83.1% with 8, 81.3% with 16); fp32 32768 needs 32 (90.8% against 72.1% with 16).
# Other sizes (fp64 included): block / 512 warps, 1 to 16.
_FWD_WARPS = {(4096, 2): 4, (8192, 2): 4, (16384, 2): 8, (8192, 4): 8, (16384, 4): 4, (32768, 4): 32}


@functools.lru_cache(maxsize=None)
def _fwd_config(n: int, elem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n features held whole in registers; ``elem_bytes``
    is the input's element size."""
    block_n = triton.next_power_of_2(n)
    num_warps = TUNING["fwd_warps"] or _FWD_WARPS.get((block_n, elem_bytes)) or max(1, min(16, block_n // 512))
    block_m = max(1, min(16, TUNING["fwd_tile"] // block_n))
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=None)
def _bwd_config(n: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, programs per SM): tiles of about 2048 elements (4096 for fp32
    rows of up to 256 features) or one row; ``elem_bytes`` is the input's element size.

    From benchmarks/sweep_triton.py on an H200 (256 MiB, bf16 and fp32): 4 warps and 4
    programs per SM up to 2048 features, 8 warps and 2 per SM at 4096, 16 warps and 1 per SM
    at 8192 (74-90% of copy bandwidth there, against 50-82% for one rule for all widths).
    """
    block_n = triton.next_power_of_2(n)
    num_warps = 4 if block_n <= 2048 else 8 if block_n <= 4096 else 16
    per_sm = 4 if block_n <= 2048 else 2 if block_n <= 4096 else 1
    tile = TUNING["bwd_tile_fp32_256"] if block_n <= 256 and elem_bytes == 4 else TUNING["bwd_tile"]
    return (
        max(1, min(16, tile // block_n)), block_n,
        TUNING["bwd_warps"] or num_warps, TUNING["bwd_programs_per_sm"] or per_sm,
    )  # fmt: skip


def clear_config_caches() -> None:
    """Forget cached launch settings (after changing TUNING or the MAX_FUSED_* limits)."""
    for cached in (_fwd_config, _bwd_config, _fwd_plan, _bwd_plan):
        cached.cache_clear()


@functools.lru_cache(maxsize=8)
def _multiprocessors(device_index: int) -> int:
    """SMs of CUDA device ``device_index`` (``Tensor.get_device()``: an int, cheaper to get than
    a ``torch.device``); -1 is a CPU tensor under the interpreter."""
    if device_index >= 0:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 2  # interpreter: any fixed number


_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _drop_args(dropout_p: float, seed: int) -> tuple[int, int, int, float]:
    """(seed_lo, seed_hi, threshold, scale) of ``normfuse._dropout``; harmless zeros without dropout."""
    if dropout_p <= 0.0:
        return 0, 0, 0, 0.0
    lo, hi = _dropout.split_seed(int(seed))
    return lo, hi, _dropout.threshold(dropout_p), _dropout.scale(dropout_p)


# Triton's ``kernel[grid](...)`` binds and specializes every argument on every call: about 20 us
# of host time a launch on an H200's host, and 2.5x that on the thread where autograd runs a
# CUDA op's backward (benchmarks/host_overhead.py). On a GPU the host's time is what a
# forward+backward waits for up to 256 MiB of activations (benchmarks/fb_timeline.py), so a
# launch seen before relaunches the compiled kernel that Triton returned for it (about 10 us).
# The key is finer than Triton's own specialization (exact integer values; each tensor's dtype,
# device and 16-byte alignment, which is all Triton specializes a pointer on), so a hit is the
# very kernel Triton would have picked. Dropout's per-call seeds would never hit: not cached.
FAST_LAUNCH = os.environ.get("NORMFUSE_TRITON_FAST_LAUNCH", "1") != "0"
_MAX_COMPILED_PER_KERNEL = 256


def _arg_key(args: tuple) -> tuple:
    return tuple([
        (a.dtype, a.get_device(), a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
        else a if type(a) is int else (type(a), a)  # 1, 1.0 and True are equal keys otherwise
        for a in args
    ])  # fmt: skip


class _Launcher:
    """A Triton kernel with fixed constexpr arguments and warps, launched as ``launcher(grid, *args)``."""

    __slots__ = ("kernel", "consts", "num_warps", "compiled")

    def __init__(self, kernel, num_warps: int, **consts) -> None:
        self.kernel, self.consts, self.num_warps = kernel, consts, num_warps
        self.compiled: dict[tuple, tuple] = {}  # argument key -> (compiled kernel, constexpr values)

    def __call__(self, grid: tuple[int, ...], *args, cacheable: bool = True) -> None:
        if not (cacheable and FAST_LAUNCH):
            self.kernel[grid](*args, num_warps=self.num_warps, **self.consts)
            return
        key = _arg_key(args)
        hit = self.compiled.get(key)
        if hit is not None:
            compiled, const_values = hit
            compiled[(*grid, 1, 1)[:3]](*args, *const_values)
            return
        compiled = self.kernel[grid](*args, num_warps=self.num_warps, **self.consts)
        # None under the interpreter; arg_names orders the constexprs as the kernel declares them
        if compiled is not None and len(self.compiled) < _MAX_COMPILED_PER_KERNEL:
            names = getattr(self.kernel, "arg_names", None)
            if names is not None and len(names) == len(args) + len(self.consts):
                self.compiled[key] = (compiled, tuple(self.consts[name] for name in names[len(args):]))


# Launch plans: everything about a launch that follows from the sizes and flags, worked out once
# per distinct call. On a GPU the host's time per call is what small and mid-sized tensors wait
# for (benchmarks/host_overhead.py), and rebuilding these dicts cost several microseconds a call.
@functools.lru_cache(maxsize=1024)
def _fwd_plan(n, has_w, has_b, rms, store_stats, add, has_res, dropout, store_mask, xhat_dtype, in_dtype,
              rstd_dtype=None):  # fmt: skip
    """(launcher, rows per program) of a forward over rows of n: _fwd_rows up to max_fused_n(), else _fwd_looped."""
    consts = dict(
        HAS_W=has_w, HAS_B=has_b, RMS=rms, STORE_STATS=store_stats, ADD=add, HAS_RES=has_res, DROPOUT=dropout,
        STORE_MASK=store_mask, XHAT=_TL_DTYPES[xhat_dtype] if xhat_dtype is not None else None,
        RSTD_ROUND=_TL_DTYPES[rstd_dtype] if rstd_dtype is not None else None,
        ACC=_tl_acc(in_dtype),
    )  # fmt: skip
    elem_bytes = torch.finfo(in_dtype).bits // 8
    if n <= max_fused_n(elem_bytes):
        block_m, block_n, num_warps = _fwd_config(n, elem_bytes)
        return _Launcher(_fwd_rows, num_warps, BLOCK_M=block_m, BLOCK_N=block_n, **consts), block_m
    return _Launcher(_fwd_looped, TUNING["loop_warps"], BLOCK_N=TUNING["loop_block_n"], **consts), 1


def _launch_fwd(x, out, mean, rstd, weight, bias, n_rows, n, eps, rms, xhat_dtype=None, add=None, rstd_dtype=None):
    """``add`` is None (plain norm of x) or (residual or None, h, mask or None, dropout_p, seed)."""
    store_stats = mean is not None
    if add is None:
        launch, block_m = _fwd_plan(
            n, weight is not None, bias is not None, bool(rms), store_stats, False, False, False, False, xhat_dtype,
            x.dtype, rstd_dtype,
        )  # fmt: skip
        ptrs = (x, x, x, x, weight if weight is not None else x, bias if bias is not None else x, out,
                mean if store_stats else x, rstd if store_stats else x)  # fmt: skip
        drop = (0, 0, 0, 0.0)
    else:
        residual, h, mask, dropout_p, seed = add
        dropout = dropout_p > 0.0
        store_mask = dropout and mask is not None
        launch, block_m = _fwd_plan(
            n, weight is not None, bias is not None, bool(rms), store_stats, True, residual is not None, dropout,
            store_mask, xhat_dtype, h.dtype, rstd_dtype,
        )  # fmt: skip
        ptrs = (
            x, residual if residual is not None else x, h, mask.view(torch.int8) if store_mask else x,
            weight if weight is not None else x, bias if bias is not None else x, out,
            mean if store_stats else x, rstd if store_stats else x,
        )  # fmt: skip
        drop = _drop_args(dropout_p if dropout else 0.0, seed)
    cacheable = drop[0] == 0 and drop[1] == 0  # a dropout seed is new on every call
    if launch.kernel is _fwd_rows:
        launch((triton.cdiv(n_rows, block_m),), *ptrs, n_rows, n, eps, *drop, cacheable=cacheable)
    else:
        launch((n_rows,), *ptrs, n, eps, *drop, cacheable=cacheable)


def _params(weight, bias):
    return (
        weight if weight is None or weight.is_contiguous() else weight.contiguous(),
        bias if bias is None or bias.is_contiguous() else bias.contiguous(),
    )


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
    """The contract of ``normfuse.backends.cpu.norm_fwd`` on CUDA tensors (or CPU ones, interpreted)."""
    n_rows, n = x.shape
    add = residual_out_dtype is not None
    dropping = add and dropout_p > 0.0
    out, h, mask, mean, rstd = fwd_buffers(x, residual_out_dtype, dropping, return_mask, out_dtype)
    if n_rows == 0 or n == 0:
        return out, h, mean, rstd, mask
    weight, bias = _params(weight, bias)
    if residual is not None and not residual.is_contiguous():
        residual = residual.contiguous()
    extra = (residual, h, mask if dropping else None, dropout_p, seed) if add else None
    _launch_fwd(x, out, mean, rstd, weight, bias, n_rows, n, eps, rms, xhat_dtype, extra, rstd_dtype)
    return out, h, mean, rstd, mask


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
    """The plain forward's output alone, in x's shape; nothing saved."""
    out = torch.empty_like(x) if out_dtype is None else torch.empty_like(x, dtype=out_dtype)
    if n_rows and n:
        weight, bias = _params(weight, bias)
        _launch_fwd(x, out, None, None, weight, bias, n_rows, n, eps, rms, xhat_dtype, None, rstd_dtype)
    return out


class _BwdPlan(NamedTuple):
    launch: _Launcher  # _bwd_rows, _bwd_looped or _bwd_cols (after row_sums)
    grid: tuple[int, ...]
    row_sums: _Launcher | None  # _bwd_row_sums, before _bwd_cols
    n_parts: int  # partial [dw | db] rows for _sum_partials
    rows_per_prog: int
    width: int  # of a partial row
    db_offset: int
    sums: _Launcher  # _sum_partials
    sum_grid: tuple[int]


@functools.lru_cache(maxsize=1024)
def _bwd_plan(n_rows, n, n_sm, has_w, rms, need_dx, need_dweight, need_dbias, has_dh_out, need_dres, dropout, acc,
              elem_bytes):  # fmt: skip
    """How a backward over n_rows rows of n runs: which kernel, its grid and settings."""
    flags = dict(
        HAS_W=has_w, NEED_DX=need_dx, NEED_DW=need_dweight, NEED_DB=need_dbias, HAS_DH_OUT=has_dh_out,
        NEED_DRES=need_dres, DROPOUT=dropout, ACC=_tl_acc(acc),
    )  # fmt: skip
    split = n > MAX_FUSED_N_BWD and TUNING["bwd_wide"] == "split"
    if split:
        # a 2-D grid: column blocks times row groups, about programs_per_sm programs per SM
        block_n, num_warps = TUNING["split_block_n"], TUNING["split_warps"]
        col_blocks = triton.cdiv(n, block_n)
        n_parts = min(n_rows, max(1, triton.cdiv(TUNING["split_programs_per_sm"] * n_sm, col_blocks)))
        launch = _Launcher(_bwd_cols, num_warps, BLOCK_M=TUNING["split_block_m"], BLOCK_N=block_n, **flags)
        row_sums = _Launcher(_bwd_row_sums, TUNING["sums_warps"], BLOCK_N=TUNING["sums_block_n"], HAS_W=has_w,
                             RMS=rms, ACC=flags["ACC"])  # fmt: skip
    else:
        if n <= MAX_FUSED_N_BWD:
            block_m, block_n, num_warps, per_sm = _bwd_config(n, elem_bytes)
            launch = _Launcher(_bwd_rows, num_warps, BLOCK_M=block_m, BLOCK_N=block_n, RMS=rms, **flags)
        else:
            per_sm, num_warps = TUNING["bwd_programs_per_sm"] or 1, TUNING["bwd_loop_warps"]
            launch = _Launcher(_bwd_looped, num_warps, BLOCK_N=TUNING["bwd_loop_block_n"], RMS=rms, **flags)
        row_sums = None
        n_parts = min(n_rows, per_sm * n_sm)
    rows_per_prog = triton.cdiv(n_rows, n_parts)
    n_parts = triton.cdiv(n_rows, rows_per_prog)
    width = n * (int(need_dweight) + int(need_dbias))
    # narrow blocks give narrow rows enough programs; wide rows need fewer, wider ones
    sum_block = 64 if width <= 65536 else 1024
    return _BwdPlan(
        launch, (col_blocks, n_parts) if split else (n_parts,), row_sums, n_parts, rows_per_prog, width,
        n if need_dweight else 0, _Launcher(_sum_partials, 4, BLOCK_P=32, BLOCK_N=sum_block),
        (triton.cdiv(width, sum_block),),
    )  # fmt: skip


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
    """The contract of ``normfuse.backends.cpu.norm_bwd``: (dx, dresidual, dweight, dbias)."""
    n_rows, n = h.shape
    acc = acc_dtype(h.dtype)
    dx, dres = bwd_buffers(h, add, need_dx, need_dresidual, x_dtype, residual_dtype)
    if n_rows == 0 or n == 0:
        dweight, dbias = sums_over_no_rows(n, acc, h.device, need_dweight, need_dbias)
        return dx, dres, rounded(dweight, dweight_dtype), rounded(dbias, dbias_dtype)
    weight, _ = _params(weight, None)
    dh_out = dresidual_out if add else None
    if dh_out is not None and not dh_out.is_contiguous():
        dh_out = dh_out.contiguous()
    dropout = add and dropout_p > 0.0
    plan = _bwd_plan(
        n_rows, n, _multiprocessors(h.get_device()), weight is not None, bool(rms), bool(need_dx),
        bool(need_dweight), bool(need_dbias), dh_out is not None, dres is not None, dropout, acc, h.element_size(),
    )  # fmt: skip
    part = torch.empty((plan.n_parts, max(plan.width, 1)), dtype=acc, device=h.device)
    w = weight if weight is not None else h
    extra = ()
    if plan.row_sums is not None:
        rowstat = torch.empty((n_rows, 3), dtype=acc, device=h.device)
        plan.row_sums((n_rows,), dy, h, w, mean, rstd, rowstat, n)
        extra = (rowstat,)
    plan.launch(
        plan.grid, dy, h, w, mean, rstd, *extra, dh_out if dh_out is not None else h, dres if dres is not None else h,
        dx if need_dx else h, part, n_rows, n, plan.rows_per_prog, plan.width, plan.db_offset,
        *_drop_args(dropout_p if dropout else 0.0, seed), cacheable=not dropout,
    )  # fmt: skip
    # _sum_partials adds in the accumulation dtype and rounds once, on the store
    dweight = torch.empty(n, dtype=dweight_dtype or acc, device=h.device) if need_dweight else None
    dbias = torch.empty(n, dtype=dbias_dtype or acc, device=h.device) if need_dbias else None
    if plan.width:
        plan.sums(
            plan.sum_grid, part, dweight if need_dweight else dbias, dbias if need_dbias else dweight,
            plan.n_parts, plan.width, plan.db_offset,
        )  # fmt: skip
    return dx, dres, dweight, dbias
