"""Streaming (non-temporal) stores inside a LayerNorm forward: a plain numba kernel with
ordinary stores against the same kernel writing each 64-element block of its output through an
L1 buffer and 64-byte aligned non-temporal vector stores, beside a copy, normfuse and torch.

    python benchmarks/ntstore_kernel_probe.py

fp32, two threads, rows of a multiple of 16 features (64-byte aligned rows), medians of 41
interleaved rounds, ms. ``benchmarks/ntstore_probe.py`` measures the stores alone; this probe
measures them in a norm's output loop. See RESULTS.md, seventeenth session.
"""

import statistics
import time

import numpy as np, torch, normfuse
from numba import njit, prange, types
from numba.extending import intrinsic
from llvmlite import ir

BLOCK = 64

@intrinsic
def nt_store_block(typingctx, dst_address, src):
    """Copy src (1D array of BLOCK elements) to the 64-byte aligned address with non-temporal stores."""
    if not isinstance(dst_address, types.Integer) or not isinstance(src, types.Array):
        return None
    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[1])(context, builder, value=args[1])
        elt = context.get_value_type(sig.args[1].dtype)
        vt = ir.VectorType(elt, BLOCK)
        src_p = builder.bitcast(arr.data, vt.as_pointer())
        v = builder.load(src_p, align=4)
        dst_p = builder.inttoptr(args[0], vt.as_pointer())
        st = builder.store(v, dst_p, align=64)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.none(dst_address, src), codegen

@intrinsic
def sfence(typingctx):
    def codegen(context, builder, sig, args):
        fn = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen

@njit(fastmath=True, parallel=True)
def ln_reg(x, w, b, out, eps):
    R, n = x.shape
    for i in prange(R):
        m = 0.0
        for j in range(n): m += x[i, j]
        m = np.float32(m / n)
        s = np.float32(0.0)
        for j in range(n):
            d = x[i, j] - m; s += d * d
        r = np.float32(1.0 / np.sqrt(s / n + eps))
        for j in range(n):
            out[i, j] = (x[i, j] - m) * r * w[j] + b[j]

@njit(fastmath=True, parallel=True)
def ln_nt(x, w, b, out, eps, out_at):
    R, n = x.shape
    nb = 2  # one block of rows per thread
    per = (R + nb - 1) // nb
    for k in prange(nb):
        buf = np.empty(BLOCK, np.float32)
        for i in range(k * per, min(R, (k + 1) * per)):
            m = 0.0
            for j in range(n): m += x[i, j]
            m = np.float32(m / n)
            s = np.float32(0.0)
            for j in range(n):
                d = x[i, j] - m; s += d * d
            r = np.float32(1.0 / np.sqrt(s / n + eps))
            row_at = out_at + i * n * 4
            nblk = n // BLOCK  # assumes aligned rows in the probe
            for kk in range(nblk):
                j0 = kk * BLOCK
                for jj in range(BLOCK):
                    j = j0 + jj
                    buf[jj] = (x[i, j] - m) * r * w[j] + b[j]
                nt_store_block(row_at + j0 * 4, buf)
            for j in range(nblk * BLOCK, n):
                out[i, j] = (x[i, j] - m) * r * w[j] + b[j]
        sfence()

def bench(shape):
    R, n = shape
    x = torch.randn(R, n); w = torch.randn(n); b = torch.randn(n)
    xa, wa, ba = x.numpy(), w.numpy(), b.numpy()
    t1 = torch.empty_like(x); t2 = torch.empty_like(x); o1 = t1.numpy(); o2 = t2.numpy(); assert o2.ctypes.data % 64 == 0
    buf = torch.empty_like(x)
    ln_reg(xa, wa, ba, o1, np.float32(1e-5)); ln_nt(xa, wa, ba, o2, np.float32(1e-5), o2.ctypes.data)
    assert np.allclose(o1, o2, atol=1e-5), np.abs(o1 - o2).max()
    ref = torch.nn.functional.layer_norm(x, (n,), w, b).numpy()
    assert np.allclose(o2, ref, atol=1e-4)
    fs = {"copy": lambda: buf.copy_(x), "reg": lambda: ln_reg(xa, wa, ba, o1, np.float32(1e-5)),
          "nt": lambda: ln_nt(xa, wa, ba, o2, np.float32(1e-5), o2.ctypes.data),
          "nf": lambda: normfuse.layer_norm(x, (n,), w, b), "torch": lambda: torch.nn.functional.layer_norm(x, (n,), w, b)}
    s = {k: [] for k in fs}
    for _ in range(41):
        for k, f in fs.items():
            t = time.perf_counter(); f(); s[k].append(time.perf_counter() - t)
    print(shape, {k: "%.3f" % (statistics.median(v) * 1e3) for k, v in s.items()})

for sh in ((4096, 1024), (8192, 768), (1024, 4096), (256, 16384)):
    bench(sh)
