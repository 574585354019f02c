"""Probe, not adopted (RESULTS.md, twenty-third session): the backward's dw/db sums taken over
    column blocks of a chunk of rows held in L2, so that the partial sums stay in L1 (or in
    registers), against the kernel's row pairs, which read and write the chunk's partial-sum row
    for every pair. fp32 LayerNorm, every gradient, two threads; the chunk's rows fit a byte
    budget (1 MiB, 256 KiB, 512 KiB); 128 columns a block. Beside torch's add into a
    buffer (the three passes a backward must make) and the kernel without dw/db. Medians of 9
    interleaved rounds of 10 calls, ms.

    python benchmarks/attempts/tiled_dw_probe.py
"""
import numpy as np, torch, numba
from numba import njit, prange
from normfuse.backends import cpu
from normfuse.backends._numba_bits import prefer_vector_width
from normfuse.cli.bench import interleaved_medians, reexec_with_malloc_tunables
reexec_with_malloc_tunables()

BLOCK = 128  # a compile-time block, the inner loop from 0: with the width and bounds read at run
# time the probe ran 3-8x slower (most likely numba's negative-index check kept it scalar)

@njit(fastmath=True)
def tiled_chunk(dy, x, w, mean, rstd, dx, dwp, dbp, r0, r1):
    prefer_vector_width(512)  # as the kernel's row loops on this host
    n = x.shape[1]
    inv_n = np.float32(1.0 / n)
    c1 = np.empty(r1 - r0, np.float32)
    c2 = np.empty(r1 - r0, np.float32)
    for ii in range(r1 - r0):
        i = r0 + ii
        m = mean[i]
        sdg = np.float32(0.0)
        sg = np.float32(0.0)
        for j in range(n):
            g = dy[i, j] * w[j]
            sdg += (x[i, j] - m) * g
            sg += g
        c1[ii] = rstd[i] * sdg * inv_n
        c2[ii] = sg * inv_n
    dwp[:] = 0
    dbp[:] = 0
    for kb in range(n // BLOCK):
        j0 = kb * BLOCK
        for ii in range(r1 - r0):
            i = r0 + ii
            m = mean[i]
            r = rstd[i]
            a = c1[ii]
            b = c2[ii]
            for jj in range(BLOCK):
                j = j0 + jj
                dyv = dy[i, j]
                xh = (x[i, j] - m) * r
                wv = w[j]
                acc_w = dwp[j]
                acc_b = dbp[j]
                dx[i, j] = r * (dyv * wv - xh * a - b)
                dwp[j] = acc_w + dyv * xh
                dbp[j] = acc_b + dyv


@njit(parallel=True, nogil=True)
def bwd_tiled(dy, x, w, mean, rstd, dx, dw_part, db_part, rows_per_chunk, n_chunks):
    n_rows = x.shape[0]
    for k in prange(n_chunks):
        r0 = k * rows_per_chunk
        tiled_chunk(dy, x, w, mean, rstd, dx, dw_part[k], db_part[k], r0, min(n_rows, r0 + rows_per_chunk))


@njit(parallel=False)
def sum_parts(part, out):
    out[:] = 0
    for k in range(part.shape[0]):
        for j in range(part.shape[1]):
            out[j] += part[k, j]

def tiled(dy, x, w, mean, rstd, budget):
    n_rows, n = x.shape
    rows = max(2, min(n_rows, budget // (8 * n)))
    n_chunks = (n_rows + rows - 1) // rows
    dx = torch.empty_like(x)
    dwp = np.empty((n_chunks, n), np.float32); dbp = np.empty((n_chunks, n), np.float32)
    bwd_tiled(dy.numpy(), x.numpy(), w.numpy(), mean.numpy(), rstd.numpy(), dx.numpy(), dwp, dbp, rows, n_chunks)
    dw = np.empty(n, np.float32); db = np.empty(n, np.float32)
    sum_parts(dwp, dw); sum_parts(dbp, db)
    return dx, dw, db

torch.manual_seed(0)
for shape in [(4096, 1024), (1024, 4096), (256, 16384), (8192, 768)]:
    x = torch.randn(*shape); dy = torch.randn(*shape); w = torch.randn(shape[1]); b = torch.randn(shape[1])
    out, _, mean, rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, False)
    dx0, _, dw0, db0 = cpu.norm_bwd(dy, x, w, mean, rstd, False, True, True, True)
    dx1, dw1, db1 = tiled(dy, x, w, mean, rstd, 1 << 20)
    err = max((dx0 - dx1).abs().max().item(), (dw0 - torch.from_numpy(dw1)).abs().max().item() / dw0.abs().max().item())
    buf2 = torch.empty_like(x)
    v = {
        "add": lambda: torch.add(dy, x, out=buf2),
        "nf bwd": lambda: cpu.norm_bwd(dy, x, w, mean, rstd, False, True, True, True),
        "nf dx only": lambda: cpu.norm_bwd(dy, x, w, mean, rstd, False, True, False, False),
        "tiled 1M": lambda: tiled(dy, x, w, mean, rstd, 1 << 20),
        "tiled 256K": lambda: tiled(dy, x, w, mean, rstd, 1 << 18),
        "tiled 512K": lambda: tiled(dy, x, w, mean, rstd, 1 << 19),
    }
    r = interleaved_medians(v, reps=9, inner=10)  # "tiled B": a chunk's byte budget
    print(shape, f"err {err:.1e}", "  ".join(f"{k} {s*1e3:.3f}" for k, s in r.items()), flush=True)
