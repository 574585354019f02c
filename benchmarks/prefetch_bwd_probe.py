"""Where the LayerNorm backward's time goes, and what hinting the next row into cache buys.

A standalone numba backward shaped like ``backends/cpu.py``'s (fp32, one row at a time, a
statistics loop then a dx + dγ/dβ loop, dγ/dβ partial sums per chunk of rows), in variants
timed interleaved with a copy of the same tensor (2 threads, medians, ms):

    python benchmarks/prefetch_bwd_probe.py

- ``dx only``: the dx loop without the dγ/dβ accumulation;
- ``full``: dx, dγ, dβ, the structure of the kernel before the thirteenth session;
- ``dx to L1``: ``full`` writing dx into one scratch row that stays in L1 (a wrong result, a
  diagnostic: how much of ``full`` is the dx stores' cache misses);
- ``+hint read``: ``full`` with the dx loop in blocks of 64, each block first hinting the
  same columns of the next row's dy and h (``prefetcht0``);
- ``+hint read+write``: the same, also hinting the next row's dx lines for writing
  (``prefetchw``): what ``backends/cpu.py`` now does.

Measured on the 2-core AMD EPYC (Zen 5) host, 4096x1024: copy 0.45-0.77, dx only 0.89-1.52,
full 1.64-2.25, +hint read 1.22-1.66, +hint read+write 1.03-1.41 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit, prange  # noqa: E402

from normfuse.backends._numba_bits import prefetch_line  # noqa: E402
from normfuse.cli.bench import interleaved_medians, reexec_with_malloc_tunables  # noqa: E402

FASTMATH = {"reassoc", "contract"}
BLOCK = 64  # elements per hinted block; 64 fp32 = four 64-byte lines
DX_ONLY, FULL, DX_TO_L1, HINT_READ, HINT_READ_WRITE = range(5)
VARIANTS = {"dx only": DX_ONLY, "full": FULL, "dx to L1": DX_TO_L1, "+hint read": HINT_READ,
            "+hint read+write": HINT_READ_WRITE}  # fmt: skip


@njit(fastmath=FASTMATH, inline="always")
def row_sums(dy, h, w, mean, rstd, i):
    """The row's statistics for the dx formula: (centering correction, mean(xhat*g), mean(g))."""
    n = h.shape[1]
    sd = np.float32(0)
    sdg = np.float32(0)
    sg = np.float32(0)
    for j in range(n):
        d = h[i, j] - mean[i]
        g = dy[i, j] * w[j]
        sd += d
        sdg += d * g
        sg += g
    inv_n = np.float32(1.0 / n)
    cm = sd * inv_n
    return cm, rstd[i] * (sdg - cm * sg) * inv_n, sg * inv_n


@njit(fastmath=FASTMATH, inline="always")
def element(dy, h, w, m, cm, r, mxg, mg, dx, dx_row, dw_acc, db_acc, i, j):
    dy_v = dy[i, j]
    xhat = ((h[i, j] - m) - cm) * r
    dx[dx_row, j] = r * (dy_v * w[j] - xhat * mxg - mg)
    dw_acc[j] += dy_v * xhat
    db_acc[j] += dy_v


@njit(inline="always")
def hint_block(a, i, j0, for_write):
    start = a.ctypes.data + i * a.strides[0] + j0 * 4
    for q in range(BLOCK // 16):
        if for_write:
            prefetch_line(start + q * 64, True, 3)
        else:
            prefetch_line(start + q * 64, False, 3)


@njit(fastmath=FASTMATH, parallel=True, nogil=True)
def backward(dy, h, w, mean, rstd, dx, dw_parts, db_parts, chunk, variant):
    rows, n = h.shape
    for k in prange(dw_parts.shape[0]):
        dw_acc = dw_parts[k]
        db_acc = db_parts[k]
        dw_acc[:] = 0
        db_acc[:] = 0
        out = np.empty((1, n), np.float32) if variant == DX_TO_L1 else dx
        for i in range(k * chunk, min(rows, (k + 1) * chunk)):
            m = mean[i]
            r = rstd[i]
            cm, mxg, mg = row_sums(dy, h, w, mean, rstd, i)
            if variant == DX_ONLY:
                for j in range(n):
                    dx[i, j] = r * (dy[i, j] * w[j] - ((h[i, j] - m) - cm) * r * mxg - mg)
            elif variant == FULL or variant == DX_TO_L1:
                out_row = 0 if variant == DX_TO_L1 else i
                for j in range(n):
                    element(dy, h, w, m, cm, r, mxg, mg, out, out_row, dw_acc, db_acc, i, j)
            else:
                ahead = i + 1 < rows
                n_blocks = n // BLOCK
                for kb in range(n_blocks):
                    j0 = kb * BLOCK
                    if ahead:
                        hint_block(dy, i + 1, j0, False)
                        hint_block(h, i + 1, j0, False)
                        if variant == HINT_READ_WRITE:
                            hint_block(dx, i + 1, j0, True)
                    for j in range(j0, j0 + BLOCK):
                        element(dy, h, w, m, cm, r, mxg, mg, dx, i, dw_acc, db_acc, i, j)
                for j in range(n_blocks * BLOCK, n):
                    element(dy, h, w, m, cm, r, mxg, mg, dx, i, dw_acc, db_acc, i, j)


def main() -> None:
    reexec_with_malloc_tunables()
    numba.set_num_threads(2)
    print(f"{'shape':<15}" + "".join(f"{name:>17}" for name in ("copy", *VARIANTS)) + "   (ms, medians of 21)")
    for rows, n in [(4096, 1024), (8192, 768), (1024, 4096), (256, 16384)]:
        x = torch.randn(rows, n)
        h, dy = x.numpy(), torch.randn(rows, n).numpy()
        w = torch.randn(n).numpy()
        mean = h.mean(1).astype(np.float32)
        rstd = (1 / h.std(1)).astype(np.float32)
        dx = np.empty_like(h)
        chunk = max(16, -(-rows // 128))
        chunk += chunk & 1
        n_chunks = -(-rows // chunk)
        dw_parts = np.empty((n_chunks, n), np.float32)
        db_parts = np.empty((n_chunks, n), np.float32)
        buf = torch.empty_like(x)
        calls = {"copy": lambda: buf.copy_(x)}
        for name, v in VARIANTS.items():
            calls[name] = lambda v=v: backward(dy, h, w, mean, rstd, dx, dw_parts, db_parts, chunk, v)
        # the hinted variants compute what ``full`` computes
        backward(dy, h, w, mean, rstd, dx, dw_parts, db_parts, chunk, FULL)
        expected = dx.copy(), dw_parts.sum(0), db_parts.sum(0)
        backward(dy, h, w, mean, rstd, dx, dw_parts, db_parts, chunk, HINT_READ_WRITE)
        for got, want in zip((dx, dw_parts.sum(0), db_parts.sum(0)), expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        med = interleaved_medians(calls, 21, 3)
        print(f"{f'{rows}x{n}':<15}" + "".join(f"{med[k] * 1e3:17.3f}" for k in calls), flush=True)


if __name__ == "__main__":
    main()
