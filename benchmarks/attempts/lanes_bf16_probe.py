"""Probe, not adopted (RESULTS.md, nineteenth session): a bf16 LayerNorm forward that reads and
    writes each row as 32-bit words holding two bf16 values (even lanes widened by a shift, odd
    lanes by a mask, both results packed back into one word) against the same kernel on 16-bit
    elements, two threads, beside a copy. Medians of 31 interleaved rounds, ms.

    python benchmarks/attempts/lanes_bf16_probe.py
"""
import time, statistics, numpy as np, torch
from numba import njit, prange
from normfuse.backends._numba_bits import _bits_as_f32, _f32_as_bits, prefer_vector_width
F = {"reassoc", "contract"}

@njit(fastmath=F, inline="always")
def bf(u):  # u: uint16 -> f32
    return _bits_as_f32(np.uint32(u) << np.uint32(16))

@njit(fastmath=F, inline="always")
def rne(v):  # f32 -> uint32 with the bf16 in the high half (low half garbage)
    u = np.uint32(_f32_as_bits(np.float32(v)))
    return u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))

@njit(fastmath=F)
def rows16(h, w, b, out, r0, r1):
    prefer_vector_width(512)
    n = h.shape[1]
    for i in range(r0, r1):
        m1 = np.float32(0)
        for j in range(64):
            m1 += bf(h[i, j])
        m1 = m1 / np.float32(64)
        sd = np.float32(0); sdd = np.float32(0)
        for j in range(n):
            d = bf(h[i, j]) - m1
            sd += d; sdd += d * d
        c = sd / np.float32(n)
        var = sdd / np.float32(n) - c * c
        r = np.float32(1) / np.sqrt(var + np.float32(1e-5))
        mm = m1 + c
        for j in range(n):
            out[i, j] = np.uint16(rne((bf(h[i, j]) - mm) * r * w[j] + b[j]) >> np.uint32(16))

@njit(fastmath=F)
def rows32(h, we, wo, be, bo, out, r0, r1):
    prefer_vector_width(512)
    n2 = h.shape[1]
    for i in range(r0, r1):
        m1 = np.float32(0)
        for k in range(32):
            u = h[i, k]
            m1 += _bits_as_f32(u << np.uint32(16)) + _bits_as_f32(u & np.uint32(0xFFFF0000))
        m1 = m1 / np.float32(64)
        sd = np.float32(0); sdd = np.float32(0)
        for k in range(n2):
            u = h[i, k]
            d0 = _bits_as_f32(u << np.uint32(16)) - m1
            d1 = _bits_as_f32(u & np.uint32(0xFFFF0000)) - m1
            sd += d0 + d1; sdd += d0 * d0 + d1 * d1
        c = sd / np.float32(2 * n2)
        var = sdd / np.float32(2 * n2) - c * c
        r = np.float32(1) / np.sqrt(var + np.float32(1e-5))
        mm = m1 + c
        for k in range(n2):
            u = h[i, k]
            y0 = (_bits_as_f32(u << np.uint32(16)) - mm) * r * we[k] + be[k]
            y1 = (_bits_as_f32(u & np.uint32(0xFFFF0000)) - mm) * r * wo[k] + bo[k]
            out[i, k] = (rne(y0) >> np.uint32(16)) | (rne(y1) & np.uint32(0xFFFF0000))

@njit(parallel=True)
def run16(h, w, b, out):
    R = h.shape[0]; per = (R + 1) // 2
    for t in prange(2):
        rows16(h, w, b, out, t * per, min(R, (t + 1) * per))

@njit(parallel=True)
def run32(h, we, wo, be, bo, out):
    R = h.shape[0]; per = (R + 1) // 2
    for t in prange(2):
        rows32(h, we, wo, be, bo, out, t * per, min(R, (t + 1) * per))

for R, n in ((1024, 4096), (4096, 1024), (8192, 768)):
    x = torch.randn(R, n).bfloat16(); w = torch.randn(n); b = torch.randn(n)
    o1 = torch.empty_like(x); o2 = torch.empty_like(x); buf = torch.empty_like(x)
    h16 = x.view(torch.int16).numpy().view(np.uint16); h32 = x.view(torch.int32).numpy().view(np.uint32)
    O1 = o1.view(torch.int16).numpy().view(np.uint16); O2 = o2.view(torch.int32).numpy().view(np.uint32)
    wn, bn = w.numpy(), b.numpy()
    we, wo, be, bo = [np.ascontiguousarray(a) for a in (wn[0::2], wn[1::2], bn[0::2], bn[1::2])]
    f = {"copy": lambda: buf.copy_(x), "16": lambda: run16(h16, wn, bn, O1), "32": lambda: run32(h32, we, wo, be, bo, O2)}
    for g in f.values(): g(); g()
    ref = torch.nn.functional.layer_norm(x.float(), (n,), w, b).bfloat16()
    print("max diff 16", (o1.float() - ref.float()).abs().max().item(), "32", (o2.float() - ref.float()).abs().max().item(), "16 vs 32 equal frac", (o1 == o2).float().mean().item())
    s = {k: [] for k in f}
    for _ in range(31):
        for k, g in f.items():
            t = time.perf_counter(); g(); s[k].append(time.perf_counter() - t)
    m = {k: statistics.median(v) * 1e3 for k, v in s.items()}
    print((R, n), {k: f"{v:.3f}" for k, v in m.items()}, f"16/32 {m['16']/m['32']:.2f}x")
