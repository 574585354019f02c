"""Would overlapping rows pay in the CPU forward? An RMSNorm-forward-shaped numba kernel (fp32,
2 threads, each a contiguous block of rows) in three orders, next to ``normfuse.rms_norm`` and a
copy, interleaved.

    python benchmarks/interleave_probe.py

- ``two-pass``: each row's sum of squares, then its output (what ``backends/cpu.py`` does for a
  row);
- ``pairs``: two rows' sums, then both outputs in one sweep (what it does for narrow rows);
- ``interleaved``: row i's output written in the same loop that sums row i + 1's squares, so the
  next row streams in from memory while the current one is written from cache, instead of
  memory idling through the output loop.

Not carried into ``backends/cpu.py`` yet: it measures the idea before the kernels' variants (the
residual add, dropout, NaN rows, bf16 stores) would have to take it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit, prange  # noqa: E402

import normfuse  # noqa: E402
from normfuse.cli.bench import interleaved_medians, reexec_with_malloc_tunables  # noqa: E402

FASTMATH = {"reassoc", "contract"}
THREADS = 2


@njit(fastmath=FASTMATH, inline="always")
def _sum_squares(x, i):
    s = np.float32(0)
    for j in range(x.shape[1]):
        s += x[i, j] * x[i, j]
    return s


@njit(fastmath=FASTMATH, inline="always")
def _rstd(s, n, eps):
    return np.float32(1) / np.sqrt(s / n + eps)


@njit(inline="always")
def _thread_rows(t, rows):
    """(first, end) of thread t's contiguous block of rows."""
    per = (rows + THREADS - 1) // THREADS
    return t * per, min(rows, (t + 1) * per)


@njit(fastmath=FASTMATH, parallel=True)
def two_pass(x, w, out, eps):
    rows, n = x.shape
    for t in prange(THREADS):
        r0, r1 = _thread_rows(t, rows)
        for i in range(r0, r1):
            r = _rstd(_sum_squares(x, i), n, eps)
            for j in range(n):
                out[i, j] = x[i, j] * r * w[j]


@njit(fastmath=FASTMATH, parallel=True)
def pairs(x, w, out, eps):
    rows, n = x.shape
    for t in prange(THREADS):
        i, r1 = _thread_rows(t, rows)
        while i < r1:
            ra = _rstd(_sum_squares(x, i), n, eps)
            if i + 1 < r1:
                rb = _rstd(_sum_squares(x, i + 1), n, eps)
                for j in range(n):
                    out[i, j] = x[i, j] * ra * w[j]
                    out[i + 1, j] = x[i + 1, j] * rb * w[j]
                i += 2
            else:
                for j in range(n):
                    out[i, j] = x[i, j] * ra * w[j]
                i += 1


@njit(fastmath=FASTMATH, parallel=True)
def interleaved(x, w, out, eps):
    rows, n = x.shape
    for t in prange(THREADS):
        r0, r1 = _thread_rows(t, rows)
        if r0 >= r1:
            continue
        s = _sum_squares(x, r0)
        for i in range(r0, r1):
            r = _rstd(s, n, eps)
            if i + 1 < r1:
                s_next = np.float32(0)
                for j in range(n):
                    out[i, j] = x[i, j] * r * w[j]
                    s_next += x[i + 1, j] * x[i + 1, j]
                s = s_next
            else:
                for j in range(n):
                    out[i, j] = x[i, j] * r * w[j]


def main() -> None:
    reexec_with_malloc_tunables()
    print("shape        copy  normfuse  two-pass    pairs  interleaved (ms, medians of 21 interleaved)")
    for rows, n in [(4096, 1024), (8192, 768), (1024, 4096), (256, 16384)]:
        x, w = torch.randn(rows, n), torch.randn(n)
        out, buf = torch.empty_like(x), torch.empty_like(x)
        xa, wa, oa = x.numpy(), w.numpy(), out.numpy()
        eps = np.float32(1e-6)
        variants = {"two-pass": two_pass, "pairs": pairs, "interleaved": interleaved}
        expected = torch.nn.functional.rms_norm(x, (n,), w, 1e-6)
        for kernel in variants.values():
            kernel(xa, wa, oa, eps)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        calls = {"copy": lambda: buf.copy_(x), "normfuse": lambda: normfuse.rms_norm(x, (n,), w, 1e-6)}
        calls.update({name: (lambda k=kernel: k(xa, wa, oa, eps)) for name, kernel in variants.items()})
        with torch.no_grad():
            med = interleaved_medians(calls, 21, 1)
        print(f"{rows}x{n:<6} " + " ".join(f"{med[k] * 1e3:8.3f}" for k in calls), flush=True)


if __name__ == "__main__":
    main()
