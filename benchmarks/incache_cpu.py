"""Per-element cost of the CPU kernels on data that stays in cache (one thread), variant by variant.

    python benchmarks/incache_cpu.py              # 32 rows: the whole call, overhead included
    python benchmarks/incache_cpu.py --rows 200   # the kernels' own per-element cost

32 rows of 1024 features (128 KiB per fp32 tensor) are processed again and again, so memory
bandwidth drops out and what is left is the kernels' own work: the plain norm, RMSNorm, the
residual add, dropout's hash, next to torch's ``x + r`` for scale. The variants take turns,
9 rounds of 40 calls each; the median round is reported (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse

import numba
import torch

from normfuse.backends import cpu
from normfuse.cli.bench import interleaved_medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="rows of 1024 (200: about 1 MiB per fp32 tensor, "
                        "L2/L3-resident, where the per-call overhead no longer counts)")
    args = parser.parse_args()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    rows, n = args.rows, 1024
    for dtype in (torch.float32, torch.bfloat16):
        x, r = torch.randn(rows, n).to(dtype), torch.randn(rows, n).to(dtype)
        w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
        buf = torch.empty_like(x)
        variants = {
            "layer norm": lambda: cpu.norm_fwd(x, w, b, 1e-5, False),
            "rms norm": lambda: cpu.norm_fwd(x, w, None, 1e-5, True),
            "add + layer norm": lambda: cpu.norm_fwd(x, w, b, 1e-5, False, residual=r, residual_out_dtype=dtype),
            "add + rms norm": lambda: cpu.norm_fwd(x, w, None, 1e-5, True, residual=r, residual_out_dtype=dtype),
            "dropout + add + layer norm": lambda: cpu.norm_fwd(
                x, w, b, 1e-5, False, residual=r, residual_out_dtype=dtype, dropout_p=0.1, seed=1
            ),
            "torch x + r": lambda: x + r,
            "torch copy": lambda: buf.copy_(x),
        }
        for name, seconds in interleaved_medians(variants, reps=9, inner=40).items():
            us = seconds * 1e6
            print(f"{str(dtype).removeprefix('torch.'):>8}  {name:<28} {us:7.1f} us  {us * 1e3 / (rows * n):5.2f} ns/element")


if __name__ == "__main__":
    main()
