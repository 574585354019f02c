"""First-call (JIT) cost of normfuse in a fresh process, per dtype: forward, then backward.

    python benchmarks/first_call.py          # run twice: the first run compiles (cold),
                                             # the second loads numba's on-disk cache (warm)
"""

from __future__ import annotations

import time

import torch

t0 = time.perf_counter()
import normfuse  # noqa: E402

print(f"import normfuse: {time.perf_counter() - t0:.2f} s")
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(64, 1024, dtype=dtype, requires_grad=True)
    m = normfuse.LayerNorm(1024, dtype=dtype)
    t0 = time.perf_counter()
    out = m(x)
    t1 = time.perf_counter()
    out.sum().backward()
    t2 = time.perf_counter()
    print(f"{str(dtype).removeprefix('torch.'):>9}: first forward {t1 - t0:.2f} s, first backward {t2 - t1:.2f} s")
