"""CPU benchmark: normfuse vs torch vs a plain copy, measured interleaved.

    python benchmarks/bench_cpu.py                      # LayerNorm on the issue's shapes, fp32 and bf16
    python benchmarks/bench_cpu.py --op rms_norm        # RMSNorm: vs F.rms_norm and a Llama-style composite
    python benchmarks/bench_cpu.py --op add_layer_norm  # fused add+norm vs x + r then F.layer_norm
    python benchmarks/bench_cpu.py --op add_rms_norm    # fused add+norm vs x + r then F.rms_norm
    python benchmarks/bench_cpu.py --quick              # fewer repetitions

For each shape and dtype, every repetition runs each contender once in turn (so a noisy
neighbour slows all of them alike) and the table reports medians and ratios:

- copy:    ``buf.copy_(x)`` into a preallocated tensor, the memory-traffic floor of a forward
           (an add+norm moves twice the bytes: its floor is two copies)
- fwd:     the forward, with weight (and bias for LayerNorm), in ``torch.no_grad``
- fwd+bwd: forward plus ``torch.autograd.grad`` over every input (x, weight, bias, residual)
- f+b floor: torch copies and adds into preallocated buffers that move the tensors a
           forward+backward must move (5 tensor passes; 9 for add+norm), the floor of f+b
- latency: one small forward in inference, per call (the add+norm ops against ``x + r`` then the norm)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import normfuse
from normfuse.cli.bench import OPS, contenders, implementations, interleaved_medians, reexec_with_malloc_tunables

SHAPES = [(4096, 1024), (8192, 768), (1024, 4096), (256, 16384), (8192, 4096)]
LATENCY_SHAPES = [(1, 4096), (8, 768)]


def main() -> None:
    reexec_with_malloc_tunables()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="layer_norm", choices=OPS)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default=None, help="e.g. 4096x1024,1024x4096 (default: the issue's five)")
    args = parser.parse_args()
    reps = 7 if args.quick else 21
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    impls = implementations(args.op, compiled=False)
    peers = [name for name in impls if name != "normfuse"]
    floor = 2 if args.op.startswith("add_") else 1  # copies' worth of bytes a forward must move

    print(
        f"{args.op}: torch {torch.__version__}, threads {torch.get_num_threads()}, normfuse {normfuse.__version__},"
        f" GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}"
    )
    cols = [f"{'shape':>12} {'dtype':>8} | {'copy ms':>8}"]
    for mode in ("fwd", "f+b"):
        cols.append(" ".join(f"{p + ' ' + mode:>13}" for p in peers) + f" {'nf ' + mode:>9} " + " ".join(
            f"{'vs ' + p:>9}" for p in peers))  # fmt: skip
    header = " | ".join(cols) + f" | {'nf fwd/floor':>12} | {'f+b floor':>9} {'torch/floor':>11} {'nf/floor':>8}"
    print(header)
    print("-" * len(header))
    for dtype in dtypes:
        for rows, n in shapes:
            inner = 1 if rows * n >= 1 << 24 else 3
            med = interleaved_medians(contenders(args.op, rows, n, dtype, "cpu", impls, floor=True), reps, inner)
            ms = {k: v * 1e3 for k, v in med.items()}
            line = f"{rows:>5}x{n:<6} {str(dtype).removeprefix('torch.'):>8} | {ms['copy']:8.3f}"
            for mode in ("fwd", "f+b"):
                mine = ms[f"normfuse {mode}"]
                line += " | " + " ".join(f"{ms[f'{p} {mode}']:13.3f}" for p in peers) + f" {mine:9.3f} "
                line += " ".join(f"{ms[f'{p} {mode}'] / mine:8.2f}x" for p in peers)
            line += f" | {ms['normfuse fwd'] / (floor * ms['copy']):11.2f}x"
            fb_floor = ms["f+b floor"]
            line += f" | {fb_floor:9.3f} {ms['torch f+b'] / fb_floor:10.2f}x {ms['normfuse f+b'] / fb_floor:7.2f}x"
            print(line, flush=True)
    print(
        "\n(vs X: X's time / normfuse's time, above 1 = normfuse faster; nf fwd/floor: normfuse forward / "
        f"{'two copies' if floor == 2 else 'one copy'}; f+b floor: ms of the copies and adds that move what a"
        " forward+backward must move, torch/floor and nf/floor: each one's forward+backward over it)"
    )
    print(f"\n{'latency':>12} {'dtype':>8} | {'torch us':>8} {'nf us':>8} {'nf/torch':>8}")
    for dtype in dtypes:
        for rows, n in LATENCY_SHAPES:
            x, r = torch.randn(rows, n).to(dtype), torch.randn(rows, n).to(dtype)
            w = torch.ones(n, dtype=dtype, requires_grad=True)  # a module's parameters, in inference
            b = torch.zeros(n, dtype=dtype, requires_grad=True)
            if args.op == "layer_norm":
                calls = {"torch": lambda: F.layer_norm(x, (n,), w, b), "normfuse": lambda: normfuse.layer_norm(x, (n,), w, b)}
            elif args.op == "rms_norm":
                calls = {"torch": lambda: F.rms_norm(x, (n,), w), "normfuse": lambda: normfuse.rms_norm(x, (n,), w)}
            elif args.op == "add_layer_norm":
                calls = {
                    "torch": lambda: (F.layer_norm(h := x + r, (n,), w, b), h),
                    "normfuse": lambda: normfuse.add_layer_norm(x, r, (n,), w, b),
                }
            else:
                calls = {
                    "torch": lambda: (F.rms_norm(h := x + r, (n,), w), h),
                    "normfuse": lambda: normfuse.add_rms_norm(x, r, (n,), w),
                }
            with torch.no_grad():
                med = interleaved_medians(calls, reps, 200)
            print(
                f"{rows:>5}x{n:<6} {str(dtype).removeprefix('torch.'):>8} | {med['torch'] * 1e6:8.2f}"
                f" {med['normfuse'] * 1e6:8.2f} {med['normfuse'] / med['torch']:7.2f}x"
            )


if __name__ == "__main__":
    main()
