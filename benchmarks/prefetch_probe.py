"""Would hinting the next row into cache pay in the forward? A LayerNorm-forward-shaped numba
kernel (pilot mean, centred sums, output), run without hints and with three kinds of hint of
the next row, next to ``normfuse.layer_norm`` and a copy, interleaved (fp32, 2 threads):

    python benchmarks/prefetch_probe.py

Why: a row's first loop streams it from memory, the later loops work from L1/L2 while memory
idles, and the hardware prefetcher runs only a few lines ahead, so time is close to compute +
transfer instead of the larger of the two. The output loop runs in blocks of 64 elements and
before each block hints the matching lines of the next row:

- ``x into L2``: the next row's input, ``prefetcht1`` (what the third session tried);
- ``x into L1``: the same into L1 (``prefetcht0``);
- ``x + out(w)``: also the next row's output lines, for writing (``prefetchw``).

The third session's port of ``x into L2`` into ``backends/cpu.py`` did not pay (1-10% on the
fp32 plain forward, up to 11% slower on the add+norm forward; another host). On the AVX-512
host of the fourteenth session ``x into L1`` took 20-30% off the probe, and the kernels now hint
into L1 and hint their outputs for writing (``backends/cpu.py``, "the next row, hinted into
cache"; benchmarks/RESULTS.md). A first port with block loops ``range(j0, min(n, j0 + 64))``
was 2-5x slower: its assembly worked on vectors of 64-bit indices, most likely numba's
negative-index wraparound left in; constant-trip blocks from ``k * 64`` vectorize normally.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit, prange  # noqa: E402

import normfuse  # noqa: E402
from normfuse.backends._numba_bits import prefetch_line  # noqa: E402
from normfuse.cli.bench import interleaved_medians, reexec_with_malloc_tunables  # noqa: E402

FASTMATH = {"reassoc", "contract"}
BLOCK = 64  # elements per hinted block; 64 fp32 = four 64-byte lines
PLAIN, X_INTO_L2, X_INTO_L1, X_AND_OUT = range(4)
VARIANTS = {"no hints": PLAIN, "x into L2": X_INTO_L2, "x into L1": X_INTO_L1, "x + out(w)": X_AND_OUT}


@njit(inline="always")
def hint_block(a, i, j0, variant, for_write):
    start = a.ctypes.data + i * a.strides[0] + j0 * 4
    for q in range(BLOCK // 16):
        if for_write:
            prefetch_line(start + q * 64, True, 3)
        elif variant == X_INTO_L2:
            prefetch_line(start + q * 64, False, 2)
        else:
            prefetch_line(start + q * 64, False, 3)


@njit(fastmath=FASTMATH, inline="always")
def out_element(x, w, b, out, i, j, m1, c, r):
    out[i, j] = ((x[i, j] - m1) - c) * r * w[j] + b[j]


@njit(fastmath=FASTMATH, inline="always")
def norm_row(x, w, b, out, i, variant):
    n = x.shape[1]
    k = min(n, 64)
    s = np.float32(0)
    for j in range(k):
        s += x[i, j]
    m1 = s / np.float32(k)
    sd = np.float32(0)
    sdd = np.float32(0)
    for j in range(n):
        d = x[i, j] - m1
        sd += d
        sdd += d * d
    c = sd / n
    r = np.float32(1) / np.sqrt(sdd / n - c * c + np.float32(1e-5))
    if variant == PLAIN:
        for j in range(n):
            out_element(x, w, b, out, i, j, m1, c, r)
        return
    ahead = i + 1 < x.shape[0]
    n_blocks = n // BLOCK
    for kb in range(n_blocks):
        j0 = kb * BLOCK
        if ahead:
            hint_block(x, i + 1, j0, variant, False)
            if variant == X_AND_OUT:
                hint_block(out, i + 1, j0, variant, True)
        for j in range(j0, j0 + BLOCK):
            out_element(x, w, b, out, i, j, m1, c, r)
    for j in range(n_blocks * BLOCK, n):
        out_element(x, w, b, out, i, j, m1, c, r)


@njit(parallel=True, fastmath=FASTMATH, nogil=True)
def norm(x, w, b, out, rows_per_block, variant):
    n_rows = x.shape[0]
    for k in prange((n_rows + rows_per_block - 1) // rows_per_block):
        for i in range(k * rows_per_block, min(n_rows, (k + 1) * rows_per_block)):
            norm_row(x, w, b, out, i, variant)


def main() -> None:
    reexec_with_malloc_tunables()
    numba.set_num_threads(2)
    names = ("copy", "normfuse", *VARIANTS)
    print(f"{'shape':<12}" + "".join(f"{name:>12}" for name in names) + "   (ms, medians of 21 interleaved)")
    for rows, n in [(4096, 1024), (8192, 768), (1024, 4096), (256, 16384), (8192, 4096)]:
        x = torch.randn(rows, n)
        w, b = torch.ones(n), torch.zeros(n)
        out, buf = torch.empty_like(x), torch.empty_like(x)
        xa, wa, ba, oa = x.numpy(), w.numpy(), b.numpy(), out.numpy()
        rows_per_block = max(1, min(64, (1 << 14) // n))
        calls = {"copy": lambda: buf.copy_(x), "normfuse": lambda: normfuse.layer_norm(x, (n,), w, b)}
        for name, v in VARIANTS.items():
            calls[name] = lambda v=v: norm(xa, wa, ba, oa, rows_per_block, v)
            norm(xa, wa, ba, oa, rows_per_block, v)
            torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (n,)), atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            med = interleaved_medians(calls, 21, 3)
        print(f"{f'{rows}x{n}':<12}" + "".join(f"{med[k] * 1e3:12.3f}" for k in names), flush=True)


if __name__ == "__main__":
    main()
