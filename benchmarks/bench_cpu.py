"""CPU benchmark: normfuse vs torch.nn.functional.layer_norm vs a plain copy, measured interleaved.

    python benchmarks/bench_cpu.py            # the issue's shapes, fp32 and bf16
    python benchmarks/bench_cpu.py --quick    # fewer repetitions

For each shape and dtype, every repetition runs each contender once in turn (so a noisy
neighbour slows all of them alike) and the table reports medians and ratios:

- copy:   ``buf.copy_(x)`` into a preallocated tensor, the memory-traffic floor of a forward
- fwd:    the forward with weight and bias
- fwd+bwd: forward plus ``torch.autograd.grad`` over x, weight and bias
- latency: one small forward in inference (``torch.no_grad``), per call
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

import normfuse
from normfuse.cli.bench import interleaved_medians, reexec_with_malloc_tunables

SHAPES = [(4096, 1024), (8192, 768), (1024, 4096), (256, 16384), (8192, 4096)]
LATENCY_SHAPES = [(1, 4096), (8, 768)]


def _contenders(rows: int, n: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(n, generator=gen)).to(dtype)
    dy = torch.randn(rows, n, generator=gen).to(dtype)
    buf = torch.empty_like(x)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))

    def fwd_bwd(fn):
        def run():
            return torch.autograd.grad(fn(xg, (n,), wg, bg), (xg, wg, bg), dy)

        return run

    return {
        "copy": lambda: buf.copy_(x),
        "torch fwd": lambda: F.layer_norm(x, (n,), w, b),
        "normfuse fwd": lambda: normfuse.layer_norm(x, (n,), w, b),
        "torch fwd+bwd": fwd_bwd(F.layer_norm),
        "normfuse fwd+bwd": fwd_bwd(normfuse.layer_norm),
    }


def main() -> None:
    reexec_with_malloc_tunables()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    reps = 7 if args.quick else 21
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, normfuse {normfuse.__version__},"
        f" GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"
    )
    header = (
        f"{'shape':>12} {'dtype':>8} | {'copy ms':>8} {'torch fwd':>9} {'nf fwd':>8} {'fwd x':>6} {'nf/copy':>7} |"
        f" {'torch f+b':>9} {'nf f+b':>8} {'f+b x':>6}"
    )
    print(header)
    print("-" * len(header))
    for dtype in dtypes:
        for rows, n in SHAPES:
            inner = 1 if rows * n >= 1 << 24 else 3
            med = interleaved_medians(_contenders(rows, n, dtype), reps, inner)
            ms = {k: v * 1e3 for k, v in med.items()}
            print(
                f"{rows:>5}x{n:<6} {str(dtype).removeprefix('torch.'):>8} | {ms['copy']:8.3f}"
                f" {ms['torch fwd']:9.3f} {ms['normfuse fwd']:8.3f}"
                f" {ms['torch fwd'] / ms['normfuse fwd']:5.2f}x {ms['normfuse fwd'] / ms['copy']:6.2f}x |"
                f" {ms['torch fwd+bwd']:9.3f} {ms['normfuse fwd+bwd']:8.3f}"
                f" {ms['torch fwd+bwd'] / ms['normfuse fwd+bwd']:5.2f}x",
                flush=True,
            )
    print("\n(fwd x, f+b x: torch time / normfuse time, above 1 = normfuse faster; nf/copy: forward / copy)")

    print(f"\n{'latency':>12} {'dtype':>8} | {'torch us':>8} {'nf us':>8} {'nf/torch':>8}")
    for dtype in dtypes:
        for rows, n in LATENCY_SHAPES:
            x = torch.randn(rows, n).to(dtype)
            w = torch.ones(n, dtype=dtype, requires_grad=True)
            b = torch.zeros(n, dtype=dtype, requires_grad=True)
            with torch.no_grad():
                med = interleaved_medians(
                    {
                        "torch": lambda: F.layer_norm(x, (n,), w, b),
                        "normfuse": lambda: normfuse.layer_norm(x, (n,), w, b),
                    },
                    reps,
                    200,
                )
            print(
                f"{rows:>5}x{n:<6} {str(dtype).removeprefix('torch.'):>8} | {med['torch'] * 1e6:8.2f}"
                f" {med['normfuse'] * 1e6:8.2f} {med['normfuse'] / med['torch']:7.2f}x"
            )


if __name__ == "__main__":
    main()
