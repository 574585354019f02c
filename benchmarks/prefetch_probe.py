"""Would hinting the next row into L2 pay here? A LayerNorm-forward-shaped numba kernel (rough
mean, corrected two-pass statistics, output), run with and without software prefetch of the
next row, next to ``normfuse.layer_norm`` and a copy, interleaved (fp32, 2 threads).

    python benchmarks/prefetch_probe.py

Why: a row's first loop streams it from memory, the later loops work from L1/L2 while memory
idles, and the hardware prefetcher runs only a few lines ahead, so time is close to compute +
transfer instead of the larger of the two. Here the output loop runs in chunks of 64 elements
and hints the matching lines of the next row into L2 (``prefetcht1``) before each chunk. A
burst of hints for the whole row at its start was slower (it fills the core's miss buffers).

Carried into ``backends/cpu.py`` (same chunked shape, vectorization kept) it did not pay:
1-10% on the fp32 plain forward, up to 11% slower on the add+norm forward, nothing on the
backward (benchmarks/RESULTS.md). A first port with chunk loops ``range(j0, min(n, j0 + 64))``
was 2-5x slower: its assembly worked on vectors of 64-bit indices, most likely numba's
negative-index wraparound left in; constant-trip chunks from ``k * 64`` vectorize normally.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

import normfuse  # noqa: E402
from normfuse.cli.bench import interleaved_medians, reexec_with_malloc_tunables  # noqa: E402

FASTMATH = {"reassoc", "contract"}
CHUNK = 64


@intrinsic
def prefetch_l2(typingctx, address):
    def codegen(context, builder, signature, args):
        i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(address), codegen


@njit(fastmath=FASTMATH, inline="always")
def norm_row(x, w, b, out, i, following_row_address, prefetch):
    n = x.shape[1]
    s = np.float32(0)
    for j in range(n):
        s += x[i, j]
    m1 = s / n
    sd = np.float32(0)
    sdd = np.float32(0)
    for j in range(n):
        d = x[i, j] - m1
        sd += d
        sdd += d * d
    c = sd / n
    r = np.float32(1) / np.sqrt(sdd / n - c * c + np.float32(1e-5))
    if not prefetch:
        for j in range(n):
            out[i, j] = ((x[i, j] - m1) - c) * r * w[j] + b[j]
        return
    n_chunks = n // CHUNK
    for k in range(n_chunks):
        j0 = k * CHUNK
        for line in range(0, CHUNK * 4, 64):
            prefetch_l2(following_row_address + j0 * 4 + line)
        for j in range(j0, j0 + CHUNK):
            out[i, j] = ((x[i, j] - m1) - c) * r * w[j] + b[j]
    for j in range(n_chunks * CHUNK, n):
        out[i, j] = ((x[i, j] - m1) - c) * r * w[j] + b[j]


@njit(parallel=True, fastmath=FASTMATH)
def norm(x, w, b, out, rows_per_block, prefetch):
    n_rows = x.shape[0]
    row_bytes = x.shape[1] * 4
    base = x.ctypes.data
    for k in prange((n_rows + rows_per_block - 1) // rows_per_block):
        for i in range(k * rows_per_block, min(n_rows, (k + 1) * rows_per_block)):
            norm_row(x, w, b, out, i, base + min(i + 1, n_rows - 1) * row_bytes, prefetch)


def main() -> None:
    reexec_with_malloc_tunables()
    print("shape        copy   normfuse  probe  probe+prefetch (ms, medians of 21 interleaved)")
    for rows, n in [(4096, 1024), (1024, 4096), (8192, 4096)]:
        x = torch.randn(rows, n)
        w, b = torch.ones(n), torch.zeros(n)
        out, buf = torch.empty_like(x), torch.empty_like(x)
        xa, wa, ba, oa = x.numpy(), w.numpy(), b.numpy(), out.numpy()
        rows_per_block = max(1, min(64, (1 << 14) // n))
        calls = {
            "copy": lambda: buf.copy_(x),
            "normfuse": lambda: normfuse.layer_norm(x, (n,), w, b),
            "probe": lambda: norm(xa, wa, ba, oa, rows_per_block, False),
            "probe+prefetch": lambda: norm(xa, wa, ba, oa, rows_per_block, True),
        }
        norm(xa, wa, ba, oa, rows_per_block, True)
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (n,)), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            med = interleaved_medians(calls, 21, 1)
        print(f"{rows}x{n:<6} " + " ".join(f"{med[k] * 1e3:8.3f}" for k in calls), flush=True)


if __name__ == "__main__":
    main()
